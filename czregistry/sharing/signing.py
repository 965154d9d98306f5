"""Offline package signatures with standard keys: OpenSSF model-signing bundles plus a signed in-toto
attestation of the validation report.

``sign_package`` writes two Sigstore bundles (JSON, media type ``application/vnd.dev.sigstore.bundle.v0.3+json``)
beside the package, both signed with the same EC key:

* ``PACKAGE.sig``: exactly what OpenSSF ``model-signing`` writes for its key-based method (a DSSE envelope
  over an in-toto statement whose predicate lists the package's SHA-256), made by ``model_signing``'s own
  signing API, so ``model_signing verify key`` accepts it;
* ``PACKAGE.att``: an in-toto statement whose subject is the package's SHA-256 and whose predicate is the
  full validation report (and the smoke-test report when there is one).

Two files because model-signing reads the whole signature file as one bundle and refuses any field it does
not know (its models are ``extra="forbid"``), so nothing else can ride along in ``PACKAGE.sig``.

Verification is offline: the public key is the trust anchor. Each bundle is accepted only in the exact bytes
its signer wrote (it must re-serialise to itself), so an edit that leaves the JSON meaning unchanged (a
whitespace or base64 padding flip) is refused like any other. ``cryptography`` and ``model_signing`` are
imported inside the functions: ``czreg --help`` stays fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from .. import __version__
from ..errors import SignatureError, UsageError, first_line
from ._smallfile import read_small_file

if TYPE_CHECKING:
    from ..report import Report

__all__ = [
    "ATT_SUFFIX",
    "BUNDLE_MEDIA_TYPE",
    "MAX_BUNDLE_BYTES",
    "MAX_KEY_BYTES",
    "MODEL_SIGNING_PREDICATE",
    "REPORT_PREDICATE",
    "SIG_SUFFIX",
    "SignedPackage",
    "Verified",
    "attestation_path",
    "bundles_bind",
    "generate_keypair",
    "key_id",
    "read_bundle",
    "require_extra",
    "sign_package",
    "signature_path",
    "verify_package",
]

SIG_SUFFIX = ".sig"
ATT_SUFFIX = ".att"
BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
INTOTO_STATEMENT = "https://in-toto.io/Statement/v1"
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"
#: Our predicate: ``{"report": <validation report>, "smoke": <smoke report or null>, "signed_at", "signer"}``.
REPORT_PREDICATE = "https://czregistry/validation-report/v1"
_CURVES = {"secp256r1", "secp384r1", "secp521r1"}  # what model-signing (and Sigstore's specs) accept
#: Largest key file read: a PEM EC key is 200-400 bytes, an RSA-8192 one about 6.5 KB; 64 KiB is generous.
MAX_KEY_BYTES: Final = 64 << 10
#: Largest signature or attestation bundle read (a file beside a package, an OCI attachment, a manifest).
#: A signature bundle is about 2 KB; an attestation carries the validation report (and smoke report),
#: usually 5-50 KB, base64-encoded. 4 MiB leaves room for reports with thousands of findings, and is the
#: manifest size the OCI distribution spec tells registries to accept, so one bound serves every small
#: foreign blob.
MAX_BUNDLE_BYTES: Final = 4 << 20


def require_extra(*modules: str) -> None:
    """Signing and OCI live in the ``sharing`` extra; say so instead of an ImportError traceback."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} is not installed (needed to sign, verify and push packages)",
                         hint='pip install "czregistry[sharing]"')


def signature_path(package: Path | str) -> Path:
    package = Path(package)
    return package.with_name(package.name + SIG_SUFFIX)


def attestation_path(package: Path | str) -> Path:
    package = Path(package)
    return package.with_name(package.name + ATT_SUFFIX)


@dataclass(frozen=True)
class SignedPackage:
    """The two bundles of one signature, as the exact bytes written to ``.sig`` and ``.att``."""

    sha256: str
    key_id: str
    signature: bytes
    attestation: bytes
    public_key: bytes = b""  # the signer's public key (PEM), sent with an upload so the server can verify


