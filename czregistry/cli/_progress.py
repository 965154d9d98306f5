"""How the CLI shows ``czregistry.progress`` steps on stderr (stdout, and so ``--json``, stays untouched).

- On a terminal: one live line, ``⠹ pack: exporting to ONNX  12.3 s``, redrawn by a small thread while the
  innermost step runs and cleared when it ends, so the finished screen holds only the command's answer.
  A step shorter than half a second never draws.
- Otherwise (a log file, CI): one line per finished step that took at least ``CZREG_PROGRESS_MIN_S``
  seconds (default 2), ``pack: exporting to ONNX ... 12.3 s``; short steps stay out of the log.
- ``CZREG_PROGRESS=off`` (or a command's ``--quiet``) shows nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import click

from ..progress import ProgressSink, reporting

__all__ = ["LogSink", "TerminalSink", "quiet_option", "show_progress"]

#: Steps shorter than this stay out of the non-terminal log (seconds; ``CZREG_PROGRESS_MIN_S``).
DEFAULT_MIN_SECONDS = 2.0
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class LogSink:
    """One line per finished step of at least ``min_seconds``: readable in a CI log, no control characters."""

    def __init__(self, stream: TextIO, min_seconds: float = DEFAULT_MIN_SECONDS) -> None:
        self.stream, self.min_seconds = stream, min_seconds

    def start(self, name: str) -> None:
        pass

    def done(self, name: str, seconds: float, failed: bool) -> None:
        if seconds < self.min_seconds:
            return
        self.stream.write(f"{name} ... {'failed after ' if failed else ''}{seconds:.1f} s\n")
        self.stream.flush()


class TerminalSink:
    """A live line for the innermost running step, redrawn every 0.1 s by a daemon thread, cleared at its end."""

    delay = 0.5

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._steps: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._drawn = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        with self._lock:
            self._steps.append((name, time.perf_counter()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="czreg-progress", daemon=True)
                self._thread.start()

    def done(self, name: str, seconds: float, failed: bool) -> None:
        with self._lock:
            for i in range(len(self._steps) - 1, -1, -1):
                if self._steps[i][0] == name:
                    del self._steps[i]
                    break
            self._clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(0.1):
            tick += 1
            with self._lock:
                if not self._steps:
                    continue
                name, t0 = self._steps[-1]
                elapsed = time.perf_counter() - t0
                if elapsed < self.delay:
                    continue
                width = max(20, _columns() - 12)
                self.stream.write(f"\r\033[K{_SPINNER[tick % len(_SPINNER)]} {name[:width]}  {elapsed:.1f} s")
                self.stream.flush()
                self._drawn = True


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80


def _min_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("CZREG_PROGRESS_MIN_S", DEFAULT_MIN_SECONDS)))
    except ValueError:
        return DEFAULT_MIN_SECONDS


@contextmanager
def show_progress(quiet: bool = False) -> Iterator[None]:
    """Show the library's steps run inside this block on stderr (nothing when ``quiet`` or
    ``CZREG_PROGRESS=off``)."""
    if quiet or os.environ.get("CZREG_PROGRESS", "").lower() in ("off", "0", "no", "false"):
        with reporting(None):
            yield
        return
    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        sink: ProgressSink = LogSink(stream, _min_seconds())
        with reporting(sink):
            yield
        return
    live = TerminalSink(stream)
    try:
        with reporting(live):
            yield
    finally:
        live.close()


def quiet_option(f: Any) -> Any:
    """``-q/--quiet``: no step progress on stderr (the command's answer and errors still print)."""
    return click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")(f)
