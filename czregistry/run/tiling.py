"""Tile geometry: where to cut an image into model-sized tiles and which part of each prediction to keep.

Hosts (ZEN, arivis) run a model on tiles of exactly its ``InputShape`` spatial size that overlap by at
least ``MinOverlap`` and keep each tile's interior, dropping a border of overlap/2 except at the image
edge. Two geometries are offered:

``stride`` (default)
    Made so that tiled output *equals* whole-image output wherever the border covers the model's halo:
    tile origins lie on the model's stride grid (a network with k 2x2 poolings is only shift-equivariant
    by multiples of 2^k), the last tile is shifted inward instead of padding the image (padding changes
    results near it), and every border is at least the requested border.
``zen``
    ZEN's own geometry, computed with ``cztile``'s ``AlmostEqualBorderFixedTotalLengthStrategy1D`` per
    axis (the 2D/3D strategies are products of it). It does not align origins to the stride, so a model
    with poolings shows small seams under it.

Images smaller than a tile, or whose size is off the stride grid, are padded at their far end (reflected)
to the next size the geometry can cover and the result is cropped back. Every geometry yields *keep*
regions that partition the padded image exactly, so each output pixel comes from one tile, or, when
blending, from a weighted mean over the tiles whose valid region holds it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import UsageError

__all__ = ["Geometry", "Span", "Tile", "TileGrid", "blend_weights", "blend_weights_1d", "padded_length", "plan_axis",
           "plan_tiles", "reflect_indices"]

Geometry = Literal["stride", "zen"]


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in padded-image coordinates.

    ``origin .. origin+size`` is what the model sees; ``keep_start .. keep_stop`` is what is kept (the keep
    spans of an axis partition ``0 .. padded``); ``valid_start .. valid_stop`` is the tile minus its
    borders (wider than keep where tiles overlap more than two borders), used for blending.
    """

    origin: int
    size: int
    keep_start: int
    keep_stop: int
    valid_start: int
    valid_stop: int


@dataclass(frozen=True)
class Tile:
    index: tuple[int, ...]
    spans: tuple[Span, ...]

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(s.origin for s in self.spans)

    @property
    def read_slices(self) -> tuple[slice, ...]:
        """The model input region in padded-image coordinates."""
        return tuple(slice(s.origin, s.origin + s.size) for s in self.spans)

    @property
    def keep_slices(self) -> tuple[slice, ...]:
        """The kept region in padded-image coordinates."""
        return tuple(slice(s.keep_start, s.keep_stop) for s in self.spans)

    @property
    def local_keep_slices(self) -> tuple[slice, ...]:
        """The kept region in tile coordinates (index the model output with it)."""
        return tuple(slice(s.keep_start - s.origin, s.keep_stop - s.origin) for s in self.spans)

    @property
    def borders(self) -> tuple[tuple[int, int], ...]:
        """Dropped pixels before and after the kept region, per axis."""
        return tuple((s.keep_start - s.origin, s.origin + s.size - s.keep_stop) for s in self.spans)


