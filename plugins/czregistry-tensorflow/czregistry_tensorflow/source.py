"""The Keras model source: in-memory ``keras.Model`` objects, SavedModel folders and ``.keras`` files.

Registered through ``register_sources``. Keras sources compose their layers in Keras (``compose``) and export
the result with tf2onnx or as a zipped SavedModel, so the parity reference is the composed Keras model. This
source also builds the ``--pre`` / ``--post`` layers for sources that hand packing ONNX bytes (ONNX,
PyTorch): the reference layers are Keras layers, converted by tf2onnx and spliced into their graphs.

TensorFlow and Keras are imported only when a model is loaded; ``recognise`` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czregistry.backends import Session, Signature, TensorInfo
from czregistry.errors import BackendError, PackError, UsageError, first_line
from czregistry.sources import LayerCall, LoadedSource, LoadOptions, Source

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KerasSession", "KerasSource", "is_keras_model"]


def _import_tf() -> None:
    from czregistry._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()


def is_keras_model(obj: Any) -> bool:
    """Duck-typed, so recognising an object never imports Keras."""
    return hasattr(obj, "input_shape") and hasattr(obj, "predict") and hasattr(obj, "layers")


class KerasSession(Session):
    """A Keras model behind the backend ``Session`` interface: the parity reference and probe subject."""

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
        import numpy as np

        try:
            out = self._model(np.ascontiguousarray(batch, dtype=np.float32), training=False)
        except Exception as exc:
            raise BackendError(f"Keras model failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return np.asarray(out)


class _KerasLoaded(LoadedSource):
    """A Keras model; ``savedmodel_dir`` is zipped as-is when the model is packed unchanged as a SavedModel."""

    def __init__(self, description: str, model: Any, savedmodel_dir: Path | None = None) -> None:
        super().__init__(description, KerasSession(model))
        self.model = model
        self.savedmodel_dir = savedmodel_dir

    def compose(self, pre: Sequence[LayerCall], post: Sequence[LayerCall],
                spatial: tuple[int, ...] | None) -> LoadedSource:
        from .compose import prepend_and_append

        return _KerasLoaded(self.description, prepend_and_append(self.model, pre, post, spatial_dims=spatial))

    def export(self, model_format: str, opset: int) -> bytes:
        from .export import export_savedmodel_zip, to_onnx

        if model_format == "onnx":
            return to_onnx(self.model, opset)
        if self.savedmodel_dir is not None:
            from czregistry.package import zip_directory

            zipped = zip_directory(self.savedmodel_dir)
            assert isinstance(zipped, bytes)
            return zipped
        return export_savedmodel_zip(self.model)


@dataclass
class _KerasLayerStack:
    """Layers as a small Keras model: run eagerly for the reference, converted by tf2onnx for the package."""

    model: Any

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        return tuple(self.model.output_shape)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.asarray(self.model(batch, training=False))

    def to_onnx(self, opset: int) -> bytes:
        from .export import to_onnx

        return to_onnx(self.model, opset)


class KerasSource(Source):
    name = "keras"
    description = "keras.Model objects, SavedModel folders, .keras files"
    priority = 10
    builds_layers = True

    @classmethod
    def recognise(cls, source: Any) -> bool:
        if is_keras_model(source):
            return True
        if not isinstance(source, str | os.PathLike):
            return False
        path = Path(source)
        if path.is_dir():
            return (path / "saved_model.pb").is_file()
        return path.suffix.lower() in (".keras", ".h5", ".hdf5")

    def load(self, source: Any, options: LoadOptions) -> LoadedSource:
        _import_tf()
        if is_keras_model(source):
            loaded = _KerasLoaded(f"Keras model '{source.name}'", source)
        else:
            path = Path(source)
            if path.is_dir():
                loaded = _KerasLoaded(f"SavedModel {path}", _load_savedmodel(path), savedmodel_dir=path)
            elif path.suffix.lower() in (".h5", ".hdf5"):
                raise UsageError(f"{path}: legacy HDF5 Keras files are not supported",
                                 hint="load it in Keras and save it as .keras, or pass the model object to pack()")
            else:
                loaded = _KerasLoaded(f"Keras file {path}", _load_keras_file(path))
        from .export import input_shape

        input_shape(loaded.model)  # refuses several inputs with the export's words
        n_out = len(getattr(loaded.model, "outputs", None) or [None])
        if n_out != 1:
            raise PackError(f"the model has {n_out} outputs; a package needs exactly one",
                            hint="wrap it in a keras.Model that returns only the output the host should use")
        return loaded

    def build_layers(self, calls: Sequence[LayerCall], input_shape: Sequence[int | None]) -> _KerasLayerStack:
        _import_tf()
        import keras

        from .compose import build_layer

        inp = keras.Input(tuple(input_shape[1:]), name="input", dtype="float32")
        x = inp
        for spec, kwargs in calls:
            x = build_layer(spec, kwargs)(x)
        return _KerasLayerStack(keras.Model(inp, x, name="czreg_layers"))


def _load_savedmodel(folder: Path) -> Any:
    """Wrap a SavedModel folder (Keras 3 export or plain TF2) as a one-input Keras model."""
    import keras
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:
        raise UsageError(f"{folder} is not a loadable TensorFlow SavedModel: {first_line(exc)}") from exc
    sigs = dict(loaded.signatures)
    endpoint = next((k for k in ("serving_default", "serve") if k in sigs), next(iter(sigs), None))
    if endpoint is None:
        raise UsageError(f"SavedModel {folder} has no serving signature",
                         hint="export it with model.export(...) or tf.saved_model.save(..., signatures=...)")
    sig = sigs[endpoint]
    inputs = sig.structured_input_signature[1]
    outputs = sig.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise PackError(f"SavedModel signature '{endpoint}' has {len(inputs)} inputs and {len(outputs)} "
                        "outputs; a package needs exactly one of each")
    in_spec = next(iter(inputs.values()))
    layer = keras.layers.TFSMLayer(str(folder), call_endpoint=endpoint)
    inp = keras.Input(tuple(in_spec.shape[1:]), name="input", dtype="float32")
    out = layer(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return keras.Model(inp, out, name=folder.name.replace(".", "_") or "savedmodel")


def _load_keras_file(path: Path) -> Any:
    import keras

    from czregistry.selection import available_layers

    available_layers()  # import plugins so their custom layers are registered before deserialising
    import czregistry.keras_layers  # noqa: F401  (registers the built-in layers' Keras forms, czregistry>...)
    try:
        return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise UsageError(f"cannot load Keras model {path}: {first_line(exc)}",
                         hint="custom layers must be importable (registered with keras.saving)") from exc
