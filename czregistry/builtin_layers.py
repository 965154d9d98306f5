"""The built-in pre- and post-processing layers, in both forms: ONNX fragments (no framework needed) and Keras.

A built-in plugin of the core (``DEFAULT_PLUGINS`` in ``czregistry.plugins``): it registers ``LAYER_SPECS``
through ``register_layers``, like any plugin. Each spec has

- ``onnx``: the layer as an ``OnnxFragment`` built with ``onnx.helper``, for NHWC and NDHWC inputs and any
  opset from 11 (nodes whose signature changed, like ``ReduceMean`` at 18, are written for the opset asked).
  The packer splices it around the graph of every source, so PyTorch and ONNX users pack with these layers
  without TensorFlow;
- ``factory``: the same layer in Keras (``czregistry.keras_layers``), for Keras models composed in Keras and
  SavedModel packages. It needs Keras (the ``czregistry-tensorflow`` plugin); nothing imports it otherwise.

The two forms compute the same float32 arithmetic in the same order (``tests/test_layers.py`` holds them
within 1e-6 of each other). ``onnx`` is imported only when a fragment is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .hookspecs import hookimpl
from .layers import FragmentContext, LayerSpec, OnnxFragment, Param

__all__ = ["LAYER_SPECS", "register_layers"]

#: ``TopK`` with ``largest``/``sorted`` and ``Clip`` with min/max inputs need opset 11.
MIN_OPSET = 11


def _keras(class_name: str) -> Any:
    """The Keras form: builds ``czregistry.keras_layers.<class_name>``, importing Keras only when called."""

    def build(**kwargs: Any) -> Any:
        from . import keras_layers

        return getattr(keras_layers, class_name)(**kwargs)

    build.__name__ = build.__qualname__ = f"build_{class_name}"
    build.__doc__ = f"Build a czregistry.keras_layers.{class_name} (needs Keras)."
    return build


def _check_opset(ctx: FragmentContext, name: str) -> None:
    if ctx.opset < MIN_OPSET:
        raise ValueError(f"the ONNX form of '{name}' needs opset {MIN_OPSET} or later, not {ctx.opset}")


def _floats(value: float | Sequence[float], what: str, ctx: FragmentContext) -> list[float]:
    """A scalar or per-channel vector; a vector of length > 1 must match the channel count (1 broadcasts)."""
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if not values:
        raise ValueError(f"{what} must not be empty")
    if len(values) > 1 and ctx.channels is not None and ctx.channels != len(values):
        raise ValueError(f"{len(values)} per-channel values given but the input has {ctx.channels} channels")
    return values


def _const(name: str, values: Sequence[float] | Sequence[int], dtype: str = "float32",
           dims: Sequence[int] | None = None) -> Any:
    import numpy as np
    from onnx import numpy_helper

    array = np.asarray(values, dtype=dtype)
    if dims is not None:
        array = array.reshape(tuple(dims))
    return numpy_helper.from_array(array, name)


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def _reduce(op: str, x: str, axes: Sequence[int], out: str, ctx: FragmentContext, keepdims: int,
            inits: list[Any]) -> Any:
    """``op`` over ``axes``: ``ReduceMean`` / ``ReduceProd`` take the axes as an input from opset 18 (``ReduceSum``
    from 13), as an attribute before."""
    from_input = 13 if op == "ReduceSum" else 18
    if ctx.opset >= from_input:
        inits.append(_const(f"{out}_axes", list(axes), "int64"))
        return _node(op, [x, f"{out}_axes"], [out], keepdims=keepdims)
    return _node(op, [x], [out], axes=list(axes), keepdims=keepdims)


# -- the fragments ---------------------------------------------------------------------------------------

def _transpose(ctx: FragmentContext, order: Sequence[int], name: str = "transpose_channels") -> OnnxFragment:
    order = [int(i) for i in order]
    if not order or sorted(order) != list(range(len(order))):
        raise ValueError(f"order must be a permutation of 0..n-1, got {list(order)}")
    if ctx.channels is not None and ctx.channels != len(order):
        raise ValueError(f"order {order} needs {len(order)} channels, the input has {ctx.channels}")
    return OnnxFragment([_node("Gather", ["x", "order"], ["y"], axis=-1)], [_const("order", order, "int64")],
                        ctx.opset)


def transpose_channels(ctx: FragmentContext, order: Sequence[int]) -> OnnxFragment:
    """Output channel ``i`` is input channel ``order[i]``: a ``Gather`` on the last axis."""
    return _transpose(ctx, order)


def rgb_to_bgr(ctx: FragmentContext) -> OnnxFragment:
    return _transpose(ctx, [2, 1, 0])


def rgba_to_bgra(ctx: FragmentContext) -> OnnxFragment:
    return _transpose(ctx, [2, 1, 0, 3])


def per_image_standardization(ctx: FragmentContext) -> OnnxFragment:
    """``(x - mean) / max(std, 1/sqrt(N))`` over all pixels and channels of each image, as
    ``tf.image.per_image_standardization`` (and the Keras form) computes it."""
    _check_opset(ctx, "per_image_standardization")
    axes = list(range(1, ctx.rank))
    inits: list[Any] = [_const("one", [1], "int64"), _const("rank", [ctx.rank], "int64")]
    nodes = [
        _reduce("ReduceMean", "x", axes, "mean", ctx, 1, inits),
        _node("Sub", ["x", "mean"], ["centred"]),
        _node("Mul", ["centred", "centred"], ["squared"]),
        _reduce("ReduceMean", "squared", axes, "var", ctx, 1, inits),
        _node("Sqrt", ["var"], ["std"]),
        _node("Shape", ["x"], ["shape"]),
        _node("Slice", ["shape", "one", "rank"], ["sizes"]),
        _node("ReduceProd", ["sizes"], ["count_int"], keepdims=0),
        _node("Cast", ["count_int"], ["count"], to=1),
        _node("Sqrt", ["count"], ["sqrt_count"]),
        _node("Reciprocal", ["sqrt_count"], ["min_std"]),
        _node("Max", ["std", "min_std"], ["divisor"]),
        _node("Div", ["centred", "divisor"], ["y"]),
    ]
    return OnnxFragment(nodes, inits, ctx.opset)


def normalize(ctx: FragmentContext, mean: float | Sequence[float] = 0.0,
              std: float | Sequence[float] = 1.0) -> OnnxFragment:
    """``(x - mean) * (1 / std)``: the reciprocal is taken in double and stored as float32, as in Keras."""
    means, stds = _floats(mean, "mean", ctx), _floats(std, "std", ctx)
    if any(s == 0 for s in stds):
        raise ValueError("std must not be zero")
    return OnnxFragment([_node("Sub", ["x", "mean"], ["centred"]), _node("Mul", ["centred", "inv_std"], ["y"])],
                        [_const("mean", means), _const("inv_std", [1.0 / s for s in stds])], ctx.opset)


def shift(ctx: FragmentContext, offset: float | Sequence[float] = 0.0) -> OnnxFragment:
    return OnnxFragment([_node("Add", ["x", "offset"], ["y"])], [_const("offset", _floats(offset, "offset", ctx))],
                        ctx.opset)


def scale(ctx: FragmentContext, factor: float | Sequence[float] = 1.0) -> OnnxFragment:
    return OnnxFragment([_node("Mul", ["x", "factor"], ["y"])], [_const("factor", _floats(factor, "factor", ctx))],
                        ctx.opset)


def sigmoid_to_softmax(ctx: FragmentContext) -> OnnxFragment:
    """One sigmoid channel ``p`` to ``[1 - p, p]``."""
    if ctx.channels is not None and ctx.channels != 1:
        raise ValueError(f"expects a 1-channel sigmoid output, got {ctx.channels} channels")
    return OnnxFragment([_node("Sub", ["one", "x"], ["background"]),
                         _node("Concat", ["background", "x"], ["y"], axis=-1)], [_const("one", [1.0], dims=())],
                        ctx.opset)


def softmax(ctx: FragmentContext) -> OnnxFragment:
    """Softmax over the channel axis. Before opset 13 ``Softmax`` flattens from ``axis``; for the last axis
    that is the same computation."""
    return OnnxFragment([_node("Softmax", ["x"], ["y"], axis=-1)], (), ctx.opset)


LAYER_SPECS: tuple[LayerSpec, ...] = (
    LayerSpec("rgb_to_bgr", "pre", _keras("RgbToBgr"), {},
              "swap red and blue of a 3-channel image", onnx=rgb_to_bgr),
    LayerSpec("rgba_to_bgra", "pre", _keras("RgbaToBgra"), {},
              "swap red and blue of a 4-channel image, alpha stays last", onnx=rgba_to_bgra),
    LayerSpec("per_image_standardization", "pre", _keras("PerImageStandardization"), {},
              "each image to zero mean and unit variance (tf.image.per_image_standardization)",
              local=False, onnx=per_image_standardization),
    LayerSpec("normalize", "pre", _keras("Normalization"), {
        "mean": Param("floats", required=True, help="mean, one value or one per channel: 0.5 or [0.4,0.5,0.6]"),
        "std": Param("floats", required=True, help="standard deviation, one value or one per channel"),
    }, "(x - mean) / std", onnx=normalize),
    LayerSpec("shift", "pre", _keras("Shift"), {
        "offset": Param("floats", required=True, help="added to every pixel, one value or one per channel"),
    }, "x + offset", onnx=shift),
    LayerSpec("scale", "pre", _keras("Scale"), {
        "factor": Param("floats", required=True, help="multiplies every pixel, e.g. 0.00392156862745098 for 1/255"),
    }, "x * factor", onnx=scale),
    LayerSpec("transpose_channels", "pre", _keras("TransposeChannels"), {
        "order": Param("ints", required=True, help="new channel order, a permutation: [2,1,0]"),
    }, "reorder channels: output channel i is input channel order[i]", onnx=transpose_channels),
    LayerSpec("sigmoid_to_softmax", "post", _keras("SigmoidToSoftmaxScores"), {},
              "one sigmoid channel p to two class scores [1-p, p]", onnx=sigmoid_to_softmax),
    LayerSpec("softmax", "post", _keras("Softmax"), {},
              "softmax over the channels: class probabilities from a model that ends in logits", onnx=softmax),
)


@hookimpl
def register_layers(register: Any) -> None:
    for spec in LAYER_SPECS:
        register(spec)
