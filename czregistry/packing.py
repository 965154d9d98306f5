"""Packing: turn a trained model (Keras, SavedModel, ``.keras``, ONNX, or a conversion spec) into a package.

Why it is built this way:

- **Every pack proves itself before it is kept.** The package is written to a temp file beside the output,
  its model is loaded by the same backend a host would use and compared with the source model on random
  inputs (``parity_tolerance``, default 1e-4), and the written file is run through ``czregistry.validate``.
  Only then is it renamed into place; on any failure nothing is left at the output path. ``force=True``
  keeps an invalid package, but always with its report written beside it (``<output>.report.json``) and
  ``PackResult.kept_invalid`` set, never silently.
- **Reproducible.** The same inputs give a byte-identical archive: ``write_package`` fixes member order and
  timestamps; ONNX graphs from tf2onnx carry process-global name counters, so they are canonicalised
  (``canonicalize_onnx``); a missing ``Id`` is derived from the content instead of drawn at random.
  TensorFlow SavedModels embed per-export function ids and a fingerprint, so SavedModel packages are
  *not* byte-reproducible (docs/packing.md); ONNX packages are.
- **Heavy libraries stay out of import time.** TensorFlow, Keras, tf2onnx and ONNX Runtime are imported
  inside functions; the Keras-side conversion lives in the ``czregistry-tensorflow`` plugin
  (``compose.prepend_and_append``, ``export.to_onnx``, ``export.export_savedmodel_zip``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from xml.etree import ElementTree

import numpy as np

from .backends import Session, Signature, TensorInfo
from .errors import BackendError, PackError, UsageError
from .layers import LayerSpec
from .metadata import PIXEL_TYPE_CHANNELS, SEGMENTATION_TYPES, ModelInfo
from .report import Finding, Report, Severity

if TYPE_CHECKING:
    from .checks import ValidateOptions

__all__ = [
    "CZANN_FORMAT_VERSION",
    "DEFAULT_OPSET",
    "LEGACY_OPSET",
    "LEGACY_XML_VERSION",
    "PackResult",
    "PackWarning",
    "canonicalize_onnx",
    "legacy_xml",
    "load_spec",
    "pack",
]

CZANN_FORMAT_VERSION = "2.1.0"
LEGACY_XML_VERSION = "3.1.0"
#: Recent ZEN / arivis releases run opset 18; legacy CZMODEL hosts stop at opset 12.
DEFAULT_OPSET = 18
LEGACY_OPSET = 12
#: Largest absolute difference allowed between the source model and the packaged model.
PARITY_TOLERANCE = 1e-4
#: Namespace for content-derived model ids (a fixed, arbitrary UUID).
_ID_NAMESPACE = uuid.UUID("6f1d3c0e-9a57-4b8e-8d52-2c0b7f4e9a11")

Target = Literal["czann", "czmodel"]
ModelFormatChoice = Literal["onnx", "savedmodel"]
LayerArg = str | tuple[str | LayerSpec, dict[str, Any]]

_CZANN_KEYS = ("FormatVersion", "Id", "Type", "InputShape", "OutputShape", "MinOverlap", "Classes", "ModelName",
               "Scaling")
_LEGACY_KEYS = ("BorderSize", "ColorHandling", "PixelType", "Postprocessing")
_COLOR_HANDLING = ("ConvertToMonochrome", "SplitRgb")
#: Distinct, stable colours for legacy TrainingClasses (R, G, B).
_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


class PackWarning(UserWarning):
    """Something about a pack that the user should know but that does not stop it."""


@dataclass
class PackResult:
    """What a pack produced and how it was verified."""

    path: Path
    kind: Target
    model_format: str
    metadata: dict[str, Any]
    sha256: str
    report: Report
    #: Largest |packaged - source| over the random parity inputs (``None`` if parity could not run).
    parity_max_abs_diff: float | None
    parity_inputs: list[list[int]] = field(default_factory=list)
    opset: int | None = None
    warnings: list[str] = field(default_factory=list)
    #: What packing measured or decided that is worth showing (e.g. the invariance check behind a tile reset).
    notes: list[str] = field(default_factory=list)
    kept_invalid: bool = False
    report_path: Path | None = None

    @property
    def valid(self) -> bool:
        return self.report.valid

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "kind": self.kind, "model_format": self.model_format, "opset": self.opset,
            "sha256": self.sha256, "metadata": self.metadata, "valid": self.valid,
            "kept_invalid": self.kept_invalid, "report_path": str(self.report_path) if self.report_path else None,
            "parity": {"max_abs_diff": self.parity_max_abs_diff, "tolerance": PARITY_TOLERANCE,
                       "inputs": self.parity_inputs},
            "warnings": self.warnings, "notes": self.notes, "report": self.report.to_dict(),
        }


# --- sources -------------------------------------------------------------------------------------------


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

    from ._quiet import import_tensorflow_quietly

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
    import keras
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:
        raise UsageError(f"{folder} is not a loadable TensorFlow SavedModel: {str(exc).splitlines()[0]}") from exc
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
    import keras

    from .layers import available_layers

    available_layers()  # import plugins so their custom layers are registered before deserialising
    try:
        return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise UsageError(f"cannot load Keras model {path}: {str(exc).splitlines()[0]}",
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
    from .schemas import validate_against

    findings = validate_against(f"conversion-spec-{style}", spec, path.name, check="spec.schema")
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise UsageError(f"conversion spec {path} ({style} style): {errors[0].message}",
                         hint=errors[0].hint or "see docs/packing.md for both spec styles")
    for f in findings:
        warnings.warn(f"conversion spec {path}: {f.message}", PackWarning, stacklevel=4)


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
        return _Source(description=f"ONNX file {path}", onnx_bytes=path.read_bytes())
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


# --- sessions used for probing and parity ---------------------------------------------------------------


class _KerasSession(Session):
    """A Keras model behind the backend ``Session`` interface, so the invariance probe can run the source."""

    backend = "keras"
    device = "cpu"

    def __init__(self, model: Any) -> None:
        self._model = model
        shape = model.input_shape[0] if isinstance(model.input_shape, list) else model.input_shape
        out = model.output_shape[0] if isinstance(model.output_shape, list) else model.output_shape
        self._signature = Signature((TensorInfo("input", tuple(shape), "float32"),),
                                    (TensorInfo("output", tuple(out), "float32"),))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self._model(np.ascontiguousarray(batch, dtype=np.float32), training=False)
        except Exception as exc:
            raise BackendError(f"Keras model failed on input of shape {tuple(batch.shape)}: "
                               f"{str(exc).splitlines()[0]}") from exc
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return np.asarray(out)


class _OrtSession(Session):
    """ONNX bytes run by ONNX Runtime on the CPU (reference side of parity for ONNX sources)."""

    backend = "onnxruntime"
    device = "cpu"

    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # probing feeds sizes the model may refuse: those are measurements
        try:
            self._session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PackError(f"ONNX Runtime cannot load the source model: {str(exc).splitlines()[0]}") from exc
        ins, outs = self._session.get_inputs(), self._session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise PackError(f"the ONNX model has {len(ins)} inputs and {len(outs)} outputs; "
                            "a package needs exactly one of each")

        def dims(shape: list[Any]) -> tuple[int | None, ...]:
            return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)

        self._input = ins[0].name
        self._signature = Signature((TensorInfo(ins[0].name, dims(ins[0].shape), "float32"),),
                                    (TensorInfo(outs[0].name, dims(outs[0].shape), "float32"),))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self._session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})[0])
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on input of shape {tuple(batch.shape)}: "
                               f"{str(exc).splitlines()[0]}") from exc


class _ChainSession(Session):
    """Keras pre layers, then an ONNX source, then Keras post layers: the reference for an ONNX source
    packed with layers (the layers are computed eagerly, independently of their ONNX conversion)."""

    backend = "keras+onnxruntime"
    device = "cpu"

    def __init__(self, pre: Any, inner: Session, post: Any) -> None:
        self.pre, self.inner, self.post = pre, inner, post
        out = inner.signature.outputs[0]
        if post is not None:
            out = TensorInfo(out.name, tuple(post.output_shape), "float32")
        self._signature = Signature(inner.signature.inputs, (out,))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(self.pre(batch, training=False)) if self.pre is not None else batch
        y = self.inner.predict(x)
        return np.asarray(self.post(y, training=False)) if self.post is not None else y


def _layer_stack(calls: Sequence[tuple[LayerSpec, dict[str, Any]]], shape: Sequence[int | None]) -> Any:
    """A Keras model of just ``calls`` on tensors of ``shape`` (batch first), or None when empty."""
    if not calls:
        return None
    import keras

    compose = _tf_plugin("compose")
    inp = keras.Input(tuple(shape[1:]), name="input", dtype="float32")
    x = inp
    for spec, kwargs in calls:
        x = compose.build_layer(spec, kwargs)(x)
    return keras.Model(inp, x, name="czreg_layers")


def _merge_onnx_layers(data: bytes, pre: Any, post: Any) -> bytes:
    """Convert the layer stacks with tf2onnx at the source's opset and splice them around the source graph."""
    import onnx
    from onnx import compose as onnx_compose

    export = _tf_plugin("export")
    model = onnx.load_model_from_string(data)
    opset = _onnx_opset(data) or DEFAULT_OPSET

    def io(m: Any) -> tuple[str, str]:
        inits = {t.name for t in m.graph.initializer}
        return next(i.name for i in m.graph.input if i.name not in inits), m.graph.output[0].name

    def stack(keras_model: Any) -> Any:
        part = onnx.load_model_from_string(canonicalize_onnx(export.to_onnx(keras_model, opset)))
        part.ir_version = model.ir_version
        have = {o.domain for o in model.opset_import}
        for o in part.opset_import:  # tf2onnx may import extra domains; the merged model needs them too
            if o.domain not in have:
                model.opset_import.append(o)
        return part

    try:
        if pre is not None:
            part = stack(pre)
            model = onnx_compose.merge_models(part, model, io_map=[(io(part)[1], io(model)[0])],
                                              prefix1="pre_", prefix2="")
        if post is not None:
            part = stack(post)
            model = onnx_compose.merge_models(model, part, io_map=[(io(model)[1], io(part)[0])],
                                              prefix1="", prefix2="post_")
        onnx.checker.check_model(model)
    except PackError:
        raise
    except Exception as exc:
        raise PackError(f"cannot merge the layers into the ONNX model: {str(exc).splitlines()[0]}",
                        hint="pack from the Keras model (or SavedModel) instead") from exc
    return bytes(model.SerializeToString())


