"""Registry commands: publish, pull, list, show, history, alias, tag, yank, unyank, verify, gc, purge.

Thin over ``czregistry.registry`` (imported inside each command: SQLAlchemy stays out of start-up).
Every command takes ``--registry URL`` and ``--blob-store PATH`` (or ``CZREG_REGISTRY`` /
``CZREG_BLOB_STORE``). An ``http(s)://`` URL is a registry server (``czreg serve``): the same commands then
go through ``czregistry.registry.remote`` with ``CZREG_TOKEN``, with the same output and exit codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import RegistryError, UsageError
from ._common import announce_lock_waits, echo_json, handle_errors, json_option
from ._progress import quiet_option, show_progress
from .sharing import oci_options, pull_oci

if TYPE_CHECKING:
    from ..registry.records import RegistryClient as Registry

__all__ = ["register"]

F = TypeVar("F", bound=Callable[..., Any])


def human_size(n: int) -> str:
    """``report.human_size``, imported on use: ``czreg list`` need not load the report module at start-up."""
    from ..report import human_size as size

    return size(n)


#: ``--registry`` help for commands that work locally and through a registry server alike
REGISTRY_HELP = ("Registry: a folder, sqlite:///file.db, postgresql+psycopg://... or a server https://host "
                 "(token: CZREG_TOKEN) [env CZREG_REGISTRY; default: per-user data folder]")
#: ... and for the administration commands (verify, gc, purge): through a server they need an admin token
ADMIN_REGISTRY_HELP = ("Registry: a folder, sqlite:///file.db, postgresql+psycopg://... or a server https://host "
                       "(needs an admin token: CZREG_TOKEN) [env CZREG_REGISTRY; default: per-user data folder]")


def _location_options(fn: F, *, local_only: bool = False) -> F:
    """``--registry`` and ``--blob-store`` on a command (passed as ``registry_url`` and ``blob_store``)."""
    fn = click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE",
                      help="Blob folder shared by the team (needed with PostgreSQL) [env CZREG_BLOB_STORE]")(fn)
    return click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
                        help=ADMIN_REGISTRY_HELP if local_only else REGISTRY_HELP)(fn)


def _call_with_registry(fn: Callable[..., Any], registry_url: str | None, blob_store: str | None,
                        *args: Any, **kwargs: Any) -> Any:
    """Open the registry (local or server), say its warnings, and call ``fn(..., reg=reg)``."""
    with handle_errors():
        from ..registry.remote import connect

        announce_lock_waits()
        with connect(registry_url, blob_store, create=False) as reg:
            _warn(getattr(reg, "warnings", []))
            return fn(*args, reg=reg, **kwargs)


def _registry_options(fn: F, *, local_only: bool = False) -> F:
    """``--registry`` and ``--blob-store`` on a command; the command receives ``reg`` (opened lazily).
    ``local_only``: an administration command (verify, gc, purge), whose help names the admin token."""

    @functools.wraps(fn)
    def wrapper(*args: Any, registry_url: str | None, blob_store: str | None, **kwargs: Any) -> Any:
        return _call_with_registry(fn, registry_url, blob_store, *args, **kwargs)

    return _location_options(wrapper, local_only=local_only)  # type: ignore[return-value]


def _local_registry_options(fn: F) -> F:
    return _registry_options(fn, local_only=True)


def measurement_lines(measurements: dict[str, Any]) -> list[tuple[str, str]]:
    """``report.measurement_lines``, imported on use (start-up time, as ``human_size``)."""
    from ..report import measurement_lines as lines

    return lines(measurements)


def _parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"invalid tag '{item}'", hint="write --tag key=value")
        tags[key.strip()] = value.strip()
    return tags


def _warn(lines: list[str]) -> None:
    for line in lines:
        click.secho(f"Warning: {line}", fg="yellow", err=True)


@click.command("publish", short_help="Validate a package and store it in the registry.")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--name", help="Model name (default: the package's ModelName, else the file name).")
@click.option("--version", "version", help="Version to publish (PEP 440; e.g. 1.2.0).")
@click.option("--bump", "bump_part", type=click.Choice(["major", "minor", "patch"]),
              help="Publish as the next major/minor/patch after the highest version ever used.")
@click.option("--static", is_flag=True, help="Validate metadata and archive only (skip model checks).")
@click.option("--allow-invalid", is_flag=True, help="Publish even if validation fails (recorded).")
@click.option("--smoke", is_flag=True, help="Also run the smoke test and store its report.")
@click.option("--note", help="Free text stored with the version.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the version (repeatable).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), metavar="PRIVATE.pem",
              help="Sign the package with this EC key and store the signature with the version.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Evaluate on these images first (with --labels); the result is recorded with the version.")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="Labels for --images, by file stem.")
@click.option("--gate", "gates", multiple=True, metavar="METRIC>=VALUE",
              help='Refuse to publish unless the evaluation meets this bound, e.g. "mean_iou>=0.8" (repeatable).')
@click.option("--no-regression-from", "baseline", metavar="NAME@ALIAS",
              help="Refuse to publish if significantly worse than this version on the same images.")
@quiet_option
@json_option
@_registry_options
def publish_cmd(reg: Registry, package: Path, name: str | None, version: str | None, bump_part: Any,
                static: bool, allow_invalid: bool, smoke: bool, note: str | None, tags: tuple[str, ...],
                images: Path | None, labels: Path | None, gates: tuple[str, ...], baseline: str | None,
                sign_key: Path | None, quiet: bool, as_json: bool) -> None:
    """Validate PACKAGE and store it in the registry as NAME VERSION (immutable once published)."""
    evaluation: dict[str, Any] | None = None
    with handle_errors(), show_progress(quiet):
        if (images is None) != (labels is None) or ((gates or baseline) and images is None):
            raise UsageError("--gate and --no-regression-from need --images and --labels (both)",
                             hint='e.g. --images data/img --labels data/lab --gate "mean_iou>=0.8"')
        if images is not None and labels is not None:
            from ..admission import gated_publish
            from ..evaluate.gate import parse_gate

            result, evaluation, _ = gated_publish(
                reg, package, images=images, labels=labels, gates=[parse_gate(g) for g in gates],
                baseline=baseline, name=name, version=version, bump_part=bump_part, static=static,
                allow_invalid=allow_invalid, note=note, tags=_parse_tags(tags), smoke=smoke,
                sign_key=sign_key)
        else:
            result = reg.publish(package, name=name, version=version, bump_part=bump_part, static=static,
                                 allow_invalid=allow_invalid, note=note, tags=_parse_tags(tags), smoke=smoke,
                                 sign_key=sign_key)
    v = result.version
    if as_json:
        echo_json({**result.to_dict(), "report": result.report.to_dict(),
                   "smoke": result.smoke.to_dict() if result.smoke else None,
                   **({"evaluation": evaluation} if evaluation is not None else {})})
        return
    verdict = "valid" if result.report.valid else "INVALID (--allow-invalid)"
    if result.status == "exists" and (note or tags):
        _warn([f"--note/--tag not stored: {v['name']} {v['version']} already exists with these bytes and is "
               f"immutable (tag it with 'czreg tag', or publish a re-release with --bump)"])
    if result.status == "exists":
        click.echo(f"Already published: {v['name']} {v['version']} has these exact bytes ({v['digest'][:19]}...)")
    else:
        signed = f", signed by {v['signed_by'][-1][:16]}..." if sign_key is not None and v["signed_by"] else ""
        click.echo(f"Published {v['name']} {v['version']} ({v['digest'][:19]}..., {human_size(v['size'])}, {verdict}"
                   f"{signed})")


@click.command("pull", short_help="Fetch a version (registry, server or oci://).")
@click.argument("requirement")
@click.option("-o", "--output", type=click.Path(),
              help="File or folder to write to (default: NAME-VERSION.czann here; a folder for oci://).")
@click.option("--pre", is_flag=True, default=None, help="Allow pre-releases to match specifiers.")
@click.option("--key", type=click.Path(path_type=Path), metavar="PUBLIC.pem",
              help="Refuse (and write nothing) unless a signature by this key verifies; writes .sig/.att beside.")
@click.option("--force", is_flag=True, help="Replace an existing output file (identical bytes never count).")
@click.option("--format", "out_format", type=click.Choice(["czann", "bioimageio"]), default="czann",
              show_default=True, help="bioimageio: write NAME-VERSION.bioimageio.zip into the -o folder "
                                      "(the czregistry-bioimageio plugin).")
@oci_options
@json_option
@click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY", help=REGISTRY_HELP)
@click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE",
              help="Blob folder shared by the team (needed with PostgreSQL) [env CZREG_BLOB_STORE]")
def pull_cmd(requirement: str, output: str | None, pre: bool | None, key: Path | None, force: bool,
             out_format: str, oci_auth: dict[str, Any], as_json: bool, registry_url: str | None,
             blob_store: str | None) -> None:
    """Fetch a version: NAME, 'NAME>=1.2,<2', NAME==1.2.0, NAME@alias or sha256:DIGEST; or an OCI artifact:
    oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:DIGEST (-o names the folder).

    The blob is streamed and its SHA-256 checked before the file appears under its name."""
    if out_format == "bioimageio":
        _pull_bioimageio(requirement, output, pre, key, force, as_json, registry_url, blob_store)
        return
    if requirement.startswith("oci://"):
        pull_oci(requirement, output, key, oci_auth, as_json, force=force)
        return
    with handle_errors():
        from ..registry.remote import connect

        with connect(registry_url, blob_store, create=False) as reg:
            _warn(getattr(reg, "warnings", []))
            result = reg.pull(requirement, output, prereleases=pre or None, key=key, force=force)
    _warn(result.warnings)
    if as_json:
        echo_json(result.to_dict())
        return
    v = result.version
    signed = ", signature verified" if result.verified else ""
    click.echo(f"Pulled {v['name']} {v['version']} -> {result.path} ({human_size(v['size'])}, sha256 verified{signed})")


def _pull_bioimageio(requirement: str, output: str | None, pre: bool | None, key: Path | None, force: bool,
                     as_json: bool, registry_url: str | None, blob_store: str | None) -> None:
    """``pull --format bioimageio``: the version is pulled (digest and signature checked) into a temp folder,
    then written by the ``export-bioimageio`` command, which the czregistry-bioimageio plugin registers (the
    core reaches plugins only through their hooks), into the ``-o`` folder as NAME-VERSION.bioimageio.zip."""
    import tempfile

    ctx = click.get_current_context()
    root = ctx.find_root().command
    export = root.get_command(ctx, "export-bioimageio") if isinstance(root, click.Group) else None
    with handle_errors():
        if not output:
            raise UsageError("--format bioimageio needs -o FOLDER", hint="e.g. -o models/")
        if requirement.startswith("oci://"):
            raise UsageError("--format bioimageio pulls from a registry or server, not oci://")
        if export is None:
            raise UsageError("--format bioimageio needs the czregistry-bioimageio plugin (command export-bioimageio)",
                             hint="pip install -e plugins/czregistry-bioimageio (and allow it in CZREG_PLUGINS)")
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file; --format bioimageio writes into a folder",
                             hint="give -o a folder (it is created if missing)")
        from ..registry.remote import connect

        tmp = tempfile.TemporaryDirectory(prefix="czreg-pull-")
    with tmp:
        with handle_errors(), connect(registry_url, blob_store, create=False) as reg:
            _warn(getattr(reg, "warnings", []))
            result = reg.pull(requirement, Path(tmp.name), prereleases=pre or None, key=key, force=True)
        _warn(result.warnings)
        v = result.version
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{v['name']}-{v['version']}.bioimageio.zip"
        ctx.invoke(export, package=Path(result.path), output=target, license_id=None, authors=(), force=force,
                   as_json=as_json)
    if not as_json:
        signed = ", signature verified" if result.verified else ""
        click.echo(f"Pulled {v['name']} {v['version']} -> {target} (bioimage.io 0.5, sha256 verified{signed})")


@click.command("list", short_help="List models (newest version each) or versions.")
@click.argument("name", required=False)
@click.option("--type", "model_type", help="Only this model type (e.g. SingleClassSemanticSegmentation).")
@click.option("--class", "class_name", help="Only models with this class name.")
@click.option("--tag", help="Only versions with this tag (KEY or KEY=VALUE).")
@click.option("--alias", help="Only versions an alias points at.")
@click.option("--all-versions", is_flag=True, help="Every matching version, not only the newest per model.")
@click.option("--yanked", "include_yanked", is_flag=True, help="Include yanked versions.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@json_option
@_location_options
def list_cmd(registry_url: str | None, blob_store: str | None, name: str | None, model_type: str | None,
             class_name: str | None, tag: str | None, alias: str | None, all_versions: bool, include_yanked: bool,
             limit: int | None, as_json: bool) -> None:
    """List models (newest version each) or versions; NAME filters by substring or glob (nuclei*)."""
    filters: dict[str, Any] = {"name": name, "model_type": model_type, "class_name": class_name, "tag": tag,
                               "alias": alias, "all_versions": all_versions, "include_yanked": include_yanked,
                               "limit": limit}
    with handle_errors():
        # A local SQLite registry answers without SQLAlchemy (start-up time); anything else opens it.
        from ..registry.quicklist import quick_search

        rows = quick_search(registry_url, blob_store, **filters)
    if rows is None:
        rows = _call_with_registry(lambda reg: reg.search(**filters), registry_url, blob_store)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No models found.")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        extra = f"  ({r['versions']} version{'s' if r['versions'] != 1 else ''})" if "versions" in r else ""
        flags = (" [yanked]" if r["yanked"] else "") + ("" if r["valid"] else " [invalid]")
        click.echo(f"{r['name']:<{width}}  {r['version']:<12} {r['type'] or '-':<32} {human_size(r['size']):>9}"
                   f"  {r['created_at']}{flags}{extra}")


@click.command("show", short_help="Show a model's versions, or one version in full.")
@click.argument("requirement")
@json_option
@_registry_options
def show_cmd(reg: Registry, requirement: str, as_json: bool) -> None:
    """Show a model (its versions and aliases) or one version (provenance, validation report)."""
    with handle_errors():
        info = reg.show(requirement)
    if as_json:
        echo_json(info)
        return
    if "versions" in info:
        click.echo(f"{info['name']}  latest: {info['latest'] or '-'}")
        for a, v in info["aliases"].items():
            click.echo(f"  @{a} -> {v}")
        for v in info["versions"]:
            flags = (" [yanked]" if v["yanked"] else "") + ("" if v["valid"] else " [invalid]")
            size = human_size(v["size"])
            click.echo(f"  {v['version']:<12} {v['digest'][:19]}...  {size:>9}  {v['created_at']}{flags}")
        if info["purged"]:
            click.echo(f"  purged (numbers never reused): {', '.join(info['purged'])}")
        return
    rep = info["report"]
    lines = [
        f"{info['name']} {info['version']}" + (f"  [YANKED: {info['yanked_reason']}]" if info["yanked"] else ""),
        f"  digest:     {info['digest']}  ({human_size(info['size'])}, {info['kind']})",
        f"  type:       {info['type'] or '-'}   classes: {', '.join(info['classes'] or []) or '-'}",
        f"  published:  {info['created_at']} by {info['created_by']} on {info['host']} from {info['source']}"
        f" (czregistry {info['czregistry_version']})",
        f"  validation: {'valid' if info['valid'] else 'INVALID'}"
        + (" (published with --allow-invalid)" if info["allow_invalid"] else "")
        + f", {sum(f['severity'] == 'error' for f in rep['findings'])} error(s),"
          f" {sum(f['severity'] == 'warning' for f in rep['findings'])} warning(s)",
    ]
    rows = measurement_lines(rep.get("measurements") or {})
    if rows:
        width = max(len(label) for label, _ in rows)
        lines.append("  measured:")
        lines += [f"    {label + ':':<{width + 1}} {value}" for label, value in rows]
    if info["smoke"]:
        lines.append(f"  smoke test: {'passed' if info['smoke'].get('valid') else 'FAILED'}")
    if info.get("signed_by"):
        lines.append("  signed by:  " + ", ".join(f"key {k[:16]}..." for k in info["signed_by"]))
    if info["aliases"]:
        lines.append("  aliases:    " + ", ".join(f"@{a}" for a in info["aliases"]))
    if info["tags"]:
        lines.append("  tags:       " + ", ".join(f"{k}={v}" for k, v in info["tags"].items()))
    if info["note"]:
        lines.append(f"  note:       {info['note']}")
    for e in info.get("evaluations") or []:
        m = e["metrics"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
        lines.append(f"  evaluated:  {shown} on {e['dataset']['images']} image(s), dataset "
                     f"{e['dataset']['digest'][:19]}... ({e['definition']}, {e['recorded_at']})")
    click.echo("\n".join(lines))


@click.command("history", short_help="Show the audit trail, newest first.")
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@_registry_options
def history_cmd(reg: Registry, name: str | None, limit: int, as_json: bool) -> None:
    """The audit trail (newest first): publishes, alias moves, tags, yanks, purges."""
    with handle_errors():
        events = reg.history(name, limit=limit)
    if as_json:
        echo_json(events)
        return
    for e in events:
        what = e["version"] or ""
        if e["alias"]:
            what = f"@{e['alias']}: {e['from'] or '-'} -> {e['to'] or '-'}"
        click.echo(f"{e['at']}  {e['actor']}@{e['host']}  {e['action']:<12} {e['model']} {what}")


@click.group("alias", short_help="Set, move, remove or list aliases (@production).")
def alias_group() -> None:
    """Named pointers to versions (@production, @staging); every move is audited. '@latest' is reserved."""


@alias_group.command("set")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
@json_option
@_registry_options
def alias_set_cmd(reg: Registry, name: str, alias: str, version: str, as_json: bool) -> None:
    """Point NAME@ALIAS at VERSION (creates or moves it)."""
    with handle_errors():
        out = reg.alias_set(name, alias, version)
    if as_json:
        echo_json(out)
    elif not out["changed"]:
        click.echo(f"{out['name']}@{out['alias']} already points at {out['to']}")
    else:
        click.echo(f"{out['name']}@{out['alias']}: {out['from'] or '-'} -> {out['to']}")


@alias_group.command("rm")
@click.argument("name")
@click.argument("alias")
@json_option
@_registry_options
def alias_rm_cmd(reg: Registry, name: str, alias: str, as_json: bool) -> None:
    """Remove NAME@ALIAS."""
    with handle_errors():
        out = reg.alias_remove(name, alias)
    if as_json:
        echo_json(out)
    else:
        click.echo(f"Removed {out['name']}@{out['alias']} (was {out['from']})")


@alias_group.command("list")
@click.argument("name")
@json_option
@_registry_options
def alias_list_cmd(reg: Registry, name: str, as_json: bool) -> None:
    """Show NAME's aliases."""
    with handle_errors():
        out = reg.aliases(name)
    if as_json:
        echo_json(out)
    else:
        for a, v in out.items():
            click.echo(f"@{a} -> {v}")


