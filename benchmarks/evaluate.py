"""Benchmark: what evaluating costs on top of the tiled run itself, printed as one table.

On one generated N x N nuclei image (default 4096) with its known ground truth and the demo's example model
(ONNX Runtime, CPU unless a GPU is there), each measured ``--repeat`` times (best kept):

(a) run        ``czregistry.run.runner.run`` writing an OME-TIFF label image: what ``czreg run`` does;
(b) inference  ``runner.predict_image`` on the image in memory: the tiled run alone, no file written;
(c) evaluate   ``czregistry.evaluate.evaluate`` on the same image and its label: reading, the same tiled
               inference, argmax, confusion matrix, connected components and object matching at 10
               thresholds, dataset digest (hashing the files). Label decoding, hashing and labelling the true
               objects run on a worker thread during the inference, so they show up only as contention there;
(d) metrics    what (c) spends after the inference of the plane (argmax, confusion, predicted components, overlap
               counts, matching, and any wait for the worker), as the engine times it.

The overhead is (d) / (b): extra time an evaluation adds to the tiled run, and (c) / (a) - 1 for the whole
command against ``czreg run``. Run: ``.venv/bin/python benchmarks/evaluate.py [--size 4096]``
(about a minute on 2 cores). Everything goes to a temp folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import tifffile
    from PIL import Image

    from czregistry import pack
    from czregistry.evaluate import EvalOptions, evaluate
    from czregistry.examples import EXAMPLE_CLASSES, EXAMPLE_NORMALIZATION, build_example_model, synthetic_nuclei
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package
    from czregistry.run.images import scale_to_unit
    from czregistry.run.runner import RunOptions, model_geometry, predict_image, run
    from czregistry.selection import load_session

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
        opts = RunOptions()

        def best(fn: object) -> float:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()  # type: ignore[operator]
                times.append(time.perf_counter() - t0)
            return min(times)

        t_run = best(lambda: run(package, images / "nuclei.tif", tmp / "out.ome.tiff",
                                 RunOptions(output_kind="labels")))
        pkg = open_package(package)
        info = ModelInfo.from_package(pkg)
        with load_session(pkg) as session:
            geom = model_geometry(session, info)
            x = scale_to_unit(pixels[..., None])
            t_inf = best(lambda: predict_image(session, info, x, opts, geometry=geom))
            device = f"{session.backend}/{session.device}"
        evals = []
        t_eval = best(lambda: evals.append(evaluate(package, images, labels, EvalOptions(run=opts))))
        d = min(evals, key=lambda e: e.data["seconds"]["total"]).data
        t_metrics, t_einf = d["seconds"]["metrics"], d["seconds"]["inference"]
        m = d["metrics"]
        print(f"evaluation overhead, {args.size}x{args.size} image, {d['inference']['tiles']} tiles, {device}, "
              f"best of {args.repeat}")
        print(f"{'step':<46} {'seconds':>8} {'vs tiled run':>13}")
        rows = [("(a) czreg run -> OME-TIFF labels", t_run, t_run / t_inf - 1),
                ("(b) tiled inference alone (predict_image)", t_inf, 0.0),
                ("(c) evaluate, whole call", t_eval, t_eval / t_inf - 1),
                ("    of which tiled inference (read+predict)", t_einf, t_einf / t_inf - 1),
                ("(d)   of which metrics", t_metrics, t_metrics / t_inf)]
        for name, sec, rel in rows:
            print(f"{name:<46} {sec:8.2f} {rel:+12.1%}")
        print(f"evaluate vs czreg run: {t_eval / t_run - 1:+.1%}; metrics over the tiled run: {t_metrics / t_inf:.1%}")
        obj = m["objects"]["classes"]["nucleus"][0]
        print(f"(mean IoU {m['mean_iou']:.3f}, {obj['n_true']} true nuclei, F1@0.5 {obj['f1']:.3f})")
        del np
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
