"""``czreg export-bioimageio``: the CLI face of ``export.export_bioimageio`` (nothing heavy at import)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export-bioimageio", short_help="Write a .czann as a bioimage.io model package (.zip).")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The bioimage.io zip to write.")
@click.option("--license", "license_id", default=None, metavar="SPDX",
              help="SPDX license id (else the License: line of the package's license member).")
@click.option("--author", "authors", multiple=True, help="An author's name (repeat for several).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_bioimageio_cmd(package: Path, output: Path, license_id: str | None, authors: tuple[str, ...],
                          force: bool, as_json: bool) -> None:
    """Write PACKAGE (a valid ONNX .czann) as a bioimage.io 0.5 model zip: ONNX weights, test tensors from
    our runner, a cover, the validation report as documentation, the measured halo. ``czreg pull NAME==V
    --format bioimageio`` runs this command on the pulled package."""
    from czregistry.cli._common import echo_json, handle_errors
    from czregistry.package import require_package_file

    with handle_errors():
        require_package_file(package)
        from .export import export_bioimageio

        result = export_bioimageio(package, output, license_id=license_id, authors=list(authors) or None,
                                   force=force)
    if as_json:
        echo_json({"path": str(result.path), "format": "bioimageio", "name": result.name,
                   "license": result.license, "authors": result.authors, "halo": result.halo,
                   "notes": result.notes})
        return
    click.echo(f"exported {result.path} (bioimage.io 0.5, ONNX weights, license {result.license}, "
               f"output halo {'x'.join(map(str, result.halo))})")