@dataclass(frozen=True)
class Verified:
    """What a verified signature proves: these bytes, this key, and what the signer attested about them."""

    package: str
    sha256: str
    key_id: str
    report: dict[str, Any]
    smoke: dict[str, Any] | None
    signed_at: str | None
    signer_tool: str | None

    def to_dict(self) -> dict[str, Any]:
        findings = self.report.get("findings", [])
        return {
            "package": self.package, "sha256": self.sha256, "key_id": self.key_id, "verified": True,
            "signed_at": self.signed_at, "signer_tool": self.signer_tool,
            "attested": {
                "valid": self.report.get("valid"), "format": self.report.get("format"),
                "schema_version": self.report.get("schema_version"),
                "errors": sum(f.get("severity") == "error" for f in findings),
                "warnings": sum(f.get("severity") == "warning" for f in findings),
                "smoke": None if self.smoke is None else bool(self.smoke.get("valid")),
            },
            "report": self.report, "smoke": self.smoke,
        }


# --- keys ------------------------------------------------------------------------------------------------


def _load_private_key(path: Path, password: bytes | None) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:  # encrypted without a password, or a password for an unencrypted key
        raise UsageError(f"cannot use private key {path}: {first_line(exc)}",
                         hint="give an unencrypted PEM key, or its password") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM private key ({first_line(exc)})",
                         hint="make one with czreg keygen, or: openssl ecparam -name prime256v1 -genkey "
                              "-noout | openssl pkcs8 -topk8 -nocrypt -out key.pem") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVES:
        raise UsageError(f"{path} is not an EC P-256/P-384/P-521 private key",
                         hint="model-signing's key method needs an elliptic-curve key (czreg keygen makes one)")
    return key


def _load_public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        hint = ("this looks like a private key: give the public one (openssl ec -in key.pem -pubout)"
                if b"PRIVATE KEY" in data else "give the signer's PEM public key")
        raise UsageError(f"{path} is not a PEM public key", hint=hint) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise UsageError(f"{path} is not an EC P-256/P-384/P-521 public key",
                         hint="model-signing's key method uses elliptic-curve keys")
    return key


def _read_key_file(path: Path, what: str) -> bytes:
    """A key file's bytes, bounded (``MAX_KEY_BYTES``): ``--key /dev/urandom`` or a 20 GB file is refused
    before it is read. A usage error (exit 2) like every other problem with the key path the user gave."""
    try:
        return read_small_file(path, limit=MAX_KEY_BYTES, what=f"{what} key file", why="a PEM key is a few KB",
                               hint=f"give the {what} key's PEM file (czreg keygen makes a key pair)")
    except FileNotFoundError:
        raise UsageError(f"no such {what} key file: {path}", hint="check the path") from None


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pem: bytes = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def key_id(public_key: Path | str) -> str:
    """The key's id: SHA-256 of its SubjectPublicKeyInfo PEM (model-signing's ``publicKey.hint``)."""
    return hashlib.sha256(_public_pem(_load_public_key(Path(public_key)))).hexdigest()


def _hash_for(key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]


def generate_keypair(private_path: Path | str, public_path: Path | str, *, force: bool = False) -> str:
    """Write a new EC P-256 key pair (PKCS#8 PEM, unencrypted, mode 0600; public SPKI PEM); returns the key id.

    Refuses to overwrite either file unless ``force``: losing a signing key silently is worse than a prompt.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise UsageError("the private and the public key need two different files", hint="e.g. key.pem and key.pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise UsageError(f"{p} already exists; not overwritten", hint="choose another name, or pass --force")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = _public_pem(key.public_key())
    _write_atomic(private_path, private_pem, mode=0o600)
    try:
        _write_atomic(public_path, public_pem)
    except BaseException:  # a pair or nothing: a lone private key would be refused as "exists" next time
        private_path.unlink(missing_ok=True)
        raise
    return hashlib.sha256(public_pem).hexdigest()


def _write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    from ..package import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)


# --- DSSE ------------------------------------------------------------------------------------------------


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what is actually signed)."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def _bundle(key: Any, statement: dict[str, Any]) -> bytes:
    """A Sigstore bundle (v0.3, key-identified) holding a DSSE envelope over ``statement``, signed by ``key``;
    the same shape model-signing's key signer writes."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from sigstore_models.bundle import v1 as bundle_pb
    from sigstore_models.common import v1 as common_pb
    from sigstore_models.intoto import Envelope
    from sigstore_models.intoto import Signature as DsseSignature

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), default=str).encode()
    sig = key.sign(_pae(INTOTO_PAYLOAD_TYPE, payload), ec.ECDSA(_hash_for(key)))
    bundle = bundle_pb.Bundle(
        media_type=BUNDLE_MEDIA_TYPE,
        verification_material=bundle_pb.VerificationMaterial(
            public_key=common_pb.PublicKeyIdentifier(hint=hashlib.sha256(_public_pem(key.public_key())).hexdigest()),
            tlog_entries=[]),
        dsse_envelope=Envelope(payload=base64.b64encode(payload), payload_type=INTOTO_PAYLOAD_TYPE,
                               signatures=[DsseSignature(sig=base64.b64encode(sig), keyid="")]),
    )
    return bundle.to_json().encode()


