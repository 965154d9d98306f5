"""Model checks: run the network and prove it fits its metadata, is shape-invariant and tiles without seams.

Four checks, in this order (each skipped by the validator once an earlier one reported an error):

``model.signature`` (100)
    The graph's one input and one output against the metadata: rank, batch, channels, classes, fixed
    dims, dtype. Nothing is run.
``model.output`` (110)
    One prediction at the declared tile on inputs in [0, 1]: shape, finiteness, probabilities for
    segmentation types, [0, 1] for regression (warning), and a second run for determinism.
``model.invariance`` (120)
    Accepted sizes and the size step, output size following input size, and translation equivariance
    by value (``probing.Prober.measure_invariance``).
``model.receptive_field`` (130)
    Stride and halo per axis by the shift-consistency probe, the declared border against the halo, a
    tiled-versus-whole comparison at the declared overlap, and the smallest even ``MinOverlap`` that tiles
    exactly.

All predictions come from one ``Prober`` kept in ``ctx.cache`` (see ``probing``); measured facts go to
``report.measurements``. Tolerances and the probe method are documented in docs/model-checks.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metadata import CLASSIFICATION_TYPES, ModelInfo
from ..probing import EQ_FACTOR, TOLERANCE, InvarianceResult, Prober, ProbeRejected, TilingResult, seam_band
from ..report import Finding

if TYPE_CHECKING:
    from . import CheckContext

__all__ = ["CHECKS", "SOFTMAX_TOLERANCE", "get_prober"]

#: On a fixed tile, seams that stay above this fraction of the declared overlap's at the largest overlap tried
#: do not fall with the overlap (the output depends on where the tile sits).
FLAT_SEAM_RATIO = 0.5
#: Largest allowed ``|sum over classes - 1|`` and overshoot of [0, 1] for class probabilities (segmentation and
#: classification outputs). float32
#: softmax sums to 1 within ~1e-6; 1e-3 also admits float16 networks, and still catches sigmoid or logit
#: outputs (whose sums are off by 1e-1 and more).
SOFTMAX_TOLERANCE = 1e-3
#: Global context whose measured effect (far content changing the output) is below this fraction of the output
#: range is a warning, not an error: the seams it causes are real but small (DeepLabV3+'s image-pooling branch
#: moves random-probe outputs by ~1e-3). The effect on real images depends on their content.
GLOBAL_ERROR_FRACTION = 1e-2
_PROBER_KEY = "model.prober"


def _axes(nd: int) -> list[str]:
    return ["z", "h", "w"][-nd:] if nd <= 3 else [f"axis{i}" for i in range(nd)]


def _fmt(values: Iterable[Any]) -> str:
    return "[" + ", ".join("?" if v is None else str(v) for v in values) + "]"


def get_prober(ctx: CheckContext) -> Prober:
    """The validation's one ``Prober`` (created on first use, shared by every model check)."""
    prober = ctx.cache.get(_PROBER_KEY)
    if prober is None:
        prober = Prober(ctx.session, ctx.info, max_probe_size=ctx.options.max_probe_size,
                        time_budget=ctx.options.time_budget)
        ctx.cache[_PROBER_KEY] = prober
    assert isinstance(prober, Prober)
    return prober


def _spatial_output(info: ModelInfo, prober: Prober) -> bool:
    """Whether the output is an image (dense types, or an output with the input's rank)."""
    if info.is_dense:
        return True
    if info.type is None:
        out = prober.session.signature.outputs
        return bool(out) and len(out[0].shape) == prober.spatial_ndim + 2
    return False


