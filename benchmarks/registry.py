"""Registry benchmark: publish/pull throughput (1 MB and 100 MB packages) against a plain copy + SHA-256,
and list/resolve/pull latency with 10,000 versions in the registry.

    .venv/bin/python benchmarks/registry.py                 # temp SQLite registry
    .venv/bin/python benchmarks/registry.py --registry postgresql+psycopg://u@host/db --blob-store /tmp/b

Publish includes static validation (which hashes the file and checks every member's CRC) and storing the
blob (hash + fsync + rename): it reads the package about three times. Pull streams the blob once, hashing
as it writes, and fsyncs before the rename. The 10,000 versions are inserted in bulk (same rows a publish
writes, sharing one blob) so the set-up takes seconds rather than the ~minutes 10,000 validations take.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from czregistry.package import write_package
from czregistry.registry import Registry, open_registry

MB = 1_000_000


def _package(folder: Path, size: int, seed: int) -> Path:
    meta = {"FormatVersion": "2.1.0", "Id": f"00000000-0000-4000-8000-{seed:012d}",
            "Type": "SingleClassSemanticSegmentation", "InputShape": [64, 64, 1], "OutputShape": [64, 64, 2],
            "MinOverlap": [16, 16], "ModelName": "bench", "Classes": ["background", "nucleus"]}
    body = b"\x08\x07" + os.urandom(size)  # incompressible, like trained weights
    path = folder / f"bench-{size}-{seed}.czann"
    write_package(path, meta, body)
    return path


def _copy_and_hash(src: Path, dst: Path) -> None:
    """The floor for pull: one streamed pass, hashing while writing, fsync, rename."""
    h = hashlib.sha256()
    tmp = dst.with_suffix(".part")
    with src.open("rb") as fi, tmp.open("wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    tmp.replace(dst)


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(reg: Registry, work: Path, size: int, n: int) -> list[tuple[str, str, str]]:
    pkgs = [_package(work, size, i) for i in range(n)]
    nbytes = pkgs[0].stat().st_size
    name = f"bench-{size // MB}mb"
    pub = []
    for i, p in enumerate(pkgs):
        t = time.perf_counter()
        reg.publish(p, name=name, version=f"1.0.{i}", static=True)
        pub.append(time.perf_counter() - t)
    out = work / "out"
    out.mkdir(exist_ok=True)
    pull = _timed(lambda: reg.pull(f"{name}==1.0.0", out / "pulled.czann"), n)
    base = _timed(lambda: _copy_and_hash(pkgs[0], out / "copy.czann"), n)
    for p in pkgs:
        p.unlink()

    def row(label: str, times: list[float]) -> tuple[str, str, str]:
        med = statistics.median(times)
        return label, f"{med * 1000:.1f} ms", f"{nbytes / med / MB:.0f} MB/s"

    return [row(f"publish {size // MB} MB (static validation + store)", pub),
            row(f"pull {size // MB} MB (stream + verify + fsync)", pull),
            row(f"plain copy + sha256 {size // MB} MB", base)]


def many_versions(reg: Registry, work: Path, n: int, url: str | None, blobs: str) -> list[tuple[str, str, str]]:
    from sqlalchemy import insert

    from czregistry.registry.models import Model, Version

    seed = reg.publish(_package(work, 10_000, 999_999), name="big", version="0.0.0", static=True).version
    digest, size = seed["digest"][7:], seed["size"]
    now = datetime.now(UTC)
    with reg.engine.begin() as conn:
        model_id = conn.execute(Model.__table__.select().where(Model.name == "big")).first().id  # type: ignore[union-attr]
        report = json.dumps({"valid": True, "findings": [], "measurements": {}})
        rows = [{"model_id": model_id, "version": f"{1 + i // 1000}.{(i // 10) % 100}.{i % 10}",
                     "version_key": f"{1 + i // 1000}.{(i // 10) % 100}.{i % 10}", "digest": digest, "size": size,
                     "kind": "czann", "model_type": "SingleClassSemanticSegmentation", "classes": '["bg", "fg"]',
                     "valid": True, "allow_invalid": False, "report": report, "smoke": None, "created_at": now,
                     "created_by": "bench", "host": "bench", "source_name": "bench.czann", "czreg_version": "bench",
                     "note": None, "yanked": False} for i in range(n - 1)]
        from packaging.version import Version as PV

        from czregistry.registry.versions import sort_key, version_key

        for r in rows:
            v = PV(r["version"])
            r.update(version_key=version_key(v), sort_key=sort_key(v), is_pre=v.is_prerelease)
        conn.execute(insert(Version), rows)
    out = work / "out"
    out.mkdir(exist_ok=True)
    latest = reg.resolve("big").version["version"]
    pin = rows[len(rows) // 2]["version"]
    tests: list[tuple[str, Callable[[], object]]] = [
        ("list (newest per model)", lambda: reg.search()),
        ("list big --all-versions", lambda: reg.search(name="big", all_versions=True)),
        (f"resolve big=={pin} (exact pin)", lambda: reg.resolve(f"big=={pin}")),
        ("resolve 'big>=1,<2' (specifier)", lambda: reg.resolve("big>=1,<2")),
        (f"pull big=={pin}", lambda: reg.pull(f"big=={pin}", out / "p.czann")),
        ("pull 'big>=1,<2'", lambda: reg.pull("big>=1,<2", out / "p.czann")),
        ("show big (all versions)", lambda: reg.show("big")),
    ]
    rows_out = []
    for label, fn in tests:
        fn()
        times = _timed(fn, 5)
        rows_out.append((f"{label} [{n} versions]", f"{statistics.median(times) * 1000:.1f} ms", ""))
    cli = [sys.executable, "-m", "czregistry", "--help"]
    env = {**os.environ, "CZREG_REGISTRY": url or reg.location.url, "CZREG_BLOB_STORE": blobs}
    for label, args in (("czreg list (CLI process, wall)", ["list", "--json"]),
                        (f"czreg pull big=={pin} (CLI process, wall)", ["pull", f"big=={pin}", "-o", f"{out}/"])):
        t = time.perf_counter()
        subprocess.run([*cli[:3], *args], env=env, check=True, capture_output=True)
        rows_out.append((label, f"{(time.perf_counter() - t) * 1000:.0f} ms", ""))
    rows_out.append((f"(latest of big: {latest})", "", ""))
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", help="registry URL (default: a temp SQLite registry)")
    ap.add_argument("--blob-store", help="blob folder (default: a temp folder)")
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="czreg-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CZREG_HOME", str(work / "home"))
        blobs = args.blob_store or str(work / "blobs")
        reg = open_registry(args.registry or str(work / "reg"), blobs)
        rows: list[tuple[str, str, str]] = []
        sizes = [(MB, 10), (10 * MB, 3)] if args.quick else [(MB, 20), (100 * MB, 3)]
        for size, n in sizes:
            rows += throughput(reg, work, size, n)
        rows += many_versions(reg, work, 500 if args.quick else args.versions, args.registry, blobs)
        reg.close()
    w = max(len(r[0]) for r in rows)
    print(f"registry: {'temp SQLite' if not args.registry else args.registry.split('@')[-1]}  "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(f"{'operation':<{w}}  {'median':>10}  {'throughput':>10}")
    print("-" * (w + 24))
    for label, t, thr in rows:
        print(f"{label:<{w}}  {t:>10}  {thr:>10}")


if __name__ == "__main__":
    main()
