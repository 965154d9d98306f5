"""The ONNX form of the example layer: percentile normalisation as an ONNX fragment, built with ``onnx.helper``.

No framework is needed: ``czreg pack net.pt --pre percentile_normalize:...`` works in an environment with
PyTorch and without TensorFlow. The arithmetic follows the Keras form (``layers.py``) step by step in
float32, so the two agree within 1e-6: sort each image's pixels (``TopK`` with k = all of them, ascending),
take the two percentiles by linear interpolation (``numpy.percentile``'s default), rescale.
"""

from __future__ import annotations

from typing import Any

from czregistry.layers import FragmentContext, OnnxFragment

__all__ = ["percentile_normalize"]


def percentile_normalize(ctx: FragmentContext, low: float = 1.0, high: float = 99.8, clip: bool = False,
                         eps: float = 1e-6) -> OnnxFragment:
    """``(x - p_low) / max(p_high - p_low, eps)`` per image, for NHWC and NDHWC inputs, opset 11 and later."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not 0.0 <= float(low) < float(high) <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    if ctx.opset < 11:
        raise ValueError(f"needs opset 11 or later (TopK with largest=0), not {ctx.opset}")

    def const(name: str, value: Any, dtype: str) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    node = helper.make_node
    inits = [const("one_i", 1, "int64"), const("one_f", 1.0, "float32"), const("k_shape", [1], "int64"),
             const("eps", float(eps), "float32"),
             const("bcast", [-1] + [1] * (ctx.rank - 1), "int64")]
    nodes = [
        node("Flatten", ["x"], ["flat"], axis=1),                      # [N, pixels * channels]
        node("Shape", ["flat"], ["flat_shape"]),
        node("Gather", ["flat_shape", "one_i"], ["count_i"], axis=0),  # number of values per image
        node("Reshape", ["count_i", "k_shape"], ["k"]),
        node("TopK", ["flat", "k"], ["sorted", "order"], axis=1, largest=0, sorted=1),
        node("Cast", ["count_i"], ["count"], to=1),
        node("Sub", ["count", "one_f"], ["last"]),
        node("Sub", ["count_i", "one_i"], ["last_i"]),
    ]
    for tag, q in (("lo", low), ("hi", high)):
        inits.append(const(f"{tag}_q", float(q) / 100.0, "float32"))
        nodes += [
            node("Mul", [f"{tag}_q", "last"], [f"{tag}_pos"]),
            node("Floor", [f"{tag}_pos"], [f"{tag}_floor"]),
            node("Sub", [f"{tag}_pos", f"{tag}_floor"], [f"{tag}_frac"]),
            node("Cast", [f"{tag}_floor"], [f"{tag}_i0"], to=7),
            node("Add", [f"{tag}_i0", "one_i"], [f"{tag}_next"]),
            node("Min", [f"{tag}_next", "last_i"], [f"{tag}_i1"]),
            node("Gather", ["sorted", f"{tag}_i0"], [f"{tag}_v0"], axis=1),  # [N]
            node("Gather", ["sorted", f"{tag}_i1"], [f"{tag}_v1"], axis=1),
            node("Sub", [f"{tag}_v1", f"{tag}_v0"], [f"{tag}_step"]),
            node("Mul", [f"{tag}_frac", f"{tag}_step"], [f"{tag}_part"]),
            node("Add", [f"{tag}_v0", f"{tag}_part"], [f"{tag}_flat"]),
            node("Reshape", [f"{tag}_flat", "bcast"], [tag]),               # [N, 1, 1, (1,) 1]
        ]
    nodes += [
        node("Sub", ["x", "lo"], ["shifted"]),
        node("Sub", ["hi", "lo"], ["range"]),
        node("Max", ["range", "eps"], ["divisor"]),
        node("Div", ["shifted", "divisor"], ["y" if not clip else "unclipped"]),
    ]
    if clip:
        inits += [const("zero_f", 0.0, "float32")]
        nodes.append(node("Clip", ["unclipped", "zero_f", "one_f"], ["y"]))
    return OnnxFragment(nodes, inits, ctx.opset)
