"""Payload indexes and the full filter language, against a brute-force evaluation in Python.

The reference below is written from the documented semantics (index/filters.py), independently
of the library: a property test generates payloads and filters, and every filter must select the
same points through declared payload indexes, through the catalog (no index), and in Python.
"""

from __future__ import annotations

import json
import operator
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index import Collection, CollectionConfig
from index.errors import InvalidArgument, InvalidFilter
from tests.synthetic import embeddings, queries_near, recall_at_k

ROOT = Path(__file__).resolve().parents[1]
MISSING = object()

# -- the reference ----------------------------------------------------------------------------


def ref_value(payload, key):
    node = payload
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def ref_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return isinstance(a, int | float) and isinstance(b, int | float) and float(a) == float(b)


def ref_datetime(text):
    try:
        parsed = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ref_in_range(item, bounds):
    if all(isinstance(b, str) for b in bounds.values()):
        if not isinstance(item, str) or ref_datetime(item) is None:
            return False
        item, bounds = ref_datetime(item), {k: ref_datetime(v) for k, v in bounds.items()}
    elif isinstance(item, bool) or not isinstance(item, int | float):
        return False
    checks = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
    return all(checks[name](item, bound) for name, bound in bounds.items())


def ref_condition(payload, cond):
    if "has_id" in cond:
        return payload.get("__id__") in cond["has_id"]
    if "key" not in cond:  # a nested filter
        return ref_filter(payload, cond)
    value = ref_value(payload, cond["key"])
    items = value if isinstance(value, list) else [value]
    if "exists" in cond:
        return (value is not MISSING and value is not None) == cond["exists"]
    if "is_null" in cond:
        return (value is None) == cond["is_null"]
    if "is_empty" in cond:
        return (value is MISSING or value is None or value == []) == cond["is_empty"]
    if value is MISSING or value is None:
        return False
    if "match" in cond:
        return any(ref_equal(item, cond["match"]) for item in items)
    if "any" in cond:
        return any(ref_equal(item, v) for item in items for v in cond["any"])
    return any(ref_in_range(item, cond["range"]) for item in items)


def ref_filter(payload, flt):
    return (
        all(ref_condition(payload, c) for c in flt.get("must", []))
        and (not flt.get("should") or any(ref_condition(payload, c) for c in flt["should"]))
        and not any(ref_condition(payload, c) for c in flt.get("must_not", []))
    )


# -- generated payloads and filters -------------------------------------------------------------
# Keys with a declared index each get conditions of the index's type; their values are mostly of
# that type, sometimes another, null, an array or absent (what real payloads hold).
INDEXED = {"s": "keyword", "i": "integer", "f": "float", "b": "bool", "d": "datetime", "m.x": "keyword"}
WORDS = ["a", "b", "c", "d"]
DATES = ["2024-01-01T00:00:00Z", "2024-01-01T12:30:00+02:00", "2024-03-05", "2023-12-31T23:59:59.5",
         "2025-06-01T00:00:00-05:00", "not a date"]

words = st.sampled_from(WORDS)
ints = st.integers(-3, 3)
floats = st.sampled_from([-1.5, -0.25, 0.0, 0.5, 1.0, 2.0, 2.5])
dates = st.sampled_from(DATES)
anything = st.one_of(words, ints, floats, st.booleans(), st.none(), dates)


def typed(values):
    """A value of the key's type, or now and then anything else, an array, null."""
    return st.one_of(values, values, values, st.lists(st.one_of(values, anything), max_size=3), anything)


VALUES = {"s": typed(words), "i": typed(ints), "f": typed(floats), "b": typed(st.booleans()), "d": typed(dates)}


@st.composite
def payloads(draw):
    payload = {}
    for key, values in VALUES.items():
        if draw(st.integers(0, 5)):  # absent one time in six
            payload[key] = draw(values)
    shape = draw(st.integers(0, 3))
    if shape == 1:
        payload["m"] = {"x": draw(typed(words))}
    elif shape == 2:
        payload["m"] = draw(anything)  # not an object: m.x is absent
    return payload if draw(st.integers(0, 9)) else None


def range_of(bound):
    return st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), bound, min_size=1, max_size=2).filter(
        lambda r: not ({"gt", "gte"} <= set(r) or {"lt", "lte"} <= set(r))
    )