# --- ONNX helpers --------------------------------------------------------------------------------------


def canonicalize_onnx(data: bytes) -> bytes:
    """Rename every node, tensor and symbolic dimension of an ONNX model deterministically.

    tf2onnx names nodes and dims from process-global counters (``Unsqueeze__230``, ``unk__237``) and Keras
    names layers by how many were built before (``conv2d_4_1``), so converting the same model twice gives
    different bytes. Names carry no meaning for hosts; renaming them in graph order makes the bytes depend
    only on the graph. The single input keeps its name; outputs become ``output`` (``output_i``).
    """
    import onnx

    model = onnx.load_model_from_string(data)
    graph = model.graph
    names: dict[str, str] = {}
    counter = {"t": 0, "w": 0}  # initializers ("w") get their own numbering, in order of first use
    initializer_names = {t.name for t in graph.initializer}

    def rename(old: str) -> str:
        if not old:
            return old
        if old not in names:
            prefix = "w" if old in initializer_names else "t"
            names[old] = f"{prefix}{counter[prefix]}"
            counter[prefix] += 1
        return names[old]

    for inp in graph.input:
        if inp.name not in initializer_names:
            names[inp.name] = inp.name
    for i, out in enumerate(graph.output):
        names[out.name] = "output" if len(graph.output) == 1 else f"output_{i}"

    def walk(g: Any, prefix: str) -> None:
        for i, node in enumerate(g.node):
            node.name = f"{prefix}n{i}_{node.op_type}"
            for j, x in enumerate(node.input):
                node.input[j] = rename(x)
            for j, x in enumerate(node.output):
                node.output[j] = rename(x)
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g, f"{node.name}/")
                for sub in attr.graphs:
                    walk(sub, f"{node.name}/")
        for coll in (g.input, g.output, g.value_info):
            for vi in coll:
                vi.name = rename(vi.name)
        for t in g.initializer:
            t.name = rename(t.name)
        for t in g.sparse_initializer:
            t.values.name = rename(t.values.name)
        ordered = sorted(g.initializer, key=lambda t: (t.name[:1], int(t.name[1:]) if t.name[1:].isdigit() else -1))
        copies = [type(t)() for t in ordered]
        for c, t in zip(copies, ordered):
            c.CopyFrom(t)
        del g.initializer[:]
        g.initializer.extend(copies)
        ordered_vi = sorted(g.value_info, key=lambda v: v.name)
        vi_copies = [type(v)() for v in ordered_vi]
        for c, v in zip(vi_copies, ordered_vi):
            c.CopyFrom(v)
        del g.value_info[:]
        g.value_info.extend(vi_copies)

    _structural_sort(graph)
    walk(graph, "")
    dims: dict[str, str] = {}
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            if vi.type.HasField("tensor_type"):
                for d in vi.type.tensor_type.shape.dim:
                    if d.HasField("dim_param"):
                        d.dim_param = dims.setdefault(d.dim_param, "batch" if not dims else f"d{len(dims)}")
    graph.name = "czregistry"
    graph.doc_string = ""
    model.doc_string = ""
    return bytes(model.SerializeToString(deterministic=True))


