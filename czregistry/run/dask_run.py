"""Tiled runs on a Dask cluster: blocks of whole tiles, OME-Zarr (the single-process run's format) written
block by block, resumable.

``czreg run --dask local:N`` (a LocalCluster of N worker processes) or ``--dask tcp://host:8786`` (an
existing scheduler: dask-jobqueue on SLURM/LSF, ``dask scheduler`` + ``dask worker``) cuts every image
plane into **blocks**: rectangles of the output aligned to its Zarr chunks. Why the output is bit-identical
to the single-process run (``czregistry.run.runner.run``):

* the client plans the tile grid once, exactly as the runner does (``plan_for_model``: probed stride and
  halo, stride-aligned origins), and ships it to the workers; nobody re-plans;
* a block predicts every tile of that grid whose kept region (when blending: valid region) reaches into
  it, in the runner's row-major order, through the runner's own ``TiledPredictor`` on a sub-grid shifted
  to the block; each output pixel therefore comes from the same tile (or, blending, the same weighted sum
  in the same order) as in the single-process run. Tiles on a block seam are predicted by both blocks
  (``tiles_run`` counts them; the redundancy is reported); the backend must give a tile the same result
  whatever else is in its batch, which the tests check for ONNX Runtime;
* each block writes whole shards of the output (``omezarr.OmeZarrLayout``: shards divide the block), and
  no two blocks share a shard file: no locks and no read-modify-write, so workers write straight into the
  store on a shared file system.

**Resume.** The output is built in ``.NAME.dask.part`` beside NAME with a manifest (``.czreg/run.json``:
the package's SHA-256, the image's path and content SHA-256, grid, options) and renamed into place when
complete; an existing NAME is refused without ``--force``, as in the single-process run. Each finished block
leaves a marker (``.czreg/blocks/<block>.done``, written by rename after its chunks, which Zarr's local
store also writes by rename), so a run killed at any point, even with SIGKILL, leaves only valid markers;
``--resume`` checks the manifest against the new plan and skips marked blocks. A run that fails before its
first block is written (the cluster does not start, every block fails) removes its part folder.

**Workers** load the model once per process (a cache keyed by the package's SHA-256, checked against the
file on first load) and keep image readers and output arrays open between blocks. ``local:1`` is one worker
thread in the client process that borrows the client's already loaded and audited session (no second
process, no second load; see ``open_dask_client``).

**Blocks.** The default 2D block edge (``default_block_edge``) is the largest multiple of the output's shard
extent that keeps a block within 256 MiB and still leaves two blocks per worker (one block for ``local:1``):
fewer blocks, fewer seam tiles predicted twice, and the OME-Zarr shard layout of the single-process run.

Where a worker sees several GPUs (``CUDA_VISIBLE_DEVICES=0,1,...``) a LocalCluster worker pins itself to
one of them by its number before loading the model (``local:1`` uses the client's device). A task whose
worker dies is rescheduled by Dask; a block that raises is retried once, and a second failure stops the run
with a ``RunError`` naming the block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CzregError, RunError, UsageError
from .tiling import Span, TileGrid

__all__ = ["BLOCKS_PER_WORKER", "DEFAULT_BLOCK_2D", "DEFAULT_BLOCK_2D_LARGE_OUTPUT", "DEFAULT_BLOCK_3D", "Block",
           "DaskRunResult", "ImageJob", "block_tasks", "content_sha256", "default_block_edge", "max_local_workers",
           "open_dask_client", "output_paths", "parse_scheduler", "read_output", "run_dask", "worker_stats"]

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
_META = ".czreg"
_MANIFEST = "run.json"
_MARKERS = "blocks"
Progress = Callable[[int, int], None]


# --- what travels to the workers ---------------------------------------------------------------------


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


@dataclass
class DaskRunResult:
    outputs: list[dict[str, Any]]
    scheduler: str
    workers: int
    dashboard: str | None
    tiles: int  # tiles of the runner's grid, over all planes and images (what a single process predicts)
    tiles_run: int  # tile predictions made now, seam tiles counted once per block
    tiles_skipped: int  # tile predictions skipped: their blocks were finished by an earlier run
    blocks: int
    blocks_run: int
    blocks_skipped: int
    block_shape: list[int]
    redundancy: float  # block tile predictions / grid tiles (1.0 = no seam tile predicted twice)
    seconds: float  # wall time, including starting the workers and loading the model
    tiles_per_second: float  # tiles_run / seconds
    backend: str
    device: str
    grid: dict[str, Any]
    geometry: dict[str, Any]
    #: loads of the model: the client's one plus, for each worker process that ran blocks, its loads of this
    #: package so far (a reused worker's earlier load counts; ``local:1`` lends the client's session: 1)
    model_loads: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- planning ---------------------------------------------------------------------------------------


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
    import itertools

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


def output_paths(images: Sequence[Path], output: Path) -> list[Path]:
    """One image and ``OUT.zarr``: that; otherwise ``OUT`` is a folder of ``<image stem>.ome.zarr``."""
    if len(images) == 1 and output.name.lower().endswith(".zarr"):
        return [output]
    if output.name.lower().endswith((".tif", ".tiff", ".btf", ".tf8")):
        raise UsageError(f"--dask writes OME-Zarr, not {output.name}",
                         hint="use -o NAME.zarr (one image) or a folder (several images)")
    if output.name.lower().endswith(".zarr"):
        raise UsageError(f"{len(images)} images cannot all go to one Zarr ({output.name})",
                         hint="give a folder with -o; each image gets <name>.ome.zarr in it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder", hint="give a folder or a .zarr path with -o")
    paths: list[Path] = []
    seen: dict[str, Path] = {}
    for img in images:
        stem = img.name
        for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".npy", ".czi", ".png",
                       ".jpg", ".jpeg", ".bmp", ".btf", ".tf8"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if stem in seen:
            raise UsageError(f"{seen[stem]} and {img} would both be written to {stem}.ome.zarr",
                             hint="rename one of the images or run them separately")
        seen[stem] = img
        paths.append(output / f"{stem}.ome.zarr")
    return paths


# --- the output: OME-Zarr, chunk-aligned, with a manifest and block markers ----------------------------


def _create_output(root: Path, layout: Any, dtype: np.dtype[Any], attrs: dict[str, Any],
                   manifest: dict[str, Any]) -> None:
    """Create the OME-Zarr group in the empty folder ``root`` (``omezarr.create_ome_zarr``, the layout the
    single-process run writes). The manifest comes first, so a part folder without one was not started by
    us (we never delete it without ``--force``), and a part with one but no block markers holds nothing to
    resume (it is started afresh)."""
    from .omezarr import create_ome_zarr

    meta = root / _META
    (meta / _MARKERS).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(meta / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    create_ome_zarr(root, layout, dtype, attrs)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / _META / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _markers(root: Path) -> set[str]:
    return {p.name[:-5] for p in (root / _META / _MARKERS).glob("*.done")}


def read_output(path: Path | str) -> np.ndarray:
    """An OME-Zarr output of ``czreg run`` (with or without ``--dask``) as ``(*planes, *spatial, C)``."""
    from .omezarr import read_ome_zarr

    return read_ome_zarr(path)


# --- the workers ------------------------------------------------------------------------------------


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


def _lend_session(run: str, digest: str, session: Any) -> Callable[[], None]:
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


def _release(jobs: Sequence[ImageJob]) -> None:
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


def _warm(package: str, digest: str, backend: str | None, device: str) -> str:
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


def _run_block(job: ImageJob, block: Block) -> dict[str, Any]:
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
    _atomic_write_text(Path(job.markers) / f"{block.key}.done", json.dumps(marker))
    _BLOCKS_DONE += 1
    return {"tiles": grid.n_tiles, "seconds": seconds, "predict_seconds": predictor.predict_seconds,
            "pid": os.getpid(), "loads": _LOADS.get(job.digest, 0)}


# --- the client -------------------------------------------------------------------------------------


def max_local_workers() -> int:
    """The most worker processes ``--dask local:N`` starts: ``max(64, 4 x cores)``.

    A bound against typos (``local:999``, ``local:10000``), not a tuning knob: every worker is a process
    holding its own copy of the model, so hundreds of them exhaust memory and process slots long before they
    add speed. Four per core still covers blocks that wait on slow storage, and the floor of 64 lets one
    command line move between a laptop and a workstation.
    """
    return max(64, 4 * (os.cpu_count() or 1))


def parse_scheduler(scheduler: str) -> int | str:
    """``local`` / ``local:N`` -> the worker count N; an address -> ``tcp://host:port``.

    A ``UsageError`` (exit 2) for anything else, before a model is loaded or any output is written: a worker
    count outside ``1..max_local_workers()``, garbage after ``local:``, an address without a port. Each
    LocalCluster worker runs one thread (one model session, whose backend has its own thread pool), so
    there is no threads field to give.
    """
    spec = scheduler.strip()
    if spec == "local":
        return min(os.cpu_count() or 1, max_local_workers())
    if spec.startswith("local:"):
        top = max_local_workers()
        text = spec.split(":", 1)[1].strip()
        n = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
        if not 1 <= n <= top:
            raise UsageError(f"--dask {scheduler}: give a worker count from 1 to {top}, e.g. local:4",
                             hint=f"each worker is a process with its own copy of the model; {top} is "
                                  f"max(64, 4 x {os.cpu_count() or 1} cores)")
        return n
    if "://" not in spec and ":" not in spec:
        raise UsageError(f"--dask {scheduler}: expected local:N or a scheduler address like tcp://host:8786")
    return spec if "://" in spec else f"tcp://{spec}"


@contextlib.contextmanager
def open_dask_client(scheduler: str, *, timeout: float | None = None) -> Iterator[Any]:
    """``local`` / ``local:N`` (a LocalCluster of N single-threaded worker processes) or a scheduler address.

    ``local:1`` is one worker *thread* in this process (``processes=False``), not a worker process: one
    worker gains nothing from a process of its own (ONNX Runtime, torch and TensorFlow release the GIL while
    predicting and use every core from one session, as Dask recommends threads for such work), but a process
    costs its start, importing the backend there and a second model load (about 1.6 s of a 7-10 s run on
    8192²). ``run_dask`` lends that worker the client's own session (``_lend_session``). ``local:N`` with
    N > 1 keeps processes: one session each, no GIL shared between their Python parts.

    ``timeout``: seconds to start the LocalCluster (default 60) or to reach the scheduler (default Dask's
    ``distributed.comm.timeouts.connect``, 30 s; ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s`` shortens
    it): an address nobody listens on is retried until then.
    """
    target = parse_scheduler(scheduler)
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise UsageError("--dask needs Dask's distributed scheduler",
                         hint="pip install 'czregistry[dask]'") from exc
    if isinstance(target, int):
        local_timeout = 60.0 if timeout is None else timeout
        import importlib.util

        # the dashboard needs bokeh; without it the scheduler would only log a warning
        dashboard = "127.0.0.1:0" if importlib.util.find_spec("bokeh") is not None else None
        # a block that raises is retried once (submit(retries=1)); a task whose worker dies twice fails
        with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                              "distributed.comm.timeouts.connect": f"{int(local_timeout)}s"}):
            # tcp on the loopback for local:1 too: in-process ("inproc") addresses would put the scheduler's
            # HTTP server (health, metrics) on the machine's network address
            cluster = LocalCluster(n_workers=target, threads_per_worker=1, processes=target > 1,
                                   protocol="tcp://", host="127.0.0.1", dashboard_address=dashboard,
                                   silence_logs=logging.CRITICAL)
            try:
                client = Client(cluster, timeout=local_timeout)
            except BaseException:
                cluster.close(timeout=30)
                raise
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close(timeout=30)
            with contextlib.suppress(Exception):
                cluster.close(timeout=30)
        return
    if timeout is None:
        from dask.utils import parse_timedelta

        timeout = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s") or 30)
    try:
        client = Client(target, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise RunError(f"cannot reach the Dask scheduler at {target}: {exc}",
                       hint="is the scheduler running, and is its port open from here?") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=30)


def _worker_threads(client: Any) -> int | None:
    """Worker threads of a running cluster (None when it has none yet or cannot say): the default block
    edge depends on it."""
    try:
        workers = client.scheduler_info().get("workers", {})
        return sum(int(w.get("nthreads", 1)) for w in workers.values()) or None
    except Exception:  # only informs the block edge
        return None


def _dashboard(client: Any) -> str | None:
    try:
        services = client.scheduler_info().get("services", {})
        return str(client.dashboard_link) if "dashboard" in services else None
    except Exception:  # purely informative
        return None


_HASH_CHUNK = 1 << 20


def content_sha256(path: Path | str) -> str:
    """SHA-256 of what a run reads from ``path``: a file's bytes; for a folder (a Zarr store), every regular
    file under it in sorted order of its relative path, each entered as ``path NUL sha256``.

    Streamed in 1 MiB reads (bounded memory whatever the size). ``--resume`` compares it, not size and mtime:
    ``cp`` + ``touch -r`` or ``rsync -t`` give other content the old size and mtime. Folders are walked
    following symbolic links (the reader follows them too), each folder once, so a link loop ends.
    """
    path = Path(path)
    if not path.is_dir():
        return _file_sha256(path)
    h = hashlib.sha256()
    for rel, full in _tree_files(path):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + _file_sha256(full).encode() + b"\n")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UsageError(f"{path} is not a regular file", hint="give an image file or a Zarr folder")
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """Regular files under ``root`` as (relative POSIX path, path), sorted; devices, FIFOs and broken links
    are left out (no reader opens them)."""
    files: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        st = Path(folder).stat()
        if (st.st_dev, st.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in names:
            full = Path(folder, name)
            try:
                if stat.S_ISREG(full.stat().st_mode):
                    files.append((full.relative_to(root).as_posix(), full))
            except OSError:
                continue
    return sorted(files)


def _image_identity(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "sha256": content_sha256(path)}


@dataclass
class _Target:
    """Where one image's output is written, decided before anything is written."""

    final: Path
    part: Path
    root: Path  # where the blocks go: the part folder, or a finished output found by --resume
    done: set[str]  # blocks an earlier run finished
    fresh: bool  # the part folder is (re)created once the cluster is up


