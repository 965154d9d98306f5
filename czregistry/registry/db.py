"""Engines and migrations: one place that knows how SQLite and PostgreSQL differ.

SQLite: WAL (readers never wait for the writer), a 30 s busy timeout, and ``BEGIN IMMEDIATE`` for every
write transaction so two writers never deadlock upgrading read locks; reads use a plain ``BEGIN``.
PostgreSQL: ordinary READ COMMITTED transactions; writers serialise on the model row (``FOR UPDATE``)
and on unique constraints, with bounded retries in ``api``.

Migrations run when a registry is opened. Several processes opening a fresh registry at once take turns:
a file lock beside the SQLite database, a transaction-scoped advisory lock on PostgreSQL; the revision is
re-read under the lock so only the first one migrates.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from ..errors import RegistryBusyError, RegistryError
from .migrations import HEAD

__all__ = ["MIGRATIONS_DIR", "advisory_lock", "create_registry_engine", "current_revision", "downgrade",
           "lock_timeout", "set_lock_wait_notice", "upgrade"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATE_LOCK_KEY = 0x637A726567  # "czreg": the advisory lock key for migrations on PostgreSQL
#: How long SQLite itself waits inside one statement; the bounded wait with a message is ours (``_on_begin``).
BUSY_TIMEOUT_MS = 250
#: Default bound on waiting for another process's write lock (``CZREG_LOCK_TIMEOUT`` overrides it).
DEFAULT_LOCK_TIMEOUT_S = 30.0
#: After this long waiting, say so (once): a silent wait looks like a hang.
LOCK_NOTICE_AFTER_S = 1.0

_notice: Callable[[str], None] | None = None


def set_lock_wait_notice(fn: Callable[[str], None] | None) -> None:
    """Call ``fn(message)`` once per wait when a write waits more than a second for another process's
    lock (the CLI prints it on stderr); ``None`` waits silently (library use)."""
    global _notice
    _notice = fn


def _create_private(db: Path) -> None:
    """Create the database's folder (0700) and an empty database file (0600) for this user only, unless
    ``CZREG_SHARED_REGISTRY`` says the folder is a team's (then the umask decides). SQLite gives its -wal and
    -shm files the database file's permissions."""
    from .location import private_files

    private = private_files()
    if not db.parent.is_dir():
        db.parent.parent.mkdir(parents=True, exist_ok=True)
        db.parent.mkdir(mode=0o700 if private else 0o777, exist_ok=True)
    if private and not db.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def lock_timeout() -> float:
    """Seconds a write waits for another process's lock: ``CZREG_LOCK_TIMEOUT`` or 30."""
    text = os.environ.get("CZREG_LOCK_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return max(0.0, float(text))
    except ValueError:
        raise RegistryError(f"CZREG_LOCK_TIMEOUT={text!r} is not a number of seconds",
                            hint="e.g. CZREG_LOCK_TIMEOUT=120") from None


def _busy(where: str, waited: float) -> RegistryBusyError:
    return RegistryBusyError(f"the registry {where} is locked by another process; gave up after {waited:.0f} s",
                             hint="try again when the other czreg command has finished, or raise "
                                  "CZREG_LOCK_TIMEOUT (seconds)")


def _begin_immediate(conn: Connection, where: str) -> None:
    """``BEGIN IMMEDIATE``, retried in short steps up to ``lock_timeout()``; a notice after a second."""
    bound = lock_timeout()
    start = time.monotonic()
    announced = False
    while True:
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as exc:
            text = str(exc.orig).lower()
            if "locked" not in text and "busy" not in text:
                raise
        waited = time.monotonic() - start
        if waited >= bound:
            raise _busy(where, waited)
        if not announced and waited >= LOCK_NOTICE_AFTER_S and _notice is not None:
            _notice(f"waiting for the registry lock held by another process (up to {bound:.0f} s; "
                    "CZREG_LOCK_TIMEOUT)...")
            announced = True
        time.sleep(0.05)


def create_registry_engine(url: str) -> Engine:
    """An engine configured for safe concurrent use; ``.execution_options(czreg_write=True)`` on it gives
    the writer engine (``BEGIN IMMEDIATE`` on SQLite)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database in (None, "", ":memory:"):
            raise RegistryError("an in-memory SQLite registry cannot hold blobs",
                                hint="give a file: sqlite:////path/registry.db")
        _create_private(Path(u.database))
        # Pooled: closing the last connection to a WAL database checkpoints it (milliseconds per write).
        # Pools must not cross fork(); our parallel tests and docs use spawn.
        engine = create_engine(u, pool_size=2, max_overflow=8,
                               connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite would defer it)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.get_execution_options().get("czreg_write", False):
                _begin_immediate(conn, str(u.database))
            else:
                conn.exec_driver_sql("BEGIN")

        return engine
    if u.get_backend_name() == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        return create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=4)
    raise RegistryError(f"unsupported registry database '{u.get_backend_name()}'",
                        hint="use a SQLite file or a postgresql+psycopg:// URL")


def current_revision(conn: Connection) -> str | None:
    """The applied revision, without importing Alembic."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'").first()
    else:
        exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
    if not exists:
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    from .location import private_files

    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600 if private_files() else 0o666), "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined, unused-ignore]
        else:
            import fcntl

            bound, start, announced = lock_timeout(), time.monotonic(), False
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= bound:
                        raise _busy(str(path), waited) from None
                    if not announced and waited >= LOCK_NOTICE_AFTER_S and _notice is not None:
                        _notice("waiting for another process to finish upgrading the registry...")
                        announced = True
                    time.sleep(0.05)
        try:
            yield
        finally:
            if os.name != "nt":
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def advisory_lock(conn: Connection, key: int, *, shared: bool = False) -> None:
    """PostgreSQL transaction-scoped advisory lock (released at commit/rollback); no-op elsewhere."""
    if conn.dialect.name == "postgresql":
        fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        conn.execute(text(f"SELECT {fn}(:k)"), {"k": key})


def upgrade(engine: Engine, target: str = "head") -> None:
    """Bring the schema to ``target`` unless it is already at ``HEAD``; safe under concurrency."""
    if target == "head":
        with engine.connect() as conn:
            if current_revision(conn) == HEAD:
                return
    _migrate(engine, target, down=False)


def downgrade(engine: Engine, target: str) -> None:
    """Take the schema back to revision ``target`` (``"base"``: no tables left), under the same lock as
    ``upgrade``. An administrator's tool for rolling back a release; opening the registry upgrades again.
    Data survives where the older schema has a place for it (columns added later are dropped)."""
    _migrate(engine, target, down=True)


def _migrate(engine: Engine, target: str, *, down: bool) -> None:
    writer = engine.execution_options(czreg_write=True)
    if engine.dialect.name == "sqlite":
        db = Path(engine.url.database or "")
        with _file_lock(db.with_name(db.name + ".migrate-lock")):
            raw = engine.raw_connection()  # WAL is persistent; switching needs no open transaction
            try:
                raw.cursor().execute("PRAGMA journal_mode = WAL")
            finally:
                raw.close()
            with writer.begin() as conn:
                _run_alembic(conn, target, down)
    else:
        with writer.begin() as conn:
            advisory_lock(conn, _MIGRATE_LOCK_KEY)
            _run_alembic(conn, target, down)


def _run_alembic(conn: Connection, target: str, down: bool) -> None:
    current = current_revision(conn)
    if current == (HEAD if target == "head" else None if target == "base" else target):
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    (command.downgrade if down else command.upgrade)(cfg, target)