@dataclass(frozen=True)
class SignatureCheck:
    id: str = "model.signature"
    needs_model: bool = True
    order: int = 100

    def run(self, ctx: CheckContext) -> Iterator[Finding]:
        info = ctx.info
        start = time.perf_counter()
        sig = ctx.session.signature  # loads the model: its cost is reported apart from the probes'
        ctx.measure("model_load_s", round(time.perf_counter() - start, 4))
        ctx.measure("signature", sig.to_dict())
        cid = self.id
        if len(sig.inputs) != 1 or len(sig.outputs) != 1:
            yield Finding.error(f"{cid}.io", f"the model has {len(sig.inputs)} input(s) and {len(sig.outputs)} "
                                "output(s); CZANN requires exactly one of each",
                                hint="export a model with a single input and a single output")
            return
        inp, out = sig.inputs[0], sig.outputs[0]
        nd = info.spatial_ndim
        ranks = (nd + 2,) if nd is not None else (4, 5)
        if len(inp.shape) not in ranks:
            want = " or ".join(str(r) for r in ranks)
            yield Finding.error(f"{cid}.rank", f"input '{inp.name}' has rank {len(inp.shape)} "
                                f"(shape {_fmt(inp.shape)}); the metadata needs rank {want} "
                                "([batch, h, w, c] or [batch, z, h, w, c])",
                                hint="export channels-last with a batch dimension")
            return
        nd = len(inp.shape) - 2
        for t, what in ((inp, "input"), (out, "output")):
            if t.shape and t.shape[0] not in (None, 1):
                yield Finding.error(f"{cid}.batch", f"{what} '{t.name}' has batch dimension {t.shape[0]}; "
                                    "it must be 1 or undefined", hint="export with a free batch dimension")
            if t.dtype != "float32":
                yield Finding.error(f"{cid}.dtype", f"{what} '{t.name}' is {t.dtype}; CZANN models take and "
                                    "give float32", hint="cast inside the model or re-export as float32")
        channels = inp.shape[-1]
        if info.input_channels is not None:
            declared = "sum of the pixel types' channels" if info.kind == "czmodel" else "InputShape[-1]"
            if channels is None:
                yield Finding.warning(f"{cid}.input_channels", f"the model's channel dimension is undefined; "
                                      f"{declared} is {info.input_channels}",
                                      hint="export with a fixed channel count")
            elif channels != info.input_channels:
                yield Finding.error(f"{cid}.input_channels", f"the model takes {channels} input channel(s) but "
                                    f"{declared} is {info.input_channels}",
                                    hint="fix the metadata or the model's input layer")
        out_ch = out.shape[-1] if out.shape else None
        if info.output_shape is not None and out_ch is not None and out_ch != info.output_shape[-1]:
            yield Finding.error(f"{cid}.output_channels", f"the model gives {out_ch} output channel(s) but "
                                f"OutputShape[-1] is {info.output_shape[-1]}",
                                hint="fix OutputShape or the model's last layer")
        if info.classes is not None and out_ch is not None and out_ch != len(info.classes):
            yield Finding.error(f"{cid}.classes", f"the model gives {out_ch} output channel(s) but the "
                                f"metadata names {len(info.classes)} class(es)",
                                hint="one class name per output channel")
        graph_spatial = inp.shape[1:-1]
        if info.tile is not None and len(info.tile) == nd:
            for axis, (g, dim) in enumerate(zip(graph_spatial, info.tile)):
                if g is not None and g != dim:
                    yield Finding.error(f"{cid}.fixed_dims", f"the model's input is fixed to {g} on axis "
                                        f"{_axes(nd)[axis]} but InputShape says {dim}",
                                        hint="InputShape must be the size the graph runs on")
        if info.output_shape is not None and len(out.shape) == len(info.output_shape) + 1:
            for axis, (g, dim) in enumerate(zip(out.shape[1:-1], info.output_shape[:-1])):
                if g is not None and g != dim:
                    yield Finding.error(f"{cid}.fixed_dims", f"the model's output is fixed to {g} on axis "
                                        f"{_axes(nd)[axis]} but OutputShape says {dim}")
        if info.kind == "czmodel" and any(g is None for g in graph_spatial):
            yield Finding.error(f"{cid}.legacy_dims", f"legacy packages need fully defined spatial input dims; "
                                f"the model's input is {_fmt(inp.shape)}",
                                hint="re-export with a fixed tile size, or pack as CZANN with an InputShape")
        tile = info.tile if info.tile is not None else (
            tuple(graph_spatial) if all(g is not None for g in graph_spatial) else None)
        ctx.measure("tile", list(tile) if tile is not None else None)


def _class_vector_shape(cid: str, info: ModelInfo, out: np.ndarray) -> Iterator[Finding]:
    """A classifier gives one class vector per image: ``[batch, classes]``, or exactly ``OutputShape``
    (``[1, 1, classes]`` in the schema's ``[h, w, c]`` form, i.e. ``[batch, 1, 1, classes]``)."""
    classes = info.output_channels
    if classes is None:
        return
    allowed: list[tuple[int, ...]] = [(classes,)]
    if info.output_shape is not None:
        allowed.append(tuple(info.output_shape))
    if tuple(out.shape) not in allowed:
        forms = " or ".join(_fmt(("batch", *a)) for a in allowed)
        declared = (f"OutputShape is {_fmt(info.output_shape)}" if info.output_shape is not None
                    else f"the metadata names {classes} classes")
        yield Finding.error(f"{cid}.shape", f"output shape {_fmt(out.shape)} is not one class vector per image: "
                            f"{declared}, so the model must give {forms}",
                            hint="pool over space (e.g. global average pooling) before the class layer")


