"""Time a full ``czreg validate`` (static and model checks) per check, for a small and a medium model.

    .venv/bin/python benchmarks/validate_full.py [--formats onnx,savedmodel] [--repeat 3]
    .venv/bin/python benchmarks/validate_full.py --real-world [--code OLD_CHECKOUT]

Small: the test suite's U-Net (two poolings, 8 filters, 64x64 tile). Medium: a four-level U-Net
(16-128 filters, 256x256 tile, about 0.5 M parameters). Models are built and exported once into a temp
folder; each package is then validated ``--repeat`` times and the fastest run is reported (wall seconds per
check as recorded in ``report.measurements["timings_s"]``, plus the whole ``validate`` call).

``--real-world``: models nobody here designed (``tests/corpus.py``): segmentation_models_pytorch's U-Net with a
resnet18 encoder (~57 MB, InputShape 256, MinOverlap 128) and a CARE-style denoiser at a 1024-pixel tile with its
batch fixed at 1 (as ZEISS's LiveDenoise models are exported). Each validation runs in a fresh process so the
peak RSS is that process's own; ``--code DIR`` puts another checkout first on ``PYTHONPATH`` (e.g. a
``git worktree`` of an older commit) to measure before and after on the same packages.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CZREG_PLUGINS", "onnxruntime,tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def medium_unet(channels: int = 1, classes: int = 2) -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(1234)
    inp = keras.Input((None, None, channels))
    skips, x = [], inp
    for f in (16, 32, 64, 128):
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu")(x)
    for f, skip in zip((128, 64, 32, 16), reversed(skips)):
        x = layers.Concatenate()([layers.UpSampling2D(2)(x), skip])
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
    out = layers.Conv2D(classes, 1, activation="softmax")(x)
    return keras.Model(inp, out, name="medium_unet")


def build(kind: str, fmt: str, workdir: Path) -> Path:
    from czregistry.package import write_package
    from tests.models import build_model, export_onnx, export_savedmodel_zip, metadata_for

    if kind == "small":
        model, meta = build_model("unet"), metadata_for("unet", tile=64, overlap=20)
    else:
        model, meta = medium_unet(), metadata_for("unet", tile=256, overlap=64)
        meta["ModelName"] = "medium-unet"
    data = export_onnx(model) if fmt == "onnx" else export_savedmodel_zip(model, workdir)
    return write_package(workdir / f"{kind}-{fmt}.czann", meta, data)


def bench(path: Path, repeat: int) -> tuple[dict[str, float], float, dict[str, Any]]:
    from czregistry.checks import ValidateOptions
    from czregistry.validate import validate

    best: tuple[dict[str, float], float, dict[str, Any]] | None = None
    for _ in range(repeat):
        start = time.perf_counter()
        report = validate(path, ValidateOptions())
        total = time.perf_counter() - start
        if best is None or total < best[1]:
            best = (report.measurements.get("timings_s", {}), total, report.measurements)
        if report.errors:
            print(f"unexpected errors for {path.name}: {[f.message for f in report.errors]}", file=sys.stderr)
    assert best is not None
    return best


_CHILD = """
import json, resource, sys, time
from czregistry.checks import ValidateOptions
from czregistry.validate import validate
start = time.perf_counter()
report = validate(sys.argv[1], ValidateOptions())
m = report.measurements
# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child would report its parent's peak (the parent
# holds TensorFlow and torch from exporting the models).
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "rss_mb": rss,
                  "valid": report.valid, "errors": sorted({f.check for f in report.errors}),
                  "warnings": sorted({f.check for f in report.warnings}), "stride": m.get("stride"),
                  "halo": m.get("halo"), "halo_bound": m.get("halo_bound"), "global": m.get("global_context")}))
"""


def real_world(code: str | None, repeat: int) -> None:
    import json
    import subprocess

    from czregistry.package import write_package
    from tests.corpus import CORPUS, export_onnx, metadata

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in ("smp-unet-resnet18", "care-unet-1024-batch1"):
            entry = CORPUS[name]
            path = write_package(Path(tmp) / f"{name}.czann", metadata(entry), export_onnx(entry))
            runs = []
            for _ in range(repeat):
                out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True,
                                     text=True, check=True, cwd=tmp)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append((name, path.stat().st_size / 1e6, min(runs, key=lambda r: r["seconds"])))
    print(f"{os.cpu_count()} CPU(s) visible; code: {code or 'this checkout'}; fastest of {repeat}, fresh process each")
    head = f"{'model':<24}{'MB':>6}{'seconds':>9}{'peak RSS MB':>13}  verdict"
    print(head)
    print("-" * 100)
    for name, size, r in rows:
        verdict = ("VALID" if r["valid"] else "INVALID") + f" errors={r['errors']} warnings={r['warnings']}"
        print(f"{name:<24}{size:>6.1f}{r['seconds']:>9.1f}{r['rss_mb']:>13.0f}  {verdict}")
        print(f"{'':<24}stride {r['stride']} halo {r['halo']} bound {r['halo_bound']} global {r['global']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="onnx,savedmodel")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--real-world", action="store_true", help="smp U-Net and a 1024-pixel denoiser")
    parser.add_argument("--code", help="with --real-world: a checkout to put first on PYTHONPATH")
    args = parser.parse_args()
    if args.real_world:
        real_world(args.code, args.repeat)
        return
    rows: list[tuple[str, str, dict[str, float], float, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            for kind in ("small", "medium"):
                path = build(kind, fmt, Path(tmp))
                timings, total, m = bench(path, args.repeat)
                rows.append((kind, fmt, timings, total, m))
    checks = sorted({c for _, _, t, _, _ in rows for c in t})
    head = f"{'model':<8} {'format':<11}" + "".join(f"{c:>23}" for c in checks) + f"{'validate':>10} {'preds':>6}"
    print(f"{os.cpu_count()} CPU(s) visible; seconds, fastest of {args.repeat}")
    print(head)
    print("-" * len(head))
    for kind, fmt, timings, total, m in rows:
        cells = "".join(f"{timings.get(c, float('nan')):>23.3f}" for c in checks)
        print(f"{kind:<8} {fmt:<11}{cells}{total:>10.3f} {m.get('probe', {}).get('predictions', 0):>6}")
    print()
    for kind, fmt, _, _, m in rows:
        print(f"{kind:<8} {fmt:<11} tile {m.get('tile')} step {m.get('step')} stride {m.get('stride')} "
              f"halo {m.get('halo')} min_overlap_exact {m.get('min_overlap_exact')} "
              f"seam_error {m.get('seam_error')} device {m.get('device')}")


if __name__ == "__main__":
    main()
