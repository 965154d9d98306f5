"""Pre- and post-processing layers: their specs and the ``name:key=value,...`` command-line syntax.

A plugin registers a ``LayerSpec`` whose ``factory`` builds the actual (Keras) layer; nothing here imports
TensorFlow, so ``czreg plugins`` and argument parsing stay fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import UsageError

__all__ = ["LayerSpec", "Param", "parse_layer_arg", "validate_layer_spec"]

ParamType = Literal["float", "int", "floats", "ints", "str", "bool"]


@dataclass(frozen=True)
class Param:
    type: ParamType
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class LayerSpec:
    """``name`` is the stable CLI name; ``factory(**params)`` returns a Keras layer."""

    name: str
    kind: Literal["pre", "post"]
    factory: Callable[..., Any]
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    #: True when an output pixel depends only on a bounded neighbourhood of input pixels (channel maps,
    #: affine maps): then tiled inference stays exact. False for whole-image statistics (per-image
    #: standardization): packing warns, since tiles then see different statistics than the whole image.
    local: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "local": self.local,
                "params": {k: {"type": p.type, "default": p.default, "required": p.required, "help": p.help}
                           for k, p in self.params.items()}}


def validate_layer_spec(obj: Any) -> str:
    if not isinstance(obj, LayerSpec):
        raise TypeError("register_layers expects a czregistry.layers.LayerSpec")
    if not obj.name or not obj.name.replace("_", "").isalnum() or obj.kind not in ("pre", "post"):
        raise TypeError(f"bad layer name or kind: {obj.name!r}, {obj.kind!r} (names are letters, digits and _; "
                        "kind is 'pre' or 'post')")
    if not callable(obj.factory):
        raise TypeError(f"layer '{obj.name}': factory {obj.factory!r} is not callable")
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