def _structural_sort(graph: Any) -> None:
    """Re-order nodes topologically, breaking ties by a content hash instead of by name.

    tf2onnx's topological order depends on its generated names, so two conversions of one model can list
    independent nodes in different orders. Each node gets a Merkle hash of its op, attributes and the hashes
    of what feeds it (initializers by content, graph inputs by name); Kahn's algorithm then always takes the
    ready node with the smallest hash.
    """
    import heapq

    nodes = list(graph.node)
    init_hash = {}
    for t in graph.initializer:
        body = type(t)()
        body.CopyFrom(t)
        body.name = ""
        init_hash[t.name] = hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()
    producer: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(nodes):
        for j, out in enumerate(node.output):
            producer[out] = (i, j)
    hashes: list[str] = [""] * len(nodes)
    for i, node in enumerate(nodes):  # ONNX requires nodes in a topological order already
        h = hashlib.sha256(f"{node.domain}:{node.op_type}:{len(node.output)}".encode())
        for attr in node.attribute:
            h.update(attr.SerializeToString(deterministic=True))
        for name in node.input:
            if name in producer:
                pi, pj = producer[name]
                h.update(f"n{hashes[pi]}:{pj}".encode())
            elif name in init_hash:
                h.update(f"w{init_hash[name]}".encode())
            else:
                h.update(f"i{name}".encode())
        hashes[i] = h.hexdigest()
    consumers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    missing = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer[n][0] for n in node.input if n in producer}
        missing[i] = len(deps)
        for d in deps:
            consumers[d].append(i)
    ready = [(hashes[i], i) for i in range(len(nodes)) if missing[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, (hashes[c], c))
    if len(order) != len(nodes):  # a cycle or an odd graph: keep the converter's order
        return
    copies = [type(nodes[i])() for i in order]
    for c, i in zip(copies, order):
        c.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)


