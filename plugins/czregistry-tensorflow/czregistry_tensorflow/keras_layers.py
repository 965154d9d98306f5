"""The reference Keras layers, kept importable here for code written before they moved.

The classes live in ``czregistry.keras_layers`` (the core owns every built-in layer in both forms, ONNX and
Keras; see ``czregistry.builtin_layers``). They are registered with ``keras.saving`` under the same
``czregistry>`` names as before, so ``.keras`` files saved earlier load unchanged.
"""

from __future__ import annotations

from czregistry.keras_layers import (
    Normalization,
    PerImageStandardization,
    RgbaToBgra,
    RgbToBgr,
    Scale,
    Shift,
    SigmoidToSoftmaxScores,
    Softmax,
    TransposeChannels,
)

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
