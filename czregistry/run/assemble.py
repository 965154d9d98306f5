"""Assembling the output: each tile's kept interior placed (or blended) into a band one tile row high, and
converted to the output kind (probabilities, uint8, labels) in fixed-size blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import RunError
from .plan import OutputKind
from .tiling import Tile, TileGrid, blend_weights_1d

__all__ = ["Assembler", "Packer", "argmax_labels", "convert_output", "out_dtype"]

# --- output conversion --------------------------------------------------------------------------------


def argmax_labels(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``argmax`` over the (short) last axis, several times faster than ``np.argmax`` on channels-last
    data; ties go to the lower class, as with ``np.argmax``. Written into ``out`` (``(..., 1)``) if given."""
    n = block.shape[-1]
    if out is None:
        out = np.empty((*block.shape[:-1], 1), np.uint8 if n <= 256 else np.uint16)
    labels = out[..., 0]
    if n == 2 and labels.dtype == np.uint8:
        np.greater(block[..., 1], block[..., 0], out=labels.view(np.bool_))
        return out
    labels[...] = 0
    best = block[..., 0].copy()
    for c in range(1, n):
        channel = block[..., c]
        np.copyto(labels, c, where=channel > best)
        np.maximum(best, channel, out=best)
    return out


def convert_output(block: np.ndarray, kind: OutputKind, out: np.ndarray | None = None,
             scratch: np.ndarray | None = None) -> np.ndarray:
    """Turn float32 output rows into what is stored, into ``out`` if given, else into a new array
    (``block`` may be reused by the caller either way). ``scratch``, a float32 array at least
    ``block.size`` long, spares the uint8 conversion its temporary."""
    if kind == "labels":
        return argmax_labels(block, out)
    if kind == "uint8":
        if scratch is not None and scratch.size >= block.size:
            scaled = scratch.reshape(-1)[:block.size].reshape(block.shape)
            np.multiply(block, np.float32(255), out=scaled)
        else:
            scaled = block * np.float32(255)
        np.rint(scaled, out=scaled)
        if out is None:
            np.clip(scaled, 0, 255, out=scaled)
            return scaled.astype(np.uint8)
        # clip and cast in one pass: the clipped values are whole numbers in [0, 255], cast exactly
        np.clip(scaled, 0, 255, out=out, casting="unsafe")
        return out
    if out is None:
        return np.array(block, dtype=np.float32, copy=True)
    np.copyto(out, block)
    return out


class Packer:
    """Converts finished float32 rows straight into output blocks of exactly the writer's ``unit`` rows.

    The assembler emits rows in tile-row steps (say 224) while OME-TIFF tiles and Zarr chunks take 256:
    converting into aligned blocks here spares the writer a concatenation (a full extra copy of the output)
    and a fresh allocation per block. Each block is new: the writer may still hold earlier ones.
    With ``converted`` the rows arrive already in the output kind (the assembler or the device converted
    them) and are only packed.
    """

    def __init__(self, write: Callable[[int, int, np.ndarray], None], kind: OutputKind, unit: int,
                 spatial: Sequence[int], channels: int, dtype: np.dtype[Any], *, converted: bool = False) -> None:
        self.write, self.kind, self.unit, self.converted = write, kind, unit, converted
        self.rows, self.rest, self.channels, self.dtype = spatial[0], tuple(spatial[1:]), channels, dtype
        self.plane = -1
        self.start = 0  # first row of ``buf``
        self.filled = 0
        self.buf: np.ndarray | None = None
        self.convert_seconds = 0.0
        self.write_seconds = 0.0

    def __call__(self, plane: int, start: int, block: np.ndarray) -> None:
        if plane != self.plane:
            self.plane, self.start, self.filled, self.buf = plane, 0, 0, None
        if start != self.start + self.filled:
            raise RunError(f"internal error: rows arrive out of order ({start} after {self.start + self.filled})")
        pos = 0
        while pos < block.shape[0]:
            if self.buf is None:
                n = min(self.unit, self.rows - self.start)
                self.buf = np.empty((n, *self.rest, self.channels), self.dtype)
            take = min(self.buf.shape[0] - self.filled, block.shape[0] - pos)
            t0 = time.perf_counter()
            if self.converted:
                np.copyto(self.buf[self.filled:self.filled + take], block[pos:pos + take])
            else:
                convert_output(block[pos:pos + take], self.kind, self.buf[self.filled:self.filled + take])
            self.convert_seconds += time.perf_counter() - t0
            self.filled += take
            pos += take
            if self.filled == self.buf.shape[0]:
                t0 = time.perf_counter()
                self.write(plane, self.start, self.buf)
                self.write_seconds += time.perf_counter() - t0
                self.start += self.filled
                self.filled, self.buf = 0, None


def out_dtype(kind: OutputKind, channels: int) -> np.dtype[Any]:
    if kind == "labels":
        return np.dtype(np.uint8 if channels <= 256 else np.uint16)
    return np.dtype(np.uint8 if kind == "uint8" else np.float32)


# --- the assembler ------------------------------------------------------------------------------------


