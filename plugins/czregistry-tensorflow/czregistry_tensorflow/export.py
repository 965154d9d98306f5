"""Export a Keras model as the two model formats a CZANN package can hold.

- ``export_savedmodel_zip``: Keras 3 ``model.export(format="tf_saved_model")``, zipped reproducibly.
- ``to_onnx``: tf2onnx with an input named ``input`` of shape ``(None, *spatial, c)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from czregistry.errors import PackError
from czregistry.onnx.graph import DEFAULT_OPSET
from czregistry.package import zip_directory

__all__ = ["DEFAULT_OPSET", "export_savedmodel_zip", "input_shape", "to_onnx"]


def input_shape(model: Any) -> tuple[int | None, ...]:
    """The Keras model's one input shape, batch first; ``PackError`` when it has several inputs (a package
    has exactly one). Packing uses it too, so both sides refuse multi-input models with the same words."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise PackError(f"model '{model.name}' has {len(shape)} inputs; a package needs exactly one")
        shape = shape[0]
    return tuple(shape)


def export_savedmodel_zip(model: Any) -> bytes:
    """The model as a zipped TensorFlow SavedModel (Keras 3 export format, serving signature ``serve``)."""
    with tempfile.TemporaryDirectory(prefix="czreg-export-") as tmp:
        folder = Path(tmp) / "savedmodel"
        try:
            model.export(str(folder), format="tf_saved_model", verbose=False)
        except Exception as exc:
            raise PackError(f"TensorFlow cannot export model '{model.name}' as a SavedModel: {exc}") from exc
        data = zip_directory(folder)
    assert isinstance(data, bytes)
    return data


def to_onnx(model: Any, opset: int = DEFAULT_OPSET) -> bytes:
    """The model converted to ONNX by tf2onnx; the input is named ``input`` with a free batch axis."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *input_shape(model)[1:]), tf.float32, name="input"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as exc:
        raise PackError(f"tf2onnx cannot convert model '{model.name}' to ONNX opset {opset}: {exc}",
                        hint="try another --opset, or pack as a SavedModel") from exc
    return bytes(proto.SerializeToString())
