"""ONNX helpers shared by packing and the ONNX backends.

``onnx`` is imported inside each function: the core package does not depend on it (the ONNX plugins and
the TensorFlow plugin do), and the CLI must start without it.

- ``check_external_data``: the one rule both ONNX backends apply before running a packaged model.
- ``canonicalize_onnx``: deterministic names and node order, so packing the same model twice gives the
  same bytes (see docs/packing.md).
- ``onnx_opset`` / ``convert_onnx_opset``: read and change the default-domain opset.
- ``fix_onnx_spatial``: fix the input's spatial dims for a tile-size reset.
- ``splice_onnx``: merge pre/post-processing graphs around a model.
- ``layers_to_onnx``: the ONNX forms of ``--pre`` / ``--post`` layers (``LayerSpec.onnx`` fragments) chained
  into one graph at the package's opset, for ``splice_onnx``. No framework is involved: this is how a PyTorch
  or ONNX model gets its layers without TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, PackError, UsageError, first_line

if TYPE_CHECKING:
    from ..layers import LayerSpec

__all__ = [
    "DEFAULT_OPSET",
    "LEGACY_OPSET",
    "canonicalize_onnx",
    "check_external_data",
    "convert_onnx_opset",
    "fix_onnx_spatial",
    "layers_to_onnx",
    "onnx_opset",
    "splice_onnx",
]

#: Recent ZEN / arivis releases run opset 18; legacy CZMODEL hosts stop at opset 12.
DEFAULT_OPSET = 18
LEGACY_OPSET = 12


def check_external_data(model_bytes: bytes) -> None:
    """Refuse ONNX tensors stored as external data: inside a package there is nothing they may point to
    safely (a path outside the package would read arbitrary files from the host).

    Raises ``BackendError`` when the bytes are not an ONNX model or a tensor (initializers and tensor
    attributes, subgraphs included) keeps its data outside the model.
    """
    import onnx

    try:
        proto = onnx.load_model_from_string(model_bytes)
    except Exception as exc:
        raise BackendError(f"model.model is not a readable ONNX model: {exc}",
                           hint="re-export the model with tf2onnx or torch.onnx") from exc
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            where = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise BackendError(
                f"ONNX tensor '{tensor.name}' stores its data outside the model, in '{where}'",
                hint="packages must embed all weights; re-export without external data")


def canonicalize_onnx(data: bytes) -> bytes:
    """Rename every node, tensor and symbolic dimension of an ONNX model deterministically.

    tf2onnx names nodes and dims from process-global counters (``Unsqueeze__230``, ``unk__237``) and Keras
    names layers by how many were built before (``conv2d_4_1``), so converting the same model twice gives
    different bytes. Names carry no meaning for hosts; renaming them in graph order makes the bytes depend
    only on the graph. The single input keeps its name; outputs become ``output`` (``output_i``).
    """
    import onnx

    model = onnx.load_model_from_string(data)
    graph = model.graph
    names: dict[str, str] = {}
    counter = {"t": 0, "w": 0}  # initializers ("w") get their own numbering, in order of first use
    initializer_names = {t.name for t in graph.initializer}

    def rename(old: str) -> str:
        if not old:
            return old
        if old not in names:
            prefix = "w" if old in initializer_names else "t"
            names[old] = f"{prefix}{counter[prefix]}"
            counter[prefix] += 1
        return names[old]

    for inp in graph.input:
        if inp.name not in initializer_names:
            names[inp.name] = inp.name
    for i, out in enumerate(graph.output):
        names[out.name] = "output" if len(graph.output) == 1 else f"output_{i}"

    def walk(g: Any, prefix: str) -> None:
        for i, node in enumerate(g.node):
            node.name = f"{prefix}n{i}_{node.op_type}"
            for j, x in enumerate(node.input):
                node.input[j] = rename(x)
            for j, x in enumerate(node.output):
                node.output[j] = rename(x)
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g, f"{node.name}/")
                for sub in attr.graphs:
                    walk(sub, f"{node.name}/")
        for coll in (g.input, g.output, g.value_info):
            for vi in coll:
                vi.name = rename(vi.name)
        for t in g.initializer:
            t.name = rename(t.name)
        for t in g.sparse_initializer:
            t.values.name = rename(t.values.name)
        ordered = sorted(g.initializer, key=lambda t: (t.name[:1], int(t.name[1:]) if t.name[1:].isdigit() else -1))
        copies = [type(t)() for t in ordered]
        for c, t in zip(copies, ordered):
            c.CopyFrom(t)
        del g.initializer[:]
        g.initializer.extend(copies)
        ordered_vi = sorted(g.value_info, key=lambda v: v.name)
        vi_copies = [type(v)() for v in ordered_vi]
        for c, v in zip(vi_copies, ordered_vi):
            c.CopyFrom(v)
        del g.value_info[:]
        g.value_info.extend(vi_copies)

    _structural_sort(graph)
    walk(graph, "")
    dims: dict[str, str] = {}
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            if vi.type.HasField("tensor_type"):
                for d in vi.type.tensor_type.shape.dim:
                    if d.HasField("dim_param"):
                        d.dim_param = dims.setdefault(d.dim_param, "batch" if not dims else f"d{len(dims)}")
    graph.name = "czregistry"
    graph.doc_string = ""
    model.doc_string = ""
    return bytes(model.SerializeToString(deterministic=True))


def _structural_sort(graph: Any) -> None:
    """Re-order nodes topologically, breaking ties by a content hash instead of by name.

    tf2onnx's topological order depends on its generated names, so two conversions of one model can list
    independent nodes in different orders. Each node gets a Merkle hash of its op, attributes and the hashes
    of what feeds it (initializers by content, graph inputs by name); Kahn's algorithm then always takes the
    ready node with the smallest hash.
    """
    import heapq

    nodes = list(graph.node)
    init_hash = {}
    for t in graph.initializer:
        body = type(t)()
        body.CopyFrom(t)
        body.name = ""
        init_hash[t.name] = hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()
    producer: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(nodes):
        for j, out in enumerate(node.output):
            producer[out] = (i, j)
    hashes: list[str] = [""] * len(nodes)
    for i, node in enumerate(nodes):  # ONNX requires nodes in a topological order already
        h = hashlib.sha256(f"{node.domain}:{node.op_type}:{len(node.output)}".encode())
        for attr in node.attribute:
            h.update(attr.SerializeToString(deterministic=True))
        for name in node.input:
            if name in producer:
                pi, pj = producer[name]
                h.update(f"n{hashes[pi]}:{pj}".encode())
            elif name in init_hash:
                h.update(f"w{init_hash[name]}".encode())
            else:
                h.update(f"i{name}".encode())
        hashes[i] = h.hexdigest()
    consumers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    missing = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer[n][0] for n in node.input if n in producer}
        missing[i] = len(deps)
        for d in deps:
            consumers[d].append(i)
    ready = [(hashes[i], i) for i in range(len(nodes)) if missing[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, (hashes[c], c))
    if len(order) != len(nodes):  # a cycle or an odd graph: keep the converter's order
        return
    copies = [type(nodes[i])() for i in order]
    for c, i in zip(copies, order):
        c.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)


def onnx_opset(data: bytes) -> int | None:
    """The model's default-domain opset, ``None`` when it imports none."""
    import onnx

    model = onnx.load_model_from_string(data)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def convert_onnx_opset(data: bytes, opset: int) -> bytes:
    """The model converted to ``opset`` by ONNX's version converter, checked; ``PackError`` when it cannot be."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(onnx.load_model_from_string(data), opset)
        onnx.checker.check_model(converted)
    except Exception as exc:
        missing = re.search(r"No Adapter (?:From|To) Version \$?(\d+) for (\w+)", str(exc))
        reason = (f"onnx's version converter has no adapter for {missing.group(2)} (version {missing.group(1)})"
                  if missing else first_line(exc))
        raise PackError(f"cannot convert the ONNX model to opset {opset}: {reason}",
                        hint="re-export the model at that opset, or choose another --opset") from exc
    return bytes(converted.SerializeToString())


def fix_onnx_spatial(data: bytes, spatial: Sequence[int]) -> bytes:
    """Fix the input's spatial dims (the batch stays free) and re-infer the output shape."""
    import onnx

    model = onnx.load_model_from_string(data)
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(spatial) + 2:
        raise UsageError(f"the model input has rank {len(dims)}; a tile of {len(spatial)} axes needs rank "
                         f"{len(spatial) + 2}")
    for d, size in zip(list(dims)[1:-1], spatial):
        d.Clear()
        d.dim_value = int(size)
    del model.graph.value_info[:]
    for out in model.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    with contextlib.suppress(Exception):  # shape inference is a nicety; the parity run checks the real output
        model = onnx.shape_inference.infer_shapes(model)
    return bytes(model.SerializeToString())


