"""``evaluate``: run a package through the tiled runner over a labelled dataset and measure it.

Inference is ``runner.predict_image`` with the same preprocessing ``czreg run`` applies (dtype scaling,
channel mapping) and the class map ``czreg run --output-kind labels`` writes, the model loaded and its
geometry measured once for the whole dataset: what is measured is what users get. Each image is read whole
(label maps must fit in memory anyway); only its sufficient statistics (``metrics``) and, for the report, a
small preview of the worst images are kept.

The overhead over the tiled run is kept small by design: the float probabilities of a whole plane never
exist (the runner converts finished rows to classes), the prediction's runs (``metrics.RunEncoder``) are
encoded from finished rows on the runner's writer thread while later rows are inferred, the label side
(decoding, runs, true objects) and the file hashing run on a worker thread during the inference, and what
is left after it works on runs, not pixels. ``benchmarks/evaluate.py`` measures it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from . import metrics as M
from .dataset import Pair, dataset_digest, pair_dataset, with_digests
from .result import Evaluation, Preview

if TYPE_CHECKING:
    from ..metadata import ModelInfo

__all__ = ["EvalOptions", "Evaluation", "Preview", "evaluate", "summarize"]

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EvalOptions:
    """Inference options (as ``czreg run``) plus what to keep for pictures."""

    run: Any = None  # runner.RunOptions; None = defaults
    thresholds: tuple[float, ...] = M.THRESHOLDS
    #: How many of the worst images to keep previews of (for the HTML report).
    keep_worst: int = 0
    #: Write one overlay PNG per image here (input | label | prediction).
    overlays: Path | None = None
    preview_side: int = 384


def _task(info: Any) -> str:
    if info.type == "Regression":
        return "regression"
    if info.type is None or info.is_segmentation:
        return "segmentation"
    raise UsageError(f"{info.type} models give one result per image; czreg evaluate measures segmentation "
                     "and regression (denoising) models")


def _read_plane(src: Any, lead: tuple[int, ...], spatial: tuple[int, ...]) -> np.ndarray:
    return np.asarray(src.read(lead, [slice(0, n) for n in spatial]))


def _label_plane(raw: np.ndarray, path: Path, n_classes: int) -> np.ndarray:
    if raw.shape[-1] != 1:
        raise UsageError(f"label {path.name} has {raw.shape[-1]} channels; labels hold one class index per pixel",
                         hint="save labels as single-channel integer images (0 = background, 1, 2, ...)")
    lab = raw[..., 0]
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        if not np.array_equal(lab, np.round(lab)):
            raise UsageError(f"label {path.name} holds non-integer values ({lab.dtype})",
                             hint="labels hold class indices 0..N-1")
        lab = lab.astype(np.int64)
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise UsageError(f"label {path.name} holds class {bad}, but the model has {n_classes} classes "
                         f"(0..{n_classes - 1})",
                         hint="labels hold the index of the package's class per pixel")
    return lab.astype(np.uint8 if n_classes <= 256 else np.uint16, copy=False)


def _class_rows(block: np.ndarray, out_ch: int) -> np.ndarray:
    """Class per pixel of finished output rows ``(rows, ..., C)``: the runner's labels (``czreg run
    --output-kind labels``, argmax with ties to the lower class), or for a single output channel its
    foreground probability thresholded at 0.5."""
    if out_ch == 1:
        return (block[..., 0] > 0.5).view(np.uint8)
    return block[..., 0]


class _RowFeed:
    """``predict_image``'s ``on_rows``: classes of finished rows into the prediction's ``RunEncoder``."""

    def __init__(self, encoder: M.RunEncoder, out_ch: int) -> None:
        self.encoder, self.out_ch = encoder, out_ch

    def __call__(self, start: int, rows: np.ndarray) -> None:
        self.encoder.add(start, _class_rows(rows, self.out_ch))


def _model_input(raw: np.ndarray, info: ModelInfo, in_ch: int, select: tuple[int, ...] | None) -> np.ndarray:
    """The plane as ``predict_image`` takes it, through the one ``InputAdapter``. When only scaling is needed it
    is passed as read, and the runner scales each band as it cuts tiles (as ``czreg run`` does): no float copy of
    the whole plane."""
    from ..run.adapt import InputAdapter

    adapter = InputAdapter.for_model(info, in_ch, select)
    if select is None and raw.shape[-1] == in_ch and not (adapter.bgr and in_ch >= 3):
        return raw  # only scaling needed: predict_image scales as it cuts tiles, like the adapter
    return adapter(raw)


def _preview_slice(a: np.ndarray, nd: int) -> np.ndarray:
    """The middle z slice of a 3D plane (2D stays)."""
    return a[a.shape[0] // 2] if nd == 3 else a


def _downsample(a: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """At most ``side`` pixels a side: block means (images) or every step-th pixel (class maps), over the
    same whole blocks so that both line up pixel for pixel."""
    step = max(1, int(np.ceil(max(a.shape[:2]) / side)))
    if step == 1:
        return np.ascontiguousarray(a)
    h, w = max(step, (a.shape[0] // step) * step), max(step, (a.shape[1] // step) * step)
    a = a[:h, :w]
    if nearest or a.shape[0] < step or a.shape[1] < step:
        return np.ascontiguousarray(a[::step, ::step])
    b = a.astype(np.float32)
    return b.reshape(h // step, step, w // step, step, *a.shape[2:]).mean(axis=(1, 3))


def _display(image: np.ndarray) -> np.ndarray:
    """uint8 grey (H, W) or RGB (H, W, 3) of an (already down-sampled) input plane, stretched between the 1st
    and 99.5th percentile."""
    img = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, 1), np.percentile(img, 99.5)
    out = np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
    out = out.astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _session_facts(session: Any, info: Any) -> tuple[int, int]:
    sig = session.signature
    in_shape = sig.inputs[0].shape
    in_ch = info.input_channels or (in_shape[-1] if in_shape[-1] is not None else 1)
    out_ch = info.output_channels or sig.outputs[0].shape[-1]
    if out_ch is None:
        raise UsageError("the package declares no output channel count and the model does not fix one")
    return int(in_ch), int(out_ch)


class _LabelFeed:
    """One image's label, read on the worker thread while the main thread runs the tiled inference.

    Everything here is independent of the prediction: opening (a PNG decodes whole), the shape check,
    reading a plane, checking its class indices and labelling its objects (``metrics.class_objects``),
    or scaling a regression target. Jobs of one feed run in submission order on a single worker.
    """

    def __init__(self, pair: Pair, nd: int, task: str, n_classes: int) -> None:
        self.pair, self.nd, self.task, self.n_classes = pair, nd, task, n_classes
        self.src: Any = None
        self.l_lead: tuple[int, ...] = ()

    def open(self, image_shape: tuple[int, ...], lead_shape: tuple[int, ...], spatial: tuple[int, ...]) -> None:
        from ..run.readers import open_image

        self.src = open_image(self.pair.label)
        _, l_lead, l_spatial = self.src.layout(self.nd)
        if tuple(l_spatial) != tuple(spatial) or (l_lead and tuple(l_lead) != tuple(lead_shape)):
            raise UsageError(f"{self.pair.label.name} has shape {self.src.shape} but {self.pair.image.name} has "
                             f"{image_shape}; a label must match its image pixel for pixel",
                             hint="check the pairing (by file stem) and the label's axes")
        self.l_lead = tuple(l_lead)

    def plane(self, lead: tuple[int, ...], spatial: tuple[int, ...]) -> Any:
        from ..run.adapt import scale_to_unit

        if self.src is None:  # open failed; its future carries the error
            return None
        lraw = _read_plane(self.src, lead if self.l_lead else (), spatial)
        if self.task == "segmentation":
            return M.class_objects(_label_plane(lraw, self.pair.label, self.n_classes), self.n_classes)
        return scale_to_unit(lraw)

    def close(self) -> None:
        if self.src is not None:
            self.src.close()


def evaluate(package: Path | str, images: Path | str, labels: Path | str, options: EvalOptions | None = None,
             *, progress: Progress | None = None, pairs: list[Pair] | None = None) -> Evaluation:
    """Evaluate ``package`` on the images in ``images`` against same-stem labels (or targets) in ``labels``.

    Work that does not need the prediction (hashing the files for the dataset digest, decoding the labels,
    finding the true objects) runs on one worker thread during the tiled inference of the same plane; the
    prediction's runs are encoded from finished rows during the inference (``predict_image``'s ``on_rows``).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from .. import __version__
    from ..metadata import ModelInfo
    from ..package import open_package, sha256_file
    from ..run.pipeline import predict_image
    from ..run.plan import ModelGeometry, RunOptions, model_geometry
    from ..run.readers import open_image
    from ..selection import load_session

    options = options or EvalOptions()
    run_opts: RunOptions = options.run or RunOptions()
    t_start = time.perf_counter()
    pairs = pairs if pairs is not None else pair_dataset(images, labels, digests=False)
    pkg = open_package(package)
    info = ModelInfo.from_package(pkg)
    task = _task(info)
    if options.overlays is not None:
        options.overlays.mkdir(parents=True, exist_ok=True)
    per_image: list[dict[str, Any]] = []
    worst: list[tuple[float, int, Preview]] = []
    read_s = infer_s = metric_s = 0.0
    hashed: list[Future[Pair]] = []
    package_sha: Future[str] | None = None
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="czreg-evaluate")
    try:
        with load_session(pkg, run_opts.backend, run_opts.device, trust_graph=run_opts.trust_graph) as session:
            in_ch, out_ch = _session_facts(session, info)
            nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
            if task == "segmentation":
                names = list(info.classes) if info.classes and len(info.classes) == max(out_ch, 2) else None
                classes = names or (["background", "foreground"] if out_ch == 1
                                    else [f"class{i}" for i in range(out_ch)])
            else:
                classes = []
            n_classes = len(classes)
            geom = model_geometry(session, info, probe=run_opts.probe, time_budget=run_opts.probe_budget)
            if run_opts.step is not None:
                geom = ModelGeometry((run_opts.step,) * len(geom.stride), geom.halo, "given", geom.global_context,
                                     geom.notes)
            tiles = 0
            for k, pair in enumerate(pairs):
                if progress is not None:
                    progress(k, len(pairs), pair.stem)
                src = open_image(pair.image, run_opts.axes)
                feed = _LabelFeed(pair, nd, task, n_classes)
                try:
                    _, lead_shape, spatial = src.layout(nd)
                    lead_shape, spatial = tuple(lead_shape), tuple(spatial)
                    opened = worker.submit(feed.open, tuple(src.shape), lead_shape, spatial)
                    n_planes = int(np.prod(lead_shape)) if lead_shape else 1
                    conf = np.zeros((n_classes, n_classes), np.int64)
                    objs: dict[str, list[M.ObjectCounts]] = {}
                    reg_stats = {"n": 0.0, "sum_abs": 0.0, "sum_sq": 0.0, "ssim_sum": 0.0, "ssim_n": 0.0}
                    preview: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                    for plane in range(n_planes):
                        lead = tuple(int(i) for i in np.unravel_index(plane, lead_shape)) if lead_shape else ()
                        truth_job = worker.submit(feed.plane, lead, spatial)
                        if plane == 0:  # behind this image's first label plane: digests are only needed at the end
                            hashed.append(worker.submit(with_digests, pair))
                            if package_sha is None:
                                package_sha = worker.submit(sha256_file, pkg.path)
                        t0 = time.perf_counter()
                        x = _model_input(_read_plane(src, lead, spatial), info, in_ch, run_opts.channels)
                        t1 = time.perf_counter()
                        read_s += t1 - t0
                        if task == "segmentation":
                            # classes of finished rows, their runs encoded while later rows are inferred
                            encoder = M.RunEncoder(spatial)
                            labels_opts = replace(run_opts, output_kind="labels" if out_ch > 1 else "probabilities")
                            out, grid = predict_image(session, info, x, labels_opts, geometry=geom,
                                                      on_rows=_RowFeed(encoder, out_ch))
                        else:
                            out, grid = predict_image(session, info, x, run_opts, geometry=geom)
                        tiles += grid.n_tiles
                        t2 = time.perf_counter()
                        infer_s += t2 - t1
                        opened.result()  # a label of the wrong shape fails here, before its plane is used
                        if task == "segmentation":
                            truth: M.ClassObjects = truth_job.result()
                            pred_runs = encoder.finish()
                            plane_conf, plane_objs = M.segmentation_stats(truth, pred_runs, options.thresholds)
                            conf += plane_conf
                            for c, counts in enumerate(plane_objs, 1):
                                prev = objs.get(classes[c])
                                objs[classes[c]] = counts if prev is None else [a + b for a, b in zip(prev, counts)]
                            shown: np.ndarray = _class_rows(out, out_ch)
                            assert truth.class_map is not None  # built from the label plane
                            target = truth.class_map
                        else:
                            tgt = truth_job.result()
                            if tgt.shape[-1] != out.shape[-1]:
                                raise UsageError(f"target {pair.label.name} has {tgt.shape[-1]} channel(s); the "
                                                 f"model outputs {out.shape[-1]}",
                                                 hint="targets must match the output")
                            s = M.regression_stats(out, tgt)
                            reg_stats = {key: reg_stats[key] + s[key] for key in reg_stats}
                            shown, target = out, tgt
                        metric_s += time.perf_counter() - t2
                        if plane == 0 and (options.keep_worst or options.overlays is not None):
                            side = options.preview_side
                            preview = (_display(_downsample(_preview_slice(x, nd), side, False)),
                                       _downsample(_preview_slice(target, nd), side, True),
                                       _downsample(_preview_slice(shown, nd), side, True))
                finally:
                    src.close()
                    worker.submit(feed.close).result()  # after this feed's queued jobs (one worker, in order)
                record: dict[str, Any] = {"image": pair.stem, "image_file": pair.image.name,
                                          "label_file": pair.label.name, "image_sha256": "",
                                          "label_sha256": "", "planes": n_planes,
                                          "shape": [*lead_shape, *spatial]}
                if task == "segmentation":
                    scores = M.class_scores(conf, classes)
                    record.update(scores)
                    record["objects"] = {name: [c.as_list() for c in counts] for name, counts in objs.items()}
                    record["f1@0.5"] = {name: M.object_scores(counts[0], options.thresholds[0])["f1"]
                                        for name, counts in objs.items()} if options.thresholds else {}
                    score = scores["mean_iou"] if scores["mean_iou"] is not None else 0.0
                else:
                    record["stats"] = reg_stats
                    record.update(M.regression_scores(reg_stats))
                    score = record["psnr"] if record["psnr"] is not None else 0.0
                per_image.append(record)
                if preview is not None:
                    pv = Preview(pair.stem, float(score), *preview)
                    if options.overlays is not None:
                        from .report_html import write_overlay_png

                        write_overlay_png(options.overlays / f"{pair.stem}.png", pv, task, n_classes)
                    if options.keep_worst:
                        item = (-float(score), k, pv)
                        if len(worst) < options.keep_worst:
                            heapq.heappush(worst, item)
                        else:
                            heapq.heappushpop(worst, item)
            backend, device = session.backend, session.device
        pairs = [f.result() for f in hashed]
        pkg_digest = package_sha.result() if package_sha is not None else sha256_file(pkg.path)
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
    for record, pair in zip(per_image, pairs):
        record["image_sha256"], record["label_sha256"] = pair.image_sha256, pair.label_sha256
    data: dict[str, Any] = {
        "package": {"sha256": pkg_digest, "file": Path(pkg.path).name, "name": info.name,
                    "type": info.type, "classes": classes or None},
        "dataset": {"digest": dataset_digest(pairs), "images": len(pairs),
                    "planes": sum(r["planes"] for r in per_image), "images_dir": str(images),
                    "labels_dir": str(labels)},
        "definition": M.DEFINITION,
        "task": task,
        "metrics": {},
        "per_image": per_image,
        "inference": {"backend": backend, "device": device, "batch_size": run_opts.batch_size,
                      "tile": list(run_opts.tile) if run_opts.tile else None, "blend": run_opts.blend,
                      "geometry": run_opts.geometry, "stride": list(geom.stride), "halo": list(geom.halo),
                      "channels": list(run_opts.channels) if run_opts.channels else None, "tiles": tiles},
        "seconds": {"total": round(time.perf_counter() - t_start, 3), "read": round(read_s, 3),
                    "inference": round(infer_s, 3), "metrics": round(metric_s, 3)},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "czregistry_version": __version__,
    }
    data["metrics"] = summarize(data, options.thresholds)
    previews = [pv for _, _, pv in sorted(worst, key=lambda t: (-t[0], t[1]))]
    return Evaluation(data, previews)


