"""Qdrant filters as tandem filters (``index/filters.py``): ``must`` / ``should`` / ``must_not`` at any
depth; ``match`` value, any and except; ``range`` (numbers and datetimes); ``is_empty``;
``is_null``; ``has_id``. Anything else is refused with a message that names it."""

from __future__ import annotations

from typing import Any

from service.errors import BadRequest


def to_filter(spec: Any, where: str = "filter") -> dict[str, Any] | None:
    """A Qdrant filter as a tandem filter (``index/filters.py``)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadRequest(f"{where} must be an object with must, should and must_not")
    unsupported = sorted(set(spec) - {"must", "should", "must_not"})
    if unsupported:
        raise BadRequest(f"{where}: {unsupported[0]!r} is not supported by tandem's Qdrant API")
    out: dict[str, Any] = {}
    for clause in ("must", "should", "must_not"):
        items = spec.get(clause)
        if items is None:
            continue
        items = items if isinstance(items, list) else [items]
        out[clause] = [_condition(c, f"{where}.{clause}[{i}]") for i, c in enumerate(items)]
    return out


def _condition(spec: Any, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise BadRequest(f"{where} must be a condition object")
    if set(spec) & {"must", "should", "must_not"}:
        return to_filter(spec, where) or {}
    if "has_id" in spec:
        return {"has_id": spec["has_id"]}
    if "is_empty" in spec:
        return {"key": _key(spec["is_empty"], where), "is_empty": True}
    if "is_null" in spec:
        return {"key": _key(spec["is_null"], where), "is_null": True}
    key = spec.get("key")
    if not isinstance(key, str):
        raise BadRequest(f"{where}: conditions other than field conditions, is_empty, is_null and has_id "
                         "are not supported by tandem's Qdrant API")
    given = {k: v for k, v in spec.items() if k != "key" and v is not None}
    if set(given) == {"match"}:
        match = given["match"]
        if isinstance(match, dict) and "value" in match:
            return {"key": key, "match": match["value"]}
        if isinstance(match, dict) and "any" in match:
            return {"key": key, "any": match["any"]}
        if isinstance(match, dict) and "except" in match:
            return {"must": [{"key": key, "exists": True}], "must_not": [{"key": key, "any": match["except"]}]}
        raise BadRequest(f"{where}: match supports value, any and except (not text or phrase)")
    if set(given) == {"range"} and isinstance(given["range"], dict):
        return {"key": key, "range": {k: v for k, v in given["range"].items() if v is not None}}
    raise BadRequest(f"{where}: of field conditions, tandem supports match and range (not {sorted(given)})")


def _key(spec: Any, where: str) -> str:
    if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
        raise BadRequest(f"{where} must name a key: {{'key': ...}}")
    return str(spec["key"])
