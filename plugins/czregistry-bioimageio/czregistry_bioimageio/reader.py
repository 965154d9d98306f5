"""Reading a bioimage.io model package safely and offline: a ``.zip`` (with ``rdf.yaml`` or
``bioimageio.yaml``) or the yaml file itself, converted to format 0.5 by bioimageio.spec.

Why extract first: a foreign zip is hostile like any package (docs/hardening.md). Its member list passes the
same archive checks as a CZANN (``archive_findings``: paths, links, sizes, ratios) before one member is
inflated, and members are inflated with their declared size as the bound; bioimageio.spec then reads a
plain folder, with its own network checks off. A description whose files are URLs is refused: nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from czregistry.errors import UsageError, first_line
from czregistry.package import ReadLimits, archive_findings
from czregistry.report import Severity

__all__ = ["RDF_NAMES", "is_bioimageio_path", "open_description", "read_array"]

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: A bioimage.io package holds weights in several formats, test tensors, covers and docs: more members than a
#: CZANN, the same per-member and total bounds.
_LIMITS = ReadLimits(max_members=256)


def is_bioimageio_path(source: Any) -> bool:
    """Cheap: a yaml named like a bioimage.io description, or a zip whose member list holds one."""
    import os

    if not isinstance(source, str | os.PathLike):
        return False
    path = Path(source)
    if not path.is_file():
        return False
    name = path.name.lower()
    if name in RDF_NAMES or name.endswith(".bioimageio.yaml"):
        return True
    if path.suffix.lower() != ".zip":
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n in RDF_NAMES for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _extract(path: Path, dest: Path) -> Path:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path} is not a readable zip archive: {first_line(exc)}") from exc
    with zf:
        infos = zf.infolist()
        errors = [f for f in archive_findings(infos, _LIMITS) if f.severity is Severity.ERROR]
        if errors:
            raise UsageError(f"bioimage.io package {path.name}: {errors[0].message}", hint=errors[0].hint)
        for info in infos:
            if info.is_dir():
                continue
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise UsageError(f"bioimage.io package {path.name}: member '{info.filename}' leaves the package")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                remaining = info.file_size + 1
                while chunk := src.read(min(1 << 20, remaining)):
                    remaining -= len(chunk)
                    if remaining <= 0:
                        raise UsageError(f"bioimage.io package {path.name}: member '{info.filename}' inflates "
                                         "beyond its declared size")
                    out.write(chunk)
    for name in RDF_NAMES:
        if (dest / name).is_file():
            return dest / name
    raise UsageError(f"{path.name} holds no rdf.yaml or bioimageio.yaml at its top level",
                     hint="a bioimage.io model package has its description at the top of the zip")


def _refuse_urls(descr: Any, origin: str) -> None:
    from bioimageio.spec._internal.url import HttpUrl

    files = [("weights file", w.source) for w in descr.weights.available_formats.values()]
    files += [(f"test tensor of '{t.id}'", t.test_tensor.source) for t in (*descr.inputs, *descr.outputs)
              if t.test_tensor is not None]
    for what, src in files:
        if isinstance(src, HttpUrl) or str(src).startswith(("http://", "https://")):
            raise UsageError(f"{origin}: the {what} is a URL ({src}); czregistry reads local packages only and "
                             "downloads nothing", hint="download the package as a zip (bioimageio package ...) "
                                                       "and pack that")


@contextlib.contextmanager
def open_description(source: Path) -> Iterator[tuple[Any, Path]]:
    """``(v0.5 ModelDescr, folder)`` for a package zip or yaml; the folder lives as long as the context."""
    from ._compat import ensure_ready

    ensure_ready()
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    with tempfile.TemporaryDirectory(prefix="czreg-bioimageio-") as tmp:
        rdf = _extract(source, Path(tmp)) if source.suffix.lower() == ".zip" else source
        try:
            descr = load_description(rdf, format_version="latest", perform_io_checks=False)
        except Exception as exc:
            raise UsageError(f"bioimageio.spec cannot read {source.name}: {first_line(exc)}") from exc
        if isinstance(descr, InvalidDescr):
            errors = descr.validation_summary.errors
            loc = ".".join(map(str, errors[0].loc)) if errors else ""
            what = (f"{loc}: {errors[0].msg}" if loc else str(errors[0].msg)) if errors else "invalid"
            raise UsageError(f"{source.name} is not a valid bioimage.io description ({what.splitlines()[0]})",
                             hint="check it with: bioimageio validate " + source.name)
        if not isinstance(descr, v0_5.ModelDescr):
            raise UsageError(f"{source.name} describes a bioimage.io '{descr.type}' (format "
                             f"{descr.format_version}), not a model that converts to format 0.5",
                             hint="only model descriptions (format 0.4 or 0.5) can be packed")
        _refuse_urls(descr, source.name)
        yield descr, rdf.parent


def read_array(folder: Path, src: Any, limit: int = 1 << 30) -> Any:
    """A ``.npy`` test tensor from the package folder (no pickles, at most ``limit`` bytes)."""
    import numpy as np

    path = (folder / str(src)).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise UsageError(f"the test tensor {src} is not a file inside the package")
    if path.stat().st_size > limit:
        raise UsageError(f"the test tensor {src} is over {limit:,} bytes")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"the test tensor {src} is not a readable .npy array: {first_line(exc)}") from exc


def read_file(folder: Path, src: Any) -> bytes:
    path = (folder / str(src)).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise UsageError(f"the file {src} is not inside the package")
    return path.read_bytes()
