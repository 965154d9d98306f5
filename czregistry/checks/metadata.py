"""Static metadata checks: the schema, then what the schema cannot express.

Each semantic rule is a plain function ``(facts) -> list[Finding]`` so the same rules run on a package's
metadata (``czreg validate``) and on the ``ModelMetadata`` of a conversion spec before packing
(``validate_conversion_spec`` below). Every rule tolerates metadata of the wrong shape: the
schema check already reports that, so a rule silently skips what it cannot interpret rather than
repeating the schema's complaint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import schemas
from ..metadata import CLASSIFICATION_TYPES, DENSE_TYPES, PIXEL_TYPE_CHANNELS, SEGMENTATION_TYPES
from ..package import is_uuid
from ..report import Finding

if TYPE_CHECKING:
    from . import CheckContext

__all__ = ["CHECKS", "MetadataCheck", "MetadataFacts", "SchemaCheck", "semantic_findings",
           "validate_conversion_spec"]

#: Pixel sizes outside this range (metres) are almost certainly in the wrong unit.
_SCALING_RANGE = (1e-10, 1e-3)


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    return None


@dataclass(frozen=True)
class MetadataFacts:
    """What every rule needs: the parsed metadata, where it came from, and which schema version applied."""

    kind: str  # "czann" | "czmodel"
    meta: dict[str, Any]
    version: str | None
    member: str
    prefix: Sequence[str | int] = ()
    #: A conversion spec's ModelMetadata: Id and shapes may be filled in by the packer, so their absence is fine.
    spec: bool = False
    model_member: str | None = None

    def at(self, *parts: str | int) -> str:
        from ..schemas import json_pointer

        return f"{self.member}#{json_pointer([*self.prefix, *parts])}"

    @property
    def type(self) -> str | None:
        t = self.meta.get("Type")
        return t if isinstance(t, str) else None

    @property
    def input_shape(self) -> list[int] | None:
        return _ints(self.meta.get("InputShape"))

    @property
    def output_shape(self) -> list[int] | None:
        return _ints(self.meta.get("OutputShape"))


# --- the rules -------------------------------------------------------------------------------------------


def check_classes_count(f: MetadataFacts) -> list[Finding]:
    """``Classes`` must name every output channel of a segmentation or classification model."""
    if f.kind != "czann" or f.type not in SEGMENTATION_TYPES | CLASSIFICATION_TYPES:
        return []
    classes, out = f.meta.get("Classes"), f.output_shape
    if classes is None:
        return [Finding.info("metadata.classes_count", f"no Classes: hosts show generic names for the {f.type} "
                             "model's classes", location=f.at("Classes"),
                             hint="add \"Classes\": one name per output channel")]
    if not isinstance(classes, list) or out is None:
        return []
    if len(classes) != out[-1]:
        return [Finding.error(
            "metadata.classes_count",
            f"Classes has {len(classes)} names but OutputShape says the model outputs {out[-1]} classes",
            location=f.at("Classes"),
            hint="give exactly one class name per output channel (the last OutputShape entry)")]
    return []


def check_class_names(f: MetadataFacts) -> list[Finding]:
    """Duplicate class names make the host's class list ambiguous."""
    if f.kind == "czann":
        raw = f.meta.get("Classes")
        names = [(i, c) for i, c in enumerate(raw) if isinstance(c, str)] if isinstance(raw, list) else []
        path: tuple[str | int, ...] = ("Classes",)
    else:
        raw = f.meta.get("TrainingClasses")
        labels = [c.get("Name") if isinstance(c, dict) else None for c in raw] if isinstance(raw, list) else []
        names = [(i, n) for i, n in enumerate(labels) if isinstance(n, str)]
        path = ("TrainingClasses",)
    out = []
    counts = Counter(n.strip().casefold() for _, n in names)
    seen: set[str] = set()
    for i, n in names:
        key = n.strip().casefold()
        if counts[key] > 1 and key not in seen:
            seen.add(key)
            out.append(Finding.warning("metadata.class_names", f"class name '{n}' appears {counts[key]} times",
                                       location=f.at(*path, i), hint="give every class a distinct name"))
        elif not n.strip():
            out.append(Finding.warning("metadata.class_names", f"class {i} has an empty name",
                                       location=f.at(*path, i), hint="name every class"))
    return out


