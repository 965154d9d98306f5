"""bioimage.io model packages for czregistry, both ways.

- Import: the ``bioimageio`` model source (``register_sources``): ``czreg pack model.zip -o x.czann`` reads a
  bioimage.io model (format 0.5, or 0.4 converted by bioimageio.spec) with ONNX or TorchScript weights.
- Export: ``czreg export-bioimageio x.czann -o model.zip`` (``register_commands``).

Nothing heavy at import: bioimageio.spec, onnx and torch are imported when a package is read or written.
See docs/bioimageio.md for the field and op mapping and what is refused.
"""

from __future__ import annotations

from typing import Any

from czregistry.hookspecs import hookimpl


@hookimpl
def register_sources(register: Any) -> None:
    from .source import BioimageioSource

    register(BioimageioSource)


@hookimpl
def register_commands(cli: Any) -> None:
    from .cli import export_bioimageio_cmd

    cli.add_command(export_bioimageio_cmd)
