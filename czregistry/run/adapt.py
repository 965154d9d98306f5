"""Input values as the model takes them: scaling to [0, 1] and mapping the image's channels to the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["InputAdapter", "scale_to_unit", "to_model_channels"]

def scale_to_unit(block: np.ndarray) -> np.ndarray:
    """Scale to float32 in [0, 1] as the host does: uint8 / 255, uint16 / 65535, other integers by their
    maximum, booleans as 0/1, floats as given."""
    dt = block.dtype
    if dt == np.bool_:
        return block.astype(np.float32)
    if np.issubdtype(dt, np.integer):
        out = block.astype(np.float32)
        out /= np.float32(np.iinfo(dt).max)
        return out
    if np.issubdtype(dt, np.floating):
        return block.astype(np.float32, copy=False)
    raise UsageError(f"pixel type {dt} is not supported", hint="convert the image to uint8, uint16 or float32")


def to_model_channels(block: np.ndarray, model_channels: int, *, select: Sequence[int] | None = None,
                      color_handling: str | None = None, bgr: bool = False) -> np.ndarray:
    """Map the image's channels (last axis) to the model's.

    ``select`` picks channels first. Then: equal counts pass; RGB(A) into a 1-channel model is converted to
    monochrome (the mean of R, G, B, like ZEN's ``ConvertToMonochrome``); gray into a 3-channel model is
    replicated; RGBA into a 3-channel model drops alpha. ``bgr`` reverses colour order (legacy Bgr types).
    """
    if select is not None:
        n = block.shape[-1]
        bad = [c for c in select if not 0 <= c < n]
        if bad:
            raise UsageError(f"channel {bad[0]} does not exist; the image has {n} channel(s) (0-based)")
        block = block[..., list(select)]
    n = block.shape[-1]
    if bgr and n >= 3:
        block = np.concatenate([block[..., 2::-1], block[..., 3:]], axis=-1)
    if n == model_channels:
        return block
    if model_channels == 1 and n in (3, 4) and color_handling != "SplitRgb":
        return block[..., :3].mean(axis=-1, keepdims=True, dtype=np.float32)
    if model_channels == 3 and n == 1:
        return np.repeat(block, 3, axis=-1)
    if model_channels == 3 and n == 4:
        return block[..., :3]
    raise UsageError(f"the model takes {model_channels} channel(s) but the image has {n}",
                     hint="choose channels with --channels, e.g. --channels 0")


@dataclass(frozen=True)
class InputAdapter:
    """The one way pixels become model input: scale to [0, 1] as the host does, pick channels, reverse colour
    for legacy BGR types, convert or split RGB per ``ColorHandling``. Built from ``ModelInfo`` by
    ``for_model``; ``czreg run`` (one process and Dask), ``smoke`` and ``evaluate`` all feed pixels through it,
    so a package is checked on the input it will be run on."""

    channels: int
    bgr: bool = False
    color_handling: str | None = None
    select: tuple[int, ...] | None = None

    @classmethod
    def for_model(cls, info: Any, channels: int, select: Sequence[int] | None = None) -> InputAdapter:
        return cls(int(channels), bool(getattr(info, "bgr", False)), getattr(info, "color_handling", None),
                   tuple(int(c) for c in select) if select is not None else None)

    def passes_raw(self, dtype: Any, image_channels: int) -> bool:
        """Whether the pixels need only scaling (8/16-bit, same channels, no colour reversal): callers may then
        hand them on raw and let the predictor scale as it fills the batch (the same float32 division)."""
        return (np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16)) and self.select is None
                and image_channels == self.channels and not (self.bgr and self.channels >= 3))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` (channels last, any supported dtype) as float32 model input."""
        return np.asarray(to_model_channels(scale_to_unit(raw), self.channels, select=self.select,
                                            color_handling=self.color_handling, bgr=self.bgr), dtype=np.float32)
