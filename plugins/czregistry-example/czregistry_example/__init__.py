"""Example czregistry plugin: a percentile-normalisation preprocessing layer for 16-bit images.

A template for plugin authors. The whole plugin is:

- ``pyproject.toml`` with an entry point in the ``czregistry`` group pointing at this module;
- this module, which implements one hook (``register_layers``) and imports nothing heavy at import time
  (``czreg`` loads every plugin on start-up, so ONNX and Keras are imported only inside the builders);
- ``onnx_layer.py``, the layer as an ONNX fragment: the form every source packs with, no TensorFlow needed;
- ``layers.py``, the same layer in Keras (optional: for Keras models composed in Keras, SavedModel packages);
- ``tests/test_example.py``, which checks the layer against the contract with ``czregistry.testing``.

Use it on the command line as ``percentile_normalize:low=1,high=99.8``.
"""

from __future__ import annotations

from typing import Any

from czregistry.hookspecs import hookimpl
from czregistry.layers import LayerSpec, Param

from .onnx_layer import percentile_normalize

__all__ = ["PERCENTILE_NORMALIZE", "register_layers"]


def _build_percentile_normalize(**kwargs: Any) -> Any:
    """Import Keras only when the layer is actually built (packing), never when plugins are listed."""
    from .layers import PercentileNormalization

    return PercentileNormalization(**kwargs)


PERCENTILE_NORMALIZE = LayerSpec(
    name="percentile_normalize",
    kind="pre",
    factory=_build_percentile_normalize,  # the Keras form (needs Keras; optional)
    params={
        "low": Param("float", default=1.0, help="lower percentile, mapped to 0 (0-100)"),
        "high": Param("float", default=99.8, help="upper percentile, mapped to 1 (0-100)"),
        "clip": Param("bool", default=False, help="clip the result to [0, 1]"),
    },
    description="per image: (x - p_low) / (p_high - p_low), for 16-bit microscopy images",
    # Percentiles are whole-image statistics: a tile sees other percentiles than the whole image.
    local=False,
    onnx=percentile_normalize,  # the ONNX form: works with every source, without TensorFlow
)


@hookimpl
def register_layers(register: Any) -> None:
    """Called once by czregistry's plugin host; ``register`` validates what it is given."""
    register(PERCENTILE_NORMALIZE)
