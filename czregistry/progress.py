"""Step progress for long library operations (pack, validate, publish), shown by whoever installed a renderer.

Why it is built this way:

- **The library says what it is doing, never how to show it.** ``pack``, ``validate`` and ``publish`` wrap
  their long steps (loading a model, exporting it, the parity run, each model check, hashing) in
  ``with step("pack: exporting to ONNX"):``. Without an installed sink that costs one context-variable read.
- **The CLI owns the screen.** It installs a ``ProgressSink`` with ``reporting(sink)`` (see
  ``czregistry.cli._common.show_progress``): a live line with the step's name and elapsed time on a terminal,
  a one-line-per-step log (``pack: exporting to ONNX ... 12.3 s``) when stderr is a file or a CI log. Library
  callers (tests, notebooks, the server) see nothing unless they install a sink themselves.
- **A context variable, not a parameter threaded through every signature**: steps nest (``publish`` runs
  ``validate``, ``pack`` runs ``validate``), and plugins' sources need no new arguments.

This module is a leaf: it imports nothing from czregistry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

__all__ = ["ProgressSink", "reporting", "step"]


class ProgressSink(Protocol):
    """Receives step boundaries. ``start`` when a step begins; ``done`` with its wall time when it ends
    (also when it raised: ``failed`` is then true)."""

    def start(self, name: str) -> None: ...

    def done(self, name: str, seconds: float, failed: bool) -> None: ...


_sink: ContextVar[ProgressSink | None] = ContextVar("czregistry_progress_sink", default=None)


@contextmanager
def reporting(sink: ProgressSink | None) -> Iterator[None]:
    """Send the steps run inside this block to ``sink`` (``None``: to nobody, e.g. for ``--quiet``)."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Mark one step of a long operation; ``name`` is ``"<operation>: <what>"`` in plain words."""
    sink = _sink.get()
    if sink is None:
        yield
        return
    sink.start(name)
    t0 = time.perf_counter()
    failed = True
    try:
        yield
        failed = False
    finally:
        sink.done(name, time.perf_counter() - t0, failed)
