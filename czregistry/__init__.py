"""czregistry: validate, pack, version and run CZANN / CZMODEL deep-learning packages.

The library surface is imported lazily so ``import czregistry`` (and the CLI) stays fast: nothing here
imports TensorFlow or ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

from ._lazy import lazy_attributes

__all__ = [
    "Finding",
    "Report",
    "ValidateOptions",
    "__version__",
    "inspect_package",
    "open_package",
    "pack",
    "validate",
    "write_package",
]

_lazy = lazy_attributes(__name__, {
    "validate": "validate",
    "ValidateOptions": "checks",
    "Report": "report",
    "Finding": "report",
    "open_package": "package",
    "inspect_package": "package",
    "write_package": "package",
})


def _version() -> str:
    """The installed distribution's version, looked up on first use: ``importlib.metadata`` costs a tenth
    of a second at start-up that ``czreg list`` does not need."""
    from importlib import metadata

    try:
        return metadata.version("czregistry")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _version()
        globals()["__version__"] = value
        return value
    if name == "pack":  # the packing wing is a package that is also callable: czregistry.pack(model, ...)
        import importlib

        return importlib.import_module("czregistry.pack")
    return _lazy(name)
