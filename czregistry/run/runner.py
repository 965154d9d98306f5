"""Tiled inference: run a package on images far larger than one tile, with bounded memory.

The pipeline has three stages joined by small bounded queues, so the device never waits for the disk:

1. a **reader** thread cuts tiles (``czregistry.run.tiling``) from a lazily read image, scales them to [0, 1],
   maps channels and stacks them into batches of ``batch_size``;
2. the **caller's** thread runs each batch through the model (loaded once with ``load_session``);
3. a **writer** thread places each tile's kept interior into a buffer one tile row high and hands
   completed rows to an incremental writer (OME-TIFF tiles or Zarr chunks).

Tiles are visited row-major, so at any time only a band of about one tile row plus one output chunk row
of the output exists in memory: peak memory depends on the image *width* and the tile size, never on its
height or on the number of planes. Output goes to a temp name beside the target and is renamed into
place only when complete: Ctrl-C or an error leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..backends import Device, Session
from ..errors import BackendError, RunError, UsageError, as_disk_full
from ..metadata import ModelInfo
from ..package import Package
from ..selection import load_session
from .tiling import Geometry, Tile, TileGrid, blend_weights_1d, plan_tiles

__all__ = ["ArrayWriter", "ModelGeometry", "OutputKind", "RowsCallback", "RunOptions", "RunResult", "TiledPredictor",
           "model_geometry", "predict_image", "run"]

OutputKind = Literal["probabilities", "uint8", "labels"]
#: OME-TIFF compression: ``auto`` is zlib for uint8/label outputs (which shrink 10x or more) and none for
#: float32 (zlib shrinks noisy probabilities by ~12% at ~40 MB/s per core: it was the pipeline's bottleneck).
Compression = Literal["auto", "zlib", "none"]
Progress = Callable[[int, int], None]
_DONE = object()
#: Largest input band (one tile row, full width) the reader holds; wider images are read tile by tile.
_MAX_BAND_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RunOptions:
    """What ``czreg run`` lets users choose. ``None`` means: from the package's metadata / measurements."""

    batch_size: int = 4
    #: let the session choose the batch from free device memory (``Session.suggest_batch_size``; GPU
    #: backends), keeping ``batch_size`` where it has no answer. The CLI sets it when --batch-size is not given.
    auto_batch: bool = False
    device: Device = "auto"
    backend: str | None = None
    tile: tuple[int, ...] | None = None
    geometry: Geometry = "stride"
    output_kind: OutputKind = "probabilities"
    compression: Compression = "auto"
    border: int | None = None
    step: int | None = None
    blend: bool = False
    channels: tuple[int, ...] | None = None
    axes: str | None = None
    #: Measure stride and halo by probing the model (a second or so for small models).
    probe: bool = True
    probe_budget: float = 20.0
    #: Run a graph the static audit refuses (``--trust-graph``: your own models only).
    trust_graph: bool = False


@dataclass(frozen=True)
class ModelGeometry:
    """Stride (shift-equivariance step) and halo per spatial axis, and where they came from."""

    stride: tuple[int, ...]
    halo: tuple[int | None, ...]
    source: str
    global_context: bool = False
    notes: tuple[str, ...] = ()


