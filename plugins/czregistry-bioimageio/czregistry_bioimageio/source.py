"""The bioimage.io model source: ``czreg pack model.zip|rdf.yaml -o x.czann``.

The package's network (ONNX weights, else TorchScript exported with ``torch.onnx``) is wrapped in one ONNX
graph: the host's NHWC / NDHWC tile in, transposed to the package's axis order, scaled from the host's
[0, 1] to the package's input data type, its preprocessing, the network, its postprocessing, and back to
channels-last (``graph.map_ops``). Before packing continues, the package's own test input goes through that
graph and must give its test output within the package's reproducibility tolerance (default: relative and
absolute 1e-3, 100 mismatched elements per million); packing's own parity check then ties the written
CZANN to this graph within 1e-4. The package's name, halo (as ``MinOverlap``, 2 x halo) and a tile become
metadata; license, authors and citation become the package's license member (CZANN has no fields for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from czregistry.errors import PackError, UsageError, first_line
from czregistry.onnx.source import onnx_reference
from czregistry.sources import LoadedSource, LoadOptions, Source

from .graph import Mapping, OpsBuilder, map_ops
from .reader import is_bioimageio_path, open_description, read_array, read_file

__all__ = ["BioimageioSource", "axis_ids", "host_scale", "to_host_layout"]

_INT_RANGES = {"uint8": 255.0, "uint16": 65535.0}


def axis_ids(tensor: Any) -> list[str]:
    """The tensor's axes as ``batch``, ``channel`` and space ids; time and index axes are refused."""
    out = []
    for a in tensor.axes:
        if a.type == "batch":
            out.append("batch")
        elif a.type == "channel":
            out.append("channel")
        elif a.type == "space":
            out.append(str(a.id))
        else:
            raise UsageError(f"tensor '{tensor.id}' has a {a.type} axis '{a.id}'; CZANN tiles have only "
                             "space and channel axes")
    return out


def host_order(ids: list[str]) -> list[str]:
    """The CZANN order of a tensor's axes: batch, space (z, y, x), channel."""
    space = [a for a in ids if a not in ("batch", "channel")]
    if len(space) not in (2, 3):
        raise UsageError(f"the tensor has {len(space)} space axes; CZANN models are 2D or 3D")
    if set(space) <= {"z", "y", "x"}:
        space = sorted(space, key="zyx".index)
    return ["batch", *space, "channel"]


def host_scale(tensor: Any) -> float:
    """What the host's [0, 1] tile is multiplied by to reach the package's input values: the upper end of
    the input's declared data range, else the type's range (255 for uint8, 65535 for uint16), else 1."""
    rng = getattr(tensor.data, "range", None)
    if rng is not None and rng[1] is not None and rng[0] in (0, 0.0, None) and float(rng[1]) > 0:
        return float(rng[1])
    return _INT_RANGES.get(str(getattr(tensor.data, "type", "float32")), 1.0)


def to_host_layout(array: Any, ids: list[str]) -> Any:
    """A tensor in the package's axis order as NHWC / NDHWC (size-1 batch/channel added when absent)."""
    import numpy as np

    order = host_order(ids)
    full = list(ids)
    for a in ("batch", "channel"):
        if a not in full:
            array = array[..., None]
            full.append(a)
    return np.transpose(array, [full.index(a) for a in order])


def _channels(tensor: Any) -> int:
    for a in tensor.axes:
        if a.type == "channel":
            return len(a.channel_names)
    return 1


def _int64(name: str, values: list[int]) -> Any:
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _axes_node(builder: OpsBuilder, op: str, x: str, axes: list[int], name: str) -> str:
    """``Squeeze``/``Unsqueeze`` of ``axes``: an input tensor from opset 13 on, an attribute before."""
    if builder.opset >= 13:
        builder.m.initializers.append(_int64(name, axes))
        return builder.node(op, [x, name])
    return builder.node(op, [x], axes=axes)


