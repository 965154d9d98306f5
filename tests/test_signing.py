"""Signatures: model-signing bundles + signed report attestations, offline, with standard EC keys.

Every check runs the real libraries (cryptography, OpenSSF model-signing, openssl for keys made outside
czregistry); the registry tests run on SQLite and, with ``CZREG_TEST_POSTGRES_URL``, on PostgreSQL.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from czregistry.checks import ValidateOptions
from czregistry.cli import main
from czregistry.errors import RegistryError, SignatureError, UsageError
from czregistry.registry import Registry
from czregistry.sharing.signing import (
    REPORT_PREDICATE,
    attestation_path,
    generate_keypair,
    key_id,
    sign_package,
    signature_path,
    verify_package,
)
from czregistry.validate import validate
from tests.test_registry import location, make_package, pkg, reg  # noqa: F401  (fixtures)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "lab.pem", tmp_path / "keys" / "lab.pub"
    generate_keypair(private, public)
    return private, public


@pytest.fixture
def other_keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "other.pem", tmp_path / "keys" / "other.pub"
    generate_keypair(private, public)
    return private, public


def _signed(folder: Path, private: Path, **kw: object) -> Path:
    p = make_package(folder, **kw)  # type: ignore[arg-type]
    sign_package(p, private, report=validate(p, ValidateOptions(static=True)))
    return p


def test_round_trip_attests_the_report_and_model_signing_accepts_it(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    p = make_package(tmp_path)
    report = validate(p, ValidateOptions(static=True))
    signed = sign_package(p, private, report=report)
    assert signature_path(p).read_bytes() == signed.signature
    assert attestation_path(p).read_bytes() == signed.attestation
    assert signed.key_id == key_id(public)

    v = verify_package(p, public)
    assert v.sha256 == report.sha256 and v.key_id == signed.key_id
    assert v.report == report.to_dict() and v.smoke is None
    assert v.to_dict()["attested"] == {"valid": True, "format": "czann", "schema_version": report.schema_version,
                                       "errors": 0, "warnings": len(report.warnings), "smoke": None}

    # OpenSSF model-signing's own verifier (what `model_signing verify key` runs) accepts our .sig for the file
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(p, signature_path(p))
    cli = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(p), "--signature",
                          str(signature_path(p)), "--public_key", str(public)], capture_output=True, text=True)
    assert cli.returncode == 0 and "Verification succeeded" in cli.stdout, cli.stderr
    # ... under another name too (partners rename files), and it refuses other bytes
    renamed = tmp_path / "renamed.czann"
    shutil.copy(p, renamed)
    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(renamed, signature_path(p))
    renamed.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="mismatch"):
        verifying.Config().use_elliptic_key_verifier(public_key=public).verify(renamed, signature_path(p))

    # the attestation is an in-toto statement about these bytes with the full report as predicate
    import base64

    statement = json.loads(base64.b64decode(json.loads(signed.attestation)["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == REPORT_PREDICATE
    assert statement["subject"] == [{"name": p.name, "digest": {"sha256": report.sha256}}]
    assert statement["predicate"]["report"] == report.to_dict()


def test_openssl_keys_work(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    private, public = tmp_path / "ec.pem", tmp_path / "ec.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private)],
                   check=True, capture_output=True)  # SEC1 "EC PRIVATE KEY", as most guides make it
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    p = _signed(tmp_path, private)
    assert verify_package(p, public).key_id == key_id(public)
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(p, signature_path(p))


def test_a_flipped_byte_anywhere_in_package_signature_or_attestation_is_caught(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """100 random single-byte flips (a random non-zero XOR at a random offset) across the package, the .sig
    and the .att; each one must fail verification with SignatureError. In-process: ~2 ms per check."""
    private, public = keys
    p = _signed(tmp_path, private)
    originals = {"package": p.read_bytes(), "signature": signature_path(p).read_bytes(),
                 "attestation": attestation_path(p).read_bytes()}
    rng = random.Random(15)
    flipped = tmp_path / "flipped.czann"
    caught: dict[str, int] = {"package": 0, "signature": 0, "attestation": 0}
    for i in range(100):
        part = ("package", "signature", "attestation")[i % 3]
        data = bytearray(originals[part])
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        parts = {**originals, part: bytes(data)}
        flipped.write_bytes(parts["package"])
        with pytest.raises(SignatureError):
            verify_package(flipped, public, signature=parts["signature"], attestation=parts["attestation"])
        caught[part] += 1
    assert caught == {"package": 34, "signature": 33, "attestation": 33}
    flipped.write_bytes(originals["package"])  # and the unflipped triple still verifies
    verify_package(flipped, public, signature=originals["signature"], attestation=originals["attestation"])


def test_a_whitespace_only_change_to_the_signature_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """JSON-equivalent edits are still edits: the bundle must be the signer's exact bytes."""
    private, public = keys
    p = _signed(tmp_path, private)
    sig = signature_path(p).read_bytes()
    with pytest.raises(SignatureError, match="altered"):
        verify_package(p, public, signature=sig.replace(b",", b", ", 1))
    with pytest.raises(SignatureError, match="altered"):
        verify_package(p, public, attestation=attestation_path(p).read_bytes() + b"\n")


