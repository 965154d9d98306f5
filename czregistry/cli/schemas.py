"""``czreg schemas``: list and print the bundled JSON schemas (filled in by issue 2)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