def _torchscript_onnx(data: bytes, example: Any, ids: list[str], opset: int) -> bytes:
    import io

    import torch

    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise PackError(f"the TorchScript weights do not load: {first_line(exc)}") from exc
    module.eval()
    axes = {i: f"d{i}" for i, a in enumerate(ids) if a != "channel"}
    buf = io.BytesIO()
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.from_numpy(example),), buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=opset,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": axes, "y": axes})
    except Exception as exc:
        raise PackError(f"torch.onnx cannot export the TorchScript weights at opset {opset}: {first_line(exc)}",
                        hint="pack a bioimage.io package with ONNX weights instead") from exc
    return buf.getvalue()


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename the tensor ``old`` everywhere in ``graph`` (inputs, outputs, nodes, value infos, initializers)."""
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if v.name == old:
            v.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def wrap_network(net: bytes, descr: Any) -> tuple[bytes, Mapping]:
    """The package's network with the host layout, input scaling and pre/postprocessing around it."""
    import onnx
    from onnx import helper

    model = onnx.load_model_from_string(net)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise PackError(f"the package's ONNX weights use opset {opset}; czregistry maps processing from opset 11",
                        hint="convert the weights to a newer opset first")
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [i for i in g.input if i.name not in inits]
    if len(ins) != 1 or len(g.output) != 1:
        raise PackError(f"the network has {len(ins)} inputs and {len(g.output)} outputs; a CZANN needs one of each")
    for taken in ("input", "output"):  # the wrapper's own names (a czregistry export uses them inside too)
        _rename(g, taken, f"czbio_net_{taken}")
    inp, out = descr.inputs[0], descr.outputs[0]
    in_ids, out_ids = axis_ids(inp), axis_ids(out)
    mapping = Mapping()
    # host NHWC -> package order, scaled to the package's input type
    pre = OpsBuilder("czbio_pre", in_ids, opset, mapping)
    order = host_order(in_ids)
    missing = [a for a in ("batch", "channel") if a not in in_ids]
    x = pre.node("Mul", ["input", pre.const(host_scale(inp))])
    x = pre.node("Transpose", [x], perm=[order.index(a) for a in [*in_ids, *missing]])
    if missing:
        x = _axes_node(pre, "Squeeze", x, list(range(len(in_ids), len(in_ids) + len(missing))), "czbio_sq")
    if str(inp.data.type) != "float32" and not inp.preprocessing:
        x = pre.node("Cast", [pre.node("Round", [x])], to=int(ins[0].type.tensor_type.elem_type))
    pre.tensor_id = str(inp.id)
    x = map_ops(list(inp.preprocessing), x, pre, "pre")
    pre_nodes = [*mapping.nodes, helper.make_node("Identity", [x], [ins[0].name], name="czbio_into_net")]
    mapping.nodes = []
    post = OpsBuilder("czbio_post", out_ids, opset, mapping)
    post.tensor_id = str(out.id)
    y = map_ops(list(out.postprocessing), g.output[0].name, post, "post")
    y = post.node("Cast", [y], to=1)
    out_order = host_order(out_ids)
    out_missing = [a for a in ("batch", "channel") if a not in out_ids]
    if out_missing:
        y = _axes_node(post, "Unsqueeze", y, list(range(len(out_ids), len(out_ids) + len(out_missing))), "czbio_unsq")
    full = [*out_ids, *out_missing]
    mapping.nodes.append(helper.make_node("Transpose", [y], ["output"], name="czbio_to_host",
                                          perm=[full.index(a) for a in out_order]))
    nodes = [*pre_nodes, *g.node, *mapping.nodes]
    rank = len(order)
    new_in = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                           ["batch", *[f"s{i}" for i in range(1, rank - 1)], _channels(inp)])
    new_out = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None] * len(out_order))
    graph = helper.make_graph(nodes, g.name or "bioimageio", [new_in], [new_out],
                              [*g.initializer, *mapping.initializers], value_info=list(g.value_info))
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        onnx.checker.check_model(wrapped)
    except Exception as exc:
        raise PackError(f"the package's network and its processing do not form a valid ONNX graph: "
                        f"{first_line(exc)}") from exc
    return wrapped.SerializeToString(), mapping


def tolerance(descr: Any) -> tuple[float, float, float]:
    """(relative, absolute, mismatched elements per million) from the package, bioimage.io's defaults else."""
    for t in getattr(descr.config.bioimageio, "reproducibility_tolerance", ()) or ():
        return float(t.relative_tolerance), float(t.absolute_tolerance), float(t.mismatched_elements_per_million)
    return 1e-3, 1e-3, 100.0


def check_test_tensors(session: Any, descr: Any, folder: Path) -> str:
    """Run the package's test input through ``session``; PackError when the output is off its tolerance."""
    import numpy as np

    inp, out = descr.inputs[0], descr.outputs[0]
    if inp.test_tensor is None or out.test_tensor is None:
        raise UsageError("the bioimage.io package has no test tensors; they are how a pack proves itself",
                         hint="add test_tensor files for the input and the output")
    x = to_host_layout(read_array(folder, inp.test_tensor.source), axis_ids(inp)).astype(np.float64)
    want = to_host_layout(read_array(folder, out.test_tensor.source), axis_ids(out)).astype(np.float64)
    got = session.predict((x / host_scale(inp)).astype(np.float32)).astype(np.float64)
    if got.shape != want.shape:
        raise PackError(f"the converted model gives shape {list(got.shape)} on the package's test input; its "
                        f"test output has {list(want.shape)}")
    rel, abs_, per_million = tolerance(descr)
    off = np.abs(got - want) > abs_ + rel * np.abs(want)
    allowed = per_million * want.size / 1e6
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    if int(off.sum()) > allowed:
        raise PackError(f"the converted model does not reproduce the package's test output: {int(off.sum())} of "
                        f"{want.size} elements differ by more than {abs_:g} + {rel:g} x |expected| (max "
                        f"difference {diff:.3g}); nothing was written",
                        hint="the weights or processing do not map exactly; see docs/bioimageio.md")
    return (f"the package's test tensors are reproduced within its tolerance (max difference {diff:.3g}, "
            f"{int(off.sum())} of {want.size} elements beyond relative {rel:g} / absolute {abs_:g})")


