"""Sharing commands: keygen, sign, verify-signature, push (OCI), setting; plus the ``oci://`` side of ``pull``.

Thin over ``czregistry.sharing.signing`` and ``czregistry.sharing.oci`` (cryptography, model-signing and
oras-py are imported inside the commands).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ._common import echo_json, handle_errors, json_option, require_package_file, sigterm_as_interrupt

__all__ = ["oci_options", "pull_oci", "register"]

F = TypeVar("F", bound=Callable[..., Any])


def oci_options(fn: F) -> F:
    """``--plain-http``, ``--username`` and ``--password-stdin``; the command receives ``oci_auth`` (a dict)."""

    @click.option("--plain-http", is_flag=True, help="Talk HTTP, not HTTPS (a registry on localhost, say).")
    @click.option("--username", "-u", metavar="USER", help="Registry user (default: the Docker config's login).")
    @click.option("--password-stdin", is_flag=True, help="Read the registry password from standard input.")
    @functools.wraps(fn)
    def wrapper(*args: Any, plain_http: bool, username: str | None, password_stdin: bool, **kwargs: Any) -> Any:
        with handle_errors():
            if password_stdin and not username:
                raise UsageError("--password-stdin needs --username", hint="e.g. -u alice --password-stdin < pw.txt")
            password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
            if username and password is None:
                raise UsageError("--username needs --password-stdin",
                                 hint="pipe the password in: echo \"$PW\" | czreg ... -u USER --password-stdin")
        return fn(*args, oci_auth={"plain_http": plain_http, "username": username, "password": password}, **kwargs)

    return wrapper  # type: ignore[return-value]


def _attested(info: dict[str, Any]) -> str:
    a = info["attested"]
    verdict = "VALID" if a["valid"] else "INVALID"
    what = ", ".join(x for x in (a["format"], a["schema_version"] and f"schema {a['schema_version']}") if x)
    smoke = {None: "not run", True: "passed", False: "FAILED"}[a["smoke"]]
    return f"{verdict} [{what}], {a['errors']} error(s), {a['warnings']} warning(s); smoke test: {smoke}"


# --- keys and signatures ---------------------------------------------------------------------------------


@click.command("keygen", short_help="Make an EC P-256 signing key pair.")
@click.option("-o", "--output", "prefix", type=click.Path(path_type=Path), default=Path("czreg-key"),
              show_default=True, help="Writes PREFIX.pem (private, mode 0600) and PREFIX.pub (public).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@json_option
def keygen_cmd(prefix: Path, force: bool, as_json: bool) -> None:
    """Make an EC P-256 signing key pair (the same kind `openssl ecparam -name prime256v1 -genkey` makes)."""
    with handle_errors(), sigterm_as_interrupt():
        from ..sharing.signing import generate_keypair

        private, public = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".pub")
        kid = generate_keypair(private, public, force=force)
    if as_json:
        echo_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
        return
    click.echo(f"Private key: {private} (keep it secret)\nPublic key:  {public} (give it to your partners)\n"
               f"Key id:      {kid}")


@click.command("sign", short_help="Validate a package, then sign and attest it.")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), metavar="PRIVATE.pem",
              help="EC private key (PEM; czreg keygen or openssl).")
@click.option("--static", is_flag=True, help="Attest a static validation (skip the model checks).")
@click.option("--smoke", is_flag=True, help="Also run the smoke test and attest its report.")
@click.option("--allow-invalid", is_flag=True, help="Sign even if validation fails (the attestation says so).")
@click.option("--force", is_flag=True, help="Replace an existing PACKAGE.sig / PACKAGE.att.")
@json_option
def sign_cmd(package: Path, key: Path, static: bool, smoke: bool, allow_invalid: bool, force: bool,
             as_json: bool) -> None:
    """Validate PACKAGE, then write PACKAGE.sig (OpenSSF model-signing) and PACKAGE.att (signed report)."""
    with handle_errors():
        require_package_file(package)
        from ..checks import ValidateOptions
        from ..errors import SignatureError
        from ..sharing.signing import attestation_path, sign_package, signature_path
        from ..validate import validate

        report = validate(package, ValidateOptions(static=static))
        smoke_report = None
        if smoke:
            from ..run.smoke import smoke_test

            smoke_report = smoke_test(package)
        bad = not report.valid or (smoke_report is not None and not smoke_report.valid)
        if bad and not allow_invalid:
            first = (report.errors or (smoke_report.errors if smoke_report else []) or report.warnings)
            why = f" (first: {first[0].check}: {first[0].message})" if first else ""
            raise SignatureError(f"{package.name} is invalid{why}; not signed",
                                 hint="fix it (czreg validate shows every finding) or pass --allow-invalid")
        signed = sign_package(package, key, report=report, smoke=smoke_report, force=force)
    out = {"package": str(package), "sha256": signed.sha256, "key_id": signed.key_id,
           "signature": str(signature_path(package)), "attestation": str(attestation_path(package)),
           "attested_valid": report.valid}
    if as_json:
        echo_json(out)
        return
    click.echo(f"Signed {package.name} (sha256:{signed.sha256[:12]}..., key {signed.key_id[:16]}...)\n"
               f"  signature:   {out['signature']}\n  attestation: {out['attestation']}"
               f" (validation report: {'valid' if report.valid else 'INVALID'})")


@click.command("verify-signature", short_help="Check a package against its signature.")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), metavar="PUBLIC.pem",
              help="The signer's public key (PEM).")
@click.option("--signature", "sig", type=click.Path(path_type=Path), help="Signature file (default: PACKAGE.sig).")
@click.option("--attestation", "att", type=click.Path(path_type=Path),
              help="Attestation file (default: PACKAGE.att).")
@json_option
def verify_signature_cmd(package: Path, key: Path, sig: Path | None, att: Path | None, as_json: bool) -> None:
    """Check PACKAGE against its signature and attestation with PUBLIC.pem, offline (exit 10 if not)."""
    with handle_errors():
        require_package_file(package)
        from ..sharing.signing import read_bundle, verify_package

        def read(p: Path | None, what: str) -> bytes | None:
            if p is None:
                return None
            try:
                return read_bundle(p, what)  # bounded: --signature /dev/zero is refused, not read
            except FileNotFoundError:
                raise UsageError(f"no such file: {p}", hint="check the path") from None

        info = verify_package(package, key, signature=read(sig, "signature"),
                              attestation=read(att, "attestation")).to_dict()
    if as_json:
        echo_json(info)
        return
    click.echo(f"{package.name}: signature OK\n  sha256:   {info['sha256']}\n  key id:   {info['key_id']}\n"
               f"  signed:   {info['signed_at']} ({info['signer_tool']})\n  attested: {_attested(info)}")


# --- OCI -------------------------------------------------------------------------------------------------


@click.command("push", short_help="Push a package to an OCI registry.")
@click.argument("package")
@click.argument("target", metavar="oci://HOST[:PORT]/REPO:TAG")
@oci_options
@click.option("--static", is_flag=True, help="Validate statically for the attached report (when not signed).")
@click.option("--allow-invalid", is_flag=True, help="Push even if validation fails.")
@click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
              help="Registry to take PACKAGE from when it is a specifier (NAME==1.2.0) [env CZREG_REGISTRY]")
@click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE", help="Blob folder [env CZREG_BLOB_STORE]")
@json_option
def push_cmd(package: str, target: str, oci_auth: dict[str, Any], static: bool, allow_invalid: bool,
             registry_url: str | None, blob_store: str | None, as_json: bool) -> None:
    """Push PACKAGE (a file, or a registry version such as NAME==1.2.0) to an OCI registry.

    The report, PACKAGE.sig and PACKAGE.att (or the registry's stored signature) go along as referrers.
    """
    with handle_errors():
        from ..sharing import oci

        oci.parse_reference(target, need_tag=True)  # a bad target fails before any validation
        path = Path(package)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="czreg-push-") as tmp:
            if path.is_file() or path.suffix.lower() in (".czann", ".czmodel") or "/" in package:
                require_package_file(path)
                kw = _file_attachments(path, static=static, allow_invalid=allow_invalid)
            else:
                path, kw = _registry_attachments(package, Path(tmp), registry_url, blob_store)
            result = oci.push(path, target, **oci_auth, **kw)
    if as_json:
        echo_json(result.to_dict())
        return
    roles = ", ".join(r["role"] for r in result.referrers) or "none"
    click.echo(f"Pushed {path.name} -> {result.reference}\n  digest: {result.digest}\n"
               f"  attached: {roles} (via {'referrers API' if result.referrers_via == 'api' else 'tag schema'})")


def _file_attachments(path: Path, *, static: bool, allow_invalid: bool) -> dict[str, Any]:
    """The report, signature and attestation of a package file: its .sig/.att when there, the attested report
    when signed, a fresh validation otherwise."""
    import json

    from ..errors import OciError
    from ..sharing.signing import attestation_path, read_bundle, signature_path

    def beside(p: Path, what: str) -> bytes | None:
        try:
            return read_bundle(p, what)  # bounded, like every bundle read
        except FileNotFoundError:
            return None

    sig_p, att_p = signature_path(path), attestation_path(path)
    signature, attestation = beside(sig_p, "signature"), beside(att_p, "attestation")
    report = None
    if attestation is not None:
        try:
            import base64

            statement = json.loads(base64.b64decode(json.loads(attestation)["dsseEnvelope"]["payload"]))
            report = statement["predicate"]["report"]
        except Exception:
            raise OciError(f"{att_p} is not a czregistry attestation; nothing pushed",
                           hint="re-sign the package with czreg sign --force") from None
    if report is None:
        from ..checks import ValidateOptions
        from ..validate import validate

        rep = validate(path, ValidateOptions(static=static))
        if not rep.valid and not allow_invalid:
            first = rep.errors[0] if rep.errors else rep.warnings[0]
            raise OciError(f"{path.name} is invalid ({first.check}: {first.message}); nothing pushed",
                           hint="fix it (czreg validate) or pass --allow-invalid")
        report = rep.to_dict()
    return {"report": report, "signature": signature, "attestation": attestation}


def _registry_attachments(requirement: str, folder: Path, registry_url: str | None,
                          blob_store: str | None) -> tuple[Path, dict[str, Any]]:
    """A registry version: its bytes, stored report and (first) stored signature."""
    from ..registry.remote import connect

    with connect(registry_url, blob_store, create=False) as reg:
        pulled = reg.pull(requirement, folder / "")
        v = pulled.version
        exact = f"{v['canonical_name']}=={v['version']}"
        report = reg.show(exact)["report"]
        stored = reg.signatures(exact)
    first = stored[0] if stored else None
    return pulled.path, {"report": report,
                         "signature": first["signature"].encode() if first else None,
                         "attestation": first["attestation"].encode() if first else None}


def pull_oci(source: str, output: str | None, key: Path | None, oci_auth: dict[str, Any], as_json: bool,
             force: bool = False) -> None:
    """``czreg pull oci://...``: called by the registry's ``pull`` command for ``oci://`` sources."""
    with handle_errors():
        from ..sharing import oci

        result = oci.pull(source, Path(output) if output else Path.cwd(), key=key, force=force, **oci_auth)
    if as_json:
        echo_json(result.to_dict())
        return
    extra = ", signature verified" if result.verified else (", signature attached" if result.signature_path else "")
    click.echo(f"Pulled {result.reference} -> {result.path} (sha256 verified{extra})")
    if result.verified:
        click.echo(f"  key id:   {result.verified['key_id']}\n  attested: {_attested(result.verified)}")


# --- registry settings -----------------------------------------------------------------------------------


@click.command("setting", short_help="Show or change registry-wide settings.")
@click.argument("name", required=False)
@click.argument("value", required=False)
@click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
              help="Registry: a folder, sqlite:///file.db, postgresql+psycopg://... or a server https://host "
                   "(changing a setting there needs an admin token: CZREG_TOKEN) [env CZREG_REGISTRY]")
