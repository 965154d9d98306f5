"""Who and when: the identity and timestamps written into versions, events and evaluations.

A leaf of the registry package, so the modules that write audit fields (``api``, ``tokens``,
``evaluations``) share one notion of the acting user without importing one another.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = ["acting_as", "acting_host", "acting_user", "iso_time", "utc_now"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="seconds")


#: Who is acting, when it is not this process's user: a registry server sets the token's name and the
#: client's address (``acting_as``) so the audit trail says which token published, aliased or yanked.
_ACTING: ContextVar[tuple[str, str, dict[str, Any]] | None] = ContextVar("czreg_acting", default=None)


@contextlib.contextmanager
def acting_as(actor: str, host: str, **detail: Any) -> Iterator[None]:
    """Record ``actor`` and ``host`` (and ``detail`` in every audit event) for the writes inside the block,
    instead of the login name and host name of this process."""
    token = _ACTING.set((actor, host, detail))
    try:
        yield
    finally:
        _ACTING.reset(token)


def acting_user() -> str:
    acting = _ACTING.get()
    if acting is not None:
        return acting[0]
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def acting_host() -> str:
    acting = _ACTING.get()
    return acting[1] if acting is not None else socket.gethostname()
