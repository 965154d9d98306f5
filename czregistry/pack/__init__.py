"""The packing wing: a trained model becomes a verified CZANN / CZMODEL package.

One module per step: ``sources`` (what can be packed and how it is loaded), ``sessions`` (running the
source as the parity reference), ``tile`` (the tile-size reset), ``metadata`` (``model.json`` and the
legacy XML), ``unpack`` (``unpack_package``, ``inspect_summary``) and ``core`` (``pack``, which joins them
and proves the result). ONNX graph surgery (canonicalising, splicing, opsets) is the ``czregistry.onnx`` wing's.

Names are resolved lazily, so importing one step (``czregistry.pack.tile``) does not import NumPy or
the rest of the wing. ``czregistry.pack`` is also callable: ``czregistry.pack(model, metadata, "out.czann")``
is ``czregistry.pack.pack(...)``, the call the README has always shown, now that the name is a package too.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .._lazy import lazy_attributes

__all__ = [
    "CZANN_FORMAT_VERSION",
    "LEGACY_XML_VERSION",
    "PackResult",
    "PackWarning",
    "inspect_summary",
    "legacy_xml",
    "load_spec",
    "pack",
    "unpack_package",
]

_WHERE = {
    "CZANN_FORMAT_VERSION": "metadata",
    "LEGACY_XML_VERSION": "metadata",
    "legacy_xml": "metadata",
    "PackWarning": "sources",
    "load_spec": "sources",
    "PackResult": "core",
    "pack": "core",
    "inspect_summary": "unpack",
    "unpack_package": "unpack",
}


__getattr__ = lazy_attributes(__name__, _WHERE)


class _CallablePackage(types.ModuleType):
    """``czregistry.pack(...)`` calls ``czregistry.pack.core.pack``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .core import pack

        return pack(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
