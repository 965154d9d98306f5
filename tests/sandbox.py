"""Real file-system failures for the abuse tests: a tmpfs mounted in a private mount namespace
(``unshare -rm``), so a test gets a read-only or a tiny (full) folder without root on the host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def tmpfs_namespace(folder: Path, options: str) -> str:
    """The ``unshare`` binary, after checking that a tmpfs with ``options`` mounts on ``folder`` in a new
    namespace here; skips the test where it cannot (no ``unshare``, no user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs '{folder}'"],
                           capture_output=True, check=False, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {probe.stderr.decode().strip()}")
    return unshare
