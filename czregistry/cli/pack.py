"""``czreg pack``, ``czreg unpack`` and ``czreg inspect``.

Nothing heavy is imported here at start-up: TensorFlow and ONNX Runtime load inside the commands.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from ..metadata import MODEL_TYPES
from ._common import echo_json, handle_errors, json_option, refuse_existing_output, trust_graph_option
from ._progress import quiet_option, show_progress

__all__ = ["register"]


#: Legacy-only metadata fields and the options that set them (named in the refusal for .czann output).
_LEGACY_OPTIONS = {"ColorHandling": "--color-handling", "BorderSize": "--border-size", "PixelType": "--pixel-type"}


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


_PACKAGE_SUFFIXES = (".czann", ".czmodel", ".czseg")


@click.command(short_help="Pack a model file into a .czann/.czmodel package.")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Package to write (.czann, or .czmodel for the legacy format).")
@click.option("--type", "model_type", type=click.Choice(MODEL_TYPES), default=None, help="Model Type (metadata).")
@click.option("--classes", default=None, help="Comma-separated class names, e.g. background,nucleus.")
@click.option("--min-overlap", default=None, help="MinOverlap per spatial axis: one even number or 'H,W'.")
@click.option("--name", "model_name", default=None, help="ModelName (metadata).")
@click.option("--id", "model_id", default=None, help="Model Id (a UUID); derived from the content when absent.")
@click.option("--scaling", default=None, help="Pixel size in metres, comma-separated x,y[,z].")
@click.option("--pre", "pre", multiple=True, metavar="NAME[:k=v,...]",
              help="Preprocessing layer prepended to the model (repeatable; see 'czreg plugins').")
@click.option("--post", "post", multiple=True, metavar="NAME[:k=v,...]",
              help="Postprocessing layer appended to the model (repeatable), e.g. softmax for models ending in "
                   "logits.")
@click.option("--tile", nargs=2, type=click.IntRange(min=1), default=None, metavar="H W",
              help="Reset the spatial input size (refused unless the model is spatially invariant).")
@click.option("--format", "target", type=click.Choice(["czann", "czmodel"]), default=None,
              help="Package format; default from the output suffix.")
@click.option("--model-format", type=click.Choice(["onnx", "savedmodel"]), default="onnx", show_default=True)
@click.option("--opset", type=click.IntRange(min=7), default=None,
              help="ONNX opset (default 18; 12 for legacy .czmodel). An ONNX source at another opset is "
                   "converted and checked against the original; refused when the converter lacks an adapter.")
@click.option("--license", "license_file", type=click.Path(path_type=Path), default=None,
              help="License file to include.")
@click.option("--pixel-type", "pixel_types", multiple=True, help="Legacy: input pixel type(s), e.g. Gray8.")
@click.option("--color-handling", type=click.Choice(["ConvertToMonochrome", "SplitRgb"]), default=None,
              help="Legacy: how hosts feed colour images.")
@click.option("--border-size", type=click.IntRange(min=0), default=None, help="Legacy: BorderSize in pixels.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT, and keep the package even if it fails "
                                           "verification (with its report).")
@quiet_option
@json_option
def pack(source: Path, output: Path, model_type: str | None, classes: str | None, min_overlap: str | None,
         model_name: str | None, model_id: str | None, scaling: str | None, pre: tuple[str, ...],
         post: tuple[str, ...], tile: tuple[int, int] | None, target: str | None, model_format: str,
         opset: int | None, license_file: Path | None, pixel_types: tuple[str, ...], color_handling: str | None,
         border_size: int | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Pack SOURCE (.onnx, TorchScript .pt, torch.export .pt2, SavedModel folder, .keras or conversion-spec .json;
    each read by an installed model-source plugin) into a verified package.

    The package is converted, compared with the source on random inputs (within 1e-4), validated, and only
    then written to OUTPUT. Exit 0 when valid, 1 when kept invalid with --force, 6 when packing failed.
    """
    from ..pack.core import PackWarning
    from ..pack.core import pack as run_pack
    from ..report import render_text

    with handle_errors():
        suffix = output.suffix.lower()
        if suffix not in _PACKAGE_SUFFIXES:
            raise UsageError(f"cannot write a package named '{output.name}': the output must end in .czann "
                             "(or .czmodel/.czseg for the legacy format)", hint=f"e.g. -o {output.stem}.czann")
        if (target == "czann" and suffix != ".czann") or (target == "czmodel" and suffix == ".czann"):
            raise UsageError(f"--format {target} does not match the file name '{output.name}'",
                             hint=f"name it {output.stem}.{target}")
        refuse_existing_output(output, force)
        metadata: dict[str, Any] = {"Type": model_type, "ModelName": model_name, "Id": model_id,
                                    "Classes": _split_list(classes), "ColorHandling": color_handling,
                                    "BorderSize": border_size, "PixelType": list(pixel_types) or None}
        try:
            if min_overlap is not None:
                metadata["MinOverlap"] = [int(v) for v in _split_list(min_overlap) or []]
            if scaling is not None:
                metadata["Scaling"] = [float(v) for v in _split_list(scaling) or []]
        except ValueError as exc:
            raise UsageError(f"bad number in --min-overlap/--scaling: {exc}",
                             hint="write numbers separated by commas, e.g. --min-overlap 32,32") from None
        is_legacy = (target or ("czmodel" if output.suffix.lower() in (".czmodel", ".czseg") else "czann")) \
            == "czmodel"
        if not is_legacy:
            for key, option in _LEGACY_OPTIONS.items():
                if metadata.pop(key) is not None:
                    raise UsageError(f"{option} applies to legacy .czmodel output only",
                                     hint="drop it, or write a .czmodel (--format czmodel)")
        with warnings.catch_warnings(record=True) as caught, show_progress(quiet):
            warnings.simplefilter("always", PackWarning)
            result = run_pack(source, metadata, output, preprocessing=list(pre), postprocessing=list(post),
                              spatial_dims=tile, target=target,  # type: ignore[arg-type]
                              model_format=model_format, opset=opset,  # type: ignore[arg-type]
                              license_file=license_file, force=force)
        del caught  # PackResult.warnings carries them
    if as_json:
        echo_json(result.to_dict())
    else:
        for n in result.notes:
            click.echo(f"Note: {n}", err=True)
        for w in result.warnings:
            click.echo(f"Warning: {w}", err=True)
        diff = result.parity_max_abs_diff
        click.echo(f"packed {result.path} ({result.kind}, {result.model_format}"
                   f"{f', opset {result.opset}' if result.opset else ''}) sha256 {result.sha256}")
        click.echo(f"  parity: max |packaged - source| = {'n/a' if diff is None else f'{diff:.3g}'} "
                   f"on {len(result.parity_inputs)} random inputs (tolerance 1e-4)")
        if result.kept_invalid:
            click.echo(render_text(result.report))
            click.echo(f"Warning: the package is INVALID and was kept only because of --force; report: "
                       f"{result.report_path}", err=True)
    sys.exit(1 if result.kept_invalid else 0)


