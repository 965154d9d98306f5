"""The ONNX wing: everything the core itself does with ONNX, as a default plugin like ``checks/``.

``graph`` (canonicalising, splicing, opset conversion, layer fragments chained into one graph), ``session``
(the one ONNX Runtime session: the ``czregistry-onnx`` backend runs packages with it and packing runs ONNX
sources with it) and ``source`` (the ``.onnx`` model source). This package is one of ``DEFAULT_PLUGINS``
(``czregistry.plugins``): it registers ``OnnxSource`` through the same ``register_sources`` hook a third-party
source uses. Nothing here imports ``onnx``, ``onnxruntime`` or NumPy at module import: ``czreg list`` and
``czreg plugins`` load this plugin without paying for them.
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .source import OnnxSource

__all__ = ["OnnxSource", "register_sources"]


@hookimpl
def register_sources(register: Any) -> None:
    register(OnnxSource)
