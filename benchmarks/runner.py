"""Benchmark of the tiled runner, printed as one table.

Columns, on the same small segmentation model (ONNX Runtime, CPU) and the same tile size:

(a) raw      the backend alone on tiles already in memory, batched: the ceiling for any runner;
(b) runner   ``czregistry.run.runner.run`` on a generated tiled TIFF of N x N pixels, writing an OME-TIFF label
             image, in a subprocess so its peak RSS is its own;
(c) naive    a per-tile loop as public examples write it: a new ONNX Runtime session per call, batch 1
             (timed on a sample of tiles and extrapolated to the whole image);
(d) MONAI    ``monai.inferers.sliding_window_inference`` with the same ONNX Runtime model as predictor,
             only if a Python with MONAI and a CPU torch is given (``--monai-python``): it needs the whole
             image and the whole output in memory.

Run: ``.venv/bin/python benchmarks/runner.py`` (about 3-5 minutes on 2 cores);
``--sizes 2048 4096`` for a quick look. Everything is written to a temp folder and removed afterwards.

``--backend null`` (or ``--host``) measures the runner's own (host-side) cost alone: the same pipeline with
the ``null`` backend (``benchmarks/null_backend.py``, registered in-process only) whose ``predict`` returns
a precomputed batch of realistic probabilities (smooth class regions, full-precision float32 noise) in no
time, so what remains is reading, scaling, batching, assembling, converting, compressing and writing. It
runs float32 probabilities, uint8 and labels into OME-TIFF and Zarr (``--repeat`` times each, median kept:
the machine may be shared) and prints tiles/s, CPU ms per tile, the tiles/s each stage's busy time alone
allows, and the memory / disk bandwidth that bound float32 output; ``--json`` gives ``tiles_per_s`` per
configuration. ``--device-convert`` lets the session convert to labels/uint8 itself, as the torch backend
does on a GPU. No TensorFlow needed; about half a minute at the default 8192 x 8192.

``--dask [--workers 1 2 4] [--sizes 8192]`` compares the single-process runner with ``czreg run --dask
local:N`` (``czregistry.run.dask_run``) on the same image, both writing labels to Zarr: wall time including the
LocalCluster start, the overhead against the single process, the tiles predicted (seam tiles of blocks
count twice) and whether the outputs are identical. On 2 cores expect parity at best, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TILE = 256
OVERLAP = 32
DEFAULT_SIZES = [4096, 8192, 16384]


def build_package(dest: Path) -> Path:
    """A small U-Net-like segmentation model (one 2x2 pooling, 4-8 channels) as a .czann."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import keras
    from keras import layers

    sys.path.insert(0, str(ROOT))
    from czregistry.package import write_package
    from tests.models import export_onnx, metadata_for

    keras.utils.set_random_seed(7)
    inp = keras.Input((None, None, 1))
    c1 = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    p1 = layers.MaxPooling2D(2)(c1)
    c2 = layers.Conv2D(8, 3, padding="same", activation="relu")(p1)
    u1 = layers.Concatenate()([layers.UpSampling2D(2)(c2), c1])
    out = layers.Conv2D(2, 1, activation="softmax")(u1)
    model = keras.Model(inp, out, name="bench")
    meta = metadata_for("unet", tile=TILE, overlap=OVERLAP)
    meta["ModelName"] = "benchmark-small-unet"
    path = dest / "bench.czann"
    write_package(path, meta, export_onnx(model))
    return path