@dataclass
class RunResult:
    output: str
    format: str
    output_kind: str
    shape: list[int]
    dtype: str
    tiles: int
    planes: int
    batch_size: int
    seconds: float  # wall time, including loading and probing the model
    pipeline_seconds: float  # reading, predicting and writing the tiles
    predict_seconds: float  # time inside the backend's predict
    tiles_per_second: float  # tiles / pipeline_seconds (the CLI summary names the time beside each rate)
    backend: str
    device: str
    grid: dict[str, Any]
    geometry: dict[str, Any]
    pixel_size_um: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Busy seconds per pipeline stage (each stage runs in its own thread, so they overlap): ``read``
    #: (cut, scale, batch), ``predict``, ``assemble`` (place interiors), ``convert`` (to the output kind),
    #: ``write`` (hand rows to the writer; for Zarr this includes encoding), ``encode`` (OME-TIFF tile
    #: compression and file writes, in the TIFF writer's own thread). The slowest stage bounds the run.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    compression: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_geometry(session: Session, info: ModelInfo, *, probe: bool = True, time_budget: float = 20.0,
                   max_probe_size: int = 1024) -> ModelGeometry:
    """Measure stride and halo with ``czregistry.probing`` .

    Without a measurement the runner aligns origins to a stride of 1 and trusts the declared border:
    correct for models without pooling, and the smoke test reports any seams that remain.
    """
    nd = info.spatial_ndim or max(1, len(session.signature.inputs[0].shape) - 2)
    if probe:
        from ..probing import measure_invariance

        res = measure_invariance(session, info, max_probe_size=max_probe_size, time_budget=time_budget)
        stride = tuple(int(s or q or 1) for s, q in zip(res.stride, res.step))
        return ModelGeometry(stride, tuple(res.halo), "measured", bool(res.global_context), tuple(res.notes))
    return ModelGeometry((1,) * nd, (None,) * nd, "default (not measured)")


# --- output conversion --------------------------------------------------------------------------------


def _argmax_labels(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
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


def _convert(block: np.ndarray, kind: OutputKind, out: np.ndarray | None = None,
             scratch: np.ndarray | None = None) -> np.ndarray:
    """Turn float32 output rows into what is stored, into ``out`` if given, else into a new array
    (``block`` may be reused by the caller either way). ``scratch``, a float32 array at least
    ``block.size`` long, spares the uint8 conversion its temporary."""
    if kind == "labels":
        return _argmax_labels(block, out)
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


class _Packer:
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
                _convert(block[pos:pos + take], self.kind, self.buf[self.filled:self.filled + take])
            self.convert_seconds += time.perf_counter() - t0
            self.filled += take
            pos += take
            if self.filled == self.buf.shape[0]:
                t0 = time.perf_counter()
                self.write(plane, self.start, self.buf)
                self.write_seconds += time.perf_counter() - t0
                self.start += self.filled
                self.filled, self.buf = 0, None


def _out_dtype(kind: OutputKind, channels: int) -> np.dtype[Any]:
    if kind == "labels":
        return np.dtype(np.uint8 if channels <= 256 else np.uint16)
    return np.dtype(np.uint8 if kind == "uint8" else np.float32)


# --- the assembler ------------------------------------------------------------------------------------


class _Assembler:
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
            dtype = _out_dtype(kind, channels)
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
                _convert(y[tile.local_keep_slices], self.kind, self.acc[dst], self._scratch)  # type: ignore[arg-type]
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


# --- the pipeline -------------------------------------------------------------------------------------


class _Bands:
    """Full-width input bands (one tile row each), prepared one row ahead on a worker thread.

    ``prepare`` (read, reflect at the far edge, scale, map channels) costs about as much as everything
    else the reader does; preparing the next row while the reader cuts the current one into batches
    splits the read stage over two threads. Only the worker touches the image, one band at a time, so
    readers need not be thread-safe. At most two bands exist at once.
    """

    def __init__(self, prepare: Callable[[int, Sequence[int], Sequence[int]], np.ndarray], grid: TileGrid,
                 n_planes: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.prepare, self.grid, self.n_planes = prepare, grid, n_planes
        self.rows = len(grid.axes[0])
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="czreg-band")
        self.pending: dict[tuple[int, int], Any] = {}

    def _load(self, key: tuple[int, int]) -> np.ndarray:
        plane, row = key
        s0 = self.grid.axes[0][row]
        nd = len(self.grid.padded_shape)
        return self.prepare(plane, (s0.origin, *(0,) * (nd - 1)), (s0.origin + s0.size, *self.grid.padded_shape[1:]))

    def get(self, plane: int, row: int) -> np.ndarray:
        key = (plane, row)
        fut = self.pending.get(key)
        if fut is None:
            for f in self.pending.values():
                f.cancel()
            self.pending = {key: self.pool.submit(self._load, key)}
            fut = self.pending[key]
        else:
            for k in [k for k in self.pending if k < key]:
                self.pending.pop(k).cancel()
        nxt = (plane, row + 1) if row + 1 < self.rows else (plane + 1, 0)
        if nxt[0] < self.n_planes and nxt not in self.pending:
            self.pending[nxt] = self.pool.submit(self._load, nxt)
        return np.asarray(fut.result())

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)



