"""The tile-size reset of ``czregistry.pack``: which tile to pack at, and whether the model allows it.

A reset is refused unless ``czregistry.probing``'s invariance measurement says the model is spatially
invariant and the size is on its step; the refusal quotes the measurement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends import Session
from ..errors import PackError, UsageError
from ..metadata import ModelInfo
from .metadata import CZANN_FORMAT_VERSION


def _check_tile(session: Session, input_shape: tuple[int | None, ...], spatial: tuple[int, ...],
                mtype: str | None) -> list[str]:
    """Refuse a tile size the model cannot take, quoting the invariance check.

    A reset is sound only for spatially invariant (fully convolutional) models, and only at sizes on the
    model's step (multiples of 2^poolings). The measurement is ``czregistry.probing``'s.
    """
    fixed = tuple(input_shape[1:-1])
    if fixed == spatial:
        return []
    from ..probing import measure_invariance

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
    from ..probing import ProbeRejected

    try:
        result = measure_invariance(session, info, max_probe_size=max(probe_tile), time_budget=30.0)
    except ProbeRejected as exc:
        raise PackError(f"cannot reset the tile to {_fmt(spatial)}: the invariance check could not run the model "
                        f"at {_fmt(probe_tile)} ({exc})", hint="pack it at its own tile size") from exc
    return _interpret_invariance(result, spatial)


def _interpret_invariance(result: Any, spatial: tuple[int, ...]) -> list[str]:
    """Turn an ``InvarianceResult`` into a refusal (``PackError`` quoting the measurement) or notes."""
    step = tuple(result.step)
    halo = tuple(result.halo)
    measured = ("invariance check: " + ("runs at other sizes" if result.accepts_other_sizes else "fixed size")
                + (f", size step {_fmt(step, '1')}" if result.accepts_other_sizes else "")
                + (f", halo {_fmt(halo)} px" if halo and all(h is not None for h in halo) else ", halo not measured")
                + (", global context" if result.global_context else ", no global context")
                + f", equivariance error {_num(result.equivariance_error)}")
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


def _fmt(dims: Iterable[Any], unknown: str = "?") -> str:
    """``64x64``; an axis the model leaves free (``None``) reads ``unknown``, never ``NonexNone``."""
    return "x".join(unknown if d is None else str(d) for d in dims)


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
