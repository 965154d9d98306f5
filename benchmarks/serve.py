"""Registry server load benchmark: bounded concurrent clients on loopback against ``czreg serve`` on PostgreSQL
with 1 and 4 workers. Pulls (resolve + verified streaming download) and publishes (streamed upload, static
validation on the server, blob store, commit) per second, p50/p95 latency, errors.

    CZREG_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:54329/czreg_test \\
        .venv/bin/python benchmarks/serve.py [--clients 8] [--seconds 5] [--size-kb 256]

Each worker count gets a fresh database (created and dropped on the server the URL names) and blob store.
The clients are threads of this process using ``RemoteRegistry`` (what the CLI uses), each with its own
connection per request; on a small machine they compete with the server for the same cores, so read the
figures as relative (1 vs 4 workers), not as a capacity plan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from czregistry.package import write_package
from czregistry.registry import open_registry
from czregistry.registry.remote import RemoteRegistry
from czregistry.registry.tokens import create_token
from czregistry.server.process import ServerProcess

ROOT = str(Path(__file__).resolve().parents[1])


def _package(folder: Path, size: int, seed: int, name: str) -> Path:
    meta = {"FormatVersion": "2.1.0", "Id": str(uuid.UUID(int=seed + 1, version=4)),
            "Type": "SingleClassSemanticSegmentation", "InputShape": [64, 64, 1], "OutputShape": [64, 64, 2],
            "MinOverlap": [16, 16], "ModelName": name, "Classes": ["background", "nucleus"]}
    path = folder / f"{name}-{seed}.czann"
    write_package(path, meta, b"\x08\x07" + os.urandom(size))  # incompressible, like trained weights
    return path


def _database(base_url: str) -> tuple[str, Callable[[], None]]:
    name = f"czreg_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{base_url.rpartition('/')[0]}/{name}", drop


def _load(clients: int, seconds: float, op: Callable[[int, int], None]) -> tuple[int, int, list[float], float]:
    """Run ``op(client, i)`` from ``clients`` threads for ``seconds``; (ok, errors, latencies, elapsed)."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + seconds
    barrier = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        barrier.wait()
        i = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                op(c, i)
                lat[c].append(time.perf_counter() - t0)
            except Exception:
                errors[c] += 1
            i += 1

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    flat = [x for per in lat for x in per]
    return len(flat), sum(errors), flat, elapsed


def _row(workers: int, op: str, ok: int, errors: int, lat: list[float], elapsed: float) -> str:
    if lat:
        q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
        p50, p95 = statistics.median(lat) * 1000, q[18] * 1000
    else:
        p50 = p95 = float("nan")
    return f"| {workers:>7} | {op:<7} | {ok:>8} | {ok / elapsed:>8.1f} | {p50:>8.1f} | {p95:>8.1f} | {errors:>6} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postgres", default=os.environ.get("CZREG_TEST_POSTGRES_URL"),
                    help="A PostgreSQL server URL allowed to create databases [env CZREG_TEST_POSTGRES_URL]")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent clients (threads).")
    ap.add_argument("--seconds", type=float, default=5.0, help="Duration of each phase.")
    ap.add_argument("--size-kb", type=int, default=256, help="Package size.")
    ap.add_argument("--workers", default="1,4", help="Worker counts to compare.")
    args = ap.parse_args()
    if not args.postgres:
        sys.exit("needs a PostgreSQL server: --postgres URL or CZREG_TEST_POSTGRES_URL (bash .ci/postgres.sh)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="czreg-bench-serve-") as tmp:
        work = Path(tmp)
        # Enough distinct packages for every publish a phase can do (reused across worker counts: new databases).
        pool = [_package(work, args.size_kb * 1000, i, "bench") for i in range(args.clients * 25)]
        for workers in (int(w) for w in args.workers.split(",")):
            url, drop = _database(args.postgres)
            blobs = work / f"blobs-{workers}"
            try:
                with open_registry(url, str(blobs)) as reg:
                    secret = create_token(reg, "bench", "publish")[1]
                with ServerProcess.start(url, str(blobs), workers=workers, log_path=work / f"serve-{workers}.log",
                                         env={"CZREG_HOME": str(work / "home"), "PYTHONPATH": ROOT}) as srv:
                    client = RemoteRegistry(srv.url, token=secret)
                    client.publish(pool[0], name="seed", version="1.0.0", static=True)
                    out = work / f"pulled-{workers}"
                    out.mkdir()

                    def pull(c: int, i: int, client: RemoteRegistry = client, out: Path = out) -> None:
                        client.pull("seed>=1", out / f"{c}.czann")

                    def publish(c: int, i: int, client: RemoteRegistry = client) -> None:
                        p = pool[(c * 25 + i) % len(pool)]
                        client.publish(p, name=f"load-{c}", version=f"1.0.{i}", static=True)

                    client.pull("seed", out / "warm.czann")
                    rows.append(_row(workers, "pull", *_load(args.clients, args.seconds, pull)))
                    rows.append(_row(workers, "publish", *_load(args.clients, args.seconds, publish)))
            finally:
                drop()
    print(f"czreg serve on PostgreSQL, loopback, {args.clients} concurrent clients, {args.size_kb} KB packages, "
          f"{args.seconds:.0f} s per phase, {os.cpu_count()} CPUs")
    print("| workers | op      | requests |    ops/s |  p50 ms  |  p95 ms  | errors |")
    print("|---------|---------|----------|----------|----------|----------|--------|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
