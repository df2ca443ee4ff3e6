"""JSON schemas of the request bodies that tandem's Qdrant layer (``qdrant.py``) reads, for the
OpenAPI document. The handlers take the body as JSON and check it themselves, answering in
Qdrant's error shape; these schemas document the subset they accept. Fields that Qdrant's
clients send and tandem ignores (``consistency``, ``params``, ``shard_key`` ...) are allowed.
"""

from __future__ import annotations

from typing import Any

from service.filter_schema import DATETIME, ID_SCHEMA, KEY, NUMBER, SCALAR, bounds


def _object(properties: dict[str, Any], required: tuple[str, ...] = (), *, extra: bool = True,
            **more: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": extra, **more}
    if required:
        schema["required"] = list(required)
    return schema


_VECTOR: dict[str, Any] = {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 65536,
                           "description": "as many numbers as the collection's size"}
_KEY_OF = _object({"key": KEY}, ("key",), extra=False)
_CONDITIONS: list[dict[str, Any]] = [
    _object({"key": KEY, "match": {"anyOf": [
        _object({"value": SCALAR}, ("value",), extra=False),
        _object({"any": {"type": "array", "items": SCALAR, "minItems": 1, "maxItems": 1000}}, ("any",), extra=False),
        _object({"except": {"type": "array", "items": SCALAR, "minItems": 1, "maxItems": 1000}}, ("except",),
                extra=False),
    ]}}, ("key", "match"), extra=False),
    _object({"key": KEY, "range": bounds(NUMBER)}, ("key", "range"), extra=False),
    _object({"key": KEY, "range": bounds(DATETIME)}, ("key", "range"), extra=False),
    _object({"is_empty": _KEY_OF}, ("is_empty",), extra=False),
    _object({"is_null": _KEY_OF}, ("is_null",), extra=False),
    _object({"has_id": {"type": "array", "items": ID_SCHEMA, "minItems": 1, "maxItems": 10_000}}, ("has_id",),
            extra=False),
]


def _filter(items: list[dict[str, Any]]) -> dict[str, Any]:
    clause = {"type": "array", "items": {"anyOf": items}}
    return _object({"must": clause, "should": clause, "must_not": clause}, extra=False)


FILTER: dict[str, Any] = {
    **_filter([*_CONDITIONS, _filter(_CONDITIONS)]),
    "description": "Qdrant's filter: must / should / must_not of field conditions (match value, any, except; "
    "range of numbers or datetimes), is_empty, is_null, has_id, and nested filters",
}
_PAYLOAD_SELECTOR: dict[str, Any] = {"anyOf": [
    {"type": "boolean"}, {"type": "array", "items": {"type": "string"}},
    _object({"include": {"type": "array", "items": {"type": "string"}}}, ("include",), extra=False),
    _object({"exclude": {"type": "array", "items": {"type": "string"}}}, ("exclude",), extra=False),
]}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 10_000}
_SEARCH = {"filter": FILTER, "limit": _LIMIT, "offset": {"type": "integer", "minimum": 0, "maximum": 10_000},
           "with_payload": _PAYLOAD_SELECTOR, "with_vector": {"type": "boolean"},
           "score_threshold": {"type": "number"}}

CREATE_COLLECTION = _object({"vectors": _object({
    "size": {"type": "integer", "minimum": 1, "maximum": 65536},
    "distance": {"enum": ["Cosine", "Dot"]},
}, ("size",))}, ("vectors",))
CREATE_INDEX = _object({
    "field_name": KEY,
    "field_schema": {"anyOf": [{"enum": ["keyword", "integer", "float", "bool", "datetime"]},
                               _object({"type": {"enum": ["keyword", "integer", "float", "bool", "datetime"]}},
                                       ("type",))]},
}, ("field_name", "field_schema"))
_POINT = _object({"id": ID_SCHEMA, "vector": _VECTOR, "payload": {"anyOf": [{"type": "object"}, {"type": "null"}]}},
                 ("id", "vector"))
UPSERT = {"anyOf": [
    _object({"points": {"type": "array", "items": _POINT, "minItems": 1}}, ("points",)),
    _object({"batch": _object({
        "ids": {"type": "array", "items": ID_SCHEMA, "minItems": 1},
        "vectors": {"type": "array", "items": _VECTOR, "minItems": 1},
        "payloads": {"type": "array", "items": {"anyOf": [{"type": "object"}, {"type": "null"}]}},
    }, ("ids", "vectors"))}, ("batch",)),
], "description": "points, or a batch of ids, vectors and payloads of equal lengths; each id once"}
RETRIEVE = _object({"ids": {"type": "array", "items": ID_SCHEMA}, "with_payload": _PAYLOAD_SELECTOR,
                    "with_vector": {"type": "boolean"}}, ("ids",))
DELETE = {"anyOf": [_object({"points": {"type": "array", "items": ID_SCHEMA}}, ("points",)),
                    _object({"filter": FILTER}, ("filter",))]}
SCROLL = _object({"filter": FILTER, "limit": _LIMIT, "offset": {"anyOf": [ID_SCHEMA, {"type": "null"}]},
                  "with_payload": _PAYLOAD_SELECTOR, "with_vector": {"type": "boolean"}})
COUNT = _object({"filter": FILTER, "exact": {"type": "boolean"}})
SEARCH = _object({"vector": _VECTOR, **_SEARCH}, ("vector",))
QUERY = _object({"query": {"anyOf": [_VECTOR, _object({"nearest": _VECTOR}, ("nearest",), extra=False)]},
                 **_SEARCH}, ("query",))


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a JSON body this schema documents."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
