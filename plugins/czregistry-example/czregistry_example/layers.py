"""The Keras layer of the example plugin.

Written with ``keras.ops`` only, so it exports in a TensorFlow SavedModel and converts to ONNX with
tf2onnx (sort and gather have ONNX equivalents). Registered as serializable so a saved ``.keras``
model that contains it can be loaded again once this plugin is imported.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["PercentileNormalization"]


@keras.saving.register_keras_serializable(package="czregistry_example")
class PercentileNormalization(keras.layers.Layer):
    """Map each image's ``low`` percentile to 0 and its ``high`` percentile to 1.

    Percentiles are taken over all pixels and channels of each image, with linear interpolation
    (the same as ``numpy.percentile``'s default), so a 16-bit image lands roughly in ``[0, 1]``.
    """

    def __init__(self, low: float = 1.0, high: float = 99.8, clip: bool = False, eps: float = 1e-6,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(low) < float(high) <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
        self.low, self.high, self.clip, self.eps = float(low), float(high), bool(clip), float(eps)

    def _percentile(self, sorted_values: Any, q: float) -> Any:
        count = ops.cast(ops.shape(sorted_values)[1], "float32")
        pos = (q / 100.0) * (count - 1.0)
        lower = ops.floor(pos)
        frac = pos - lower
        i0 = ops.cast(lower, "int32")
        i1 = ops.minimum(i0 + 1, ops.cast(count, "int32") - 1)
        v0 = ops.take(sorted_values, i0, axis=1)
        v1 = ops.take(sorted_values, i1, axis=1)
        return v0 + frac * (v1 - v0)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        flat = ops.reshape(x, (ops.shape(x)[0], -1))
        ordered = ops.sort(flat, axis=-1)
        lo = self._percentile(ordered, self.low)
        hi = self._percentile(ordered, self.high)
        shape = (-1,) + (1,) * (len(x.shape) - 1)
        lo, hi = ops.reshape(lo, shape), ops.reshape(hi, shape)
        y = (x - lo) / ops.maximum(hi - lo, self.eps)
        return ops.clip(y, 0.0, 1.0) if self.clip else y

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high, "clip": self.clip, "eps": self.eps}
