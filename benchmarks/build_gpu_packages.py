"""Build the ONNX packages that ``benchmarks/gpu_check.sh`` runs on the GPU machine, which has no
TensorFlow: the test U-Net (tile 256, MinOverlap 32) and the README's example model with its
``normalize`` layer packed in front, both exported with tf2onnx (opset 18).

    .venv/bin/python benchmarks/build_gpu_packages.py .whl
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(dest: Path) -> None:
    from czregistry_tensorflow.compose import prepend_and_append

    from czregistry.examples import EXAMPLE_CLASSES, EXAMPLE_NORMALIZATION, build_example_model
    from czregistry.package import write_package
    from czregistry.selection import parse_layer
    from tests.models import build_model, export_onnx, metadata_for

    dest.mkdir(parents=True, exist_ok=True)
    meta = metadata_for("unet", tile=256, overlap=32)
    meta["ModelName"] = "gpu-check-unet"
    write_package(dest / "unet.czann", meta, export_onnx(build_model("unet")))

    norm = parse_layer("normalize:" + ",".join(f"{k}={v}" for k, v in EXAMPLE_NORMALIZATION.items()))
    model = prepend_and_append(build_example_model(), [norm], [])
    meta = metadata_for("unet", tile=256, overlap=8)
    meta.update({"ModelName": "gpu-check-example-nuclei", "Classes": EXAMPLE_CLASSES,
                 "Id": "5b0e6f0c-93a4-4a57-9f3e-0c1d2e3f4a5b"})
    write_package(dest / "example.czann", meta, export_onnx(model))
    for name in ("unet.czann", "example.czann"):
        print(dest / name, (dest / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
