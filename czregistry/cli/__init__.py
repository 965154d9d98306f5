"""``czreg``: a thin click layer over the library. Commands live one module per area; each module exposes
``register(group)``. Heavy imports (TensorFlow, ONNX Runtime, SQLAlchemy) happen inside commands only."""

from __future__ import annotations

import os

import click

from . import demo, evaluate, pack, plugins_cmd, registry, run, schemas, serve, sharing, validate
from ._common import Group

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="czregistry", prog_name="czreg")  # looked up only for --version
def main() -> None:
    """Validate, pack, version and run CZANN / CZMODEL model packages for ZEISS ZEN and arivis."""
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is noise on a command line; real
    # failures still surface as Python exceptions. Users can set the variable themselves to see it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


for _module in (validate, schemas, plugins_cmd, pack, registry, sharing, serve, run, demo, evaluate):
    _module.register(main)

# Plugin commands are added on first need (``Group.get_command`` / ``list_commands``), not at import.
