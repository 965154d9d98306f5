"""Versioned JSON schemas (shipped in the wheel) and schema selection for package metadata.

The schemas in ``schemas/`` (installed as ``czregistry/_schemas``) are the structural contract, usable by
other tools through ``czreg schemas show NAME``. This module picks the schema a package's metadata claims
(``FormatVersion`` for CZANN, the ``<Model Version>`` attribute for legacy CZMODEL), validates against it
and turns every schema violation into a ``Finding`` with a JSON-pointer location such as
``model.json#/MinOverlap/0``. What a schema cannot express lives in ``czregistry.checks.metadata``.

Validation uses ``_minischema`` (jsonschema's semantics for the keyword subset our schemas use) so the
static path never pays jsonschema's import cost; tests check both agree.

Unknown fields are reported as warnings (``metadata.unknown_field``), not errors: hosts ignore them, but they
are usually typos (``Clases``) that silently drop information.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SchemaError
from .report import Finding, Severity

if TYPE_CHECKING:
    from .package import Package, PackageKind
    from .report import Report

__all__ = [
    "CZANN_VERSIONS",
    "CZMODEL_VERSIONS",
    "SchemaInfo",
    "describe_value",
    "json_pointer",
    "list_schemas",
    "load_schema",
    "schema_names",
    "schema_text",
    "select_schema",
    "validate_against",
    "validate_metadata",
    "validate_package_metadata",
]

#: Known metadata versions, oldest first. A ``major.minor.patch`` value selects the ``major.minor`` schema.
CZANN_VERSIONS: tuple[str, ...] = ("1.0.0", "1.1.0", "2.0.0", "2.1.0")
CZMODEL_VERSIONS: tuple[str, ...] = ("3.0.0", "3.1.0")
#: Files without ``FormatVersion`` are 1.x; tried in this order, the first that fits wins.
_UNVERSIONED_CZANN: tuple[str, ...] = ("1.0.0", "1.1.0")
_SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
#: Cap on findings one schema validation reports: a hostile 1 MiB file must not produce a million lines.
MAX_SCHEMA_FINDINGS = 50
_SHORT = 60


@dataclass(frozen=True)
class SchemaInfo:
    """One bundled schema: ``name`` is what ``czreg schemas show`` takes (the file name without .json)."""

    name: str
    title: str
    id: str
    description: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "id": self.id, "description": self.description}


# --- loading -----------------------------------------------------------------------------------------


def _schema_dir() -> Traversable:
    """``czregistry/_schemas`` inside a wheel; the repository's ``schemas/`` in a source tree or editable
    install (hatch's force-include only applies when a wheel is built)."""
    packaged = resources.files("czregistry") / "_schemas"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / "schemas"
    if source.is_dir():
        return source
    raise SchemaError("the bundled JSON schemas are missing from this installation",
                      hint="reinstall czregistry (pip install --force-reinstall czregistry)")


@functools.cache
def schema_names() -> tuple[str, ...]:
    return tuple(sorted(p.name[:-5] for p in _schema_dir().iterdir() if p.name.endswith(".json")))


def _canonical(name: str) -> str:
    base = name.removesuffix(".json")
    if base not in schema_names():
        raise SchemaError(f"unknown schema '{name}'", hint=f"known schemas: {', '.join(schema_names())}")
    return base


def schema_text(name: str) -> str:
    """The schema file exactly as shipped (so other tools get byte-identical copies)."""
    return (_schema_dir() / f"{_canonical(name)}.json").read_text(encoding="utf-8")


@functools.cache
def _load(name: str) -> dict[str, Any]:
    obj = json.loads(schema_text(name))
    if not isinstance(obj, dict):  # pragma: no cover - our own files
        raise SchemaError(f"schema '{name}' is not a JSON object")
    return obj


def load_schema(name: str) -> dict[str, Any]:
    """A fresh copy of a schema (callers may modify it). ``name`` may end in ``.json``."""
    return json.loads(json.dumps(_load(_canonical(name))))


def list_schemas() -> list[SchemaInfo]:
    out = []
    for name in schema_names():
        s = _load(name)
        out.append(SchemaInfo(name, str(s.get("title", "")), str(s.get("$id", "")), str(s.get("description", ""))))
    return out


@functools.cache
def _validator(name: str) -> Any:
    """A compiled validator for a bundled schema (see ``_minischema``: jsonschema's semantics for the keywords
    we use, at a fraction of its import cost; ``integer`` excludes floats like 64.0, which hosts reject)."""
    from ._minischema import compile_schema

    return compile_schema(_load(name))


# --- converting errors to findings ----------------------------------------------------------------------


def json_pointer(parts: Iterable[str | int]) -> str:
    """RFC 6901 pointer for a path of keys and indices ('' for the document itself)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _field(parts: Sequence[str | int]) -> str:
    if not parts:
        return "the metadata"
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


_JSON_TYPE = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
              int: "an integer", float: "a number"}


def describe_value(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _message(err: Any, parts: Sequence[str | int]) -> str:
    where, kw, want, inst = _field(parts), err.validator, err.validator_value, err.instance
    if kw == "type":
        types = want if isinstance(want, list) else [want]
        return f"{where} must be {' or '.join(str(t) for t in types)}, not {describe_value(inst)} ({_short(inst)})"
    if kw == "enum":
        return f"{where} is {_short(inst)}, which is not one of: {', '.join(str(v) for v in want)}"
    if kw == "const":
        return f"{where} must be {json.dumps(want)}, not {_short(inst)}"
    if kw == "minItems":
        return f"{where} needs at least {want} entries, has {len(inst)}"
    if kw == "maxItems":
        return f"{where} allows at most {want} entries, has {len(inst)}"
    if kw in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kw]
        return f"{where} is {_short(inst)}; it must be {op} {want}"
    if kw == "minLength":
        return f"{where} must not be empty"
    if kw == "pattern":
        return f"{where} is {_short(inst)}, which does not match {want}"
    if kw == "oneOf":
        return f"{where} is {_short(inst)}, which fits none of the allowed forms"
    msg = str(err.message)
    return f"{where}: {msg if len(msg) <= 200 else msg[:197] + '...'}"


def _label(name: str) -> str:
    """Short human name of a schema: 'CZANN 2.1.0', 'CZMODEL 3.0.0', 'the legacy conversion spec'."""
    family, _, version = name.partition("-")
    if family in ("czann", "czmodel"):
        return f"{family.upper()} {version}"
    return f"the {name.rsplit('-', 1)[-1]}-style conversion spec"


def validate_against(name: str, obj: Any, member: str, *, check: str = "metadata.schema",
                     pointer_prefix: Sequence[str | int] = ()) -> list[Finding]:
    """Validate ``obj`` with the named schema. Violations are errors with check id ``check``; fields the
    schema does not know are warnings ``<prefix>.unknown_field``. Locations are ``member#/json/pointer``."""
    title = _label(_canonical(name))
    unknown_check = check.rsplit(".", 1)[0] + ".unknown_field"
    findings: list[Finding] = []
    errors = sorted(_validator(_canonical(name)).iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    for err in errors:
        parts: list[str | int] = [*pointer_prefix, *err.absolute_path]
        hint = err.schema.get("description") if isinstance(err.schema, dict) else None
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = list(err.schema.get("properties", {}))
            for key in sorted(k for k in err.instance if k not in known):
                import difflib  # only for unknown fields: keeps the common path's start-up light

                close = difflib.get_close_matches(key, known, n=1)
                findings.append(Finding.warning(
                    unknown_check, f"unknown field '{_field([*parts, key])}' is not part of {title}; "
                    "hosts ignore it", location=f"{member}#{json_pointer([*parts, key])}",
                    hint=f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(known)}"))
            continue
        if err.validator == "required" and isinstance(err.instance, dict):
            for key in err.validator_value:
                if key not in err.instance and str(err.message).startswith(repr(key)):
                    prop = err.schema.get("properties", {}).get(key, {})
                    findings.append(Finding.error(
                        check, f"required field '{_field([*parts, key])}' is missing",
                        location=f"{member}#{json_pointer([*parts, key])}",
                        hint=prop.get("description") or f"{title} requires it"))
            continue
        findings.append(Finding.error(check, _message(err, parts), location=f"{member}#{json_pointer(parts)}",
                                      hint=hint))
    if len(findings) > MAX_SCHEMA_FINDINGS:
        extra = len(findings) - MAX_SCHEMA_FINDINGS
        findings = findings[:MAX_SCHEMA_FINDINGS]
        findings.append(Finding.info(check, f"{extra} more schema findings not shown", location=member))
    return findings


# --- selecting the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which schemas to try for a metadata document, and what was learned while choosing."""

    candidates: tuple[str, ...]  # schema names; empty: do not validate structurally
    findings: tuple[Finding, ...]
    declared: bool  # the file names its version (otherwise the best-fitting candidate is chosen)


def _family(kind: PackageKind) -> tuple[str, str, tuple[str, ...]]:
    return ("czmodel", "Version", CZMODEL_VERSIONS) if kind == "czmodel" else ("czann", "FormatVersion",
                                                                                 CZANN_VERSIONS)


def select_schema(kind: PackageKind, meta: dict[str, Any], member: str) -> Selection:
    """Choose schema candidates from ``FormatVersion`` (CZANN) or the XML ``Version`` (CZMODEL)."""
    family, key, known = _family(kind)
    loc = f"{member}#{json_pointer([key])}"
    shown = "XML Version attribute" if kind == "czmodel" else "FormatVersion"
    if key not in meta:
        if kind == "czann":
            return Selection(tuple(f"czann-{v}" for v in _UNVERSIONED_CZANN), (), False)
        return Selection((f"czmodel-{known[-1]}",), (Finding.error(
            "metadata.format_version", f"legacy metadata has no {shown}; expected one of {', '.join(known)}",
            location=loc, hint='write <Model Version="3.1.0"> (or re-export the package)'),), False)
    value = meta[key]
    match = _SEMVER.match(value) if isinstance(value, str) else None
    if match is None:
        return Selection((), (Finding.error(
            "metadata.format_version", f"{shown} {_short(value)} is not a version like {known[-1]}",
            location=loc, hint=f"use one of {', '.join(known)}"),), True)
    major, minor, patch = (int(g) for g in match.groups())
    by_minor = {tuple(int(x) for x in v.split(".")[:2]): v for v in known}
    if (major, minor) in by_minor:
        version = by_minor[(major, minor)]
        notes: tuple[Finding, ...] = ()
        if patch != int(version.split(".")[2]):
            notes = (Finding.info("metadata.format_version",
                                  f"{shown} {value} is checked with the {family} {version} schema", location=loc),)
        return Selection((f"{family}-{version}",), notes, True)
    latest = tuple(int(x) for x in known[-1].split("."))
    if (major, minor, patch) > latest:
        return Selection((), (Finding.error(
            "metadata.format_version",
            f"{shown} {value} is newer than this czregistry understands (latest {known[-1]})",
            location=loc, hint="upgrade czregistry (pip install -U czregistry) to validate this package"),), True)
    return Selection((), (Finding.error(
        "metadata.format_version", f"{shown} {value} is not a known {family} metadata version",
        location=loc, hint=f"known versions: {', '.join(known)}"),), True)


def validate_metadata(kind: PackageKind, meta: dict[str, Any], member: str) -> tuple[str | None, list[Finding]]:
    """Validate parsed metadata structurally. Returns ``(schema version used or None, findings)``."""
    selection = select_schema(kind, meta, member)
    findings = list(selection.findings)
    if not selection.candidates:
        return None, findings
    results = [(name, validate_against(name, meta, member)) for name in selection.candidates]
    if len(results) == 1:
        name, found = results[0]
        if not selection.declared:  # legacy without Version: the missing attribute is already reported
            found = [f for f in found if f.location != f"{member}#/Version"]
            return None, findings + found
        return name.split("-", 1)[1], findings + found

    def cost(item: tuple[int, tuple[str, list[Finding]]]) -> tuple[int, int, int]:
        index, (_, found) = item
        errors = sum(f.severity is Severity.ERROR for f in found)
        return (errors, len(found) - errors, index)

    _, (name, found) = min(enumerate(results), key=cost)
    version = name.split("-", 1)[1]
    if not found:
        note = f"no FormatVersion: metadata matches CZANN {version} (files without FormatVersion are 1.x)"
    else:
        note = (f"no FormatVersion: metadata matches no 1.x schema exactly; checked against the closest, "
                f"CZANN {version}")
    findings.append(Finding.info("metadata.format_version", note, location=f"{member}#/FormatVersion",
                                 hint="new packages should declare \"FormatVersion\": \"2.1.0\""))
    return version, findings + found


def validate_package_metadata(package: Package, report: Report) -> list[Finding]:
    """The schema check of ``czreg validate``; sets ``report.schema_version`` to the version used."""
    if package.metadata is None:  # the reader already said why
        return []
    version, findings = validate_metadata(package.kind, package.metadata, package.metadata_member)
    report.schema_version = version
    return findings
