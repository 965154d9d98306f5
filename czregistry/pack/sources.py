"""Resolving what ``czregistry.pack`` packs: conversion specs (``load_spec``, re-exported by
``czregistry.pack``), then the model itself through the registered model sources (``czregistry.sources``:
ONNX in the core, Keras/SavedModel in ``czregistry-tensorflow``, PyTorch in ``czregistry-torch``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..report import Severity
from ..selection import select_source
from ..sources import LoadedSource, LoadOptions
from .metadata import _CZANN_KEYS, _LEGACY_KEYS

__all__ = ["PackWarning", "load_spec"]


class PackWarning(UserWarning):
    """Something about a pack that the user should know but that does not stop it."""


@dataclass
class _Source:
    """What to pack once a conversion spec is resolved: the model (object or path) and the spec's fields."""

    model: Any
    spec_metadata: dict[str, Any] = field(default_factory=dict)
    spec_style: str | None = None
    license_file: Path | None = None
    spec_path: Path | None = None


def load_spec(path: Path) -> tuple[dict[str, Any], str, Path, Path | None]:
    """Read a conversion spec JSON: ``(metadata, style, model_path, license_path)``.

    Both styles in the format facts are accepted: CZANN style ``{"ModelMetadata": {...}, "ModelPath": ...}``
    and legacy style ``{"BorderSize", "ColorHandling", "PixelType", "Classes", "ModelPath"}``. Relative paths
    are resolved against the JSON file's folder, never the working directory.
    """
    try:
        spec = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read conversion spec {path}: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("ModelPath"), str):
        raise UsageError(f"conversion spec {path} needs a 'ModelPath' string",
                         hint="see docs/packing.md for both spec styles")
    base = path.parent
    style = "czann" if "ModelMetadata" in spec else "legacy"
    _check_spec_schema(spec, style, path)

    def resolve(p: str) -> Path:
        q = Path(p.replace("\\", "/"))
        return q if q.is_absolute() else (base / q)

    license_path = resolve(spec["LicenseFile"]) if isinstance(spec.get("LicenseFile"), str) else None
    if "ModelMetadata" in spec:
        meta = spec["ModelMetadata"]
        if not isinstance(meta, dict):
            raise UsageError(f"conversion spec {path}: 'ModelMetadata' must be an object")
        unknown = sorted(set(meta) - set(_CZANN_KEYS))
        if unknown:
            raise UsageError(f"conversion spec {path}: unknown ModelMetadata field(s) {', '.join(unknown)}",
                             hint=f"allowed: {', '.join(_CZANN_KEYS)}")
        return dict(meta), "czann", resolve(spec["ModelPath"]), license_path
    if "BorderSize" in spec or "PixelType" in spec or "ColorHandling" in spec:
        meta = {k: spec[k] for k in (*_LEGACY_KEYS, "Classes") if k in spec}
        meta.setdefault("ModelName", Path(spec["ModelPath"].replace("\\", "/")).name)
        if "TestImageFile" in spec:
            meta["_TestImageFile"] = str(resolve(spec["TestImageFile"]))
        return meta, "legacy", resolve(spec["ModelPath"]), license_path
    raise UsageError(f"conversion spec {path} is neither CZANN style ('ModelMetadata') nor legacy style "
                     "('BorderSize', 'PixelType', 'ColorHandling')", hint="see docs/packing.md")


def _check_spec_schema(spec: dict[str, Any], style: str, path: Path) -> None:
    """Refuse a spec that its published schema (``schemas/conversion-spec-*.json``) rejects."""
    from ..schemas import validate_against

    findings = validate_against(f"conversion-spec-{style}", spec, path.name, check="spec.schema")
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise UsageError(f"conversion spec {path} ({style} style): {errors[0].message}",
                         hint=errors[0].hint or "see docs/packing.md for both spec styles")
    for f in findings:
        warnings.warn(f"conversion spec {path}: {f.message}", PackWarning, stacklevel=4)


def _resolve_source(source: Any) -> _Source:
    """Unwrap a conversion spec (its ``ModelPath`` relative to the JSON); refuse paths that do not exist."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise UsageError(f"no such model: {path}", hint="check the path")
        if path.is_file() and path.suffix.lower() == ".json":
            meta, style, model_path, license_path = load_spec(path)
            if model_path.suffix.lower() == ".json":
                raise UsageError(f"conversion spec {path} points at another spec; ModelPath must be a model")
            if not model_path.exists():
                raise UsageError(f"no such model: {model_path}", hint=f"check ModelPath in {path}")
            return _Source(model_path, meta, style, license_path, path)
        return _Source(path)
    return _Source(source)


def _load_source(src: _Source, options: LoadOptions) -> LoadedSource:
    """Ask the registered sources (``czregistry.sources``) which one packs ``src.model`` and load it."""
    _, cls = select_source(src.model)
    loaded = cls().load(src.model, options)
    if src.spec_path is not None:
        loaded.description = f"{src.spec_style}-style spec {src.spec_path} ({loaded.description})"
    return loaded
