"""Loading what ``czregistry.pack`` packs: Keras models, SavedModel folders, ``.keras`` and ONNX files,
and conversion specs (``load_spec``, re-exported by ``czregistry.pack``).

TensorFlow and Keras are imported inside functions; the Keras-side work lives in the
``czregistry-tensorflow`` plugin, reached through ``_tf_plugin``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PackError, UsageError, first_line
from ..report import Severity
from .metadata import _CZANN_KEYS, _LEGACY_KEYS

__all__ = ["PackWarning", "load_spec"]


class PackWarning(UserWarning):
    """Something about a pack that the user should know but that does not stop it."""


@dataclass
class _Source:
    """A loaded source: a Keras model (any Keras-side input) or ONNX bytes."""

    description: str
    keras_model: Any = None
    onnx_bytes: bytes | None = None
    savedmodel_dir: Path | None = None
    spec_metadata: dict[str, Any] = field(default_factory=dict)
    spec_style: str | None = None
    license_file: Path | None = None


def _tf_plugin(module: str) -> Any:
    import importlib

    from .._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    try:
        return importlib.import_module(f"czregistry_tensorflow.{module}")
    except ImportError as exc:
        raise PackError(f"packing Keras/TensorFlow models needs the czregistry-tensorflow plugin ({exc})",
                        hint="pip install czregistry-tensorflow (plugins/czregistry-tensorflow)") from exc


def _is_keras_model(obj: Any) -> bool:
    return hasattr(obj, "input_shape") and hasattr(obj, "predict") and hasattr(obj, "layers")


def _load_savedmodel(folder: Path) -> Any:
    """Wrap a SavedModel folder (Keras 3 export or plain TF2) as a one-input Keras model."""
    from .._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # absl/cudart start-up lines must not reach the terminal
    import keras
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:
        raise UsageError(f"{folder} is not a loadable TensorFlow SavedModel: {first_line(exc)}") from exc
    sigs = dict(loaded.signatures)
    endpoint = next((k for k in ("serving_default", "serve") if k in sigs), next(iter(sigs), None))
    if endpoint is None:
        raise UsageError(f"SavedModel {folder} has no serving signature",
                         hint="export it with model.export(...) or tf.saved_model.save(..., signatures=...)")
    sig = sigs[endpoint]
    inputs = sig.structured_input_signature[1]
    outputs = sig.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise PackError(f"SavedModel signature '{endpoint}' has {len(inputs)} inputs and {len(outputs)} "
                        "outputs; a package needs exactly one of each")
    in_spec = next(iter(inputs.values()))
    layer = keras.layers.TFSMLayer(str(folder), call_endpoint=endpoint)
    inp = keras.Input(tuple(in_spec.shape[1:]), name="input", dtype="float32")
    out = layer(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return keras.Model(inp, out, name=folder.name.replace(".", "_") or "savedmodel")


def _load_keras_file(path: Path) -> Any:
    from .._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # absl/cudart start-up lines must not reach the terminal
    import keras

    from ..selection import available_layers

    available_layers()  # import plugins so their custom layers are registered before deserialising
    try:
        return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise UsageError(f"cannot load Keras model {path}: {first_line(exc)}",
                         hint="custom layers must be importable (registered with keras.saving)") from exc


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


def _refuse_external_data(path: Path, data: bytes) -> None:
    """An ONNX file whose weights live in separate files (``save_as_external_data``, the rule above 2 GB):
    a package embeds one self-contained model, and ONNX Runtime's own complaint ("Cannot parse data from
    external tensors") does not say what to do. Say which file, and how to merge."""
    from .onnxgraph import check_external_data

    try:
        check_external_data(data)
    except Exception as exc:  # BackendError: external data found, or not ONNX at all (ORT reports that)
        where = re.search(r"in '([^']*)'$", getattr(exc, "message", ""))
        if where is None:
            return
        raise PackError(f"{path.name} keeps its weights outside the file (in {where.group(1)}); a package "
                        "embeds one self-contained model",
                        hint=f"merge them first: python -c \"import onnx; onnx.save(onnx.load('{path}'), "
                             f"'{path.with_name(path.stem + '-merged.onnx')}')\" (models under 2 GB)") from None


def _load_source(source: Any, depth: int = 0) -> _Source:
    if _is_keras_model(source):
        return _Source(description=f"Keras model '{source.name}'", keras_model=source)
    if isinstance(source, bytes):
        return _Source(description="ONNX bytes", onnx_bytes=source)
    if not isinstance(source, str | os.PathLike):
        raise UsageError(f"cannot pack a {type(source).__name__}",
                         hint="pass a keras.Model, a SavedModel folder, a .keras, .onnx or spec .json file")
    path = Path(source)
    if not path.exists():
        raise UsageError(f"no such model: {path}", hint="check the path")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UsageError(f"{path} is a folder without saved_model.pb, so it is not a SavedModel")
        return _Source(description=f"SavedModel {path}", keras_model=_load_savedmodel(path), savedmodel_dir=path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return _Source(description=f"Keras file {path}", keras_model=_load_keras_file(path))
    if suffix == ".onnx":
        data = path.read_bytes()
        _refuse_external_data(path, data)
        return _Source(description=f"ONNX file {path}", onnx_bytes=data)
    if suffix == ".json":
        if depth:
            raise UsageError(f"conversion spec {path} points at another spec; ModelPath must be a model")
        meta, style, model_path, license_path = load_spec(path)
        inner = _load_source(model_path, depth + 1)
        inner.spec_metadata, inner.spec_style, inner.license_file = meta, style, license_path
        inner.description = f"{style}-style spec {path} ({inner.description})"
        return inner
    if suffix in (".h5", ".hdf5"):
        raise UsageError(f"{path}: legacy HDF5 Keras files are not supported",
                         hint="load it in Keras and save it as .keras, or pass the model object to pack()")
    raise UsageError(f"{path}: unknown model file type '{suffix}'",
                     hint="pass a SavedModel folder, a .keras, .onnx or conversion-spec .json file")
