"""Compatibility facts: which ZEN / arivis generation a package needs, as far as the format says.

The report carries the format generation, the minimum host it implies (``../shared/spec``: CZANN 2.x needs ZEN
3.13 or later; older hosts read 1.x; legacy CZMODEL hosts load ONNX up to opset 12), and the ONNX opset and IR
version read from the model's protobuf header. A model whose opset is newer than its declared target loads
warns: the host's ONNX Runtime refuses it at run time, long after the package was shared.

The header is read by a minimal streaming protobuf reader (``ModelProto`` fields 1 ``ir_version`` and 8
``opset_import``; the graph, field 7, is skipped in chunks), so ``czreg validate --static`` stays free of the
``onnx`` import and never holds the weights in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from ..report import Finding

if TYPE_CHECKING:
    from . import CheckContext

__all__ = ["CompatibilityCheck", "OnnxHeader", "read_onnx_header", "target_for"]

#: Newest default-domain opset each target is known to load (the format facts in docs/model-checks.md).
OPSET_LIMITS = {"czann-2": 18, "czann-1": 12, "czmodel": 12}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OnnxHeader:
    ir_version: int | None
    opset: int | None  # default domain ("" or "ai.onnx")
    domains: dict[str, int]


def _varint(fh: IO[bytes]) -> int | None:
    shift = value = 0
    while True:
        b = fh.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(fh: IO[bytes], limit: int | None = None) -> Iterator[tuple[int, int, int | bytes | None]]:
    """(field number, wire type, value) of one message; length-delimited values of fields other than 8 are
    skipped (value None) unless small."""
    read = 0
    while limit is None or read < limit:
        start = fh.tell() if limit is not None else 0
        tag = _varint(fh)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value: int | bytes | None = _varint(fh)
        elif wire == 2:
            n = _varint(fh) or 0
            if n <= 4096:
                value = fh.read(n)
            else:
                value = None
                while n > 0:
                    got = len(fh.read(min(n, _CHUNK)))
                    if not got:
                        return
                    n -= got
        elif wire == 1:
            fh.read(8)
            value = None
        elif wire == 5:
            fh.read(4)
            value = None
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value
        if limit is not None:
            read += fh.tell() - start


def read_onnx_header(fh: IO[bytes]) -> OnnxHeader:
    """IR version and opset imports of an ONNX ``ModelProto`` read from a stream."""
    import io

    ir: int | None = None
    domains: dict[str, int] = {}
    for number, wire, value in _fields(fh):
        if number == 1 and wire == 0 and isinstance(value, int):
            ir = value
        elif number == 8 and wire == 2 and isinstance(value, bytes):
            domain, version = "", None
            for n2, w2, v2 in _fields(io.BytesIO(value), len(value)):
                if n2 == 1 and w2 == 2 and isinstance(v2, bytes):
                    domain = v2.decode("utf-8", "replace")
                elif n2 == 2 and w2 == 0 and isinstance(v2, int):
                    version = v2
            if version is not None:
                domains[domain] = version
    opset = domains.get("", domains.get("ai.onnx"))
    return OnnxHeader(ir, opset, domains)


def target_for(kind: str, format_version: str | None) -> tuple[str, str]:
    """(target key, minimum host in words) for a package kind and its ``FormatVersion``."""
    if kind == "czmodel":
        return "czmodel", "legacy ZEN / arivis hosts reading CZMODEL (XML 3.x); ONNX up to opset 12"
    major = (format_version or "1").split(".")[0]
    if major == "2":
        return "czann-2", "ZEN (blue/core) 3.13 or later, or an arivis release of that generation"
    return "czann-1", "ZEN hosts older than 3.13 read it too (CZANN 1.x)"


@dataclass(frozen=True)
class CompatibilityCheck:
    """Reports the compatibility facts and warns when the model's opset is newer than its target loads."""

    id: str = "metadata.compatibility"
    needs_model: bool = False
    order: int = 40

    def run(self, ctx: CheckContext) -> list[Finding]:
        package = ctx.package
        meta = package.metadata or {}
        version = meta.get("FormatVersion") if package.kind == "czann" else meta.get("Version")
        key, host = target_for(package.kind, version if isinstance(version, str) else None)
        facts: dict[str, object] = {"format": f"{package.kind} {version or '1.x (no FormatVersion)'}",
                                    "min_host": host}
        out: list[Finding] = []
        if package.model_format == "onnx":
            try:
                with package.open_model() as fh:
                    header = read_onnx_header(fh)
            except (OSError, ValueError, KeyError) as exc:
                out.append(Finding.info(self.id, f"could not read the ONNX header: {exc}"))
                header = OnnxHeader(None, None, {})
            facts.update(onnx_opset=header.opset, onnx_ir_version=header.ir_version, onnx_domains=header.domains)
            limit = OPSET_LIMITS[key]
            if header.opset is not None and header.opset > limit:
                out.append(Finding.warning(
                    f"{self.id}.opset", f"the model uses ONNX opset {header.opset}, newer than {host.split(';')[0]} "
                    f"can load (opset {limit} and older)", location=package.model_member,
                    hint=f"re-export or pack with --opset {limit}"))
        ctx.measure("compatibility", facts)  # facts, not findings: a clean package keeps a clean report
        return out
