"""Admitting a package to a registry: one step, one value.

``admit`` names the package (its ModelName or ``--name``), validates it, smoke-tests it, evaluates it against
``--gate`` bounds and a ``--no-regression-from`` baseline, and signs it (or checks a signature that came with
an upload), refusing with the same typed errors wherever it runs; it returns ``Evidence``, which
``Registry.publish`` stores as it is. The CLI's local publish, the client side of a publish to a server
(which signs before the upload) and the server's own check of an upload (``validator``: the server's
sandbox, see ``server.sandbox``) all go through here.

The package file is read once: ``admit`` takes a ``PackageSnapshot`` (or makes one), whose bytes are hashed
while they are read, parsed once (the CRC pass keeps the model bytes), validated, audited, loaded into one
model session that the smoke test reuses, signed by that digest (model-signing does not hash the file again)
and stored from those same bytes (``Registry.publish``). So every piece of ``Evidence`` - identity, report,
smoke report, signature - is about the exact bytes the registry stores: a file swapped on disk between two
steps can no longer get evidence about one content and a blob of another (before, each step re-read the path).
For ``czreg publish --smoke --sign`` of an ONNX package this is 1 read of the file, 1 SHA-256, 1 decompression
of the model and 1 ONNX Runtime session, where it was 15 opens, 4 hashes, 7 decompressions and 2 sessions
(docs/registry.md, "Admission"; ``tests/test_admission_io.py`` keeps the count). A validator other than
``check_package`` (the server's sandbox) reads the file itself in its child; its report must then carry the
snapshot's digest, or nothing is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit import GRAPH_AUDIT_CHECK
from .errors import CzregError, InvalidPackageError, RegistryError, SignatureError, UsageError
from .package import PackageSnapshot
from .progress import step
from .registry.records import Evidence, Identity

if TYPE_CHECKING:
    from .backends import Session
    from .evaluate.engine import EvalOptions
    from .evaluate.gate import Gate
    from .registry.records import PublishResult, RecordedEvaluation, RegistryClient
    from .report import Report
    from .sharing.signing import SignedPackage

__all__ = ["Evidence", "Identity", "PackageSnapshot", "Validator", "admit", "check_package", "check_snapshot",
           "gated_publish", "identify"]

#: How a package is checked: ``(path, static, smoke) -> (validation report, smoke report or None)``. The
#: default, ``check_package``, runs in this process; the server passes one that runs it in a sandbox.
Validator = Callable[[Path, bool, bool], "tuple[Report, Report | None]"]


def check_package(path: Path, static: bool = False, smoke: bool = False) -> tuple[Report, Report | None]:
    """Validate ``path`` (model checks unless ``static``) and smoke-test it when asked. One function, so the
    CLI's in-process admission and the server's sandboxed child (``server.sandbox``) do the same; the file is
    read once (``check_snapshot``)."""
    from .validate import validate

    if not smoke:
        return validate(path, _options(static)), None
    with PackageSnapshot.read(path) as snapshot:
        return check_snapshot(snapshot, static, smoke)


def _options(static: bool) -> Any:
    from .checks import ValidateOptions

    return ValidateOptions(static=static)


def check_snapshot(snapshot: PackageSnapshot, static: bool = False,
                   smoke: bool = False) -> tuple[Report, Report | None]:
    """``check_package`` of a snapshot's bytes: the smoke test runs on the session validation loaded (the
    model is loaded once), and both reports carry the snapshot's digest."""
    from .validate import validate_snapshot

    report, session = validate_snapshot(snapshot, _options(static), keep_session=smoke)
    try:
        return report, (_smoke(snapshot, session) if smoke else None)
    finally:
        if session is not None:
            session.close()


def _smoke(snapshot: PackageSnapshot, session: Session | None) -> Report:
    from .run.smoke import smoke_test

    try:
        result: Report = smoke_test(snapshot, session=session)
    except CzregError as exc:
        raise RegistryError(f"smoke test of {snapshot.path.name} failed: {exc.message}", hint=exc.hint) from None
    return result