@click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE", help="Blob folder [env CZREG_BLOB_STORE]")
@json_option
def setting_cmd(name: str | None, value: str | None, registry_url: str | None, blob_store: str | None,
                as_json: bool) -> None:
    """Show or change registry-wide settings, e.g. `czreg setting require-signatures on` (audited)."""
    with handle_errors():
        from ..registry.remote import connect
        from ..registry.signatures import SETTINGS

        with connect(registry_url, blob_store, create=False) as reg:
            for line in getattr(reg, "warnings", []):
                click.secho(f"Warning: {line}", fg="yellow", err=True)
            if value is not None and name is not None:
                out: dict[str, Any] = reg.set_setting(name, value)
            elif name is not None:
                key = name.replace("-", "_")
                out = {key: reg.setting(name)}
            else:
                out = reg.settings()
    if as_json:
        echo_json(out)
    elif "setting" in out:
        click.echo(f"{out['setting'].replace('_', '-')}: {_onoff(out['from'])} -> {_onoff(out['to'])}")
    else:
        for k, v in out.items():
            click.echo(f"{k.replace('_', '-')}: {_onoff(v)}  ({SETTINGS[k].help})")


def _onoff(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    for cmd in (keygen_cmd, sign_cmd, verify_signature_cmd, push_cmd, setting_cmd):
        group.add_command(cmd)