TileReader = Callable[[int, Tile], np.ndarray]


class TiledPredictor:
    """Runs ``session`` over ``planes`` x ``grid`` tiles with a reader and a writer thread.

    ``read(plane, tile)`` returns the float32 model input of one tile (a view is fine: it is copied once,
    straight into the batch); ``write(plane, start, block)`` receives finished rows (cropped to the image)
    in order: float32, or, when ``emits_converted``, already in ``output_kind``. ``stage_seconds`` records
    how long each stage was busy.

    Batches are cut into a small ring of reused buffers, allocated as the run first needs them (a buffer
    returns to the ring once its batch has been predicted, so the reader never overwrites one still queued
    or in the model; the ring never holds more than the per-batch buffers it replaced could). With an
    ``output_kind`` other than probabilities and no blending, conversion happens before assembly: on the
    device when the session offers it (``Session.converts_on_device``, e.g. the torch backend's argmax
    before the copy back), else per tile as it is placed; both give exactly the values converting the
    float32 rows gives.
    """

    #: batch buffers in the ring: one being filled, ``_QUEUE`` queued, one in the model
    _QUEUE = 3

    def __init__(self, session: Session, grid: TileGrid, out_channels: int, *, batch_size: int = 4,
                 blend: bool = False, progress: Progress | None = None,
                 output_kind: OutputKind = "probabilities") -> None:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        self.session, self.grid, self.out_channels = session, grid, out_channels
        self.batch_size, self.blend, self.progress = batch_size, blend, progress
        self.output_kind: OutputKind = output_kind
        early = output_kind != "probabilities" and not blend
        #: the session converts to ``output_kind`` on its device before returning
        self.device_converts = early and bool(getattr(session, "converts_on_device", lambda k: False)(output_kind))
        #: ``write`` receives rows in the output kind's values and dtype (else float32)
        self.emits_converted = early
        self.tiles_done = 0
        self.predict_seconds = 0.0
        self.stage_seconds = {"read": 0.0, "predict": 0.0, "assemble": 0.0, "emit": 0.0, "convert": 0.0}

    def run(self, n_planes: int, read: TileReader, write: Callable[[int, int, np.ndarray], None], *,
            scale: float | None = None) -> None:
        """``scale``: ``read`` returns raw integer pixels, divided by ``scale`` (in float32, exactly as
        ``images.scale_to_unit`` does) straight into the batch: one pass over the input instead of
        scaling a float32 band and copying it again."""
        stop = threading.Event()
        divisor = None if scale is None else np.float32(scale)
        q_in: queue.Queue[Any] = queue.Queue(maxsize=self._QUEUE)
        q_out: queue.Queue[Any] = queue.Queue(maxsize=3)
        free: queue.Queue[np.ndarray] = queue.Queue()  # batch buffers back from the model
        errors: list[BaseException] = []
        stages = self.stage_seconds
        clock = time.perf_counter
        total = n_planes * self.grid.n_tiles
        ring = min(self._QUEUE + 2, -(-total // self.batch_size))
        allocated = 0

        def put(q: queue.Queue[Any], item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def take(q: queue.Queue[Any]) -> Any:
            """The next item of ``q``, or None once the run is stopping and ``q`` is empty."""
            while True:
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        return None

        def buffer(shape: tuple[int, ...]) -> np.ndarray | None:
            """A returned buffer if there is one; a new one only while the ring is not yet as deep as the
            run needs: with a model faster than the reader it stays two or three deep."""
            nonlocal allocated
            with contextlib.suppress(queue.Empty):
                return free.get_nowait()
            if allocated < ring:
                allocated += 1
                return np.empty((self.batch_size, *shape), np.float32)
            return take(free)

        def reader() -> None:
            try:
                metas: list[tuple[int, Tile]] = []
                batch: np.ndarray | None = None
                left = total
                busy = 0.0
                for plane in range(n_planes):
                    for tile in self.grid:
                        if stop.is_set():
                            return
                        t0 = clock()
                        x = read(plane, tile)
                        busy += clock() - t0
                        if batch is None:
                            batch = buffer(x.shape)  # waiting for a free buffer is not busy time
                            if batch is None:
                                return
                        t0 = clock()
                        if divisor is None:
                            batch[len(metas)] = x
                        else:
                            np.divide(x, divisor, out=batch[len(metas)], dtype=np.float32)
                        metas.append((plane, tile))
                        busy += clock() - t0
                        if len(metas) == min(self.batch_size, left):
                            stages["read"] = busy
                            left -= len(metas)
                            if not put(q_in, (metas, batch)):
                                return
                            metas, batch = [], None
                stages["read"] = busy
                put(q_in, _DONE)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        def timed_write(plane: int, start: int, block: np.ndarray) -> None:
            t0 = clock()
            write(plane, start, block)
            stages["emit"] += clock() - t0

        assembler = _Assembler(self.grid, self.out_channels, self.blend, timed_write, kind=self.output_kind,
                               converted=self.device_converts)

        def writer() -> None:
            try:
                while True:
                    item = take(q_out)
                    if item is None:
                        return
                    t0 = clock()
                    if item is _DONE:
                        assembler.finish_plane()
                        stages["assemble"] += clock() - t0
                        return
                    metas, ys = item
                    for (plane, tile), y in zip(metas, ys):
                        assembler.add(plane, tile, y)
                    stages["assemble"] += clock() - t0
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=reader, name="czreg-reader", daemon=True),
                   threading.Thread(target=writer, name="czreg-writer", daemon=True)]
        # outputs alive at once: q_out's, the one being assembled, and one spare
        hold = getattr(self.session, "hold_outputs", None)
        if hold is not None:
            hold(q_out.maxsize + 2)
        for t in threads:
            t.start()
        try:
            while True:
                item = take(q_in)
                if item is None:
                    break
                if item is _DONE:
                    put(q_out, _DONE)
                    break
                metas, buf = item
                xs = buf[:len(metas)]
                t0 = clock()
                if self.device_converts:
                    ys = self.session.predict_converted(xs, self.output_kind)
                else:
                    ys = self.session.predict_batch(xs)
                self.predict_seconds += clock() - t0
                self._check_output(xs, ys)
                if np.may_share_memory(ys, buf):  # e.g. an identity model on torch CPU: keep the values
                    ys = ys.copy()
                free.put(buf)
                if not put(q_out, (metas, ys)):
                    break
                self.tiles_done += len(metas)
                if self.progress is not None:
                    self.progress(self.tiles_done, total)
            threads[1].join()
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            if hold is not None:
                hold(0)
            stages["predict"] = self.predict_seconds
            stages["convert"] = assembler.convert_seconds
            stages["assemble"] -= stages["emit"] + assembler.convert_seconds  # both run inside assemble's calls
        if errors:
            exc = errors[0]
            if isinstance(exc, (RunError, UsageError, BackendError)):
                raise exc
            if (disk := as_disk_full(exc)) is not None:  # the CLI answers a full disk in one line
                raise disk
            raise RunError(f"tiled inference failed: {type(exc).__name__}: {exc}") from exc

    def _check_output(self, xs: np.ndarray, ys: np.ndarray) -> None:
        channels = 1 if self.device_converts and self.output_kind == "labels" else self.out_channels
        want = (xs.shape[0], *xs.shape[1:-1], channels)
        if tuple(ys.shape) != want:
            raise RunError(f"the model returned shape {tuple(ys.shape)} for input {tuple(xs.shape)}; tiling "
                           f"needs {want} (output spatial dims equal to the input's)",
                           hint="only segmentation and regression models with image outputs can be tiled")


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


# --- planning ----------------------------------------------------------------------------------------


def _model_facts(session: Session, info: ModelInfo, tile_override: Sequence[int] | None
                 ) -> tuple[tuple[int, ...], int, int]:
    sig = session.signature
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        raise RunError(f"the model has {len(sig.inputs)} inputs and {len(sig.outputs)} outputs; tiling needs "
                       "exactly one of each")
    in_shape = sig.inputs[0].shape
    if in_shape and in_shape[0] is not None and in_shape[0] != 1:
        raise RunError(f"the model's batch dimension is fixed at {in_shape[0]}; CZANN models take batch 1 or a free "
                       "batch", hint="re-export the model with a free (or size 1) batch dimension")
    nd = info.spatial_ndim or len(in_shape) - 2
    graph = tuple(in_shape[1:-1])
    tile = tuple(tile_override) if tile_override else (info.tile or None)
    if tile is None and all(d is not None for d in graph):
        tile = tuple(int(d) for d in graph if d is not None)
    if tile is None:
        raise UsageError("the package declares no tile size", hint="choose one with --tile H W")
    if len(tile) == 1 and nd > 1:
        tile = tile * nd
    if len(tile) != nd:
        raise UsageError(f"--tile needs {nd} numbers for this {nd}D model")
    for d, t in zip(graph, tile):
        if d is not None and d != t:
            raise UsageError(f"the model's graph is fixed to tile {list(graph)}; --tile {list(tile)} cannot be used")
    channels = info.input_channels or (in_shape[-1] if in_shape[-1] is not None else 1)
    out_ch = info.output_channels or sig.outputs[0].shape[-1]
    if out_ch is None:
        raise RunError("the package declares no output channel count and the model does not fix one")
    return tile, int(channels), int(out_ch)


def _borders(info: ModelInfo, geom: ModelGeometry, tile: tuple[int, ...], border: int | None,
             notes: list[str]) -> tuple[int, ...]:
    out = []
    for d, t in enumerate(tile):
        declared = info.border[d] if info.border and d < len(info.border) else 0
        halo = geom.halo[d] if d < len(geom.halo) else None
        stride = geom.stride[d] if d < len(geom.stride) else 1
        cap = (t - stride) // 2
        if border is not None:
            b = border
        elif halo is not None and halo > declared and halo > cap:
            # Seamless tiles are out of reach at this tile size; a border up to the cap would multiply the
            # tiles (16x for a 257 px halo in a 256 px tile) and still leave seams. Keep the declared one.
            b = declared
            notes.append(f"axis {d}: measured halo {halo} px does not fit a {t} px tile (at most {cap} px): keeping "
                         f"the declared border {declared} px, tiles will show seams (--border N trades speed for "
                         "smaller seams; a larger tile removes them)")
        else:
            b = max(declared, halo or 0)
            if halo is not None and halo > declared:
                notes.append(f"axis {d}: measured halo {halo} px exceeds the declared border {declared} px; "
                             f"using {halo} px so tiles join without seams")
        if b > cap:
            notes.append(f"axis {d}: border {b} px does not fit a {t} px tile; using {cap} px (seams possible)")
            b = cap
        out.append(max(0, b))
    return tuple(out)


def plan_for_model(session: Session, info: ModelInfo, spatial: Sequence[int], options: RunOptions,
                   notes: list[str]) -> tuple[TileGrid, ModelGeometry, int, int]:
    """Choose the tile grid for one plane of ``spatial`` size: tile, stride, border, geometry."""
    tile, in_ch, out_ch = _model_facts(session, info, options.tile)
    if session.batch_limit == 1 and options.batch_size > 1:
        notes.append(f"the model's batch is fixed at 1: each batch of {options.batch_size} tiles runs as "
                     f"{options.batch_size} single-tile calls")
    geom = model_geometry(session, info, probe=options.probe, time_budget=options.probe_budget)
    if options.step is not None:
        geom = ModelGeometry((options.step,) * len(tile), geom.halo, "given", geom.global_context, geom.notes)
    if geom.global_context:
        notes.append("the model uses global context (its output depends on the whole tile): tiled output "
                     "will show seams whatever the border")
    border = _borders(info, geom, tile, options.border, notes)
    if len(spatial) != len(tile):
        raise UsageError(f"the image plane has {len(spatial)} spatial dims but the model tiles {len(tile)}")
    grid = plan_tiles(spatial, tile, border=border, step=geom.stride, geometry=options.geometry)
    return grid, geom, in_ch, out_ch


RowsCallback = Callable[[int, np.ndarray], None]


def _padded_region(image: np.ndarray, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
    """``image[starts:stops]`` (all channels) as float32 in [0, 1], positions past the far end reflected;
    a plain slice where the region lies inside. Integer images are scaled as ``czreg run`` scales them."""
    from .images import scale_to_unit
    from .tiling import reflect_indices

    spatial = image.shape[:-1]
    if all(b <= n for b, n in zip(stops, spatial)):
        block = image[tuple(slice(a, b) for a, b in zip(starts, stops))]
    else:
        idx = [reflect_indices(a, b, n) for a, b, n in zip(starts, stops, spatial)]
        block = image[np.ix_(*idx, np.arange(image.shape[-1]))]
    return np.ascontiguousarray(scale_to_unit(block), dtype=np.float32)


def predict_image(session: Session, info: ModelInfo, image: np.ndarray, options: RunOptions | None = None,
                  *, progress: Progress | None = None, geometry: ModelGeometry | None = None,
                  on_rows: RowsCallback | None = None) -> tuple[np.ndarray, TileGrid]:
    """Tiled prediction of one in-memory plane ``(*spatial, C)`` (float32 in [0, 1], or an integer image that
    is scaled band by band as ``czreg run`` scales it).

    Returns the output ``(*spatial, channels)`` as ``options.output_kind`` says (float32 probabilities by
    default; ``labels`` gives the class map ``(*spatial, 1)`` that ``czreg run --output-kind labels`` writes,
    without ever holding the float output of the whole plane) and the grid used. Same pipeline as ``run``,
    reading one tile row (band) at a time. ``on_rows(start, block)`` is called with each finished block of
    output rows (a view of the returned array, in order, on the pipeline's writer thread) while later rows
    are still being inferred: consumers such as ``czreg evaluate`` work on finished rows alongside inference.
    """
    options = options or RunOptions()
    notes: list[str] = []
    if geometry is not None:
        tile, _, out_ch = _model_facts(session, info, options.tile)
        border = _borders(info, geometry, tile, options.border, notes)
        grid = plan_tiles(image.shape[:-1], tile, border=border, step=geometry.stride, geometry=options.geometry)
    else:
        grid, _, _, out_ch = plan_for_model(session, info, image.shape[:-1], options, notes)
    spatial = tuple(image.shape[:-1])
    band_bytes = grid.tile[0] * int(np.prod(grid.padded_shape[1:])) * image.shape[-1] * 4
    band: dict[int, np.ndarray] = {}

    def read(plane: int, tile: Tile) -> np.ndarray:  # a view: the predictor copies it into the batch
        if band_bytes > _MAX_BAND_BYTES:
            return _padded_region(image, tile.origin, [o + s.size for o, s in zip(tile.origin, tile.spans)])
        row = tile.index[0]
        if row not in band:
            band.clear()
            s0 = tile.spans[0]
            band[row] = _padded_region(image, (s0.origin, *(0,) * (len(spatial) - 1)),
                                       (s0.origin + s0.size, *grid.padded_shape[1:]))
        return band[row][(slice(None), *(slice(s.origin, s.origin + s.size) for s in tile.spans[1:]))]

    kind = options.output_kind
    out_c = 1 if kind == "labels" else out_ch
    sink = ArrayWriter((), spatial, out_c, _out_dtype(kind, out_ch))

    def store(plane: int, start: int, block: np.ndarray) -> None:
        sink.write(plane, start, block)
        if on_rows is not None:
            on_rows(start, sink.array[start:start + block.shape[0]])

    write: Callable[[int, int, np.ndarray], None] = store
    if kind != "probabilities":
        write = _Packer(store, kind, max(1, grid.tile[0]), spatial, out_c, _out_dtype(kind, out_ch))
    TiledPredictor(session, grid, out_ch, batch_size=options.batch_size, blend=options.blend,
                   progress=progress).run(1, read, write)
    return sink.array, grid


# --- the command --------------------------------------------------------------------------------------


def open_tileable(package: Path | str, output_kind: OutputKind) -> tuple[Package, ModelInfo]:
    """Open a package that tiled inference can run, or say why not (``UsageError``): only image-to-image
    models tile, and labels need class probabilities. Shared by the single-process and the Dask runs."""
    from ..package import open_package

    pkg = open_package(package)
    info = ModelInfo.from_package(pkg)
    if info.type is not None and not info.is_dense:
        raise UsageError(f"{info.type} models give one result per tile, not an image; czreg run tiles "
                         "segmentation and regression models only")
    if output_kind == "labels" and info.type == "Regression":
        raise UsageError("--output-kind labels needs a segmentation model; this one is a regression model")
    return pkg, info


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_stale_parts(final: Path) -> None:
    """Remove our own temp outputs for ``final`` left by a run that was killed (SIGKILL, power loss): the
    name carries the writer's pid, and a part whose pid no longer runs is stale. Others' files are kept."""
    for part in final.parent.glob(f".{glob_escape(final.name)}.*.part"):
        pid_text = part.name[len(final.name) + 2:-5].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            _remove(part)
        except OSError:  # alive but another user's, or not ours to judge
            continue


@contextlib.contextmanager
def _temp_output(final: Path) -> Iterator[Path]:
    """A temp path beside ``final`` (file or Zarr directory), renamed into place only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_parts(final)
    tmp = final.parent / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            _remove(final)
        tmp.replace(final)
    finally:
        if tmp.exists():
            _remove(tmp)


def run(package: Path | str, image: Path | str, output: Path | str, options: RunOptions | None = None,
        *, progress: Progress | None = None, on_plan: Callable[[int], None] | None = None) -> RunResult:
    """Run ``package`` tiled over ``image`` and write ``output`` (``.ome.tiff``/``.tif`` or ``.zarr``).

    ``on_plan(total_tiles)`` is called once the grid is known (to size a progress bar).
    """
    from .images import InputAdapter, OutputSpec, open_image, open_writer, output_format

    options = options or RunOptions()
    output = Path(output)
    fmt = output_format(output)
    if Path(image).resolve() == output.resolve():
        raise UsageError("the output would overwrite the input image", hint="choose another -o path")
    pkg, info = open_tileable(package, options.output_kind)
    src = open_image(image, options.axes)
    t_start = time.perf_counter()
    try:
        with load_session(pkg, options.backend, options.device, trust_graph=options.trust_graph) as session, \
                contextlib.ExitStack() as stack:
            nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
            lead_axes, lead_shape, spatial = src.layout(nd)
            notes: list[str] = []
            grid, geom, in_ch, out_ch = plan_for_model(session, info, spatial, options, notes)
            n_planes = int(np.prod(lead_shape)) if lead_shape else 1
            adapter = InputAdapter.for_model(info, in_ch, options.channels)

            # 8/16-bit pixels whose channels pass unchanged are scaled by the predictor as it fills the
            # batch (the same float32 division), not here: a float32 band would be written and read again
            scale: float | None = None
            if adapter.passes_raw(src.dtype, src.channels):
                scale = float(np.iinfo(src.dtype).max)

            def prepare(plane: int, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
                lead = tuple(int(i) for i in np.unravel_index(plane, lead_shape)) if lead_shape else ()
                raw = src.read_padded(lead, starts, stops, spatial)
                if scale is not None:
                    return raw
                return adapter(raw)

            # Read a whole tile row (one band) at once when it is small: one call into the reader per row
            # instead of per tile, and each pixel is scaled once.
            band_bytes = grid.tile[0] * int(np.prod(grid.padded_shape[1:])) * max(in_ch, src.channels) * 4
            use_bands = band_bytes <= _MAX_BAND_BYTES
            bands = _Bands(prepare, grid, n_planes)
            stack.callback(bands.close)

            def read(plane: int, tile: Tile) -> np.ndarray:  # a view: the predictor copies it into the batch
                if not use_bands:
                    return prepare(plane, tile.origin, [o + s.size for o, s in zip(tile.origin, tile.spans)])
                rest = tuple(slice(s.origin, s.origin + s.size) for s in tile.spans[1:])
                return bands.get(plane, tile.index[0])[(slice(None), *rest)]

            # fail early on channel problems, before any file exists
            read(0, next(iter(grid)))
            kind = options.output_kind
            out_c = 1 if kind == "labels" else out_ch
            pixel_size = dict(src.pixel_size)
            if not pixel_size and info.scaling:
                pixel_size = {ax: v * 1e6 for ax, v in zip("XYZ", info.scaling)}
            dtype = _out_dtype(kind, out_ch)
            compression = options.compression
            if compression == "auto":
                compression = "none" if dtype == np.float32 else "zlib"
            spec = OutputSpec(lead_axes, lead_shape, spatial, out_c, dtype, pixel_size,
                              {"name": info.name or "", "model_id": info.id or "", "output_kind": kind,
                               "classes": list(info.classes or [])}, compression=compression)
            if on_plan is not None:
                on_plan(n_planes * grid.n_tiles)
            batch_size = options.batch_size
            if options.auto_batch and session.batch_limit is None:
                suggested = session.suggest_batch_size((*grid.tile, in_ch))
                if suggested:
                    batch_size = suggested
                    notes.append(f"batch size {suggested}, chosen from the free memory of {session.device}")
            predictor = TiledPredictor(session, grid, out_ch, batch_size=batch_size, blend=options.blend,
                                       progress=progress, output_kind=kind)
            t_pipe = time.perf_counter()
            with _temp_output(output) as tmp:
                writer = open_writer(tmp, spec, fmt)
                packer = _Packer(writer.write, kind, spec.unit, spatial, out_c, spec.dtype,
                                 converted=predictor.emits_converted)
                try:
                    predictor.run(n_planes, read, packer, scale=scale)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            pipeline = time.perf_counter() - t_pipe
            seconds = time.perf_counter() - t_start
            return RunResult(
                output=str(output), format=fmt, output_kind=kind,
                shape=[*lead_shape, *spatial, out_c], dtype=str(spec.dtype), tiles=predictor.tiles_done,
                planes=n_planes, batch_size=batch_size, seconds=round(seconds, 3),
                pipeline_seconds=round(pipeline, 3), predict_seconds=round(predictor.predict_seconds, 3),
                tiles_per_second=round(predictor.tiles_done / pipeline, 2) if pipeline else 0.0,
                backend=session.backend, device=session.device, grid=grid.to_dict(),
                geometry={"stride": list(geom.stride), "halo": list(geom.halo), "source": geom.source,
                          "global_context": geom.global_context},
                pixel_size_um=pixel_size, notes=notes,
                compression=compression if fmt == "tiff" else "zstd (sharded OME-Zarr)",
                stage_seconds={k: round(v, 3) for k, v in {
                    "read": predictor.stage_seconds["read"], "predict": predictor.predict_seconds,
                    "assemble": predictor.stage_seconds["assemble"],
                    "convert": packer.convert_seconds + predictor.stage_seconds["convert"],
                    "write": packer.write_seconds,
                    "encode": getattr(writer, "busy_seconds", 0.0)}.items()})
    finally:
        src.close()