def identify(path: Path | PackageSnapshot, name: str | None = None) -> Identity:
    """The identity ``publish`` files ``path`` under (``name``, else the package's ModelName, else the file
    name, by the same rules as ``--name``). A snapshot is parsed once for this and for validation."""
    from .package import inspect_package
    from .registry.versions import canonical_name, derived_name

    model_type: str | None = None
    classes: list[str] | None = None
    meta_name: str | None = None
    # a snapshot: the full read validation uses too (cached there); a path: the metadata only (validation
    # reads and CRC-checks every member anyway)
    package, _ = inspect_package(path, verify_crc=isinstance(path, PackageSnapshot))
    if isinstance(path, PackageSnapshot):
        path = path.path
    if package is not None and package.metadata is not None:
        from .metadata import ModelInfo

        with contextlib.suppress(Exception):
            info = ModelInfo.from_package(package)
            model_type, meta_name = info.type, info.name
            classes = list(info.classes) if info.classes else None
    if name:
        display, cname = name, canonical_name(name)
    else:  # package text is never filed under a rewritten name
        display = meta_name or path.stem
        cname = derived_name(display, "the package's ModelName" if meta_name else "the file name")
    kind = package.kind if package is not None else path.suffix.lstrip(".").lower() or "czann"
    return Identity(display, cname, kind, model_type, classes)


def admit(path: Path | str | PackageSnapshot, *, name: str | None = None, static: bool = False,
          smoke: bool = False, allow_invalid: bool = False, sign_key: Path | str | None = None,
          signed: SignedPackage | None = None, signer_public_key: Path | None = None,
          validator: Validator | None = None, images: Path | None = None, labels: Path | None = None,
          gates: list[Gate] | None = None, baseline: str | None = None, reg: RegistryClient | None = None,
          eval_options: EvalOptions | None = None) -> Evidence:
    """Admit ``path``: identity, validation (``validator``, by default ``check_package`` here), smoke test,
    gates, signature. Raises (nothing stored anywhere) when the package may not be published:
    ``InvalidPackageError`` for findings, ``RegistryError`` for a failed smoke test or gate,
    ``SignatureError`` for an upload's signature that does not verify.

    ``sign_key`` signs here; ``signed`` with ``signer_public_key`` is a signature made elsewhere (a client's,
    sent with its upload), verified here against these bytes.

    Given a ``PackageSnapshot`` (the caller's, still open), the ``Evidence`` keeps it, so the caller can store
    exactly those bytes (``Registry.publish``, the client's upload); given a path, ``admit`` reads it once
    itself and the evidence names only its digest."""
    if isinstance(path, PackageSnapshot):
        return _admit(path, name, static, smoke, allow_invalid, sign_key, signed, signer_public_key, validator,
                      images, labels, gates, baseline, reg, eval_options, keep=True)
    from .package import require_package_file

    path = Path(path)
    require_package_file(path)
    with PackageSnapshot.read(path) as snapshot:
        return _admit(snapshot, name, static, smoke, allow_invalid, sign_key, signed, signer_public_key, validator,
                      images, labels, gates, baseline, reg, eval_options, keep=False)


