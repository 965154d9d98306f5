"""API tokens for the registry server (``czreg serve``, ``czreg token``).

Only a SHA-256 hash of each token is stored; the token itself is shown once, when it is created. A revoked
token keeps its row (and its name stays taken) so the audit trail's ``token:NAME`` always means one token.

Revision ID: r0005
Revises: r0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0005"
down_revision = "r0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("model_pattern", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_by", sa.String(200)),
        sa.UniqueConstraint("name", name="uq_tokens_name"),
        sa.UniqueConstraint("secret_hash", name="uq_tokens_secret_hash"),
    )


def downgrade() -> None:
    op.drop_table("tokens")
