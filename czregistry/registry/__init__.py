"""A versioned, content-addressed model registry (SQLite by default, PostgreSQL for teams).

``open_registry()`` opens (creating and migrating) the registry at ``--registry`` / ``CZREG_REGISTRY`` /
the per-user default. The names below load on first use: importing a light submodule (``location``,
``quicklist``) must not import SQLAlchemy, which costs ``czreg list`` most of its start-up time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Registry, open_registry
    from .location import RegistryLocation, resolve_location
    from .records import PublishResult, PullResult, RegistryClient, Resolved
    from .remote import RemoteRegistry, connect

__all__ = ["PublishResult", "PullResult", "Registry", "RegistryClient", "RegistryLocation", "RemoteRegistry",
           "Resolved", "connect", "open_registry", "resolve_location"]

_LAZY = {"PublishResult": "records", "PullResult": "records", "RegistryClient": "records", "Resolved": "records",
         "Registry": "api", "open_registry": "api", "RegistryLocation": "location", "resolve_location": "location",
         "RemoteRegistry": "remote", "connect": "remote"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
