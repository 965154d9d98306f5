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

**Resume** (``resume``). The output is built in ``.NAME.dask.part`` beside NAME with a manifest (``.czreg/run.json``:
the package's SHA-256, the image's path and content SHA-256, grid, options) and renamed into place when
complete; an existing NAME is refused without ``--force``, as in the single-process run. Each finished block
leaves a marker (``.czreg/blocks/<block>.done``, written by rename after its chunks, which Zarr's local
store also writes by rename), so a run killed at any point, even with SIGKILL, leaves only valid markers;
``--resume`` checks the manifest against the new plan and skips marked blocks. A run that fails before its
first block is written (the cluster does not start, every block fails) removes its part folder.

**Workers** (``worker``) load the model once per process (a cache keyed by the package's SHA-256, checked
against the file on first load) and keep image readers and output arrays open between blocks. ``local:1`` is
one worker thread in the client process that borrows the client's already loaded and audited session (no
second process, no second load; see ``cluster.open_dask_client``).

**Blocks** (``blocks``). The default 2D block edge (``default_block_edge``) is the largest multiple of the
output's shard extent that keeps a block within 256 MiB and still leaves two blocks per worker (one block for
``local:1``): fewer blocks, fewer seam tiles predicted twice, and the OME-Zarr shard layout of the
single-process run.

Where a worker sees several GPUs (``CUDA_VISIBLE_DEVICES=0,1,...``) a LocalCluster worker pins itself to
one of them by its number before loading the model (``local:1`` uses the client's device). A task whose
worker dies is rescheduled by Dask; a block that raises is retried once, and a second failure stops the run
with a ``RunError`` naming the block.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CzregError, RunError, UsageError
from .blocks import DEFAULT_BLOCK_3D, Block, block_tasks, default_block_edge
from .cluster import ClusterStarter, dashboard_link, parse_scheduler, worker_threads
from .resume import (
    OutputTarget,
    check_output,
    create_output,
    discard_unfinished,
    finish_output,
    image_identity,
    markers_folder,
    occupied,
    output_paths,
    planned_block,
    refuse_existing,
    start_part,
)
from .tiling import TileGrid
from .worker import ImageJob, forget_stop, lend_session, release, run_block, stop

__all__ = ["DaskRunResult", "read_output", "run_dask"]

Progress = Callable[[int, int], None]


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


def read_output(path: Path | str) -> np.ndarray:
    """An OME-Zarr output of ``czreg run`` (with or without ``--dask``) as ``(*planes, *spatial, C)``."""
    from .omezarr import read_ome_zarr

    return read_ome_zarr(path)


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
        if not resume and not force and occupied(o):
            raise refuse_existing(o)  # before the model loads; --resume decides in check_output
    pkg, info = open_tileable(package, options.output_kind)
    digest = sha256_file(package)
    starters: list[ClusterStarter] = []  # started by _run_planned once the client's audit has passed
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
                 digest: str, client: Any, starters: list[ClusterStarter], lent: contextlib.ExitStack, *,
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
    threads = worker_threads(client) if client is not None else target_spec if isinstance(target_spec, int) else None

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
            lent.callback(lend_session(run_token, digest, session))
        if client is None:  # the audit passed: start the cluster now, while the client probes and plans
            starters.append(ClusterStarter(scheduler, None if in_process else (
                str(Path(package).resolve()), digest, backend, options.device)))
        nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
        if block and (block < 16 or (block > ZARR_CHUNK and block % ZARR_CHUNK)):
            raise UsageError(f"--block-size {block}: use a multiple of {ZARR_CHUNK} (or 16..{ZARR_CHUNK})")
        if not block and resume:  # a run resumed by other workers keeps the block edge it was planned with
            block = planned_block(outs)
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
            plan = {"package_sha256": digest, "image": image_identity(path), "grid": grid.to_dict(),
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
                create_output(root, layout, dtype, attrs, manifest)

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
    targets = [check_output(final, manifests[i], paths[i], resume, force, notes) for i, final in enumerate(outs)]
    todo: list[Block] = []
    tiles_skipped = blocks_skipped = 0
    for i, target in enumerate(targets):
        jobs[i] = replace(jobs[i], out_array=str(target.root / "0"), markers=str(markers_folder(target.root)))
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
            finish_output(targets[i].root, outs[i], force)
    tiles_run = 0
    loads: dict[int, int] = {}  # per worker process that ran blocks: its loads of the model so far
    dashboard: str | None = None
    workers = 0
    started: list[OutputTarget] = []
    # blocks cancelled on our own LocalCluster stop with it; on a cluster we do not close, one may still be
    # writing its chunks after we return, so its part folder is only removed if nothing was submitted
    own_cluster = client is None and isinstance(parse_scheduler(scheduler), int)
    submitted = False
    try:
        with contextlib.ExitStack() as stack:
            if todo:
                if client is None:
                    if in_process:  # last: drop what the worker thread kept open, once the cluster closed
                        stack.callback(release, jobs)
                        stack.callback(forget_stop, run_token)
                    client = starters[0].get()
                    stack.callback(starters[0].close)
                    if in_process:  # first: a block still running stops at its next tile, so close is quick
                        stack.callback(stop, run_token)
                dashboard = dashboard_link(client)
                if dashboard and on_dashboard is not None:
                    on_dashboard(dashboard)
                workers = len(client.scheduler_info().get("workers", {}))
                # part folders only once the cluster is up: a failed start leaves nothing behind
                for i, target in enumerate(targets):
                    if target.fresh:
                        started.append(target)
                        start_part(target, creators[i])
                submitted = True
                tiles_run = _schedule(client, jobs, todo, paths, progress, total_run,
                                      lambda i: finish_output(targets[i].root, outs[i], force), remaining, loads)
    except BaseException:
        # (after our LocalCluster closed: no worker writes any more) a part folder we started that holds no
        # finished block has nothing for --resume; one with markers is kept (interrupt, a block failing twice)
        for target in started if own_cluster or not submitted else ():
            discard_unfinished(target.part)
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
        f = client.submit(run_block, jobs[b.image], b, key=f"czreg-block-{run_id}-{n}", retries=1, pure=False)
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
