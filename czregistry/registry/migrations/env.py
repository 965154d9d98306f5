"""Alembic environment: runs on the connection that ``migrate.upgrade`` hands over (inside its transaction
and lock); batch mode so SQLite can alter tables."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True,
                  transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
