"""Where the PostgreSQL tests find their server: ``CZREG_TEST_POSTGRES_URL``, or else the line that
``bash .ci/postgres.sh`` writes to ``.ci/postgres.env`` (so the README's ``bash .ci/postgres.sh && pytest``
works as written, without sourcing anything). The root ``conftest.py`` calls ``load_postgres_env`` before
any test module is imported; ``skip_reason`` says precisely what is missing when the tests cannot run."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ENV_FILE", "VAR", "load_postgres_env", "read_env_file", "server_reachable", "skip_reason"]

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / ".ci" / "postgres.env"
VAR = "CZREG_TEST_POSTGRES_URL"

#: why the variable is unset after ``load_postgres_env`` (None: it is set)
_reason: str | None = None


def read_env_file(path: Path) -> str | None:
    """The ``CZREG_TEST_POSTGRES_URL=...`` value in ``path`` (shell syntax: optional ``export`` and quotes)."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[:100]:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == VAR:
            return value.strip().strip("'\"") or None
    return None


def server_reachable(url: str) -> bool:
    """A TCP connect to the URL's host and port (a server from an earlier boot is gone)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2):
            return True
    except OSError:
        return False


def load_postgres_env(env_file: Path = ENV_FILE, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``CZREG_TEST_POSTGRES_URL`` from ``env_file`` when it is unset; return the reason the PostgreSQL
    tests must skip (None: they run). A variable set by the caller always wins and is never second-guessed
    (CI exports it: a dead server there must fail, not skip)."""
    global _reason
    env = os.environ if environ is None else environ
    if env.get(VAR):
        _reason = None
        return None
    shown = os.path.relpath(env_file, ROOT) if env_file.is_relative_to(ROOT) else str(env_file)
    if not env_file.is_file():
        _reason = f"{VAR} is not set and {shown} does not exist: run 'bash .ci/postgres.sh' first"
    elif (url := read_env_file(env_file)) is None:
        _reason = f"{VAR} is not set and {shown} has no {VAR}= line: rerun 'bash .ci/postgres.sh'"
    elif not server_reachable(url):
        _reason = f"the PostgreSQL server named in {shown} ({urlsplit(url).netloc}) is not running: " \
                  "rerun 'bash .ci/postgres.sh'"
    else:
        env[VAR] = url
        _reason = None
    return _reason


def skip_reason() -> str:
    """Why the PostgreSQL tests skip (the reason found by the last ``load_postgres_env``)."""
    return _reason or f"{VAR} is not set"
