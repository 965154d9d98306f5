"""Counting what a command does to one package file: opens of the file, full SHA-256 hashes of its bytes,
whole decompressions of its model member and ONNX Runtime sessions created.

Every counter wraps the real callable and calls through (nothing is replaced): a ``sys.addaudithook`` hook
sees every ``open`` of the file, whoever makes it (model-signing's hasher included); ``hashlib.sha256`` is
wrapped so a hash object whose digest is the package's digest counts as one full hash; ``ZipExtFile`` reads
of the model member are summed per stream (a stream that delivered the whole member is one decompression);
``onnxruntime.InferenceSession`` is wrapped to count sessions. ``tests/test_admission_io.py`` asserts the
counts of ``czreg publish --smoke --sign``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IoCounts", "counting"]

_ACTIVE: list[IoCounts] = []
_HOOKED = False


@dataclass
class IoCounts:
    path: Path
    sha256: str
    model_member: str = "model.model"
    model_size: int = 0
    file_opens: int = 0
    full_hashes: int = 0
    sessions: int = 0
    _streams: dict[int, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def model_decompressions(self) -> int:
        """Streams of the model member that delivered all of it (an 8-byte head peek is not one)."""
        return sum(1 for _, n in self._streams.values() if n >= self.model_size)

    def as_dict(self) -> dict[str, int]:
        return {"file_opens": self.file_opens, "full_hashes": self.full_hashes,
                "model_decompressions": self.model_decompressions, "sessions": self.sessions}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _ACTIVE:
        return
    target = args[0]
    if isinstance(target, (str, bytes, os.PathLike)):
        with contextlib.suppress(OSError, ValueError, TypeError):
            for c in _ACTIVE:
                if os.fsdecode(target) == str(c.path) or Path(os.fsdecode(target)).resolve() == c.path:
                    c.file_opens += 1


class _CountingHash:
    """``hashlib.sha256()`` as it is, noting when its digest is the package's."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._counted = False

    def _note(self, hexdigest: str) -> None:
        if not self._counted:
            for c in _ACTIVE:
                if hexdigest == c.sha256:
                    c.full_hashes += 1
                    self._counted = True

    def update(self, data: Any) -> None:
        self._real.update(data)

    def hexdigest(self) -> str:
        out: str = self._real.hexdigest()
        self._note(out)
        return out

    def digest(self) -> bytes:
        out: bytes = self._real.digest()
        self._note(out.hex())
        return out

    def copy(self) -> _CountingHash:
        return _CountingHash(self._real.copy())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def counting(path: Path, monkeypatch: Any) -> Iterator[IoCounts]:
    """Count what happens to ``path`` inside the block (the counters stay readable after it)."""
    global _HOOKED
    path = path.resolve()
    with zipfile.ZipFile(path) as zf:
        size = zf.getinfo("model.model").file_size
    counts = IoCounts(path, hashlib.sha256(path.read_bytes()).hexdigest(), model_size=size)
    if not _HOOKED:  # an audit hook cannot be removed: one for the session, idle unless a block is active
        sys.addaudithook(_audit)
        _HOOKED = True

    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: _CountingHash(real_sha256(*a, **k)))

    real_open = zipfile.ZipFile.open

    def zip_open(self: zipfile.ZipFile, name: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        stream = real_open(self, name, mode, *a, **k)
        member = name.filename if isinstance(name, zipfile.ZipInfo) else name
        if mode == "r" and member == counts.model_member:
            counts._streams[id(stream)] = [stream, 0]  # the stream is kept, so its id is not reused
        return stream

    monkeypatch.setattr(zipfile.ZipFile, "open", zip_open)
    for method in ("read", "read1"):
        real = getattr(zipfile.ZipExtFile, method)

        def read(self: zipfile.ZipExtFile, n: int = -1, _real: Any = real) -> bytes:
            out: bytes = _real(self, n)
            entry = counts._streams.get(id(self))
            if entry is not None and entry[0] is self:
                entry[1] += len(out)
            return out

        monkeypatch.setattr(zipfile.ZipExtFile, method, read)

    import onnxruntime as ort

    real_session = ort.InferenceSession

    def session(*a: Any, **k: Any) -> Any:
        counts.sessions += 1
        return real_session(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", session)
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)
