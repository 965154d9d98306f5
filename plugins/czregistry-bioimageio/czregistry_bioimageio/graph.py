"""bioimage.io pre- and postprocessing as ONNX nodes around the package's network.

Why ONNX nodes and not czregistry layers: the ops are fixed arithmetic on the package's own axis order
(per-channel gains, thresholds, statistics over named axes); expressed as ONNX nodes they travel inside the
one graph a CZANN holds, run on every backend, and need no framework. The graph takes the host's NHWC
(NDHWC) tile, transposes it to the package's axis order, applies the preprocessing, runs the network, applies
the postprocessing and transposes back.

Per-sample statistics (``zero_mean_unit_variance``, ``scale_range`` at 0/100 percentiles) are computed over
the tensor the graph sees: the host's tile, not the whole image. ``Mapping.notes`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from czregistry.errors import UsageError

__all__ = ["Mapping", "OpsBuilder", "map_ops"]

#: bioimage.io op names this bridge refuses, with the reason (docs/bioimageio.md lists them).
REFUSED = {
    "scale_mean_variance": "it matches the statistics of another tensor, which a single-input CZANN does not have",
    "stardist_postprocessing": "instance post-processing is not part of the CZANN format",
    "cellpose_flow_dynamics": "instance post-processing is not part of the CZANN format",
}
_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
                "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13}


@dataclass
class Mapping:
    """What ``map_ops`` produced: the nodes and initializers, and lines for the user (image-global stats)."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    local: bool = True


class OpsBuilder:
    """Appends ONNX nodes for one tensor, whose axes are ``axes`` (their ids, in the package's order)."""

    def __init__(self, prefix: str, axes: list[str], opset: int, mapping: Mapping) -> None:
        self.prefix, self.axes, self.opset, self.m = prefix, axes, opset, mapping
        #: the tensor's id in the package (a ``reference_tensor`` naming another one is refused)
        self.tensor_id = ""
        self._n = 0

    def name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}_{what}_{self._n}"

    def const(self, values: Any, axis: str | None = None) -> str:
        """A float32 constant broadcastable to the tensor: a scalar, or a vector along ``axis``."""
        import numpy as np
        from onnx import numpy_helper

        arr = np.asarray(values, dtype=np.float32)
        if arr.ndim and axis is not None:
            shape = [1] * len(self.axes)
            shape[self.axes.index(axis)] = arr.size
            arr = arr.reshape(shape)
        name = self.name("c")
        self.m.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.m.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op: str, x: str, axes: list[int]) -> str:
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            import numpy as np
            from onnx import numpy_helper

            name = self.name("axes")
            self.m.initializers.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), name))
            return self.node(op, [x, name], keepdims=1)
        return self.node(op, [x], axes=axes, keepdims=1)

    def stat_axes(self, kwargs: Any) -> list[int]:
        """Reduction axes: the op's ``axes``, else every axis but batch (bioimage.io's per-sample default)."""
        named = [str(a) for a in (getattr(kwargs, "axes", None) or [])]
        if not named:
            named = [a for a in self.axes if a != "batch"]
        missing = [a for a in named if a not in self.axes]
        if missing:
            raise UsageError(f"the statistics axes {missing} are not axes of the tensor {self.axes}")
        return [self.axes.index(a) for a in named]


def _along(kwargs: Any, key: str) -> tuple[Any, str | None]:
    value = getattr(kwargs, key)
    axis = getattr(kwargs, "axis", None)
    return (list(value) if isinstance(value, list | tuple) else value), (str(axis) if axis is not None else None)