@click.command("tag", short_help="Set or remove tags on a version.")
@click.argument("requirement")
@click.argument("tags", nargs=-1, metavar="KEY=VALUE...")
@click.option("--rm", "remove", multiple=True, metavar="KEY", help="Remove this tag (repeatable).")
@json_option
@_registry_options
def tag_cmd(reg: Registry, requirement: str, tags: tuple[str, ...], remove: tuple[str, ...], as_json: bool) -> None:
    """Set or remove tags on a version (e.g. czreg tag nuclei-seg==1.2.0 stain=dapi)."""
    with handle_errors():
        if not tags and not remove:
            raise UsageError("nothing to do", hint="give KEY=VALUE pairs or --rm KEY")
        out = reg.tag(requirement, _parse_tags(tags), list(remove))
    if as_json:
        echo_json(out)
    else:
        click.echo(", ".join(f"{k}={v}" for k, v in out.items()) or "(no tags)")


@click.command("yank", short_help="Hide a version; only an exact pin still gets it.")
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="Why (shown to everyone who pins it).")
@json_option
@_registry_options
def yank_cmd(reg: Registry, name: str, version: str, reason: str, as_json: bool) -> None:
    """Hide a version from specifiers and listings; an exact pin still gets it, with a warning. Aliases
    that point at it stay, but resolving them is refused until they are moved (the command names them)."""
    with handle_errors():
        out = reg.yank(name, version, reason)
    if as_json:
        echo_json(out)
        return
    click.echo(f"Yanked {out['name']} {out['version']}: {reason}")
    for alias in out.get("aliases") or []:  # a server from before this rule answers without the key
        _warn([f"{out['name']}@{alias} points at {out['version']}: resolving it is refused until you move it "
               f"(czreg alias set {out['name']} {alias} VERSION) or unyank {out['version']}"])


