"""The running wing: a package runs tiled over images far larger than one tile.

``runner`` (plan, predict, blend, write: ``run``, ``predict_image``), ``tiling`` (the tile grid and blend
weights), ``images`` and ``czi`` (readers and writers, all returning a ``source.ImageSource``), ``smoke``
(the tiled smoke test) and ``dask_run`` (the same run spread over a Dask cluster).

Names are resolved lazily: ``czregistry.run.tiling`` alone does not import the runner or NumPy.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

__all__ = ["ModelGeometry", "RunOptions", "RunResult", "predict_image", "run", "run_dask", "smoke_test"]

_WHERE = {
    "ModelGeometry": "runner",
    "RunOptions": "runner",
    "RunResult": "runner",
    "predict_image": "runner",
    "run": "runner",
    "run_dask": "dask_run",
    "smoke_test": "smoke",
}


__getattr__ = lazy_attributes(__name__, _WHERE)
