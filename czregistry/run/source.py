"""``ImageSource``: the one shape every image reader returns (a lazily indexable array plus its axes).

Kept apart from the readers (``readers``, ``czi``) so that each reader depends on it and none on another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["ImageSource", "guess_axes"]


@dataclass
class ImageSource:
    """A lazily indexable image. ``array[...]`` returns numpy; ``axes`` has one letter per dimension."""

    path: Path
    array: Any
    axes: str
    pixel_size: dict[str, float] = field(default_factory=dict)  # micrometres per pixel, keys "X", "Y", "Z"
    closer: Callable[[], None] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.array.dtype)

    @property
    def channels(self) -> int:
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    def layout(self, spatial_ndim: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        """``(leading axes, leading shape, spatial shape)`` for a model with ``spatial_ndim`` spatial dims."""
        rest = [a for a in self.axes if a != "C"]
        if len(rest) < spatial_ndim:
            raise UsageError(f"{self.path.name}: axes '{self.axes}' have fewer than {spatial_ndim} spatial dims",
                             hint="pass --axes to say which dims are spatial")
        spatial = rest[-spatial_ndim:]
        lead = rest[:-spatial_ndim]
        shape = dict(zip(self.axes, self.shape))
        return "".join(lead), tuple(shape[a] for a in lead), tuple(shape[a] for a in spatial)

    def read(self, lead_index: Sequence[int], region: Sequence[slice]) -> np.ndarray:
        """Read one region of one plane as ``(*spatial, C)`` in the file's dtype."""
        spatial_ndim = len(region)
        lead_axes, _, _ = self.layout(spatial_ndim)
        rest = [a for a in self.axes if a != "C"]
        key: list[Any] = []
        li = dict(zip(lead_axes, lead_index))
        si = dict(zip(rest[-spatial_ndim:], region))
        for a in self.axes:
            key.append(slice(None) if a == "C" else (li[a] if a in li else si[a]))
        block = np.asarray(self.array[tuple(key)])
        if "C" in self.axes:
            kept = [a for a in self.axes if a not in li]
            block = np.moveaxis(block, kept.index("C"), -1)
        else:
            block = block[..., None]
        return block

    def read_padded(self, lead_index: Sequence[int], starts: Sequence[int], stops: Sequence[int],
                    spatial_shape: Sequence[int]) -> np.ndarray:
        """Like ``read`` but the region may reach past the far end: those pixels are reflected."""
        from .tiling import reflect_indices

        if all(stop <= n for stop, n in zip(stops, spatial_shape)):
            return self.read(lead_index, [slice(a, b) for a, b in zip(starts, stops)])
        idx = [reflect_indices(a, b, n) for a, b, n in zip(starts, stops, spatial_shape)]
        lo = [int(i.min()) for i in idx]
        block = self.read(lead_index, [slice(lo_, int(i.max()) + 1) for lo_, i in zip(lo, idx)])
        for axis, (i, lo_) in enumerate(zip(idx, lo)):
            block = _take_runs(block, i - lo_, axis)
        return block

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None


def _take_runs(block: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(block, idx, axis)`` for indices made of runs of step +1 / -1 (what reflection gives), as
    one slice copy per run: fancy indexing the whole padded band (``np.ix_``) cost 30 ms per 256 x 8192
    band, more than reading it. The identity returns ``block`` itself; anything else falls back to take."""
    n = len(idx)
    if n == block.shape[axis] and (n == 0 or (idx[0] == 0 and bool(np.all(np.diff(idx) == 1)))):
        return block
    d = np.diff(idx)
    if n < 2 or not bool(np.all(np.abs(d) == 1)):
        return np.take(block, idx, axis=axis)
    starts = [0, *(int(j) + 1 for j in np.flatnonzero(d[1:] != d[:-1]) + 1)]
    parts = []
    for p, q in zip(starts, [*starts[1:], n]):
        a, b = int(idx[p]), int(idx[q - 1])
        sl = slice(a, b + 1) if b >= a else slice(a, b - 1 if b > 0 else None, -1)
        parts.append(block[(slice(None),) * axis + (sl,)])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def guess_axes(shape: Sequence[int]) -> str:
    """Axes for arrays without metadata: a last dim of at most 4 is taken as channels."""
    nd = len(shape)
    if nd < 2:
        raise UsageError(f"an image needs at least 2 dimensions, this one has shape {tuple(shape)}")
    has_c = nd >= 3 and shape[-1] <= 4
    spatial_and_lead = "TZYX"[-(nd - has_c):] if nd - has_c <= 4 else None
    if spatial_and_lead is None:
        raise UsageError(f"cannot guess the axes of a {nd}-dim array", hint="pass --axes, e.g. --axes TZYXC")
    return spatial_and_lead + ("C" if has_c else "")
