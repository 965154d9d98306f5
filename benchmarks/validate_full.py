"""Time a full ``czreg validate`` (static and model checks) per check, for a small and a medium model.

    .venv/bin/python benchmarks/validate_full.py [--formats onnx,savedmodel] [--repeat 3]

Small: the test suite's U-Net (two poolings, 8 filters, 64x64 tile). Medium: a four-level U-Net
(16-128 filters, 256x256 tile, about 0.5 M parameters). Models are built and exported once into a temp
folder; each package is then validated ``--repeat`` times and the fastest run is reported (wall seconds per
check as recorded in ``report.measurements["timings_s"]``, plus the whole ``validate`` call).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="onnx,savedmodel")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
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
