"""A minimal, bounded reader of the protobuf wire format, for auditing graphs without their frameworks.

The graph audit must read ONNX ``ModelProto`` and TensorFlow ``SavedModel`` files from hostile packages
without importing TensorFlow (1.9 GB, seconds to import, and the very thing that would run the graph) or
``onnx`` (not a core dependency). It needs only a few fields of each message, so a field walker over
the wire format is enough: length-delimited fields it does not need are skipped in O(1), and nothing it
reads is trusted (every length is checked against the buffer, varints are at most 10 bytes, groups,
which no graph format uses, are refused).

Field numbers come from ``onnx/onnx.proto3`` and ``tensorflow/core/protobuf/{saved_model,meta_graph}.proto``,
``framework/{graph,node_def,function,attr_value,op_def}.proto``; ``tests/test_untrusted.py`` checks what this
reader sees against the frameworks' own parsers on real exports.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["LEN", "VARINT", "WireError", "fields", "messages", "string_field", "strings", "text"]

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, a length past the end, a group)."""


def _varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(pos + 10, end)):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i + 1
        shift += 7
    raise WireError(f"truncated or overlong varint at byte {pos}")


def fields(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, a, b)`` for each field of the message in ``buf[start:end]``: for a
    length-delimited field ``buf[a:b]`` is its payload; for the others ``a`` is the value (fixed-width
    values are not decoded: no graph field we read needs them)."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, 0
        elif wire == LEN:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise WireError(f"field {number} claims {length} bytes at byte {pos}; only {end - pos} remain")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if pos + width > end:
                raise WireError(f"truncated fixed-width field {number} at byte {pos}")
            yield number, wire, pos, pos + width
            pos += width
        else:
            raise WireError(f"unsupported wire type {wire} (field {number}) at byte {pos}")


def messages(buf: bytes | memoryview, number: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of every length-delimited field ``number`` (repeated sub-messages)."""
    for n, wire, a, b in fields(buf, start, end):
        if n == number and wire == LEN:
            yield a, b


def text(buf: bytes | memoryview, a: int, b: int) -> str:
    """``buf[a:b]`` as text, decoded leniently: names are only reported, never trusted."""
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def strings(buf: bytes | memoryview, number: int, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Every string field ``number`` (repeated strings), decoded leniently: names are only reported."""
    for a, b in messages(buf, number, start, end):
        yield text(buf, a, b)


def string_field(buf: bytes | memoryview, number: int, start: int = 0, end: int | None = None) -> str:
    """The last occurrence of string field ``number`` (protobuf's rule for a repeated scalar), or ``""``."""
    value = ""
    for value in strings(buf, number, start, end):  # noqa: B007 - the last one wins
        pass
    return value
