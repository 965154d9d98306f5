"""The plugin surface. Every hook hands the plugin a ``register`` callable, so hooks can grow new
keyword arguments later without breaking plugins (pluggy lets implementations take fewer arguments).

Each hook is documented, with an example, in ``docs/plugins.md``; ``tests/test_plugins.py`` fails when a
hook here lacks that documentation or a ``test_hook_<name>`` test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("czregistry")
hookimpl = pluggy.HookimplMarker("czregistry")


@hookspec
def register_backends(register: Callable[[Any], None]) -> None:
    """Register inference backends: call ``register(BackendSubclass)`` once per ``backends.Backend`` subclass."""


@hookspec
def register_layers(register: Callable[[Any], None]) -> None:
    """Register pre- or post-processing layers: call ``register(LayerSpec(...))`` once per layer."""


@hookspec
def register_checks(register: Callable[[Any], None]) -> None:
    """Register validation checks: call ``register(check)`` with an object satisfying ``checks.Check``."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``czreg`` group (``cli`` is the ``click.Group``); existing names are kept."""


@hookspec
def register_sources(register: Callable[[Any], None]) -> None:
    """Register model sources ``pack`` can read: call ``register(SourceSubclass)`` once per
    ``sources.Source`` subclass (an in-memory object, a file type or a folder it recognises)."""
