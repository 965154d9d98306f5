"""Admitting a package to a registry: one step, one value.

``admit`` names the package (its ModelName or ``--name``), validates it, smoke-tests it, evaluates it against
``--gate`` bounds and a ``--no-regression-from`` baseline, and signs it (or checks a signature that came with
an upload), refusing with the same typed errors wherever it runs; it returns ``Evidence``, which
``Registry.publish`` stores as it is. The CLI's local publish, the client side of a publish to a server
(which signs before the upload) and the server's own check of an upload (``validator``: the server's
sandbox, see ``server.sandbox``) all go through here.

Each step sees the package through the same ``Evidence.sha256``: the validation report's digest is the
one the signature covers and the blob store checks, so evidence about other bytes is never stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit import GRAPH_AUDIT_CHECK
from .errors import CzregError, InvalidPackageError, RegistryError, SignatureError, UsageError
from .progress import step
from .registry.records import Evidence, Identity

if TYPE_CHECKING:
    from .evaluate.engine import EvalOptions
    from .evaluate.gate import Gate
    from .registry.records import PublishResult, RecordedEvaluation, RegistryClient
    from .report import Report
    from .sharing.signing import SignedPackage

__all__ = ["Evidence", "Identity", "Validator", "admit", "check_package", "gated_publish", "identify"]

#: How a package is checked: ``(path, static, smoke) -> (validation report, smoke report or None)``. The
#: default, ``check_package``, runs in this process; the server passes one that runs it in a sandbox.
Validator = Callable[[Path, bool, bool], "tuple[Report, Report | None]"]


def check_package(path: Path, static: bool = False, smoke: bool = False) -> tuple[Report, Report | None]:
    """Validate ``path`` (model checks unless ``static``) and smoke-test it when asked. One function, so the
    CLI's in-process admission and the server's sandboxed child (``server.sandbox``) do the same."""
    from .checks import ValidateOptions
    from .validate import validate

    report = validate(path, ValidateOptions(static=static))
    return report, (_smoke(path) if smoke else None)


def _smoke(path: Path) -> Report:
    from .run.smoke import smoke_test

    try:
        result: Report = smoke_test(path)
    except CzregError as exc:
        raise RegistryError(f"smoke test of {path.name} failed: {exc.message}", hint=exc.hint) from None
    return result


def identify(path: Path, name: str | None = None) -> Identity:
    """The identity ``publish`` files ``path`` under (``name``, else the package's ModelName, else the file
    name, by the same rules as ``--name``)."""
    from .package import inspect_package
    from .registry.versions import canonical_name, derived_name

    model_type: str | None = None
    classes: list[str] | None = None
    meta_name: str | None = None
    # the metadata only: validation reads and CRC-checks every member anyway (a full pass here would be a
    # third decompression of the model for publish --smoke)
    package, _ = inspect_package(path, verify_crc=False)
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


def admit(path: Path | str, *, name: str | None = None, static: bool = False, smoke: bool = False,
          allow_invalid: bool = False, sign_key: Path | str | None = None,
          signed: SignedPackage | None = None, signer_public_key: Path | None = None,
          validator: Validator | None = None, images: Path | None = None, labels: Path | None = None,
          gates: list[Gate] | None = None, baseline: str | None = None, reg: RegistryClient | None = None,
          eval_options: EvalOptions | None = None) -> Evidence:
    """Admit ``path``: identity, validation (``validator``, by default ``check_package`` here), smoke test,
    gates, signature. Raises (nothing stored anywhere) when the package may not be published:
    ``InvalidPackageError`` for findings, ``RegistryError`` for a failed smoke test or gate,
    ``SignatureError`` for an upload's signature that does not verify.

    ``sign_key`` signs here; ``signed`` with ``signer_public_key`` is a signature made elsewhere (a client's,
    sent with its upload), verified here against these bytes."""
    from .package import require_package_file

    path = Path(path)
    require_package_file(path)
    identity = identify(path, name)
    report, smoke_report = (validator or check_package)(path, static, smoke)
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
        failures = evaluation_failures(reg, evaluation, gates or [], baseline, images, labels, eval_options)
        if failures:
            raise refuse(path.name, failures)
    elif gates or baseline:
        raise UsageError("--gate and --no-regression-from need --images and --labels (both)",
                         hint='e.g. --images data/img --labels data/lab --gate "mean_iou>=0.8"')
    if sign_key is not None:
        from .sharing.signing import sign_package

        with step("publish: signing"):
            signed = sign_package(path, sign_key, report=report, smoke=smoke_report, write=False)
    elif signed is not None:
        signed = _check_signature(path, report.sha256, signed, signer_public_key)
    return Evidence(path, report.sha256, identity, report, smoke_report, signed, evaluation, forced)


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
    evidence = admit(path, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid, sign_key=sign_key,
                     images=images, labels=labels, gates=gates, baseline=baseline, reg=reg,
                     eval_options=eval_options)
    assert evidence.evaluation is not None
    result = reg.publish(path, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid,
                         evidence=evidence, **publish)
    record = reg.record_evaluation(evidence.evaluation)
    return result, evidence.evaluation, record
