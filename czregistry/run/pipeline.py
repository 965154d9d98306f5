"""The tiled pipeline: three stages joined by small bounded queues, so the device never waits for the disk.

1. a **reader** thread cuts tiles (``czregistry.run.tiling``) from a lazily read image, scales them to [0, 1],
   maps channels and stacks them into batches of ``batch_size``;
2. the **caller's** thread runs each batch through the model (loaded once with ``load_session``);
3. a **writer** thread places each tile's kept interior into a buffer one tile row high
   (``czregistry.run.assemble``) and hands completed rows to an incremental writer.

Tiles are visited row-major, so at any time only a band of about one tile row plus one output chunk row
of the output exists in memory. ``predict_image`` runs the same pipeline over one in-memory plane.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends import Session
from ..errors import BackendError, RunError, UsageError, as_disk_full
from ..metadata import ModelInfo
from .assemble import Assembler, Packer, out_dtype
from .plan import ModelGeometry, OutputKind, RunOptions, model_facts, plan_for_model, tile_borders
from .tiling import Tile, TileGrid, plan_tiles
from .writers import ArrayWriter

__all__ = ["MAX_BAND_BYTES", "Bands", "Progress", "RowsCallback", "TileReader", "TiledPredictor", "predict_image"]

Progress = Callable[[int, int], None]
_DONE = object()
#: Largest input band (one tile row, full width) the reader holds; wider images are read tile by tile.
MAX_BAND_BYTES = 64 * 1024 * 1024


# --- the pipeline -------------------------------------------------------------------------------------


class Bands:
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
        ``adapt.scale_to_unit`` does) straight into the batch: one pass over the input instead of
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

        assembler = Assembler(self.grid, self.out_channels, self.blend, timed_write, kind=self.output_kind,
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



RowsCallback = Callable[[int, np.ndarray], None]


def _padded_region(image: np.ndarray, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
    """``image[starts:stops]`` (all channels) as float32 in [0, 1], positions past the far end reflected;
    a plain slice where the region lies inside. Integer images are scaled as ``czreg run`` scales them."""
    from .adapt import scale_to_unit
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
        tile, _, out_ch = model_facts(session, info, options.tile)
        border = tile_borders(info, geometry, tile, options.border, notes)
        grid = plan_tiles(image.shape[:-1], tile, border=border, step=geometry.stride, geometry=options.geometry)
    else:
        grid, _, _, out_ch = plan_for_model(session, info, image.shape[:-1], options, notes)
    spatial = tuple(image.shape[:-1])
    band_bytes = grid.tile[0] * int(np.prod(grid.padded_shape[1:])) * image.shape[-1] * 4
    band: dict[int, np.ndarray] = {}

    def read(plane: int, tile: Tile) -> np.ndarray:  # a view: the predictor copies it into the batch
        if band_bytes > MAX_BAND_BYTES:
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
    sink = ArrayWriter((), spatial, out_c, out_dtype(kind, out_ch))

    def store(plane: int, start: int, block: np.ndarray) -> None:
        sink.write(plane, start, block)
        if on_rows is not None:
            on_rows(start, sink.array[start:start + block.shape[0]])

    write: Callable[[int, int, np.ndarray], None] = store
    if kind != "probabilities":
        write = Packer(store, kind, max(1, grid.tile[0]), spatial, out_c, out_dtype(kind, out_ch))
    TiledPredictor(session, grid, out_ch, batch_size=options.batch_size, blend=options.blend,
                   progress=progress).run(1, read, write)
    return sink.array, grid
