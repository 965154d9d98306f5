"""onnx2torch converters for opset-18 forms of ops that tf2onnx emits and onnx2torch 1.5 lacks.

Opset 18 moved ``axes`` of the Reduce ops from an attribute to an input, gave ``Split`` a
``num_outputs`` attribute and ``Pad`` an optional ``axes`` input; onnx2torch registers only the older
versions, so every Keras model with a global average pooling (``ReduceMean``) or a dilated convolution
(tf2onnx's ``SpaceToBatch`` rewrite uses ``Split``, ``Pad``, ``SpaceToDepth``, which onnx2torch lacks
in every version, and ``DepthToSpace`` in DCR mode, which it refuses) exported at opset 18 failed to
convert. Registered through onnx2torch's own
``add_converter`` registry, only for versions it does not already have. Imported lazily: this module
imports torch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from onnx2torch.node_converters import registry as _registry  # type: ignore[import-untyped]
from onnx2torch.node_converters.registry import add_converter, get_converter  # type: ignore[import-untyped]
from onnx2torch.utils.common import (  # type: ignore[import-untyped]
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    onnx_mapping_from_node,
)
from torch import nn

__all__ = ["register"]

_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}
#: (op, version) pairs registered here; ReduceMax/ReduceMin changed again in opset 20 (same semantics
#: for float tensors).
_REDUCE_VERSIONS = [(op, 18) for op in _REDUCERS] + [("ReduceMax", 20), ("ReduceMin", 20)]


class Reduce18(nn.Module, OnnxToTorchModule):
    """A Reduce op whose axes come from a constant (folded at conversion) or a runtime input."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool) -> None:
        super().__init__()
        self.op = op
        self.axes = axes
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = self.axes if self.axes is not None else ([int(a) for a in axes.tolist()] if axes is not None else [])
        if not dims:
            if self.noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return _REDUCERS[self.op](x, sorted(d % x.dim() for d in dims), self.keepdims)


class Split18(nn.Module, OnnxToTorchModule):
    """ONNX Split-18: sizes from the ``split`` input, else ``num_outputs`` chunks of ceil(n / num_outputs)
    (the last one smaller), as the opset-18 spec defines."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if split is not None:
            return torch.split(x, [int(s) for s in split.tolist()], dim=self.axis)
        length = x.shape[self.axis]
        return torch.split(x, -(-length // self.num_outputs), dim=self.axis)


class SpaceToDepth(nn.Module, OnnxToTorchModule):
    """ONNX SpaceToDepth on NCHW: each ``b x b`` block becomes ``b * b`` channels, block-row-major, with
    the input channel varying fastest (the spec's reshape/transpose/reshape)."""

    def __init__(self, blocksize: int) -> None:
        super().__init__()
        self.blocksize = blocksize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocksize
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)


def _space_to_depth_converter(node: Any, graph: Any) -> Any:
    module = SpaceToDepth(int(node.attributes["blocksize"]))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class DepthToSpaceDCR(nn.Module, OnnxToTorchModule):
    """ONNX DepthToSpace in DCR mode (the default; onnx2torch implements only CRD = ``pixel_shuffle``)."""

    def __init__(self, blocksize: int) -> None:
        super().__init__()
        self.blocksize = blocksize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocksize
        n, c, h, w = x.shape
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)


def _wrap_depth_to_space(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        if node.attributes.get("mode", "DCR") != "DCR":
            return original(node, graph)
        module = DepthToSpaceDCR(int(node.attributes["blocksize"]))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    return convert


def _reduce_converter(op: str) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        attrs = node.attributes
        inputs = node.input_values
        axes: list[int] | None = None
        if len(inputs) > 1 and inputs[1] and inputs[1] in graph.initializers:
            axes = [int(a) for a in graph.initializers[inputs[1]].to_torch().tolist()]
            mapping = OnnxMapping(inputs=inputs[:1], outputs=node.output_values)
        else:
            mapping = onnx_mapping_from_node(node)
        module = Reduce18(op, axes, bool(attrs.get("keepdims", 1)), bool(attrs.get("noop_with_empty_axes", 0)))
        return OperationConverterResult(torch_module=module, onnx_mapping=mapping)

    return convert


def _split_converter(node: Any, graph: Any) -> Any:
    attrs = node.attributes
    module = Split18(int(attrs.get("axis", 0)), int(attrs.get("num_outputs", len(node.output_values))))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _pad_converter(node: Any, graph: Any) -> Any:
    """Pad-18/19/21 without the new ``axes`` input is Pad-13 (19 adds mode ``wrap``, which onnx2torch's
    Pad-13 converter refuses by name)."""
    inputs = node.input_values
    if len(inputs) > 3 and inputs[3]:
        raise NotImplementedError("Pad with an 'axes' input is not supported")
    return get_converter(operation_type="Pad", version=13)(node, graph)


_registered = False


def register() -> None:
    """Add the converters once per process; a version onnx2torch already has is left to onnx2torch."""
    global _registered
    if _registered:
        return
    _registered = True
    # onnx2torch's Slice indexes with a list of slices; torch warns that this may change meaning some
    # day. Results are checked against ONNX Runtime in the tests; the warning would only alarm users.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                            category=UserWarning)
    pairs: list[tuple[str, int, Callable[[Any, Any], Any]]] = [
        (op, version, _reduce_converter(op)) for op, version in _REDUCE_VERSIONS]
    pairs.append(("Split", 18, _split_converter))
    pairs += [("Pad", version, _pad_converter) for version in (18, 19, 21)]
    pairs += [("SpaceToDepth", version, _space_to_depth_converter) for version in (1, 13)]
    for op, version, converter in pairs:
        with contextlib.suppress(ValueError):  # "already registered": a newer onnx2torch supports it itself
            add_converter(operation_type=op, version=version)(converter)
    # DepthToSpace is registered but refuses DCR: wrap onnx2torch's converter in its (private) registry,
    # delegating CRD to it; skipped if a future onnx2torch reorganises the registry.
    table = getattr(_registry, "_CONVERTER_REGISTRY", None)
    description = getattr(_registry, "OperationDescription", None)
    if isinstance(table, dict) and description is not None:
        for version in (1, 11, 13):
            key = description(domain="", operation_type="DepthToSpace", version=version)
            table[key] = _wrap_depth_to_space(table[key]) if key in table else _wrap_depth_to_space(
                get_converter(operation_type="DepthToSpace", version=13))