def map_ops(ops: list[Any], x: str, b: OpsBuilder, where: str) -> str:
    """Append nodes for ``ops`` (bioimage.io v0.5 processing descriptions) to ``x``; return the result name."""
    for op in ops:
        oid = str(op.id)
        kw: Any = getattr(op, "kwargs", None)
        if oid in REFUSED:
            raise UsageError(f"the {where} op '{oid}' has no CZANN equivalent: {REFUSED[oid]}",
                             hint="see docs/bioimageio.md for the ops that map")
        if oid == "scale_linear":
            gain, axis = _along(kw, "gain")
            offset, _ = _along(kw, "offset")
            x = b.node("Add", [b.node("Mul", [x, b.const(gain, axis)]), b.const(offset, axis)])
        elif oid == "clip":
            if getattr(kw, "min_percentile", None) is not None or getattr(kw, "max_percentile", None) is not None:
                raise UsageError(f"the {where} op 'clip' clips at percentiles, which has no CZANN equivalent",
                                 hint="clip at fixed values (min/max)")
            lo = b.const(kw.min if kw.min is not None else -3.4e38)
            hi = b.const(kw.max if kw.max is not None else 3.4e38)
            x = b.node("Clip", [x, lo, hi])
        elif oid == "sigmoid":
            x = b.node("Sigmoid", [x])
        elif oid == "softmax":
            x = b.node("Softmax", [x], axis=b.axes.index(str(kw.axis)))
        elif oid == "binarize":
            threshold, axis = _along(kw, "threshold")
            x = b.node("Cast", [b.node("Greater", [x, b.const(threshold, axis)])], to=1)
        elif oid == "fixed_zero_mean_unit_variance":
            mean, axis = _along(kw, "mean")
            std, _ = _along(kw, "std")
            x = b.node("Div", [b.node("Sub", [x, b.const(mean, axis)]), b.const(std, axis)])
        elif oid == "zero_mean_unit_variance":
            axes = b.stat_axes(kw)
            mean = b.reduce("ReduceMean", x, axes)
            centred = b.node("Sub", [x, mean])
            std = b.node("Sqrt", [b.reduce("ReduceMean", b.node("Mul", [centred, centred]), axes)])
            x = b.node("Div", [centred, b.node("Add", [std, b.const(kw.eps)])])
            b.m.local = False
            b.m.notes.append(f"{where} 'zero_mean_unit_variance' uses per-sample statistics: in the CZANN they "
                             "are computed over each tile, not the whole image (validate's tiling checks "
                             "measure the seams)")
        elif oid == "scale_range":
            if getattr(kw, "reference_tensor", None) is not None and str(kw.reference_tensor) != b.tensor_id:
                raise UsageError(f"the {where} op 'scale_range' refers to another tensor "
                                 f"'{kw.reference_tensor}', which a single-input CZANN does not have")
            if (kw.min_percentile, kw.max_percentile) != (0.0, 100.0):
                raise UsageError(f"the {where} op 'scale_range' uses the {kw.min_percentile}/{kw.max_percentile} "
                                 "percentiles of each sample; CZANN graphs here compute only min/max (0/100)",
                                 hint="use min_percentile 0 and max_percentile 100, or fixed "
                                      "scale_linear/fixed_zero_mean_unit_variance values")
            axes = b.stat_axes(kw)
            lo, hi = b.reduce("ReduceMin", x, axes), b.reduce("ReduceMax", x, axes)
            x = b.node("Div", [b.node("Sub", [x, lo]), b.node("Add", [b.node("Sub", [hi, lo]), b.const(kw.eps)])])
            b.m.local = False
            b.m.notes.append(f"{where} 'scale_range' uses per-sample min/max: in the CZANN they are computed "
                             "over each tile, not the whole image (validate's tiling checks measure the seams)")
        elif oid == "ensure_dtype":
            dtype = str(kw.dtype)
            if dtype not in _ONNX_DTYPES:
                raise UsageError(f"the {where} op 'ensure_dtype' asks for {dtype}, which ONNX has no type for")
            x = b.node("Cast", [x], to=_ONNX_DTYPES[dtype])
        else:
            raise UsageError(f"the {where} op '{oid}' has no CZANN equivalent",
                             hint="see docs/bioimageio.md for the ops that map")
    return x
