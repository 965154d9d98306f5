"""``czreg demo``: the main job on an embedded example (pack, validate, publish, pull, run tiled)."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import echo_json, handle_errors, json_option, sigterm_as_interrupt


@click.command(short_help="Run the main job on an example, pack to evaluate.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("czreg-demo"),
              show_default=True, help="Where the package, image, output and picture are written.")
@click.option("--registry", "registry", default=None, envvar="CZREG_REGISTRY",
              help="Registry: a folder, sqlite:///file.db or postgresql+psycopg://...; it must exist (czreg init "
                   "LOCATION creates one) [env CZREG_REGISTRY; default: a SQLite registry in your user data "
                   "folder, created on first use].")
@click.option("--size", type=click.IntRange(min=64, max=65536), default=2048, show_default=True,
              help="Side of the generated square image, in pixels.")
@json_option
def demo(workdir: Path, registry: str | None, size: int, as_json: bool) -> None:
    """Pack an example model, validate it, publish it, pull it back by specifier, run it tiled and evaluate
    the prediction against the generated image's ground truth (IoU, pixel accuracy, an HTML report)."""
    from ..demo import run_demo

    with handle_errors(), sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
        result = run_demo(workdir, registry=registry, size=size,
                          echo=(lambda s: None) if as_json else click.echo, create=False)
    if as_json:
        echo_json(result.to_dict())


def register(group: click.Group) -> None:
    group.add_command(demo)
