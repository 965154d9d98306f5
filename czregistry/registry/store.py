"""Blob storage, content-addressed by SHA-256, behind a small interface.

The registry database only ever names blobs by digest; where the bytes live is the store's business. The
local folder store keeps ``sha256/ab/cdef...`` under a root, shared by every registry that points at the
same folder (a team's network share). An object store (S3, Azure) can implement the same five methods.

Crash safety: a blob is written to a unique temp file in the store, hashed while it streams, fsynced, and
only then renamed to its digest name, so a killed writer leaves at most a temp file (``gc`` sweeps those)
and a file under a digest name always holds exactly those bytes (until the disk itself rots: ``verify``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from ..errors import RegistryError

__all__ = ["CHUNK", "BlobInfo", "BlobStore", "LocalBlobStore", "open_blob_store"]

CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    mtime: float


@runtime_checkable
class BlobStore(Protocol):
    """What the registry needs from a blob store. Digests are lower-case SHA-256 hex strings."""

    location: str

    def put(self, src: IO[bytes], *, expected: str | None = None, verified: bool = False) -> tuple[str, int]:
        """Store the stream; return (digest, size). Idempotent: existing bytes are kept, not rewritten.
        ``verified``: the caller hashed exactly these bytes to ``expected`` already (a ``PackageSnapshot``,
        which nobody else can change), so the store need not hash them again."""
        ...

    def open(self, digest: str) -> IO[bytes]:
        """A binary stream of the blob; ``FileNotFoundError`` when it is missing."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...

    def iter_blobs(self) -> Iterator[BlobInfo]: ...

    def sweep_temp(self, older_than_s: float) -> int:
        """Remove temp files older than ``older_than_s`` (left by killed writers); return how many."""
        ...


class LocalBlobStore:
    """A folder: ``<root>/sha256/<2 hex>/<62 hex>`` plus ``<root>/tmp`` for in-flight writes."""

    def __init__(self, root: Path | str, *, private: bool = False) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._tmp = self.root / "tmp"
        # private: folders 0700 and blobs 0600 (a per-user registry); else the umask decides (team share)
        self._dir_mode, self._file_mode = (0o700, 0o600) if private else (0o777, 0o666)

    def _mkdir(self, path: Path) -> None:
        if not self.root.is_dir():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir(mode=self._dir_mode, exist_ok=True)
        for sub in reversed([p for p in (path, *path.parents) if p != self.root and self.root in p.parents]):
            sub.mkdir(mode=self._dir_mode, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest[2:]

    def put(self, src: IO[bytes], *, expected: str | None = None, verified: bool = False) -> tuple[str, int]:
        self._mkdir(self._tmp)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        h = None if verified and expected is not None else hashlib.sha256()
        size = 0
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                                   self._file_mode), "wb") as out:
                while chunk := src.read(CHUNK):
                    if h is not None:
                        h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest() if h is not None else str(expected)
            if expected is not None and digest != expected:
                raise RegistryError(f"the package changed while it was being stored (sha256 {digest}, "
                                    f"expected {expected})", hint="publish again once the file is complete")
            final = self.path(digest)
            if final.exists() and final.stat().st_size == size:
                os.utime(final)  # fresh mtime: tells a concurrent gc this blob is wanted
            else:
                self._mkdir(final.parent)
                tmp.replace(final)
                _fsync_dir(final.parent)
            return digest, size
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, digest: str) -> IO[bytes]:
        return self.path(digest).open("rb")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    st = f.stat()
                    yield BlobInfo(sub.name + f.name, st.st_size, st.st_mtime)

    def sweep_temp(self, older_than_s: float) -> int:
        if not self._tmp.is_dir():
            return 0
        now, n = time.time(), 0
        for f in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - f.stat().st_mtime >= older_than_s:
                    f.unlink()
                    n += 1
        return n


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_blob_store(location: str | Path, *, private: bool = False) -> BlobStore:
    """A store from a location string: a folder path or ``file://`` URL (object stores: not yet)."""
    text = str(location)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme != "file":
            raise RegistryError(f"blob store scheme '{scheme}://' is not supported",
                                hint="use a folder path (a network share for teams)")
        text = rest
    return LocalBlobStore(Path(text).expanduser(), private=private)
