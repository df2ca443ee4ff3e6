"""Payload filters: equality and membership on payload keys, evaluated by SQLite's JSON functions.

Shape (the same as the HTTP API)::

    {"must":     [{"key": "lang", "match": "en"}, {"key": "year", "any": [2023, 2024]}],
     "must_not": [{"key": "draft", "match": true}],
     "should":   [...]}       # at least one of these

A key may be dotted to reach into nested objects (``"meta.source"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from index.errors import InvalidFilter

Scalar = str | int | float | bool

_CLAUSES = ("must", "must_not", "should")
_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_MAX_ANY = 1000


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[Scalar, ...]  # match: one value; any: several

    def to_sql(self, column: str) -> tuple[str, list[Any]]:
        path = "$" + "".join(f'."{part}"' for part in self.key.split("."))
        terms: list[str] = []
        params: list[Any] = []
        for value in self.values:
            if isinstance(value, bool):
                # json_extract turns true into 1: compare the JSON type so that true != 1.
                terms.append(f"json_type({column}, ?) = ?")
                params += [path, "true" if value else "false"]
            else:
                terms.append(
                    f"(json_extract({column}, ?) = ? AND json_type({column}, ?) NOT IN ('true', 'false'))"
                )
                params += [path, value, path]
        return "(" + " OR ".join(terms) + ")", params


@dataclass(frozen=True)
class Filter:
    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()

    @classmethod
    def parse(cls, spec: Any) -> Filter:
        """Validate a filter given as plain JSON-like data; raises ``InvalidFilter`` saying what to fix."""
        if isinstance(spec, Filter):
            return spec
        if not isinstance(spec, dict):
            raise InvalidFilter(f"a filter must be an object like {{'must': [...]}}, got {type(spec).__name__}")
        unknown = set(spec) - set(_CLAUSES)
        if unknown:
            raise InvalidFilter(
                f"unknown filter clause {sorted(unknown)[0]!r}: use one of {', '.join(_CLAUSES)}"
            )
        parsed: dict[str, tuple[Condition, ...]] = {}
        for clause in _CLAUSES:
            conditions = spec.get(clause, [])
            if not isinstance(conditions, list):
                raise InvalidFilter(f"filter clause {clause!r} must be a list of conditions")
            parsed[clause] = tuple(_condition(c, f"{clause}[{i}]") for i, c in enumerate(conditions))
        return cls(**parsed)

    def to_sql(self, column: str) -> tuple[str, list[Any]]:
        parts: list[str] = []
        params: list[Any] = []
        for condition in self.must:
            sql, p = condition.to_sql(column)
            parts.append(sql)
            params += p
        for condition in self.must_not:
            sql, p = condition.to_sql(column)
            parts.append(f"NOT COALESCE({sql}, 0)")
            params += p
        if self.should:
            sqls = []
            for condition in self.should:
                sql, p = condition.to_sql(column)
                sqls.append(sql)
                params += p
            parts.append("(" + " OR ".join(sqls) + ")")
        return (" AND ".join(f"COALESCE({p}, 0)" for p in parts) or "1"), params


def _condition(spec: Any, where: str) -> Condition:
    if not isinstance(spec, dict):
        raise InvalidFilter(f"filter condition {where} must be an object like {{'key': ..., 'match': ...}}")
    key = spec.get("key")
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidFilter(
            f"filter condition {where} needs a 'key': letters, digits, '_', '-', dotted for nesting"
        )
    operators = set(spec) - {"key"}
    if operators == {"match"}:
        return Condition(key, (_scalar(spec["match"], where),))
    if operators == {"any"}:
        values = spec["any"]
        if not isinstance(values, list) or not values or len(values) > _MAX_ANY:
            raise InvalidFilter(f"filter condition {where}: 'any' takes a list of 1 to {_MAX_ANY} values")
        return Condition(key, tuple(_scalar(v, where) for v in values))
    unknown = sorted(operators - {"match", "any"})
    if unknown:
        raise InvalidFilter(f"filter condition {where}: unknown operator {unknown[0]!r}; use 'match' or 'any'")
    raise InvalidFilter(f"filter condition {where} needs exactly one operator: 'match' or 'any'")


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, str | bool | int | float) and value == value:  # rejects NaN too
        return value
    raise InvalidFilter(
        f"filter condition {where}: values must be strings, numbers or booleans, got {type(value).__name__}"
    )
