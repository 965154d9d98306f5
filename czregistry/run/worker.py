"""The worker side of a Dask run: what travels to a worker (``ImageJob``), what a worker process keeps
between blocks, and computing one block (``run_block``, the task the client submits).

Workers load the model once per process (a cache keyed by the package's SHA-256, checked against the file on
first load) and keep image readers and output arrays open between blocks. ``local:1`` is one worker thread in
the client process that borrows the client's already loaded and audited session (``lend_session``; no second
process, no second load). Dask pickles ``run_block`` and ``warm`` by reference: they stay module-level here.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RunError
from .blocks import Block
from .resume import write_marker

__all__ = ["ImageJob", "forget_stop", "lend_session", "release", "run_block", "stop", "warm", "worker_stats"]


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker needs to compute any block of one image (small and picklable)."""

    package: str
    digest: str
    backend: str
    device: str
    image: str
    axes: str | None
    lead_shape: tuple[int, ...]
    spatial: tuple[int, ...]
    in_channels: int
    out_channels: int
    select: tuple[int, ...] | None
    color_handling: str | None
    bgr: bool
    batch_size: int
    blend: bool
    output_kind: str
    array_axes: str  # axis letters of the output array, e.g. "TCYX"
    lead_axes: str
    out_array: str  # path of the Zarr array "0" inside the output group
    markers: str  # folder of the block markers
    run: str = ""  # this run's token: an in-process worker stops its block when the run is stopped

    def adapter(self) -> Any:
        """The package's ``InputAdapter`` (the same one ``czreg run`` uses in one process)."""
        from .adapt import InputAdapter

        return InputAdapter(self.in_channels, self.bgr, self.color_handling, self.select)


_LOCK = threading.Lock()
_SESSIONS: dict[tuple[str, str, str], Any] = {}
_SOURCES: dict[tuple[str, str | None], Any] = {}
_ARRAYS: dict[str, Any] = {}
#: Per worker process: model loads per package digest and blocks computed (``worker_stats``).
_LOADS: dict[str, int] = {}
_BLOCKS_DONE = 0
#: Per process: sessions lent by a client to its in-process worker (``local:1``), per package digest.
_LENT: dict[str, int] = {}
#: The lent sessions by run token (``ImageJob.run``): looked up before the worker's own cache.
_LENT_BY_RUN: dict[str, Any] = {}
#: Tokens of in-process runs that were stopped (interrupt, a block failing twice): their running block
#: stops at its next tile, so closing the cluster does not wait for it to finish.
_STOPPED: set[str] = set()


def worker_stats() -> dict[str, Any]:
    """This process's model loads per package digest, sessions lent to it by an in-process client
    (``local:1``) and blocks computed (``client.run(worker_stats)``)."""
    return {"pid": os.getpid(), "loads": dict(_LOADS), "lent": dict(_LENT), "blocks": _BLOCKS_DONE}


def stop(run: str) -> None:
    """Stop the in-process run ``run`` (interrupt, a block failing twice): its running block stops at its
    next tile, so closing the cluster does not wait for it to finish."""
    _STOPPED.add(run)


def forget_stop(run: str) -> None:
    """Forget that ``run`` was stopped (once its cluster closed)."""
    _STOPPED.discard(run)


def lend_session(run: str, digest: str, session: Any) -> Callable[[], None]:
    """Lend the client's session to its in-process worker (``local:1``), so that worker predicts with it
    instead of loading the model a second time (the client loaded and audited it already). Keyed by the
    run's token, not only by digest as the worker cache is: two runs of one package in one process (threads
    of a library user) each predict with their own session, and neither closes the other's. Returns the
    function that takes it back; call it only once no block can still run (after the cluster closed), and
    close the session after that."""
    with _LOCK:
        _LENT_BY_RUN[run] = session
        _LENT[digest] = _LENT.get(digest, 0) + 1

    def take_back() -> None:
        with _LOCK:
            _LENT_BY_RUN.pop(run, None)

    return take_back


def release(jobs: Sequence[ImageJob]) -> None:
    """Close the image readers and drop the output writers an in-process worker kept open for ``jobs``: the
    client process lives on after the run (a worker process would have ended with its cluster)."""
    with _LOCK:
        for job in jobs:
            src = _SOURCES.pop((job.image, job.axes), None)
            if src is not None:
                with contextlib.suppress(Exception):
                    src.close()
            _ARRAYS.pop(job.out_array, None)


def _pin_gpu(device: str) -> None:
    """On a LocalCluster worker that sees several GPUs, keep one (worker number modulo GPU count).

    Only effective before the backend initialises CUDA in this process, i.e. before the first load.
    """
    if device == "cpu":
        return
    ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(ids) < 2:
        return
    try:
        from distributed import get_worker

        number = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[number % len(ids)]


def _load(package: str, digest: str, backend: str | None, device: str) -> Any:
    """This worker's session for ``digest`` (loaded once per process, checked against the file first)."""
    from ..package import open_package, sha256_file
    from ..selection import load_session

    with _LOCK:
        for (d, b, dev), session in _SESSIONS.items():
            if d == digest and dev == device and backend in (None, b):
                return session
        if sha256_file(package) != digest:
            raise RunError(f"{package} changed since the run was planned (SHA-256 differs)",
                           hint="do not replace the package during a run")
        if not _SESSIONS:
            _pin_gpu(device)
        # the client audited this exact digest (or was told to trust it) before planning: not again per worker
        session = load_session(open_package(package), backend, device, trust_graph=True)  # type: ignore[arg-type]
        _SESSIONS[(digest, session.backend, device)] = session
        _LOADS[digest] = _LOADS.get(digest, 0) + 1
        return session