@dataclass(frozen=True)
class OutputCheck:
    id: str = "model.output"
    needs_model: bool = True
    order: int = 110

    def run(self, ctx: CheckContext) -> Iterator[Finding]:
        info = ctx.info
        prober = get_prober(ctx)
        cid = self.id
        try:
            out = prober.tile_prediction()
        except ProbeRejected as exc:
            yield Finding.error(f"{cid}.runs", f"the model fails on its declared tile {_fmt(prober.tile)}: {exc}",
                                hint="InputShape must be a size the model accepts")
            return
        dense = _spatial_output(info, prober)
        stats: dict[str, Any] = {"shape": list(out.shape)}
        ctx.measure("output", stats)
        if dense:
            want_spatial = tuple(prober.tile)
            got_spatial = tuple(out.shape[:-1])
            if got_spatial != want_spatial:
                yield Finding.error(f"{cid}.shape", f"output spatial size {_fmt(got_spatial)} differs from the "
                                    f"input tile {_fmt(want_spatial)}",
                                    hint="use 'same' padding or crop/pad inside the model")
        elif info.type in CLASSIFICATION_TYPES:
            yield from _class_vector_shape(cid, info, out)
        finite = np.isfinite(out)
        if not finite.all():
            bad = int((~finite).sum())
            yield Finding.error(f"{cid}.finite", f"{bad} of {out.size} output values are NaN or infinite on "
                                "inputs in [0, 1]", hint="check the model's normalisation and weights")
            return
        lo, hi = float(out.min()), float(out.max())
        stats.update(min=lo, max=hi)
        if info.is_segmentation or info.type in CLASSIFICATION_TYPES:
            what = "segmentation" if info.is_segmentation else "classification"
            sums = out.sum(axis=-1, dtype=np.float64)
            sum_err = float(np.abs(sums - 1.0).max())
            stats["softmax_sum_error"] = sum_err
            if lo < -SOFTMAX_TOLERANCE or hi > 1 + SOFTMAX_TOLERANCE:
                yield Finding.error(f"{cid}.probabilities", f"{what} output ranges over [{lo:.4g}, {hi:.4g}]; "
                                    "class probabilities must lie in [0, 1]",
                                    hint="end the model with a softmax (czmodel's SigmoidToSoftmaxScores for "
                                    "sigmoid outputs)")
            elif sum_err > SOFTMAX_TOLERANCE:
                yield Finding.error(f"{cid}.probabilities", f"{what} output: class probabilities sum to 1 only "
                                    f"within {sum_err:.3g} (tolerance {SOFTMAX_TOLERANCE:g})",
                                    hint="end the model with a softmax over the class axis")
        elif info.type == "Regression" and (lo < -SOFTMAX_TOLERANCE or hi > 1 + SOFTMAX_TOLERANCE):
            yield Finding.warning(f"{cid}.range", f"regression output ranges over [{lo:.4g}, {hi:.4g}]; the "
                                  "format asks for image outputs in [0, 1]",
                                  hint="rescale inside the model (e.g. a final sigmoid)")
        # Determinism does not depend on the tile size: re-run a window of at most 256 px per axis (cached once).
        small = tuple(min(t, 256) for t in prober.tile) if prober.graph_fixed is None else prober.tile
        try:
            first = prober.predict((0,) * prober.spatial_ndim, small)
        except ProbeRejected:
            small, first = prober.tile, out
        again = prober.predict_uncached((0,) * prober.spatial_ndim, small)
        det = float(np.abs(again.astype(np.float64) - first.astype(np.float64)).max()) \
            if again.shape == first.shape else float("inf")
        stats["determinism_error"] = det
        tol = TOLERANCE * max(1.0, hi - lo)
        if det > tol:
            yield Finding.error(f"{cid}.determinism", f"two runs on the same tile differ by up to {det:.3g} "
                                f"(tolerance {tol:.3g})",
                                hint="disable dropout and other random layers at inference")