def summarize(data: dict[str, Any], thresholds: tuple[float, ...] | None = None,
              indices: list[int] | None = None) -> dict[str, Any]:
    """Dataset metrics from the per-image statistics (all images, or ``indices``: a bootstrap resample)."""
    rows = data["per_image"]
    chosen = [rows[i] for i in indices] if indices is not None else rows
    if data["task"] == "regression":
        keys = ("n", "sum_abs", "sum_sq", "ssim_sum", "ssim_n")
        reg_pooled = {k: float(sum(r["stats"][k] for r in chosen)) for k in keys}
        return dict(M.regression_scores(reg_pooled))
    classes = data["package"]["classes"]
    n = len(classes)
    conf = np.zeros((n, n), np.int64)
    for r in chosen:
        conf += np.asarray(r["confusion"], np.int64)
    out = M.class_scores(conf, classes)
    ths = list(thresholds if thresholds is not None else data["metrics"]["objects"]["thresholds"])
    per_class: dict[str, list[dict[str, Any]]] = {}
    mean_acc: dict[str, float] = {}
    for name in classes[1:]:
        pooled = [M.ObjectCounts(0, 0, 0, 0, 0, 0.0) for _ in ths]
        for r in chosen:
            counts = r["objects"].get(name)
            if counts:
                pooled = [p + M.ObjectCounts(int(c[0]), int(c[1]), int(c[2]), int(c[3]), int(c[4]), float(c[5]))
                          for p, c in zip(pooled, counts)]
        per_class[name] = [M.object_scores(p, t) for p, t in zip(pooled, ths)]
        mean_acc[name] = float(np.mean([s["accuracy"] for s in per_class[name]])) if ths else 0.0
    out["objects"] = {"matching": M.MATCHING, "connectivity": "face (4 in 2D, 6 in 3D)", "thresholds": ths,
                      "fields": list(M.OBJECT_FIELDS), "classes": per_class, "mean_accuracy": mean_acc}
    return out
