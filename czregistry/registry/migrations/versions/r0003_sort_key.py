"""Sortable version keys: ``versions.sort_key`` (byte order = PEP 440 order) and ``versions.is_pre``, so
"newest per model" and ``latest`` are index look-ups instead of parsing every version in Python.

Backfills existing rows, then re-creates the immutability guards so they cover the new columns too.

Revision ID: r0003
Revises: r0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from packaging.version import Version

from czregistry.registry.migrations._ops import drop_columns
from czregistry.registry.versions import sort_key

revision = "r0003"
down_revision = "r0002"
branch_labels = None
depends_on = None

_IDENTITY = ("id", "model_id", "version", "version_key", "digest", "size", "kind", "report", "smoke",
             "valid", "allow_invalid", "created_at", "created_by", "source_name", "sort_key", "is_pre")


def _sqlite_trigger(columns: tuple[str, ...]) -> str:
    return ("CREATE TRIGGER versions_immutable BEFORE UPDATE ON versions WHEN "
            + " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in columns)
            + " BEGIN SELECT RAISE(ABORT, 'czreg-immutable: a published version cannot be changed'); END")


def _pg_function(columns: tuple[str, ...]) -> str:
    return """CREATE OR REPLACE FUNCTION czreg_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'UPDATE' THEN
        IF """ + " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in columns) + """ THEN
          RAISE EXCEPTION 'czreg-immutable: a published version cannot be changed';
        END IF;
        RETURN NEW;
      ELSIF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM tombstones t
                       WHERE t.model_id = OLD.model_id AND t.version_key = OLD.version_key) THEN
          RAISE EXCEPTION 'czreg-immutable: a published version is removed only by purge';
        END IF;
        RETURN OLD;
      ELSE
        IF EXISTS (SELECT 1 FROM tombstones t
                   WHERE t.model_id = NEW.model_id AND t.version_key = NEW.version_key) THEN
          RAISE EXCEPTION 'czreg-purged: a purged version number is never reused';
        END IF;
        RETURN NEW;
      END IF;
    END $$"""


def _guards(columns: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS versions_immutable")
        op.execute(_sqlite_trigger(columns))
    else:
        op.execute(_pg_function(columns))


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:  # SQLite: plain ADD COLUMN, triggers survive
        batch.add_column(sa.Column("sort_key", sa.String(255)))
        batch.add_column(sa.Column("is_pre", sa.Boolean))
    conn = op.get_bind()
    for vid, text in conn.execute(sa.text("SELECT id, version FROM versions")).all():
        v = Version(text)
        conn.execute(sa.text("UPDATE versions SET sort_key = :k, is_pre = :p WHERE id = :i"),
                     {"k": sort_key(v), "p": v.is_prerelease, "i": vid})
    op.create_index("ix_versions_model_sort", "versions", ["model_id", "sort_key"])
    _guards(_IDENTITY)


def downgrade() -> None:
    _guards(_IDENTITY[:-2])
    op.drop_index("ix_versions_model_sort", "versions")
    drop_columns("versions", "is_pre", "sort_key")
