"""How much does ``czreg validate --static`` cost?

Prints a table with
- the cold-process time of ``czreg validate --static PKG`` (median of several runs),
- the cold-process time of a bare ``python -c "import zipfile, json"`` (the floor any Python tool pays),
- their ratio (issue 2 asks for "a few times"),
- the time to validate N packages (default 1,000) in one process, and the per-package figure,
- whether the cold process imported TensorFlow or ONNX Runtime (it must not).

Run: ``.venv/bin/python benchmarks/validate_static.py [--runs 10] [--packages 1000] [--json]``.
The packages are small static ones (metadata plus dummy model bytes), so the figure measures the validator's
own overhead, not model size (CRC verification streams the model member at disk speed).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_DUMMY_ONNX = b"\x08\x07\x12\x07tf2onnx" + bytes(range(256)) * 16
_PROBE = (
    "import sys\n"
    "from czregistry.cli import main\n"
    "try:\n"
    "    main(['validate', '--static', sys.argv[1]])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('HEAVY=' + ','.join(m for m in ('tensorflow', 'onnxruntime', 'onnx', 'keras') if m in sys.modules))\n"
)


def _metadata(i: int) -> dict[str, Any]:
    return {"FormatVersion": "2.1.0", "Id": str(uuid.UUID(int=i + 1)), "Type": "MultiClassSemanticSegmentation",
            "InputShape": [256, 256, 1], "OutputShape": [256, 256, 3], "MinOverlap": [32, 32],
            "Classes": ["background", "nucleus", "membrane"], "ModelName": f"bench-{i}", "Scaling": [2e-7, 2e-7]}


def _cold(cmd: list[str], runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + sys) of a fresh process; CPU time is the steadier figure
    on a shared machine, wall time is what a user waits."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="cold-process runs per command (median is reported)")
    parser.add_argument("--packages", type=int, default=1000, help="packages validated in one process")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    from czregistry.checks import ValidateOptions
    from czregistry.package import write_package
    from czregistry.validate import validate

    with tempfile.TemporaryDirectory(prefix="czreg-bench-") as tmp:
        root = Path(tmp)
        one = write_package(root / "one.czann", _metadata(0), _DUMMY_ONNX)
        baseline, baseline_cpu = _cold([sys.executable, "-c", "import zipfile, json"], args.runs)
        czreg, czreg_cpu = _cold([sys.executable, "-m", "czregistry", "validate", "--static", str(one)], args.runs)
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(one)], capture_output=True, text=True, check=False)
        heavy = next((line[6:] for line in probe.stdout.splitlines() if line.startswith("HEAVY=")), "?")

        paths = [write_package(root / f"p{i}.czann", _metadata(i), _DUMMY_ONNX) for i in range(args.packages)]
        options = ValidateOptions(static=True)
        validate(paths[0], options)  # first call loads plugins and compiles schemas: count it separately
        start = time.perf_counter()
        invalid = sum(not validate(p, options).valid for p in paths)
        batch = time.perf_counter() - start

    figures = {
        "python": sys.version.split()[0],
        "cold_czreg_validate_static_s": round(czreg, 4),
        "cold_bare_python_s": round(baseline, 4),
        "ratio_wall": round(czreg / baseline, 2),
        "cold_czreg_validate_static_cpu_s": round(czreg_cpu, 4),
        "cold_bare_python_cpu_s": round(baseline_cpu, 4),
        "ratio_cpu": round(czreg_cpu / max(baseline_cpu, 1e-6), 2),
        "packages": args.packages,
        "in_process_total_s": round(batch, 3),
        "in_process_per_package_ms": round(1000 * batch / args.packages, 3),
        "invalid_packages": invalid,
        "heavy_modules_imported": heavy or "none",
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    rows = [
        ("cold `czreg validate --static`, wall (median)", f"{czreg * 1000:.0f} ms"),
        ('cold `python -c "import zipfile, json"`, wall (median)', f"{baseline * 1000:.0f} ms"),
        ("ratio, wall", f"{czreg / baseline:.1f}x"),
        ("cold `czreg validate --static`, CPU (median)", f"{czreg_cpu * 1000:.0f} ms"),
        ('cold `python -c "import zipfile, json"`, CPU (median)', f"{baseline_cpu * 1000:.0f} ms"),
        ("ratio, CPU", f"{figures['ratio_cpu']:.1f}x"),
        (f"validate {args.packages:,} packages in one process", f"{batch:.2f} s"),
        ("per package", f"{1000 * batch / args.packages:.2f} ms"),
        ("TensorFlow / ONNX Runtime imported by --static", heavy or "none"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
