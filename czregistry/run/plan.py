"""Planning a run: what users choose (``RunOptions``), what the model's geometry is (stride, halo) and the
tile grid that follows for one plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..backends import Device, Session
from ..errors import RunError, UsageError
from ..metadata import ModelInfo
from .tiling import Geometry, TileGrid, plan_tiles

__all__ = ["Compression", "ModelGeometry", "OutputKind", "RunOptions", "TiffLayout", "model_facts",
           "model_geometry", "plan_for_model", "tile_borders"]

OutputKind = Literal["probabilities", "uint8", "labels"]
#: OME-TIFF compression: ``auto`` is zlib for uint8/label outputs (which shrink 10x or more) and none for
#: float32 (zlib shrinks noisy probabilities by ~12% at ~40 MB/s per core: it was the pipeline's bottleneck).
Compression = Literal["auto", "zlib", "none"]
#: OME-TIFF layout of several classes: a page per class (``planar``, OME's ``CYX``) or all classes in each
#: pixel (``interleaved``, ``YXS``). Labels and other one-channel outputs are the same file either way.
TiffLayout = Literal["planar", "interleaved"]


@dataclass(frozen=True)
class RunOptions:
    """What ``czreg run`` lets users choose. ``None`` means: from the package's metadata / measurements."""

    batch_size: int = 4
    #: let the session choose the batch from free device memory (``Session.suggest_batch_size``; GPU
    #: backends), keeping ``batch_size`` where it has no answer. The CLI sets it when --batch-size is not given.
    auto_batch: bool = False
    device: Device = "auto"
    backend: str | None = None
    tile: tuple[int, ...] | None = None
    geometry: Geometry = "stride"
    output_kind: OutputKind = "probabilities"
    compression: Compression = "auto"
    tiff_layout: TiffLayout = "interleaved"
    border: int | None = None
    step: int | None = None
    blend: bool = False
    channels: tuple[int, ...] | None = None
    axes: str | None = None
    #: Measure stride and halo by probing the model (a second or so for small models).
    probe: bool = True
    probe_budget: float = 20.0
    #: Run a graph the static audit refuses (``--trust-graph``: your own models only).
    trust_graph: bool = False


@dataclass(frozen=True)
class ModelGeometry:
    """Stride (shift-equivariance step) and halo per spatial axis, and where they came from."""

    stride: tuple[int, ...]
    halo: tuple[int | None, ...]
    source: str
    global_context: bool = False
    notes: tuple[str, ...] = ()



def model_geometry(session: Session, info: ModelInfo, *, probe: bool = True, time_budget: float = 20.0,
                   max_probe_size: int = 1024) -> ModelGeometry:
    """Measure stride and halo with ``czregistry.probing`` .

    Without a measurement the runner aligns origins to a stride of 1 and trusts the declared border:
    correct for models without pooling, and the smoke test reports any seams that remain.
    """
    nd = info.spatial_ndim or max(1, len(session.signature.inputs[0].shape) - 2)
    if probe:
        from ..probing import measure_invariance

        res = measure_invariance(session, info, max_probe_size=max_probe_size, time_budget=time_budget)
        stride = tuple(int(s or q or 1) for s, q in zip(res.stride, res.step))
        return ModelGeometry(stride, tuple(res.halo), "measured", bool(res.global_context), tuple(res.notes))
    return ModelGeometry((1,) * nd, (None,) * nd, "default (not measured)")