def _admit(snapshot: PackageSnapshot, name: str | None, static: bool, smoke: bool, allow_invalid: bool,
           sign_key: Path | str | None, signed: SignedPackage | None, signer_public_key: Path | None,
           validator: Validator | None, images: Path | None, labels: Path | None, gates: list[Gate] | None,
           baseline: str | None, reg: RegistryClient | None, eval_options: EvalOptions | None, *,
           keep: bool) -> Evidence:
    path = snapshot.path
    identity = identify(snapshot, name)
    if validator is None or validator is check_package:
        report, smoke_report = check_snapshot(snapshot, static, smoke)
    else:  # the server's sandbox: its child reads the file itself, so it must have read these bytes
        report, smoke_report = validator(path, static, smoke)
        if report.sha256 is not None and report.sha256 != snapshot.sha256:
            raise RegistryError(f"{path.name} changed while it was being checked (sha256 {report.sha256[:12]}... "
                                f"checked, {snapshot.sha256[:12]}... read); not published", hint="publish again")
    if report.sha256 is None:
        raise RegistryError(f"the validation of {path.name} gave no digest; not published",
                            hint="report this as a bug in the validator")
    if not report.valid and not allow_invalid:
        first = report.errors[0] if report.errors else report.warnings[0]
        raise InvalidPackageError(
            f"{path.name} is invalid ({len(report.errors)} error(s); first: {first.check}: {first.message}); "
            "not published", hint="fix it (czreg validate shows every finding) or pass --allow-invalid",
            report=report.to_dict())
    unsafe = [f for f in report.errors if f.check == GRAPH_AUDIT_CHECK]
    if unsafe:  # not even --allow-invalid: a registry must never hand out a graph nothing may run
        raise InvalidPackageError(
            f"{path.name}'s graph failed the static audit ({unsafe[0].message}); not published, not even with "
            "--allow-invalid", hint="re-export the model without these operations (czreg validate --static "
            "lists them)", report=report.to_dict())
    if smoke_report is not None and not smoke_report.valid and not allow_invalid:
        why = f" ({smoke_report.errors[0].check}: {smoke_report.errors[0].message})" if smoke_report.errors else ""
        raise RegistryError(f"{path.name} failed its smoke test{why}; not published",
                            hint="fix the model, or pass --allow-invalid")
    forced = allow_invalid and not (report.valid and (smoke_report is None or smoke_report.valid))
    evaluation = None
    if images is not None and labels is not None:
        from .evaluate.engine import evaluate
        from .evaluate.gate import evaluation_failures, refuse

        evaluation = evaluate(path, images, labels, eval_options).data
        measured = (evaluation.get("package") or {}).get("sha256")
        if measured != snapshot.sha256:  # the runner reads the file itself: it must have read these bytes
            raise RegistryError(f"{path.name} changed while it was being evaluated; not published",
                                hint="publish again")
        failures = evaluation_failures(reg, evaluation, gates or [], baseline, images, labels, eval_options)
        if failures:
            raise refuse(path.name, failures)
    elif gates or baseline:
        raise UsageError("--gate and --no-regression-from need --images and --labels (both)",
                         hint='e.g. --images data/img --labels data/lab --gate "mean_iou>=0.8"')
    if sign_key is not None:
        from .sharing.signing import sign_package

        with step("publish: signing"):
            signed = sign_package(path, sign_key, report=report, smoke=smoke_report, write=False,
                                  sha256=snapshot.sha256)
    elif signed is not None:
        signed = _check_signature(path, report.sha256, signed, signer_public_key)
    return Evidence(path, report.sha256, identity, report, smoke_report, signed, evaluation, forced,
                    snapshot if keep else None)


def _check_signature(path: Path, sha256: str, signed: SignedPackage, public_key: Path | None) -> SignedPackage:
    """A signature that came with an upload: it must verify with the public key that came with it, be
    about these bytes and name that key."""
    from .sharing.signing import verify_package

    if public_key is None:
        raise SignatureError(f"the signature of {path.name} came without its public key; not published",
                             hint="publish with czreg publish --sign (it sends the public key along)")
    with step("publish: checking the signature"):
        verified = verify_package(path, public_key, signature=signed.signature, attestation=signed.attestation,
                                  name=path.name)
    if verified.sha256 != sha256 or verified.key_id != signed.key_id:
        raise SignatureError(f"the signature of {path.name} is about other bytes or another key; not published",
                             hint="sign this exact file and publish again")
    return signed


def gated_publish(reg: RegistryClient, path: Path | str, *, images: Path, labels: Path, gates: list[Gate],
                  baseline: str | None, eval_options: EvalOptions | None = None, name: str | None = None,
                  static: bool = False, smoke: bool = False, allow_invalid: bool = False,
                  sign_key: Path | str | None = None,
                  **publish: Any) -> tuple[PublishResult, dict[str, Any], RecordedEvaluation]:
    """Admit ``path`` here (validate, smoke, evaluate, check ``gates`` and ``baseline``, sign), and only then
    publish it and record the evaluation, in any registry (a database or a server).

    Returns ``(PublishResult, evaluation, record)``. A failed gate raises ``RegistryError`` (exit 7) before
    anything is stored."""
    from .package import require_package_file

    path = Path(path)
    require_package_file(path)
    with PackageSnapshot.read(path) as snapshot:  # admitted and stored from the same bytes
        evidence = admit(snapshot, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid,
                         sign_key=sign_key, images=images, labels=labels, gates=gates, baseline=baseline, reg=reg,
                         eval_options=eval_options)
        assert evidence.evaluation is not None
        result = reg.publish(path, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid,
                             evidence=evidence, **publish)
    record = reg.record_evaluation(evidence.evaluation)
    return result, evidence.evaluation, record