class Assembler:
    """Places tile outputs into a band of rows and emits rows that no later tile will touch.

    The band is allocated once, as high as the tallest tile row's kept (or, blending, valid) rows, and
    reused: after each tile row the finished rows are emitted and the rest moved to the front. ``emit``
    gets a view into the band that is valid only during the call.

    ``kind`` (without blending) converts each tile's kept interior to labels or uint8 as it is placed, so
    the band holds output values (1-4x smaller than float32) and the float32 rows are never copied whole;
    conversion is per pixel, so this equals converting the assembled rows. With ``converted`` the tiles
    arrive converted (the device did it) and are only placed. ``convert_seconds`` counts the conversion.
    """

    def __init__(self, grid: TileGrid, channels: int, blend: bool,
                 emit: Callable[[int, int, np.ndarray], None], *, kind: OutputKind = "probabilities",
                 converted: bool = False) -> None:
        self.grid, self.channels, self.blend, self.emit = grid, channels, blend, emit
        rows = range(len(grid.axes[0]))
        cap = max(self._row_stop(i) - self._row_start(i) for i in rows)
        rest = grid.padded_shape[1:]
        #: what ``add`` does to a tile: None (place float32), a kind to convert to, or "copy" (converted)
        self.kind: str | None = None
        dtype = np.dtype(np.float32)
        if kind != "probabilities" and not blend:
            self.kind = "copy" if converted else kind
            dtype = out_dtype(kind, channels)
            channels = 1 if kind == "labels" else channels
        elif converted:
            raise RunError("internal error: converted tiles need an output kind and no blending")
        self.convert_seconds = 0.0
        self._scratch = np.empty(int(np.prod(grid.tile)) * self.channels, np.float32) if self.kind == "uint8" \
            else None
        self.acc = np.zeros((cap, *rest, channels), dtype)
        self.wsum = np.zeros((cap, *rest, 1), np.float32) if blend else None
        self.plane: int | None = None
        self.row: int | None = None
        self.base = 0  # padded row index of acc[0]
        self.filled = 0  # rows of acc touched so far
        # 1D blend weights per axis and tile position; a tile's weights are their outer product
        self._w1d = [[blend_weights_1d(s) for s in spans] for spans in grid.axes] if blend else []

    def _row_start(self, row: int) -> int:
        span = self.grid.axes[0][row]
        return span.valid_start if self.blend else span.keep_start

    def _row_stop(self, row: int) -> int:
        span = self.grid.axes[0][row]
        return span.valid_stop if self.blend else span.keep_stop

    def _flush(self, upto: int) -> None:
        n = upto - self.base
        if n <= 0 or self.plane is None:
            return
        block: np.ndarray = self.acc[:n]
        if self.wsum is not None:
            block = block / np.maximum(self.wsum[:n], np.float32(1e-12))
        rows = max(0, min(n, self.grid.image_shape[0] - self.base))
        if rows:
            crop = (slice(0, rows), *(slice(0, s) for s in self.grid.image_shape[1:]))
            self.emit(self.plane, self.base, block[crop])
        left = self.filled - n
        if left > 0:
            self.acc[:left] = self.acc[n:n + left]  # numpy buffers overlapping copies
            if self.wsum is not None:
                self.wsum[:left] = self.wsum[n:n + left]
        if self.blend:
            assert self.wsum is not None
            self.acc[max(left, 0):self.filled] = 0
            self.wsum[max(left, 0):self.filled] = 0
        self.filled = max(left, 0)
        self.base = upto

    def add(self, plane: int, tile: Tile, y: np.ndarray) -> None:
        row = tile.index[0]
        if plane != self.plane:
            self.finish_plane()
            self.plane, self.row, self.base = plane, row, 0
        elif row != self.row:
            self._flush(self._row_start(row))
            self.row = row
        if self.blend:
            assert self.wsum is not None
            w = self._w1d[0][tile.index[0]]
            for d in range(1, len(tile.index)):
                w = np.multiply.outer(w, self._w1d[d][tile.index[d]])
            w = w[..., None]
            valid = tuple(slice(s.valid_start, s.valid_stop) for s in tile.spans)
            local = tuple(slice(s.valid_start - s.origin, s.valid_stop - s.origin) for s in tile.spans)
            dst = (slice(valid[0].start - self.base, valid[0].stop - self.base), *valid[1:])
            self.acc[dst] += y[local] * w[local]
            self.wsum[dst] += w[local]
            self.filled = max(self.filled, valid[0].stop - self.base)
        else:
            keep = tile.keep_slices
            dst = (slice(keep[0].start - self.base, keep[0].stop - self.base), *keep[1:])
            if self.kind is None or self.kind == "copy":
                self.acc[dst] = y[tile.local_keep_slices]
            else:
                t0 = time.perf_counter()
                convert_output(y[tile.local_keep_slices], self.kind, self.acc[dst], self._scratch)  # type: ignore[arg-type]
                self.convert_seconds += time.perf_counter() - t0
            self.filled = max(self.filled, keep[0].stop - self.base)

    def finish_plane(self) -> None:
        # Without blending every emitted row was written by this plane's tiles (keep regions partition
        # the image), so the band needs no clearing; writing zeros over it cost as much as a tile row.
        active = self.plane is not None
        if active:
            self._flush(self.grid.padded_shape[0])
        self.plane, self.row, self.base, self.filled = None, None, 0, 0
        if active and self.wsum is not None:
            self.acc[:] = 0
            self.wsum[:] = 0
