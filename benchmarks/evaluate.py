"""Benchmark: what evaluating costs on top of the tiled run itself, printed as one table.

On one generated N x N nuclei image (default 4096) with its known ground truth and the demo's example model
(ONNX Runtime, CPU unless a GPU is there), alternately, ``--repeat`` times (after one warm-up of each):

run        ``czregistry.run.runner.run`` writing an OME-TIFF label image: what ``czreg run`` does (load the model,
           probe its geometry, read, tiled inference, write);
evaluate   ``czregistry.evaluate.evaluate`` on the same image and its label: the same loading, probing and
           tiled inference (to the same class map), plus everything evaluating adds: label decoding and the
           true objects, hashing for the digests (both on a worker thread during inference), the prediction's
           runs (encoded from finished rows during inference), confusion matrix, predicted objects and the
           object matching at 10 thresholds after it.

Per repeat: wall seconds and CPU seconds (all threads) of both calls, evaluate's own stages (``read`` the
image, tiled ``inference``, ``metrics`` after the inference) and the overheads: evaluate / run - 1 (wall and
CPU) and metrics / inference. The last row is the median over repeats; the goal is a median wall overhead
under 10%. The machine may be shared: run and evaluate alternate so that both see the same load, CPU time is
less sensitive to other processes than wall time, every repeat is printed, and so is the load average
(other processes) before and after.

Run: ``.venv/bin/python benchmarks/evaluate.py [--size 4096] [--repeat 3]`` (about a minute on 2 cores).
Everything goes to a temp folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of the whole process, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import tifffile
    from PIL import Image

    from czregistry import pack
    from czregistry.evaluate import EvalOptions, evaluate
    from czregistry.examples import EXAMPLE_CLASSES, EXAMPLE_NORMALIZATION, build_example_model, synthetic_nuclei
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    tmp = Path(tempfile.mkdtemp(prefix="czreg-bench-eval-"))
    try:
        package = tmp / "nuclei.czann"
        norm = EXAMPLE_NORMALIZATION
        pack(build_example_model(), {"Type": "SingleClassSemanticSegmentation", "Classes": EXAMPLE_CLASSES,
                                     "MinOverlap": [8, 8], "ModelName": "bench"}, package,
             preprocessing=[f"normalize:mean={norm['mean']},std={norm['std']}"], spatial_dims=(256, 256))
        images, labels = tmp / "images", tmp / "labels"
        images.mkdir()
        labels.mkdir()
        pixels, truth = synthetic_nuclei(args.size, args.size, seed=1)
        tifffile.imwrite(images / "nuclei.tif", pixels)
        Image.fromarray(truth).save(labels / "nuclei.png")
        del pixels, truth

        def do_run() -> Any:
            return run(package, images / "nuclei.tif", tmp / "out.ome.tiff", RunOptions(output_kind="labels"))

        def do_eval() -> Any:
            return evaluate(package, images, labels, EvalOptions(run=RunOptions())).data

        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        do_run()  # warm-up: imports, first ONNX Runtime session, file cache
        do_eval()
        rows: list[dict[str, float]] = []
        data: dict[str, Any] = {}
        for _ in range(args.repeat):
            r_wall, r_cpu, res = timed(do_run)
            e_wall, e_cpu, data = timed(do_eval)
            sec = data["seconds"]
            rows.append({"run": r_wall, "eval": e_wall, "wall %": 100 * (e_wall / r_wall - 1),
                         "run cpu": r_cpu, "eval cpu": e_cpu, "cpu %": 100 * (e_cpu / r_cpu - 1),
                         "read": sec.get("read", 0.0), "inference": sec["inference"], "metrics": sec["metrics"],
                         "metrics %": 100 * sec["metrics"] / sec["inference"]})
        cols = list(rows[0])
        print(f"evaluation overhead, {args.size}x{args.size} image, {data['inference']['tiles']} tiles, "
              f"{res.backend}/{res.device}, {os.cpu_count()} cores, load average {load_before:.1f} -> "
              f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f}; seconds, overheads in %")
        print(f"{'':<8}" + "".join(f"{c:>11}" for c in cols))
        for i, row in enumerate(rows, 1):
            print(f"{'#' + str(i):<8}" + "".join(f"{row[c]:11.2f}" for c in cols))
        med = {c: statistics.median(r[c] for r in rows) for c in cols}
        print(f"{'median':<8}" + "".join(f"{med[c]:11.2f}" for c in cols))
        verdict = "met" if med["wall %"] < 10 else "NOT met"
        print(f"goal (evaluate under 10% over czreg run, median wall): {verdict} ({med['wall %']:+.1f}%); "
              f"metrics after inference: {med['metrics %']:.1f}% of the inference")
        m = data["metrics"]
        obj = m["objects"]["classes"]["nucleus"][0]
        print(f"(mean IoU {m['mean_iou']:.3f}, {obj['n_true']} true nuclei, F1@0.5 {obj['f1']:.3f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