def model_facts(session: Session, info: ModelInfo, tile_override: Sequence[int] | None
                 ) -> tuple[tuple[int, ...], int, int]:
    sig = session.signature
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        raise RunError(f"the model has {len(sig.inputs)} inputs and {len(sig.outputs)} outputs; tiling needs "
                       "exactly one of each")
    in_shape = sig.inputs[0].shape
    if in_shape and in_shape[0] is not None and in_shape[0] != 1:
        raise RunError(f"the model's batch dimension is fixed at {in_shape[0]}; CZANN models take batch 1 or a free "
                       "batch", hint="re-export the model with a free (or size 1) batch dimension")
    nd = info.spatial_ndim or len(in_shape) - 2
    graph = tuple(in_shape[1:-1])
    tile = tuple(tile_override) if tile_override else (info.tile or None)
    if tile is None and all(d is not None for d in graph):
        tile = tuple(int(d) for d in graph if d is not None)
    if tile is None:
        raise UsageError("the package declares no tile size", hint="choose one with --tile H W")
    if len(tile) == 1 and nd > 1:
        tile = tile * nd
    if len(tile) != nd:
        raise UsageError(f"--tile needs {nd} numbers for this {nd}D model")
    for d, t in zip(graph, tile):
        if d is not None and d != t:
            raise UsageError(f"the model's graph is fixed to tile {list(graph)}; --tile {list(tile)} cannot be used")
    channels = info.input_channels or (in_shape[-1] if in_shape[-1] is not None else 1)
    out_ch = info.output_channels or sig.outputs[0].shape[-1]
    if out_ch is None:
        raise RunError("the package declares no output channel count and the model does not fix one")
    return tile, int(channels), int(out_ch)


def tile_borders(info: ModelInfo, geom: ModelGeometry, tile: tuple[int, ...], border: int | None,
             notes: list[str]) -> tuple[int, ...]:
    out = []
    for d, t in enumerate(tile):
        declared = info.border[d] if info.border and d < len(info.border) else 0
        halo = geom.halo[d] if d < len(geom.halo) else None
        stride = geom.stride[d] if d < len(geom.stride) else 1
        cap = (t - stride) // 2
        if border is not None:
            b = border
        elif halo is not None and halo > declared and halo > cap:
            # Seamless tiles are out of reach at this tile size; a border up to the cap would multiply the
            # tiles (16x for a 257 px halo in a 256 px tile) and still leave seams. Keep the declared one.
            b = declared
            notes.append(f"axis {d}: measured halo {halo} px does not fit a {t} px tile (at most {cap} px): keeping "
                         f"the declared border {declared} px, tiles will show seams (--border N trades speed for "
                         "smaller seams; a larger tile removes them)")
        else:
            b = max(declared, halo or 0)
            if halo is not None and halo > declared:
                notes.append(f"axis {d}: measured halo {halo} px exceeds the declared border {declared} px; "
                             f"using {halo} px so tiles join without seams")
        if b > cap:
            notes.append(f"axis {d}: border {b} px does not fit a {t} px tile; using {cap} px (seams possible)")
            b = cap
        out.append(max(0, b))
    return tuple(out)


def plan_for_model(session: Session, info: ModelInfo, spatial: Sequence[int], options: RunOptions,
                   notes: list[str]) -> tuple[TileGrid, ModelGeometry, int, int]:
    """Choose the tile grid for one plane of ``spatial`` size: tile, stride, border, geometry."""
    tile, in_ch, out_ch = model_facts(session, info, options.tile)
    if session.batch_limit == 1 and options.batch_size > 1:
        notes.append(f"the model's batch is fixed at 1: each batch of {options.batch_size} tiles runs as "
                     f"{options.batch_size} single-tile calls")
    geom = model_geometry(session, info, probe=options.probe, time_budget=options.probe_budget)
    if options.step is not None:
        geom = ModelGeometry((options.step,) * len(tile), geom.halo, "given", geom.global_context, geom.notes)
    if geom.global_context:
        notes.append("the model uses global context (its output depends on the whole tile): tiled output "
                     "will show seams whatever the border")
    border = tile_borders(info, geom, tile, options.border, notes)
    if len(spatial) != len(tile):
        raise UsageError(f"the image plane has {len(spatial)} spatial dims but the model tiles {len(tile)}")
    grid = plan_tiles(spatial, tile, border=border, step=geom.stride, geometry=options.geometry)
    return grid, geom, in_ch, out_ch
