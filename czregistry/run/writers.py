"""The output contract and the OME-TIFF writer.

Writers take rows (2D) or slices (3D) in order and write them incrementally: OME-TIFF as compressed tiles
fed to ``tifffile.TiffWriter.write`` from a background thread (here), OME-Zarr 0.5 shard row by shard row
(``omezarr``). Neither ever holds more than about one chunk row of the output. ``ArrayWriter`` collects
rows in memory for images that fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import RunError, UsageError, as_disk_full

__all__ = ["TIFF_LAYOUTS", "ArrayWriter", "OutputSpec", "RowBuffer", "TiffWriterSink", "Writer"]

@dataclass(frozen=True)
class OutputSpec:
    """What will be written: ``lead_shape`` planes of ``(*spatial, channels)`` pixels."""

    lead_axes: str
    lead_shape: tuple[int, ...]
    spatial: tuple[int, ...]
    channels: int
    dtype: np.dtype[Any]
    pixel_size: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    chunk: int = 256
    #: OME-TIFF tile compression: "zlib" (deflate, level 1) or "none". Zarr uses its default codec.
    compression: str = "zlib"
    #: OME-TIFF layout of several channels: "interleaved" (one page per plane, the classes as samples of
    #: each pixel) or "planar" (a page per class: OME's usual ``CYX``). One channel is the same either way.
    tiff_layout: str = "interleaved"

    @property
    def n_planes(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def unit(self) -> int:
        """Rows per write along the first spatial axis: a tile row (2D) or one slice (3D)."""
        return self.chunk if len(self.spatial) == 2 else 1


class Writer(Protocol):
    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        """``block`` covers rows ``start..`` of the first spatial axis, all of the others, all channels.
        Rows arrive in order, planes in order. The writer may keep ``block`` (not a copy) until ``close``:
        callers hand each block over and do not change it afterwards (the runner's ``Packer`` allocates a
        new one per call)."""

    def close(self) -> None:
        """Finish the file; raise if writing failed."""

    def abort(self) -> None:
        """Stop without finishing (the caller deletes the temp output)."""


class RowBuffer:
    """Collects rows in order and releases them in aligned ``unit``-row blocks (the last may be short)."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.parts: list[np.ndarray] = []
        self.start = 0
        self.rows = 0

    def push(self, start: int, block: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if start != self.start + self.rows:
            raise RunError(f"internal error: rows arrive out of order ({start} after {self.start + self.rows})")
        self.parts.append(block)
        self.rows += block.shape[0]
        unit = self.spec.unit
        if self.rows >= unit:
            data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            n = self.rows // unit * unit
            for i in range(0, n, unit):
                yield self.start + i, data[i:i + unit]
            rest = data[n:]
            self.parts = [rest] if len(rest) else []
            self.start += n
            self.rows -= n

    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.rows:
            data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            yield self.start, data
        self.parts, self.start, self.rows = [], 0, 0


TIFF_LAYOUTS = ("interleaved", "planar")


def _ome_axes(spec: OutputSpec) -> tuple[str, tuple[int, ...]]:
    """tifffile's axes and shape for ``spec``: ``[T|Z] (Z)YX S`` interleaved, ``[T|Z] (Z) C YX`` planar.

    Planar puts the class axis right above the page's ``YX``: the pages of one 2D plane (or one slice of a
    3D volume) are its classes in turn, so the writer never has to hold more than one plane's pages back.
    OME's ``DimensionOrder`` is then ``XYCZT``, one ``Channel`` per class, one page each."""
    lead = spec.lead_axes if spec.lead_axes and set(spec.lead_axes) <= set("TZ") and len(
        set(spec.lead_axes)) == len(spec.lead_axes) else ("T" if spec.lead_shape else "")
    lead_shape = spec.lead_shape if lead == spec.lead_axes else ((spec.n_planes,) if spec.lead_shape else ())
    depth = ("Z", spec.spatial[:1]) if len(spec.spatial) == 3 else ("", ())
    if spec.channels > 1 and spec.tiff_layout == "planar":
        return lead + depth[0] + "CYX", (*lead_shape, *depth[1], spec.channels, *spec.spatial[-2:])
    sp = "ZYX" if len(spec.spatial) == 3 else "YX"
    axes = lead + sp + ("S" if spec.channels > 1 else "")
    return axes, (*lead_shape, *spec.spatial, *((spec.channels,) if spec.channels > 1 else ()))


def _deflate() -> Callable[[Any], bytes]:
    """zlib (deflate) compression at level 1: ISA-L's (``isal``) when installed, else the standard library's.

    Both write standard zlib streams that every TIFF reader decodes to the same pixels; ISA-L is ~10x
    faster on noisy data (0.5 ms against 6 ms for a 256x256x2 uint8 tile here), which made uint8
    probability output the slowest configuration of the runner. Level 1 of ISA-L compresses about as
    well as zlib's level 1 (better on label images)."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency; platforms without a wheel fall back
        import zlib

        return lambda data: zlib.compress(data, 1)
    return lambda data: bytes(isal_zlib.compress(data, 1))


def _split_classes(tile: np.ndarray) -> list[np.ndarray]:
    """The class planes of a contiguous ``(Y, X, C)`` tile, each contiguous.

    When a pixel's classes fill 2, 4 or 8 bytes (two uint8 classes, two float32, four uint8), the pixel is
    read as one little-endian unsigned integer and each class is a shift and a narrowing cast away: for the
    usual two-class uint8 tile that is 23 us against 100-130 us for numpy's strided copy (``tile[..., c]``
    or a transposing ``moveaxis``), which would cost more than deflating the planes of a confident
    segmentation."""
    channels, size = tile.shape[-1], tile.dtype.itemsize
    if channels * size in (2, 4, 8) and size < channels * size and sys.byteorder == "little" \
            and tile.dtype.byteorder in ("=", "<", "|"):
        whole = tile.view(f"<u{channels * size}")[..., 0]
        return [(whole >> (8 * size * c) if c else whole).astype(f"<u{size}").view(tile.dtype)
                for c in range(channels)]
    return [np.ascontiguousarray(tile[..., c]) for c in range(channels)]


class TiffWriterSink:
    """OME-TIFF, 256x256 tiles, written by a background thread as rows arrive.

    ``spec.compression`` "zlib" compresses tiles (deflate level 1, exactly what ``tifffile`` would write)
    in a small thread pool, pipelined with the file writes: zlib releases the GIL, and one core manages
    only ~40 MB/s on float32 probabilities. "none" writes tiles as they are (fastest; float32 output
    barely compresses anyway).

    ``spec.tiff_layout`` "planar" writes a page per class (see ``_planar_tiles`` for how it stays bounded
    in memory although ``tifffile`` writes the pages in file order); "interleaved" one page whose pixels
    hold all classes.
    """

    _DONE = object()

    def __init__(self, path: Path, spec: OutputSpec) -> None:
        import tifffile

        if spec.compression not in ("zlib", "none"):
            raise UsageError(f"unknown OME-TIFF compression '{spec.compression}'", hint="use zlib or none")
        if spec.tiff_layout not in TIFF_LAYOUTS:
            raise UsageError(f"unknown OME-TIFF layout '{spec.tiff_layout}'", hint="use interleaved or planar")
        self.spec = spec
        self.buffer = RowBuffer(spec)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.aborted = threading.Event()
        #: seconds the writer thread was busy (encoding, waiting for its encoders, writing), not waiting for rows
        self.busy_seconds = 0.0
        self.workers = max(1, min(8, os.cpu_count() or 1)) if spec.compression == "zlib" else 0
        self.planar = spec.channels > 1 and spec.tiff_layout == "planar"
        axes, shape = _ome_axes(spec)
        metadata: dict[str, Any] = {"axes": axes}
        for ax in "XYZ":
            if ax in spec.pixel_size:
                metadata[f"PhysicalSize{ax}"] = spec.pixel_size[ax]
                metadata[f"PhysicalSize{ax}Unit"] = "µm"
        if spec.attrs.get("name"):
            metadata["Name"] = str(spec.attrs["name"])
        classes = [str(c) for c in spec.attrs.get("classes") or []]
        if self.planar and len(classes) == spec.channels:
            metadata["Channel"] = {"Name": classes}
        self.path = path
        #: where the encoded tiles of classes 1.. wait while class 0's page is written (planar only). Named
        #: like the runner's temp output (``.NAME.<pid>-<id>-spoolK.part``), so a killed run's are swept too.
        self.spool_paths = [path.with_name(f"{path.name.removesuffix('.part')}-spool{k}.part")
                            for k in range(1, spec.channels)] if self.planar else []
        self._spools: list[Any] = []
        self._tw = tifffile.TiffWriter(path, bigtiff=True, ome=True)
        # with zlib the tiles arrive as encoded bytes: tifffile only writes them and sets the tag
        self._kwargs: dict[str, Any] = {"shape": shape, "dtype": spec.dtype, "tile": (spec.chunk, spec.chunk),
                                        "compression": "zlib" if self.workers else None,
                                        "photometric": "minisblack", "metadata": metadata, "maxworkers": 1}
        if spec.channels > 1 and not self.planar:
            self._kwargs["planarconfig"] = "contig"
            self._kwargs["extrasamples"] = ["unspecified"] * (spec.channels - 1)
        self._thread = threading.Thread(target=self._run, name="czreg-tiff-writer", daemon=True)
        self._thread.start()

    def _blocks(self) -> Iterator[np.ndarray]:
        """Row blocks from the queue; the time spent waiting for them is not counted as busy."""
        clock = time.perf_counter
        while True:
            t0 = clock()
            item = self.queue.get()
            self.busy_seconds -= clock() - t0
            if item is self._DONE:
                return
            if self.aborted.is_set():
                raise RunError("aborted")
            yield item

    def _raw_tiles(self) -> Iterator[np.ndarray]:
        t = self.spec.chunk
        for item in self._blocks():
            block = item if self.spec.channels > 1 else item[..., 0]
            pages = block if len(self.spec.spatial) == 3 else block[None]
            for page in pages:
                for y in range(0, page.shape[0], t):
                    for x in range(0, page.shape[1], t):
                        yield page[y:y + t, x:x + t]

    def _tiles(self) -> Iterator[np.ndarray] | Iterator[bytes]:
        if self.planar:
            return self._planar_tiles()
        if not self.workers:
            return self._raw_tiles()
        return (pieces[0] for pieces in self._tile_pieces())

    def _encoder(self) -> Callable[[np.ndarray], list[bytes]]:
        """What one tile becomes: one deflated tile (interleaved), or one piece per class (planar: deflated,
        or the raw bytes without compression). Edge tiles are padded with zeros, as tifffile does."""
        t = self.spec.chunk
        shape = (t, t, self.spec.channels) if self.spec.channels > 1 else (t, t)
        dtype = self.spec.dtype
        pack: Callable[[Any], bytes] = _deflate() if self.workers else bytes

        def pad(tile: np.ndarray) -> np.ndarray:
            if tile.shape == shape:
                return tile
            full = np.zeros(shape, dtype)
            full[tuple(slice(0, n) for n in tile.shape)] = tile
            return full

        if not self.planar:
            return lambda tile: [pack(np.ascontiguousarray(pad(tile), dtype).data)]

        def planes(tile: np.ndarray) -> list[bytes]:
            return [pack(plane.data) for plane in _split_classes(np.ascontiguousarray(pad(tile), dtype))]

        return planes

    def _tile_pieces(self) -> Iterator[list[bytes]]:
        """Each tile's encoded pieces (``_encoder``), in order, encoded ahead by ``workers`` threads (none:
        in this thread, for uncompressed planar tiles, which only need their class planes cut out).

        Each row block is cut into ``workers`` runs of consecutive tiles, one task each: a task per tile
        cost a thread hand-over (a futex wake-up and a GIL switch) per tile, as much CPU as deflating a
        confident segmentation tile. At most two row blocks are in flight (the one being encoded and the
        next), so the writer holds at most about one more row block than before. Blocks are the caller's
        (``Packer`` hands each over once and never touches it again), so tiles are not copied up front."""
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        t = self.spec.chunk
        encode_one = self._encoder()

        def encode(tiles: list[np.ndarray]) -> list[list[bytes]]:
            return [encode_one(tile) for tile in tiles]

        def runs(item: np.ndarray) -> Iterator[list[np.ndarray]]:
            block = item if self.spec.channels > 1 else item[..., 0]
            pages = block if len(self.spec.spatial) == 3 else block[None]
            for page in pages:
                tiles = [page[y:y + t, x:x + t] for y in range(0, page.shape[0], t)
                         for x in range(0, page.shape[1], t)]
                size = -(-len(tiles) // max(1, self.workers))
                for i in range(0, len(tiles), size):
                    yield tiles[i:i + size]

        if not self.workers:
            for item in self._blocks():
                for group in runs(item):
                    yield from encode(group)
            return
        pending: deque[Future[list[list[bytes]]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="czreg-zlib") as pool:
            try:
                for item in self._blocks():
                    for group in runs(item):
                        pending.append(pool.submit(encode, group))
                    while len(pending) > self.workers or (pending and pending[0].done()):
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def _planar_tiles(self) -> Iterator[bytes]:
        """The pages of a planar file in file order, from rows that arrive with all classes at once.

        ``tifffile`` writes tiles in file order, and in a planar file a 2D plane's class 1 page follows the
        whole class 0 page. So class 0's tiles go straight to the file, and the encoded tiles of classes
        1.. are appended to one spool file per class beside the output (compressed bytes: ~1/16 of the raw
        plane for a confident uint8 segmentation); when the class 0 page is complete they are read back in
        order. Memory stays at one row block whatever the image height; the disk holds the spools until
        the plane (or, in 3D, the slice) is done. They are removed on close, abort and failure."""
        t = self.spec.chunk
        per_page = math.prod(-(-n // t) for n in self.spec.spatial[-2:])
        self._spools = [p.open("w+b") for p in self.spool_paths]  # closed by _remove_spools
        lengths: list[list[int]] = [[] for _ in self._spools]
        try:
            n = 0
            for pieces in self._tile_pieces():
                yield pieces[0]
                for fh, sizes, piece in zip(self._spools, lengths, pieces[1:]):
                    fh.write(piece)
                    sizes.append(len(piece))
                n += 1
                if n == per_page:
                    n = 0
                    for fh, sizes in zip(self._spools, lengths):
                        fh.seek(0)
                        for size in sizes:
                            yield fh.read(size)
                        fh.seek(0)
                        sizes.clear()
        finally:
            self._remove_spools()

    def _remove_spools(self) -> None:
        """Close and delete the planar spool files (idempotent; also called from ``close``/``abort``, since a
        failed write keeps the generator, and with it its ``finally``, alive in the stored traceback)."""
        spools, self._spools = self._spools, []
        for fh in spools:
            with contextlib.suppress(OSError):
                fh.close()
        for p in self.spool_paths:
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._tw.write(data=self._tiles(), **self._kwargs)
        except BaseException as exc:
            self.error = exc
            # drain so producers never block on a dead consumer
            while True:
                try:
                    if self.queue.get(timeout=0.1) is self._DONE:
                        break
                except queue.Empty:
                    if self.aborted.is_set():
                        break
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def _put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self._failure()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        for _, chunk in self.buffer.push(start, block):
            self._put(chunk)
        if start + block.shape[0] == self.spec.spatial[0]:
            for _, chunk in self.buffer.flush():
                self._put(chunk)

    def close(self) -> None:
        try:
            self._put(self._DONE)
            self._thread.join()
            self._tw.close()
        finally:
            self._remove_spools()
        if self.error is not None:
            raise self._failure()

    def _failure(self) -> BaseException:
        """The writer thread's error: a full disk as ``ENOSPC`` naming the folder (one line at the CLI),
        anything else as a ``RunError``."""
        assert self.error is not None
        return as_disk_full(self.error, str(self.path.parent)) or RunError(
            f"writing the OME-TIFF failed: {self.error}")

    def abort(self) -> None:
        self.aborted.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(self._DONE)
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._tw.close()
        self._remove_spools()


class ArrayWriter:
    """Collects rows into an in-memory array (for images that fit, tests and the smoke test)."""

    def __init__(self, lead_shape: tuple[int, ...], spatial: tuple[int, ...], channels: int,
                 dtype: np.dtype[Any] | type = np.float32) -> None:
        self.lead_shape = lead_shape
        self.array = np.zeros((*lead_shape, *spatial, channels), dtype)

    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        lead = tuple(int(i) for i in np.unravel_index(plane, self.lead_shape)) if self.lead_shape else ()
        key: tuple[Any, ...] = (*lead, slice(start, start + block.shape[0]))
        self.array[key] = block

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
