"""Bounded reads of small files a user names or a package brings along (keys, signature bundles).

``Path.read_bytes()`` on a path the user typed reads whatever is there: ``/dev/urandom`` until the kernel
kills the process, a FIFO blocks forever, a 20 GB file fills memory. A key or a signature bundle is a few
kilobytes, so the file is looked at first (``stat``: only a regular file is opened, and only when it is not
over the limit), opened with ``O_NONBLOCK`` (a FIFO swapped in after the ``stat`` cannot block the open),
checked again on the open descriptor, and read with at most ``limit + 1`` bytes, so a file that grows
between the ``stat`` and the read is still refused instead of read whole.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CzregError, UsageError

__all__ = ["file_kind", "human_limit", "read_small_file"]


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def human_limit(n: int) -> str:
    """``65536`` -> ``64 KiB``, ``4194304`` -> ``4 MiB`` (the limits are powers of two)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def read_small_file(path: Path | str, *, limit: int, what: str, why: str,
                    error: type[CzregError] = UsageError, hint: str = "check the path") -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; anything else raises ``error``
    naming the file and the limit. ``what`` names the file's role (``private key file``), ``why`` says how
    big a real one is (``a PEM key is a few KB``).

    ``FileNotFoundError`` is left to the caller, which knows what a missing file means there (a usage
    mistake for a key, an unsigned package for a signature beside it).
    """
    path = Path(path)
    bound = f"{why}; the limit is {human_limit(limit)}"

    def refuse_kind(mode: int) -> CzregError:
        return error(f"{what} {path} is {file_kind(mode)}, not a regular file; not read ({bound})", hint=hint)

    def refuse_size(size: str) -> CzregError:
        return error(f"{what} {path} is {size}, too large to be one ({bound}); not read", hint=hint)

    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise refuse_kind(st.st_mode)
    if st.st_size > limit:
        raise refuse_size(f"{st.st_size} bytes")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO or device after the stat above
            raise refuse_kind(st.st_mode)
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew after the stat
        raise refuse_size(f"over {limit} bytes")
    return data