def _invariance_measurements(ctx: CheckContext, prober: Prober) -> None:
    inv = prober.measure_invariance()
    ctx.measure("accepts_other_sizes", inv.accepts_other_sizes)
    ctx.measure("fixed_size", list(inv.fixed_size) if inv.fixed_size else None)
    ctx.measure("step", list(inv.step))
    ctx.measure("output_follows_input", inv.output_follows_input)
    ctx.measure("stride", list(inv.stride))
    ctx.measure("halo", list(inv.halo))
    ctx.measure("halo_bound", list(inv.halo_bound))
    ctx.measure("residual_error", list(inv.residual))
    ctx.measure("effective_halo", list(inv.effective_halo))
    ctx.measure("global_strength", inv.global_strength)
    ctx.measure("global_context", inv.global_context)
    ctx.measure("equivariance_error", inv.equivariance_error)
    ctx.measure("equivariance_error_rel", inv.equivariance_error_rel)
    ctx.measure("offgrid_shift_error", inv.offgrid_shift_error)
    ctx.measure("probe", {"window": list(inv.window), "predictions": prober.predictions,
                          "predict_seconds": round(prober.predict_seconds, 4), "tolerance": inv.tolerance,
                          "partial": inv.partial, "notes": inv.notes, "windows": list(inv.probe_windows),
                          "decay": list(inv.decay), "far_change": inv.far_change,
                          "global_evidence": inv.global_evidence, "offstep_sizes": inv.offstep_sizes,
                          "sizes": [{k: v for k, v in p.items() if k != "error"} for p in inv.size_probes]})


class _SpatialCheck:
    """Shared start of the spatial checks: image-to-image models only, one shared measurement."""

    id: str

    def run(self, ctx: CheckContext) -> Iterator[Finding]:
        info = ctx.info
        prober = get_prober(ctx)
        if not _spatial_output(info, prober):
            yield Finding.info(self.id, f"not an image-to-image model (type {info.type}): spatial checks skipped")
            return
        inv = prober.measure_invariance()
        _invariance_measurements(ctx, prober)
        yield from self.check(ctx, info, prober, inv)

    def check(self, ctx: CheckContext, info: ModelInfo, prober: Prober,
              inv: InvarianceResult) -> Iterator[Finding]:
        raise NotImplementedError


@dataclass(frozen=True)
class InvarianceCheck(_SpatialCheck):
    id: str = "model.invariance"
    needs_model: bool = True
    order: int = 120

    def check(self, ctx: CheckContext, info: ModelInfo, prober: Prober,
              inv: InvarianceResult) -> Iterator[Finding]:
        cid = self.id
        nd = inv.spatial_ndim
        if inv.fixed_size is not None and prober.graph_fixed is None and not inv.partial:
            # The graph says any size, the network takes one: hosts and `czreg run --tile` believe the graph.
            yield from _claims_free_dims(cid, prober, inv)
        elif inv.fixed_size is not None:
            yield Finding.info(f"{cid}.fixed_size", f"fixed-size graph: it runs only on {_fmt(inv.fixed_size)}; "
                               "the host tiles at exactly that size (packing cannot change the tile)")
        elif inv.accepts_other_sizes:
            yield Finding.info(f"{cid}.sizes", f"accepts other spatial sizes in steps of {_fmt(inv.step)} "
                               f"({'/'.join(_axes(nd))})")
        if inv.output_follows_input is False:
            odd = [p for p in inv.size_probes if p["accepted"] and p["output"] != p["size"]]
            example = f" (input {odd[0]['size']} gave {odd[0]['output']})" if odd else ""
            yield Finding.warning(f"{cid}.output_size", f"the output size does not follow the input size"
                                  f"{example}", hint="models for tiling must map every accepted size to itself")
        if inv.global_context:
            where = ("within the fixed tile" if inv.fixed_size else "between a crop and the whole image")
            err = inv.equivariance_error
            detail = f"; predictions differ by up to {err:.3g} {where}" if err is not None else ""
            evidence = f" (evidence: {inv.global_evidence[0]})" if inv.global_evidence else ""
            strength = inv.global_strength
            weak = strength is not None and strength < GLOBAL_ERROR_FRACTION
            size = f"; far content moves the output by {100 * strength:.2g}% of its range" if strength else ""
            message = (f"{'weak ' if weak else ''}global context: the output depends on the whole tile (global "
                       "pooling, per-image normalisation such as GroupNorm, or dense layers), so it is not "
                       f"translation-equivariant{detail}{size}{evidence}")
            if info.is_dense and not weak:
                yield Finding.error(f"{cid}.equivariance", message,
                                    hint="use a fully convolutional network; tiles of such a model never join "
                                    "without seams")
            else:
                yield Finding.warning(f"{cid}.equivariance", message,
                                      hint="tiles will differ slightly from whole-image inference whatever the "
                                      "overlap; check the seams on real images (czreg smoke --image)")
        elif inv.equivariance_error is not None and inv.equivariance_error > EQ_FACTOR * inv.tolerance:
            # Not evidence of global context (nothing said the halo is finite here), but not "equivariant" either:
            # the words and the severity follow the size of what was measured.
            rel = inv.equivariance_error_rel or 0.0
            where = ("shifted copies of the fixed tile differ" if inv.fixed_size is not None else
                     "a crop's prediction differs from the whole prediction")
            message = (f"not shown translation-equivariant: {where} by up to {inv.equivariance_error:.3g} "
                       f"({100 * rel:.3g}% of the output range) even far from their edges: the receptive field is "
                       "wider than the probe could see (see model.receptive_field)")
            if rel >= GLOBAL_ERROR_FRACTION:
                yield Finding.warning(f"{cid}.equivariance", message,
                                      hint="tiles of this model will differ from whole-image inference unless their "
                                      "border covers the receptive field (see model.receptive_field.border)")
            else:
                yield Finding.info(f"{cid}.equivariance", message)
        elif inv.equivariance_error is not None:
            yield Finding.info(f"{cid}.equivariance", f"translation-equivariant by value: a crop's prediction "
                               f"matches the whole prediction within {inv.equivariance_error:.3g} beyond the halo")
        residual = [r for r in inv.residual if r is not None]
        if residual and not inv.global_context:
            eff = _fmt(inv.effective_halo)
            yield Finding.warning(f"{cid}.residual", f"not exactly translation-equivariant: beyond about {eff} px "
                                  f"from a tile edge, predictions of shifted windows still differ by up to "
                                  f"{max(residual):.3g}, and more overlap does not reduce it (window-size dependent "
                                  "resampling such as bilinear upsampling with align_corners=True)",
                                  hint="resample with align_corners=False (or transposed convolutions) for "
                                  "seamless tiles")
        if inv.partial:
            yield Finding.info(f"{cid}.budget", f"probing stopped at the time budget ({ctx.options.time_budget:g} "
                               "s); some measurements are missing", hint="raise --time-budget")


