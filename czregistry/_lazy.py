"""Names a package exports without importing the modules that define them, until first use: ``import
czregistry`` and the CLI must not pay for NumPy, the runner or the packing wing they may never touch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` is looked up in submodule ``where[name]`` (relative to
    ``package``) when first asked for; anything else is an ``AttributeError``, as for a normal module."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