def make_image(path: Path, size: int) -> None:
    """An uncompressed, 256x256-tiled uint8 TIFF of ``size`` x ``size`` (read through tifffile's Zarr store,
    so the runner's RSS is not inflated by a memory map)."""
    import tifffile

    rng = np.random.default_rng(size)
    block = (rng.random((1024, 1024)) * 255).astype(np.uint8)

    def tiles() -> Any:
        for y in range(0, size, 256):
            for x in range(0, size, 256):
                yield block[y % 1024:y % 1024 + 256, x % 1024:x % 1024 + 256]

    tifffile.imwrite(path, data=tiles(), shape=(size, size), dtype=np.uint8, tile=(256, 256),
                     metadata={"axes": "YX"})


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (robust to other load on a shared machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_mb() -> float:
    """Peak RSS of this process. ``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across exec, so
    a child forked from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- host overhead alone (the null backend) ------------------------------------------------------------

STAGES = ["read", "predict", "assemble", "convert", "write", "encode"]
CASES = [(kind, suffix) for suffix in (".ome.tif", ".zarr") for kind in ("probabilities", "uint8", "labels")]


def bandwidth(tmp: Path, mb: int = 256) -> dict[str, float]:
    """Memory copy and disk write bandwidth here (MB/s), the bounds for float32 output."""
    a = np.ones(mb * 1024 * 1024 // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    path = tmp / "bandwidth.bin"
    t0 = time.perf_counter()
    with path.open("wb") as fh:
        for _ in range(mb // 16):
            fh.write(a[:4 * 1024 * 1024].data)
        fh.flush()
        os.fsync(fh.fileno())
    disk = time.perf_counter() - t0
    path.unlink()
    return {"memcpy_mb_s": mb / best, "disk_write_mb_s": mb / disk}


def host_overhead(tmp: Path, size: int, batch: int, cases: list[tuple[str, str, str, str]], repeat: int = 1,
                  device_convert: bool = False, profile: str = "demo") -> list[dict[str, Any]]:
    """Run the pipeline with the null backend, returning ``profile``'s output (``null_backend.PROFILES``),
    for each ``(output kind, suffix, compression, OME-TIFF layout)`` case, ``repeat`` times; each row keeps
    the median run (the machine may be shared) and all runs' tiles/s. Cases that differ only in their
    layout run back to back in each round (interleaved, planar, interleaved, planar, ...), so the machine's
    drift hits both alike."""
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run
    from czregistry.run.tiling import plan_tiles

    sys.path.insert(0, str(ROOT))
    from benchmarks.null_backend import build_null_package, register_null_backend, warm

    register_null_backend(device_convert=device_convert, profile=profile)
    package = build_null_package(tmp)
    image = tmp / f"host{size}.tif"
    make_image(image, size)
    # the null outputs are computed once per process, before any timed run
    tiles = plan_tiles((size, size), (TILE, TILE), border=OVERLAP // 2, step=(2, 2)).n_tiles
    warm(batch, TILE, tiles=tiles, kinds=("uint8", "labels") if device_convert else (), profile=profile)
    groups: dict[tuple[str, str, str], list[tuple[str, str, str, str]]] = {}
    for case in cases:
        groups.setdefault(case[:3], []).append(case)
    rows = []
    for group in groups.values():
        runs: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {case: [] for case in group}
        for i in range(repeat):
            for case in group:
                kind, suffix, compression, layout = case
                out = tmp / f"host-out-{profile}-{kind}-{layout}-{i}{suffix}"
                # the null model cannot be probed: give the U-Net's grid (stride 2, border 16) directly
                cpu0 = _cpu_seconds()
                load = os.getloadavg()[0]
                res = run(package, image, out, RunOptions(
                    batch_size=batch, output_kind=kind, backend="null",  # type: ignore[arg-type]
                    compression=compression, tiff_layout=layout, probe=False, step=2))  # type: ignore[arg-type]
                cpu = _cpu_seconds() - cpu0
                nbytes = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
                pixels = int(np.prod(res.shape))
                raw_mb = pixels * np.dtype(res.dtype).itemsize / 1e6
                runs[case].append({
                    "kind": kind, "profile": profile, "format": res.format, "compression": res.compression,
                    "tiff_layout": res.tiff_layout, "tiles": res.tiles, "pipeline_s": res.pipeline_seconds,
                    "ms_per_tile": res.pipeline_seconds / res.tiles * 1000,
                    "tiles_per_s": res.tiles / res.pipeline_seconds, "stages": res.stage_seconds,
                    "stage_tiles_per_s": {k: (res.tiles / v if v > 0 else None) for k, v in res.stage_seconds.items()},
                    "cpu_ms_per_tile": cpu / res.tiles * 1000, "mb": nbytes / 1e6,
                    "raw_mb_per_s": raw_mb / res.pipeline_seconds, "load": load})
                # Zarr outputs stay until the benchmark ends: deleting ~1,400 chunk files right before the
                # next run made ext4's inode allocator (its scan past recently deleted inodes) the
                # bottleneck, over half of all CPU time in the kernel, which a real run never meets
                if not out.is_dir():
                    out.unlink()
        for case in group:
            done = runs[case]
            median = sorted(done, key=lambda r: r["tiles_per_s"])[(len(done) - 1) // 2]
            rows.append({**median, "runs_tiles_per_s": [round(r["tiles_per_s"], 1) for r in done],
                         "runs_load": [round(r["load"], 2) for r in done]})
    image.unlink()
    return rows


def print_host(rows: list[dict[str, Any]], size: int, batch: int, bw: dict[str, float] | None = None) -> None:
    print(f"\nhost pipeline alone: {size}x{size} uint8 tiled TIFF, null backend (predict returns a cached batch), "
          f"tile {TILE}, batch {batch}, {os.cpu_count()} cores; tiles/s is the median of the runs listed; CPU ms/tile "
          "counts all threads; stage columns are tiles/s of each stage's busy time alone (stages overlap, "
          "the slowest bounds the run)")
    head = ("| output | profile | compression | tiles | tiles/s | runs | load (1 min) | CPU ms/tile | output MB | "
            "raw MB/s | " + " | ".join(STAGES) + " |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for r in rows:
        st = r["stage_tiles_per_s"]
        layout = f" {r['tiff_layout']}" if r["tiff_layout"] and r["kind"] != "labels" else ""
        print(f"| {r['kind']} {r['format']}{layout} | {r['profile']} | {r['compression']} | {r['tiles']} | "
              f"{r['tiles_per_s']:.0f} | "
              f"{'/'.join(f'{x:.0f}' for x in r['runs_tiles_per_s'])} | "
              f"{'/'.join(f'{x:.1f}' for x in r['runs_load'])} | {r['cpu_ms_per_tile']:.2f} | "
              f"{r['mb']:.0f} | {r['raw_mb_per_s']:.0f} | "
              + " | ".join("-" if st.get(k) is None else f"{st[k]:.0f}" for k in STAGES) + " |")
    if bw:
        print(f"bounds here: memory copy {bw['memcpy_mb_s']:.0f} MB/s, disk write (fsync) "
              f"{bw['disk_write_mb_s']:.0f} MB/s; float32 two-class output is 0.52 MB per 256x256 tile")


# --- children ------------------------------------------------------------------------------------------


def child_runner(package: str, image: str, out: str, batch: int) -> dict[str, Any]:
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    t0 = time.perf_counter()
    res = run(package, image, out, RunOptions(batch_size=batch, output_kind="labels", device="cpu"))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "pipeline_seconds": res.pipeline_seconds, "predict_seconds": res.predict_seconds,
            "tiles": res.tiles, "tiles_per_s": res.tiles / dt, "rss_mb": _maxrss_mb(), "grid": res.grid}


def child_raw(package: str, batch: int, n: int) -> dict[str, Any]:
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(package), device="cpu") as s:
        x = np.random.default_rng(0).random((batch, TILE, TILE, 1), dtype=np.float32)
        s.predict(x)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            s.predict(x)
            done += batch
        dt = time.perf_counter() - t0
    return {"tiles_per_s": done / dt, "rss_mb": _maxrss_mb()}


def child_naive(package: str, n: int) -> dict[str, Any]:
    import onnxruntime as ort

    from czregistry.package import open_package

    model = open_package(package).read_model_bytes()
    x = np.random.default_rng(0).random((1, TILE, TILE, 1), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(n):
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x})
    dt = time.perf_counter() - t0
    return {"tiles_per_s": n / dt, "rss_mb": _maxrss_mb()}


MONAI_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort, tifffile, torch, zipfile
from monai.inferers import sliding_window_inference
package, image, tile, overlap, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
model = zipfile.ZipFile(package).read("model.model")
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
def predictor(x):
    y = sess.run(None, {name: np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))})[0]
    return torch.from_numpy(y.transpose(0, 3, 1, 2).copy())
t0 = time.perf_counter()
img = torch.from_numpy(tifffile.imread(image).astype(np.float32) / 255)[None, None]
with torch.no_grad():
    out = sliding_window_inference(img, (tile, tile), batch, predictor, overlap=overlap / tile, mode="constant")
labels = out[0].argmax(0).to(torch.uint8).numpy()
tifffile.imwrite(sys.argv[6], labels, tile=(256, 256), compression="zlib")
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": dt, "rss_mb": int(hwm) / 1024}))
"""


def child_zarr_runner(package: str, image: str, out: str, batch: int) -> dict[str, Any]:
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    res = run(package, image, out, RunOptions(batch_size=batch, output_kind="labels", device="cpu"))
    return {"seconds": time.perf_counter() - t0, "tiles": res.tiles, "predict_seconds": res.predict_seconds,
            "cpu": _cpu_seconds() - cpu0}


def child_dask(package: str, image: str, out: str, batch: int, workers: int, block: int) -> dict[str, Any]:
    from czregistry.run.dask_run import run_dask
    from czregistry.run.plan import RunOptions

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    res = run_dask(package, [image], out, RunOptions(batch_size=batch, output_kind="labels", device="cpu"),
                   scheduler=f"local:{workers}", block=block or None)
    # CPU of this process: all of local:1's work (its worker is a thread here), only the client's otherwise
    return {"seconds": time.perf_counter() - t0, "tiles_run": res.tiles_run, "tiles": res.tiles,
            "blocks": res.blocks, "redundancy": res.redundancy, "workers": res.workers,
            "cpu": _cpu_seconds() - cpu0 if workers == 1 else None}


def dask_table(tmp: Path, sizes: list[int], workers: list[int], batch: int, block: int, repeat: int = 1) -> None:
    """Single process and ``--dask local:N``, interleaved ``repeat`` times (the machine may be shared: each
    round runs every configuration back to back); medians with all runs in brackets."""
    from czregistry.run.dask_run import read_output

    package = build_package(tmp)
    me = str(Path(__file__).resolve())
    print(f"\nmodel: small U-Net (1 pooling), tile {TILE}, overlap {OVERLAP}, batch {batch}, ONNX Runtime CPU, "
          f"{os.cpu_count()} cores; labels to Zarr; dask = czreg run --dask local:N (block {block or 'default'}); "
          f"{repeat} interleaved round(s)\n")
    print("| image | workers | wall s, median (runs) | vs single process (per round) | CPU s, median (x single) "
          "| tiles predicted (grid) | blocks | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        image = tmp / f"img{size}.tif"
        make_image(image, size)
        ref = tmp / f"single{size}.zarr"
        runs: dict[str, list[float]] = {"single": [], **{f"local:{n}": [] for n in workers}}
        cpus: dict[str, list[float]] = {k: [] for k in runs}
        info: dict[str, dict[str, Any]] = {}
        same: dict[str, bool] = {}
        ratios: dict[str, list[float]] = {f"local:{n}": [] for n in workers}
        for _ in range(repeat):
            shutil.rmtree(ref, ignore_errors=True)
            single = _child([me, "--child", "zarr", str(package), str(image), str(ref), str(batch)])
            runs["single"].append(single["seconds"])
            cpus["single"].append(single["cpu"])
            info["single"] = single
            want = read_output(ref)
            for n in workers:
                out = tmp / f"dask{size}-{n}.zarr"
                d = _child([me, "--child", "dask", str(package), str(image), str(out), str(batch), str(n),
                            str(block)])
                runs[f"local:{n}"].append(d["seconds"])
                if d.get("cpu") is not None:
                    cpus[f"local:{n}"].append(d["cpu"])
                ratios[f"local:{n}"].append(d["seconds"] / single["seconds"])
                info[f"local:{n}"] = d
                same[f"local:{n}"] = same.get(f"local:{n}", True) and bool(np.array_equal(read_output(out), want))
                shutil.rmtree(out, ignore_errors=True)

        def fmt(xs: list[float]) -> str:
            return f"{float(np.median(xs)):.1f} ({'/'.join(f'{x:.1f}' for x in xs)})"

        # CPU seconds of the process (all threads): steadier than wall time on a shared or virtual machine,
        # and for local:1 (a worker thread in the process) the whole cost of the run; worker processes'
        # CPU is not seen from here ("-")
        cpu_single = float(np.median(cpus["single"]))

        def cpu(k: str, cpus: dict[str, list[float]] = cpus, base: float = cpu_single) -> str:
            return f"{float(np.median(cpus[k])):.1f} ({float(np.median(cpus[k])) / base:.2f}x)" if cpus[k] else "-"

        print(f"| {size}x{size} | single process | {fmt(runs['single'])} | 1.00x | {cpu('single')} | "
              f"{info['single']['tiles']} | - | - |")
        for n in workers:
            k = f"local:{n}"
            d, r = info[k], ratios[k]
            print(f"| {size}x{size} | {k} | {fmt(runs[k])} | {float(np.median(r)):.2f}x "
                  f"({'/'.join(f'{x:.2f}' for x in r)}) | {cpu(k)} | {d['tiles_run']} ({d['tiles']}, "
                  f"x{d['redundancy']:.2f}) | "
                  f"{d['blocks']} | {same[k]} |", flush=True)
        shutil.rmtree(ref, ignore_errors=True)
        image.unlink()


def _child(args: list[str], python: str | None = None) -> dict[str, Any]:
    cmd = [python or sys.executable, *args]
    env = {**os.environ, "CZREG_PLUGINS": "onnxruntime", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.null_backend import PROFILES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--naive-tiles", type=int, default=30)
    ap.add_argument("--raw-tiles", type=int, default=200)
    ap.add_argument("--monai-python", default=None, help="a Python with torch (CPU) + monai + onnxruntime")
    ap.add_argument("--backend", choices=["onnxruntime", "null"], default="onnxruntime",
                    help="null: measure the host-side pipeline alone (benchmarks/null_backend.py)")
    ap.add_argument("--host", action="store_true", help="same as --backend null")
    ap.add_argument("--repeat", type=int, default=3,
                    help="with --backend null: runs per configuration (the median is reported)")
    ap.add_argument("--profile", choices=[*PROFILES, "both"], default="both",
                    help="with --backend null: what the null model returns: the demo model's output (compresses "
                         "like a trained network's), per-pixel noise (a worst case), or both")
    ap.add_argument("--device-convert", action="store_true",
                    help="with --backend null: the session converts to labels/uint8 itself, as a GPU backend does")
    ap.add_argument("--only", nargs="+", default=None, metavar="KIND:FORMAT",
                    help="with --backend null: only these configurations, e.g. labels:tiff uint8:zarr")
    ap.add_argument("--tiff-layouts", nargs="+", choices=["interleaved", "planar"], default=None,
                    metavar="LAYOUT", help="with --backend null: OME-TIFF layouts of multi-class outputs, run back "
                                           "to back in each round (default: the runner's default only)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--compare-zlib", action="store_true",
                    help="with --backend null: also run float32 output with --compression zlib (the old default)")
    ap.add_argument("--dask", action="store_true", help="single process vs czreg run --dask local:N")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="with --dask: worker counts to time")
    ap.add_argument("--block-size", type=int, default=0, help="with --dask: block edge (default: the runner's)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "zarr":
            res = child_zarr_runner(rest[0], rest[1], rest[2], int(rest[3]))
        elif kind == "dask":
            res = child_dask(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]))
        elif kind == "runner":
            res = child_runner(rest[0], rest[1], rest[2], int(rest[3]))
        elif kind == "raw":
            res = child_raw(rest[0], int(rest[1]), int(rest[2]))
        else:
            res = child_naive(rest[0], int(rest[1]))
        print(json.dumps(res))
        return

    tmp = Path(tempfile.mkdtemp(prefix="czreg-bench-"))
    if args.dask:
        sizes = args.sizes if args.sizes != [4096, 8192, 16384] else [8192]
        try:
            dask_table(tmp, sizes, args.workers, args.batch_size, args.block_size, args.repeat)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if args.host or args.backend == "null":
        from czregistry.run.plan import RunOptions

        layouts = args.tiff_layouts or [RunOptions().tiff_layout]
        cases = [(kind, suffix, compression, layout) for kind, suffix in CASES
                 if not args.only or f"{kind}:{'zarr' if suffix == '.zarr' else 'tiff'}" in args.only
                 for compression in ("auto", *(("zlib",) if args.compare_zlib and kind == "probabilities"
                                               and suffix != ".zarr" else ()))
                 for layout in (layouts if suffix != ".zarr" and kind != "labels" else layouts[:1])]
        sizes = args.sizes if args.sizes != DEFAULT_SIZES else [8192]
        try:
            bw = bandwidth(tmp)
            results = []
            for size in sizes:
                rows = [row for profile in (PROFILES if args.profile == "both" else (args.profile,))
                        for row in host_overhead(tmp, size, args.batch_size, cases, args.repeat,
                                                 args.device_convert, profile)]
                results.append({"size": size, "batch_size": args.batch_size, "cores": os.cpu_count(),
                                "device_convert": args.device_convert, "bandwidth": bw, "configurations": rows})
                if not args.json:
                    print_host(rows, size, args.batch_size, bw)
            if args.json:
                print(json.dumps(results, indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        package = build_package(tmp)
        me = str(Path(__file__).resolve())
        naive = _child([me, "--child", "naive", str(package), str(args.naive_tiles)])
        monai_py = args.monai_python
        if monai_py:
            script = tmp / "monai_child.py"
            script.write_text(MONAI_CHILD)
        rows = []
        for size in args.sizes:
            image = tmp / f"img{size}.tif"
            make_image(image, size)
            # raw throughput measured right before each run: the machine may be shared and its load varies
            raw = _child([me, "--child", "raw", str(package), str(args.batch_size), str(args.raw_tiles)])
            r = _child([me, "--child", "runner", str(package), str(image), str(tmp / f"out{size}.ome.tif"),
                        str(args.batch_size)])
            mp = size * size / 1e6
            row: dict[str, Any] = {"size": size, "tiles": r["tiles"], "runner_s": r["seconds"],
                                   "runner_pipeline_s": r["pipeline_seconds"], "raw_tps": raw["tiles_per_s"],
                                   "runner_tps": r["tiles_per_s"], "runner_rss": r["rss_mb"],
                                   "raw_s": r["tiles"] / raw["tiles_per_s"],
                                   "naive_s": r["tiles"] / naive["tiles_per_s"], "mp": mp}
            if monai_py:
                try:
                    m = _child([str(tmp / "monai_child.py"), str(package), str(image), str(TILE), str(OVERLAP),
                                str(args.batch_size), str(tmp / f"monai{size}.tif")], python=monai_py)
                    row.update(monai_s=m["seconds"], monai_rss=m["rss_mb"])
                except RuntimeError as exc:
                    row.update(monai_error=str(exc))
            for p in tmp.glob(f"*{size}*"):
                p.unlink()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        print(f"\nmodel: small U-Net (1 pooling), tile {TILE}, overlap {OVERLAP}, batch {args.batch_size}, "
              f"ONNX Runtime CPU, {os.cpu_count()} cores")
        print(f"(c) naive new-session loop: {naive['tiles_per_s']:.1f} tiles/s (timed on {args.naive_tiles} tiles, "
              "extrapolated); (b) runner s = wall time incl. loading and probing the model, "
              "pipeline = reading+predicting+writing; runner/raw compares the pipeline with (a)\n")
        head = ("| image | tiles | (a) raw s | (b) runner s (pipeline) | runner/raw | runner peak RSS | (c) naive s |"
                + (" (d) MONAI s | MONAI peak RSS |" if monai_py else ""))
        print(head)
        print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
        for r in rows:
            line = (f"| {r['size']}x{r['size']} | {r['tiles']} | {r['raw_s']:.1f} | {r['runner_s']:.1f} "
                    f"({r['runner_pipeline_s']:.1f}) | {r['raw_s'] / r['runner_pipeline_s'] * 100:.0f}% | "
                    f"{r['runner_rss']:.0f} MB | {r['naive_s']:.1f} |")
            if monai_py:
                line += (f" {r['monai_s']:.1f} | {r['monai_rss']:.0f} MB |" if "monai_s" in r
                         else f" failed | {r.get('monai_error', '')[:40]} |")
            print(line)
        if not monai_py:
            print("\n(d) MONAI skipped: pass --monai-python PATH (a venv with torch CPU, monai, onnxruntime, tifffile)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
