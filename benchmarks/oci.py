"""OCI benchmark: push/pull of a ~50 MB package to a local CNCF distribution registry (Debian's
docker-registry on loopback, plain HTTP, storage in a temp folder) against ``cp`` + ``sha256sum``.

    .venv/bin/python benchmarks/oci.py [--size-mb 50] [--repeat 3]

Push hashes the package, uploads the layer (one streamed PUT), the report, signature and attestation, and
writes the manifests and the referrers index; "push again" is the same push when the registry already has
every blob (a HEAD per blob, manifests re-put). Pull fetches the manifest and the referrers, streams the
layer to a temp file while hashing it, fsyncs and renames; "pull --key" also verifies the model-signing
signature and the attestation (which hashes the file once more). Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from czregistry.package import write_package
from czregistry.sharing import oci
from czregistry.sharing.signing import attestation_path, generate_keypair, sign_package, signature_path
from tests.oci_registry import BINARY, run_registry

MB = 1_000_000


def _median(fn: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if BINARY is None:
        sys.exit("docker-registry is not installed (apt-get install docker-registry)")
    with tempfile.TemporaryDirectory(prefix="czreg-oci-bench-") as tmp:
        root = Path(tmp)
        meta = {"FormatVersion": "2.1.0", "Id": "00000000-0000-4000-8000-000000000050",
                "Type": "SingleClassSemanticSegmentation", "InputShape": [64, 64, 1], "OutputShape": [64, 64, 2],
                "MinOverlap": [16, 16], "ModelName": "bench", "Classes": ["background", "nucleus"]}
        pkg = root / "bench.czann"
        write_package(pkg, meta, b"\x08\x07" + os.urandom(int(args.size_mb * MB)))  # random bytes: timing only
        size = pkg.stat().st_size
        generate_keypair(root / "k.pem", root / "k.pub")
        sign_package(pkg, root / "k.pem", report={"valid": True, "note": "benchmark: not validated"})
        sig, att = signature_path(pkg).read_bytes(), attestation_path(pkg).read_bytes()
        report = {"valid": True, "note": "benchmark"}

        def cp_sha(i: int) -> None:
            dest = root / f"cp-{i}.czann"
            subprocess.run(["cp", str(pkg), str(dest)], check=True)
            subprocess.run(["sha256sum", str(dest)], check=True, capture_output=True)

        rows: list[tuple[str, float]] = []
        rows.append(("cp + sha256sum", _median(cp_sha, args.repeat)))
        with run_registry(root / "registry") as host:
            def push(i: int) -> None:
                oci.push(pkg, f"oci://{host}/bench/cold{i}:1", plain_http=True, report=report, signature=sig,
                         attestation=att)

            def push_again(i: int) -> None:
                oci.push(pkg, f"oci://{host}/bench/cold0:1", plain_http=True, report=report, signature=sig,
                         attestation=att)

            def pull(i: int) -> None:
                oci.pull(f"oci://{host}/bench/cold0:1", root / f"pull-{i}", plain_http=True)

            def pull_key(i: int) -> None:
                oci.pull(f"oci://{host}/bench/cold0:1", root / f"pullk-{i}", plain_http=True, key=root / "k.pub")

            rows.append(("czreg push (new repository)", _median(push, args.repeat)))
            rows.append(("czreg push again (blobs present)", _median(push_again, args.repeat)))
            rows.append(("czreg pull", _median(pull, args.repeat)))
            rows.append(("czreg pull --key (verify signature + attestation)", _median(pull_key, args.repeat)))
        shutil.rmtree(root / "registry", ignore_errors=True)

    base = rows[0][1]
    print(f"package: {size / MB:.1f} MB; median of {args.repeat} runs; loopback registry, plain HTTP\n")
    print("| operation | time | throughput | vs cp + sha256sum |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} s | {size / MB / t:.0f} MB/s | {t / base:.1f}x |")


if __name__ == "__main__":
    main()
