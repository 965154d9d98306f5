#!/usr/bin/env bash
# GPU check for czregistry: the torch backend (plugins/czregistry-torch) on a CUDA machine that has
# PyTorch with CUDA and the CPU onnxruntime, no TensorFlow and no network.
#
# Needs the folder .whl/ (carried, git-ignored): our wheels, pure-Python/cp312 deps the machine lacks,
# and two prebuilt ONNX packages (.whl/unet.czann, .whl/example.czann from benchmarks/build_gpu_packages.py).
#
# On the device:   bash benchmarks/gpu_check.sh                      (writes into $OUT)
# Local dry run:   PY=.venv/bin/python DEVICE=cpu SKIP_INSTALL=1 SIZE=1024 OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
#
# Prints everything; $OUT gets the log, JSON results and summary.json. Big images and outputs stay in
# $WORK (not returned). Each step has a timeout and a failure does not stop the later steps.
set -u -o pipefail

PY=${PY:-python3}
DEVICE=${DEVICE:-gpu}
SIZE=${SIZE:-4096}
OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/czreg-gpu-check}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1

step() { printf '\n=== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
# run NAME TIMEOUT CMD...: run, keep stdout in $OUT/NAME, print it, report the exit code, never abort.
run() {
    local name=$1 limit=$2; shift 2
    echo "+ $*"
    local t0=$EPOCHREALTIME
    timeout "$limit" "$@" > "$OUT/$name" 2> "$WORK/$name.err"
    local rc=$?
    local secs; secs=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")
    cat "$OUT/$name"; tail -n 20 "$WORK/$name.err"
    echo "[$name: exit $rc, $secs s]"
    echo "$name exit=$rc seconds=$secs" >> "$OUT/steps.txt"
}

step "machine"
nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
"$PY" --version

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step "install wheels into $SITE"
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || echo "pip install FAILED"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export CZREG_PLUGINS=onnxruntime,torch
export CZREG_HOME="$WORK/home"
export PYTHONUNBUFFERED=1

step "versions"
"$PY" - <<'EOF'
import importlib, sys
from czregistry_torch import _import_onnx2torch  # onnx2torch via the plugin's torchvision fallback

for m in ("numpy", "torch", "onnx", "onnxruntime", "onnx2torch", "czregistry", "tifffile", "zarr", "isal"):
    try:
        mod = _import_onnx2torch() if m == "onnx2torch" else importlib.import_module(m)
        print(f"{m:12s} {getattr(mod, '__version__', '?')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"{m:12s} IMPORT FAILED: {type(exc).__name__}: {exc}")
import torch, onnxruntime as ort
print("torch.cuda.is_available():", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("onnxruntime providers:", ort.get_available_providers())
print("tensorflow importable:", importlib.util.find_spec("tensorflow") is not None)
print("torchvision:", "stub (absent or unusable)" if getattr(sys.modules.get("torchvision"), "__czregistry_stub__", False)
      else getattr(sys.modules.get("torchvision"), "__version__", "not imported"))
EOF

step "czreg plugins"
run plugins.txt 120 "$PY" -m czregistry plugins
run plugins.json 120 "$PY" -m czregistry plugins --json

step "backend selection (no TensorFlow imported)"
"$PY" - <<EOF
import sys
from czregistry.selection import select_backend
for device in ("auto", "gpu", "cpu"):
    try:
        print(f"select_backend('onnx', device={device!r}) ->", select_backend("onnx", device=device).name)
    except Exception as exc:
        print(f"select_backend('onnx', device={device!r}) -> {type(exc).__name__}: {exc}")
print("tensorflow imported:", "tensorflow" in sys.modules)
EOF

for pkg in unet example; do
    step "validate $pkg --device $DEVICE"
    run "validate-$pkg.json" 300 "$PY" -m czregistry validate ".whl/$pkg.czann" --device "$DEVICE" --json
done

step "raw backend throughput and agreement (same tiles, in memory)"
run raw.json 300 "$PY" - <<'EOF'
import json, time
import numpy as np
from czregistry.selection import load_session
from czregistry.package import open_package

result = {}
for pkg in ("unet", "example"):
    package = open_package(f".whl/{pkg}.czann")
    h, w, c = package.metadata["InputShape"]
    x = np.random.default_rng(0).random((16, h, w, c), dtype=np.float32)
    outs, rows = {}, {}
    for label, backend, device in (("onnxruntime-cpu", "onnxruntime", "cpu"), ("torch-cpu", "torch", "cpu"),
                                   ("torch-gpu", "torch", "gpu"), ("auto", None, "auto")):
        try:
            t0 = time.perf_counter()
            session = load_session(package, backend=backend, device=device)
            load_s = time.perf_counter() - t0
            session.predict(x[:2])  # warm-up (CUDA context, cuDNN autotune)
            reps = 0
            t0 = time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < 2.0:
                y = session.predict(x)
                reps += 1
            secs = time.perf_counter() - t0
            outs[label] = y
            rows[label] = {"backend": session.backend, "device": session.device, "load_s": round(load_s, 3),
                           "tiles_per_s": round(reps * len(x) / secs, 1)}
            session.close()
        except Exception as exc:
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"}
    ref = outs.get("onnxruntime-cpu")
    for label, y in outs.items():
        if ref is not None:
            rows[label]["max_abs_diff_vs_onnxruntime_cpu"] = float(np.max(np.abs(y - ref)))
    result[pkg] = rows
print(json.dumps(result, indent=1))
EOF

step "test image ${SIZE}x${SIZE}"
"$PY" - <<EOF
import tifffile
from czregistry.examples import synthetic_nuclei_image
tifffile.imwrite("$WORK/image.tif", synthetic_nuclei_image($SIZE, $SIZE, seed=1))
print("wrote $WORK/image.tif")
EOF

for pkg in unet example; do
    step "smoke $pkg --device $DEVICE"
    run "smoke-$pkg.json" 300 "$PY" -m czregistry smoke ".whl/$pkg.czann" --device "$DEVICE" --json
done

step "tiled runs on ${SIZE}x${SIZE}: $DEVICE vs CPU"
run "run-unet-$DEVICE-b4.json" 300 "$PY" -m czregistry run .whl/unet.czann "$WORK/image.tif" \
    -o "$WORK/unet-$DEVICE-b4.ome.tif" --device "$DEVICE" --json
run "run-unet-$DEVICE-b32.json" 300 "$PY" -m czregistry run .whl/unet.czann "$WORK/image.tif" \
    -o "$WORK/unet-$DEVICE-b32.ome.tif" --device "$DEVICE" --batch-size 32 --json
run "run-example-$DEVICE-b32.json" 300 "$PY" -m czregistry run .whl/example.czann "$WORK/image.tif" \
    -o "$WORK/example-$DEVICE-b32.ome.tif" --device "$DEVICE" --batch-size 32 --json
run run-unet-cpu-onnxruntime.json 300 "$PY" -m czregistry run .whl/unet.czann "$WORK/image.tif" \
    -o "$WORK/unet-cpu-onnxruntime.ome.tif" --device cpu --backend onnxruntime --batch-size 8 --json
run run-unet-cpu-torch.json 300 "$PY" -m czregistry run .whl/unet.czann "$WORK/image.tif" \
    -o "$WORK/unet-cpu-torch.ome.tif" --device cpu --backend torch --batch-size 8 --json

step "model-only vs end-to-end tiles/s by backend and batch size (unet; labels/uint8/float32 OME-TIFF, labels Zarr)"
run throughput.json 900 "$PY" - <<EOF
import json, time
from pathlib import Path
import numpy as np
from czregistry.selection import load_session
from czregistry.package import open_package
from czregistry.run.runner import RunOptions, run

work = Path("$WORK")
package = open_package(".whl/unet.czann")
h, w, c = package.metadata["InputShape"]
rows = []
KEYS = (("labels", ".ome.tif"), ("uint8", ".ome.tif"), ("probabilities", ".ome.tif"), ("labels", ".zarr"))
for backend in ("torch", "onnxruntime"):  # both convert labels/uint8 on the GPU; ONNX Runtime via I/O binding
    try:
        session = load_session(package, backend, "$DEVICE")
    except Exception as exc:
        print(json.dumps({"backend": backend, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        continue
    with session:
        default = session.suggest_batch_size((h, w, c)) or 4  # what czreg run picks without --batch-size
        for batch in (4, 16, 32, 64, None):
            b = batch or default
            x = np.random.default_rng(0).random((b, h, w, c), dtype=np.float32)
            session.predict(x)  # warm-up (cuDNN autotune for this shape)
            n, t0 = 0, time.perf_counter()
            while n < 20 * b or time.perf_counter() - t0 < 3.0:
                session.predict(x)
                n += b
            model_only = n / (time.perf_counter() - t0)
            row = {"backend": backend, "device": session.device, "batch": f"default ({b})" if batch is None else b,
                   "model_only_tiles_per_s": round(model_only, 1),
                   "converts_on_device": session.converts_on_device("labels")}
            for kind, suffix in KEYS:
                key = kind + suffix
                try:
                    res = run(".whl/unet.czann", work / "image.tif", work / f"tp-{backend}-{b}-{key}",
                              RunOptions(batch_size=b, auto_batch=batch is None, output_kind=kind, backend=backend,
                                         device="$DEVICE"))
                    row[key] = {"tiles_per_s": res.tiles_per_second,
                                "ratio": round(res.tiles_per_second / model_only, 3),
                                "batch": res.batch_size, "stages": res.stage_seconds}
                except Exception as exc:
                    row[key] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
print("| backend | batch | model only tiles/s | labels OME-TIFF tiles/s (end-to-end / model) | uint8 OME-TIFF | "
      "float32 OME-TIFF | labels Zarr |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    cells = [f"{r[k + s].get('tiles_per_s', 'error')} ({r[k + s].get('ratio', '-')})" for k, s in KEYS]
    print(f"| {r['backend']} | {r['batch']} | {r['model_only_tiles_per_s']} | " + " | ".join(cells) + " |")
EOF

step "tiled outputs: $DEVICE vs CPU (whole image)"
run compare.json 300 "$PY" - <<EOF
import json
from pathlib import Path
import numpy as np, tifffile

work = Path("$WORK")
ref_path = work / "unet-cpu-onnxruntime.ome.tif"
result = {}
for name in ("unet-$DEVICE-b4", "unet-$DEVICE-b32", "unet-cpu-torch"):
    path = work / f"{name}.ome.tif"
    if not (path.exists() and ref_path.exists()):
        result[name] = "missing"
        continue
    a, b = tifffile.imread(path), tifffile.imread(ref_path)  # 4096^2 x 2 float32: 128 MB each
    if a.shape != b.shape:
        result[name] = f"shape {a.shape} vs {b.shape}"
        continue
    diff = np.abs(a - b)
    result[name] = {"shape": list(a.shape), "max_abs_diff_vs_onnxruntime_cpu": float(diff.max()),
                    "mean_abs_diff": float(diff.mean()),
                    "argmax_label_disagreement": int(np.count_nonzero(a.argmax(-1) != b.argmax(-1)))}
print(json.dumps(result, indent=1))
EOF

step "summary"
"$PY" - <<EOF
import json
from pathlib import Path

out = Path("$OUT")
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}

summary = {"steps": (out / "steps.txt").read_text().split("\n"), "raw": load("raw.json"),
           "throughput": [l for l in (out / "throughput.json").read_text().splitlines() if l.startswith("|")]
           if (out / "throughput.json").exists() else [],
           "compare": load("compare.json"), "runs": {}, "smoke": {}, "validate": {}}
for f in sorted(out.glob("run-*.json")):
    r = load(f.name)
    summary["runs"][f.stem] = {k: r.get(k) for k in ("backend", "device", "tiles", "seconds", "tiles_per_second",
                                                     "predict_seconds", "batch_size")} if "tiles" in r else r
for f in sorted(out.glob("smoke-*.json")):
    r = load(f.name)
    summary["smoke"][f.stem] = {"valid": r.get("valid"), "measurements": r.get("measurements")}
for f in sorted(out.glob("validate-*.json")):
    r = load(f.name)
    r = r[0] if isinstance(r, list) and r else r  # validate --json prints an array (one report per package)
    summary["validate"][f.stem] = {"valid": r.get("valid"), "errors": [x for x in r.get("findings", [])
                                                                       if x.get("severity") == "error"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
echo "done; results in $OUT"
sleep 1  # let tee flush the log
