"""Immutability in the database, tombstones, smoke-test reports.

Adds ``versions.smoke`` and ``tombstones``, then triggers: a version's identity (digest, version, key,
model, size, reports) can never be updated; a version can be deleted only after its tombstone is written
(the purge path); a purged key can never be inserted again; ``events`` and ``tombstones`` are append-only.

Revision ID: r0002
Revises: r0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from czregistry.registry.migrations._ops import drop_columns

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None

_IDENTITY = ("id", "model_id", "version", "version_key", "digest", "size", "kind", "report", "smoke",
             "valid", "allow_invalid", "created_at", "created_by", "source_name")

_SQLITE = [
    "CREATE TRIGGER versions_immutable BEFORE UPDATE ON versions WHEN "
    + " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in _IDENTITY)
    + " BEGIN SELECT RAISE(ABORT, 'czreg-immutable: a published version cannot be changed'); END",
    "CREATE TRIGGER versions_purge_only BEFORE DELETE ON versions WHEN NOT EXISTS "
    "(SELECT 1 FROM tombstones t WHERE t.model_id = OLD.model_id AND t.version_key = OLD.version_key) "
    "BEGIN SELECT RAISE(ABORT, 'czreg-immutable: a published version is removed only by purge'); END",
    "CREATE TRIGGER versions_no_reuse BEFORE INSERT ON versions WHEN EXISTS "
    "(SELECT 1 FROM tombstones t WHERE t.model_id = NEW.model_id AND t.version_key = NEW.version_key) "
    "BEGIN SELECT RAISE(ABORT, 'czreg-purged: a purged version number is never reused'); END",
    *(f"CREATE TRIGGER {t}_no_{op_} BEFORE {op_.upper()} ON {t} "
      f"BEGIN SELECT RAISE(ABORT, 'czreg-append-only: {t} is append-only'); END"
      for t in ("events", "tombstones") for op_ in ("update", "delete")),
]

_PG = [
    """CREATE FUNCTION czreg_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'UPDATE' THEN
        IF """ + " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in _IDENTITY) + """ THEN
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
    END $$""",
    "CREATE TRIGGER versions_guard BEFORE INSERT OR UPDATE OR DELETE ON versions "
    "FOR EACH ROW EXECUTE FUNCTION czreg_versions_guard()",
    """CREATE FUNCTION czreg_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'czreg-append-only: % is append-only', TG_TABLE_NAME;
    END $$""",
    "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
    "FOR EACH ROW EXECUTE FUNCTION czreg_append_only()",
    "CREATE TRIGGER tombstones_append_only BEFORE UPDATE OR DELETE ON tombstones "
    "FOR EACH ROW EXECUTE FUNCTION czreg_append_only()",
]


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("smoke", sa.Text))
    op.create_table(
        "tombstones",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("version_key", sa.String(100), primary_key=True),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("purged_by", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        statements = _SQLITE
    elif dialect == "postgresql":
        statements = _PG
    else:
        raise RuntimeError(f"czregistry supports SQLite and PostgreSQL, not {dialect}")
    for sql in statements:
        op.execute(sql)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for name in ("versions_immutable", "versions_purge_only", "versions_no_reuse", "events_no_update",
                     "events_no_delete", "tombstones_no_update", "tombstones_no_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS versions_guard ON versions")
        op.execute("DROP TRIGGER IF EXISTS events_append_only ON events")
        op.execute("DROP TRIGGER IF EXISTS tombstones_append_only ON tombstones")
        op.execute("DROP FUNCTION IF EXISTS czreg_versions_guard()")
        op.execute("DROP FUNCTION IF EXISTS czreg_append_only()")
    op.drop_table("tombstones")
    drop_columns("versions", "smoke")
