"""Payload filters: a tree of conditions on payload keys, evaluated to a roaring bitmap of rows.

Shape (the same as the HTTP API)::

    {"must":     [{"key": "lang", "match": "en"},
                  {"key": "year", "range": {"gte": 2020, "lt": 2024}},
                  {"should": [{"key": "tags", "any": ["a", "b"]}, {"key": "rank", "exists": true}]}],
     "must_not": [{"key": "note", "is_null": true}],
     "should":   [...]}                      # at least one of these, when given

A clause lists conditions or nested filters, at any depth. Conditions:

- ``match`` (one value) and ``any`` (a list): the key holds the value, or an array holding it.
  Strings, numbers and booleans are distinct types: ``true`` never matches ``1``; numbers compare
  by value (``2 == 2.0``).
- ``range`` with ``gt``, ``gte``, ``lt``, ``lte``: numbers, or RFC 3339 datetimes when the bounds
  are strings (a datetime without an offset is UTC).
- ``exists``: the key is present and not null; ``is_null``: the key is present and null;
  ``is_empty``: the key is absent, null or an empty array. Each takes ``false`` for its negation.
- ``{"has_id": [ids]}`` (no key): the point's id is one of these.

A key may be dotted to reach into nested objects (``"meta.source"``). Evaluation
(``Filter.rows``) asks a ``resolve(key, need)`` function for the key's ``FieldIndex``: a payload
index declared on the key, or one built for this query from the catalog.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pyroaring import BitMap

from index.errors import InvalidFilter

Scalar = str | int | float | bool

_CLAUSES = ("must", "must_not", "should")
KEY_PATTERN = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"
KEY = re.compile(KEY_PATTERN)
_MAX_ANY = 1000
_MAX_DEPTH = 16
_BOUNDS = ("gt", "gte", "lt", "lte")
_OPERATORS = ("match", "any", "range", "exists", "is_null", "is_empty")
_MAX_IDS = 10_000


def parse_datetime(value: str) -> int | None:
    """Microseconds since the epoch of an RFC 3339 (ISO 8601) datetime; None if it does not parse.
    A datetime without an offset is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


#: What a condition needs of a key's index: its strings, booleans, numbers or datetimes.
Need = Literal["string", "bool", "number", "datetime", "presence"]


def _type_of(value: Scalar) -> Need:
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "number"


@dataclass(frozen=True)
class Match:
    """``match`` / ``any``: the key holds one of ``values`` (itself or inside an array)."""

    key: str
    values: tuple[Scalar, ...]

    def needs(self) -> set[Need]:
        return {_type_of(v) for v in self.values}


@dataclass(frozen=True)
class Range:
    """``range``: bounds are numbers, or microseconds since the epoch for datetimes."""

    key: str
    kind: Literal["number", "datetime"]
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True

    def needs(self) -> set[Need]:
        return {self.kind}


@dataclass(frozen=True)
class Presence:
    """``exists`` (present and not null), ``is_null`` (present and null) or ``is_empty`` (absent,
    null or []): ``which``; ``negate`` for false."""

    key: str
    which: Literal["exists", "is_null", "is_empty"]
    negate: bool

    def needs(self) -> set[Need]:
        return {"presence"}


@dataclass(frozen=True)
class HasId:
    """``has_id``: the point's id is one of ``ids``."""

    ids: tuple[str | int, ...]


Condition = Match | Range | Presence | HasId


class FieldIndex(Protocol):
    """What evaluating a condition needs of one key: posting lists of its rows
    (``index.payload_index.FieldIndex``)."""

    def match(self, value: Scalar) -> BitMap: ...
    def range(self, condition: Range) -> BitMap: ...
    def present(self) -> BitMap: ...
    def null(self) -> BitMap: ...
    def empty(self) -> BitMap: ...


