"""``czreg``: a thin click layer over the library. Commands live one module per area; each module exposes
``register(group)``. Heavy imports (TensorFlow, ONNX Runtime, SQLAlchemy) happen inside commands only."""

from __future__ import annotations

import os

import click

from ._common import Group

__all__ = ["main"]


#: Which module of ``czregistry.cli`` defines each built-in command. A command's module is imported when the
#: command is called (``czreg list`` loads the registry commands and no others: start-up time), and all of them
#: for ``--help``. ``tests/test_startup.py`` checks this table against what each module's ``register`` adds.
COMMAND_MODULES = {
    "validate": "validate", "schemas": "schemas", "plugins": "plugins_cmd",
    "pack": "pack", "unpack": "pack", "inspect": "pack",
    **dict.fromkeys(("init", "publish", "pull", "list", "show", "history", "alias", "tag", "yank", "unyank",
                     "verify", "gc", "purge"), "registry"),
    **dict.fromkeys(("keygen", "sign", "verify-signature", "push", "setting"), "sharing"),
    "serve": "serve", "token": "serve", "run": "run", "smoke": "run", "demo": "demo",
    "evaluate": "evaluate", "compare": "evaluate",
}


@click.group(cls=Group, lazy_commands=COMMAND_MODULES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="czregistry", prog_name="czreg")  # looked up only for --version
def main() -> None:
    """Validate, pack, version and run CZANN / CZMODEL model packages for ZEISS ZEN and arivis."""
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is noise on a command line; real
    # failures still surface as Python exceptions. Users can set the variable themselves to see it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# Built-in commands load with their module on first use, plugin commands after all built-ins
# (``Group.get_command`` / ``list_commands``), so a plugin can never take a built-in's name.
