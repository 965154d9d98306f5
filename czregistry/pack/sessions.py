"""Sessions packing runs the *source* model through: the reference side of the parity check and the
subject of the tile-size invariance probe. They implement ``czregistry.backends.Session`` so the probe and
the parity loop treat source and package alike.

The source's own session comes from its ``czregistry.sources.Source`` (ONNX Runtime for ONNX, Keras in the
TensorFlow plugin, the module itself in the torch plugin); this module only chains layers around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Session, Signature, TensorInfo
from ..layers import LayerSpec
from ..onnx.graph import DEFAULT_OPSET, layers_to_onnx
from ..onnx.source import onnx_reference
from ..selection import layer_builder
from ..sources import LayerStack


class _ChainSession(Session):
    """Pre layers, then the source, then post layers: the reference for a source handed over as ONNX bytes
    and packed with layers (the layers run eagerly, independently of their ONNX conversion)."""

    device = "cpu"

    def __init__(self, pre: LayerStack | None, inner: Session, post: LayerStack | None) -> None:
        self.pre, self.inner, self.post = pre, inner, post
        self.backend = f"layers+{inner.backend}"
        out = inner.signature.outputs[0]
        if post is not None:
            out = TensorInfo(out.name, tuple(post.output_shape), "float32")
        self._signature = Signature(inner.signature.inputs, (out,))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = self.pre.predict(batch) if self.pre is not None else batch
        y = self.inner.predict(x)
        return self.post.predict(y) if self.post is not None else y


class _OnnxLayerStack:
    """Layers in their ONNX form (``LayerSpec.onnx``): run by ONNX Runtime for the reference, rebuilt at the
    package's opset for splicing. No framework is imported: this is the path without TensorFlow."""

    def __init__(self, calls: Sequence[tuple[LayerSpec, dict[str, Any]]], shape: Sequence[int | None]) -> None:
        self.calls, self.shape = list(calls), tuple(shape)
        data, self._output_shape = layers_to_onnx(self.calls, self.shape, DEFAULT_OPSET)
        self._session = onnx_reference(data)

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        return self._output_shape

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._session.predict(np.ascontiguousarray(batch, dtype=np.float32))

    def to_onnx(self, opset: int) -> bytes:
        return layers_to_onnx(self.calls, self.shape, opset)[0]


def _layer_stack(calls: Sequence[tuple[LayerSpec, dict[str, Any]]],
                 shape: Sequence[int | None]) -> LayerStack | None:
    """Just ``calls`` on tensors of ``shape`` (batch first); None if empty. Their ONNX forms when every layer has
    one (no framework needed), else the Keras forms built by the plugin that builds layers (TensorFlow)."""
    if not calls:
        return None
    if all(spec.onnx is not None for spec, _ in calls):
        return _OnnxLayerStack(calls, shape)
    return layer_builder().build_layers(calls, shape)