def check_min_overlap(f: MetadataFacts) -> list[Finding]:
    """``MinOverlap``: even (the host drops overlap/2 per side), one per spatial dim, smaller than the tile."""
    if f.kind != "czann":
        return []
    raw, inp = f.meta.get("MinOverlap"), f.input_shape
    if raw is None:
        if f.type in DENSE_TYPES and not f.spec:
            return [Finding.info("metadata.min_overlap", "no MinOverlap: the host tiles without overlap, so tile "
                                 "seams are likely unless the model's receptive field is a single pixel",
                                 location=f.at("MinOverlap"),
                                 hint="set MinOverlap to at least twice the model's receptive-field radius")]
        return []
    overlap = _ints(raw)
    if overlap is None:
        return []
    out = []
    for i, v in enumerate(overlap):
        if v % 2:
            out.append(Finding.error("metadata.min_overlap", f"MinOverlap[{i}] is {v}, which is odd; the host "
                                     "drops overlap/2 pixels per side, so it must be even",
                                     location=f.at("MinOverlap", i), hint=f"use {v + 1} (or {v - 1})"))
    if inp is None or len(inp) not in (3, 4):
        return out
    tile = inp[:-1]
    if len(overlap) != len(tile):
        out.append(Finding.error(
            "metadata.min_overlap", f"MinOverlap has {len(overlap)} values but the model has {len(tile)} spatial "
            f"dimensions (InputShape {inp})", location=f.at("MinOverlap"),
            hint=f"give one overlap per spatial dimension ({len(tile)} values)"))
        return out
    for i, (v, t) in enumerate(zip(overlap, tile)):
        if v >= t:
            out.append(Finding.error(
                "metadata.min_overlap", f"MinOverlap[{i}] is {v} but the tile is only {t} pixels along that axis, "
                "so tiles could never advance", location=f.at("MinOverlap", i),
                hint="use a larger tile (InputShape) or a smaller overlap"))
    return out


def check_dimensionality(f: MetadataFacts) -> list[Finding]:
    """2D vs 3D: dense outputs have the input's rank; MinOverlap and Scaling are compared elsewhere."""
    if f.kind != "czann":
        return []
    inp, out = f.input_shape, f.output_shape
    if inp is None or out is None or len(inp) not in (3, 4) or len(out) not in (3, 4):
        return []
    if f.type in DENSE_TYPES and len(inp) != len(out):
        dims = {3: "2D [h, w, c]", 4: "3D [z, h, w, c]"}
        return [Finding.error(
            "metadata.dimensionality", f"InputShape is {dims[len(inp)]} but OutputShape is {dims[len(out)]}; "
            f"a {f.type} model's output has the input's dimensionality", location=f.at("OutputShape"),
            hint="write both shapes in the same form, without the batch dimension")]
    return []


def check_spatial_dims(f: MetadataFacts) -> list[Finding]:
    """Segmentation and regression outputs are images the size of the input tile."""
    if f.kind != "czann" or f.type not in DENSE_TYPES:
        return []
    inp, out = f.input_shape, f.output_shape
    if inp is None or out is None or len(inp) != len(out):
        return []
    if inp[:-1] != out[:-1]:
        return [Finding.error(
            "metadata.spatial_dims", f"OutputShape spatial size {out[:-1]} differs from InputShape {inp[:-1]}; a "
            f"{f.type} model returns a result for every input pixel", location=f.at("OutputShape"),
            hint="pad or crop inside the model so output and input tiles are the same size")]
    return []


def check_id_uuid(f: MetadataFacts) -> list[Finding]:
    """``Id`` is a UUID; in a legacy package it also names the ``{Id}.xml`` and ``{Id}.model`` members."""
    value = f.meta.get("Id")
    if value is None or not isinstance(value, str):
        return []  # missing/wrong type: the schema reports it (and a spec may leave it to the packer)
    if not is_uuid(value):
        return [Finding.error("metadata.id_uuid", f"Id {value[:60]!r} is not a UUID", location=f.at("Id"),
                              hint="use a random UUID such as python -c 'import uuid; print(uuid.uuid4())'")]
    if f.kind == "czmodel":
        stem = f.member.rsplit(".", 1)[0]
        if stem.lower() != value.lower():
            return [Finding.error("metadata.id_uuid", f"Id {value} differs from the member name '{f.member}'; "
                                  "ZEN finds the model by the Id", location=f.at("Id"),
                                  hint="re-export the package so members are named {Id}.xml and {Id}.model")]
    return []


