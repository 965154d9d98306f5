"""What every command shares: turning typed library errors into one-line click errors, and JSON output."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import CzregError, UsageError, as_disk_full

__all__ = ["CliError", "Group", "Terminated", "announce_lock_waits", "echo_json", "force_option", "handle_errors",
           "json_option", "os_error", "refuse_existing_output",
           "refuse_nonempty_folder", "require_package_file", "sigterm_as_interrupt",
           "trust_graph_option", "warn_plugin_failures"]

#: OS errors that are the user's environment, not our bug: answered in one line (exit 2), never a traceback.
_USER_ERRNOS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "the file name is too long",
                errno.ENOENT: "no such file or folder", errno.ENOTDIR: "a part of the path is not a folder",
                errno.EISDIR: "it is a folder", errno.EEXIST: "it already exists",
                errno.EFBIG: "the file is too large for this file system"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so cleanup runs; the CLI exits 143 (128 + SIGTERM)."""


class Group(click.Group):
    """The ``czreg`` group: a backstop that answers an environment ``OSError`` (read-only file system, full
    disk, permission denied) in one line wherever it escapes a command, instead of a traceback."""

    _plugins_added = False

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: built-in command name -> module of ``czregistry.cli`` whose ``register(group)`` adds it
        self.lazy_commands = dict(lazy_commands or {})

    def _load_module(self, module: str) -> None:
        import importlib

        importlib.import_module(f"{__package__}.{module}").register(self)
        self.lazy_commands = {k: v for k, v in self.lazy_commands.items() if v != module}

    def load_builtin_commands(self) -> None:
        """Import every built-in command module (for ``--help`` and before any plugin adds commands)."""
        for module in sorted(set(self.lazy_commands.values())):
            self._load_module(module)

    def _add_plugin_commands(self) -> None:
        """Plugins' commands load only when asked for (an unknown name, or the command list for ``--help``),
        after every built-in, so a plugin cannot take a built-in's name: ``czreg list`` and the other
        built-in commands never import the plugins (start-up time)."""
        if not self._plugins_added:
            self.load_builtin_commands()
            self._plugins_added = True
            from ..plugins import get_host

            get_host().add_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self._load_module(self.lazy_commands[cmd_name])
        if cmd_name not in self.commands:
            self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            exc = as_disk_full(exc) or exc
            if exc.errno not in _USER_ERRNOS:
                raise
            raise CliError(os_error(exc)) from None


def os_error(exc: OSError) -> UsageError:
    """An ``OSError`` from writing or reading a user's path as one line: what, where, and what to do."""
    exc = as_disk_full(exc) or exc
    reason = _USER_ERRNOS.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()
    where = f" {exc.filename}" if exc.filename else ""
    hint = {errno.ENOSPC: "free some space or write elsewhere (-o)", errno.EDQUOT: "free some space",
            errno.EROFS: "write somewhere writable (-o PATH)", errno.EACCES: "check the permissions or choose "
            "another path"}.get(exc.errno or 0, "check the path")
    error = UsageError(f"cannot {'use' if where else 'write'}{where}: {reason}", hint=hint)
    return error


class CliError(click.ClickException):
    """A ``CzregError`` at the edge: prints ``Error: message`` (+ hint) and exits with its code."""

    def __init__(self, error: CzregError) -> None:
        from ..report import printable  # messages quote package text: one inert line, no escape sequences

        text = printable(error.message) + (f"\nHint: {printable(error.hint)}" if error.hint else "")
        super().__init__(text)
        self.exit_code = error.exit_code  # type: ignore[misc]


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except CzregError as exc:
        raise CliError(exc) from None
    except OSError as exc:
        exc = as_disk_full(exc) or exc
        if exc.errno not in _USER_ERRNOS:
            raise
        raise CliError(os_error(exc)) from None
    except Terminated:
        click.echo("Terminated.", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def announce_lock_waits() -> None:
    """Say on stderr when a registry write waits for another process's lock (call inside a command: it
    imports SQLAlchemy)."""
    from ..registry.db import set_lock_wait_notice

    set_lock_wait_notice(lambda message: click.echo(message, err=True))


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def require_package_file(path: Path) -> None:
    """``package.require_package_file``, imported on use so the CLI starts without the package reader; call
    it inside ``handle_errors()``."""
    from ..package import require_package_file as require

    require(path)


def warn_plugin_failures() -> None:
    """One stderr line per plugin that failed to load, before a command that runs plugins (``validate``,
    ``run``, ``smoke``): a broken plugin is skipped so the others keep working, but its backend, layers or
    checks are silently missing unless we say so. ``czreg plugins`` has the details (and exits 4)."""
    from ..plugins import get_host

    for line in get_host().load_failures():
        click.echo(f"Warning: {line}; see 'czreg plugins'", err=True)


force_option = click.option("--force", is_flag=True, help="Replace an existing output file.")

#: The one way past the static graph audit (``czregistry.audit``), named so nobody types it by accident.
trust_graph_option = click.option(
    "--trust-graph", is_flag=True,
    help="Run the model even if the static graph audit refuses it (file I/O, Python calls, custom ops). "
         "Only for your own models.")


def refuse_existing_output(path: Path, force: bool, option: str = "-o") -> None:
    """No silent overwrite: an existing output is replaced only with ``--force`` (exit 2 otherwise).
    ``option`` names the flag that chose the path, for the hint (``--report``)."""
    if not force and (path.exists() or path.is_symlink()):
        raise UsageError(f"{path} already exists", hint=f"pass --force to replace it, or choose another {option} path")


def refuse_nonempty_folder(folder: Path, force: bool, option: str) -> None:
    """An output folder that already holds files would get ours mixed in or overwritten: only with ``--force``
    (an empty or new folder is fine)."""
    if force or not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise UsageError(f"{folder} already exists and is not a folder", hint=f"choose another {option} folder")
    if any(folder.iterdir()):
        raise UsageError(f"{folder} already exists and is not empty",
                         hint=f"pass --force to write into it (files of the same name are replaced), or choose "
                              f"another {option} folder")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while a command writes: ``finally`` blocks run, so temp files are removed
    and nothing is left under the output name (``kill``, a batch scheduler's time limit, ``docker stop``).
    Only in the main thread (signal handlers cannot be set elsewhere); the previous handler comes back."""
    if os.name == "nt" or not _in_main_thread():
        yield
        return

    def _raise(_sig: int, _frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