def conditions():
    key_of = {"keyword": st.sampled_from(["s", "m.x"])}
    return st.one_of(
        st.builds(lambda k, v: {"key": k, "match": v}, key_of["keyword"], words),
        st.builds(lambda k, v: {"key": k, "any": v}, key_of["keyword"], st.lists(words, min_size=1, max_size=3)),
        st.builds(lambda v: {"key": "i", "match": v}, ints),
        st.builds(lambda v: {"key": "i", "any": v}, st.lists(ints, min_size=1, max_size=3)),
        st.builds(lambda r: {"key": "i", "range": r}, range_of(st.one_of(ints, floats))),
        st.builds(lambda r: {"key": "f", "range": r}, range_of(floats)),
        st.builds(lambda v: {"key": "b", "match": v}, st.booleans()),
        st.builds(lambda r: {"key": "d", "range": r}, range_of(st.sampled_from(DATES[:5]))),
        st.builds(lambda k, v: {"key": k, "exists": v}, st.sampled_from([*INDEXED, "m"]), st.booleans()),
        st.builds(lambda k, v: {"key": k, "is_null": v}, st.sampled_from([*INDEXED, "m"]), st.booleans()),
        st.builds(lambda k, v: {"key": k, "is_empty": v}, st.sampled_from([*INDEXED, "m"]), st.booleans()),
        st.builds(lambda ids: {"has_id": ids}, st.lists(st.integers(0, 40), min_size=1, max_size=5)),
    )


