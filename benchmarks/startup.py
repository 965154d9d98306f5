"""Start-up benchmark: how long ``czreg`` takes before it does any work, against a bare Python start.

    .venv/bin/python benchmarks/startup.py [--runs 10]

Each row is the median wall time of ``--runs`` fresh processes (the same interpreter, ``python -m
czregistry``): ``python -c pass``, ``czreg --help``, ``czreg list`` on an empty registry and on one holding
20 versions (4 models x 5 versions, published with static validation). ``czreg list`` on a local SQLite
registry reads through ``czregistry.registry.quicklist`` (no SQLAlchemy); the goal is at most 10x a bare
start. Set-up is not timed. Wall time includes waiting for a CPU on a loaded machine; CPU time (user + system,
from ``wait4``) is steadier there. Compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from czregistry.package import write_package  # noqa: E402
from czregistry.registry import open_registry  # noqa: E402


def _package(folder: Path, seed: int) -> Path:
    meta = {"FormatVersion": "2.1.0", "Id": f"00000000-0000-4000-8000-{seed:012d}",
            "Type": "SingleClassSemanticSegmentation", "InputShape": [64, 64, 1], "OutputShape": [64, 64, 2],
            "MinOverlap": [16, 16], "ModelName": "bench", "Classes": ["background", "nucleus"]}
    path = folder / f"startup-{seed}.czann"
    write_package(path, meta, b"\x08\x07" + os.urandom(1000))
    return path


def _median(argv: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system) of ``runs`` fresh processes."""
    wall, cpu = [], []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall.append(time.perf_counter() - t)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
        cpu.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "CZREG_HOME": str(work / "home"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        empty, full = work / "empty", work / "full"
        empty.mkdir()
        full.mkdir()
        open_registry(str(empty)).close()
        with open_registry(str(full)) as reg:
            for i in range(20):
                reg.publish(_package(work, i), name=f"model-{i % 4}", version=f"1.{i // 4}.0", static=True)
        czreg = [sys.executable, "-m", "czregistry"]
        rows = [("python -c pass", [sys.executable, "-c", "pass"]),
                ("czreg --help", [*czreg, "--help"]),
                ("czreg list (empty registry)", [*czreg, "list", "--registry", str(empty)]),
                ("czreg list (20 versions)", [*czreg, "list", "--registry", str(full)]),
                ("czreg list --all-versions (20)", [*czreg, "list", "--all-versions", "--registry", str(full)])]
        results = [(label, *_median(argv, env, args.runs)) for label, argv in rows]
    _, bare_wall, bare_cpu = results[0]
    print(f"{'command':<32} {'wall ms':>9} {'x bare':>7} {'cpu ms':>8} {'x bare':>7}   (medians of {args.runs} runs)")
    for label, wall, cpu in results:
        print(f"{label:<32} {wall * 1000:>9.1f} {wall / bare_wall:>7.1f} {cpu * 1000:>8.1f} {cpu / bare_cpu:>7.1f}")


if __name__ == "__main__":
    main()
