"""Opening packages back up: ``unpack_package`` extracts the members safely, ``inspect_summary`` says what a
package holds (metadata, archive facts and, when a backend can load it, the model's real signature).

Library code behind ``czreg unpack`` and ``czreg inspect``; the commands only print what these return.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

from ..audit import audit_package
from ..errors import BackendError, PackageError, UsageError
from ..package import inspect_package, open_package, require_package_file, sha256_file
from ..selection import load_session

__all__ = ["inspect_summary", "unpack_package"]


def unpack_package(package: Path, directory: Path, *, force: bool = False) -> list[Path]:
    """Extract a package that passed the safe reader. Member names are re-checked against ``directory``
    (resolved) before anything is written, and only regular files are written."""
    require_package_file(package)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UsageError(f"{directory} is not empty", hint="choose an empty or new folder, or pass --force")
    pkg = open_package(package)
    root = directory.resolve()
    members = [m for m in (pkg.metadata_member, pkg.model_member, pkg.license_member) if m]
    targets: list[tuple[str, Path]] = []
    for name in members:
        target = (root / name).resolve()
        if root not in target.parents:
            raise PackageError(f"member '{name}' would be written outside {directory}; refused")
        targets.append((name, target))
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with zipfile.ZipFile(package) as zf:
        for name, target in targets:
            info = zf.getinfo(name)
            limit = pkg.limits.max_member_bytes
            if info.file_size > limit:
                raise PackageError(f"member '{name}' is larger than the reader's limit")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            with zf.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(target)
            written.append(directory / name)
    return written


def inspect_summary(package: Path, *, load_model: bool = True, backend: str | None = None,
                    trust_graph: bool = False) -> dict[str, Any]:
    """Metadata, archive facts, the static graph audit and (when a backend can load it and the audit passes,
    or ``trust_graph``) the model's real signature."""
    require_package_file(package)
    pkg, findings = inspect_package(package)
    if pkg is None:
        first = findings[0] if findings else None
        raise PackageError(f"{package}: {first.message if first else 'unreadable package'}",
                           hint=first.hint if first else None)
    out: dict[str, Any] = {
        "path": str(package), "kind": pkg.kind, "sha256": sha256_file(package), "model_format": pkg.model_format,
        "model_member": pkg.model_member, "model_bytes": pkg.model_size, "license_member": pkg.license_member,
        "metadata": pkg.metadata, "findings": [f.to_dict() for f in findings],
        "signature": None, "backend": None, "signature_note": None,
        "audit": audit_package(pkg).to_dict() if pkg.model_format != "unknown" else None,
    }
    if not load_model:
        out["signature_note"] = "--static"
        return out
    try:
        with load_session(pkg, backend, "cpu", trust_graph=trust_graph) as session:
            out["signature"] = session.signature.to_dict()
            out["backend"] = session.backend
    except BackendError as exc:
        out["signature_note"] = exc.message + (f"; {exc.hint}" if exc.hint else "")
    return out