#: ``resolve(key, needs)`` -> the key's index, able to answer conditions needing ``needs``.
Resolve = Callable[[str, set[Need]], FieldIndex]
#: ``rows_of_ids(ids)`` -> the rows of the live points with these ids.
RowsOfIds = Callable[[tuple[str | int, ...]], BitMap]


@dataclass(frozen=True)
class Filter:
    must: tuple[Condition | Filter, ...] = ()
    must_not: tuple[Condition | Filter, ...] = ()
    should: tuple[Condition | Filter, ...] = ()
    _needs: dict[str, set[Need]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, spec: Any) -> Filter:
        """Validate a filter given as plain JSON-like data; raises ``InvalidFilter`` saying what to fix."""
        if isinstance(spec, Filter):
            return spec
        flt = _filter(spec, "filter", 0)
        _collect(flt, flt._needs)
        return flt

    def needs(self) -> dict[str, set[Need]]:
        """Per key, what its conditions ask of it."""
        return self._needs

    def rows(self, universe: BitMap, resolve: Resolve, rows_of_ids: RowsOfIds) -> BitMap:
        """The rows of ``universe`` (the live points) that pass the filter."""
        out = universe.copy()
        for item in self.must:
            out &= _rows(item, universe, resolve, rows_of_ids)
            if not out:
                return out
        if self.should:
            out &= BitMap.union(*(_rows(item, universe, resolve, rows_of_ids) for item in self.should))
        if self.must_not and out:
            out -= BitMap.union(*(_rows(item, universe, resolve, rows_of_ids) for item in self.must_not))
        return out


def _rows(item: Condition | Filter, universe: BitMap, resolve: Resolve, rows_of_ids: RowsOfIds) -> BitMap:
    if isinstance(item, Filter):
        return item.rows(universe, resolve, rows_of_ids)
    if isinstance(item, HasId):
        return rows_of_ids(item.ids) & universe
    index = resolve(item.key, item.needs())
    if isinstance(item, Match):
        if len(item.values) == 1:
            return index.match(item.values[0])
        return BitMap.union(*(index.match(v) for v in item.values))
    if isinstance(item, Range):
        return index.range(item)
    if item.which == "is_empty":  # absent, null or []: not a present, non-empty value
        empty = universe - (index.present() - index.empty())
        return universe - empty if item.negate else empty
    found = index.null() if item.which == "is_null" else index.present()
    return universe - found if item.negate else found


def _collect(flt: Filter, needs: dict[str, set[Need]]) -> None:
    for item in (*flt.must, *flt.must_not, *flt.should):
        if isinstance(item, Filter):
            _collect(item, needs)
        elif not isinstance(item, HasId):
            needs.setdefault(item.key, set()).update(item.needs())


def _filter(spec: Any, where: str, depth: int) -> Filter:
    if not isinstance(spec, dict):
        raise InvalidFilter(f"{where} must be an object like {{'must': [...]}}, got {type(spec).__name__}")
    if depth > _MAX_DEPTH:
        raise InvalidFilter(f"{where}: filters nest at most {_MAX_DEPTH} deep")
    unknown = set(spec) - set(_CLAUSES)
    if unknown:
        first = sorted(unknown)[0]
        raise InvalidFilter(f"unknown filter clause {first!r} in {where}: use one of {', '.join(_CLAUSES)}")
    parsed: dict[str, tuple[Condition | Filter, ...]] = {}
    for clause in _CLAUSES:
        items = spec.get(clause, [])
        if not isinstance(items, list):
            raise InvalidFilter(f"{where}.{clause} must be a list of conditions")
        parsed[clause] = tuple(_item(c, f"{where}.{clause}[{i}]", depth) for i, c in enumerate(items))
    return Filter(must=parsed["must"], must_not=parsed["must_not"], should=parsed["should"])


def _item(spec: Any, where: str, depth: int) -> Condition | Filter:
    if isinstance(spec, dict) and "key" not in spec and set(spec) <= set(_CLAUSES):  # {} too: matches all
        return _filter(spec, where, depth + 1)
    return _condition(spec, where)


