"""The smoke test: does a package run tiled, on the best device here, without seams?

It runs the real tiled pipeline (``czregistry.run.runner``), at the declared border as the host tiles, on an
image covering several tiles in each direction (validate's seeded probe image, or one the user gives), checks
the output's shape, finiteness and value semantics (segmentation: probabilities summing to 1), and compares the
tiled output with whole-image prediction where the model accepts the whole image (fixed-size graphs: with tiles
centred on the cuts, as validate does): the largest difference is the **seam error**. Timing of
the tiled run gives the throughput. The verdict is a ``Report`` like every other check's, so the registry
stores it next to the version (``publish --smoke``).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends import Device, Session
from ..errors import CzregError, UnsafeGraphError
from ..metadata import ModelInfo
from ..probing import SEED, centred_origin, probe_image, seam_band, seam_limit
from ..report import Finding, Report
from ..selection import load_session

if TYPE_CHECKING:
    from ..package import PackageSnapshot

__all__ = ["smoke_test", "synthetic_image"]

#: Largest image (pixels per plane) the smoke test predicts whole for the seam comparison.
MAX_WHOLE_PIXELS = 4 * 1024 * 1024


def synthetic_image(shape: tuple[int, ...], channels: int, seed: int = 0) -> np.ndarray:
    """A seeded image in [0, 1] with structure at several scales (blobs, stripes and noise), so that
    seams are visible to a model, shape ``(*shape, channels)``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(0, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    out = np.zeros((*shape, channels), np.float32)
    for c in range(channels):
        acc = np.zeros(shape, np.float32)
        for _ in range(6):
            freq = rng.uniform(2, 12, size=len(shape)).astype(np.float32)
            phase = rng.uniform(0, 2 * math.pi)
            acc += np.sin(sum(f * g * 2 * math.pi for f, g in zip(freq, grids)) + phase)
        acc = (acc - acc.min()) / max(float(acc.max() - acc.min()), 1e-6)
        out[..., c] = 0.7 * acc + 0.3 * rng.random(shape, dtype=np.float32)
    return out


def _load_given(image: Path | str, info: ModelInfo, spatial_ndim: int, channels: int, max_pixels: int) -> np.ndarray:
    """A corner of the given image as model input, through the same ``InputAdapter`` as ``czreg run`` (legacy BGR
    order, ``ColorHandling``, 8/16-bit scaling), so the smoke test checks the input the package will be run on."""
    from .adapt import InputAdapter
    from .readers import open_image

    src = open_image(image)
    try:
        _, lead_shape, spatial = src.layout(spatial_ndim)
        # a corner of the first plane, at most max_pixels large
        side = int(max_pixels ** (1 / spatial_ndim))
        region = [slice(0, min(n, side)) for n in spatial]
        raw = src.read((0,) * len(lead_shape), region)
        return InputAdapter.for_model(info, channels)(raw)
    finally:
        src.close()


def _semantics(report: Report, info: ModelInfo, out: np.ndarray) -> None:
    if info.is_segmentation:
        lo, hi = float(out.min()), float(out.max())
        sums = out.sum(axis=-1)
        dev = float(np.abs(sums - 1).max())
        report.measurements["smoke.probability_sum_error"] = dev
        if lo < -1e-4 or hi > 1 + 1e-4 or dev > 1e-3:
            report.add(Finding.error(
                "smoke.value_semantics",
                f"segmentation output is not class probabilities: values in [{lo:.3g}, {hi:.3g}], sums off "
                f"by up to {dev:.3g}",
                hint="end the network with a softmax over the class axis"))
        else:
            report.add(Finding.info("smoke.value_semantics", "output holds class probabilities summing to 1"))
    else:
        lo, hi = float(out.min()), float(out.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            report.add(Finding.warning(
                "smoke.value_semantics", f"image output leaves [0, 1]: values in [{lo:.3g}, {hi:.3g}]",
                hint="hosts expect float32 outputs scaled to [0, 1]"))
        else:
            report.add(Finding.info("smoke.value_semantics", f"output in [0, 1] (values {lo:.3g} .. {hi:.3g})"))


def smoke_test(path: Path | str | PackageSnapshot, *, image: Path | str | None = None, backend: str | None = None,
               device: Device = "auto", tile: tuple[int, ...] | None = None, batch_size: int = 4,
               tiles_per_axis: float = 2.5, seed: int = 0, max_whole_pixels: int = MAX_WHOLE_PIXELS,
               probe_budget: float = 20.0, trust_graph: bool = False, session: Session | None = None) -> Report:
    """Run ``path`` tiled and report shape, finiteness, value semantics, seam error and throughput.

    Never raises for problems of the package: they become error findings (``smoke.*``; a graph the static
    audit refuses is ``model.graph.unsafe_ops`` and nothing runs, unless ``trust_graph``).

    ``path`` may be a ``PackageSnapshot`` (admission's one read of the file), and ``session`` a session of its
    model that validation already loaded through ``load_session`` (so the audit passed); it is borrowed, not
    closed, and the model is not loaded again."""
    from ..package import PackageSnapshot

    if isinstance(path, PackageSnapshot):
        return _smoke(path, image, backend, device, tile, batch_size, tiles_per_axis, seed, max_whole_pixels,
                      probe_budget, trust_graph, session)
    try:
        snapshot = PackageSnapshot.read(path)
    except CzregError as exc:
        report = Report(path=str(path))
        report.add(Finding.error("smoke.package", exc.message, hint=exc.hint))
        return report
    with snapshot:
        return _smoke(snapshot, image, backend, device, tile, batch_size, tiles_per_axis, seed, max_whole_pixels,
                      probe_budget, trust_graph, session)


def _smoke(snapshot: PackageSnapshot, image: Path | str | None, backend: str | None, device: Device,
           tile: tuple[int, ...] | None, batch_size: int, tiles_per_axis: float, seed: int, max_whole_pixels: int,
           probe_budget: float, trust_graph: bool, borrowed: Session | None) -> Report:
    from ..package import open_package
    from .pipeline import predict_image
    from .plan import ModelGeometry, RunOptions, model_geometry, plan_for_model

    report = Report(path=str(snapshot.path))
    meas = report.measurements
    try:
        pkg = open_package(snapshot)
    except CzregError as exc:
        report.add(Finding.error("smoke.package", exc.message, hint=exc.hint))
        return report
    report.format, report.sha256 = pkg.kind, snapshot.sha256
    info = ModelInfo.from_package(pkg)
    if info.type is not None and not info.is_dense:
        report.add(Finding.info("smoke.not_tiled", f"{info.type} models give one result per tile; no tiling "
                                                   "to test"))
        return report
    if borrowed is not None:
        session = borrowed
    else:
        try:
            session = load_session(pkg, backend, device, trust_graph=trust_graph)
        except UnsafeGraphError as exc:
            report.add(Finding.error("model.graph.unsafe_ops", exc.message, hint=exc.hint))
            if exc.audit is not None:
                meas["graph_audit"] = exc.audit
            return report
        except CzregError as exc:
            report.add(Finding.error("smoke.load", exc.message, hint=exc.hint))
            return report
    with session if borrowed is None else contextlib.nullcontext(session):
        meas["smoke.backend"], meas["smoke.device"] = session.backend, session.device
        try:
            geom = model_geometry(session, info, time_budget=probe_budget)
            options = RunOptions(batch_size=batch_size, tile=tile, device=device, backend=backend,
                                 trust_graph=trust_graph)
            nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
            # plan once on a dummy size to learn tile and channels
            probe_grid, _, in_ch, out_ch = plan_for_model(session, info, (1,) * nd, options, [])
            t = probe_grid.tile
            if image is not None:
                img = _load_given(image, info, nd, in_ch, max_whole_pixels)
                meas["smoke.image"] = str(image)
            else:
                # tiles that meet at exactly the declared overlap (on the stride grid), the worst case the host
                # can cut and the overlap validate measures at; a larger one where the overlap leaves no step
                n = max(2, math.ceil(tiles_per_axis))
                borders = info.border if info.border and len(info.border) == len(t) else (0,) * len(t)
                declared = [2 * b for b in borders]
                shape = tuple(t_ + (n - 1) * ((t_ - o) // s * s) if (t_ - o) // s * s > 0
                              else max(t_ * 2, math.ceil(t_ * tiles_per_axis / s) * s)
                              for t_, o, s in zip(t, declared, geom.stride))
                # validate's probe image (seed 0: the very pixels its seam measurement saw), so the two agree
                img = probe_image(shape, in_ch, SEED + seed)
                meas["smoke.image"] = f"probe image {list(shape)} (seed {seed})"
            # Tile as the host does: at the declared border (MinOverlap / 2, BorderSize) on the stride grid. The
            # runner would widen the border to the measured halo, hiding the seams ZEN shows; validate measures
            # at the declared overlap too, so the two agree on the same package.
            host = ModelGeometry(geom.stride, (None,) * len(geom.stride), "declared border (as the host tiles)",
                                 geom.global_context, geom.notes)
            t0 = time.perf_counter()
            try:
                out, grid = predict_image(session, info, img, options, geometry=host)
            except CzregError as exc:
                if options.batch_size <= 1:
                    raise
                # A graph traced at batch 1 (a window partition reshaped with constant dims) claims a free batch
                # but fails at another one; validate probes one tile at a time, so it never sees that. Say so
                # and go on at batch 1, so the seams are still measured as validate measures them.
                options = RunOptions(batch_size=1, tile=tile, device=device, backend=backend,
                                     trust_graph=trust_graph)
                t0 = time.perf_counter()  # timed at batch 1 only
                out, grid = predict_image(session, info, img, options, geometry=host)
                report.add(Finding.warning(
                    "smoke.batch", f"the graph fails at batch {batch_size} but runs at batch 1 "
                                  f"({exc.message.split(':', 1)[0][:160]})",
                    hint="run it with --batch-size 1, and re-export it with the batch dim fixed at 1 so hosts "
                         "know"))
            seconds = time.perf_counter() - t0
        except CzregError as exc:
            report.add(Finding.error("smoke.run", f"tiled run failed: {exc.message}", hint=exc.hint))
            return report
        spatial = img.shape[:-1]
        meas.update({
            "smoke.image_shape": list(img.shape), "smoke.grid": grid.to_dict(),
            "smoke.stride": list(geom.stride), "smoke.halo": list(geom.halo), "smoke.tiles": grid.n_tiles,
            "smoke.border": list(grid.border),
            "smoke.seconds": round(seconds, 4),
            "smoke.tiles_per_second": round(grid.n_tiles / seconds, 2) if seconds else None,
            "smoke.megapixels_per_second": round(math.prod(spatial) / seconds / 1e6, 3) if seconds else None,
        })
        if out.shape != (*spatial, out_ch):
            report.add(Finding.error("smoke.shape", f"tiled output has shape {list(out.shape)}, expected "
                                                    f"{[*spatial, out_ch]}"))
            return report
        report.add(Finding.info("smoke.shape", f"output shape {list(out.shape)} from {grid.n_tiles} tiles "
                                               f"({'x'.join(map(str, grid.counts))}) on {session.device}"))
        bad = int((~np.isfinite(out)).sum())
        if bad:
            report.add(Finding.error("smoke.finite", f"{bad} output values are NaN or infinite",
                                     hint="check the model's numerics (e.g. a division or log without epsilon)"))
            return report
        _semantics(report, info, out)
        _compare_whole(report, session, img, out, grid, max_whole_pixels, geom.global_context,
                       tuple(geom.stride))
    return report


def _compare_fixed_tiles(report: Report, session: Any, img: np.ndarray, out: np.ndarray, grid: Any,
                         stride: tuple[int, ...], global_context: bool, max_cuts: int = 6,
                         refused: bool = False) -> None:
    """Seams of a model whose graph has a fixed tile size, where no whole-image prediction exists.

    At each cut between neighbouring tiles (up to ``max_cuts`` per axis) one more tile of the fixed size
    is predicted, centred on the cut and on the model's stride grid: near its centre it sees what the whole
    image would show there, so across the cut the stitched output must equal it. The largest difference
    is the seam error: zero when the border covers the model's context, the size of the seam otherwise.
    ``czregistry.probing`` (validate) measures seams of such graphs with the same geometry (``centred_origin``,
    ``seam_band``), so the two agree. ``refused``: the graph claims free dims but refused the whole image."""
    meas = report.measurements
    tile, border = tuple(grid.tile), tuple(grid.border)
    fixed = (f"the graph claims free spatial dims but runs only at its tile {list(tile)} (it refused the whole "
             "image)" if refused else f"the model's graph has a fixed tile size {list(tile)}")
    spatial = out.shape[:-1]
    if any(n < t for n, t in zip(spatial, tile)):
        report.add(Finding.info("smoke.seams", f"{fixed}, larger than the image {list(spatial)}: no seams to "
                                               "compare"))
        return
    worst, worst_at, lo, hi, cuts = 0.0, None, math.inf, -math.inf, 0
    for k, spans in enumerate(grid.axes):
        s = max(1, stride[k] if k < len(stride) else 1)
        for left in [sp for sp in spans[:-1] if sp.keep_stop < spatial[k]][:max_cuts]:
            cut = left.keep_stop
            origin = centred_origin(cut, tile[k], s, left.origin)  # on the stride grid, as validate's probe
            origin = min(max(origin, 0), (spatial[k] - tile[k]) // s * s)
            if not origin + tile[k] // 4 <= cut <= origin + tile[k] - tile[k] // 4:
                continue  # the cut is too near the probe's edge (the image is too small around it)
            probe_origin = [0] * len(tile)
            probe_origin[k] = origin
            window = img[tuple(slice(o, o + t) for o, t in zip(probe_origin, tile))]
            probe = np.asarray(session.predict(np.ascontiguousarray(window)[None]))[0]
            # compared: a narrow band across the cut (where stitched pixels are nearest their tile's edge),
            # deep inside the probe and, along the other axes, the half tile next to the image edge that the
            # probe and the first row of tiles see alike
            half = seam_band(border[k], tile[k])
            local = [slice(0, t // 2) for t in tile]
            local[k] = slice(cut - half - origin, cut + half - origin)
            image = tuple(slice(o + sl.start, o + sl.stop) for o, sl in zip(probe_origin, local))
            a, b = out[image], probe[tuple(local)]
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
            diff = np.abs(a - b).max(axis=-1)
            if float(diff.max()) >= worst:
                worst = float(diff.max())
                at = np.unravel_index(int(np.argmax(diff)), diff.shape)
                worst_at = [int(v) + sl.start for v, sl in zip(at, image)]
            cuts += 1
    if not cuts:
        report.add(Finding.info("smoke.seams", f"{fixed} and the image {list(spatial)} has no cut between tiles "
                                               "to compare"))
        return
    rng = max(1.0, hi - lo)
    overlap = [2 * b for b in border]
    meas["smoke.seam_error"] = worst
    meas["smoke.seam_error_rel"] = worst / rng
    meas["smoke.seam_method"] = f"tiled output and {cuts} fixed-size tiles centred on the cuts" + (
        " (the graph refused the whole image)" if refused else "")
    if worst <= seam_limit(len(tile), rng):
        report.add(Finding.info("smoke.seams", f"fixed tile size {list(tile)}, overlap {overlap}: the stitched "
                                               f"output equals tiles centred on the cuts (max difference "
                                               f"{worst:.2g} over {cuts} cuts)"))
        return
    if global_context:
        hint = ("the model uses global context (global pooling, dense layers, per-image normalisation); it cannot "
                "be tiled without seams")
    elif refused:
        hint = ("a graph that runs only at one size though it claims free dims usually depends on where the tile "
                "sits (position embeddings, window partitions traced at one size): then no overlap or tile removes "
                "the seams. 'czreg validate' measures whether a larger MinOverlap does")
    else:
        hint = ("the model sees further than the border: raise MinOverlap; where no overlap that fits the tile "
                "removes the seams, re-pack with a larger tile (czreg pack --tile). 'czreg validate' measures which")
    report.add(Finding.error("smoke.seams", f"fixed tile size {list(tile)}, overlap {overlap}: the stitched output "
                                            f"differs from a tile centred on the cut by up to {worst:.3g} (at pixel "
                                            f"{worst_at}); it has seams", hint=hint))


def _compare_whole(report: Report, session: Any, img: np.ndarray, out: np.ndarray, grid: Any,
                   max_whole_pixels: int, global_context: bool, stride: tuple[int, ...] = ()) -> None:
    from .tiling import reflect_indices

    meas = report.measurements
    graph = session.signature.inputs[0].shape[1:-1]
    if any(d is not None for d in graph):
        _compare_fixed_tiles(report, session, img, out, grid, stride, global_context)
        return
    padded = grid.padded_shape
    if math.prod(padded) > max_whole_pixels:
        report.add(Finding.info("smoke.seams", f"image {list(padded)} is too large to predict whole here"))
        return
    idx = [reflect_indices(0, p, n) for p, n in zip(padded, img.shape[:-1])]
    whole_in = np.ascontiguousarray(img[np.ix_(*idx, np.arange(img.shape[-1]))])
    try:
        whole = np.asarray(session.predict(whole_in[None]))[0]
    except CzregError as exc:
        # The graph claims free H/W but runs only at its tile (a position embedding or a window partition traced
        # at one size): measure its seams as ZEN tiles it, with fixed-size tiles centred on the cuts, as for
        # graphs with fixed dims and as validate does (model.invariance.fixed_size), so the two agree.
        report.measurements["smoke.whole_refused"] = exc.message[:200]
        _compare_fixed_tiles(report, session, img, out, grid, stride, global_context, refused=True)
        return
    whole = whole[tuple(slice(0, n) for n in out.shape[:-1])]
    err = float(np.abs(whole - out).max())
    rng = float(max(1.0, whole.max() - whole.min()))
    meas["smoke.seam_error"] = err
    meas["smoke.seam_error_rel"] = err / rng
    if err <= seam_limit(out.ndim - 1, rng):
        report.add(Finding.info("smoke.seams", f"tiled output equals whole-image output (max difference "
                                               f"{err:.2g})"))
    else:
        diff = np.abs(whole - out).max(axis=-1)
        where = tuple(int(v) for v in np.unravel_index(int(np.argmax(diff)), diff.shape))
        hint = ("the model uses global context (global pooling, dense layers, per-image normalisation); it "
                "cannot be tiled without seams" if global_context else
                "raise MinOverlap to at least twice the model's halo, or make the tile a multiple of its stride")
        report.add(Finding.error("smoke.seams", f"tiled output differs from whole-image output by up to "
                                                f"{err:.3g} (at pixel {list(where)})", hint=hint))
