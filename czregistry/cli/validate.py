"""``czreg validate``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UsageError
from ._common import (
    echo_json,
    force_option,
    handle_errors,
    refuse_existing_output,
    require_package_file,
    trust_graph_option,
    warn_plugin_failures,
)
from ._progress import quiet_option, show_progress


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--static", is_flag=True, help="Never execute the model: archive and metadata checks only.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array with one report object per package (an array for one package too).")
@click.option("--report", "report_file", type=click.Path(path_type=Path), default=None,
              help="Also write a shareable report (.html or .md) including the package's SHA-256 (an existing "
                   "file is replaced only with --force).")
@click.option("--backend", default=None, help="Inference backend for model checks (see 'czreg plugins').")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--max-probe-size", type=click.IntRange(min=8), default=2048, show_default=True,
              help="Largest window (pixels per axis) the halo probe grows to before it reports a lower bound.")
@click.option("--time-budget", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Soft limit in seconds for model probing per package.")
@trust_graph_option
@force_option
@quiet_option
def validate(paths: tuple[Path, ...], static: bool, strict: bool, as_json: bool, report_file: Path | None,
             backend: str | None, device: str, max_probe_size: int, time_budget: float, trust_graph: bool,
             force: bool, quiet: bool) -> None:
    """Validate packages. Exit 0 if all are valid, 1 if any is invalid, 2 on usage errors."""
    from ..checks import ValidateOptions
    from ..report import render_html, render_markdown, render_text
    from ..validate import validate as run_validate

    if report_file is not None and report_file.suffix.lower() not in (".html", ".htm", ".md"):
        raise click.BadParameter("the report file must end in .html or .md", param_hint="--report")
    if report_file is not None and len(paths) > 1:
        raise click.BadParameter("--report takes one package at a time", param_hint="--report")
    with handle_errors():
        if report_file is not None:  # before the (possibly long) validation, not after it
            refuse_existing_output(report_file, force, "--report")
        for path in paths:
            require_package_file(path)
        warn_plugin_failures()
    options = ValidateOptions(static=static, strict=strict, backend=backend, device=device,  # type: ignore[arg-type]
                              max_probe_size=max_probe_size, time_budget=time_budget, trust_graph=trust_graph)
    all_valid = True
    reports = []
    with handle_errors():
        for path in paths:
            with show_progress(quiet):
                report = run_validate(path, options)
            all_valid &= report.valid
            reports.append(report)
            if as_json:
                continue
            click.echo(render_text(report))
    if as_json:
        # one shape for any number of packages: a CI script must not change with the file count
        echo_json([r.to_dict() for r in reports])
    if report_file is not None:
        from ..package import atomic_output

        text = render_markdown(reports[0]) if report_file.suffix.lower() == ".md" else render_html(reports[0])
        with handle_errors():
            try:
                with atomic_output(report_file) as tmp:
                    tmp.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write the report to {report_file}: {exc.strerror or exc}",
                                 hint="check that its folder exists and is writable") from None
        if not as_json:
            click.echo(f"report written to {report_file}", err=True)
    sys.exit(0 if all_valid else 1)


def register(group: click.Group) -> None:
    group.add_command(validate)
