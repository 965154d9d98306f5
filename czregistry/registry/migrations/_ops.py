"""Helpers shared by the migration scripts (imported only while Alembic runs)."""

from __future__ import annotations

import sqlite3

from alembic import op

__all__ = ["drop_columns"]


def drop_columns(table: str, *columns: str) -> None:
    """Drop ``columns`` from ``table`` in place, keeping the rows, the triggers and the rows pointing at them.

    Alembic's batch mode recreates a SQLite table to drop a column (copy, ``DROP TABLE``, rename). With
    foreign keys on, that ``DROP TABLE`` fails as soon as another table references a row (a tag or an alias
    of a version), and it silently takes the table's triggers with it (the immutability guards). SQLite 3.35
    and later drop a column natively, which does neither; the column must no longer appear in an index or
    trigger, so callers drop or replace those first. PostgreSQL always alters in place.
    """
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(f"downgrading a registry needs SQLite 3.35 or later (this is {sqlite3.sqlite_version})")
    with op.batch_alter_table(table, recreate="never") as batch:
        for column in columns:
            batch.drop_column(column)
