"""Typed errors of the library.

The library raises these; only ``czregistry.cli`` turns them into click errors, so a caller embedding
czregistry gets exceptions it can catch and a CLI user gets one line and a distinct exit code.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

__all__ = [
    "AuthError",
    "BackendError",
    "CzregError",
    "InvalidPackageError",
    "NoBackendError",
    "OciError",
    "PackError",
    "PackageError",
    "PluginError",
    "RegistryBusyError",
    "RegistryError",
    "RemoteError",
    "RunError",
    "SchemaError",
    "SignatureError",
    "UnsafeGraphError",
    "UsageError",
    "as_disk_full",
    "first_line",
]


class CzregError(Exception):
    """Base of every error czregistry raises on purpose.

    ``exit_code`` is what the CLI exits with; ``hint`` says what the user can do about it.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(CzregError):
    """The user asked for something malformed: a missing file, a bad option value."""

    exit_code = 2


class PackageError(CzregError):
    """A package cannot be read at all (the validator turns these into findings instead)."""

    exit_code = 3


class SchemaError(CzregError):
    """A schema is missing or unknown (for example a future ``FormatVersion``)."""

    exit_code = 3


class PluginError(CzregError):
    """A plugin failed to load or misbehaved; the message always names the plugin."""

    exit_code = 4


class BackendError(CzregError):
    """An inference backend could not load or run a model."""

    exit_code = 5


class NoBackendError(BackendError):
    """No installed backend can run the package; the hint names the plugin to install."""


class UnsafeGraphError(BackendError):
    """The package's graph failed the static audit (``czregistry.audit``): it would execute an operation with
    side effects (files, Python, other processes) or one the audit cannot vouch for, so nothing runs it
    unless the caller trusts the graph (``--trust-graph``). ``audit`` is the audit as a dict."""

    def __init__(self, message: str, *, hint: str | None = None, audit: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.audit = audit


class PackError(CzregError):
    """Packing failed; nothing was written at the output path."""

    exit_code = 6


class RegistryError(CzregError):
    """A registry operation was refused or failed; the registry is unchanged."""

    exit_code = 7


class RegistryBusyError(RegistryError):
    """Another process held the registry's write lock longer than the bound (``CZREG_LOCK_TIMEOUT``, 30 s
    by default); nothing was changed."""

    exit_code = 13


class InvalidPackageError(RegistryError):
    """Publishing was refused because the package failed validation; ``report`` is the validation report as
    a dict (``Report.to_dict()``), so a registry server can send every finding back to the client."""

    def __init__(self, message: str, *, hint: str | None = None, report: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report


class RunError(CzregError):
    """Tiled inference failed; no half-written output is left under the final name."""

    exit_code = 8


class SignatureError(CzregError):
    """A signature or attestation is missing, does not verify, or was made with another key."""

    exit_code = 10


class OciError(CzregError):
    """An OCI registry transfer failed: unreachable, authentication refused, not found, or bad content."""

    exit_code = 12


class AuthError(CzregError):
    """A registry server refused the token: missing, unknown, revoked, expired (HTTP 401) or without the
    scope or model the request needs (HTTP 403)."""

    exit_code = 9


class RemoteError(CzregError):
    """A registry server could not be reached or answered something we cannot use (a broken or truncated
    response, an upload over its size limit); nothing was written locally."""

    exit_code = 11


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name when the message is empty.

    Third-party errors (ONNX Runtime, TensorFlow, Keras) carry multi-line messages and stack dumps; ours are
    one line, so we quote only the first. An empty message (``RuntimeError()``) must not become an
    ``IndexError`` while reporting the real error.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SHORT_WRITE = re.compile(r"\b\d+ requested and \d+ written\b")


def as_disk_full(exc: BaseException, where: str | None = None) -> OSError | None:
    """``exc`` as an ``ENOSPC`` ``OSError`` when it means the disk (or quota) is full, else ``None``.

    NumPy's ``tofile`` (tifffile writes image data with it) reports a full disk as a short write with no
    errno: ``OSError('131072 requested and 130776 written')``. That text means nothing to a user, and with
    no errno it would escape the CLI's one-line answer for a full disk; ``where`` names the place that
    filled up when the error does not."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exc if exc.filename or where is None else OSError(exc.errno, os.strerror(exc.errno), where)
    if exc.errno is None and _SHORT_WRITE.search(str(exc)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), exc.filename or where)
    return None