def _license_text(descr: Any) -> bytes:
    lines = [f"bioimage.io model: {descr.name}", f"License: {descr.license}"]
    if descr.authors:
        lines.append("Authors: " + ", ".join(str(a.name) for a in descr.authors))
    for c in descr.cite or ():
        ref = f" doi:{c.doi}" if c.doi else (f" {c.url}" if c.url else "")
        lines.append(f"Cite: {c.text}{ref}")
    if descr.description:
        lines.append("")
        lines.append(str(descr.description))
    return ("\n".join(lines) + "\n").encode()


#: CZANN fields an export by czregistry keeps in ``config.czregistry`` (bioimage.io has no place for them).
_KEPT = ("Type", "Classes", "MinOverlap", "Scaling", "Id")


def _czregistry_config(descr: Any) -> dict[str, Any]:
    """The CZANN fields a czregistry export kept, so CZANN -> bioimage.io -> CZANN keeps its metadata."""
    extra = getattr(descr.config, "model_extra", None) or {}
    kept = extra.get("czregistry")
    if not isinstance(kept, dict):
        return {}
    return {k: kept[k] for k in _KEPT if kept.get(k) is not None}


def _model_type(out: Any) -> dict[str, Any]:
    """Segmentation when the output ends in a softmax over its channels (class names from the channel
    names), else Regression (denoising, restoration, probability maps); ``--type`` overrides it."""
    names = next((list(map(str, a.channel_names)) for a in out.axes if a.type == "channel"), [])
    post = [str(op.id) for op in out.postprocessing]
    if post and post[-1] == "softmax" and len(names) >= 2:
        kind = "SingleClassSemanticSegmentation" if len(names) == 2 else "MultiClassSemanticSegmentation"
        return {"Type": kind, "Classes": names}
    return {"Type": "Regression"}


class BioimageioSource(Source):
    name = "bioimageio"
    description = "bioimage.io model packages (.zip with rdf.yaml, rdf.yaml, *.bioimageio.yaml)"
    priority = 20

    @classmethod
    def recognise(cls, source: Any) -> bool:
        return is_bioimageio_path(source)

    def load(self, source: Any, options: LoadOptions) -> LoadedSource:
        import numpy as np

        path = Path(source)
        with open_description(path) as (descr, folder):
            if len(descr.inputs) != 1 or len(descr.outputs) != 1:
                raise UsageError(f"{path.name} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; "
                                 "a CZANN model has exactly one of each")
            inp = descr.inputs[0]
            in_ids = axis_ids(inp)
            test_in = read_array(folder, inp.test_tensor.source) if inp.test_tensor is not None else None
            weights = descr.weights
            if weights.onnx is not None:
                net = read_file(folder, weights.onnx.source)
                what = "ONNX"
            elif weights.torchscript is not None:
                if test_in is None:
                    raise UsageError(f"{path.name} has TorchScript weights but no test input to export them at")
                example = np.asarray(test_in, dtype=np.float32)
                net = _torchscript_onnx(read_file(folder, weights.torchscript.source), example, in_ids, options.opset)
                what = "TorchScript"
            else:
                have = ", ".join(sorted(weights.available_formats)) or "none"
                raise UsageError(f"{path.name} has no ONNX or TorchScript weights (it has: {have})",
                                 hint="convert the weights with bioimageio.core (e.g. its torchscript or onnx "
                                      "converter) first")
            data, mapping = wrap_network(net, descr)
            reference = onnx_reference(data)
            notes = [*mapping.notes, f"{what} weights of bioimage.io model '{descr.name}': "
                     + check_test_tensors(reference, descr, folder)]
            meta: dict[str, Any] = {"ModelName": str(descr.name)[:128], **_model_type(descr.outputs[0])}
            halos = [int(getattr(a, "halo", 0) or 0) for a in descr.outputs[0].axes if a.type == "space"]
            if any(halos):
                meta["MinOverlap"] = [2 * max(halos)] * len(halos)
            meta.update(_czregistry_config(descr))
            if options.tile is None and options.input_shape is None and test_in is not None:
                shape = dict(zip(in_ids, test_in.shape))
                meta["InputShape"] = [*(int(shape[a]) for a in host_order(in_ids)[1:-1]), _channels(inp)]
            return LoadedSource(f"bioimage.io package {path.name}", reference, onnx_bytes=data, notes=notes,
                                metadata=meta, license_text=_license_text(descr))