def _claims_free_dims(cid: str, prober: Prober, inv: InvarianceResult) -> Iterator[Finding]:
    """A graph whose input declares free spatial dims but that refused every other size tried (position embeddings
    or window partitions traced at one size): name the one size it runs on, what it refused and why."""
    assert inv.fixed_size is not None
    graph = prober.session.signature.inputs[0].shape
    refused = [p for p in inv.size_probes if p["accepted"] is False]
    sizes = [p["size"] for p in refused]
    shown = ", ".join(_fmt(s) for s in sizes[:3]) + (f", ... {_fmt(sizes[-1])}" if len(sizes) > 3 else "")
    why = str(refused[0].get("error", "")).split(" Name:")[0].rstrip(" .:'") if refused else ""
    why = f"; at {_fmt(sizes[0])} the runtime says: {why[:200]}" if why else ""
    yield Finding.warning(f"{cid}.fixed_size", f"the graph declares free spatial dims (input {_fmt(graph)}) but runs "
                          f"only on {_fmt(inv.fixed_size)}: it refused all {len(sizes)} other sizes tried ({shown})"
                          f"{why}", hint=f"tile at exactly {_fmt(inv.fixed_size)} (leave czreg run --tile unset), "
                          "and re-export with the spatial dims fixed at that size so hosts know (position "
                          "embeddings or window partitions traced at one size do not follow the input)")


@dataclass(frozen=True)
class ReceptiveFieldCheck(_SpatialCheck):
    id: str = "model.receptive_field"
    needs_model: bool = True
    order: int = 130

    def check(self, ctx: CheckContext, info: ModelInfo, prober: Prober,
              inv: InvarianceResult) -> Iterator[Finding]:
        cid = self.id
        nd = inv.spatial_ndim
        axes = _axes(nd)
        if inv.global_context:
            yield Finding.info(f"{cid}.halo", "no halo exists: the output depends on the whole tile "
                               "(see model.invariance.equivariance)")
            return
        if any(h is None for h in inv.halo):
            yield from self._unpinned(ctx, info, prober, inv)
            return
        halo = [int(h) for h in inv.halo if h is not None]
        exact = [2 * h for h in halo]
        ctx.measure("min_overlap_exact", exact)
        border = list(info.border) if info.border is not None and len(info.border) == nd else None
        overlap = list(info.min_overlap) if info.min_overlap is not None and len(info.min_overlap) == nd else None
        ctx.measure("declared_border", border)
        yield Finding.info(f"{cid}.halo", f"measured stride {_fmt(inv.stride)} and halo {_fmt(halo)} px "
                           f"({'/'.join(axes)}); tiling is exact with MinOverlap >= {_fmt(exact)}")
        seam = prober.measure_tiling(overlap if overlap is not None else [0] * nd)
        if seam is not None:
            ctx.measure("seam_error", seam.seam_error)
            ctx.measure("seam_error_rel", seam.seam_error_rel)
            ctx.measure("seam_overlap", list(seam.overlap))
            ctx.measure("seam_method", seam.method)
        else:
            ctx.measure("seam_error", None)
        declared = "BorderSize" if info.kind == "czmodel" else "MinOverlap/2"
        short = [a for a, b, h in zip(axes, border or [0] * nd, halo) if b < h]
        if short:
            seam_txt = _seam_text(seam)
            what = (f"declared border {_fmt(border)} px ({declared}) is below the measured halo" if border
                    else "no border is declared, but the measured halo is")
            yield Finding.warning(f"{cid}.border", f"{what} {_fmt(halo)} px on "
                                  f"{'axes' if len(short) > 1 else 'axis'} {', '.join(short)}: tiles will show seams"
                                  f"{seam_txt}", hint=_overlap_hint(info, inv, halo, prober.tile))
        elif seam is not None and seam.seam_error is not None and not seam.exact:
            yield Finding.warning(f"{cid}.seams", f"tiling at the declared overlap {_fmt(seam.overlap)} differs from "
                                  f"the whole prediction by up to {seam.seam_error:.3g}",
                                  hint=f"MinOverlap {_fmt(exact)} should tile exactly")
        if seam is None:
            yield Finding.info(f"{cid}.seams", "tiled-versus-whole comparison not possible: the overlap leaves "
                               "no room for a second tile within the probe size")
        if not prober.over_budget and exact != (list(seam.overlap) if seam else None):
            check = prober.measure_tiling(exact)
            ctx.measure("min_overlap_exact_seam_error", check.seam_error if check else None)
            if check is not None and check.exact is False:
                yield Finding.warning(f"{cid}.seams", f"tiling at MinOverlap {_fmt(check.overlap)} (twice the halo) "
                                      f"still differs by {check.seam_error:.3g}: the halo probe and the tiling "
                                      "disagree", hint="report this model to the czregistry authors")
        yield from self._offgrid(cid, inv)

    def _offgrid(self, cid: str, inv: InvarianceResult) -> Iterator[Finding]:
        if inv.offgrid_shift_error is not None:
            yield Finding.info(f"{cid}.stride", f"shifting the input by less than the stride {_fmt(inv.stride)} "
                               f"changes the output by up to {inv.offgrid_shift_error:.3g}: tiles are consistent "
                               "only on that grid")


    def _fixed_tile_seams(self, ctx: CheckContext, info: ModelInfo, prober: Prober,
                          inv: InvarianceResult) -> Iterator[Finding]:
        """A graph that runs only on its declared tile, with a halo the tile cannot pin: measure the seams the way
        ZEN tiles it (real fixed-size tiles at the declared MinOverlap, stitched at the middle of the overlap)
        against a tile centred on each cut, the best reference such a graph allows (``Prober.measure_tiling``,
        the same geometry as ``czreg smoke``), then at growing overlaps until the seams go or the tile is full."""
        cid = self.id
        nd = inv.spatial_ndim
        tile = tuple(int(v) for v in (inv.fixed_size or prober.tile))
        declared_name = "BorderSize" if info.kind == "czmodel" else "MinOverlap"
        if info.kind == "czmodel" and info.border is not None and len(info.border) == nd:
            overlap = [2 * int(b) for b in info.border]
        elif info.min_overlap is not None and len(info.min_overlap) == nd:
            overlap = [int(v) for v in info.min_overlap]
        else:
            overlap = [0] * nd
        bound = [b if b is not None else (h if h is not None else w // 4)
                 for b, h, w in zip(inv.halo_bound or (None,) * nd, inv.halo, tile)]
        seam = prober.measure_tiling(overlap)
        ctx.measure("min_overlap_exact", None)
        ctx.measure("seam_error", seam.seam_error if seam else None)
        if seam is None:
            yield Finding.info(f"{cid}.seams", f"fixed tile {_fmt(tile)}: the declared {declared_name} "
                               f"{_fmt(overlap)} leaves no room for a second tile; no seams to measure")
            return
        ctx.measure("seam_error_rel", seam.seam_error_rel)
        ctx.measure("seam_overlap", list(seam.overlap))
        ctx.measure("seam_method", seam.method)
        if seam.exact:
            yield Finding.info(f"{cid}.seams", f"fixed tile {_fmt(tile)}: tiles at the declared overlap "
                               f"{_fmt(seam.overlap)} equal a tile centred on each cut (max difference "
                               f"{seam.seam_error:.2g})")
            yield from self._offgrid(cid, inv)
            return
        grid = [math.lcm(s or 1, q or 1) for s, q in zip(inv.stride, inv.step)]
        fixed_at: TilingResult | None = None
        worst_tried: TilingResult = seam
        for cand in _fixed_overlaps(list(seam.overlap), tile, grid):
            if prober.over_budget:
                break
            res = prober.measure_tiling(cand)
            if res is None:
                continue
            if res.exact:
                fixed_at = res
                break
            worst_tried = res
        bound = [max(b, (o + 1) // 2) for b, o in zip(bound, worst_tried.overlap)]
        ctx.measure("halo_bound", bound)
        ctx.measure("min_overlap_needed", list(fixed_at.overlap) if fixed_at else None)
        ctx.measure("recommended_overlap_seam_error", fixed_at.seam_error if fixed_at else worst_tried.seam_error)
        rel = 100 * (seam.seam_error_rel or 0)
        where = ("MinOverlap/2" if info.kind == "czann" else "BorderSize")
        message = (f"fixed tile {_fmt(tile)}: at the declared overlap {_fmt(seam.overlap)} ({where} "
                   f"{_fmt(o // 2 for o in seam.overlap)} px) tiles differ from a tile centred on the cut by up to "
                   f"{seam.seam_error:.3g} ({rel:.3g}% of the output range): tiles will show seams; the halo is "
                   f"at least {_fmt(bound)} px (a lower bound: the fixed tile is too small to see all of it)")
        # The seams stay (within 2x) however far the overlap moves the cut from the tile's edges, and the graph
        # refused every other size though it claims free dims (a position embedding or a window partition traced
        # at one size), or it is globally dependent: the output depends on where the tile sits, so neither a
        # larger overlap nor a larger tile helps. (A graph fixed by its export, e.g. a U-Net whose receptive
        # field exceeds its tile, looks alike on its one tile but does tile cleanly at a larger one.)
        flat = (worst_tried.seam_error is not None and seam.seam_error is not None
                and worst_tried.seam_error > FLAT_SEAM_RATIO * seam.seam_error)
        positional = inv.global_context or (flat and prober.graph_fixed is None)
        ctx.measure("seams_depend_on_tile_position", bool(fixed_at is None and positional))
        if fixed_at is not None:
            want = (_fmt(fixed_at.overlap) if info.kind == "czann" else str(max(fixed_at.overlap) // 2))
            hint = f"set {declared_name} to {want}: the tiles then equal the centred tile within the tolerance"
        elif positional:
            why = ("the graph uses global context" if inv.global_context else
                   f"the seam error does not fall with the overlap ({seam.seam_error:.3g} at {_fmt(seam.overlap)}, "
                   f"{worst_tried.seam_error:.3g} at {_fmt(worst_tried.overlap)}) on a graph that runs only at "
                   f"{_fmt(tile)}")
            hint = (f"no overlap or tile removes them: {why}, so the output depends on where the tile sits "
                    "(position embeddings or global context); such a model cannot be tiled without seams")
        else:
            min_tile = [-(-(2 * b + 2 * seam_band(b, 8 * b) + g) // g) * g for b, g in zip(bound, grid)]
            hint = (f"no overlap that fits the {_fmt(tile)} tile removes them (at {_fmt(worst_tried.overlap)}: "
                    f"{worst_tried.seam_error:.3g}); re-pack from the source with a larger tile (czreg pack --tile, "
                    f"at least {_fmt(min_tile)}) and validate again for the overlap it needs, or accept the seams")
        yield Finding.warning(f"{cid}.border", message, hint=hint)
        yield from self._offgrid(cid, inv)

    def _unpinned(self, ctx: CheckContext, info: ModelInfo, prober: Prober,
                  inv: InvarianceResult) -> Iterator[Finding]:
        """The halo is wider than the largest probe window (a lower bound), or the error stops falling at a
        residual level: report what was measured and the seam error at the declared overlap."""
        cid = self.id
        nd = inv.spatial_ndim
        known = [h if h is not None else (b if b is not None else e)
                 for h, b, e in zip(inv.halo, inv.halo_bound, inv.effective_halo)]
        if inv.fixed_size is not None and not inv.partial:
            yield from self._fixed_tile_seams(ctx, info, prober, inv)
            return
        if any(k is None for k in known):
            yield Finding.info(f"{cid}.halo", f"halo not measured on every axis: {_fmt(inv.halo)}; "
                               + "; ".join(inv.notes), hint="raise --time-budget" if inv.partial else
                               "raise --max-probe-size or --time-budget")
            return
        halo = [int(k) for k in known if k is not None]
        bound = any(b is not None for b in inv.halo_bound)
        ctx.measure("min_overlap_exact", None)
        ctx.measure("min_overlap_needed", [2 * h for h in halo])
        what = "at least " if bound else "about "
        yield Finding.info(f"{cid}.halo", f"measured stride {_fmt(inv.stride)}; the halo is {what}{_fmt(halo)} px "
                           + ("(a lower bound: the error still falls with distance at the largest probe window "
                              f"{_fmt(inv.probe_windows)})" if bound else "(where the error stops falling)"))
        border = list(info.border) if info.border is not None and len(info.border) == nd else [0] * nd
        overlap = list(info.min_overlap) if info.min_overlap is not None and len(info.min_overlap) == nd else None
        seam = prober.measure_tiling(overlap if overlap is not None else [0] * nd)
        ctx.measure("seam_error", seam.seam_error if seam else None)
        if seam is not None:
            ctx.measure("seam_error_rel", seam.seam_error_rel)
            ctx.measure("seam_overlap", list(seam.overlap))
            ctx.measure("seam_method", seam.method)
        if any(b < h for b, h in zip(border, halo)):
            declared = "BorderSize" if info.kind == "czmodel" else "MinOverlap/2"
            seam_txt = _seam_text(seam)
            yield Finding.warning(f"{cid}.border", f"declared border {_fmt(border)} px ({declared}) is far below the "
                                  f"halo, which is {what}{_fmt(halo)} px: tiles will show seams{seam_txt}",
                                  hint=_overlap_hint(info, inv, halo, prober.tile, bound=bound))
        yield from self._offgrid(cid, inv)


def _seam_text(seam: TilingResult | None) -> str:
    """The seam figure for a border warning, naming what the tiles were compared with: the whole image's
    prediction, or, on a graph that runs only on its tile, a tile centred on the cut (the best reference
    such a graph allows; saying "whole prediction" there would claim a measurement that never ran)."""
    if seam is None or seam.seam_error is None:
        return ""
    against = "a tile centred on the cut" if seam.method == "tiles-vs-centre-window" else "the whole prediction"
    return (f"; tiling at the declared overlap differs from {against} by up to {seam.seam_error:.3g} "
            f"({100 * (seam.seam_error_rel or 0):.3g}% of the output range)")


def _fixed_overlaps(declared: list[int], tile: tuple[int, ...], grid: list[int]) -> list[list[int]]:
    """Overlaps to try on a fixed tile, above the declared one: eighths of the tile on the stride grid, up to the
    largest overlap that still moves the next tile by one grid step."""
    steps = []
    for k in range(1, 8):
        cand = [max(d, -(-(k * t // 8) // g) * g) for d, t, g in zip(declared, tile, grid)]
        if all(c <= t - g for c, t, g in zip(cand, tile, grid)) and cand != declared and cand not in steps:
            steps.append(cand)
    last = [t - g for t, g in zip(tile, grid)]
    if last != declared and last not in steps and all(v >= d for v, d in zip(last, declared)):
        steps.append(last)
    return steps


def _overlap_hint(info: ModelInfo, inv: InvarianceResult, halo: list[int], tile: tuple[int, ...], *,
                  bound: bool = False) -> str:
    """What to declare for seamless tiles, and when that overlap cannot fit the tile, the tile it needs."""
    import math

    need = [2 * h for h in halo]
    fix = "MinOverlap" if info.kind == "czann" else "BorderSize"
    want = _fmt(need) if info.kind == "czann" else str(max(halo))
    at_least = "at least " if bound else ""
    grid = [math.lcm(s or 1, q or 1) for s, q in zip(inv.stride, inv.step)]
    min_tile = [-(-(n + g) // g) * g for n, g in zip(need, grid)]
    if all(n + g <= t for n, g, t in zip(need, grid, tile)):
        return f"set {fix} to {at_least}{want} for seamless tiling"
    return (f"seamless tiling needs {fix} {at_least}{want}, which does not fit the {_fmt(tile)} tile: pack with a tile "
            f"of at least {_fmt(min_tile)} (czreg pack --tile) and that overlap, or accept the seams")


CHECKS: list[object] = [SignatureCheck(), OutputCheck(), InvarianceCheck(), ReceptiveFieldCheck()]
