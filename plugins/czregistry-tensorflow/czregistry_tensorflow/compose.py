"""Compose a trained Keras model with registered pre- and post-processing layers.

The packing helper calls ``prepend_and_append`` so that what ZEN feeds the packaged model (raw pixels)
goes through the same preprocessing the model was trained with, inside the exported graph.
TensorFlow/Keras are imported inside the function: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from czregistry.errors import PackError
from czregistry.layers import LayerSpec

__all__ = ["LayerCall", "build_layer", "prepend_and_append"]

#: A layer spec with the keyword arguments to build it (what ``parse_layer_arg`` returns).
LayerCall = tuple[LayerSpec, dict[str, Any]]


def build_layer(spec: LayerSpec, kwargs: dict[str, Any]) -> Any:
    """Build one Keras layer from its spec; a bad argument becomes a ``PackError`` naming the layer."""
    if spec.factory is None:
        raise PackError(f"layer '{spec.name}'{_origin(spec)} has only an ONNX form, no Keras layer to compose",
                        hint="pack with --model-format onnx: the layer is then spliced into the exported graph")
    try:
        return spec.factory(**kwargs)
    except Exception as exc:
        raise PackError(f"layer '{spec.name}'{_origin(spec)} cannot be built with {kwargs}: {exc}",
                        hint=f"check the parameters of '{spec.name}' in 'czreg plugins'") from exc


def _origin(spec: LayerSpec) -> str:
    """`` (plugin 'name')`` when the spec came from a loaded plugin, so errors name the plugin."""
    from czregistry.selection import available_layers

    found = available_layers().get(spec.name)
    return f" (plugin '{found[0]}')" if found is not None and found[1] is spec else ""


def prepend_and_append(model: Any, pre: Sequence[LayerCall], post: Sequence[LayerCall],
                       spatial_dims: Sequence[int | None] | None = None, *,
                       input_channels: int | None = None, name: str | None = None) -> Any:
    """Return a new ``keras.Model``: ``pre`` layers, then ``model``, then ``post`` layers.

    ``spatial_dims`` replaces the spatial part of the input shape (e.g. ``(None, None)`` to accept any
    tile size, or ``(256, 256)`` to fix one); by default the model's own input shape is kept.
    ``input_channels`` is needed only when a pre layer changes the channel count.
    The original model is nested unchanged (its weights are shared, not copied).
    """
    import keras

    in_shape = model.input_shape
    if isinstance(in_shape, list):
        if len(in_shape) != 1:
            raise PackError(f"model '{model.name}' has {len(in_shape)} inputs; packages need exactly one")
        in_shape = in_shape[0]
    in_shape = tuple(in_shape)
    spatial = tuple(in_shape[1:-1]) if spatial_dims is None else tuple(spatial_dims)
    if spatial_dims is not None and len(spatial) != len(in_shape) - 2:
        raise PackError(f"spatial_dims {tuple(spatial_dims)} has {len(spatial)} axes; model "
                        f"'{model.name}' takes {len(in_shape) - 2}")
    channels = in_shape[-1] if input_channels is None else input_channels
    for spec, _ in (*pre, *post):
        if not isinstance(spec, LayerSpec):
            raise PackError(f"expected a LayerSpec, got {spec!r}")
    for spec, _ in pre:
        if spec.kind != "pre":
            raise PackError(f"layer '{spec.name}' is a {spec.kind}-processing layer; it cannot go before the model")
    for spec, _ in post:
        if spec.kind != "post":
            raise PackError(f"layer '{spec.name}' is a {spec.kind}-processing layer; it cannot go after the model")
    inp = keras.Input(shape=(*spatial, channels), name="input", dtype="float32")
    x = inp
    try:
        for spec, kwargs in pre:
            x = build_layer(spec, kwargs)(x)
        x = model(x)
        for spec, kwargs in post:
            x = build_layer(spec, kwargs)(x)
    except PackError:
        raise
    except Exception as exc:
        raise PackError(f"cannot compose model '{model.name}' with the requested layers: {exc}",
                        hint="check that the layers fit the model's channel count") from exc
    return keras.Model(inp, x, name=name or f"{model.name}_packed")
