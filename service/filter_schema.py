"""The JSON schema of a payload filter, as `index.filters.Filter.parse` enforces it, for the
OpenAPI document (clients are generated from it, and fuzzers read it).

The body is validated by `index.filters`, whose messages say what to fix; this schema only
documents it. Filters nest up to 16 deep; the schema spells out two levels (a filter whose
clauses hold conditions or filters of conditions), which is what generated clients need.
"""

from __future__ import annotations

from typing import Any

from index.filters import KEY_PATTERN

_MAX_ANY = 1000
_MAX_IDS = 10_000

KEY: dict[str, Any] = {"type": "string", "pattern": KEY_PATTERN, "maxLength": 256,
                        "description": "payload key; dotted to reach nested objects"}
SCALAR: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
#: A point id, as `index.batch.check_id` takes it.
#: (The bound is exclusive: FastAPI renders bounds as floats, and 2**63 is one, 2**63 - 1 is not.)
ID_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 0, "exclusiveMaximum": 2**63},
                                 {"type": "string", "minLength": 1, "maxLength": 512}]}


#: A range bound: a number, or an RFC 3339 datetime.
NUMBER: dict[str, Any] = {"type": "number", "minimum": -1e300, "maximum": 1e300}
DATETIME: dict[str, Any] = {"type": "string", "format": "date-time"}


def bounds(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: value for name in ("gt", "gte", "lt", "lte")},
        "minProperties": 1,
        "additionalProperties": False,
        "description": "at most one lower bound (gt or gte) and one upper (lt or lte)",
    }


def _condition(op: str, value: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"condition: {op}",
        "description": description,
        "properties": {"key": KEY, op: value},
        "required": ["key", op],
        "additionalProperties": False,
    }


_CONDITIONS: list[dict[str, Any]] = [
    _condition("match", SCALAR, "the key holds this value (or an array holding it)"),
    _condition("any", {"type": "array", "items": SCALAR, "minItems": 1, "maxItems": _MAX_ANY},
               "the key holds one of these values"),
    _condition("range", bounds(NUMBER),
               "numbers within the bounds (at most one lower, one upper)"),
    _condition("range", bounds(DATETIME),
               "RFC 3339 datetimes within the bounds; no offset means UTC"),
    _condition("exists", {"type": "boolean"}, "the key is present and not null (false: the opposite)"),
    _condition("is_null", {"type": "boolean"}, "the key is present and null"),
    _condition("is_empty", {"type": "boolean"}, "the key is absent, null or an empty array"),
    {
        "type": "object",
        "title": "condition: has_id",
        "description": "the point's id is one of these",
        "properties": {"has_id": {"type": "array", "items": ID_SCHEMA, "minItems": 1, "maxItems": _MAX_IDS}},
        "required": ["has_id"],
        "additionalProperties": False,
    },
]


def _filter(items: list[dict[str, Any]], description: str) -> dict[str, Any]:
    clause = {"type": "array", "items": {"anyOf": items}}
    return {
        "type": "object",
        "description": description,
        "properties": {"must": clause, "should": clause, "must_not": clause},
        "additionalProperties": False,
    }


#: must: every item holds; should: at least one holds (when given); must_not: none holds.
FILTER_SCHEMA: dict[str, Any] = _filter(
    [*_CONDITIONS, _filter(_CONDITIONS, "a nested filter")],
    'payload filter: {"must": [...], "should": [...], "must_not": [...]}, each a list of conditions or '
    'nested filters. Conditions: {"key": "lang", "match": "en"} (also a value inside an array), '
    '{"key": "year", "any": [2023, 2024]}, {"key": "year", "range": {"gte": 2020, "lt": 2024}} (numbers, or '
    'RFC 3339 datetimes as strings), {"key": "rank", "exists": true} (present, not null), '
    '{"key": "note", "is_null": true}, {"has_id": [1, "a"]}. Dotted keys reach nested objects. Keys with a '
    "payload index (PUT /collections/{name}/index) are answered from RAM; others from the stored payloads, "
    "slower",
)
