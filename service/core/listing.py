"""A newest-first page of a table, filtered and resumed by keyset: the audit log's list and
the admin's payout list (and the next such list) are this one query builder.

The WHERE clause names only the filters given: with `(x IS NULL OR ...)` a cached generic
plan could not pick the park or actor index, and these tables grow for years.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, LiteralString

from psycopg import sql

# Filter fields that bound the time column instead of matching a column of their name.
TIME_BOUNDS = {"since": ">=", "until": "<"}


def newest_first(
    *,
    table: LiteralString,
    columns: sql.Composable,
    at: LiteralString,
    filters: Any,
    after: tuple[datetime, Any] | None,
    limit: int,
) -> tuple[sql.Composed, dict[str, Any]]:
    """The query and its parameters: rows of `table` newest first by (`at`, id).

    `filters` is a dataclass whose fields are optional: each one given is `column = value`
    for the column of its name, but `since` (at >= value) and `until` (at < value). `after`
    is the (at, id) of the previous page's last row.
    """
    conditions: list[sql.Composable] = []
    params: dict[str, Any] = {"limit": limit}
    for field in dataclasses.fields(filters):
        value = getattr(filters, field.name)
        if value is None:
            continue
        column = at if field.name in TIME_BOUNDS else field.name
        op = TIME_BOUNDS.get(field.name, "=")
        conditions.append(
            sql.SQL("{} {} {}").format(
                sql.Identifier(column), sql.SQL(op), sql.Placeholder(field.name)
            )
        )
        params[field.name] = value
    if after is not None:
        conditions.append(
            sql.SQL("({}, id) < (%(after_at)s, %(after_id)s)").format(sql.Identifier(at))
        )
        params.update(after_at=after[0], after_id=after[1])
    where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} DESC, id DESC LIMIT %(limit)s").format(
        columns, sql.Identifier(table), where, sql.Identifier(at)
    )
    return query, params