def _why_not_resumable(found: dict[str, Any], manifest: dict[str, Any], image: Path) -> str | None:
    """What differs between an earlier run's manifest and this run's plan, in words (None: nothing)."""
    old, new = found.get("plan"), manifest["plan"]
    if old == new:
        return None
    if found.get("format") != manifest["format"] or not isinstance(old, dict):
        return "it was written by another version of czreg run --dask"
    if old.get("package_sha256") != new["package_sha256"]:
        return "the package changed since that run (its SHA-256 differs)"
    was_image = old.get("image")
    was: dict[str, Any] = was_image if isinstance(was_image, dict) else {}
    if was.get("path") != new["image"]["path"]:
        return f"that run read another image ({was.get('path')})"
    if was.get("sha256") != new["image"]["sha256"]:
        return f"the input image {image.name} changed since that run (its content's SHA-256 differs)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"the options differ ({', '.join(keys)})"


def _refuse_existing(final: Path) -> UsageError:
    """The single-process run's answer (``cli._common.refuse_existing_output``), word for word."""
    return UsageError(f"{final} already exists", hint="pass --force to replace it, or choose another -o path")


def _check_output(final: Path, manifest: dict[str, Any], image: Path, resume: bool, force: bool,
                  notes: list[str]) -> _Target:
    """Decide where to write without writing anything: an existing output is refused without ``--force``
    (as the single-process run does); ``--resume`` continues a part folder or finished output whose manifest
    matches this plan and refuses any other, saying what changed. A folder we did not write (no manifest)
    is never chosen for deletion without ``--force``."""
    part = final.parent / f".{final.name}.dask.part"
    fresh = _Target(final, part, part, set(), True)
    found_part = False
    if resume:
        for cand in (part, final):
            if not _exists(cand):
                continue
            found = _read_manifest(cand)
            why = ("it was not written by czreg run --dask" if found is None
                   else _why_not_resumable(found, manifest, image))
            if why is not None:
                if force:
                    notes.append(f"{final.name}: not resumed ({why}); --force: starting afresh")
                    return fresh
                hint = ("remove it, or pass --force to replace it" if found is None
                        else "run without --resume to start afresh, or pass --force" if cand == part
                        else "pass --force to replace it with a fresh run, or choose another -o path")
                raise UsageError(f"cannot resume {cand}: {why}", hint=hint)
            done = _markers(cand)
            if cand == final:
                return _Target(final, part, final, done, False)
            found_part = True
            if done:
                if _exists(final) and not force:
                    raise _refuse_existing(final)
                return _Target(final, part, part, done, False)
            break  # our part folder with no finished block: nothing to keep, start it afresh
        if not found_part:
            notes.append(f"{final.name}: nothing to resume, starting afresh")
    elif _read_manifest(part) is not None and (finished := len(_markers(part))):
        notes.append(f"{final.name}: starting afresh; the {finished} block(s) an interrupted run finished are "
                     "discarded (--resume keeps them)")
    if not force:
        if _exists(final):
            raise _refuse_existing(final)
        if _exists(part) and _read_manifest(part) is None:
            raise UsageError(f"{part} exists but was not written by czreg run --dask",
                             hint="remove it, or pass --force to replace it")
    return fresh