def splice_onnx(data: bytes, pre: bytes | None, post: bytes | None) -> bytes:
    """Merge the ONNX graph ``pre`` before the model ``data`` and ``post`` after it (each one input, one
    output); either may be ``None``. The parts take the model's IR version and bring the opset domains they
    import; merged node names are prefixed ``pre_`` / ``post_``. Raises ``PackError`` when ONNX cannot
    merge or check the result."""
    import onnx
    from onnx import compose as onnx_compose

    def io(m: Any) -> tuple[str, str]:
        inits = {t.name for t in m.graph.initializer}
        return next(i.name for i in m.graph.input if i.name not in inits), m.graph.output[0].name

    try:
        model = onnx.load_model_from_string(data)

        def stack(part_bytes: bytes) -> Any:
            part = onnx.load_model_from_string(part_bytes)
            part.ir_version = model.ir_version
            have = {o.domain for o in model.opset_import}
            for o in part.opset_import:  # tf2onnx may import extra domains; the merged model needs them too
                if o.domain not in have:
                    model.opset_import.append(o)
            return part

        if pre is not None:
            part = stack(pre)
            model = onnx_compose.merge_models(part, model, io_map=[(io(part)[1], io(model)[0])],
                                              prefix1="pre_", prefix2="")
        if post is not None:
            part = stack(post)
            model = onnx_compose.merge_models(model, part, io_map=[(io(model)[1], io(part)[0])],
                                              prefix1="", prefix2="post_")
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PackError(f"cannot merge the layers into the ONNX model: {first_line(exc)}",
                        hint="pack from the Keras model (or SavedModel) instead") from exc
    return bytes(model.SerializeToString())