def _onnx_opset(data: bytes) -> int | None:
    import onnx

    model = onnx.load_model_from_string(data)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _convert_onnx_opset(data: bytes, opset: int) -> bytes:
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(onnx.load_model_from_string(data), opset)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise PackError(f"cannot convert the ONNX model to opset {opset}: {str(exc).splitlines()[0]}",
                        hint="re-export the model at that opset, or choose another --opset") from exc
    return bytes(converted.SerializeToString())


def _fix_onnx_spatial(data: bytes, spatial: Sequence[int]) -> bytes:
    """Fix the input's spatial dims (the batch stays free) and re-infer the output shape."""
    import onnx

    model = onnx.load_model_from_string(data)
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(spatial) + 2:
        raise UsageError(f"the model input has rank {len(dims)}; a tile of {len(spatial)} axes needs rank "
                         f"{len(spatial) + 2}")
    for d, size in zip(list(dims)[1:-1], spatial):
        d.Clear()
        d.dim_value = int(size)
    del model.graph.value_info[:]
    for out in model.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    with contextlib.suppress(Exception):  # shape inference is a nicety; the parity run checks the real output
        model = onnx.shape_inference.infer_shapes(model)
    return bytes(model.SerializeToString())


# --- metadata ------------------------------------------------------------------------------------------


