"""The reference pre- and post-processing layers as Keras 3 layers.

Each layer is built from ``keras.ops`` only, so it exports in a SavedModel and converts with tf2onnx,
and serializes through ``get_config`` (registered under the ``czregistry`` package name, so a saved
``.keras`` file names them ``czregistry>RgbToBgr`` etc.). This module imports Keras, so nothing imports it
at start-up: ``czregistry.builtin_layers`` builds these only when a Keras model is composed (the Keras form of
a built-in layer; the ONNX form, which needs no TensorFlow, is in ``builtin_layers`` itself). Keras comes
with the ``czregistry-tensorflow`` plugin; the core does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "Normalization",
    "PerImageStandardization",
    "RgbToBgr",
    "RgbaToBgra",
    "Scale",
    "Shift",
    "SigmoidToSoftmaxScores",
    "Softmax",
    "TransposeChannels",
]

_PACKAGE = "czregistry"


def _floats(value: float | Sequence[float], what: str) -> list[float]:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if not values:
        raise ValueError(f"{what} must not be empty")
    return values


def _check_channels(layer: keras.layers.Layer, input_shape: Any, n: int) -> None:
    """A per-channel vector of length ``n`` > 1 must match the channel axis (1 broadcasts)."""
    channels = input_shape[-1]
    if n > 1 and channels is not None and channels != n:
        raise ValueError(f"{layer.name}: {n} per-channel values given but the input has {channels} channels")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TransposeChannels(keras.layers.Layer):
    """Reorder channels: output channel ``i`` is input channel ``order[i]`` (a gather on the last axis)."""

    def __init__(self, order: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.order = [int(i) for i in order]
        if not self.order or sorted(self.order) != list(range(len(self.order))):
            raise ValueError(f"order must be a permutation of 0..n-1, got {list(order)}")

    def build(self, input_shape: Any) -> None:
        channels = input_shape[-1]
        if channels is not None and channels != len(self.order):
            raise ValueError(f"{self.name}: order {self.order} needs {len(self.order)} channels, "
                             f"the input has {channels}")
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        return ops.take(inputs, self.order, axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "order": list(self.order)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RgbToBgr(TransposeChannels):
    """Swap red and blue of a 3-channel image (ZEN delivers RGB; many models were trained on BGR)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("order", None)
        super().__init__(order=[2, 1, 0], **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("order")
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RgbaToBgra(TransposeChannels):
    """Swap red and blue of a 4-channel image, keeping alpha last."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("order", None)
        super().__init__(order=[2, 1, 0, 3], **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("order")
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerImageStandardization(keras.layers.Layer):
    """``tf.image.per_image_standardization``: each image to zero mean, unit variance over all pixels and
    channels, dividing by ``max(std, 1/sqrt(N))`` so flat images do not blow up.

    Not local: a pixel's output depends on the whole input, so tiled inference of a model with this
    layer differs from whole-image inference (its LayerSpec says ``local=False``).
    """

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        axes = tuple(range(1, len(x.shape)))
        mean = ops.mean(x, axis=axes, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=axes, keepdims=True)
        count = ops.sum(ops.ones_like(x), axis=axes, keepdims=True)
        std = ops.maximum(ops.sqrt(var), ops.rsqrt(count))
        return (x - mean) / std

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Normalization(keras.layers.Layer):
    """``(x - mean) / std`` with a scalar or per-channel mean and std (fixed, not learned).

    Unlike ``keras.layers.Normalization`` it has no ``adapt`` state: the values are part of the config.
    """

    def __init__(self, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean = _floats(mean, "mean")
        self.std = _floats(std, "std")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not be zero")

    def build(self, input_shape: Any) -> None:
        _check_channels(self, input_shape, len(self.mean))
        _check_channels(self, input_shape, len(self.std))
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        mean = ops.convert_to_tensor(self.mean, dtype="float32")
        inv_std = ops.convert_to_tensor([1.0 / s for s in self.std], dtype="float32")
        return (ops.cast(inputs, "float32") - mean) * inv_std

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Shift(keras.layers.Layer):
    """``x + offset`` (scalar or per channel)."""

    def __init__(self, offset: float | Sequence[float] = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset = _floats(offset, "offset")

    def build(self, input_shape: Any) -> None:
        _check_channels(self, input_shape, len(self.offset))
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        return ops.cast(inputs, "float32") + ops.convert_to_tensor(self.offset, dtype="float32")

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "offset": list(self.offset)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Scale(keras.layers.Layer):
    """``x * factor`` (scalar or per channel), e.g. ``1/255`` for 8-bit input."""

    def __init__(self, factor: float | Sequence[float] = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = _floats(factor, "factor")

    def build(self, input_shape: Any) -> None:
        _check_channels(self, input_shape, len(self.factor))
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        return ops.cast(inputs, "float32") * ops.convert_to_tensor(self.factor, dtype="float32")

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": list(self.factor)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SigmoidToSoftmaxScores(keras.layers.Layer):
    """Turn a one-channel sigmoid probability ``p`` into two softmax-style scores ``[1 - p, p]``.

    ZEN expects one score per class that sums to 1 over the channel axis; a binary model trained with a
    sigmoid head gives one channel. Class 0 is the background, class 1 the foreground.
    """

    def build(self, input_shape: Any) -> None:
        if input_shape[-1] is not None and input_shape[-1] != 1:
            raise ValueError(f"{self.name}: expects a 1-channel sigmoid output, got {input_shape[-1]} channels")
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        p = ops.cast(inputs, "float32")
        return ops.concatenate([1.0 - p, p], axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], 2)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Softmax(keras.layers.Layer):
    """Softmax over the channel axis: class scores for a model that ends in logits (typical for PyTorch
    segmentation models, whose loss applies the softmax), so the package outputs probabilities."""

    def call(self, inputs: Any) -> Any:
        return ops.softmax(ops.cast(inputs, "float32"), axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape
