"""Packing: turn a trained model (ONNX, PyTorch, Keras, SavedModel, ``.keras``, or a conversion spec) into a package.

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
- **Sources are plugins.** What can be packed is registered through the ``register_sources`` hook
  (``czregistry.sources``): ONNX in the core, Keras/SavedModel/``.keras`` in ``czregistry-tensorflow``,
  PyTorch modules, TorchScript and ``torch.export`` programs in ``czregistry-torch``. ``pack`` asks them which
  one recognises its input, like backends are picked; it never imports a plugin by name.
- **Heavy libraries stay out of import time.** TensorFlow, Keras, tf2onnx, torch and ONNX Runtime are
  imported inside functions.

The work is split by seam: ``_pack_sources`` (conversion specs, then the source plugins), ``_pack_sessions``
(layers chained around the source's reference session), ``_pack_tile`` (the tile-size reset), ``_pack_metadata``
(``model.json`` and legacy XML) and ``czregistry.onnx.graph`` (canonicalisation, opsets, splicing). This
module keeps ``pack`` and re-exports the public names, so ``czregistry.pack`` is the one import.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..backends import Session
from ..errors import BackendError, PackError, UsageError, first_line
from ..layers import LayerSpec
from ..onnx.graph import (
    DEFAULT_OPSET,
    LEGACY_OPSET,
    canonicalize_onnx,
    convert_onnx_opset,
    fix_onnx_spatial,
    onnx_opset,
    splice_onnx,
)
from ..progress import step
from ..report import Finding, Report, Severity
from ..sources import LayerStack, LoadedSource, LoadOptions
from .metadata import (
    _CZANN_KEYS,
    _LEGACY_KEYS,
    CZANN_FORMAT_VERSION,
    LEGACY_XML_VERSION,
    _content_id,
    _czann_metadata,
    legacy_xml,
)
from .sessions import _ChainSession, _layer_stack
from .sources import PackWarning, _load_source, _resolve_source, load_spec
from .tile import _check_tile, _fmt, _resolve_tile

if TYPE_CHECKING:
    from ..checks import ValidateOptions

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

#: Largest absolute difference allowed between the source model and the packaged model.
PARITY_TOLERANCE = 1e-4

Target = Literal["czann", "czmodel"]
ModelFormatChoice = Literal["onnx", "savedmodel"]
LayerArg = str | tuple[str | LayerSpec, dict[str, Any]]


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


def _merge_onnx_layers(data: bytes, pre: LayerStack | None, post: LayerStack | None) -> bytes:
    """Export the layer stacks as ONNX at the source's opset and splice them around the source graph."""
    opset = onnx_opset(data) or DEFAULT_OPSET
    try:
        parts = [None if stack is None else canonicalize_onnx(stack.to_onnx(opset)) for stack in (pre, post)]
    except PackError:
        raise
    except Exception as exc:
        raise PackError(f"cannot merge the layers into the ONNX model: {first_line(exc)}",
                        hint="pack from the Keras model (or SavedModel) instead") from exc
    return splice_onnx(data, parts[0], parts[1])


def _check_conversion(original: bytes, converted: bytes, old: int, new: int, inputs: list[np.ndarray]) -> str:
    """Refuse an opset conversion that changes the numerics: both graphs on the parity inputs, ONNX Runtime
    on the CPU, within ``PARITY_TOLERANCE``. Returns the note quoting the measurement."""
    from ..onnx.source import onnx_reference

    try:
        before, after = onnx_reference(original), onnx_reference(converted)
        diff = max(float(np.max(np.abs(after.predict(x).astype(np.float64) - before.predict(x).astype(np.float64))))
                   for x in inputs)
    except (PackError, BackendError) as exc:
        raise PackError(f"the model converted from opset {old} to {new} does not run: {exc.message}",
                        hint="re-export the model at that opset, or choose another --opset") from exc
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise PackError(f"converting from opset {old} to {new} changes the output by up to {diff:.3g} "
                        f"(tolerance {PARITY_TOLERANCE:g})", hint="re-export the model at that opset")
    return f"opset {old} -> {new}: converted graph matches the original within {diff:.3g} on {len(inputs)} inputs"


def _layer_calls(items: Iterable[LayerArg], kind: str) -> list[tuple[LayerSpec, dict[str, Any]]]:
    from ..layers import parse_layer_arg
    from ..selection import available_layers

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