filters = st.recursive(
    st.fixed_dictionaries({}, optional={
        "must": st.lists(conditions(), max_size=3), "should": st.lists(conditions(), max_size=3),
        "must_not": st.lists(conditions(), max_size=2),
    }),
    lambda inner: st.fixed_dictionaries({}, optional={
        "must": st.lists(st.one_of(conditions(), inner), max_size=3),
        "should": st.lists(st.one_of(conditions(), inner), max_size=3),
        "must_not": st.lists(st.one_of(conditions(), inner), max_size=2),
    }),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two collections: one with every key indexed, one with none."""
    root = tmp_path_factory.mktemp("pi")
    indexed = Collection.create(root / "indexed", CollectionConfig(dim=4, coarse="flat"))
    for key, type in INDEXED.items():
        indexed.create_payload_index(key, type)
    plain = Collection.create(root / "plain", CollectionConfig(dim=4, coarse="flat"))
    yield indexed, plain
    indexed.close()
    plain.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(payloads(), min_size=1, max_size=30), flt=filters, replace=st.integers(0, 5))
def test_filters_match_the_reference(pair, batch, flt, replace):
    indexed, plain = pair
    # The two collections accumulate points across examples; ids restart, so earlier points are
    # replaced (the indexes see replacements and tombstones too).
    ids = list(range(len(batch)))
    vectors = np.ones((len(batch), 4), dtype=np.float32)
    for col in (indexed, plain):
        col.upsert(ids, vectors, batch)
        col.delete(list(range(len(batch), len(batch) + 30)))  # drop what earlier, longer batches left
        if replace and len(batch) > replace:  # replace some again, with their own payloads
            col.upsert(ids[:replace], vectors[:replace], batch[:replace])
    seen = [{**(p or {}), "__id__": i} for i, p in enumerate(batch)]  # the reference's view of has_id
    expected = [i for i, p in enumerate(seen) if ref_filter(p, flt)]
    assert indexed.count(filter=flt) == len(expected)
    assert plain.count(filter=flt) == len(expected)
    for col in (indexed, plain):
        hits = col.search(np.ones(4, dtype=np.float32), len(batch), filter=flt, exact=True)[0]
        assert sorted(h.id for h in hits) == expected


# -- maintenance ------------------------------------------------------------------------------
N = 3000


def make_payloads(n, seed):
    rng = np.random.default_rng(seed)
    return [
        {"lang": WORDS[rng.integers(4)], "year": int(rng.integers(2000, 2025)), "score": float(rng.random()),
         "tags": [WORDS[t] for t in rng.choice(4, int(rng.integers(0, 3)), replace=False)],
         "at": f"2024-0{1 + int(rng.integers(0, 9))}-1{int(rng.integers(0, 9))}T00:00:00Z",
         "kind": [WORDS[0], True, 7, None][int(rng.integers(0, 4))]}  # unindexed, mixed types
        for _ in range(n)
    ]


CHECKS = [
    {"must": [{"key": "lang", "match": "a"}]},
    {"must": [{"key": "year", "range": {"gte": 2010, "lt": 2015}}]},
    {"must": [{"key": "score", "range": {"lt": 0.3}}, {"key": "tags", "match": "b"}]},
    {"should": [{"key": "at", "range": {"gte": "2024-05-01T00:00:00Z"}}, {"key": "lang", "any": ["c", "d"]}]},
    {"must_not": [{"key": "tags", "exists": True}]},
]


def declare(col):
    for key, type in {"lang": "keyword", "year": "integer", "score": "float", "tags": "keyword",
                      "at": "datetime"}.items():
        col.create_payload_index(key, type)


def expected_kinds(current, flt):
    """Points per string or boolean value of "kind", as the reference sees them."""
    counts = {}
    for p in current.values():
        kind = p.get("kind")
        if ref_filter(p, flt) and isinstance(kind, str | bool):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def assert_consistent(col, current):
    """Counts, facets and the description agree with the reference over ``current`` (id -> payload)."""
    for flt in CHECKS:
        assert col.count(filter=flt) == sum(ref_filter(p, flt) for p in current.values()), flt
    expected = {}
    for p in current.values():
        if ref_filter(p, CHECKS[1]):
            for tag in set(p["tags"]):
                expected[tag] = expected.get(tag, 0) + 1
    values, indexed = col.facet("tags", filter=CHECKS[1])
    assert dict(values) == expected and indexed
    values, indexed = col.facet("kind", filter=CHECKS[1])  # no index: read from the payloads
    assert dict(values) == expected_kinds(current, CHECKS[1]) and not indexed
    about = col.payload_indexes()
    assert set(about) == {"lang", "year", "score", "tags", "at"}
    assert about["lang"]["points"] == len(current)
    assert all(info["ram_bytes"] > 0 for info in about.values())


def test_indexes_follow_upsert_replace_delete_compaction_and_reopen(tmp_path):
    path = tmp_path / "c"
    vectors = embeddings(N, 8, seed=1)
    first = make_payloads(N, 2)
    col = Collection.create(path, CollectionConfig(dim=8))
    col.upsert(list(range(2000)), vectors[:2000], first[:2000])  # before the indexes: built over these
    current = dict(enumerate(first[:2000]))
    declare(col)
    assert_consistent(col, current)
    col.upsert(list(range(2000, N)), vectors[2000:], first[2000:])  # after: kept in step
    current.update({i: first[i] for i in range(2000, N)})
    second = make_payloads(500, 3)
    col.upsert(list(range(0, 1000, 2)), vectors[:500], second)  # replaced
    current.update(dict(zip(range(0, 1000, 2), second, strict=True)))
    col.delete(list(range(1000, 1300)))
    for i in range(1000, 1300):
        del current[i]
    assert_consistent(col, current)
    col.compact()  # rows renumbered
    assert_consistent(col, current)
    col.close()
    col = Collection.open(path)
    assert_consistent(col, current)
    assert col.drop_payload_index("score") and not col.drop_payload_index("score")
    assert "score" not in col.payload_indexes()
    assert col.count(filter=CHECKS[2]) == sum(ref_filter(p, CHECKS[2]) for p in current.values())  # unindexed
    col.close()
    assert "score" not in Collection.open(path).payload_indexes()


CHILD = """
import os, signal, sys
import numpy as np
from index import Collection
from tests.test_payload_index import make_payloads
col = Collection.open(sys.argv[1])
payloads = make_payloads(400, 9)
col.upsert(list(range(400)), np.ones((400, 8), dtype=np.float32), payloads)
col.delete(list(range(2500, 2600)))
col.create_payload_index("year", "float")  # another type replaces the index
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_indexes_survive_a_crash(tmp_path):
    path = tmp_path / "c"
    first = make_payloads(N, 2)
    col = Collection.create(path, CollectionConfig(dim=8))
    col.upsert(list(range(N)), embeddings(N, 8, seed=1), first)
    declare(col)
    col.close()
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "acknowledged" in child.stdout
    current = dict(enumerate(first))
    current.update(enumerate(make_payloads(400, 9)))
    for i in range(2500, 2600):
        del current[i]
    col = Collection.open(path)
    assert col.payload_indexes()["year"]["type"] == "float"
    assert_consistent(col, current)
    col.close()


# -- bad input ---------------------------------------------------------------------------------
def test_bad_indexes_and_conditions_are_refused_and_nothing_changes(tmp_path):
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=8))
    col.upsert(list(range(50)), embeddings(50, 8, seed=1), make_payloads(50, 2))
    declare(col)
    before = col.payload_indexes()
    with pytest.raises(InvalidArgument, match="unknown payload index type 'text'"):
        col.create_payload_index("note", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="letters, digits"):
        col.create_payload_index("a..b", "keyword")
    with pytest.raises(InvalidFilter, match="'lang' is indexed as keyword, which cannot answer a match or range on"):
        col.count(filter={"must": [{"key": "lang", "range": {"gte": 1}}]})
    with pytest.raises(InvalidFilter, match="'year' is indexed as integer, which cannot answer a match on strings"):
        col.search(np.ones(8, dtype=np.float32), filter={"must": [{"key": "year", "match": "2020"}]})
    with pytest.raises(InvalidFilter, match="not an RFC 3339 datetime; write it like"):
        col.count(filter={"must": [{"key": "at", "range": {"gte": "last tuesday"}}]})
    with pytest.raises(InvalidFilter, match="all numbers or all RFC 3339"):
        col.count(filter={"must": [{"key": "at", "range": {"gte": "2024-01-01", "lt": 5}}]})
    with pytest.raises(InvalidFilter, match="at most one lower bound"):
        col.count(filter={"must": [{"key": "year", "range": {"gt": 1, "gte": 2}}]})
    with pytest.raises(InvalidFilter, match="'exists' takes true or false"):
        col.count(filter={"must": [{"key": "year", "exists": "yes"}]})
    with pytest.raises(InvalidArgument, match="facets count strings and booleans, and 'year' is indexed as integer"):
        col.facet("year")
    with pytest.raises(InvalidArgument, match="letters, digits"):
        col.facet("a..b")
    assert col.facet("nothing") == ([], False)
    assert col.payload_indexes() == before
    col.close()
    assert Collection.open(tmp_path / "c").payload_indexes().keys() == before.keys()


