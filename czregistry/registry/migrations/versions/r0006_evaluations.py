"""Evaluations: measured quality keyed by (package digest, dataset digest, metric definition), append-only.

Revision ID: r0006
Revises: r0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0006"
down_revision = "r0005"
branch_labels = None
depends_on = None

_SQLITE = [
    f"CREATE TRIGGER evaluations_no_{op_} BEFORE {op_.upper()} ON evaluations "
    "BEGIN SELECT RAISE(ABORT, 'czreg-append-only: evaluations is append-only'); END"
    for op_ in ("update", "delete")
]
# czreg_append_only() exists since r0002
_PG = ["CREATE TRIGGER evaluations_append_only BEFORE UPDATE OR DELETE ON evaluations "
       "FOR EACH ROW EXECUTE FUNCTION czreg_append_only()"]


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("package_digest", sa.String(64), nullable=False),
        sa.Column("dataset_digest", sa.String(80), nullable=False),
        sa.Column("definition", sa.String(100), nullable=False),
        sa.Column("task", sa.String(20), nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("czreg_version", sa.String(50), nullable=False),
        sa.UniqueConstraint("package_digest", "dataset_digest", "definition", name="uq_evaluations_key"),
    )
    op.create_index("ix_evaluations_package", "evaluations", ["package_digest"])
    for sql in _SQLITE if op.get_bind().dialect.name == "sqlite" else _PG:
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("evaluations_no_update", "evaluations_no_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS evaluations_append_only ON evaluations")
    op.drop_index("ix_evaluations_package", "evaluations")
    op.drop_table("evaluations")
