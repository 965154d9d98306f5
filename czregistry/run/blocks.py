"""Blocks of a Dask run: chunk-aligned rectangles of one output plane, each with the sub-grid of the runner's
tiles that fill it, and the default block edge. Pure geometry: no Dask, nothing read or written.

A block predicts every tile of the run's grid whose kept region (when blending: valid region) reaches into
it, in the runner's row-major order, on a sub-grid shifted to the block (``dask_run`` explains why that
gives the single-process output bit for bit).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RunError
from .tiling import Span, TileGrid

__all__ = ["BLOCKS_PER_WORKER", "DEFAULT_BLOCK_2D", "DEFAULT_BLOCK_2D_LARGE_OUTPUT", "DEFAULT_BLOCK_3D", "Block",
           "block_tasks", "default_block_edge"]

#: Default block edge (pixels per spatial axis). 2D: chosen per run by ``default_block_edge`` from the worker
#: count, the images and the bytes a block holds; these two are its bounds where the worker count is not
#: known (a scheduler address): 4096 px when a block stays within ``_BLOCK_BYTES``, else 2048 px.
#: 3D: 256 voxels per axis keeps a float32 block of a few classes near 0.3 GB per worker.
DEFAULT_BLOCK_2D = 4096
DEFAULT_BLOCK_2D_LARGE_OUTPUT = 2048
#: The most bytes a default 2D block holds: its input as read, a float32 copy where the model needs one,
#: and its output (labels 1 byte, uint8 / float32 per class). 256 MiB: an 8192 px block of 8-bit grey in,
#: labels or uint8 of 2 classes out (128-192 MiB); 4096 px for float32 of up to 3 classes.
_BLOCK_BYTES = 256 * 1024 * 1024
#: With several workers, the default block edge leaves at least this many blocks per worker thread, so the
#: last blocks do not leave all but one worker idle (one worker: one block is best, see ``default_block_edge``).
BLOCKS_PER_WORKER = 2
DEFAULT_BLOCK_3D = 256


@dataclass(frozen=True)
class Block:
    """One block: a chunk-aligned output region of one plane and the sub-grid of tiles that fill it."""

    image: int  # index into the run's images
    plane: int
    index: tuple[int, ...]
    region: tuple[tuple[int, int], ...]  # [start, stop) per spatial axis, image coordinates
    offset: tuple[int, ...]  # padded-image position of the sub-grid's origin
    grid: TileGrid  # in block-local coordinates

    @property
    def key(self) -> str:
        return f"p{self.plane}-" + "-".join(str(i) for i in self.index)

    def describe(self, image_name: str) -> str:
        where = ", ".join(f"{a} {s}:{e}" for a, (s, e) in zip("zyx"[-len(self.region):], self.region))
        return f"{image_name} plane {self.plane} block {list(self.index)} ({where})"


def _select_spans(spans: Sequence[Span], start: int, stop: int, blend: bool) -> tuple[int, int]:
    """First and last span whose kept (blending: valid) part reaches into ``start .. stop``."""
    hit = [i for i, s in enumerate(spans)
           if (s.valid_stop if blend else s.keep_stop) > start and (s.valid_start if blend else s.keep_start) < stop]
    if not hit:
        raise RunError(f"internal error: no tile covers {start}:{stop}")
    return hit[0], hit[-1]


def _sub_grid(grid: TileGrid, region: Sequence[tuple[int, int]], blend: bool) -> tuple[TileGrid, tuple[int, ...]]:
    """The tiles of ``grid`` that fill ``region``, shifted so the first tile starts at 0.

    The first span's kept and valid parts are stretched back to its origin and the last span's forward
    to its end, so the runner's assembler fills the whole sub-grid. That changes only pixels outside the
    region: the region's first pixel lies in the kept part of the first span or of a later one (and its
    last pixel likewise), and blend weights inside the kept part (1) and on the far ramp are unchanged.
    """
    axes, offset, length = [], [], []
    for d, (start, stop) in enumerate(region):
        spans = grid.axes[d]
        i0, i1 = _select_spans(spans, start, stop, blend)
        o = spans[i0].origin
        sub = []
        for i in range(i0, i1 + 1):
            s = spans[i]
            ks, ke, vs, ve = s.keep_start, s.keep_stop, s.valid_start, s.valid_stop
            if i == i0:
                ks = vs = s.origin
            if i == i1:
                ke = ve = s.origin + s.size
            sub.append(Span(s.origin - o, s.size, ks - o, ke - o, vs - o, ve - o))
        axes.append(tuple(sub))
        offset.append(o)
        length.append(spans[i1].origin + spans[i1].size - o)
    shape = tuple(length)
    return TileGrid(shape, shape, grid.tile, grid.border, grid.step, grid.geometry, tuple(axes)), tuple(offset)


def block_tasks(grid: TileGrid, image: int, n_planes: int, block: int, blend: bool) -> list[Block]:
    """All blocks of one image, plane by plane, row-major. ``block`` is the edge in pixels (each axis)."""
    blocks = []
    spatial = grid.image_shape
    starts = [range(0, n, block) for n in spatial]
    for plane in range(n_planes):
        for index in itertools.product(*(range(len(r)) for r in starts)):
            region = tuple((i * block, min((i + 1) * block, n)) for i, n in zip(index, spatial))
            sub, offset = _sub_grid(grid, region, blend)
            blocks.append(Block(image, plane, tuple(index), region, offset, sub))
    return blocks


def default_block_edge(images: Sequence[tuple[int, Sequence[int]]], bytes_per_pixel: float, workers: int | None,
                       same_layout: Callable[[int], bool], unit: int) -> int:
    """The default 2D block edge: the largest multiple of ``unit`` (the single-process run's shard extent)
    whose block stays within ``_BLOCK_BYTES`` and still gives every worker enough blocks.

    ``images``: (planes, spatial shape) per image; ``bytes_per_pixel``: what a block holds per pixel (input,
    float32 copy, output); ``workers``: worker threads of the cluster (None: not known, e.g. a scheduler
    address before it is reached); ``same_layout(edge)``: whether blocks of that edge keep the OME-Zarr shard
    layout of the single-process run (edges that would narrow the shards are never chosen by default).

    Why: blocks exist for memory bounds and to spread work, but every block boundary repeats the tiles on
    it (a 256 px tile grid: 17% extra tile predictions with 2048 px blocks, 5.5% with 4096 px, none with one
    block). One worker gains nothing from several blocks, so it gets the largest block the byte bound allows
    (an 8192 px labels image: one block, no seam tiles). Several workers get at least ``BLOCKS_PER_WORKER``
    blocks per worker thread where the images allow it (else the edge with the most blocks, ``unit``), so
    the last blocks do not run alone while other workers idle. Of the edges that give the fewest such
    blocks the smallest is taken: 8192 px in 2 x 2 blocks is cut 4096 + 4096, not 6144 + 2048. Unknown
    worker counts keep the earlier rule (4096 px within the byte bound, else ``unit``).
    """
    largest = max((max(int(n) for n in sp) for _, sp in images), default=unit)
    top = max(unit, -(-largest // unit) * unit)
    edges = [e for e in range(unit, top + 1, unit) if e == unit or same_layout(e)]
    fits = [e for e in edges if e * e * bytes_per_pixel <= _BLOCK_BYTES] or [unit]
    if workers is None:
        return ([e for e in fits if e <= DEFAULT_BLOCK_2D] or [unit])[-1]

    def count(edge: int) -> int:
        return sum(planes * int(np.prod([-(-int(n) // edge) for n in sp])) for planes, sp in images)

    want = 1 if workers <= 1 else BLOCKS_PER_WORKER * workers
    enough = [e for e in fits if count(e) >= want]
    if not enough:
        return fits[0]
    fewest = min(count(e) for e in enough)  # fewest blocks = fewest seams; of those edges the most even cut
    return min(e for e in enough if count(e) == fewest)