@dataclass(frozen=True)
class TileGrid:
    """All tiles for one image plane, in row-major order (the first spatial axis outermost)."""

    image_shape: tuple[int, ...]
    padded_shape: tuple[int, ...]
    tile: tuple[int, ...]
    border: tuple[int, ...]
    step: tuple[int, ...]
    geometry: Geometry
    axes: tuple[tuple[Span, ...], ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for index in itertools.product(*(range(n) for n in self.counts)):
            yield Tile(index, tuple(self.axes[d][i] for d, i in enumerate(index)))

    def __len__(self) -> int:
        return self.n_tiles

    @property
    def min_border(self) -> tuple[int, ...]:
        """The smallest border actually dropped next to another tile, per axis (image edges excluded)."""
        out = []
        for spans in self.axes:
            inner = [s.keep_start - s.origin for s in spans[1:]] + [s.origin + s.size - s.keep_stop
                                                                     for s in spans[:-1]]
            out.append(min(inner) if inner else 0)
        return tuple(out)

    def to_dict(self) -> dict[str, object]:
        return {"geometry": self.geometry, "image_shape": list(self.image_shape),
                "padded_shape": list(self.padded_shape), "tile": list(self.tile), "border": list(self.border),
                "step": list(self.step), "tiles": list(self.counts), "min_border": list(self.min_border)}


def padded_length(length: int, tile: int, step: int) -> int:
    """The size an axis is padded to: at least one tile, and ``tile + k * step`` so every origin is on grid."""
    if length <= tile:
        return tile
    return tile + math.ceil((length - tile) / step) * step


def plan_axis(length: int, tile: int, border: int, step: int = 1, geometry: Geometry = "stride") -> list[Span]:
    """Tiles along one axis of (padded) ``length``. See the module docstring for the two geometries."""
    if tile < 1:
        raise UsageError(f"tile size must be positive, got {tile}")
    if border < 0 or 2 * border >= tile:
        raise UsageError(f"border {border} leaves no interior in a tile of {tile} px",
                         hint="use a larger tile (--tile) or a smaller --border")
    if length <= tile:
        return [Span(0, tile, 0, tile, 0, tile)]
    if geometry == "zen":
        return _plan_axis_zen(length, tile, border)
    if (length - tile) % step:
        raise ValueError(f"padded length {length} is not tile {tile} + a multiple of step {step}")
    advance = (tile - 2 * border) // step * step
    if advance < step:
        raise UsageError(f"border {border} and step {step} leave no room to advance a {tile} px tile",
                         hint="use a larger tile (--tile) or a smaller --border")
    units, per = (length - tile) // step, advance // step
    n = math.ceil(units / per) + 1
    origins = [step * (i * units // (n - 1)) for i in range(n)]
    return _spans(origins, tile, length, border)


def _spans(origins: Sequence[int], tile: int, length: int, border: int) -> list[Span]:
    cuts = [0] + [(origins[i + 1] + origins[i] + tile) // 2 for i in range(len(origins) - 1)] + [length]
    spans = []
    for i, o in enumerate(origins):
        vs = 0 if i == 0 else o + border
        ve = length if i == len(origins) - 1 else o + tile - border
        spans.append(Span(o, tile, cuts[i], cuts[i + 1], min(vs, cuts[i]), max(ve, cuts[i + 1])))
    return spans


def _plan_axis_zen(length: int, tile: int, border: int) -> list[Span]:
    try:
        from cztile.fixed_total_length_strategy_1d import AlmostEqualBorderFixedTotalLengthStrategy1D
    except ImportError as exc:  # pragma: no cover - cztile is a dependency
        raise UsageError("--geometry zen needs the cztile package", hint="pip install cztile") from exc
    tiles = AlmostEqualBorderFixedTotalLengthStrategy1D(total_tile_length=tile,
                                                        min_border_length=border).calculate_tiles(length)
    spans = []
    for t in tiles:
        origin = t.left_most_tile_pixel - t.left_border_width
        keep = (t.left_most_tile_pixel, t.left_most_tile_pixel + t.width)
        spans.append(Span(origin, tile, keep[0], keep[1], keep[0], keep[1]))
    return spans


def plan_tiles(image_shape: Sequence[int], tile: Sequence[int], *, border: Sequence[int] | int = 0,
               step: Sequence[int] | int = 1, geometry: Geometry = "stride") -> TileGrid:
    """Plan the tiles for one image plane of spatial ``image_shape``.

    ``border`` is the least border to drop next to another tile (use max(declared border, measured halo));
    ``step`` the model's shift-equivariance step per axis (ignored by ``zen`` apart from padding).
    """
    nd = len(tile)
    if len(image_shape) != nd:
        raise UsageError(f"image has {len(image_shape)} spatial dims but the model tiles {nd}")
    borders = (border,) * nd if isinstance(border, int) else tuple(border)
    steps = (step,) * nd if isinstance(step, int) else tuple(max(1, s) for s in step)
    padded = tuple(padded_length(n, t, s) for n, t, s in zip(image_shape, tile, steps))
    axes = tuple(tuple(plan_axis(p, t, b, s, geometry)) for p, t, b, s in zip(padded, tile, borders, steps))
    return TileGrid(tuple(image_shape), padded, tuple(tile), borders, steps, geometry, axes)


def reflect_indices(start: int, stop: int, length: int) -> np.ndarray:
    """Source indices for padded positions ``start..stop`` of an axis of ``length`` (numpy 'reflect')."""
    idx = np.arange(start, stop)
    if length == 1:
        return np.zeros_like(idx)
    period = 2 * (length - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= length, period - idx, idx)


def blend_weights_1d(s: Span) -> np.ndarray:
    """Blend weights along one axis of a tile: 1 inside the keep span, ramping linearly down towards the
    valid span's edge where neighbours overlap, 0 in the dropped borders. Length ``s.size``."""
    w = np.zeros(s.size, np.float32)
    vs, ve = s.valid_start - s.origin, s.valid_stop - s.origin
    ks, ke = s.keep_start - s.origin, s.keep_stop - s.origin
    w[ks:ke] = 1.0
    left = ks - vs
    if left > 0:
        w[vs:ks] = np.arange(1, left + 1, dtype=np.float32) / (left + 1)
    right = ve - ke
    if right > 0:
        w[ke:ve] = np.arange(right, 0, -1, dtype=np.float32) / (right + 1)
    return w


def blend_weights(tile: Tile) -> np.ndarray:
    """Per-pixel blend weights of a tile (the outer product of ``blend_weights_1d``). Shape ``tile.size``."""
    ws = [blend_weights_1d(s) for s in tile.spans]
    out = ws[0]
    for w in ws[1:]:
        out = np.multiply.outer(out, w)
    return out