def _parity_inputs(shape: tuple[int, ...], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1, *shape), dtype=np.float32) for _ in range(n)]


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

    src = _resolve_source(source)
    meta: dict[str, Any] = {**src.spec_metadata, **{k: v for k, v in (metadata or {}).items() if v is not None}}
    meta.pop("_TestImageFile", None)
    allowed = set(_CZANN_KEYS) | (set(_LEGACY_KEYS) if kind == "czmodel" or src.spec_style == "legacy" else set())
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise UsageError(f"unknown metadata field(s) {', '.join(unknown)}",
                         hint=f"allowed: {', '.join(sorted(allowed))}")
    if meta.get("Id") is not None:
        from ..package import is_uuid

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
    if (spatial is not None and isinstance(declared, list) and len(declared) == len(spatial) + 1
            and [*map(str, declared[:-1])] != [*map(str, spatial)]):
        # an explicit tile is the user's latest word: the declared shape (typically a conversion spec's
        # required InputShape) follows it instead of contradicting it; the tile check below still applies
        where = f"the conversion spec {src.spec_path.name}" if src.spec_path is not None \
            and "InputShape" in src.spec_metadata else "the metadata"
        note(f"the tile {_fmt(spatial)} replaces InputShape {_fmt(declared)} from {where}; the package's "
             f"InputShape is {_fmt([*spatial, declared[-1]])} and its OutputShape follows the model")
        declared = [*spatial, declared[-1]]
        meta["InputShape"] = declared

    # -- the model to convert, and the reference session for parity ------------------------------------
    with step("pack: loading the model"):
        loaded = _load_source(src, LoadOptions(
            opset=use_opset, tile=spatial, target=kind,
            input_shape=tuple(int(d) for d in declared) if isinstance(declared, list) else None))
    for n in loaded.notes:
        note(n)
    for key, value in loaded.metadata.items():  # the source's own metadata fills only what nobody gave
        if meta.get(key) is None:
            meta[key] = value
    if declared is None and isinstance(meta.get("InputShape"), list):
        declared = meta["InputShape"]
    license_text = lic.read_bytes() if lic is not None else loaded.license_text
    reference: Session = loaded.reference
    base_shape = tuple(reference.signature.inputs[0].shape)
    spatial = _resolve_tile(base_shape, spatial, declared, kind)
    #: True once the tile-reset probe measured the bare source model as local (no global context)
    source_local = False
    if spatial is not None:
        with step(f"pack: checking that the model takes {_fmt(spatial)} tiles"):
            tile_infos = _check_tile(reference, base_shape, spatial, meta.get("Type"))
        infos.extend(tile_infos)
        source_local = bool(tile_infos)  # a reset passes only for a model without global context
    if loaded.onnx_bytes is None and any(spec.factory is None for spec, _ in (*pre, *post)):
        # a layer exists only as ONNX: export the (tile-fixed) model to ONNX and splice the layers into that
        if model_format == "savedmodel":
            only = next(spec.name for spec, _ in (*pre, *post) if spec.factory is None)
            raise UsageError(f"layer '{only}' has only an ONNX form and cannot go into a SavedModel",
                             hint="use --model-format onnx")
        with step("pack: exporting the model to ONNX for the layers"):
            if spatial is not None and spatial != tuple(base_shape[1:-1]):
                loaded = loaded.compose([], [], spatial)
            loaded = LoadedSource(loaded.description, loaded.reference,
                                  onnx_bytes=loaded.export("onnx", use_opset), notes=loaded.notes)
            reference = loaded.reference
    if loaded.onnx_bytes is None:
        # the source composes the layers in its own framework and exports the result
        if pre or post or (spatial is not None and spatial != tuple(base_shape[1:-1])):
            with step("pack: composing the model"):
                loaded = loaded.compose(pre, post, spatial)
            reference = loaded.reference
    else:
        if model_format == "savedmodel":
            raise UsageError(f"{loaded.description} cannot be packed as a SavedModel", hint="use --model-format onnx")
        if pre or post:
            # the layers run eagerly here; in the package they are ONNX subgraphs merged around the source
            reference = _ChainSession(_layer_stack(pre, reference.signature.inputs[0].shape),
                                      reference,
                                      _layer_stack(post, reference.signature.outputs[0].shape))

    in_shape = tuple(reference.signature.inputs[0].shape)
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
    inputs = _parity_inputs((*tile, int(channels)), parity_samples, seed)

    # -- convert ---------------------------------------------------------------------------------------
    fmt = model_format
    used_opset: int | None = None
    model_bytes: bytes
    if loaded.onnx_bytes is not None:
        data = loaded.onnx_bytes
        current = onnx_opset(data)
        if current is not None and ((opset is not None and current != opset)
                                    or (kind == "czmodel" and current > LEGACY_OPSET)):
            with step(f"pack: converting to ONNX opset {use_opset}"):
                converted = convert_onnx_opset(data, use_opset)
                infos.append(_check_conversion(data, converted, current, use_opset, inputs))
            data = converted
        with step("pack: preparing the ONNX graph"):
            if pre or post:
                assert isinstance(reference, _ChainSession)
                data = _merge_onnx_layers(data, reference.pre, reference.post)
            if spatial is not None:
                data = fix_onnx_spatial(data, spatial)
            model_bytes = canonicalize_onnx(data)
            used_opset = onnx_opset(model_bytes)
    else:
        if fmt == "onnx":
            try:
                with step("pack: exporting to ONNX"):
                    model_bytes = canonicalize_onnx(loaded.export("onnx", use_opset))
                used_opset = use_opset
            except PackError as exc:
                note(f"ONNX conversion failed ({exc.message}); packing a zipped SavedModel instead")
                fmt = "savedmodel"
        if fmt == "savedmodel":
            with step("pack: exporting a SavedModel"):
                model_bytes = loaded.export("savedmodel", use_opset)
            note("SavedModel packages are not byte-reproducible (TensorFlow embeds per-export ids)")

    # -- run the reference once to learn the output shape ----------------------------------------------
    with step("pack: running the source model"):
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
        from ..package import parse_legacy_xml

        final_meta = parse_legacy_xml(xml)

    # -- write to a temp file, verify, then rename -----------------------------------------------------
    result = _write_and_verify(output, kind, fmt, used_opset, meta_arg, final_meta, model_bytes, lic, license_text,
                               inputs, expected, notes, force, validate_options)
    result.notes = infos
    _check_declared_local(result, [spec for spec, _ in (*pre, *post)], source_local)
    return result


def _check_declared_local(result: PackResult, specs: list[LayerSpec], source_local: bool) -> None:
    """A layer's ``local`` flag is a claim; the validator measures the packed graph, layers included. When the
    bare model was measured local and every added layer claims to be local, yet the package has global
    context, one of the claims is wrong: say so instead of repeating the claim."""
    if not (source_local and specs and all(spec.local for spec in specs)):
        return
    if result.report.measurements.get("global_context") is not True:
        return
    names = ", ".join(f"'{spec.name}'" for spec in specs)
    msg = (f"the packed model has global context (validator: model.invariance) although the model alone has "
           f"none and layer(s) {names} declare local=True: one of them uses whole-image statistics, so tiled "
           "predictions will differ from whole-image ones (its LayerSpec should say local=False)")
    result.warnings.append(msg)
    warnings.warn(msg, PackWarning, stacklevel=3)


def _write_and_verify(output: Path, kind: Target, fmt: str, opset: int | None, meta_arg: dict[str, Any] | bytes,
                      final_meta: dict[str, Any], model_bytes: bytes, lic: Path | None,
                      license_text: bytes | None, inputs: list[np.ndarray],
                      expected: list[np.ndarray], notes: list[str], force: bool,
                      validate_options: ValidateOptions | None) -> PackResult:
    from ..package import is_license_name, open_package, sha256_file, write_package
    from ..selection import load_session
    from ..validate import validate

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with step("pack: writing the package"):
            write_package(tmp, meta_arg, model_bytes, kind=kind,
                          license_text=license_text,
                          license_name=(lic.name if lic and is_license_name(lic.name) else "license.txt"))
        parity_diff: float | None = None
        parity_finding: Finding | None = None
        try:
            package = open_package(tmp)
            with step("pack: comparing the package with the source"), load_session(package, device="cpu") as session:
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
        with step("pack: validating the package"):
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
            from ..package import atomic_output

            with atomic_output(report_path) as report_tmp:  # never a half-written report beside the package
                report_tmp.write_text(report.to_json() + "\n", encoding="utf-8")
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