def _layer_calls(items: Iterable[LayerArg], kind: str) -> list[tuple[LayerSpec, dict[str, Any]]]:
    from .layers import available_layers, parse_layer_arg

    specs = {name: spec for name, (_, spec) in available_layers().items()}
    out: list[tuple[LayerSpec, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, str):
            spec, kwargs = parse_layer_arg(item, specs)
        elif isinstance(item, tuple) and len(item) == 2:
            name, kwargs = item
            if isinstance(name, LayerSpec):
                spec = name
            else:
                spec, defaults = parse_layer_arg(str(name), specs)
                kwargs = {**defaults, **kwargs}
        else:
            raise UsageError(f"bad {kind}processing layer {item!r}",
                             hint="use 'name:key=value' or (name, {params})")
        if spec.kind != kind:
            where = "--pre / preprocessing" if kind == "pre" else "--post / postprocessing"
            raise UsageError(f"layer '{spec.name}' is a {spec.kind}-processing layer and cannot be used in {where}")
        out.append((spec, dict(kwargs)))
    return out


def _shape_of(model: Any) -> tuple[int | None, ...]:
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise PackError(f"the model has {len(shape)} inputs; a package needs exactly one")
        shape = shape[0]
    return tuple(shape)


def _content_id(model_bytes: bytes, metadata: dict[str, Any]) -> str:
    """A UUID derived from the model and metadata, so repacking the same inputs gives the same archive."""
    h = hashlib.sha256(model_bytes)
    h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    return str(uuid.uuid5(_ID_NAMESPACE, h.hexdigest()))


def _default_pixel_types(channels: int) -> list[str]:
    defaults = {1: ["Gray8"], 3: ["Bgr24"], 4: ["Bgra32"]}
    if channels not in defaults:
        raise UsageError(f"the model takes {channels} input channels; say which pixel types feed them",
                         hint="pass PixelType (--pixel-type), e.g. Gray8 and Bgr24 for 4 channels")
    return defaults[channels]


def legacy_xml(meta: dict[str, Any], channels: int, output_channels: int) -> tuple[bytes, list[str]]:
    """Build CZMODEL 3.1.0 XML from metadata; returns the XML bytes and warnings."""
    notes: list[str] = []
    model_id = str(meta["Id"])
    pixel_types = meta.get("PixelType") or _default_pixel_types(channels)
    if isinstance(pixel_types, str):
        pixel_types = [pixel_types]
    unknown = [p for p in pixel_types if p not in PIXEL_TYPE_CHANNELS]
    if unknown:
        raise UsageError(f"unknown pixel type(s) {', '.join(map(str, unknown))}",
                         hint=f"use {', '.join(PIXEL_TYPE_CHANNELS)}")
    total = sum(PIXEL_TYPE_CHANNELS[p] for p in pixel_types)
    if total != channels:
        raise UsageError(f"pixel types {pixel_types} give {total} channels but the model takes {channels}")
    color = meta.get("ColorHandling") or ("ConvertToMonochrome" if channels == 1 else "SplitRgb")
    if color not in _COLOR_HANDLING:
        raise UsageError(f"ColorHandling '{color}' is not one of {', '.join(_COLOR_HANDLING)}")
    classes = meta.get("Classes")
    if not classes:
        classes = [f"Class {i + 1}" for i in range(output_channels)]
        notes.append(f"no class names given; legacy TrainingClasses named {', '.join(classes)}")
    if len(classes) != output_channels:
        raise UsageError(f"{len(classes)} classes given but the model outputs {output_channels} channels")
    border = meta.get("BorderSize")
    if border is None:
        overlap = meta.get("MinOverlap")
        border = int(max(overlap)) // 2 if overlap else 0
    root = ElementTree.Element("Model", {"Version": LEGACY_XML_VERSION})
    for tag, text in (("Id", model_id), ("ModelName", str(meta.get("ModelName") or "DNN model")),
                      ("Status", "Trained"), ("FeatureExtractor", "DeepNeuralNetwork"),
                      ("Postprocessing", str(meta.get("Postprocessing") or "")), ("ColorHandling", color)):
        ElementTree.SubElement(root, tag).text = text
    channels_el = ElementTree.SubElement(root, "Channels")
    for p in pixel_types:
        ElementTree.SubElement(channels_el, "Item", {"PixelType": p})
    classes_el = ElementTree.SubElement(root, "TrainingClasses")
    for i, name in enumerate(classes):
        r, g, b = _PALETTE[i % len(_PALETTE)]
        ElementTree.SubElement(classes_el, "Item", {"Name": str(name), "LabelValue": str(i + 1),
                                                    "colR": str(r), "colG": str(g), "colB": str(b)})
    ElementTree.SubElement(root, "BorderSize").text = str(int(border))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n", notes


def _czann_metadata(meta: dict[str, Any], style: str | None, input_shape: list[int],
                    output_shape: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"FormatVersion": CZANN_FORMAT_VERSION}
    mtype = meta.get("Type")
    if mtype is None and style == "legacy":
        n = len(meta.get("Classes") or []) or output_shape[-1]
        mtype = "MultiClassSemanticSegmentation" if n > 2 else "SingleClassSemanticSegmentation"
    if mtype is None:
        raise UsageError("metadata needs a model Type", hint="pass --type, e.g. SingleClassSemanticSegmentation")
    out["Id"] = meta.get("Id")
    out["Type"] = mtype
    out["InputShape"] = input_shape
    out["OutputShape"] = output_shape
    overlap = meta.get("MinOverlap")
    if overlap is None and style == "legacy" and meta.get("BorderSize") is not None:
        overlap = [2 * int(meta["BorderSize"])] * (len(input_shape) - 1)
    if isinstance(overlap, int):
        overlap = [overlap]
    if isinstance(overlap, list | tuple) and len(overlap) == 1:
        overlap = list(overlap) * (len(input_shape) - 1)
    if overlap is not None:
        out["MinOverlap"] = [int(v) for v in overlap]
    for key in ("Classes", "ModelName", "Scaling"):
        if meta.get(key) is not None:
            out[key] = list(meta[key]) if isinstance(meta[key], list | tuple) else meta[key]
    if out.get("Classes") is not None and mtype in SEGMENTATION_TYPES and len(out["Classes"]) != output_shape[-1]:
        raise UsageError(f"{len(out['Classes'])} classes given but the model outputs {output_shape[-1]} channels")
    return out


# --- the spatial-size reset -------------------------------------------------------------------------------


def _check_tile(session: Session, input_shape: tuple[int | None, ...], spatial: tuple[int, ...],
                mtype: str | None) -> list[str]:
    """Refuse a tile size the model cannot take, quoting the invariance check.

    A reset is sound only for spatially invariant (fully convolutional) models, and only at sizes on the
    model's step (multiples of 2^poolings). The measurement is ``czregistry.checks.probing``'s.
    """
    fixed = tuple(input_shape[1:-1])
    if fixed == spatial:
        return []
    try:
        from .checks.probing import measure_invariance
    except ImportError as exc:
        raise PackError("the invariance check (czregistry.checks.probing) is not available, so a tile-size "
                        "reset cannot be verified", hint="pack without --tile / spatial_dims") from exc
    channels = input_shape[-1]
    if channels is None:
        raise PackError("the model input's channel count is undefined")
    own = tuple(int(d) for d in fixed if d is not None)
    # Probe at the model's own size, or at a size on any plausible pooling grid (a multiple of 64), never
    # at the requested size itself: an off-step request would only make the probe fail without measuring.
    probe_tile = own if len(own) == len(fixed) else tuple(min(256, max(64, -(-s // 64) * 64)) for s in spatial)
    probe_shape = (*probe_tile, int(channels))
    info = ModelInfo("czann", mtype, probe_shape, None, None, None, None, int(channels), None, None, None,
                     CZANN_FORMAT_VERSION)
    from .checks.probing import ProbeRejected

    try:
        result = measure_invariance(session, info, max_probe_size=max(probe_tile), time_budget=30.0)
    except ProbeRejected as exc:
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the invariance check could not run the model "
                        f"at {_fmt(probe_tile)} ({exc})", hint="pack it at its own tile size") from exc
    return _interpret_invariance(result, spatial)


def _interpret_invariance(result: Any, spatial: tuple[int, ...]) -> list[str]:
    """Turn an ``InvarianceResult`` into a refusal (``PackError`` quoting the measurement) or notes."""
    step = tuple(result.step)
    measured = (f"invariance check: accepts other sizes={result.accepts_other_sizes}, step={_fmt(step)}, "
                f"halo={_fmt(result.halo)}, global context={result.global_context}, equivariance error="
                f"{_num(result.equivariance_error)}")
    if not result.accepts_other_sizes:
        only = _fmt(result.fixed_size) if result.fixed_size else "its own size"
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the model runs only at {only} ({measured})",
                        hint="pack it at its own tile size")
    if result.global_context:
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the model is not spatially invariant, its "
                        f"output depends on the whole tile ({measured})",
                        hint="models with global context (global pooling, dense heads) must be packed at the "
                        "size they were trained on")
    if result.output_follows_input is False:
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the output size does not follow the input "
                        f"size ({measured})", hint="pack it at its own tile size")
    off = [s for s, k in zip(spatial, step) if k and s % int(k)]
    if off:
        nearest = tuple(max(int(k), s // int(k) * int(k)) if k else s for s, k in zip(spatial, step))
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the model needs sizes that are multiples "
                        f"of {_fmt(step)} ({measured})", hint=f"use a size on the step, e.g. {_fmt(nearest)}")
    return [f"tile reset to {_fmt(spatial)} ({measured})"]


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _fmt(dims: Iterable[Any]) -> str:
    return "x".join(str(d) for d in dims)


# --- pack ----------------------------------------------------------------------------------------------


def _parity_inputs(shape: tuple[int, ...], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1, *shape), dtype=np.float32) for _ in range(n)]


