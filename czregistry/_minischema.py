"""A small JSON Schema 2020-12 validator for the keyword subset our bundled schemas use.

Why not ``jsonschema``: importing it (with ``referencing``, ``attrs``, ``rpds``) costs about 60 ms of CPU,
which on its own doubles the cold start of ``czreg validate --static`` compared with a bare Python. Our
schemas are plain documents (no ``$ref``, no formats), so the few keywords they use are checked here, with
the same semantics and the same error attributes as ``jsonschema`` (``validator``, ``validator_value``,
``instance``, ``schema``, ``absolute_path``, ``message``). ``tests/test_schemas.py`` compares both on
fuzzed documents, and ``compile_schema`` refuses any keyword outside the subset, so a schema edit that
needs more fails loudly instead of being half-checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_KEYWORDS", "Issue", "Validator", "compile_schema"]

_ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "$comment", "examples", "default"})
_ASSERTIONS = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "oneOf",
})
SUPPORTED_KEYWORDS = _ANNOTATIONS | _ASSERTIONS


@dataclass(frozen=True)
class Issue:
    """One violation, shaped like ``jsonschema.ValidationError`` for the attributes we read."""

    validator: str
    validator_value: Any
    instance: Any
    schema: dict[str, Any]
    absolute_path: tuple[str | int, ...]
    message: str


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":  # floats such as 64.0 are not integers for the hosts' parsers
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool,
                              "null": type(None)}[name])


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _check(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: only object schemas are supported")
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported keyword(s) {sorted(unknown)}")
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        raise ValueError(f"{where}: additionalProperties must be true or false")
    for key, sub in schema.get("properties", {}).items():
        _check(sub, f"{where}/properties/{key}")
    if "items" in schema:
        _check(schema["items"], f"{where}/items")
    for i, sub in enumerate(schema.get("oneOf", [])):
        _check(sub, f"{where}/oneOf/{i}")


class Validator:
    """Validates instances against one compiled schema; ``iter_errors`` mirrors ``jsonschema``."""

    def __init__(self, schema: dict[str, Any]) -> None:
        _check(schema, "#")
        self.schema = schema

    def iter_errors(self, instance: Any) -> Iterator[Issue]:
        yield from self._errors(self.schema, instance, ())

    def is_valid(self, instance: Any) -> bool:
        return next(self.iter_errors(instance), None) is None

    def _errors(self, s: dict[str, Any], inst: Any, path: tuple[str | int, ...]) -> Iterator[Issue]:
        def issue(kw: str, message: str) -> Issue:
            return Issue(kw, s[kw], inst, s, path, message)

        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not any(_is_type(inst, t) for t in types):
                yield issue("type", f"{inst!r} is not of type {', '.join(repr(t) for t in types)}")
        if "enum" in s and not any(_equal(inst, v) for v in s["enum"]):
            yield issue("enum", f"{inst!r} is not one of {s['enum']!r}")
        if "const" in s and not _equal(inst, s["const"]):
            yield issue("const", f"{s['const']!r} was expected")
        if isinstance(inst, dict):
            props = s.get("properties", {})
            for key, sub in props.items():
                if key in inst:
                    yield from self._errors(sub, inst[key], (*path, key))
            for key in s.get("required", []):
                if key not in inst:
                    yield issue("required", f"{key!r} is a required property")
            if s.get("additionalProperties") is False:
                extra = [k for k in inst if k not in props]
                if extra:
                    yield issue("additionalProperties",
                                f"Additional properties are not allowed ({', '.join(map(repr, extra))} unexpected)")
        if isinstance(inst, list):
            if "items" in s:
                for i, item in enumerate(inst):
                    yield from self._errors(s["items"], item, (*path, i))
            if "minItems" in s and len(inst) < s["minItems"]:
                yield issue("minItems", f"{inst!r} should be non-empty" if s["minItems"] == 1
                            else f"{inst!r} is too short")
            if "maxItems" in s and len(inst) > s["maxItems"]:
                yield issue("maxItems", f"{inst!r} is too long")
        if _is_type(inst, "number"):
            if "minimum" in s and inst < s["minimum"]:
                yield issue("minimum", f"{inst!r} is less than the minimum of {s['minimum']!r}")
            if "maximum" in s and inst > s["maximum"]:
                yield issue("maximum", f"{inst!r} is greater than the maximum of {s['maximum']!r}")
            if "exclusiveMinimum" in s and inst <= s["exclusiveMinimum"]:
                yield issue("exclusiveMinimum", f"{inst!r} is less than or equal to {s['exclusiveMinimum']!r}")
            if "exclusiveMaximum" in s and inst >= s["exclusiveMaximum"]:
                yield issue("exclusiveMaximum", f"{inst!r} is greater than or equal to {s['exclusiveMaximum']!r}")
        if isinstance(inst, str):
            if "minLength" in s and len(inst) < s["minLength"]:
                yield issue("minLength", f"{inst!r} is too short")
            if "maxLength" in s and len(inst) > s["maxLength"]:
                yield issue("maxLength", f"{inst!r} is too long")
            if "pattern" in s and re.search(s["pattern"], inst) is None:
                yield issue("pattern", f"{inst!r} does not match {s['pattern']!r}")
        if "oneOf" in s:
            matches = sum(next(self._errors(sub, inst, path), None) is None for sub in s["oneOf"])
            if matches != 1:
                yield issue("oneOf", f"{inst!r} is not valid under any of the given schemas" if matches == 0
                            else f"{inst!r} is valid under each of several of the given schemas")


def compile_schema(schema: dict[str, Any]) -> Validator:
    """A validator for ``schema``; raises ``ValueError`` if it uses a keyword outside the subset."""
    return Validator(schema)