def _dims(shape: Sequence[int | None]) -> list[int | str]:
    return [d if d is not None else ("batch" if i == 0 else f"d{i}") for i, d in enumerate(shape)]


def _fragment_model(name: str, part: Any, shape: Sequence[int | None]) -> Any:
    """One layer's ONNX form as a checked one-input one-output model with a float32 input of ``shape``."""
    import onnx
    from onnx import helper

    from ..layers import OnnxFragment

    if isinstance(part, bytes):
        part = onnx.load_model_from_string(part)
    if isinstance(part, onnx.ModelProto):  # a whole model, e.g. onnxscript's to_model_proto()
        model = part
        inits = {t.name for t in model.graph.initializer}
        for inp in model.graph.input:  # onnxscript's FLOAT[...] leaves the shape out: it is the context's
            if inp.name not in inits and not inp.type.tensor_type.HasField("shape"):
                for d in _dims(shape):
                    dim = inp.type.tensor_type.shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    else:
                        dim.dim_param = d
        if len(model.graph.output) == 1 and not model.graph.output[0].type.tensor_type.HasField("shape"):
            _type_output(model, shape)
    elif isinstance(part, OnnxFragment):
        graph = helper.make_graph(
            list(part.nodes), f"layer_{name}",
            [helper.make_tensor_value_info(part.input, onnx.TensorProto.FLOAT, _dims(shape))],
            [helper.make_tensor_value_info(part.output, onnx.TensorProto.FLOAT, None)],
            initializer=list(part.initializers))
        opset_ids = [helper.make_opsetid("", int(part.opset))]
        model = helper.make_model(graph, opset_imports=opset_ids,
                                  ir_version=helper.find_min_ir_version_for(opset_ids))
        _type_output(model, shape)
    else:
        raise PackError(f"layer '{name}': its onnx form returned {type(part).__name__}, not an OnnxFragment or "
                        "onnx.ModelProto", hint="see 'register_layers' in docs/plugins.md")
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):  # ORT would read that file while packing
            where = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise PackError(f"layer '{name}': its ONNX form keeps tensor '{tensor.name}' outside the graph (in "
                            f"'{where}')", hint="a layer embeds its constants (numpy_helper.from_array)")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise PackError(f"layer '{name}': its ONNX form has {len(inputs)} inputs and {len(model.graph.output)} "
                        "outputs; a layer has exactly one of each")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PackError(f"layer '{name}': its ONNX form is not a valid graph: {first_line(exc)}",
                        hint="check the nodes against the opset in FragmentContext.opset") from exc
    return model