@click.command(short_help="Extract a package's members into a folder safely.")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Extract into a folder that is not empty (files are overwritten).")
@json_option
def unpack(package: Path, directory: Path, force: bool, as_json: bool) -> None:
    """Extract PACKAGE's members into DIRECTORY safely (never outside it, within the reader's limits)."""
    with handle_errors():
        from ..pack.unpack import unpack_package

        written = unpack_package(package, directory, force=force)
    if as_json:
        echo_json({"package": str(package), "directory": str(directory), "files": [str(p) for p in written]})
    else:
        for p in written:
            click.echo(str(p))


@click.command(short_help="Show a package's metadata and what its graph runs.")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--static", is_flag=True, help="Do not load the model (no signature).")
@click.option("--backend", default=None, help="Backend used to read the model signature.")
@trust_graph_option
@json_option
def inspect(package: Path, static: bool, backend: str | None, trust_graph: bool, as_json: bool) -> None:
    """Show PACKAGE's metadata, what its graph would execute (the static audit) and its model signature."""
    with handle_errors():
        from ..pack.unpack import inspect_summary

        info = inspect_summary(package, load_model=not static, backend=backend, trust_graph=trust_graph)
    if as_json:
        echo_json(info)
        return
    click.echo(f"{info['path']}: {info['kind']} package, model {info['model_format']} "
               f"({info['model_bytes']:,} bytes), sha256 {info['sha256']}")
    if info.get("license_member"):
        click.echo(f"  license: {info['license_member']}")
    click.echo("  metadata:")
    for key, value in (info["metadata"] or {}).items():
        click.echo(f"    {key}: {_shown(value)}")
    audit = info.get("audit")
    if audit is not None:
        click.echo(f"  graph audit: {_audit_line(audit)}")
        for u in audit["unsafe"][:20]:
            node = f", node '{u['node']}'" if u["node"] else ""
            click.echo(f"    REFUSED {u['op']}: {u['reason']} ({u['where']}{node})")
        if len(audit["unsafe"]) > 20:
            click.echo(f"    ... and {len(audit['unsafe']) - 20} more (see --json)")
    sig = info.get("signature")
    if sig:
        click.echo(f"  signature ({info['backend']}):")
        for side in ("inputs", "outputs"):
            for t in sig[side]:
                shape = ", ".join("?" if d is None else str(d) for d in t["shape"])
                click.echo(f"    {side[:-1]} {t['name']}: [{shape}] {t['dtype']}")
    else:
        click.echo(f"  signature: not shown ({info['signature_note']})")
    for f in info["findings"]:
        click.echo(f"  {f['severity']}: {f['check']}: {f['message']}")


def _shown(value: Any) -> str:
    """A metadata value for people: lists of scalars as ``64, 64, 3``, anything nested as JSON (never a
    Python repr with quotes and brackets), text as is."""
    import json

    if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _audit_line(audit: dict[str, Any]) -> str:
    if audit["problem"]:
        return f"could not be audited: {audit['problem']}"
    counts = audit["op_counts"]
    kinds = ", ".join(sorted(counts, key=lambda k: -counts[k])[:8]) + (", ..." if len(counts) > 8 else "")
    verdict = "clean" if audit["clean"] else f"{len(audit['unsafe'])} refused operation(s)"
    return f"{verdict}; {audit['operations']:,} operations ({kinds})"


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(pack)
    group.add_command(unpack)
    group.add_command(inspect)