def _condition(spec: Any, where: str) -> Condition:
    if not isinstance(spec, dict):
        raise InvalidFilter(f"{where} must be an object like {{'key': ..., 'match': ...}} or a nested filter")
    if set(spec) == {"has_id"}:
        ids = spec["has_id"]
        if not isinstance(ids, list) or not 1 <= len(ids) <= _MAX_IDS or not all(
            isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids
        ):
            raise InvalidFilter(f"{where}: 'has_id' takes a list of 1 to {_MAX_IDS} ids (strings, integers >= 0)")
        return HasId(tuple(ids))
    key = spec.get("key")
    if not isinstance(key, str) or not KEY.match(key):
        raise InvalidFilter(f"{where} needs a 'key': letters, digits, '_', '-', dotted for nesting")
    operators = sorted(set(spec) - {"key"})
    unknown = [o for o in operators if o not in _OPERATORS]
    if unknown:
        raise InvalidFilter(f"{where}: unknown operator {unknown[0]!r}; use one of {', '.join(_OPERATORS)}")
    if len(operators) != 1:
        raise InvalidFilter(f"{where} needs exactly one operator of {', '.join(_OPERATORS)}, got {len(operators)}")
    op = operators[0]
    value = spec[op]
    if op == "match":
        return Match(key, (_scalar(value, where),))
    if op == "any":
        if not isinstance(value, list) or not value or len(value) > _MAX_ANY:
            raise InvalidFilter(f"{where}: 'any' takes a list of 1 to {_MAX_ANY} values")
        return Match(key, tuple(_scalar(v, where) for v in value))
    if op == "range":
        return _range(key, value, where)
    if not isinstance(value, bool):
        raise InvalidFilter(f"{where}: {op!r} takes true or false, got {value!r}")
    return Presence(key, which=op, negate=not value)


def _range(key: str, spec: Any, where: str) -> Range:
    if not isinstance(spec, dict) or not spec or set(spec) - set(_BOUNDS):
        raise InvalidFilter(f"{where}: 'range' takes an object of bounds {', '.join(_BOUNDS)}, e.g. {{'gte': 2020}}")
    if "gt" in spec and "gte" in spec or "lt" in spec and "lte" in spec:
        raise InvalidFilter(f"{where}: give at most one lower bound (gt or gte) and one upper (lt or lte)")
    kinds = {"datetime" if isinstance(v, str) else "number" for v in spec.values()}
    if len(kinds) > 1:
        raise InvalidFilter(f"{where}: range bounds must be all numbers or all RFC 3339 datetime strings")
    kind: Literal["number", "datetime"] = kinds.pop()  # type: ignore[assignment]  # one of the two
    bounds: dict[str, float] = {}
    for name, value in spec.items():
        if kind == "datetime":
            micros = parse_datetime(value)
            if micros is None:
                raise InvalidFilter(
                    f"{where}: range bound {name}={value!r} is not an RFC 3339 datetime; "
                    "write it like '2024-05-01T12:00:00Z'"
                )
            bounds[name] = micros
        elif isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            try:
                bounds[name] = float(value)
            except OverflowError:
                raise InvalidFilter(f"{where}: range bound {name} is too large for a float") from None
        else:
            raise InvalidFilter(f"{where}: range bound {name}={value!r} must be a number or an RFC 3339 datetime")
    low_name = "gt" if "gt" in bounds else "gte"
    high_name = "lt" if "lt" in bounds else "lte"
    return Range(
        key, kind,
        low=bounds.get(low_name), low_inclusive=low_name == "gte",
        high=bounds.get(high_name), high_inclusive=high_name == "lte",
    )


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, str | bool | int | float) and value == value:  # rejects NaN too
        return value
    raise InvalidFilter(f"{where}: values must be strings, numbers or booleans, got {type(value).__name__}")
