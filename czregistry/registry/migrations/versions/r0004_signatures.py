"""Signatures stored with versions, and registry-wide settings.

``signatures``: one row per (version, signing key): the model-signing bundle (``.sig``) and the attestation
bundle (``.att``) exactly as signed, so ``pull --key`` can verify offline what was published. Rows are never
updated (a trigger refuses it); they go only with their version, on purge.

``settings``: named registry-wide settings (``require_signatures``), changed through the API, audited as
events.

Revision ID: r0004
Revises: r0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0004"
down_revision = "r0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signatures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("attestation", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.UniqueConstraint("version_id", "key_id", name="uq_signatures_version_key"),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute("CREATE TRIGGER signatures_no_update BEFORE UPDATE ON signatures "
                   "BEGIN SELECT RAISE(ABORT, 'czreg-immutable: a stored signature cannot be changed'); END")
    else:
        op.execute("""CREATE FUNCTION czreg_signatures_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION 'czreg-immutable: a stored signature cannot be changed';
        END $$""")
        op.execute("CREATE TRIGGER signatures_no_update BEFORE UPDATE ON signatures "
                   "FOR EACH ROW EXECUTE FUNCTION czreg_signatures_guard()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS signatures_no_update")
    else:
        op.execute("DROP TRIGGER IF EXISTS signatures_no_update ON signatures")
        op.execute("DROP FUNCTION IF EXISTS czreg_signatures_guard()")
    op.drop_table("settings")
    op.drop_table("signatures")