@click.command("unyank")
@click.argument("name")
@click.argument("version")
@json_option
@_registry_options
def unyank_cmd(reg: Registry, name: str, version: str, as_json: bool) -> None:
    """Undo a yank."""
    with handle_errors():
        out = reg.unyank(name, version)
    echo_json(out) if as_json else click.echo(f"Unyanked {out['name']} {out['version']}")


@click.command("verify", short_help="Re-hash every blob; name the versions it breaks.")
@json_option
@_local_registry_options
def verify_cmd(reg: Registry, as_json: bool) -> None:
    """Re-hash every blob; report missing or changed ones with the versions they break (exit 7 if any)."""
    with handle_errors():
        out = reg.verify()
    if as_json:
        echo_json(out)
    else:
        click.echo(f"Checked {out['blobs']} blob(s) for {out['versions']} version(s), {human_size(out['bytes'])}")
        for p in out["problems"]:
            click.echo(f"  {p['digest'][:19]}... {p['problem']}: {', '.join(p['versions'])}")
    if not out["ok"]:
        with handle_errors():
            raise RegistryError(f"{len(out['problems'])} blob(s) missing or corrupt",
                                hint="restore them from a backup, or purge the versions")


@click.command("gc", short_help="Remove blobs that no version references.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
@_local_registry_options
def gc_cmd(reg: Registry, dry_run: bool, as_json: bool) -> None:
    """Remove blobs no version references (left by purges or killed publishers)."""
    with handle_errors():
        out = reg.gc(dry_run=dry_run)
    if as_json:
        echo_json(out)
    else:
        verb = "Would remove" if dry_run else "Removed"
        click.echo(f"{verb} {len(out['blobs'])} blob(s), {human_size(out['bytes'])}; "
                   f"{out['temp_files']} stale temp file(s)")


@click.command("purge", short_help="Delete a version for good (prefer yank).")
@click.argument("name")
@click.argument("version")
@click.option("--purge", "confirm", is_flag=True, help="Really delete (required: published versions are immutable).")
@click.option("--reason", help="Recorded in the audit trail.")
@json_option
@_local_registry_options
def purge_cmd(reg: Registry, name: str, version: str, confirm: bool, reason: str | None, as_json: bool) -> None:
    """Delete NAME VERSION for good; its number is never reused. Prefer 'czreg yank'."""
    with handle_errors():
        if not confirm:
            raise UsageError(f"refusing to delete {name} {version} without --purge",
                             hint="consider 'czreg yank' instead; add --purge to really delete it")
        out = reg.purge(name, version, reason=reason)
    if as_json:
        echo_json(out)
    else:
        click.echo(f"Purged {out['name']} {out['version']}" + (" and its blob" if out["blob_removed"] else ""))


@click.command("init", short_help="Create or upgrade a registry at LOCATION.")
@click.argument("location", required=False)
@click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE",
              help="Blob folder shared by the team (needed with PostgreSQL) [env CZREG_BLOB_STORE]")
@json_option
def init_cmd(location: str | None, blob_store: str | None, as_json: bool) -> None:
    """Create (or upgrade) a registry at LOCATION: a folder, sqlite:///file.db or postgresql+psycopg://...
    (default: CZREG_REGISTRY, else the per-user folder). Other commands refuse a location that does not
    exist, so a typo never becomes a new, empty registry."""
    with handle_errors():
        from ..registry import open_registry

        announce_lock_waits()
        with open_registry(location or None, blob_store) as reg:
            where = reg.location.display()
            store = reg.store.location
    if as_json:
        echo_json({"registry": where, "blob_store": store})
        return
    click.echo(f"Registry ready at {where} (blobs: {store})")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    for cmd in (init_cmd, publish_cmd, pull_cmd, list_cmd, show_cmd, history_cmd, alias_group, tag_cmd, yank_cmd,
                unyank_cmd, verify_cmd, gc_cmd, purge_cmd):
        group.add_command(cmd)