# -- filtered approximate search ----------------------------------------------------------------
def test_filtered_search_keeps_recall_and_gives_k_hits_at_every_selectivity(tmp_path):
    n, dim = 20_000, 32
    base = embeddings(n, dim, seed=11)
    rng = np.random.default_rng(12)
    ranks = rng.random(n)
    # "side" follows the vectors: a filter on it is correlated with where a query lands.
    side = base[:, 0] > np.quantile(base[:, 0], 0.95)
    payloads = [{"rank": float(r), "side": bool(s)} for r, s in zip(ranks, side, strict=True)]
    # 4-bit codes: at 32 dimensions 1-bit ones (8 bytes) rank too coarsely for a test of recall.
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=dim, bits=4, oversampling=16))
    col.upsert(list(range(n)), base, payloads)
    col.rebuilds.wait()
    col.create_payload_index("rank", "float")
    col.create_payload_index("side", "bool")
    queries = queries_near(base, 40, seed=13)
    queries[20:, 0] = -np.abs(queries[20:, 0]) - 1  # half of them far from the rows with side true
    cases = {f"rank<{s}": ({"must": [{"key": "rank", "range": {"lt": s}}]}, ranks < s)
             for s in (0.001, 0.01, 0.1, 0.5)}
    cases["side"] = ({"must": [{"key": "side", "match": True}]}, side)
    for label, (flt, mask) in cases.items():
        allowed = np.flatnonzero(mask)
        normed = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = normed @ base[allowed].T
        truth = allowed[np.argsort(-scores, axis=1)[:, :10]].tolist()
        found = col.search(queries, 10, filter=flt, with_payload=False)
        assert all(len(hits) == 10 for hits in found), label
        assert recall_at_k(truth, [[h.id for h in hits] for hits in found], 10) >= 0.98, label
    col.close()