def _start_part(target: _Target, create: Callable[[Path], None]) -> None:
    """(Re)create the part folder: ours (it has a manifest) or replaced under ``--force``."""
    if _exists(target.part):
        _remove(target.part)
    target.part.mkdir(parents=True)
    create(target.part)


def _finish(root: Path, final: Path, force: bool) -> None:
    if root == final:
        return
    if _exists(final):
        if not force:  # appeared during the run: keep both, the result stays resumable in the part folder
            raise _refuse_existing(final)
        _remove(final)
    root.replace(final)


class _ClusterStarter:
    """Starts the cluster (``open_dask_client``) on a thread while the client probes and plans (after its
    audit of the graph has passed), and has every worker load the model as soon as it is up: starting a
    LocalCluster (worker processes importing the backends) and loading the model in each took 3-4 s that
    the single-process run does not pay, and both can overlap with the planning. ``get`` returns the
    client (or raises what starting raised);
    ``close`` closes what was started, whenever it finishes starting."""

    def __init__(self, scheduler: str, warm: tuple[str, str, str | None, str] | None) -> None:
        """``warm``: what ``_warm`` loads on every worker; None for ``local:1``, which borrows the client's
        session (``_lend_session``) and loads nothing."""
        self._cm = open_dask_client(scheduler)
        self._warm = warm
        self.client: Any = None
        self.error: BaseException | None = None
        self._futures: list[Any] = []
        self._thread = threading.Thread(target=self._start, name="czreg-dask-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self.client = self._cm.__enter__()
            warm = self._warm
            for address in self.client.scheduler_info().get("workers", {}) if warm is not None else ():
                self._futures.append(self.client.submit(_warm, *(warm or ()), workers=[address], pure=False,
                                                        key=f"czreg-warm-{uuid.uuid4().hex[:8]}"))
        except BaseException as exc:  # raised by ``get`` on the caller's thread
            self.error = exc

    def get(self) -> Any:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.client

    def close(self) -> None:
        self._thread.join()
        self._futures.clear()
        if self.client is not None:
            self.client = None
            self._cm.__exit__(None, None, None)


def run_dask(package: Path | str, images: Sequence[Path | str], output: Path | str, options: Any = None, *,
             scheduler: str = "local:2", client: Any = None, resume: bool = False, block: int | None = None,
             progress: Progress | None = None, on_plan: Callable[[int], None] | None = None,
             on_dashboard: Callable[[str], None] | None = None, force: bool = False) -> DaskRunResult:
    """Run ``package`` over ``images`` on a Dask cluster; see the module docstring.

    ``client`` (a ``distributed.Client``) is used as is; otherwise one is opened for ``scheduler`` and
    closed afterwards. ``block`` is the block edge in pixels (default: ``default_block_edge`` in 2D, the
    edge of the earlier run when resuming; 256 in 3D). An existing
    output is refused (``UsageError``, as ``czreg run`` without ``--force``) unless ``force``; with
    ``resume``, ``force`` also starts afresh where the earlier run's state does not match this one.
    Nothing is left behind by a run that fails before its first block is written.
    """
    from ..package import sha256_file
    from .plan import RunOptions
    from .runner import open_tileable

    options = options or RunOptions()
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    t_start = time.perf_counter()
    paths = [Path(p) for p in images]
    if not paths:
        raise UsageError("no image given")
    for p in paths:
        if not p.exists():
            raise UsageError(f"image not found: {p}", hint="check the path")
    if client is None:
        parse_scheduler(scheduler)  # a bad --dask value is a usage error before any work
    outs = output_paths(paths, Path(output))
    for p, o in zip(paths, outs):
        if p.resolve() == o.resolve():
            raise UsageError("the output would overwrite the input image", hint="choose another -o path")
        if not resume and not force and _exists(o):
            raise _refuse_existing(o)  # before the model loads; --resume decides in _check_output
    pkg, info = open_tileable(package, options.output_kind)
    digest = sha256_file(package)
    starters: list[_ClusterStarter] = []  # started by _run_planned once the client's audit has passed
    # local:1 lends the client's session to its in-process worker: closed only after the cluster closed
    with contextlib.ExitStack() as lent:
        try:
            return _run_planned(package, paths, outs, options, pkg, info, digest, client, starters, lent,
                                scheduler=scheduler, resume=resume, block=block, progress=progress,
                                on_plan=on_plan, on_dashboard=on_dashboard, force=force, t_start=t_start)
        finally:
            for starter in starters:
                starter.close()


def _run_planned(package: Path | str, paths: list[Path], outs: list[Path], options: Any, pkg: Any, info: Any,
                 digest: str, client: Any, starters: list[_ClusterStarter], lent: contextlib.ExitStack, *,
                 scheduler: str, resume: bool, block: int | None, progress: Progress | None,
                 on_plan: Callable[[int], None] | None, on_dashboard: Callable[[str], None] | None, force: bool,
                 t_start: float) -> DaskRunResult:
    """``run_dask`` once the package is open. Without ``client`` the cluster is started (into ``starters``)
    right after the client's own ``load_session`` has audited the graph, never before: a worker loads the
    model with ``trust_graph=True`` (the client checked that digest), so no worker may start first.

    ``local:1`` (one worker thread in this process, ``open_dask_client``) gets the client's session: it is
    put into the worker cache before the cluster starts and kept open in ``lent`` (closed by ``run_dask``
    after the cluster), so the model is loaded once, as in the single-process run."""
    from ..selection import load_session
    from .adapt import InputAdapter
    from .assemble import out_dtype
    from .omezarr import ZARR_CHUNK, OmeZarrLayout, ome_zarr_attrs
    from .plan import plan_for_model
    from .readers import open_image
    from .tiling import plan_tiles

    bgr, color = info.bgr, info.color_handling  # the input facts, derived once (ModelInfo / InputAdapter)
    notes: list[str] = []
    target_spec = parse_scheduler(scheduler) if client is None else None
    in_process = target_spec == 1  # local:1: a worker thread in this process (open_dask_client)
    run_token = uuid.uuid4().hex
    threads = _worker_threads(client) if client is not None else target_spec if isinstance(target_spec, int) else None

    # --- plan on the client, once: the same grid as the single-process run ---
    jobs: list[ImageJob] = []
    blocks: list[Block] = []
    grids: list[TileGrid] = []
    creators: list[Callable[[Path], None]] = []
    manifests: list[dict[str, Any]] = []
    with contextlib.ExitStack() as planning:
        session = planning.enter_context(load_session(pkg, options.backend, options.device,
                                                      trust_graph=options.trust_graph))
        backend, device = session.backend, session.device
        if in_process:  # lend the session before the worker starts
            lent.push(planning.pop_all())  # closed after the cluster (run_dask), after the lend is taken back
            lent.callback(_lend_session(run_token, digest, session))
        if client is None:  # the audit passed: start the cluster now, while the client probes and plans
            starters.append(_ClusterStarter(scheduler, None if in_process else (
                str(Path(package).resolve()), digest, backend, options.device)))
        nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
        if block and (block < 16 or (block > ZARR_CHUNK and block % ZARR_CHUNK)):
            raise UsageError(f"--block-size {block}: use a multiple of {ZARR_CHUNK} (or 16..{ZARR_CHUNK})")
        if not block and resume:  # a run resumed by other workers keeps the block edge it was planned with
            block = _planned_block(outs)
        geom = None
        grid0: TileGrid | None = None
        in_ch = out_ch = 0
        shapes: list[tuple[str, tuple[int, ...], tuple[int, ...], dict[str, float]]] = []
        in_bytes = 0.0  # bytes per pixel of a block's input: as read, plus a float32 copy where one is made
        for path in paths:
            src = open_image(path, options.axes)
            try:
                lead_axes, lead_shape, spatial = src.layout(nd)
                if grid0 is None:
                    grid, geom, in_ch, out_ch = plan_for_model(session, info, spatial, options, notes)
                    grid0 = grid
                # fail early on channel problems, before any output exists
                lead0 = (0,) * len(lead_shape)
                sample = src.read(lead0, [slice(0, 1)] * nd)
                adapter = InputAdapter.for_model(info, in_ch, options.channels)
                adapter(sample)
                raw_bytes = sample.dtype.itemsize * sample.shape[-1]
                copy = 0 if adapter.passes_raw(sample.dtype, sample.shape[-1]) else 4 * in_ch
                in_bytes = max(in_bytes, raw_bytes + copy)
                shapes.append((lead_axes, tuple(lead_shape), tuple(spatial), dict(src.pixel_size)))
            finally:
                src.close()
        assert geom is not None and grid0 is not None
        kind = options.output_kind
        out_c = 1 if kind == "labels" else out_ch
        dtype = out_dtype(kind, out_ch)
        if block:
            edge = block
        elif nd != 2:
            edge = DEFAULT_BLOCK_3D
        else:
            lead_axes, lead_shape, spatial, _ = shapes[0]
            single = OmeZarrLayout.plan(lead_axes, lead_shape, spatial, out_c)
            unit = max(single.shards[single.axes.index(a)] for a in "YX")
            edge = default_block_edge(
                [(int(np.prod(ls)) if ls else 1, sp) for _, ls, sp, _ in shapes],
                in_bytes + out_c * dtype.itemsize, threads,
                lambda e: all(OmeZarrLayout.plan(la, ls, sp, out_c, e) == OmeZarrLayout.plan(la, ls, sp, out_c)
                              for la, ls, sp, _ in shapes), unit)
        for i, (path, (lead_axes, lead_shape, spatial, pixel_size)) in enumerate(zip(paths, shapes)):
            grid = grid0 if i == 0 else plan_tiles(spatial, grid0.tile, border=grid0.border, step=grid0.step,
                                                   geometry=options.geometry)
            if not pixel_size and info.scaling:
                pixel_size = {ax: v * 1e6 for ax, v in zip("XYZ", info.scaling)}
            layout = OmeZarrLayout.plan(lead_axes, lead_shape, spatial, out_c, edge)
            axes = layout.axes
            n_planes = int(np.prod(lead_shape)) if lead_shape else 1
            plan = {"package_sha256": digest, "image": _image_identity(path), "grid": grid.to_dict(),
                    "lead_shape": list(lead_shape), "spatial": list(spatial), "output_kind": kind,
                    "blend": options.blend, "block": edge, "channels": list(options.channels or []),
                    "axes": options.axes, "dtype": str(dtype), "array_axes": axes,
                    "shards": list(layout.shards)}
            manifest = {"plan": json.loads(json.dumps(plan)), "array_axes": axes, "lead_axes": lead_axes,
                        "spatial": list(spatial), "format": "czregistry dask run 3"}
            attrs = {**ome_zarr_attrs(axes, pixel_size, info.name or ""), "pixel_size_um": pixel_size,
                     "czregistry": {"name": info.name or "", "model_id": info.id or "", "output_kind": kind,
                                    "classes": list(info.classes or []), "axes": axes, "lead_axes": lead_axes}}

            def create(root: Path, layout: OmeZarrLayout = layout, dtype: np.dtype[Any] = dtype,
                       attrs: dict[str, Any] = attrs, manifest: dict[str, Any] = manifest) -> None:
                _create_output(root, layout, dtype, attrs, manifest)

            creators.append(create)
            manifests.append(manifest)
            grids.append(grid)
            jobs.append(ImageJob(
                package=str(Path(package).resolve()), digest=digest, backend=backend, device=options.device,
                image=str(path.resolve()), axes=options.axes, lead_shape=tuple(lead_shape),
                spatial=tuple(spatial), in_channels=in_ch, out_channels=out_ch, select=options.channels,
                color_handling=color, bgr=bgr, batch_size=options.batch_size, blend=options.blend,
                output_kind=kind, array_axes=axes, lead_axes=lead_axes, out_array="", markers="", run=run_token))
            blocks.extend(block_tasks(grid, i, n_planes, edge, options.blend))

    # --- outputs: where to write, decided before anything is written ---
    targets = [_check_output(final, manifests[i], paths[i], resume, force, notes) for i, final in enumerate(outs)]
    todo: list[Block] = []
    tiles_skipped = blocks_skipped = 0
    for i, target in enumerate(targets):
        jobs[i] = replace(jobs[i], out_array=str(target.root / "0"), markers=str(target.root / _META / _MARKERS))
        for b in (b for b in blocks if b.image == i):
            if b.key in target.done:
                tiles_skipped += b.grid.n_tiles
                blocks_skipped += 1
            else:
                todo.append(b)
    total_run = sum(b.grid.n_tiles for b in todo)
    grid_tiles = sum(g.n_tiles * (int(np.prod(j.lead_shape)) if j.lead_shape else 1) for g, j in zip(grids, jobs))
    if on_plan is not None:
        on_plan(total_run)

    # --- schedule ---
    remaining = {i: sum(1 for b in todo if b.image == i) for i in range(len(outs))}
    for i, n in remaining.items():
        if n == 0:
            _finish(targets[i].root, outs[i], force)
    tiles_run = 0
    loads: dict[int, int] = {}  # per worker process that ran blocks: its loads of the model so far
    dashboard: str | None = None
    workers = 0
    started: list[_Target] = []
    # blocks cancelled on our own LocalCluster stop with it; on a cluster we do not close, one may still be
    # writing its chunks after we return, so its part folder is only removed if nothing was submitted
    own_cluster = client is None and isinstance(parse_scheduler(scheduler), int)
    submitted = False
    try:
        with contextlib.ExitStack() as stack:
            if todo:
                if client is None:
                    if in_process:  # last: drop what the worker thread kept open, once the cluster closed
                        stack.callback(_release, jobs)
                        stack.callback(_STOPPED.discard, run_token)
                    client = starters[0].get()
                    stack.callback(starters[0].close)
                    if in_process:  # first: a block still running stops at its next tile, so close is quick
                        stack.callback(_STOPPED.add, run_token)
                dashboard = _dashboard(client)
                if dashboard and on_dashboard is not None:
                    on_dashboard(dashboard)
                workers = len(client.scheduler_info().get("workers", {}))
                # part folders only once the cluster is up: a failed start leaves nothing behind
                for i, target in enumerate(targets):
                    if target.fresh:
                        started.append(target)
                        _start_part(target, creators[i])
                submitted = True
                tiles_run = _schedule(client, jobs, todo, paths, progress, total_run,
                                      lambda i: _finish(targets[i].root, outs[i], force), remaining, loads)
    except BaseException:
        # (after our LocalCluster closed: no worker writes any more) a part folder we started that holds no
        # finished block has nothing for --resume; one with markers is kept (interrupt, a block failing twice)
        for target in started if own_cluster or not submitted else ():
            if _exists(target.part) and not _markers(target.part):
                _remove(target.part)
        raise
    seconds = time.perf_counter() - t_start
    all_tiles = tiles_run + tiles_skipped
    return DaskRunResult(
        outputs=[{"output": str(o), "image": str(p), "tiles": g.n_tiles * (int(np.prod(j.lead_shape))
                                                                          if j.lead_shape else 1),
                  "blocks": sum(1 for b in blocks if b.image == i), "shape": list(_shape_of(m, j)),
                  "axes": j.array_axes, "dtype": m["plan"]["dtype"]}
                 for i, (o, p, g, j, m) in enumerate(zip(outs, paths, grids, jobs, manifests))],
        scheduler=scheduler, workers=workers, dashboard=dashboard,
        tiles=grid_tiles, tiles_run=tiles_run, tiles_skipped=tiles_skipped, blocks=len(blocks),
        blocks_run=len(todo), blocks_skipped=blocks_skipped, block_shape=[edge] * nd,
        redundancy=round(all_tiles / grid_tiles, 3) if grid_tiles else 1.0, seconds=round(seconds, 3),
        tiles_per_second=round(tiles_run / seconds, 2) if seconds else 0.0, backend=backend, device=device,
        grid=grid0.to_dict(), geometry={"stride": list(geom.stride), "halo": list(geom.halo),
                                        "source": geom.source, "global_context": geom.global_context},
        model_loads=1 + sum(loads.values()), notes=notes)


def _planned_block(outs: Sequence[Path]) -> int | None:
    """The block edge an earlier run of these outputs was planned with (its manifest), for ``--resume``
    without ``--block-size``: the default edge depends on the worker count, and resuming on another
    cluster must not be refused for that alone."""
    for final in outs:
        for cand in (final.parent / f".{final.name}.dask.part", final):
            found = _read_manifest(cand)
            plan = found.get("plan") if found else None
            edge = plan.get("block") if isinstance(plan, dict) else None
            if isinstance(edge, int) and not isinstance(edge, bool) and edge >= 16:
                return edge
    return None


def _shape_of(manifest: dict[str, Any], job: ImageJob) -> list[int]:
    return [*job.lead_shape, *job.spatial, 1 if job.output_kind == "labels" else job.out_channels]


def _schedule(client: Any, jobs: list[ImageJob], todo: list[Block], paths: list[Path],
              progress: Progress | None, total: int, finish: Callable[[int], None],
              remaining: dict[int, int], loads: dict[int, int]) -> int:
    """Submit every block (retried once), follow completions, stop on the first block that fails twice.
    ``loads`` collects each worker process's model loads as its blocks report them."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {}
    for n, b in enumerate(todo):
        f = client.submit(_run_block, jobs[b.image], b, key=f"czreg-block-{run_id}-{n}", retries=1, pure=False)
        futures[f.key] = (f, b)
    done_tiles = 0
    try:
        for fut in as_completed([f for f, _ in futures.values()]):
            _, b = futures[fut.key]
            if fut.status != "finished":
                exc = fut.exception()
                what = b.describe(paths[b.image].name)
                msg = exc.message if isinstance(exc, CzregError) else f"{type(exc).__name__}: {exc}"
                raise RunError(f"{what} failed twice: {msg}",
                               hint="finished blocks keep their markers: fix the cause and rerun with --resume")
            res = fut.result()
            done_tiles += int(res["tiles"])
            loads[int(res["pid"])] = max(loads.get(int(res["pid"]), 0), int(res["loads"]))
            if progress is not None:
                progress(done_tiles, total)
            remaining[b.image] -= 1
            if remaining[b.image] == 0:
                finish(b.image)
    except BaseException:
        client.cancel([f for f, _ in futures.values()], force=True)
        raise
    return done_tiles
