"""What every command shares: turning typed library errors into one-line click errors, and JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import CzregError, UsageError

__all__ = ["CliError", "echo_json", "handle_errors", "json_option", "require_package_file"]


class CliError(click.ClickException):
    """A ``CzregError`` at the edge: prints ``Error: message`` (+ hint) and exits with its code."""

    def __init__(self, error: CzregError) -> None:
        text = error.message + (f"\nHint: {error.hint}" if error.hint else "")
        super().__init__(text)
        self.exit_code = error.exit_code  # type: ignore[misc]


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except CzregError as exc:
        raise CliError(exc) from None
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def require_package_file(path: Path) -> None:
    """Refuse a missing package (or a folder) before any work, with the same words, hint and exit code (2)
    in every command; call it inside ``handle_errors()``."""
    if not path.is_file():
        raise UsageError(f"no such package file: {path}", hint="check the path")
