"""Tiled inference: ``run`` a package over an image file far larger than one tile, with bounded memory.

This module joins the steps: open the package (``open_tileable``) and the image (``readers``), plan the grid
(``plan``), adapt the input (``adapt``), run the threaded pipeline (``pipeline``, which places tiles through
``assemble``) and write incrementally (``writers`` for OME-TIFF, ``omezarr`` for OME-Zarr 0.5). Peak memory
depends on the image *width* and the tile size, never on its height or on the number of planes. Output goes
to a temp name beside the target and is renamed into place only when complete: Ctrl-C or an error leaves
nothing under the final name.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..metadata import ModelInfo
from ..package import Package
from ..selection import load_session
from . import pipeline as tile_pipeline
from .assemble import Packer, out_dtype
from .pipeline import Bands, Progress, TiledPredictor
from .plan import OutputKind, RunOptions, plan_for_model
from .resume import remove_path
from .tiling import Tile

if TYPE_CHECKING:
    from .writers import OutputSpec, Writer

__all__ = ["RunResult", "open_tileable", "open_writer", "output_format", "run"]


@dataclass
class RunResult:
    output: str
    format: str
    output_kind: str
    shape: list[int]
    dtype: str
    tiles: int
    planes: int
    batch_size: int
    seconds: float  # wall time, including loading and probing the model
    pipeline_seconds: float  # reading, predicting and writing the tiles
    predict_seconds: float  # time inside the backend's predict
    tiles_per_second: float  # tiles / pipeline_seconds (the CLI summary names the time beside each rate)
    backend: str
    device: str
    grid: dict[str, Any]
    geometry: dict[str, Any]
    pixel_size_um: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Busy seconds per pipeline stage (each stage runs in its own thread, so they overlap): ``read``
    #: (cut, scale, batch), ``predict``, ``assemble`` (place interiors), ``convert`` (to the output kind),
    #: ``write`` (hand rows to the writer; for Zarr this includes encoding), ``encode`` (OME-TIFF tile
    #: compression and file writes, in the TIFF writer's own thread). The slowest stage bounds the run.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    compression: str = ""
    #: OME-TIFF outputs: ``planar`` (a page per class) or ``interleaved``; "" for Zarr
    tiff_layout: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_format(path: Path) -> str:
    from .readers import TIFF_SUFFIXES

    name = path.name.lower()
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    raise UsageError(f"cannot write '{path.name}': the output must end in .ome.tiff, .tif(f) or .zarr",
                     hint="e.g. -o mask.ome.tiff or -o mask.zarr")


def open_writer(path: Path, spec: OutputSpec, fmt: str) -> Writer:
    """Open a ``fmt`` ("tiff" or "zarr") writer at ``path`` (the runner's temp path, renamed when done)."""
    from .omezarr import ZarrWriterSink
    from .writers import TiffWriterSink

    if fmt == "zarr":
        return ZarrWriterSink(path, spec)
    return TiffWriterSink(path, spec)


# --- the command --------------------------------------------------------------------------------------


def open_tileable(package: Path | str, output_kind: OutputKind) -> tuple[Package, ModelInfo]:
    """Open a package that tiled inference can run, or say why not (``UsageError``): only image-to-image
    models tile, and labels need class probabilities. Shared by the single-process and the Dask runs."""
    from ..package import open_package

    pkg = open_package(package)
    info = ModelInfo.from_package(pkg)
    if info.type is not None and not info.is_dense:
        raise UsageError(f"{info.type} models give one result per tile, not an image; czreg run tiles "
                         "segmentation and regression models only")
    if output_kind == "labels" and info.type == "Regression":
        raise UsageError("--output-kind labels needs a segmentation model; this one is a regression model")
    return pkg, info


def _sweep_stale_parts(final: Path) -> None:
    """Remove our own temp outputs for ``final`` left by a run that was killed (SIGKILL, power loss): the
    name carries the writer's pid, and a part whose pid no longer runs is stale. Others' files are kept."""
    for part in final.parent.glob(f".{glob_escape(final.name)}.*.part"):
        pid_text = part.name[len(final.name) + 2:-5].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            remove_path(part)
        except OSError:  # alive but another user's, or not ours to judge
            continue


@contextlib.contextmanager
def _temp_output(final: Path) -> Iterator[Path]:
    """A temp path beside ``final`` (file or Zarr directory), renamed into place only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_parts(final)
    tmp = final.parent / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            remove_path(final)
        tmp.replace(final)
    finally:
        if tmp.exists():
            remove_path(tmp)


def run(package: Path | str, image: Path | str, output: Path | str, options: RunOptions | None = None,
        *, progress: Progress | None = None, on_plan: Callable[[int], None] | None = None) -> RunResult:
    """Run ``package`` tiled over ``image`` and write ``output`` (``.ome.tiff``/``.tif`` or ``.zarr``).

    ``on_plan(total_tiles)`` is called once the grid is known (to size a progress bar).
    """
    from .adapt import InputAdapter
    from .readers import open_image
    from .writers import OutputSpec

    options = options or RunOptions()
    output = Path(output)
    fmt = output_format(output)
    if Path(image).resolve() == output.resolve():
        raise UsageError("the output would overwrite the input image", hint="choose another -o path")
    pkg, info = open_tileable(package, options.output_kind)
    src = open_image(image, options.axes)
    t_start = time.perf_counter()
    try:
        with load_session(pkg, options.backend, options.device, trust_graph=options.trust_graph) as session, \
                contextlib.ExitStack() as stack:
            nd = info.spatial_ndim or len(session.signature.inputs[0].shape) - 2
            lead_axes, lead_shape, spatial = src.layout(nd)
            notes: list[str] = []
            grid, geom, in_ch, out_ch = plan_for_model(session, info, spatial, options, notes)
            n_planes = int(np.prod(lead_shape)) if lead_shape else 1
            adapter = InputAdapter.for_model(info, in_ch, options.channels)

            # 8/16-bit pixels whose channels pass unchanged are scaled by the predictor as it fills the
            # batch (the same float32 division), not here: a float32 band would be written and read again
            scale: float | None = None
            if adapter.passes_raw(src.dtype, src.channels):
                scale = float(np.iinfo(src.dtype).max)

            def prepare(plane: int, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
                lead = tuple(int(i) for i in np.unravel_index(plane, lead_shape)) if lead_shape else ()
                raw = src.read_padded(lead, starts, stops, spatial)
                if scale is not None:
                    return raw
                return adapter(raw)

            # Read a whole tile row (one band) at once when it is small: one call into the reader per row
            # instead of per tile, and each pixel is scaled once.
            band_bytes = grid.tile[0] * int(np.prod(grid.padded_shape[1:])) * max(in_ch, src.channels) * 4
            use_bands = band_bytes <= tile_pipeline.MAX_BAND_BYTES
            bands = Bands(prepare, grid, n_planes)
            stack.callback(bands.close)

            def read(plane: int, tile: Tile) -> np.ndarray:  # a view: the predictor copies it into the batch
                if not use_bands:
                    return prepare(plane, tile.origin, [o + s.size for o, s in zip(tile.origin, tile.spans)])
                rest = tuple(slice(s.origin, s.origin + s.size) for s in tile.spans[1:])
                return bands.get(plane, tile.index[0])[(slice(None), *rest)]

            # fail early on channel problems, before any file exists
            read(0, next(iter(grid)))
            kind = options.output_kind
            out_c = 1 if kind == "labels" else out_ch
            pixel_size = dict(src.pixel_size)
            if not pixel_size and info.scaling:
                pixel_size = {ax: v * 1e6 for ax, v in zip("XYZ", info.scaling)}
            dtype = out_dtype(kind, out_ch)
            compression = options.compression
            if compression == "auto":
                compression = "none" if dtype == np.float32 else "zlib"
            spec = OutputSpec(lead_axes, lead_shape, spatial, out_c, dtype, pixel_size,
                              {"name": info.name or "", "model_id": info.id or "", "output_kind": kind,
                               "classes": list(info.classes or [])}, compression=compression,
                              tiff_layout=options.tiff_layout)
            if on_plan is not None:
                on_plan(n_planes * grid.n_tiles)
            batch_size = options.batch_size
            if options.auto_batch and session.batch_limit is None:
                suggested = session.suggest_batch_size((*grid.tile, in_ch))
                if suggested:
                    batch_size = suggested
                    notes.append(f"batch size {suggested}, chosen from the free memory of {session.device}")
            predictor = TiledPredictor(session, grid, out_ch, batch_size=batch_size, blend=options.blend,
                                       progress=progress, output_kind=kind)
            t_pipe = time.perf_counter()
            with _temp_output(output) as tmp:
                writer = open_writer(tmp, spec, fmt)
                packer = Packer(writer.write, kind, spec.unit, spatial, out_c, spec.dtype,
                                 converted=predictor.emits_converted)
                try:
                    predictor.run(n_planes, read, packer, scale=scale)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            pipeline = time.perf_counter() - t_pipe
            seconds = time.perf_counter() - t_start
            return RunResult(
                output=str(output), format=fmt, output_kind=kind,
                shape=[*lead_shape, *spatial, out_c], dtype=str(spec.dtype), tiles=predictor.tiles_done,
                planes=n_planes, batch_size=batch_size, seconds=round(seconds, 3),
                pipeline_seconds=round(pipeline, 3), predict_seconds=round(predictor.predict_seconds, 3),
                tiles_per_second=round(predictor.tiles_done / pipeline, 2) if pipeline else 0.0,
                backend=session.backend, device=session.device, grid=grid.to_dict(),
                geometry={"stride": list(geom.stride), "halo": list(geom.halo), "source": geom.source,
                          "global_context": geom.global_context},
                pixel_size_um=pixel_size, notes=notes,
                compression=compression if fmt == "tiff" else "zstd (sharded OME-Zarr)",
                tiff_layout=options.tiff_layout if fmt == "tiff" else "",
                stage_seconds={k: round(v, 3) for k, v in {
                    "read": predictor.stage_seconds["read"], "predict": predictor.predict_seconds,
                    "assemble": predictor.stage_seconds["assemble"],
                    "convert": packer.convert_seconds + predictor.stage_seconds["convert"],
                    "write": packer.write_seconds,
                    "encode": getattr(writer, "busy_seconds", 0.0)}.items()})
    finally:
        src.close()
