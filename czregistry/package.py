"""Safe reading and deterministic writing of CZANN / CZMODEL archives.

Packages come from partners and from the internet, so the reader treats every archive as hostile:
it never extracts to a path taken from the archive, checks every declared size against limits *before*
inflating anything (``zipfile`` never inflates past a member's declared size, so checking the declared
size bounds the work), verifies CRCs by streaming, and reports every problem as a ``Finding`` instead of
raising. The writer is the reader's mirror: fixed member order, timestamps and permissions, so the same
inputs give byte-identical archives and registry digests mean something.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from xml.etree import ElementTree
from xml.parsers import expat

from .errors import PackageError, UsageError
from .report import Finding, Severity

__all__ = [
    "CZANN_METADATA",
    "CZANN_MODEL",
    "ModelFormat",
    "Package",
    "PackageKind",
    "PackageSnapshot",
    "ReadLimits",
    "archive_findings",
    "check_overwrite",
    "inspect_package",
    "is_license_name",
    "open_package",
    "parse_legacy_xml",
    "require_package_file",
    "sha256_file",
    "sniff_model_format",
    "write_package",
    "zip_directory",
]

CZANN_METADATA = "model.json"
CZANN_MODEL = "model.model"
PackageKind = Literal["czann", "czmodel"]
ModelFormat = Literal["onnx", "savedmodel", "unknown"]

MiB = 1024 * 1024
GiB = 1024 * MiB
#: A fixed timestamp for every member we write (the earliest a zip can hold).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_LICENSE_RE = re.compile(r"^(licen[cs]e|copying|notice)([._-].*)?$", re.IGNORECASE)
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CHUNK = 1 * MiB
#: Largest model member a snapshot keeps in memory once inflated (the ONNX protobuf limit; the audit and the
#: ONNX backends read the whole model anyway). Larger ones are inflated again when asked.
MAX_KEPT_MODEL_BYTES = 2 * GiB
#: A snapshot holds at most this much in memory; a larger package goes to one private, unlinked temp file.
SNAPSHOT_MEMORY_BYTES = 256 * MiB


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what the reader will inflate.

    Defaults fit real packages with a wide margin: ZEN requires models to fit an 8 GB GPU and ONNX files
    stop at 2 GiB, while the deflate ratio of network weights is rarely above 2. Metadata is tiny.
    The ratio limit only applies to members above ``ratio_floor_bytes``: small text files compress well.
    """

    max_metadata_bytes: int = 1 * MiB
    max_member_bytes: int = 4 * GiB
    max_total_bytes: int = 8 * GiB
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1 * MiB
    max_members: int = 64


