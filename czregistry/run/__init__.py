"""The running wing: a package runs tiled over images far larger than one tile.

One module per step: ``plan`` (options, model geometry, the tile grid), ``readers`` and ``czi`` (all returning
a ``source.ImageSource``), ``adapt`` (input scaling and channels), ``pipeline`` (the reader / predict / writer
threads: ``TiledPredictor``, ``predict_image``), ``assemble`` (placing and blending tiles, output conversion),
``writers`` (the output contract and OME-TIFF) and ``omezarr`` (OME-Zarr 0.5), joined by ``runner`` (``run``);
``tiling`` (the tile grid and blend weights), ``smoke`` (the tiled smoke test) and ``dask_run`` (the same run
spread over a Dask cluster: ``blocks``, ``resume`` for its outputs, ``cluster`` and ``worker``).

Names are resolved lazily: ``czregistry.run.tiling`` alone does not import the runner or NumPy.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

__all__ = ["ModelGeometry", "RunOptions", "RunResult", "predict_image", "run", "run_dask", "smoke_test"]

_WHERE = {
    "ModelGeometry": "plan",
    "RunOptions": "plan",
    "RunResult": "runner",
    "predict_image": "pipeline",
    "run": "runner",
    "run_dask": "dask_run",
    "smoke_test": "smoke",
}


__getattr__ = lazy_attributes(__name__, _WHERE)