def _session(job: ImageJob) -> Any:
    lent = _LENT_BY_RUN.get(job.run) if job.run else None
    return lent if lent is not None else _load(job.package, job.digest, job.backend, job.device)


def warm(package: str, digest: str, backend: str | None, device: str) -> str:
    """Load the model on a worker while the client still probes and plans (``client.run`` on every worker):
    the first block then starts predicting at once. A failure here is left for the block to report."""
    try:
        return str(_load(package, digest, backend, device).backend)
    except Exception:  # the block that needs the model raises it again, with the block named
        return ""


def _source(job: ImageJob) -> Any:
    from .readers import open_image

    key = (job.image, job.axes)
    with _LOCK:
        if key not in _SOURCES:
            if len(_SOURCES) >= 4:  # a screen of many files: keep a few open
                old = _SOURCES.pop(next(iter(_SOURCES)))
                old.close()
            _SOURCES[key] = open_image(job.image, job.axes)
        return _SOURCES[key]


def _out_array(job: ImageJob) -> Any:
    """The output's shard writer (``omezarr.OmeZarrShards``), kept open between blocks."""
    import zarr

    from .omezarr import OmeZarrLayout, OmeZarrShards

    with _LOCK:
        if job.out_array not in _ARRAYS:
            if len(_ARRAYS) >= 16:
                _ARRAYS.pop(next(iter(_ARRAYS)))
            array = zarr.open_array(job.out_array, mode="r+")
            layout = OmeZarrLayout(job.array_axes, job.lead_axes, tuple(array.shape), tuple(array.chunks),
                                   tuple(array.shards or array.chunks))
            _ARRAYS[job.out_array] = OmeZarrShards(array, layout)
        return _ARRAYS[job.out_array]


def run_block(job: ImageJob, block: Block) -> dict[str, Any]:
    """Predict one block with the runner's ``TiledPredictor``, write its chunks, then its marker."""
    global _BLOCKS_DONE
    from .assemble import convert_output, out_dtype
    from .pipeline import TiledPredictor
    from .writers import ArrayWriter

    t0 = time.perf_counter()
    session = _session(job)
    src = _source(job)
    lead = tuple(int(i) for i in np.unravel_index(block.plane, job.lead_shape)) if job.lead_shape else ()
    grid = block.grid
    # one read for the whole block: the union of its tiles, reflected past the far end like the runner's
    raw = src.read_padded(lead, block.offset, [o + n for o, n in zip(block.offset, grid.padded_shape)],
                          job.spatial)
    adapter = job.adapter()
    # as in the runner: 8/16-bit pixels that need only scaling are divided into the batch by the predictor
    # (the same float32 division), instead of a float32 copy of the whole block written and read again
    scale = float(np.iinfo(raw.dtype).max) if adapter.passes_raw(raw.dtype, raw.shape[-1]) else None
    x = raw if scale is not None else adapter(raw)

    stop = job.run

    def read(_plane: int, tile: Any) -> np.ndarray:
        if stop in _STOPPED:  # only an in-process worker sees its client's stop (a process worker is ended)
            raise RunError("the run was stopped")
        return x[tile.read_slices]

    kind = job.output_kind
    predictor = TiledPredictor(session, grid, job.out_channels, batch_size=job.batch_size, blend=job.blend,
                               output_kind=kind)  # type: ignore[arg-type]
    if predictor.emits_converted:  # tiles converted as they are placed, as in the runner
        out_c = 1 if kind == "labels" else job.out_channels
        sink = ArrayWriter((), grid.padded_shape, out_c, out_dtype(kind, job.out_channels))  # type: ignore[arg-type]
    else:
        sink = ArrayWriter((), grid.padded_shape, job.out_channels)
    # the block's region is on the shard grid (shards divide the block): whole shard files, no sharing.
    # Each shard row is written as soon as its rows are assembled, on the predictor's writer thread, while
    # later tiles are still predicted (writing the whole block afterwards left the cores idle meanwhile).
    shards = _out_array(job)
    converted = predictor.emits_converted or kind == "probabilities"
    (r0, r1), rest = block.region[0], block.region[1:]
    o0 = block.offset[0]
    unit = shards.layout.shards[shards.layout.axes.index("ZYX"[-len(block.region)])]
    written = r0  # image rows of the region written so far

    def write(plane: int, start: int, rows: np.ndarray) -> None:
        nonlocal written
        sink.write(plane, start, rows)
        ready = min(r1, o0 + start + rows.shape[0])
        while written < r1 and (written + unit <= ready or ready == r1):
            stop = min(written + unit, r1)
            part = sink.array[(slice(written - o0, stop - o0),
                               *(slice(s - o, e - o) for (s, e), o in zip(rest, block.offset[1:])))]
            data = part if converted else convert_output(part, kind)  # type: ignore[arg-type]
            origin = shards.layout.origin(lead, [written, *(s for s, _ in rest)])
            for coords, piece in shards.split(origin, shards.layout.to_array(data)):
                shards.write(coords, piece)
            written = stop

    predictor.run(1, read, write, scale=scale)
    if written < r1:
        raise RunError(f"internal error: block rows {written}:{r1} were not written")
    seconds = time.perf_counter() - t0
    marker = {"tiles": grid.n_tiles, "seconds": round(seconds, 3), "pid": os.getpid(),
              "predict_seconds": round(predictor.predict_seconds, 3)}
    write_marker(job.markers, block.key, marker)
    _BLOCKS_DONE += 1
    return {"tiles": grid.n_tiles, "seconds": seconds, "predict_seconds": predictor.predict_seconds,
            "pid": os.getpid(), "loads": _LOADS.get(job.digest, 0)}