@dataclass
class Package:
    """A package whose archive structure passed the reader's safety checks.

    ``metadata`` is the parsed metadata: the JSON object for CZANN, the parsed form of the XML for
    CZMODEL (see ``parse_legacy_xml``); ``None`` when it could not be parsed (a finding says why).
    """

    path: Path
    kind: PackageKind
    metadata_member: str
    model_member: str
    license_member: str | None
    metadata_bytes: bytes
    metadata: dict[str, Any] | None
    model_size: int
    model_format: ModelFormat
    findings: list[Finding] = field(default_factory=list)
    limits: ReadLimits = field(default_factory=ReadLimits)
    #: Facts computed once per opened package and shared by its readers (the graph audit; the model bytes of
    #: a package read from a snapshot).
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: The bytes this package was read from, when it came from a ``PackageSnapshot``: every later read of a
    #: member reads them, never ``path`` again (which may have changed since).
    snapshot: PackageSnapshot | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def _archive(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(self.snapshot.stream() if self.snapshot is not None else self.path)

    @contextlib.contextmanager
    def open_model(self) -> Iterator[IO[bytes]]:
        """Stream the model member; ``zipfile`` verifies its CRC when the stream is read to the end. A model a
        snapshot already inflated (and CRC-checked) is streamed from memory."""
        kept = self.cache.get("model_bytes")
        if isinstance(kept, bytes):
            yield io.BytesIO(kept)
            return
        with self._archive() as zf, zf.open(self.model_member) as fh:
            yield fh

    def read_model_bytes(self) -> bytes:
        """The whole model in memory: only for backends that need bytes (ONNX Runtime sessions). A package
        read from a snapshot keeps them (up to ``MAX_KEPT_MODEL_BYTES``), so the audit, the session and the
        smoke test share one decompression."""
        kept = self.cache.get("model_bytes")
        if isinstance(kept, bytes):
            return kept
        with self.open_model() as fh:
            data = fh.read()
        if self.snapshot is not None and len(data) <= MAX_KEPT_MODEL_BYTES:
            self.cache["model_bytes"] = data
        return data

    @contextlib.contextmanager
    def model_file(self) -> Iterator[Path]:
        """The model member copied to a private temp file, removed on exit (never wholly in memory)."""
        with tempfile.TemporaryDirectory(prefix="czreg-model-") as tmp:
            dest = Path(tmp) / "model.model"
            with self.open_model() as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            yield dest

    def read_license(self) -> str | None:
        if self.license_member is None:
            return None
        with self._archive() as zf:
            return zf.read(self.license_member).decode("utf-8", errors="replace")


def require_package_file(path: Path) -> None:
    """Refuse a missing package (or a folder) before any work, with the same words, hint and exit code (2)
    in every command and library entry point."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a package file",
                         hint=f"name the package files, e.g. {path / '*.czann'}")
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise UsageError(f"{path} is not a regular file (a pipe, socket or device), so not a package",
                         hint="name the package file itself")
    if not path.is_file():
        raise UsageError(f"no such package file: {path}", hint="check the path")


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class PackageSnapshot:
    """The bytes of one package file, read once, hashed while they are read, and every later reader's source.

    Admission (``czregistry.admission``) validates, smoke-tests, signs and stores a package; reading the file
    for each step both costs (the archive opened, hashed and inflated again and again) and weakens the
    evidence: a file replaced between two reads gets a report about one set of bytes and a signature or blob
    of another. A snapshot closes that window: its ``sha256`` is of the very bytes every step reads and the
    registry stores. They live in memory up to ``SNAPSHOT_MEMORY_BYTES``, beyond that in one private temp file
    that is unlinked at once (nobody else can open or change it); at most ``limits.max_total_bytes`` (plus a
    MiB of zip structure) are read, so a file no package can be is refused before it fills memory or disk.

    The package parsed from it is cached per ``ReadLimits`` (``inspect``), so identity, validation and the
    smoke test share one ``Package``: one CRC pass that keeps the model bytes, one graph audit. Not for
    concurrent threads (one shared file position).
    """

    def __init__(self, path: Path, spool: IO[bytes], size: int, sha256: str) -> None:
        self.path, self.size, self.sha256 = path, size, sha256
        self._spool: IO[bytes] | None = spool
        self._inspected: dict[tuple[ReadLimits, bool], tuple[Package | None, list[Finding]]] = {}

    @classmethod
    def read(cls, path: Path | str, limits: ReadLimits | None = None) -> PackageSnapshot:
        """Read ``path`` once. ``PackageError`` when it cannot be read or is larger than any package."""
        path = Path(path)
        bound = (limits or ReadLimits()).max_total_bytes + MiB
        # the spool lives as long as the snapshot (closed by close() / the with block), not this function
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SNAPSHOT_MEMORY_BYTES, prefix="czreg-snapshot-")
        h, size = hashlib.sha256(), 0
        try:
            # O_NONBLOCK: a FIFO put in the package's place cannot block the open; refused on the descriptor
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise PackageError(f"{path} is not a regular file", hint="name the package file itself")
                while chunk := fh.read(_CHUNK):
                    size += len(chunk)
                    if size > bound:
                        raise PackageError(f"{path} is over {bound:,} bytes, larger than any package the reader "
                                           "accepts", hint="this is not a .czann/.czmodel package")
                    h.update(chunk)
                    spool.write(chunk)
        except OSError as exc:
            spool.close()
            raise PackageError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path") from exc
        except BaseException:
            spool.close()
            raise
        spool.flush()
        return cls(path, spool, size, h.hexdigest())

    @property
    def closed(self) -> bool:
        return self._spool is None

    def stream(self) -> IO[bytes]:
        """The bytes from the start (one shared file object: read it to the end before the next reader)."""
        if self._spool is None:
            raise PackageError(f"the snapshot of {self.path.name} is closed", hint="report this as a bug")
        self._spool.seek(0)
        return self._spool

    def inspect(self, limits: ReadLimits | None = None, *,
                verify_crc: bool = True) -> tuple[Package | None, list[Finding]]:
        """``inspect_package`` of these bytes, once per ``limits``; ``verify_crc=False`` reuses a full read."""
        limits = limits or ReadLimits()
        for key in ((limits, True), (limits, verify_crc)):
            if key in self._inspected:
                return self._inspected[key]
        out = _inspect(self.path, self, limits, verify_crc)
        self._inspected[(limits, verify_crc)] = out
        return out

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        for package, _ in self._inspected.values():
            if package is not None:
                package.cache.pop("model_bytes", None)
        self._inspected.clear()

    def __enter__(self) -> PackageSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_license_name(name: str) -> bool:
    """Whether a top-level member name reads as a license file (``LICENSE``, ``license.txt``, ``COPYING``,
    ``NOTICE.md``...): the reader accepts one such member, and packing keeps a license file's own name only
    when the reader will recognise it."""
    return _LICENSE_RE.match(name) is not None


def sniff_model_format(head: bytes) -> ModelFormat:
    """A zipped SavedModel starts with a zip header; an ONNX ModelProto with field 1 (ir_version)."""
    if head.startswith(b"PK\x03\x04"):
        return "savedmodel"
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


# --- reading -----------------------------------------------------------------------------------------


def _unsafe_name(name: str) -> str | None:
    if not name:  # zipfile cuts names at a NUL byte, so "\x00evil" arrives empty
        return "is empty (or starts with a NUL byte)"
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of the package with '..'"
    return None


def _member_type(info: zipfile.ZipInfo) -> str | None:
    """'symlink', 'special file' or None for a regular file or directory (Unix-made archives only)."""
    if info.create_system != 3:
        return None
    mode = info.external_attr >> 16
    if not stat.S_IFMT(mode):  # permission bits only (Python's writestr does this): a regular file
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "special file"


def _bomb_hint(name: str) -> str:
    """Why a member that inflates this much is suspect, in terms of what the member is."""
    if name.lower().endswith((".json", ".xml", ".txt")):
        return (f"{name} is metadata: a real one is a few kilobytes of varied text, not megabytes of repeats; "
                "this archive is likely a zip bomb")
    return "real model weights barely compress; this archive is likely a zip bomb"


def archive_findings(infos: list[zipfile.ZipInfo], limits: ReadLimits) -> list[Finding]:
    """Findings about a zip archive's member list alone, before any member is inflated.

    Checks member count, duplicate names, unsafe paths, encryption, links and special files, and declared
    sizes against ``limits`` (per member, compression ratio, total). Public because any zip that comes with
    a package is hostile in the same ways: the package reader uses it for the package itself, and the
    TensorFlow backend for the zipped SavedModel inside ``model.model``.
    """
    out: list[Finding] = []
    if len(infos) > limits.max_members:
        out.append(Finding.error(
            "archive.too_many_members",
            f"archive holds {len(infos)} members; a package has at most a handful (limit {limits.max_members})",
            hint="rebuild the package with only model.json, model.model and an optional license file",
        ))
    for name, n in Counter(i.filename for i in infos).items():
        if n > 1:
            out.append(Finding.error(
                "archive.duplicate_member", f"member '{name}' appears {n} times; readers disagree on which wins",
                location=name, hint="rebuild the package so every member name is unique",
            ))
    total = 0
    for info in infos:
        name = info.filename
        if (why := _unsafe_name(name)) is not None:
            out.append(Finding.error("archive.unsafe_path", f"member path '{name}' {why}", location=name,
                                     hint="never extract this archive with a generic unzip tool"))
        if info.flag_bits & 0x1:
            out.append(Finding.error("archive.encrypted", f"member '{name}' is encrypted; hosts cannot read it",
                                     location=name, hint="repackage without a password"))
        if (kind := _member_type(info)) is not None:
            out.append(Finding.error("archive.special_member", f"member '{name}' is a {kind}", location=name,
                                     hint="packages hold regular files only"))
        total += info.file_size
        if info.file_size > limits.max_member_bytes:
            out.append(Finding.error(
                "archive.zip_bomb",
                f"member '{name}' declares {info.file_size:,} bytes uncompressed, over the "
                f"{limits.max_member_bytes:,}-byte limit",
                location=name, hint="raise the limit only for a package from a trusted source",
            ))
        elif info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            ratio = info.file_size / max(info.compress_size, 1)
            out.append(Finding.error(
                "archive.zip_bomb",
                f"member '{name}' inflates {ratio:,.0f}x ({info.compress_size:,} -> {info.file_size:,} bytes), "
                f"over the {limits.max_ratio:g}x limit",
                location=name, hint=_bomb_hint(name),
            ))
    if total > limits.max_total_bytes:
        out.append(Finding.error(
            "archive.zip_bomb", f"members declare {total:,} bytes in all, over the {limits.max_total_bytes:,} limit",
            hint="raise the limit only for a package from a trusted source",
        ))
    return out


def _classify(names: list[str], path: Path) -> tuple[PackageKind, str | None, str | None]:
    """Decide CZANN vs CZMODEL from the members (the extension only breaks ties)."""
    if CZANN_METADATA in names or CZANN_MODEL in names:
        return "czann", CZANN_METADATA, CZANN_MODEL
    xmls = [n for n in names if n.lower().endswith(".xml") and "/" not in n]
    models = [n for n in names if n.endswith(".model") and "/" not in n]
    if xmls or models or path.suffix.lower() in (".czmodel", ".czseg"):
        stem = Path(xmls[0]).stem if xmls else (Path(models[0]).stem if models else None)
        return "czmodel", (f"{stem}.xml" if stem else None), (f"{stem}.model" if stem else None)
    return "czann", CZANN_METADATA, CZANN_MODEL


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with zf.open(info) as fh:
        return fh.read(info.file_size + 1)


def _verify_crc(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Stream a member to the end so ``zipfile`` checks its CRC; raises BadZipFile / zlib.error."""
    with zf.open(info) as fh:
        while fh.read(_CHUNK):
            pass


def inspect_package(path: Path | str | PackageSnapshot, limits: ReadLimits | None = None,
                    *, verify_crc: bool = True) -> tuple[Package | None, list[Finding]]:
    """Read a package's structure and metadata; never raises for anything inside the file.

    Returns ``(package, findings)``; ``package`` is ``None`` when the archive is unusable (not a zip,
    unsafe, a required member missing). ``findings`` are also stored on the returned package. A
    ``PackageSnapshot`` is read from its bytes (and its result cached there).
    """
    if isinstance(path, PackageSnapshot):
        return path.inspect(limits, verify_crc=verify_crc)
    return _inspect(Path(path), None, limits or ReadLimits(), verify_crc)


def _inspect(path: Path, snapshot: PackageSnapshot | None, limits: ReadLimits,
             verify_crc: bool) -> tuple[Package | None, list[Finding]]:
    findings: list[Finding] = []
    if snapshot is not None:
        size = snapshot.size
        head = snapshot.stream().read(4)
    else:
        try:
            with path.open("rb") as fh:
                head = fh.read(4)
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
        except OSError as exc:
            raise PackageError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path") from exc
    try:
        zf = zipfile.ZipFile(snapshot.stream() if snapshot is not None else path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        if head == b"PK\x03\x04":
            findings.append(Finding.error(
                "archive.truncated",
                f"archive is truncated or its central directory is damaged ({size:,} bytes; {exc})",
                hint="the export or download did not finish; export or download the package again",
            ))
        else:
            findings.append(Finding.error(
                "archive.not_zip", "file is not a ZIP archive, so it cannot be a .czann or .czmodel package",
                hint="check that you passed the package, not the model or metadata file",
            ))
        return None, findings
    with zf:
        try:
            infos = zf.infolist()
        except Exception as exc:  # pragma: no cover - zipfile parses eagerly in the constructor
            findings.append(Finding.error("archive.corrupt", f"cannot list members: {exc}"))
            return None, findings
        findings += archive_findings(infos, limits)
        if any(f.severity is Severity.ERROR for f in findings):
            return None, findings
        files = [i for i in infos if not i.is_dir()]
        names = [i.filename for i in files]
        kind, meta_name, model_name = _classify(names, path)
        required = [n for n in (meta_name, model_name) if n]
        missing = [n for n in required if n not in names]
        if kind == "czmodel" and (meta_name is None or model_name is None):
            missing = ["{Id}.xml", "{Id}.model"]
        for n in missing:
            findings.append(Finding.error(
                "archive.missing_member", f"required member '{n}' is missing from the {kind} package",
                location=n, hint="re-export the package; a .czann holds model.json and model.model",
            ))
        if missing or meta_name is None or model_name is None:
            return None, findings
        license_member = None
        expected = {meta_name, model_name}
        if kind == "czmodel":
            expected.add(f"modelid={Path(meta_name).stem}")
            if f"modelid={Path(meta_name).stem}" not in names:
                findings.append(Finding.warning(
                    "archive.missing_marker", f"legacy marker member 'modelid={Path(meta_name).stem}' is missing",
                    hint="older ZEN releases look for this empty marker entry",
                ))
        for n in names:
            if n in expected:
                continue
            if license_member is None and "/" not in n and is_license_name(n):
                license_member = n
                continue
            findings.append(Finding.warning(
                "archive.extra_member", f"unexpected member '{n}' will be ignored by hosts", location=n,
                hint="remove it, or name a license file license.txt",
            ))
        by_name = {i.filename: i for i in files}
        meta_info, model_info = by_name[meta_name], by_name[model_name]
        if meta_info.file_size > limits.max_metadata_bytes:
            findings.append(Finding.error(
                "archive.metadata_too_large",
                f"metadata member '{meta_name}' is {meta_info.file_size:,} bytes; the limit is "
                f"{limits.max_metadata_bytes:,}",
                location=meta_name, hint="metadata is a few hundred bytes; this file is not a real package",
            ))
            return None, findings
        model_bytes: bytes | None = None
        try:
            meta_bytes = _read_bounded(zf, meta_info)
            with zf.open(model_info) as fh:
                model_head = fh.read(8)
            if verify_crc:
                for info in files:
                    if info is meta_info:
                        continue
                    if (snapshot is not None and info is model_info and sniff_model_format(model_head) == "onnx"
                            and info.file_size <= MAX_KEPT_MODEL_BYTES):
                        # the CRC pass inflates the model anyway: a snapshot keeps it for the audit and the
                        # session (zipfile checks the CRC at the end of the read, never inflates past the size)
                        model_bytes = _read_bounded(zf, info)
                    else:
                        _verify_crc(zf, info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError) as exc:
            findings.append(Finding.error(
                "archive.corrupt", f"archive data is corrupt: {exc}",
                hint="the file was damaged in transfer or by a crashed export; obtain it again",
            ))
            return None, findings
    metadata, meta_findings = _parse_metadata(kind, meta_name, meta_bytes)
    findings += meta_findings
    package = Package(
        path=path, kind=kind, metadata_member=meta_name, model_member=model_name,
        license_member=license_member, metadata_bytes=meta_bytes, metadata=metadata,
        model_size=model_info.file_size, model_format=sniff_model_format(model_head),
        findings=findings, limits=limits, snapshot=snapshot,
    )
    if model_bytes is not None:
        package.cache["model_bytes"] = model_bytes
    if package.model_format == "unknown":
        findings.append(Finding.error(
            "archive.model_format", f"'{model_name}' is neither an ONNX model nor a zipped SavedModel",
            location=model_name, hint="re-export the model",
        ))
    return package, findings


def _parse_metadata(kind: PackageKind, name: str, data: bytes) -> tuple[dict[str, Any] | None, list[Finding]]:
    if kind == "czann":
        try:
            text = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
            obj = json.loads(text)
        except UnicodeDecodeError as exc:
            return None, [Finding.error("metadata.encoding", f"'{name}' is not UTF-8: {exc.reason}", location=name,
                                        hint="save model.json as UTF-8")]
        except json.JSONDecodeError as exc:
            return None, [Finding.error("metadata.json", f"'{name}' is not valid JSON: {exc.msg} at line "
                                        f"{exc.lineno} column {exc.colno}", location=name)]
        except RecursionError:
            return None, [Finding.error("metadata.json", f"'{name}' nests too deeply to be metadata",
                                        location=name)]
        if not isinstance(obj, dict):
            return None, [Finding.error("metadata.json", f"'{name}' must hold a JSON object, not "
                                        f"{type(obj).__name__}", location=name)]
        return obj, []
    try:
        return parse_legacy_xml(data), []
    except PackageError as exc:
        return None, [Finding.error("metadata.xml", f"'{name}': {exc.message}", location=name, hint=exc.hint)]


_INT_FIELDS = {"BorderSize", "LabelValue", "colR", "colG", "colB"}


def _xml_value(key: str, text: str | None) -> Any:
    text = (text or "").strip()
    if key in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            return text
    return text


def _refuse_dtd(*_args: Any) -> None:
    raise PackageError("XML metadata declares a DTD or entities, which packages never need",
                       hint="this file may be hostile; do not open it with other tools")


def _item_entry(item: ElementTree.Element) -> dict[str, Any]:
    """One ``<Item>``: its attributes and sub-elements; a sub-element's attributes and children are merged in
    (``<Color colR="255" .../>`` gives ``colR``), its text is kept under its own tag."""
    entry: dict[str, Any] = {k: _xml_value(k, v) for k, v in item.attrib.items()}
    for sub in item:
        entry.update({k: _xml_value(k, v) for k, v in sub.attrib.items()})
        entry.update({g.tag: _xml_value(g.tag, g.text) for g in sub})
        if (sub.text or "").strip() or (not len(sub) and not sub.attrib):
            entry[sub.tag] = _xml_value(sub.tag, sub.text)
    return entry


def parse_legacy_xml(data: bytes) -> dict[str, Any]:
    """Parse CZMODEL XML metadata into the dict form that ``schemas/czmodel-*.json`` describe.

    DTDs and entities are refused before building the tree: they are the vehicle of XML bombs and
    external-entity attacks, and real CZMODEL metadata never uses them. The refusal happens in expat's
    declaration handlers, so it holds whatever the document's encoding (a byte search alone would miss a
    UTF-16 ``<!DOCTYPE``).
    """
    if b"<!doctype" in data[:4096].lower() or b"<!entity" in data.lower():
        _refuse_dtd()
    scanner = expat.ParserCreate()
    scanner.StartDoctypeDeclHandler = _refuse_dtd
    scanner.EntityDeclHandler = _refuse_dtd
    try:
        scanner.Parse(data, True)
        root = ElementTree.fromstring(data)
    except (expat.ExpatError, ElementTree.ParseError, ValueError) as exc:
        raise PackageError(f"XML metadata is malformed: {exc}", hint="re-export the package") from exc
    if root.tag != "Model":
        raise PackageError(f"XML root element is <{root.tag[:40]}>, expected <Model>")
    out: dict[str, Any] = {k: _xml_value(k, v) for k, v in root.attrib.items()}
    for child in root:
        if child.tag in ("Channels", "TrainingClasses"):
            out[child.tag] = [_item_entry(item) for item in child]
        else:
            out[child.tag] = _xml_value(child.tag, child.text)
    return out


def open_package(path: Path | str | PackageSnapshot, limits: ReadLimits | None = None) -> Package:
    """Like ``inspect_package`` but raises ``PackageError`` with the first error; for callers that only
    want to use a package (run, pack, publish) rather than report on it."""
    package, findings = inspect_package(path, limits)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if package is None or errors:
        first = errors[0] if errors else Finding.error("archive", "package could not be read")
        shown = path.path if isinstance(path, PackageSnapshot) else path
        raise PackageError(f"{shown}: {first.message}", hint=first.hint)
    return package


# --- writing -----------------------------------------------------------------------------------------


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes | Path) -> None:
    info = _zipinfo(name)
    if isinstance(data, bytes):
        zf.writestr(info, data, compresslevel=6)
        return
    info.file_size = data.stat().st_size
    with data.open("rb") as src, zf.open(info, "w", force_zip64=info.file_size > 2 * GiB) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions a plain open() gives
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def check_overwrite(path: Path | str, *, force: bool, sha256: str | None = None) -> None:
    """Refuse to replace an existing ``path`` unless ``force`` (``UsageError``, exit 2). A file that already
    holds exactly the bytes with hex digest ``sha256`` is not an overwrite (pulling twice is fine)."""
    path = Path(path)
    if force or not (path.exists() or path.is_symlink()):
        return
    if sha256 is not None and path.is_file():
        import hashlib

        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() == sha256:
            return
    raise UsageError(f"{path} already exists", hint="pass --force to replace it, or choose another -o path")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_package(
    path: Path | str,
    metadata: dict[str, Any] | bytes,
    model: bytes | Path,
    *,
    kind: PackageKind = "czann",
    license_text: str | bytes | None = None,
    license_name: str = "license.txt",
) -> Path:
    """Write a package atomically and reproducibly.

    ``metadata`` is the JSON object (CZANN) or the XML document bytes (CZMODEL). ``model`` is ONNX bytes,
    a zipped SavedModel, or a path to either (streamed, never loaded whole).
    """
    path = Path(path)
    if kind == "czann":
        meta_bytes = metadata if isinstance(metadata, bytes) else (
            json.dumps(metadata, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        members: list[tuple[str, bytes | Path]] = [(CZANN_METADATA, meta_bytes), (CZANN_MODEL, model)]
    else:
        if not isinstance(metadata, bytes):
            raise TypeError("legacy CZMODEL metadata must be XML bytes")
        model_id = str(parse_legacy_xml(metadata).get("Id", ""))
        if not _UUID_RE.match(model_id):
            raise PackageError(f"legacy metadata Id '{model_id}' is not a UUID")
        members = [(f"{model_id}.xml", metadata), (f"{model_id}.model", model), (f"modelid={model_id}", b"")]
    if license_text is not None:
        members.append((license_name, license_text.encode() if isinstance(license_text, str) else license_text))
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, data in members:
            _write_member(zf, name, data)
    return path


def zip_directory(folder: Path | str, dest: Path | str | None = None) -> bytes | Path:
    """Zip a SavedModel folder reproducibly (sorted paths, fixed times); to bytes, or to ``dest``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer if dest is None else Path(dest), "w") as zf:
        for p in files:
            _write_member(zf, p.relative_to(folder).as_posix(), p)
    return buffer.getvalue() if dest is None else Path(dest)


def is_uuid(value: object) -> bool:
    if not isinstance(value, str) or not _UUID_RE.match(value):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