def _resolve_tile(base_shape: tuple[int | None, ...], spatial: tuple[int, ...] | None, declared: Any,
                  kind: str) -> tuple[int, ...] | None:
    """The tile to pack at: the requested one (checked against the model's rank), else for legacy targets
    (which need fixed dims) the declared ``InputShape``; ``None`` keeps the model's own input dims."""
    ndim = len(base_shape) - 2
    if spatial is not None and len(spatial) != ndim:
        raise UsageError(f"tile {_fmt(spatial)} has {len(spatial)} axes; the model has {ndim} spatial axes")
    if spatial is None and kind == "czmodel" and any(d is None for d in base_shape[1:-1]):
        if isinstance(declared, list) and len(declared) == ndim + 1:
            return tuple(int(d) for d in declared[:-1])
        raise UsageError("legacy .czmodel packages need fully defined spatial input dims; this model "
                         f"takes {_fmt(base_shape[1:-1])}", hint="pass --tile H W (spatial_dims=...)")
    return spatial


def pack(
    source: Any,
    metadata: dict[str, Any] | None,
    output: Path | str,
    *,
    preprocessing: Sequence[LayerArg] = (),
    postprocessing: Sequence[LayerArg] = (),
    spatial_dims: Sequence[int] | None = None,
    target: Target | None = None,
    model_format: ModelFormatChoice = "onnx",
    opset: int | None = None,
    license_file: Path | str | None = None,
    force: bool = False,
    validate_options: ValidateOptions | None = None,
    parity_samples: int = 2,
    seed: int = 0,
) -> PackResult:
    """Pack ``source`` into a verified ``.czann`` (or legacy ``.czmodel``) at ``output``.

    ``source``: an in-memory ``keras.Model``, a SavedModel folder, a ``.keras`` file, an ONNX file (or bytes),
    or a conversion-spec JSON (either style; its paths are relative to the JSON). ``metadata`` holds CZANN
    fields (``Type``, ``Classes``, ``MinOverlap``, ``ModelName``, ``Scaling``, ``Id``, ``InputShape``) and, for
    legacy output, ``PixelType``, ``ColorHandling``, ``BorderSize``; it overrides what a spec says.
    ``preprocessing`` / ``postprocessing``: layer names with parameters (``"normalize:mean=0.5,std=0.2"``, or
    ``(name, {params})``) from any installed plugin. ``spatial_dims`` resets the input tile size; it is refused
    when the model is not spatially invariant or the size is off its step. ``target`` defaults from the output
    suffix (``.czmodel`` / ``.czseg`` -> legacy). Raises ``PackError`` and leaves nothing at ``output`` when the
    package fails its own verification, unless ``force`` (then the report is written beside it).
    """
    output = Path(output)
    kind: Target = target or ("czmodel" if output.suffix.lower() in (".czmodel", ".czseg") else "czann")
    if kind not in ("czann", "czmodel"):
        raise UsageError(f"unknown target '{kind}' (use czann or czmodel)")
    if model_format not in ("onnx", "savedmodel"):
        raise UsageError(f"unknown model format '{model_format}' (use onnx or savedmodel)")
    if opset is not None and kind == "czmodel" and opset > LEGACY_OPSET:
        raise UsageError(f"legacy .czmodel packages hold ONNX up to opset {LEGACY_OPSET}, not {opset}")
    use_opset = opset or (LEGACY_OPSET if kind == "czmodel" else DEFAULT_OPSET)
    if output.exists() and output.is_dir():
        raise UsageError(f"output {output} is a folder", hint="give a file name ending in .czann or .czmodel")
    notes: list[str] = []
    infos: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        warnings.warn(msg, PackWarning, stacklevel=3)

    src = _load_source(source)
    meta: dict[str, Any] = {**src.spec_metadata, **{k: v for k, v in (metadata or {}).items() if v is not None}}
    meta.pop("_TestImageFile", None)
    allowed = set(_CZANN_KEYS) | (set(_LEGACY_KEYS) if kind == "czmodel" or src.spec_style == "legacy" else set())
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise UsageError(f"unknown metadata field(s) {', '.join(unknown)}",
                         hint=f"allowed: {', '.join(sorted(allowed))}")
    if meta.get("Id") is not None:
        from .package import is_uuid

        if not is_uuid(meta["Id"]):
            raise UsageError(f"metadata Id '{meta['Id']}' is not a UUID")
    lic = Path(license_file) if license_file is not None else src.license_file
    if lic is not None and not lic.is_file():
        raise UsageError(f"no such license file: {lic}")
    pre = _layer_calls(preprocessing, "pre")
    post = _layer_calls(postprocessing, "post")
    for spec, _ in (*pre, *post):
        if not getattr(spec, "local", True):
            note(f"layer '{spec.name}' uses whole-tile statistics: tiled predictions will differ from "
                 "whole-image ones near the seams")
    spatial: tuple[int, ...] | None = None
    if spatial_dims is not None:
        spatial = tuple(int(s) for s in spatial_dims)
        if not spatial or any(s < 1 for s in spatial):
            raise UsageError(f"tile size {_fmt(spatial)} must be positive integers")
    declared = meta.get("InputShape")

    # -- the model to convert, and the reference session for parity ------------------------------------
    if src.keras_model is not None:
        base_shape = _shape_of(src.keras_model)
        n_out = len(getattr(src.keras_model, "outputs", None) or [None])
        if n_out != 1:
            raise PackError(f"the model has {n_out} outputs; a package needs exactly one",
                            hint="wrap it in a keras.Model that returns only the output the host should use")
        spatial = _resolve_tile(base_shape, spatial, declared, kind)
        if spatial is not None:
            infos.extend(_check_tile(_KerasSession(src.keras_model), base_shape, spatial, meta.get("Type")))
        model = src.keras_model
        if pre or post or (spatial is not None and spatial != tuple(base_shape[1:-1])):
            compose = _tf_plugin("compose")
            model = compose.prepend_and_append(model, pre, post, spatial_dims=spatial)
        reference: Session = _KerasSession(model)
    else:
        assert src.onnx_bytes is not None
        if model_format == "savedmodel":
            raise UsageError("an ONNX source cannot be packed as a SavedModel", hint="use --model-format onnx")
        reference = _OrtSession(src.onnx_bytes)
        base_shape = reference.signature.inputs[0].shape
        spatial = _resolve_tile(base_shape, spatial, declared, kind)
        if spatial is not None:
            infos.extend(_check_tile(reference, base_shape, spatial, meta.get("Type")))
        model = None
        source_session = reference
        if pre or post:
            # the layers run in Keras here; in the package they are ONNX subgraphs merged around the source
            reference = _ChainSession(_layer_stack(pre, reference.signature.inputs[0].shape),
                                      source_session,
                                      _layer_stack(post, reference.signature.outputs[0].shape))

    in_shape = tuple(reference.signature.inputs[0].shape) if src.keras_model is None else _shape_of(model)
    if spatial is not None:
        tile = spatial
    elif all(d is not None for d in in_shape[1:-1]):
        tile = tuple(int(d) for d in in_shape[1:-1])  # type: ignore[arg-type]
    elif isinstance(declared, list) and len(declared) == len(in_shape) - 1:
        tile = tuple(int(d) for d in declared[:-1])
    else:
        raise UsageError(f"the model takes any tile size ({_fmt(in_shape[1:-1])}); say which one the host uses",
                         hint="pass --tile H W (spatial_dims=...) or InputShape in the metadata")
    channels = in_shape[-1]
    if channels is None:
        raise PackError("the model input's channel count is undefined; packages need a fixed channel count")
    if isinstance(declared, list) and (list(declared[:-1]) != list(tile) or declared[-1] != channels):
        raise UsageError(f"InputShape {declared} disagrees with the model input {[*tile, channels]}",
                         hint="drop InputShape (it is derived) or fix it")

    # -- convert ---------------------------------------------------------------------------------------
    fmt = model_format
    used_opset: int | None = None
    model_bytes: bytes
    if src.onnx_bytes is not None:
        data = src.onnx_bytes
        current = _onnx_opset(data)
        if current is not None and ((opset is not None and current != opset)
                                    or (kind == "czmodel" and current > LEGACY_OPSET)):
            data = _convert_onnx_opset(data, use_opset)
        if pre or post:
            assert isinstance(reference, _ChainSession)
            data = _merge_onnx_layers(data, reference.pre, reference.post)
        if spatial is not None:
            data = _fix_onnx_spatial(data, spatial)
        model_bytes = canonicalize_onnx(data)
        used_opset = _onnx_opset(model_bytes)
    else:
        export = _tf_plugin("export")
        if fmt == "onnx":
            try:
                model_bytes = canonicalize_onnx(export.to_onnx(model, use_opset))
                used_opset = use_opset
            except PackError as exc:
                note(f"ONNX conversion failed ({exc.message}); packing a zipped SavedModel instead")
                fmt = "savedmodel"
        if fmt == "savedmodel":
            if src.savedmodel_dir is not None and model is src.keras_model:
                from .package import zip_directory

                zipped = zip_directory(src.savedmodel_dir)
                assert isinstance(zipped, bytes)
                model_bytes = zipped
            else:
                model_bytes = export.export_savedmodel_zip(model)
            note("SavedModel packages are not byte-reproducible (TensorFlow embeds per-export ids)")

    # -- run the reference once to learn the output shape ----------------------------------------------
    inputs = _parity_inputs((*tile, int(channels)), parity_samples, seed)
    expected = [reference.predict(x) for x in inputs]
    out_shape = [int(d) for d in expected[0].shape[1:]]

    # -- metadata --------------------------------------------------------------------------------------
    input_shape = [*map(int, tile), int(channels)]
    if kind == "czann":
        final_meta = _czann_metadata(meta, src.spec_style, input_shape, out_shape)
        if final_meta["Id"] is None:
            final_meta["Id"] = _content_id(model_bytes, final_meta)
        meta_arg: dict[str, Any] | bytes = final_meta
    else:
        final_meta = dict(meta)
        final_meta.setdefault("Classes", None)
        final_meta.pop("InputShape", None)
        if final_meta.get("Id") is None:
            final_meta["Id"] = _content_id(model_bytes, {**final_meta, "InputShape": input_shape})
        xml, xml_notes = legacy_xml(final_meta, int(channels), out_shape[-1])
        for n in xml_notes:
            note(n)
        meta_arg = xml
        from .package import parse_legacy_xml

        final_meta = parse_legacy_xml(xml)

    # -- write to a temp file, verify, then rename -----------------------------------------------------
    result = _write_and_verify(output, kind, fmt, used_opset, meta_arg, final_meta, model_bytes, lic, inputs,
                               expected, notes, force, validate_options)
    result.notes = infos
    return result


