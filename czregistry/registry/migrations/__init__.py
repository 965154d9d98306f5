"""Alembic migrations, shipped inside the package and applied by ``czregistry.registry.migrate`` whenever
a registry is opened. ``HEAD`` lets an up-to-date registry skip loading Alembic at all (a test keeps it
equal to the newest script's revision)."""

HEAD = "r0006"
