"""OCI distribution against a real CNCF distribution registry (Debian's docker-registry 2.8) on loopback:
once without auth, once with htpasswd auth.

That registry has no OCI 1.1 referrers API (``/v2/<repo>/referrers/<digest>`` answers 404), so the
attachments travel through the referrers tag schema; the tests check that path explicitly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from czregistry.checks import ValidateOptions
from czregistry.cli import main
from czregistry.errors import OciError, SignatureError
from czregistry.sharing import oci
from czregistry.sharing.signing import attestation_path, generate_keypair, key_id, sign_package, signature_path
from czregistry.validate import validate
from tests.oci_registry import BINARY, free_port, run_registry
from tests.test_registry import make_package

pytestmark = pytest.mark.skipif(BINARY is None, reason="docker-registry is not installed (.ci/run installs it)")
USER, PASSWORD = "lab", "s3cret-pw"


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_registry(tmp_path_factory.mktemp("oci-plain")) as host:
        yield host


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_registry(tmp_path_factory.mktemp("oci-auth"), users={USER: PASSWORD}) as host:
        yield host


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "k" / "lab.pem", tmp_path / "k" / "lab.pub"
    generate_keypair(private, public)
    return private, public


def _signed(folder: Path, private: Path) -> Path:
    p = make_package(folder)
    sign_package(p, private, report=validate(p, ValidateOptions(static=True)))
    return p


def _cli(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input)


def _get(url: str, accept: str = oci.INDEX_MEDIA_TYPE, auth: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept, **({"Authorization": f"Basic {auth}"} if auth
                                                                     else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_push_pull_signed_round_trip_stable_digest_and_tag_schema_referrers(
        plain_registry: str, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    p = _signed(tmp_path, private)
    target = f"oci://{plain_registry}/lab/nuclei:1.0.0"
    first = _cli("push", str(p), target, "--plain-http", "--json")
    assert first.exit_code == 0, first.output
    pushed = json.loads(first.output)
    again = json.loads(_cli("push", str(p), target, "--plain-http", "--json").output)
    assert again["digest"] == pushed["digest"]  # same bytes, same manifest digest
    assert again["uploaded_bytes"] == 0 and pushed["uploaded_bytes"] > p.stat().st_size
    assert [r["role"] for r in pushed["referrers"]] == ["report", "signature", "attestation"]
    assert pushed["referrers_via"] == "tag"

    digest = pushed["digest"]
    base = f"http://{plain_registry}/v2/lab/nuclei"
    status, body = _get(f"{base}/manifests/1.0.0", oci.MANIFEST_MEDIA_TYPE)
    manifest = json.loads(body)
    assert status == 200 and oci._digest(body) == digest
    assert manifest["artifactType"] == oci.ARTIFACT_TYPE
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.czregistry.czann.v1+zip"
    assert layer["digest"] == "sha256:" + validate(p, ValidateOptions(static=True)).sha256  # type: ignore[operator]

    # this registry has no referrers API; the attachments are listed in the sha256-<hex> tag's index
    assert _get(f"{base}/referrers/{digest}")[0] == 404
    status, body = _get(f"{base}/manifests/{digest.replace(':', '-')}")
    index = json.loads(body)
    assert status == 200 and index["mediaType"] == oci.INDEX_MEDIA_TYPE
    assert [d["digest"] for d in index["manifests"]] == [r["digest"] for r in pushed["referrers"]]
    for d in index["manifests"]:
        _, ref_body = _get(f"{base}/manifests/{d['digest']}", oci.MANIFEST_MEDIA_TYPE)
        assert json.loads(ref_body)["subject"]["digest"] == digest

    out = tmp_path / "partner"
    got = _cli("pull", target, "-o", str(out), "--plain-http", "--key", str(public), "--json")
    assert got.exit_code == 0, got.output
    info = json.loads(got.output)
    assert info["verified"]["key_id"] == key_id(public) and info["verified"]["attested"]["valid"] is True
    assert info["referrers_via"] == "tag" and info["report_valid"] is True
    pulled = out / p.name
    assert pulled.read_bytes() == p.read_bytes()
    assert signature_path(pulled).read_bytes() == signature_path(p).read_bytes()
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(pulled, signature_path(pulled))

    by_digest = _cli("pull", f"oci://{plain_registry}/lab/nuclei@{digest}", "-o", str(tmp_path / "d"),
                     "--plain-http")
    assert by_digest.exit_code == 0, by_digest.output
    assert (tmp_path / "d" / p.name).read_bytes() == p.read_bytes()


def test_pull_with_key_refuses_unsigned_foreign_and_mismatched_signatures(
        plain_registry: str, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    unsigned = make_package(tmp_path)
    ref = f"oci://{plain_registry}/lab/unsigned:1"
    assert _cli("push", str(unsigned), ref, "--plain-http", "--static").exit_code == 0
    out = tmp_path / "o"
    res = _cli("pull", ref, "-o", str(out), "--plain-http", "--key", str(public))
    assert res.exit_code == 10 and "has no signature attached; nothing written" in res.output
    assert not out.exists() or list(out.iterdir()) == []
    assert _cli("pull", ref, "-o", str(out), "--plain-http").exit_code == 0  # without --key: fine, no .sig

    other_private, _ = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_keypair(other_private, tmp_path / "other.pub")
    foreign = _signed(tmp_path / "f", other_private)
    ref = f"oci://{plain_registry}/lab/foreign:1"
    assert _cli("push", str(foreign), ref, "--plain-http").exit_code == 0
    res = _cli("pull", ref, "-o", str(tmp_path / "o2"), "--plain-http", "--key", str(public))
    assert res.exit_code == 10 and "another key" in res.output and not (tmp_path / "o2" / foreign.name).exists()

    # a genuine signature of *other* bytes attached to this package: caught by model-signing's check
    mine, theirs = _signed(tmp_path / "a", private), _signed(tmp_path / "b", private)
    oci.push(mine, f"oci://{plain_registry}/lab/swapped:1", plain_http=True, report={},
             signature=signature_path(theirs).read_bytes(), attestation=attestation_path(theirs).read_bytes())
    with pytest.raises(SignatureError, match="differ from the signed ones"):
        oci.pull(f"oci://{plain_registry}/lab/swapped:1", tmp_path / "o3", key=public, plain_http=True)
    assert not (tmp_path / "o3" / mine.name).exists()


def test_tag_schema_index_merges_attachments_without_duplicates(plain_registry: str, tmp_path: Path,
                                                                keys: tuple[Path, Path]) -> None:
    """The fallback explicitly: an unsigned push lists the report; signing and pushing again adds the
    signature and attestation to the same sha256-<hex> index, keeping the report once."""
    p = make_package(tmp_path)
    ref = f"oci://{plain_registry}/lab/merge:1"
    report = validate(p, ValidateOptions(static=True)).to_dict()
    first = oci.push(p, ref, plain_http=True, report=report)
    client = oci._Client(oci.parse_reference(ref), plain_http=True)
    listed, via = client.referrers(first.digest)
    assert via == "tag" and client.referrers_api is False
    assert [d["annotations"][oci.ROLE_ANNOTATION] for d in listed] == ["report"]

    sign_package(p, keys[0], report=report)
    second = oci.push(p, ref, plain_http=True, report=report, signature=signature_path(p).read_bytes(),
                      attestation=attestation_path(p).read_bytes())
    assert second.digest == first.digest
    listed, _ = client.referrers(first.digest)
    assert [d["annotations"][oci.ROLE_ANNOTATION] for d in listed] == ["report", "signature", "attestation"]
    assert all(d["artifactType"] in (oci.REPORT_MEDIA_TYPE, "application/vnd.dev.sigstore.bundle.v0.3+json")
               for d in listed)
    assert not client.add_referrers_by_tag(first.digest, listed)  # nothing new: the index is not rewritten


def test_auth_htpasswd_with_options_docker_config_and_refusals(auth_registry: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               keys: tuple[Path, Path]) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json of the machine
    p = _signed(tmp_path, keys[0])
    ref = f"oci://{auth_registry}/team/seg:2"

    res = _cli("push", str(p), ref, "--plain-http")
    assert res.exit_code == 12 and "needs a user name and password" in res.output
    res = _cli("push", str(p), ref, "--plain-http", "-u", USER, "--password-stdin", input="wrong\n")
    assert res.exit_code == 12 and "not authorised" in res.output and "Traceback" not in res.output
    res = _cli("push", str(p), ref, "--plain-http", "-u", USER, "--password-stdin", "--json", input=PASSWORD + "\n")
    assert res.exit_code == 0, res.output
    digest = json.loads(res.output)["digest"]
    assert _get(f"http://{auth_registry}/v2/team/seg/manifests/2")[0] == 401  # really protected

    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(
        {"auths": {auth_registry: {"auth": oci.basic_auth_entry(USER, PASSWORD)}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    res = _cli("pull", ref, "-o", str(tmp_path / "o"), "--plain-http", "--key", str(keys[1]), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["digest"] == digest
    assert (tmp_path / "o" / p.name).read_bytes() == p.read_bytes()
    again = _cli("push", str(p), ref, "--plain-http", "--json")  # credentials from the Docker config
    assert again.exit_code == 0 and json.loads(again.output)["digest"] == digest


def test_errors_are_one_line_with_their_exit_codes(plain_registry: str, tmp_path: Path) -> None:
    res = _cli("pull", f"oci://{plain_registry}/lab/absent:9", "-o", str(tmp_path), "--plain-http")
    assert res.exit_code == 12 and res.output.startswith("Error: not found on") and "Traceback" not in res.output
    dead = f"127.0.0.1:{free_port()}"
    res = _cli("pull", f"oci://{dead}/x/y:1", "-o", str(tmp_path), "--plain-http")
    assert res.exit_code == 12 and "cannot reach the registry" in res.output
    res = _cli("push", str(make_package(tmp_path)), f"oci://{plain_registry}/Upper/Case:1", "--plain-http")
    assert res.exit_code == 2 and "not an OCI reference" in res.output
    res = _cli("push", str(make_package(tmp_path)), f"oci://{plain_registry}/lab/x", "--plain-http")
    assert res.exit_code == 2 and "push needs a tag" in res.output
    res = _cli("push", str(make_package(tmp_path)), f"oci://{plain_registry}/lab/x:1", "--password-stdin")
    assert res.exit_code == 2 and "--password-stdin needs --username" in res.output

    # an existing different file is never overwritten
    p = make_package(tmp_path)
    ref = f"oci://{plain_registry}/lab/keep:1"
    assert _cli("push", str(p), ref, "--plain-http", "--static").exit_code == 0
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / p.name).write_bytes(b"mine")
    res = _cli("pull", ref, "-o", str(tmp_path / "k"), "--plain-http")
    assert res.exit_code == 2 and "already exists" in res.output
    assert (tmp_path / "k" / p.name).read_bytes() == b"mine"
    digest = oci.push(p, ref, plain_http=True, report={}).digest
    with pytest.raises(OciError, match="not a czregistry package"):  # e.g. the index under the fallback tag
        oci.pull(f"oci://{plain_registry}/lab/keep:{digest.replace(':', '-')}", tmp_path / "z", plain_http=True)


def test_push_a_registry_version_with_its_stored_signature(plain_registry: str, tmp_path: Path,
                                                            keys: tuple[Path, Path]) -> None:
    regdir = str(tmp_path / "reg")
    (tmp_path / "reg").mkdir()  # the CLI opens only registries that exist
    p = make_package(tmp_path)
    assert _cli("publish", str(p), "--version", "1.0.0", "--static", "--registry", regdir,
                "--sign", str(keys[0])).exit_code == 0
    ref = f"oci://{plain_registry}/lab/from-registry:1.0.0"
    res = _cli("push", "nuclei-seg==1.0.0", ref, "--plain-http", "--registry", regdir, "--json")
    assert res.exit_code == 0, res.output
    assert [r["role"] for r in json.loads(res.output)["referrers"]] == ["report", "signature", "attestation"]
    res = _cli("pull", ref, "-o", str(tmp_path / "o"), "--plain-http", "--key", str(keys[1]), "--json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "nuclei-seg-1.0.0.czann").read_bytes() == p.read_bytes()