def _write_and_verify(output: Path, kind: Target, fmt: str, opset: int | None, meta_arg: dict[str, Any] | bytes,
                      final_meta: dict[str, Any], model_bytes: bytes, lic: Path | None, inputs: list[np.ndarray],
                      expected: list[np.ndarray], notes: list[str], force: bool,
                      validate_options: ValidateOptions | None) -> PackResult:
    from .backends import load_session
    from .package import open_package, sha256_file, write_package
    from .validate import validate

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_package(tmp, meta_arg, model_bytes, kind=kind,
                      license_text=lic.read_bytes() if lic else None,
                      license_name=(lic.name if lic and _looks_like_license(lic.name) else "license.txt"))
        parity_diff: float | None = None
        parity_finding: Finding | None = None
        try:
            package = open_package(tmp)
            with load_session(package, device="cpu") as session:
                diffs = []
                for x, want in zip(inputs, expected):
                    got = session.predict(x)
                    if got.shape != want.shape:
                        raise PackError(f"the packaged model outputs shape {list(got.shape)}, the source "
                                        f"{list(want.shape)}")
                    diffs.append(float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
                parity_diff = max(diffs)
            if not np.isfinite(parity_diff) or parity_diff > PARITY_TOLERANCE:
                parity_finding = Finding.error(
                    "pack.parity", f"the packaged model differs from the source by up to {parity_diff:.3g} "
                    f"(tolerance {PARITY_TOLERANCE:g}) on random inputs",
                    hint="the conversion changed the model's numerics; try another --opset or --model-format")
        except (PackError, BackendError) as exc:
            parity_finding = Finding.error("pack.parity", f"the packaged model could not be compared with the "
                                           f"source: {exc.message}", hint=exc.hint)
        report = validate(tmp, validate_options)
        report.path = str(output)
        if parity_finding is not None:
            report.add(parity_finding)
        else:
            report.add(Finding.info("pack.parity", f"packaged model matches the source within {parity_diff:.3g} "
                                    f"(tolerance {PARITY_TOLERANCE:g}, {len(inputs)} random inputs)"))
        report.measurements["pack_parity_max_abs_diff"] = parity_diff
        result = PackResult(path=output, kind=kind, model_format=fmt, metadata=final_meta,
                            sha256=sha256_file(tmp), report=report, parity_max_abs_diff=parity_diff,
                            parity_inputs=[list(x.shape) for x in inputs], opset=opset if fmt == "onnx" else None,
                            warnings=list(notes))
        if not report.valid:
            first = report.errors[0] if report.errors else next(
                (f for f in report.findings if f.severity is Severity.WARNING), None)
            reason = f"{first.check}: {first.message}" if first else "invalid"
            if not force:
                raise PackError(f"the packed model failed its own verification ({reason}); nothing was written "
                                f"to {output}", hint="fix the model or metadata; --force keeps it with its report")
            result.kept_invalid = True
            report_path = output.with_name(output.name + ".report.json")
            report_path.write_text(report.to_json() + "\n", encoding="utf-8")
            result.report_path = report_path
            msg = f"kept INVALID package {output} because of --force ({reason}); report in {report_path}"
            result.warnings.append(msg)
            warnings.warn(msg, PackWarning, stacklevel=3)
        tmp.replace(output)
        if not result.kept_invalid:  # a report left by an earlier --force run would now be stale
            output.with_name(output.name + ".report.json").unlink(missing_ok=True)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _looks_like_license(name: str) -> bool:
    import re

    return re.match(r"^(licen[cs]e|copying|notice)([._-].*)?$", name, re.IGNORECASE) is not None