def _type_output(model: Any, shape: Sequence[int | None]) -> None:
    """Give the fragment's output the shape ONNX infers (the checker wants one), else the input's rank with
    free dims."""
    import onnx

    out = model.graph.output[0]
    with contextlib.suppress(Exception):
        inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
        if inferred.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inferred.type)
            return
    for i in range(len(shape)):
        out.type.tensor_type.shape.dim.add().dim_param = f"out{i}"


def _inferred_output(model: Any, shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """The output shape by ONNX shape inference; a dim it cannot fix follows the input's (same rank)."""
    import onnx

    out: list[int | None] = []
    with contextlib.suppress(Exception):
        inferred = onnx.shape_inference.infer_shapes(model)
        tt = inferred.graph.output[0].type.tensor_type
        if tt.HasField("shape"):
            out = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if not out:
        return tuple(shape)
    if len(out) == len(shape):
        out = [o if o is not None else (s if i < len(shape) - 1 else None) for i, (o, s) in enumerate(zip(out, shape))]
    return tuple(out)


def layers_to_onnx(calls: Sequence[tuple[LayerSpec, dict[str, Any]]], shape: Sequence[int | None],
                   opset: int) -> tuple[bytes, tuple[int | None, ...]]:
    """Chain the ONNX forms of ``calls`` on a float32 input of ``shape`` (batch first, channels last) into one
    graph at ``opset``: ``(model bytes, output shape)``. Each fragment is built for the shape its predecessor
    outputs and converted when it was written for another opset. A layer whose builder refuses its arguments
    or returns a broken graph is a ``PackError`` naming it."""
    import onnx
    from onnx import compose as onnx_compose

    from ..layers import FragmentContext

    current = tuple(shape)
    merged: Any = None
    for i, (spec, kwargs) in enumerate(calls):
        if spec.onnx is None:
            raise PackError(f"layer '{spec.name}' has no ONNX form", hint="use a source that builds Keras layers")
        try:
            part = spec.onnx(FragmentContext(current, int(opset)), **kwargs)
        except (PackError, UsageError):
            raise
        except Exception as exc:
            raise PackError(f"layer '{spec.name}' cannot be built with {kwargs}: {first_line(exc)}",
                            hint=f"check the parameters of '{spec.name}' in 'czreg plugins'") from exc
        model = _fragment_model(spec.name, part, current)
        have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if have is not None and have != opset:
            model = onnx.load_model_from_string(convert_onnx_opset(bytes(model.SerializeToString()), int(opset)))
        model = onnx_compose.add_prefix(model, prefix=f"l{i}_")
        current = _inferred_output(model, current)
        if merged is None:
            merged = model
        else:
            model.ir_version = merged.ir_version
            inits = {t.name for t in model.graph.initializer}
            first = next(x.name for x in model.graph.input if x.name not in inits)
            merged = onnx_compose.merge_models(merged, model, io_map=[(merged.graph.output[0].name, first)])
    if merged is None:
        raise PackError("no layers to build")
    try:
        onnx.checker.check_model(merged)
    except Exception as exc:
        raise PackError(f"the layers do not chain into a valid ONNX graph: {first_line(exc)}") from exc
    return bytes(merged.SerializeToString()), current
