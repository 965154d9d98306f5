"""Admission reads the package once (issue 24): ``czreg publish --smoke --sign`` of a real ONNX package opens
the file once, hashes it once, inflates its model once and makes one ONNX Runtime session, and what it
stores, validates, smoke-tests and signs are the same bytes. Before, the same command opened the file 15
times, hashed it 4 times, inflated the model 7 times and made 2 sessions (docs/registry.md, "Admission")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from czregistry.cli import main
from czregistry.package import PackageSnapshot, write_package
from czregistry.sharing.signing import generate_keypair, key_id, sign_package, verify_package
from tests.io_counts import counting
from tests.static_packages import conv_onnx, czann_meta

pytest.importorskip("model_signing")


@pytest.fixture
def conv_package(tmp_path: Path) -> Path:
    """A real, runnable ONNX package (one 3x3 convolution, softmax) that passes validation and the smoke test."""
    return write_package(tmp_path / "conv.czann", czann_meta(ModelName="conv"), conv_onnx())


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "lab.pem", tmp_path / "lab.pub")
    return tmp_path / "lab.pem", tmp_path / "lab.pub"


def test_publish_smoke_sign_reads_hashes_inflates_and_loads_once(conv_package: Path, keys: tuple[Path, Path],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reg").mkdir()
    with counting(conv_package, monkeypatch) as counts:
        out = CliRunner().invoke(main, ["publish", str(conv_package), "--version", "1.0.0", "--smoke", "--sign",
                                        str(keys[0]), "--registry", str(tmp_path / "reg"), "--json"])
    monkeypatch.undo()
    assert out.exit_code == 0, out.output
    assert counts.as_dict() == {"file_opens": 1, "full_hashes": 1, "model_decompressions": 1, "sessions": 1}
    data = json.loads(out.output)
    # the model checks ran and the smoke test ran on that one session, about the bytes stored and signed
    assert data["report"]["valid"] and data["smoke"]["valid"]
    assert "model.invariance" in data["report"]["measurements"]["timings_s"]
    assert data["smoke"]["measurements"]["smoke.tiles"] > 1
    assert data["report"]["sha256"] == data["smoke"]["sha256"] == counts.sha256
    assert data["digest"] == f"sha256:{counts.sha256}" and data["status"] == "published"
    blob = next((tmp_path / "reg").rglob(counts.sha256[2:]))  # the blob store files it under its digest
    assert blob.read_bytes() == conv_package.read_bytes()
    # the signature made from the known digest verifies with model-signing's own verifier against the file
    dest = tmp_path / "dl"
    pulled = CliRunner().invoke(main, ["pull", "conv", "-o", f"{dest}/", "--key", str(keys[1]), "--registry",
                                       str(tmp_path / "reg"), "--json"])
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.output)["verified"]["key_id"] == key_id(keys[1])


def test_signing_a_known_digest_is_model_signings_payload(conv_package: Path, keys: tuple[Path, Path]) -> None:
    """``sign_package(..., sha256=...)`` builds model-signing's manifest without hashing the file: its DSSE
    payload must equal the one model-signing's own ``sign`` makes by hashing (the ECDSA signatures differ)."""
    from czregistry.sharing.signing import _parse_bundle

    digest = PackageSnapshot.read(conv_package).sha256
    report = {"sha256": digest}
    by_file = sign_package(conv_package, keys[0], report=report, write=False)
    by_digest = sign_package(conv_package, keys[0], report=report, write=False, sha256=digest)
    payloads = [_parse_bundle(s.signature, "sig").dsse_envelope.payload for s in (by_file, by_digest)]
    assert payloads[0] == payloads[1]
    assert by_digest.sha256 == by_file.sha256 == digest
    assert verify_package(conv_package, keys[1], signature=by_digest.signature,
                          attestation=by_digest.attestation).sha256 == digest


def test_a_snapshot_is_the_bytes_read_whatever_happens_to_the_file(conv_package: Path, tmp_path: Path) -> None:
    """The TOCTOU window admission closes: once read, a snapshot's digest, package and model are of the bytes
    read, even when the file is replaced on disk before the later steps run."""
    from czregistry.validate import validate

    original = conv_package.read_bytes()
    with PackageSnapshot.read(conv_package) as snapshot:
        write_package(conv_package, czann_meta(ModelName="swapped"), conv_onnx())
        assert conv_package.read_bytes() != original
        report = validate(snapshot)
        assert report.valid and report.sha256 == snapshot.sha256
        package, _ = snapshot.inspect()
        assert package is not None and package.metadata is not None and package.metadata["ModelName"] == "conv"
        assert snapshot.stream().read() == original
    assert snapshot.closed


def test_a_snapshot_refuses_what_no_package_can_be(tmp_path: Path) -> None:
    from czregistry.errors import PackageError
    from czregistry.package import ReadLimits

    big = tmp_path / "big.czann"
    big.write_bytes(os.urandom(3 << 20))
    with pytest.raises(PackageError, match="larger than any package"):
        PackageSnapshot.read(big, ReadLimits(max_total_bytes=1 << 20))
    os.mkfifo(tmp_path / "fifo.czann")
    with pytest.raises(PackageError, match="not a regular file"):
        PackageSnapshot.read(tmp_path / "fifo.czann")
