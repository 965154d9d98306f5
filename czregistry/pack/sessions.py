"""Sessions packing runs the *source* model through: the reference side of the parity check and the
subject of the tile-size invariance probe. They implement ``czregistry.backends.Session`` so the probe and
the parity loop treat source and package alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Session, Signature, TensorInfo
from ..errors import BackendError, PackError, first_line
from ..layers import LayerSpec
from .sources import _tf_plugin


class _KerasSession(Session):
    """A Keras model behind the backend ``Session`` interface, so the invariance probe can run the source."""

    backend = "keras"
    device = "cpu"

    def __init__(self, model: Any) -> None:
        self._model = model
        shape = model.input_shape[0] if isinstance(model.input_shape, list) else model.input_shape
        out = model.output_shape[0] if isinstance(model.output_shape, list) else model.output_shape
        self._signature = Signature((TensorInfo("input", tuple(shape), "float32"),),
                                    (TensorInfo("output", tuple(out), "float32"),))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self._model(np.ascontiguousarray(batch, dtype=np.float32), training=False)
        except Exception as exc:
            raise BackendError(f"Keras model failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return np.asarray(out)


class _OrtSession(Session):
    """ONNX bytes run by ONNX Runtime on the CPU (reference side of parity for ONNX sources)."""

    backend = "onnxruntime"
    device = "cpu"

    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # probing feeds sizes the model may refuse: those are measurements
        try:
            self._session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PackError(f"ONNX Runtime cannot load the source model: {first_line(exc)}") from exc
        ins, outs = self._session.get_inputs(), self._session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise PackError(f"the ONNX model has {len(ins)} inputs and {len(outs)} outputs; "
                            "a package needs exactly one of each")

        def dims(shape: list[Any]) -> tuple[int | None, ...]:
            return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)

        self._input = ins[0].name
        self._signature = Signature((TensorInfo(ins[0].name, dims(ins[0].shape), "float32"),),
                                    (TensorInfo(outs[0].name, dims(outs[0].shape), "float32"),))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self._session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})[0])
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc


class _ChainSession(Session):
    """Keras pre layers, then an ONNX source, then Keras post layers: the reference for an ONNX source
    packed with layers (the layers are computed eagerly, independently of their ONNX conversion)."""

    backend = "keras+onnxruntime"
    device = "cpu"

    def __init__(self, pre: Any, inner: Session, post: Any) -> None:
        self.pre, self.inner, self.post = pre, inner, post
        out = inner.signature.outputs[0]
        if post is not None:
            out = TensorInfo(out.name, tuple(post.output_shape), "float32")
        self._signature = Signature(inner.signature.inputs, (out,))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(self.pre(batch, training=False)) if self.pre is not None else batch
        y = self.inner.predict(x)
        return np.asarray(self.post(y, training=False)) if self.post is not None else y


def _layer_stack(calls: Sequence[tuple[LayerSpec, dict[str, Any]]], shape: Sequence[int | None]) -> Any:
    """A Keras model of just ``calls`` on tensors of ``shape`` (batch first), or None when empty."""
    if not calls:
        return None
    import keras

    compose = _tf_plugin("compose")
    inp = keras.Input(tuple(shape[1:]), name="input", dtype="float32")
    x = inp
    for spec, kwargs in calls:
        x = compose.build_layer(spec, kwargs)(x)
    return keras.Model(inp, x, name="czreg_layers")