def test_wrong_key_missing_files_and_mismatched_pairs(tmp_path: Path, keys: tuple[Path, Path],
                                                     other_keys: tuple[Path, Path]) -> None:
    private, public = keys
    p = _signed(tmp_path, private)
    with pytest.raises(SignatureError, match="another key"):
        verify_package(p, other_keys[1])
    q = _signed(tmp_path, private)
    with pytest.raises(SignatureError, match="other bytes"):  # q's attestation beside p's signature
        verify_package(p, public, attestation=attestation_path(q).read_bytes())
    signature_path(p).unlink()
    with pytest.raises(SignatureError, match=r"has no signature \(.*\.sig not found\)"):
        verify_package(p, public)
    with pytest.raises(UsageError, match="private key"):  # the private key given where the public one goes
        verify_package(q, private)
    with pytest.raises(UsageError, match="no such public key file"):
        verify_package(q, tmp_path / "nope.pub")
    with pytest.raises(UsageError, match="already exists"):  # never overwrites a signature silently
        sign_package(q, private, report=validate(q, ValidateOptions(static=True)))
    with pytest.raises(SignatureError, match="other bytes"):  # a report of other bytes is not attested
        sign_package(p, private, report=validate(q, ValidateOptions(static=True)), write=False)


def test_cli_keygen_sign_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = runner.invoke(main, ["keygen", "-o", "lab", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert (tmp_path / "lab.pem").stat().st_mode & 0o777 == 0o600
    assert runner.invoke(main, ["keygen", "-o", "lab"]).exit_code == 2  # refuses to overwrite

    p = make_package(tmp_path)
    out = runner.invoke(main, ["sign", str(p), "--key", "lab.pem", "--static", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["key_id"] == info["key_id"]
    out = runner.invoke(main, ["verify-signature", str(p), "--key", "lab.pub"])
    assert out.exit_code == 0, out.output
    assert "signature OK" in out.output and "attested: VALID" in out.output
    out = runner.invoke(main, ["verify-signature", str(p), "--key", "lab.pub", "--json"])
    assert json.loads(out.output)["attested"]["valid"] is True

    runner.invoke(main, ["keygen", "-o", "other"])
    out = runner.invoke(main, ["verify-signature", str(p), "--key", "other.pub"])
    assert out.exit_code == 10
    assert out.output.startswith("Error: the signature of") and "Traceback" not in out.output
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    out = runner.invoke(main, ["verify-signature", str(p), "--key", "lab.pub"])
    assert out.exit_code == 10 and "differ from the signed ones" in out.output
    assert len(out.output.strip().splitlines()) == 2  # one line + its hint

    bad = make_package(tmp_path, FormatVersion="9.9.9")
    out = runner.invoke(main, ["sign", str(bad), "--key", "lab.pem", "--static"])
    assert out.exit_code == 10 and "not signed" in out.output
    assert not signature_path(bad).exists() and not attestation_path(bad).exists()


# --- registry --------------------------------------------------------------------------------------------


def test_publish_sign_pull_key(reg: Registry, pkg: Callable[..., Path], tmp_path: Path,  # noqa: F811
                               keys: tuple[Path, Path], other_keys: tuple[Path, Path]) -> None:
    private, public = keys
    p = pkg()
    res = reg.publish(p, name="signed-model", version="1.0.0", static=True, sign_key=private)
    assert res.version["signed_by"] == [key_id(public)]
    assert [e["action"] for e in reg.history("signed-model")][:2] == ["sign", "publish"]

    out = reg.pull("signed-model", tmp_path / "out" / "", key=public)
    assert out.path.read_bytes() == p.read_bytes()
    assert out.verified is not None and out.verified["key_id"] == key_id(public)
    # the bundles come along, and model-signing's verifier accepts them for the pulled file
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(out.path, signature_path(out.path))
    assert verify_package(out.path, public).sha256 == res.version["digest"].removeprefix("sha256:")

    dest = tmp_path / "refused"
    with pytest.raises(SignatureError, match="not with this key"):
        reg.pull("signed-model", dest / "", key=other_keys[1])
    reg.publish(pkg(), name="plain-model", version="1.0.0", static=True)
    with pytest.raises(SignatureError, match="is not signed; nothing written"):
        reg.pull("plain-model", dest / "", key=public)
    assert not dest.exists() or list(dest.iterdir()) == []

    # re-publishing the same bytes with a second key adds that signature to the existing version
    again = reg.publish(p, name="signed-model", version="1.0.0", static=True, sign_key=other_keys[0])
    assert again.status == "exists" and again.version["signed_by"] == [key_id(public), key_id(other_keys[1])]
    assert reg.pull("signed-model", tmp_path / "o2" / "", key=other_keys[1]).verified is not None

    reg.purge("signed-model", "1.0.0")  # signatures go with their version
    assert reg.search(name="signed-model") == []


def test_stored_signatures_are_immutable(reg: Registry, pkg: Callable[..., Path],  # noqa: F811
                                         keys: tuple[Path, Path]) -> None:
    from sqlalchemy import text

    reg.publish(pkg(), name="m", version="1.0.0", static=True, sign_key=keys[0])
    with reg.engine.connect() as conn, pytest.raises(Exception, match="czreg-immutable"):
        conn.execute(text("UPDATE signatures SET attestation = 'x'"))


def test_require_signatures_setting(reg: Registry, pkg: Callable[..., Path],  # noqa: F811
                                    keys: tuple[Path, Path]) -> None:
    assert reg.settings() == {"require_signatures": False}
    assert reg.set_setting("require-signatures", "on") == {"setting": "require_signatures", "from": False,
                                                           "to": True}
    with pytest.raises(RegistryError, match="requires signed packages"):
        reg.publish(pkg(), name="m", version="1.0.0", static=True)
    assert reg.search(name="m") == []
    assert reg.publish(pkg(), name="m", version="1.0.0", static=True, sign_key=keys[0]).status == "published"
    with pytest.raises(UsageError, match="on or off"):
        reg.set_setting("require-signatures", "maybe")
    with pytest.raises(UsageError, match="unknown registry setting"):
        reg.set_setting("colour", "blue")
    assert any(e["action"] == "setting" and e["detail"]["new"] is True for e in reg.history())


def test_cli_publish_sign_pull_key_and_setting(tmp_path: Path, keys: tuple[Path, Path],
                                               other_keys: tuple[Path, Path]) -> None:
    runner = CliRunner()
    regdir = str(tmp_path / "reg")
    (tmp_path / "reg").mkdir()  # the CLI opens only registries that exist
    p = make_package(tmp_path)
    out = runner.invoke(main, ["setting", "require-signatures", "on", "--registry", regdir])
    assert out.exit_code == 0 and "require-signatures: off -> on" in out.output
    out = runner.invoke(main, ["publish", str(p), "--version", "1.0.0", "--static", "--registry", regdir])
    assert out.exit_code == 7 and "requires signed packages" in out.output
    out = runner.invoke(main, ["publish", str(p), "--version", "1.0.0", "--static", "--registry", regdir,
                               "--sign", str(keys[0])])
    assert out.exit_code == 0 and "signed by" in out.output, out.output
    dest = tmp_path / "dl"
    out = runner.invoke(main, ["pull", "nuclei-seg", "-o", f"{dest}/", "--key", str(other_keys[1]),
                               "--registry", regdir])
    assert out.exit_code == 10 and "not with this key" in out.output and not dest.exists()
    out = runner.invoke(main, ["pull", "nuclei-seg", "-o", f"{dest}/", "--key", str(keys[1]), "--registry",
                               regdir, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["verified"]["key_id"] == key_id(keys[1])
    assert sorted(x.name for x in dest.iterdir()) == ["nuclei-seg-1.0.0.czann", "nuclei-seg-1.0.0.czann.att",
                                                      "nuclei-seg-1.0.0.czann.sig"]


def test_cli_start_up_does_not_import_the_sharing_libraries() -> None:
    code = ("import sys, czregistry.cli; print(sorted(m for m in ('cryptography', 'model_signing', 'oras', "
            "'requests', 'sigstore_models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
