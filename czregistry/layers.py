"""Pre- and post-processing layers: their specs and the ``name:key=value,...`` command-line syntax.

A plugin registers a ``LayerSpec`` with one or both forms of the layer:

- ``onnx(ctx, **params)``: an ONNX fragment (``OnnxFragment``: nodes, initializers, the opset they are written
  for, one input, one output; or a whole one-input one-output ``onnx.ModelProto``, e.g. from onnxscript).
  ``ctx`` (``FragmentContext``) says the input shape (``[N, H, W, C]`` or ``[N, D, H, W, C]``) and the opset
  wanted. The packer splices the fragment in front of or behind the graph of every source: ONNX, PyTorch and
  Keras alike. This form needs no framework: a PyTorch user packs with layers without TensorFlow.
- ``factory(**params)``: a Keras layer, for Keras models composed in Keras (SavedModel packages) and for
  layers written before the ONNX form existed. It needs the ``czregistry-tensorflow`` plugin.

Why ONNX is the common form: every package holds ONNX (Keras models are converted anyway), so a fragment is
the one thing every source can take, and ``onnx.helper`` has no heavy dependency. Nothing here imports ONNX
or TensorFlow, so ``czreg plugins`` and argument parsing stay fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import UsageError

__all__ = ["FragmentContext", "LayerSpec", "OnnxFragment", "Param", "parse_layer_arg", "validate_layer_spec"]

ParamType = Literal["float", "int", "floats", "ints", "str", "bool"]


@dataclass(frozen=True)
class Param:
    type: ParamType
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class FragmentContext:
    """What an ONNX layer form is built for: the tensor it receives and the opset the package uses."""

    #: Input shape, batch first, channels last; ``None`` for a size the package leaves free.
    shape: tuple[int | None, ...]
    #: The default-domain opset the packed graph uses; write nodes valid at it (e.g. ``ReduceMean`` takes its
    #: axes as an input from 18, as an attribute before), and return it as ``OnnxFragment.opset``.
    opset: int

    @property
    def rank(self) -> int:
        """4 for NHWC, 5 for NDHWC."""
        return len(self.shape)

    @property
    def channels(self) -> int | None:
        return self.shape[-1] if self.shape else None

    @property
    def spatial_axes(self) -> list[int]:
        """The axes between batch and channels: ``[1, 2]`` for NHWC, ``[1, 2, 3]`` for NDHWC."""
        return list(range(1, len(self.shape) - 1))


@dataclass(frozen=True)
class OnnxFragment:
    """A layer as ONNX: ``nodes`` (``onnx.NodeProto``) read ``input`` and write ``output`` (float32, channels
    last); ``initializers`` (``onnx.TensorProto``) hold constants; ``opset`` is the default-domain opset the
    nodes are written for (the packer converts it when the package needs another). Names are the fragment's
    own: the packer prefixes them, so two fragments never collide."""

    nodes: Sequence[Any]
    initializers: Sequence[Any] = ()
    opset: int = 18
    input: str = "x"
    output: str = "y"


@dataclass(frozen=True)
class LayerSpec:
    """``name`` is the stable CLI name; ``onnx(ctx, **params)`` returns the layer as an ONNX fragment and/or
    ``factory(**params)`` returns it as a Keras layer (see the module docstring). At least one is needed."""

    name: str
    kind: Literal["pre", "post"]
    factory: Callable[..., Any] | None
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    #: True when an output pixel depends only on a bounded neighbourhood of input pixels (channel maps,
    #: affine maps): then tiled inference stays exact. False for whole-image statistics (per-image
    #: standardization): packing warns, since tiles then see different statistics than the whole image.
    local: bool = True
    #: ``onnx(ctx: FragmentContext, **params) -> OnnxFragment | onnx.ModelProto``: the framework-free form.
    onnx: Callable[..., Any] | None = None

    @property
    def forms(self) -> list[str]:
        """Which forms the layer has: ``onnx`` (packs from any source, no TensorFlow), ``keras``."""
        return [name for name, form in (("onnx", self.onnx), ("keras", self.factory)) if form is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "local": self.local, "forms": self.forms,
                "params": {k: {"type": p.type, "default": p.default, "required": p.required, "help": p.help}
                           for k, p in self.params.items()}}


def validate_layer_spec(obj: Any) -> str:
    if not isinstance(obj, LayerSpec):
        raise TypeError("register_layers expects a czregistry.layers.LayerSpec")
    if not obj.name or not obj.name.replace("_", "").isalnum() or obj.kind not in ("pre", "post"):
        raise TypeError(f"bad layer name or kind: {obj.name!r}, {obj.kind!r} (names are letters, digits and _; "
                        "kind is 'pre' or 'post')")
    if obj.factory is None and obj.onnx is None:
        raise TypeError(f"layer '{obj.name}' has no form: give onnx= (an ONNX fragment builder) or factory= "
                        "(a Keras layer builder)")
    for what, form in (("factory", obj.factory), ("onnx", obj.onnx)):
        if form is not None and not callable(form):
            raise TypeError(f"layer '{obj.name}': {what} {form!r} is not callable")
    for key, param in obj.params.items():
        if not isinstance(param, Param) or param.type not in get_args(ParamType):
            raise TypeError(f"layer '{obj.name}': parameter '{key}' must be a Param with type one of "
                            f"{', '.join(get_args(ParamType))}")
    return f"{obj.name} ({obj.kind})"


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``mean=[0.5,0.4],std=0.2`` -> two items."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in (s.strip() for s in parts) if p]


def _convert(layer: str, key: str, raw: str, p: Param) -> Any:
    try:
        if p.type in ("floats", "ints"):
            text = raw.strip()
            items = json.loads(text.replace("(", "[").replace(")", "]")) if text.startswith(("[", "(")) else [
                float(x) for x in text.split("/")]
            if not isinstance(items, list):
                items = [items]
            values = [float(v) for v in items]
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(raw)
            if p.type == "ints":
                if any(v != int(v) for v in values):
                    raise ValueError(raw)
                return [int(v) for v in values]
            return values
        if p.type == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if p.type == "int":
            return int(raw)
        if p.type == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return raw
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UsageError(f"layer '{layer}': parameter '{key}' expects {p.type}, got '{raw}'",
                         hint="lists are written [1,2,3]") from exc


def parse_layer_arg(arg: str, specs: dict[str, LayerSpec]) -> tuple[LayerSpec, dict[str, Any]]:
    """Parse ``normalize:mean=0.5,std=0.2`` into the spec and typed keyword arguments. ``specs`` is what the
    plugins registered (``czregistry.selection.layer_specs()``)."""
    name, _, rest = arg.partition(":")
    name = name.strip()
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none installed"
        raise UsageError(f"unknown layer '{name}' (available: {known})", hint="see 'czreg plugins'")
    spec = specs[name]
    kwargs: dict[str, Any] = {}
    for item in _split_top(rest):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in spec.params:
            allowed = ", ".join(spec.params) or "no parameters"
            raise UsageError(f"layer '{name}': bad parameter '{item}' (takes {allowed})")
        if key in kwargs:
            raise UsageError(f"layer '{name}': parameter '{key}' is given twice")
        kwargs[key] = _convert(name, key, raw.strip(), spec.params[key])
    for key, p in spec.params.items():
        if key not in kwargs:
            if p.required:
                raise UsageError(f"layer '{name}' needs parameter '{key}' ({p.help or p.type})")
            if p.default is not None:
                kwargs[key] = p.default
    return spec, kwargs
