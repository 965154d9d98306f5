"""A package argument is a file or a registry reference (NAME==VERSION, NAME@ALIAS, NAME, sha256:...)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..registry.records import RegistryClient, VersionRecord

__all__ = ["looks_like_file", "package_file"]


def looks_like_file(ref: str) -> bool:
    p = Path(ref)
    return p.exists() or p.suffix.lower() in (".czann", ".czmodel") or "/" in ref or "\\" in ref


@contextlib.contextmanager
def package_file(ref: str, reg: RegistryClient | None) -> Iterator[tuple[Path, VersionRecord | None]]:
    """``(local path, registry version or None)``; a registry reference is pulled (digest-checked) to a
    temp folder that is removed afterwards."""
    if looks_like_file(ref):
        p = Path(ref)
        if not p.is_file():
            raise UsageError(f"no such package file: {p}", hint="check the path, or give NAME==VERSION")
        yield p, None
        return
    if reg is None:
        raise UsageError(f"'{ref}' is not a file", hint="give a package file, or a registry reference with a registry")
    with tempfile.TemporaryDirectory(prefix="czreg-eval-") as tmp:
        pulled = reg.pull(ref, Path(tmp), prereleases=None)
        yield pulled.path, pulled.version