def check_pixel_types(f: MetadataFacts) -> list[Finding]:
    """Legacy: the listed pixel types define the model's input channel count (Gray8 + Bgr24 = 4)."""
    if f.kind != "czmodel":
        return []
    items = f.meta.get("Channels")
    if not isinstance(items, list):
        return []
    raw_types = [c.get("PixelType") for c in items if isinstance(c, dict)]
    types = [t for t in raw_types if isinstance(t, str) and t in PIXEL_TYPE_CHANNELS]
    if not types or len(types) != len(items):
        return []  # unknown pixel types are schema errors
    total = sum(PIXEL_TYPE_CHANNELS[t] for t in types)
    out = [Finding.info("metadata.pixel_types", f"input channels: {' + '.join(types)} = {total}",
                        location=f.at("Channels"))]
    complex_at = [i for i, t in enumerate(types) if "Complex" in str(t)]
    out += [Finding.warning("metadata.pixel_types", f"Channels[{i}] is the complex type {types[i]}; the network "
                            "receives only real-valued float32 input", location=f.at("Channels", i, "PixelType"),
                            hint="make sure the model was trained on the representation the host feeds it")
            for i in complex_at]
    if f.meta.get("ColorHandling") == "ConvertToMonochrome" and total > len(types):
        out.append(Finding.info("metadata.pixel_types", "ColorHandling ConvertToMonochrome: colour channel groups "
                                "are converted to one gray channel before inference",
                                location=f.at("ColorHandling")))
    return out


def check_label_values(f: MetadataFacts) -> list[Finding]:
    """Legacy: ``LabelValue`` numbers classes 1..n, one each, in order of the model's output channels."""
    if f.kind != "czmodel":
        return []
    items = f.meta.get("TrainingClasses")
    if not isinstance(items, list):
        return []
    raw = [c.get("LabelValue") if isinstance(c, dict) else None for c in items]
    values = [(i, v) for i, v in enumerate(raw) if isinstance(v, int) and not isinstance(v, bool)]
    if not values or len(values) != len(items):
        return []
    expected = list(range(1, len(values) + 1))
    if sorted(v for _, v in values) == expected:
        return []
    dupes = [v for v, n in Counter(v for _, v in values).items() if n > 1]
    detail = f"{dupes[0]} is used twice" if dupes else f"they are {sorted(v for _, v in values)}"
    return [Finding.error("metadata.label_values",
                          f"TrainingClasses LabelValue must number the classes 1..{len(values)}; {detail}",
                          location=f.at("TrainingClasses"),
                          hint="label values are 1-based output channel indices, one per class")]