def test_datetime_and_number_semantics():
    from index.filters import parse_datetime

    assert parse_datetime("2024-01-01T00:00:00Z") == parse_datetime("2024-01-01T02:00:00+02:00")
    assert parse_datetime("2024-01-01") == parse_datetime("2024-01-01T00:00:00Z")
    assert parse_datetime("2024-13-01") is None
    assert json.loads("2.0") == 2  # numbers compare by value: match 2 finds 2.0


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(0, 200_000), max_size=3000),
    ranges=st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 70_000)), max_size=3),
    n=st.integers(1, 260_000),
    optimize=st.booleans(),
)
def test_packed_bits_match_numpy(rows, ranges, n, optimize):
    """Roaring's portable serialization read as packed bits: array, bitmap and run containers."""
    from pyroaring import BitMap

    from index.row_sets import Allowed, packed_bits

    bm = BitMap(rows)
    for start, length in ranges:
        bm.add_range(start, start + length)
    if optimize:
        bm.run_optimize()  # run containers
    mask = np.zeros(n, dtype=bool)
    inside = np.array([r for r in bm if r < n], dtype=np.int64)
    mask[inside] = True
    assert np.array_equal(packed_bits(bm, n), np.packbits(mask, bitorder="little"))
    kept = BitMap(inside.tolist())
    allowed = Allowed.of_bitmap(kept, n)
    assert np.array_equal(allowed.mask(), mask) and allowed.count == len(inside)


@pytest.mark.parametrize("multi", [False, True])
def test_sorted_values_ranges_match_numpy(monkeypatch, multi):
    """Bucket edges, whole steps of buckets, the unsorted tail, runs of equal values."""
    from index.payload_index import SortedValues

    monkeypatch.setattr(SortedValues, "BUCKET", 8)
    monkeypatch.setattr(SortedValues, "STEP", 4)
    monkeypatch.setattr(SortedValues, "TAIL", 50)
    rng = np.random.default_rng(3)
    index = SortedValues(np.float64)
    pairs_rows, pairs_values = [], []
    for start in range(0, 3000, 300):  # batches of rows, as writes bring them
        rows = np.arange(start, start + 300, dtype=np.uint32)
        if multi:
            rows = np.sort(np.concatenate([rows, rows[::7]]))
        values = np.round(rng.normal(size=len(rows)), 1)  # many repeats: runs of equal values
        index.add(values, rows)
        pairs_rows.append(rows)
        pairs_values.append(values)
    rows, values = np.concatenate(pairs_rows), np.concatenate(pairs_values)
    assert index.multi == multi and len(index) == len(rows)
    for _ in range(200):
        low, high = np.sort(np.round(rng.normal(size=2) * 1.5, 1))
        low_inc, high_inc = bool(rng.integers(2)), bool(rng.integers(2))
        use_low, use_high = bool(rng.integers(4)), bool(rng.integers(4))
        keep = np.ones(len(values), dtype=bool)
        if use_low:
            keep &= values >= low if low_inc else values > low
        if use_high:
            keep &= values <= high if high_inc else values < high
        got = index.range(low if use_low else None, low_inc, high if use_high else None, high_inc)
        assert sorted(got) == sorted(set(rows[keep].tolist()))


def test_scroll_pages_through_points_in_id_order(tmp_path):
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=4, coarse="flat"))
    ids = [5, "b", 1, "a", 30, 2, "c"]
    col.upsert(ids, np.ones((len(ids), 4), dtype=np.float32), [{"even": isinstance(i, int) and i % 2 == 0}
                                                               for i in ids])
    col.delete([30])
    seen, offset = [], None
    while True:
        page, offset = col.scroll(limit=2, offset=offset)
        seen += [key for key, _ in page]
        if offset is None:
            break
    assert seen == [1, 2, 5, "a", "b", "c"]
    page, offset = col.scroll(filter={"must": [{"key": "even", "match": True}]}, limit=10)
    assert page == [(2, {"even": True})] and offset is None
    assert col.scroll(limit=3, offset="b", with_payload=False) == ([("b", None), ("c", None)], None)
    with pytest.raises(InvalidArgument, match="limit must be"):
        col.scroll(limit=0)
    col.close()
