"""TensorFlow plugin for czregistry: a SavedModel backend, the reference Keras layers, and the Keras model
source (``keras.Model`` objects, SavedModel folders, ``.keras`` files) that ``czreg pack`` reads.

Importing this module is cheap: TensorFlow and Keras load only when a model is run or a layer is built
(the layer factories below import ``keras_layers`` on first call).
"""

from __future__ import annotations

from typing import Any

from czregistry.hookspecs import hookimpl
from czregistry.layers import LayerSpec, Param

from .backend import TensorFlowBackend
from .source import KerasSource

__all__ = ["LAYER_SPECS", "KerasSource", "TensorFlowBackend"]


def _factory(class_name: str) -> Any:
    """A factory that imports Keras only when the layer is built."""

    def build(**kwargs: Any) -> Any:
        from . import keras_layers

        return getattr(keras_layers, class_name)(**kwargs)

    build.__name__ = build.__qualname__ = f"build_{class_name}"
    build.__doc__ = f"Build a czregistry_tensorflow.keras_layers.{class_name}."
    return build


LAYER_SPECS: tuple[LayerSpec, ...] = (
    LayerSpec("rgb_to_bgr", "pre", _factory("RgbToBgr"), {},
              "swap red and blue of a 3-channel image"),
    LayerSpec("rgba_to_bgra", "pre", _factory("RgbaToBgra"), {},
              "swap red and blue of a 4-channel image, alpha stays last"),
    LayerSpec("per_image_standardization", "pre", _factory("PerImageStandardization"), {},
              "each image to zero mean and unit variance (tf.image.per_image_standardization)",
              local=False),
    LayerSpec("normalize", "pre", _factory("Normalization"), {
        "mean": Param("floats", required=True, help="mean, one value or one per channel: 0.5 or [0.4,0.5,0.6]"),
        "std": Param("floats", required=True, help="standard deviation, one value or one per channel"),
    }, "(x - mean) / std"),
    LayerSpec("shift", "pre", _factory("Shift"), {
        "offset": Param("floats", required=True, help="added to every pixel, one value or one per channel"),
    }, "x + offset"),
    LayerSpec("scale", "pre", _factory("Scale"), {
        "factor": Param("floats", required=True, help="multiplies every pixel, e.g. 0.00392156862745098 for 1/255"),
    }, "x * factor"),
    LayerSpec("transpose_channels", "pre", _factory("TransposeChannels"), {
        "order": Param("ints", required=True, help="new channel order, a permutation: [2,1,0]"),
    }, "reorder channels: output channel i is input channel order[i]"),
    LayerSpec("sigmoid_to_softmax", "post", _factory("SigmoidToSoftmaxScores"), {},
              "one sigmoid channel p to two class scores [1-p, p]"),
    LayerSpec("softmax", "post", _factory("Softmax"), {},
              "softmax over the channels: class probabilities from a model that ends in logits"),
)


@hookimpl
def register_backends(register: Any) -> None:
    register(TensorFlowBackend)


@hookimpl
def register_layers(register: Any) -> None:
    for spec in LAYER_SPECS:
        register(spec)


@hookimpl
def register_sources(register: Any) -> None:
    register(KerasSource)
