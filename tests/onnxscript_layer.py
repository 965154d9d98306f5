"""docs/plugins.md's onnxscript layer, verbatim: a gamma correction, opset-aware. onnxscript reads the type
annotations of ``layer`` at definition time, so this module imports ``FLOAT`` at top level and does not use
``from __future__ import annotations`` (which would turn the annotations into strings)."""

from typing import Any

from onnxscript import FLOAT, script
from onnxscript.values import Opset


def gamma(ctx: Any, gamma: float = 0.5) -> Any:
    op = Opset("", ctx.opset)     # the package's opset
    g = float(gamma)

    @script(default_opset=op)
    def layer(x: FLOAT[...]) -> FLOAT[...]:
        return op.Pow(op.Relu(x), op.Constant(value_float=g))

    return layer.to_model_proto()