def check_scaling(f: MetadataFacts) -> list[Finding]:
    """``Scaling`` fits the version (1.0.0 has none, 1.1.0 two, 2.x two or three entries, three only for 3D
    models) and is in metres."""
    if f.kind != "czann" or "Scaling" not in f.meta:
        return []
    raw = f.meta["Scaling"]
    if not isinstance(raw, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
        return []
    out: list[Finding] = []
    inp = f.input_shape
    ndim = len(inp) - 1 if inp is not None and len(inp) in (3, 4) else None
    if f.version == "1.0.0":  # only chosen for an unversioned file whose Scaling fits 1.1.0 even worse
        out.append(Finding.error(
            "metadata.scaling", f"Scaling has {len(raw)} values; files without FormatVersion are 1.x, where "
            "Scaling has exactly 2 (x, y)", location=f.at("Scaling"),
            hint='declare "FormatVersion": "2.1.0" to give x, y and z'))
    elif f.version in ("1.1.0", "2.0.0", "2.1.0") and len(raw) not in ((2,) if f.version == "1.1.0" else (2, 3)):
        pass  # the version's schema already reports a wrong length
    elif len(raw) == 3 and ndim == 2:
        out.append(Finding.warning("metadata.scaling", "Scaling has a z extent but the model is 2D",
                                   location=f.at("Scaling"), hint="give x and y only for a 2D model"))
    elif len(raw) == 2 and ndim == 3:
        out.append(Finding.warning("metadata.scaling", "Scaling has no z extent but the model is 3D",
                                   location=f.at("Scaling"),
                                   hint="give x, y and z (FormatVersion 2.x allows three values)"))
    lo, hi = _SCALING_RANGE
    for i, v in enumerate(raw):
        if v > hi:
            out.append(Finding.warning(
                "metadata.scaling", f"Scaling[{i}] is {v} m per pixel, which is implausibly large; Scaling is in "
                "metres", location=f.at("Scaling", i), hint=f"if {v} is in micrometres, write {v * 1e-6:g}"))
        elif 0 < v < lo:
            out.append(Finding.warning("metadata.scaling", f"Scaling[{i}] is {v} m per pixel, below atomic scale",
                                       location=f.at("Scaling", i), hint="Scaling is in metres"))
    return out


#: Values that identify a person or their machine when a package is shared: user folders on Windows, Linux and
#: macOS, UNC shares, and e-mail addresses.
_PRIVATE = (
    ("a Windows user folder", r"[A-Za-z]:[\\/]+(?:Users|Documents and Settings)[\\/]+[^\\/]+"),
    ("a home folder", r"(?<![\w.])/(?:home|Users)/[^/\s]+"),
    ("a network share", r"^\\\\[^\\]+\\[^\\]+"),
    ("an e-mail address", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
)


def _strings(value: Any, path: tuple[str | int, ...] = ()) -> Iterable[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*path, i))


def check_privacy(f: MetadataFacts) -> list[Finding]:
    """Metadata that leaks local paths, user names or e-mail addresses to whoever receives the package."""
    import getpass
    import re

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = ""
    out = []
    for path, text in _strings(f.meta):
        what = next((label for label, pattern in _PRIVATE if re.search(pattern, text)), None)
        if what is None and len(user) >= 3 and user not in ("root", "user", "admin") and \
                re.search(rf"(?<![\w]){re.escape(user)}(?![\w])", text, re.IGNORECASE):
            what = f"this machine's user name '{user}'"
        if what is not None:
            field_name = "/".join(str(p) for p in path)
            out.append(Finding.warning("metadata.privacy", f"'{field_name}' contains {what}: it reaches everyone "
                                       "the package is shared with", location=f.at(*path),
                                       hint="remove personal paths, names and addresses before sharing "
                                       "(czreg pack never writes them on its own)"))
    return out


Rule = Callable[[MetadataFacts], list[Finding]]
#: Rules that also apply to a conversion spec's ModelMetadata (CZANN style).
SPEC_RULES: tuple[Rule, ...] = (check_classes_count, check_class_names, check_min_overlap, check_dimensionality,
                                check_spatial_dims, check_id_uuid, check_scaling)


def semantic_findings(kind: str, meta: dict[str, Any], version: str | None, member: str, *,
                      prefix: Sequence[str | int] = (), spec: bool = False) -> list[Finding]:
    """Run the semantic rules on one metadata object (used for conversion specs)."""
    facts = MetadataFacts(kind, meta, version, member, tuple(prefix), spec)
    rules = SPEC_RULES if spec else tuple(c.rule for c in CHECKS if isinstance(c, MetadataCheck))
    return [finding for rule in rules for finding in rule(facts)]


# --- the Check objects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaCheck:
    id: str = "metadata.schema"
    needs_model: bool = False
    order: int = 10

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        from ..schemas import validate_package_metadata

        return validate_package_metadata(ctx.package, ctx.report)


@dataclass(frozen=True)
class MetadataCheck:
    """A semantic rule as a registered check; runs after the schema check so it knows the version."""

    id: str
    rule: Rule = field(compare=False)
    order: int = 20
    needs_model: bool = False

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        package = ctx.package
        if package.metadata is None:
            return []
        facts = MetadataFacts(package.kind, package.metadata, ctx.report.schema_version, package.metadata_member,
                              model_member=package.model_member)
        return self.rule(facts)


CHECKS: list[object] = [
    SchemaCheck(),
    MetadataCheck("metadata.id_uuid", check_id_uuid, 20),
    MetadataCheck("metadata.dimensionality", check_dimensionality, 21),
    MetadataCheck("metadata.spatial_dims", check_spatial_dims, 22),
    MetadataCheck("metadata.classes_count", check_classes_count, 23),
    MetadataCheck("metadata.class_names", check_class_names, 24),
    MetadataCheck("metadata.min_overlap", check_min_overlap, 25),
    MetadataCheck("metadata.scaling", check_scaling, 26),
    MetadataCheck("metadata.pixel_types", check_pixel_types, 27),
    MetadataCheck("metadata.label_values", check_label_values, 28),
    MetadataCheck("metadata.privacy", check_privacy, 29),
]


# --- conversion specs ----------------------------------------------------------------------------------

_LEGACY_SPEC_KEYS = frozenset({"BorderSize", "ColorHandling", "PixelType", "Classes", "TestImageFile"})


def validate_conversion_spec(obj: Any, *, source: str = "conversion-spec.json") -> list[Finding]:
    """Check a conversion spec (either style) before packing; never raises for bad content.

    Structural problems have check id ``conversion_spec.schema`` (unknown keys:
    ``conversion_spec.unknown_field``); the CZANN style's ``ModelMetadata`` also gets the semantic
    ``metadata.*`` checks, located under ``#/ModelMetadata``.
    """
    if not isinstance(obj, dict):
        what = schemas.describe_value(obj)
        return [Finding.error("conversion_spec.schema", f"a conversion spec is a JSON object, not {what}",
                              location=f"{source}#", hint="see 'czreg schemas show conversion-spec-czann'")]
    if "ModelMetadata" in obj or not (_LEGACY_SPEC_KEYS & obj.keys()):
        findings = schemas.validate_against("conversion-spec-czann", obj, source, check="conversion_spec.schema")
        meta = obj.get("ModelMetadata")
        if isinstance(meta, dict):
            findings += semantic_findings("czann", meta, schemas.CZANN_VERSIONS[-1], source,
                                          prefix=["ModelMetadata"], spec=True)
        return findings
    return schemas.validate_against("conversion-spec-legacy", obj, source, check="conversion_spec.schema")