def _parse_bundle(data: bytes, what: str) -> Any:
    """Parse a bundle and insist on its canonical bytes: a bundle we or model-signing wrote re-serialises to
    itself, so any other bytes (even JSON-equivalent ones) mean the file was altered."""
    from sigstore_models.bundle import v1 as bundle_pb

    try:
        bundle = bundle_pb.Bundle.from_json(data)
    except Exception:
        raise SignatureError(f"{what} is corrupt or not a Sigstore bundle",
                             hint="get the signature again from the publisher") from None
    if bundle.to_json().encode() != data or bundle.dsse_envelope is None or bundle.media_type != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"{what} has been altered (not the bytes its signer wrote)",
                             hint="get the signature again from the publisher")
    return bundle


# --- sign ------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sign_package(path: Path | str, private_key: Path | str, *, report: Report | dict[str, Any],
                 smoke: Report | dict[str, Any] | None = None, password: bytes | None = None,
                 write: bool = True, force: bool = False, sha256: str | None = None) -> SignedPackage:
    """Sign ``path`` with model-signing's key method and attest ``report`` (and ``smoke``) about its bytes.

    ``report`` must be the validation report of these very bytes (its ``sha256`` is checked). With
    ``write``, ``PACKAGE.sig`` and ``PACKAGE.att`` appear beside the package (each written whole or not at
    all; existing ones are kept unless ``force``).

    ``sha256``: the digest of the package's bytes, already computed by whoever read them (admission's
    ``PackageSnapshot``): model-signing then signs a manifest of that digest instead of hashing ``path``
    again, so the signature is about exactly the bytes that were validated and are stored, whatever
    happens to the file meanwhile. The bundle is the one model-signing's own ``sign`` writes for those bytes.
    """
    require_extra("model_signing", "OpenSSL")
    from model_signing import hashing, signing

    path, private_key = Path(path), Path(private_key)
    if not path.is_file():
        raise UsageError(f"no such package file: {path}", hint="check the path")
    key = _load_private_key(private_key, password)
    report_dict = report if isinstance(report, dict) else report.to_dict()
    smoke_dict = smoke if smoke is None or isinstance(smoke, dict) else smoke.to_dict()
    sig_out, att_out = signature_path(path), attestation_path(path)
    if write and not force:
        for p in (sig_out, att_out):
            if p.exists():
                raise UsageError(f"{p} already exists; not overwritten", hint="pass --force to replace it")

    with tempfile.TemporaryDirectory(prefix="czreg-sign-") as tmp:
        tmp_sig = Path(tmp) / "package.sig"
        tmp_key = _private_key_file(key, Path(tmp))
        config = signing.Config().set_hashing_config(
            hashing.Config().use_file_serialization(hashing_algorithm="sha256"))
        try:
            if sha256 is None:
                config.use_elliptic_key_signer(private_key=tmp_key).sign(path, tmp_sig)
            else:
                _sign_digest(path, sha256, tmp_key, tmp_sig)
        except Exception as exc:
            raise SignatureError(f"model-signing could not sign {path.name}: {first_line(exc)}") from None
        signature = tmp_sig.read_bytes()
    sha256 = _signed_sha256(_parse_bundle(signature, "the new signature"))
    if report_dict.get("sha256") not in (None, sha256):
        raise SignatureError(f"the validation report is about other bytes (sha256 {report_dict['sha256'][:12]}...) "
                             f"than {path.name} (sha256 {sha256[:12]}...); not signed",
                             hint="validate this exact file, then sign it")
    statement = {
        "_type": INTOTO_STATEMENT,
        "subject": [{"name": path.name, "digest": {"sha256": sha256}}],
        "predicateType": REPORT_PREDICATE,
        "predicate": {"report": report_dict, "smoke": smoke_dict,
                      "signed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                      "signer_tool": f"czregistry {__version__}"},
    }
    attestation = _bundle(key, statement)
    kid = hashlib.sha256(_public_pem(key.public_key())).hexdigest()
    if write:
        _write_atomic(sig_out, signature)
        _write_atomic(att_out, attestation)
    return SignedPackage(sha256, kid, signature, attestation, _public_pem(key.public_key()))


def _sign_digest(path: Path, sha256: str, key_file: Path, out: Path) -> None:
    """What ``model_signing.signing.Config.sign(path, out)`` does, with the file's digest given rather than
    computed: the hashing configuration describes the serialisation of ``path`` (``files_to_hash=[]`` hashes
    nothing) and the manifest gets the one item model-signing's file serialiser makes for a single file (``.``,
    its SHA-256). Kept byte-for-byte equal to model-signing's own payload by
    ``tests/test_admission_io.py::test_signing_a_known_digest_is_model_signings_payload``."""
    from model_signing import hashing, manifest, signing
    from model_signing._hashing.hashing import Digest
    from model_signing._signing.signing import Payload

    hashing_config = hashing.Config().use_file_serialization(hashing_algorithm="sha256")
    described = hashing_config.hash(path, files_to_hash=[])
    item = manifest.FileManifestItem(path=PurePosixPath("."), digest=Digest("sha256", bytes.fromhex(sha256)))
    made = manifest.Manifest(described.model_name, [item], described._serialization_type)
    signer = signing.Config().use_elliptic_key_signer(private_key=key_file)._signer
    assert signer is not None
    signer.sign(Payload(made)).write(out)


def _private_key_file(key: Any, folder: Path) -> Path:
    """model-signing takes a key *file*; give it an unencrypted copy in a private temp folder (0600)."""
    from cryptography.hazmat.primitives import serialization

    out = folder / "key.pem"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return out


def _signed_sha256(bundle: Any) -> str:
    """The package SHA-256 inside a model-signing statement (its single resource, a file, named ``.``)."""
    try:
        statement = json.loads(bundle.dsse_envelope.payload)
        resources = statement["predicate"]["resources"]
        (resource,) = resources
        assert resource["algorithm"] == "sha256"
        return str(resource["digest"])
    except Exception:
        raise SignatureError("the signature does not cover a single file hashed with SHA-256",
                             hint="sign the package file itself with czreg sign") from None


def bundles_bind(signature: bytes, attestation: bytes, sha256: str, kid: str) -> bool:
    """Whether a stored signature and attestation are about ``sha256`` and name key ``kid``: what a server
    can check without the signer's public key (the web page shows it; ``verify_package`` with the key is
    the cryptographic check). Unparseable or altered bundles are not bound."""
    try:
        sig, att = _parse_bundle(signature, "signature"), _parse_bundle(attestation, "attestation")
        hints = {b.verification_material.public_key.hint if b.verification_material.public_key else None
                 for b in (sig, att)}
        subjects = json.loads(att.dsse_envelope.payload).get("subject") or []
        return (hints == {kid} and _signed_sha256(sig) == sha256
                and [x.get("digest", {}).get("sha256") for x in subjects] == [sha256])
    except Exception:  # a damaged bundle, or model-signing not installed: nothing is shown as bound
        return False


# --- verify ----------------------------------------------------------------------------------------------


def read_bundle(path: Path | str, what: str) -> bytes:
    """A signature or attestation bundle from a file, bounded (``MAX_BUNDLE_BYTES``). Bundles travel with
    the package, so one that is not a regular file or is too large is a bad signature (``SignatureError``,
    exit 10), like any other damage to it. ``FileNotFoundError`` is left to the caller."""
    return read_small_file(path, limit=MAX_BUNDLE_BYTES, what=f"{what} file",
                           why=f"a {what} bundle is a few KB", error=SignatureError,
                           hint="do not use it; get the package and its .sig/.att again from the publisher")


def _read_beside(path: Path, what: str, package: str) -> bytes:
    try:
        return read_bundle(path, what)
    except FileNotFoundError:
        raise SignatureError(f"{package} has no {what} ({path.name} not found)",
                             hint=f"get {path.name} from the publisher, or sign the package with czreg sign") from None


def verify_package(path: Path | str, public_key: Path | str, *, signature: bytes | None = None,
                   attestation: bytes | None = None, name: str | None = None) -> Verified:
    """Check ``path`` against its signature and attestation (default: ``PACKAGE.sig`` / ``PACKAGE.att``
    beside it) with ``public_key``, offline. Raises ``SignatureError`` (exit 10) on any mismatch.

    The signature is verified by model-signing's own verifier (the same code as ``model_signing verify
    key``); the attestation by the same DSSE rules, and its subject must be these bytes.
    """
    require_extra("model_signing", "OpenSSL")
    from model_signing import verifying

    path, public_key = Path(path), Path(public_key)
    label = name or path.name
    if not path.is_file():
        raise UsageError(f"no such package file: {path}", hint="check the path")
    key = _load_public_key(public_key)
    kid = hashlib.sha256(_public_pem(key)).hexdigest()
    sig_bytes = signature if signature is not None else _read_beside(signature_path(path), "signature", label)
    att_bytes = attestation if attestation is not None else _read_beside(attestation_path(path), "attestation", label)
    sig_bundle = _parse_bundle(sig_bytes, f"the signature of {label}")
    att_bundle = _parse_bundle(att_bytes, f"the attestation of {label}")
    for bundle, what in ((sig_bundle, "signature"), (att_bundle, "attestation")):
        hint = bundle.verification_material.public_key.hint if bundle.verification_material.public_key else None
        if hint != kid:
            raise SignatureError(f"the {what} of {label} was made with another key (key id {str(hint)[:16]}...,"
                                 f" yours is {kid[:16]}...)", hint="ask the publisher for their public key")

    with tempfile.TemporaryDirectory(prefix="czreg-verify-") as tmp:
        sig_file = Path(tmp) / "package.sig"
        sig_file.write_bytes(sig_bytes)
        # model-signing reads its key from a file: give it the key we loaded (bounded), not the user's path,
        # which it would read again without a bound (and which may have changed since).
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(_public_pem(key))
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key_file).verify(path, sig_file)
        except Exception as exc:
            why = "the package bytes differ from the signed ones" if "mismatch" in str(exc).lower() \
                else "the signature is invalid"
            raise SignatureError(f"signature check failed for {label}: {why}",
                                 hint="do not use this file; get the package and its .sig again") from None
    sha256 = _signed_sha256(sig_bundle)

    envelope = att_bundle.dsse_envelope
    try:
        from cryptography.hazmat.primitives.asymmetric import ec

        key.verify(envelope.signatures[0].sig, _pae(envelope.payload_type, envelope.payload), ec.ECDSA(_hash_for(key)))
        statement = json.loads(envelope.payload)
        ok = (envelope.payload_type == INTOTO_PAYLOAD_TYPE and statement["_type"] == INTOTO_STATEMENT
              and statement["predicateType"] == REPORT_PREDICATE)
    except Exception:
        ok = False
    if not ok:
        raise SignatureError(f"attestation check failed for {label}: the attestation is invalid",
                             hint="do not trust its report; get the .att again from the publisher")
    subjects = statement.get("subject") or []
    if [s.get("digest", {}).get("sha256") for s in subjects] != [sha256]:
        raise SignatureError(f"the attestation of {label} is about other bytes than the signed package",
                             hint="the .sig and .att do not belong together; get both again")
    predicate = statement.get("predicate") or {}
    return Verified(package=str(path), sha256=sha256, key_id=kid, report=predicate.get("report") or {},
                    smoke=predicate.get("smoke"), signed_at=predicate.get("signed_at"),
                    signer_tool=predicate.get("signer_tool"))
