"""A versioned, content-addressed model registry (SQLite by default, PostgreSQL for teams).

``open_registry()`` opens (creating and migrating) the registry at ``--registry`` / ``CZREG_REGISTRY`` /
the per-user default. Importing this package imports SQLAlchemy: the CLI does it inside commands only.
"""

from __future__ import annotations

from .api import PublishResult, PullResult, Registry, Resolved, open_registry
from .location import RegistryLocation, resolve_location

__all__ = ["PublishResult", "PullResult", "Registry", "RegistryLocation", "Resolved", "open_registry",
           "resolve_location"]
