"""The static graph audit: what a package's model would execute, read without running it.

A package is code. A TensorFlow SavedModel's serving function can call ``tf.io.write_file``,
``tf.py_function`` or ``tf.io.matching_files``; an ONNX graph can name operators from any domain a runtime
happens to register. Running the model is the only way to measure it (signature, seams, halo), so before
anything runs it, the audit reads the graph file with a bounded protobuf reader (``_protowire``: no
TensorFlow, no ``onnx``, nothing executed) and lists every operation it would execute:

- **TensorFlow SavedModel**: every node of every MetaGraph and every function of its library. An operation
  passes when it is on the allow-list of pure tensor operations (``_tf_ops.PURE_TF_OPS``: TensorFlow's
  non-stateful ops minus the families below) or on the short list of stateful operations that only touch the
  model's own memory (variables, control flow, random numbers). Checkpoint operations (``SaveV2``,
  ``RestoreV2``...) pass only in the saver's own subgraph, reached from ``saver_def`` and from no serving
  or init root: the loader restores variables through them, a serving function has no business calling them.
- **ONNX**: every node of the graph, of its subgraphs (``If``/``Loop``/``Scan`` bodies) and of its local
  functions must come from a standard domain (``""``/``ai.onnx``, ``ai.onnx.ml``) or call a local function
  that itself audits clean; tensors stored as external data (a path outside the package) are refused.

``selection.load_session`` refuses a model whose audit fails unless the caller trusts the graph
(``--trust-graph``), so validate's model checks, smoke, run, Dask, evaluate and the server never execute an
unaudited graph; the ``model.graph.unsafe_ops`` check puts the audit into every report.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from ._protowire import LEN, VARINT, WireError, fields, messages, string_field, strings, text
from .errors import UnsafeGraphError

if TYPE_CHECKING:
    from .package import Package

__all__ = ["GRAPH_AUDIT_CHECK", "STANDARD_ONNX_DOMAINS", "TF_SAFE_STATEFUL", "GraphAudit", "UnsafeOp", "audit_onnx",
           "audit_package", "audit_savedmodel", "audit_savedmodel_zip", "require_clean", "tf_danger"]

#: The check id under which reports carry the audit's refusals (``checks/graph.py``).
GRAPH_AUDIT_CHECK = "model.graph.unsafe_ops"
#: ONNX domains whose operators are defined by the ONNX standard (pure tensor functions by definition).
STANDARD_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
#: A graph file larger than this is not a real network's graph (weights of a SavedModel live in
#: ``variables/``; an ONNX model stops at protobuf's 2 GiB anyway).
MAX_GRAPH_BYTES = 2 * 1024 ** 3
#: If/Loop/Scan bodies nest; real models nest a few levels. Deeper is refused, not recursed into.
MAX_SUBGRAPH_DEPTH = 16
#: More operations than any real network holds (SwinUNETR: ~10k ONNX nodes; Keras SavedModels: tens of
#: thousands over all functions): the audit stops there instead of walking a hostile file for minutes.
MAX_OPERATIONS = 500_000
#: How many unsafe operations a report lists one by one before summarising the rest.
MAX_LISTED = 20

#: Families of TensorFlow operations that reach outside the tensor world, with what they do: the words a
#: finding uses. Matched against the op name; the first match wins.
_TF_DANGER: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), why) for p, why in (
    (r"^(PyFunc|PyFuncStateless|EagerPyFunc)$", "runs Python code"),
    (r"^(WriteFile|Save|SaveV2|SaveSlices|MergeV2Checkpoints|DistributedSave)$", "writes files"),
    (r"Summary|SummaryWriter|^ImportEvent$|TFRecord", "writes summaries or records to files"),
    (r"^(ReadFile|Restore|RestoreV2|RestoreSlice|ImmutableConst|LoadAndRemapMatrix|GenerateVocabRemapping)$",
     "reads files"),
    (r"^InitializeTableFromTextFile", "reads files"),
    (r"Reader(V2)?$|^Reader", "reads files"),
    (r"^MatchingFiles", "lists directories"),
    (r"^(ShardedFilename|ShardedFilespec)$", "names checkpoint files"),
    (r"Dataset|Iterator|Queue|^Barrier|^(Ordered)?Map(Clear|IncompleteSize|Peek|Size|Stage|Unstage)|^(Un)?[Ss]tage",
     "reads a data pipeline, queue or iterator"),
    (r"^Debug|^Copy(Host)?$", "writes debug output"),
    (r"^(Send|Recv|_Send|_Recv|_HostSend|_HostRecv|RemoteCall|Rpc|TryRpc|WorkerHeartbeat|GetSessionHandle|"
     r"GetSessionHandleV2|GetSessionTensor|DeleteSessionTensor)$|^Collective|^Nccl|AllToAll|CrossReplica|Infeed|"
     r"Outfeed|TPU|^_?Xla|^FileSystemSetConfiguration$|^RecordInput$", "talks to other processes or devices"),
    (r"Sleep", "sleeps"),
    (r"^(Decode|Encode|Parse|Serialize|Deserialize)", "parses encoded data (no image network needs it)"),
    (r"^Print$|^PrintV2$", "prints to a file"),
))

#: Stateful TensorFlow operations that only touch the model's own memory: variables, calls and control
#: flow, assertions, random numbers, tensor arrays and stacks (dynamic loops), lookup tables built from
#: tensors, cuDNN's RNN kernels.
TF_SAFE_STATEFUL = frozenset({
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "VarIsInitializedOp", "VariableShape", "DestroyResourceOp", "Variable", "VariableV2", "DisableCopyOnRead",
    "ResourceGather", "ResourceGatherNd", "StatefulPartitionedCall", "If", "While", "Case", "Assert",
    "CheckNumerics", "CheckNumericsV2", "Empty", "DeepCopy", "GuaranteeConst", "DeviceIndex",
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "ParameterizedTruncatedNormal",
    "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2", "RandomShuffle", "RandomCrop",
    "StatefulStandardNormal", "StatefulStandardNormalV2", "StatefulTruncatedNormal", "StatefulUniform",
    "StatefulUniformInt", "StatefulUniformFullInt", "StatefulRandomBinomial", "RngReadAndSkip", "RngSkip",
    "StatelessRandomGetAlg", "NonDeterministicInts",
    "TensorArrayV3", "TensorArrayReadV3", "TensorArrayWriteV3", "TensorArrayGatherV3", "TensorArrayScatterV3",
    "TensorArrayConcatV3", "TensorArraySplitV3", "TensorArraySizeV3", "TensorArrayCloseV3",
    "StackV2", "StackPushV2", "StackPopV2", "StackCloseV2", "MutexV2", "MutexLock", "ConsumeMutexLock",
    "HashTableV2", "MutableHashTableV2", "MutableHashTableOfTensorsV2", "MutableDenseHashTableV2",
    "AnonymousHashTable", "AnonymousMutableHashTable", "AnonymousMutableHashTableOfTensors",
    "AnonymousMutableDenseHashTable", "InitializeTableV2", "LookupTableFindV2", "LookupTableSizeV2",
    "LookupTableInsertV2", "LookupTableImportV2", "LookupTableExportV2", "LookupTableRemoveV2",
    "CudnnRNN", "CudnnRNNV2", "CudnnRNNV3",
})
#: Streams ``tf.print`` may write to without naming a file.
_PRINT_STREAMS = frozenset({"stderr", "stdout", "log(info)", "log(warning)", "log(error)"})
#: What a checkpoint saver's subgraphs may use beyond the pure ops: the save side writes the checkpoint the
#: loader names (never run by a load), the restore side reads it into variables.
_SAVE_OPS = frozenset({"SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
                       "RestoreV2", "Restore", "RestoreSlice"})
_RESTORE_OPS = frozenset({"RestoreV2", "Restore", "RestoreSlice", "ShardedFilename", "ShardedFilespec"})


def tf_danger(op: str) -> str | None:
    """What a TensorFlow op does outside the tensor world (the finding's words), or None."""
    for pattern, why in _TF_DANGER:
        if pattern.search(op):
            return why
    return None


@dataclass(frozen=True)
class UnsafeOp:
    """One operation the audit refuses: ``op`` (ONNX: ``domain::op``), what it does, where it sits."""

    op: str
    reason: str
    where: str
    node: str = ""

    def describe(self) -> str:
        node = f" (node '{self.node}')" if self.node else ""
        return f"{self.op} {self.reason}, in {self.where}{node}"

    def to_dict(self) -> dict[str, str]:
        return {"op": self.op, "reason": self.reason, "where": self.where, "node": self.node}


@dataclass
class GraphAudit:
    """What a graph would execute: operation counts, refused operations, or why it could not be read."""

    model_format: str
    ops: Counter[str] = field(default_factory=Counter)
    functions: int = 0
    unsafe: list[UnsafeOp] = field(default_factory=list)
    #: Set when the graph could not be audited at all (unreadable, ambiguous, a text SavedModel).
    problem: str | None = None
    _seen: int = field(default=0, repr=False, compare=False)

    @property
    def clean(self) -> bool:
        return not self.unsafe and self.problem is None

    def count(self, op: str) -> None:
        self.ops[op] += 1
        self.tick()

    def tick(self) -> None:
        """One more operation read; past ``MAX_OPERATIONS`` the graph is not a network but a denial of service
        on the reader (a few hundred MB of empty nodes would keep the audit busy for minutes)."""
        self._seen += 1
        if self._seen > MAX_OPERATIONS:
            raise WireError(f"the graph holds more than {MAX_OPERATIONS:,} operations; real networks hold "
                            "tens of thousands")

    def summary(self) -> str:
        """One line: the verdict, then the first refused operation or the problem."""
        if self.problem is not None:
            return f"the graph could not be audited: {self.problem}"
        nodes = sum(self.ops.values())
        scope = f"{_count(nodes, 'operation')} of {_count(len(self.ops), 'kind')}" + (
            f" in the graph and {_count(self.functions, 'function')}" if self.functions else "")
        if not self.unsafe:
            return f"{scope}, all pure tensor operations"
        more = f" (and {len(self.unsafe) - 1} more)" if len(self.unsafe) > 1 else ""
        return f"{self.unsafe[0].describe()}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.model_format, "clean": self.clean, "problem": self.problem,
                "operations": sum(self.ops.values()), "functions": self.functions,
                "op_counts": dict(sorted(self.ops.items())),
                "unsafe": [u.to_dict() for u in self.unsafe]}


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# --- TensorFlow SavedModel --------------------------------------------------------------------------------

@dataclass
class _TfNode:
    name: str
    op: str
    inputs: list[str]
    calls: set[str]
    print_stream: str | None


def _attr_funcs(buf: memoryview, a: int, b: int, out: set[str], depth: int = 0) -> None:
    """Function names an ``AttrValue`` refers to (``func`` or ``list.func``, and their own attrs)."""
    if depth > MAX_SUBGRAPH_DEPTH:
        raise WireError("attribute values nest too deeply")
    for n, wire, s, e in fields(buf, a, b):
        if wire != LEN:
            continue
        if n == 10:  # func: NameAttrList
            _name_attr_list(buf, s, e, out, depth)
        elif n == 1:  # list: ListValue, func = 9
            for fs, fe in messages(buf, 9, s, e):
                _name_attr_list(buf, fs, fe, out, depth)


def _name_attr_list(buf: memoryview, a: int, b: int, out: set[str], depth: int) -> None:
    out.add(string_field(buf, 1, a, b))
    for es, ee in messages(buf, 2, a, b):  # attr: map<string, AttrValue>
        for vs, ve in messages(buf, 2, es, ee):
            _attr_funcs(buf, vs, ve, out, depth + 1)


def _tf_node(buf: memoryview, a: int, b: int, audit: GraphAudit) -> _TfNode:
    audit.tick()
    name = op = ""
    inputs: list[str] = []
    calls: set[str] = set()
    stream: str | None = None
    for n, wire, s, e in fields(buf, a, b):
        if wire != LEN:
            continue
        if n == 1:
            name = text(buf, s, e)
        elif n == 2:
            op = text(buf, s, e)
        elif n == 3:
            inputs.append(text(buf, s, e))
        elif n == 5:  # attr map entry: key = 1, value = 2
            key = string_field(buf, 1, s, e)
            for vs, ve in messages(buf, 2, s, e):
                _attr_funcs(buf, vs, ve, calls)
                if key == "output_stream":
                    stream = bytes(next((buf[x:y] for x, y in messages(buf, 2, vs, ve)), b"")).decode(
                        "utf-8", "replace")
    return _TfNode(name, op, inputs, calls, stream)


def _node_name(tensor: str) -> str:
    """``^ctrl`` / ``node:0`` / ``node`` -> ``node``."""
    return tensor.lstrip("^").split(":", 1)[0]


def _closure(roots: Iterable[str], nodes: dict[str, _TfNode]) -> set[str]:
    seen: set[str] = set()
    todo = deque(r for r in roots if r in nodes)
    while todo:
        name = todo.popleft()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(i for i in (_node_name(x) for x in nodes[name].inputs) if i in nodes and i not in seen)
    return seen


def _calls(node: _TfNode, library: dict[str, list[_TfNode]]) -> set[str]:
    return {f for f in (node.calls | {node.op}) if f in library}


def _function_closure(start: Iterable[_TfNode], library: dict[str, list[_TfNode]]) -> set[str]:
    seen: set[str] = set()
    todo = deque(f for n in start for f in _calls(n, library))
    while todo:
        fn = todo.popleft()
        if fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for n in library[fn] for f in _calls(n, library) if f not in seen)
    return seen


def _check_tf(node: _TfNode, allowed_extra: frozenset[str], where: str, library: dict[str, list[_TfNode]],
              audit: GraphAudit) -> None:
    from ._tf_ops import PURE_TF_OPS

    if node.op in library:
        audit.ops["(function call)"] += 1
        return
    audit.ops[node.op] += 1
    if node.op in allowed_extra:
        return
    if node.op in ("Print", "PrintV2"):
        if node.print_stream is None or node.print_stream in _PRINT_STREAMS:
            return
        audit.unsafe.append(UnsafeOp(node.op, f"prints to '{node.print_stream}'", where, node.name))
        return
    if node.op in PURE_TF_OPS or node.op in TF_SAFE_STATEFUL:
        return
    why = tf_danger(node.op)
    if why == "names checkpoint files" or node.op in _SAVE_OPS:
        why = f"{why or 'touches checkpoint files'} outside the saver's own subgraph"
    audit.unsafe.append(UnsafeOp(node.op, why or "is not on the allow-list of pure tensor operations",
                                 where, node.name))


def audit_savedmodel(data: bytes) -> GraphAudit:
    """Audit a ``saved_model.pb``: every MetaGraph's nodes and every library function (see the module doc)."""
    audit = GraphAudit("savedmodel")
    buf = memoryview(data)
    try:
        metas = list(messages(buf, 2))
        if not metas:
            audit.problem = "saved_model.pb holds no MetaGraph"
        for index, (ma, mb) in enumerate(metas):
            _audit_meta_graph(buf, ma, mb, audit, index if len(metas) > 1 else None)
    except WireError as exc:
        audit.problem = f"saved_model.pb is not a readable SavedModel ({exc})"
    return audit


def _audit_meta_graph(buf: memoryview, a: int, b: int, audit: GraphAudit, index: int | None) -> None:
    nodes: dict[str, _TfNode] = {}
    library: dict[str, list[_TfNode]] = {}
    serving_roots: list[str] = []
    save_root: list[str] = []
    restore_root: list[str] = []
    for n, wire, s, e in fields(buf, a, b):
        if wire != LEN:
            continue
        if n == 2:  # graph_def
            for gn, gw, gs, ge in fields(buf, s, e):
                if gw != LEN:
                    continue
                if gn == 1:
                    node = _tf_node(buf, gs, ge, audit)
                    nodes[node.name] = node
                elif gn == 2:  # library: FunctionDefLibrary.function = 1
                    for fs, fe in messages(buf, 1, gs, ge):
                        name, body = "", []
                        for fnum, fw, xs, xe in fields(buf, fs, fe):
                            if fw == LEN and fnum == 1:  # signature: OpDef.name = 1
                                name = string_field(buf, 1, xs, xe)
                            elif fw == LEN and fnum == 3:
                                body.append(_tf_node(buf, xs, xe, audit))
                        library[name] = body
        elif n == 3:  # saver_def
            save_root += [_node_name(x) for x in strings(buf, 2, s, e)]
            restore_root += [_node_name(x) for x in strings(buf, 3, s, e)]
        elif n == 4:  # collection_def: map entry, value CollectionDef.node_list (1).value (1)
            for vs, ve in messages(buf, 2, s, e):
                for ls, le in messages(buf, 1, vs, ve):
                    serving_roots += [_node_name(x) for x in strings(buf, 1, ls, le)]
        elif n == 5:  # signature_def: map entry, value SignatureDef.inputs (1) / outputs (2) -> TensorInfo.name
            for vs, ve in messages(buf, 2, s, e):
                for tn, _, ts, te in fields(buf, vs, ve):
                    if tn in (1, 2):
                        for ivs, ive in messages(buf, 2, ts, te):
                            serving_roots.append(_node_name(string_field(buf, 1, ivs, ive)))
    prefix = f"MetaGraph {index}: " if index is not None else ""
    audit.functions += len(library)
    serving = _closure(serving_roots, nodes)
    restore = _closure(restore_root, nodes) - serving
    save = _closure(save_root, nodes) - serving - restore
    strict_nodes = [node for name, node in nodes.items() if name not in restore and name not in save]
    strict_fns = _function_closure(strict_nodes, library)
    restore_fns = _function_closure((nodes[x] for x in restore), library) - strict_fns
    save_fns = _function_closure((nodes[x] for x in save), library) - strict_fns - restore_fns
    for name, node in nodes.items():
        extra = _RESTORE_OPS if name in restore else _SAVE_OPS if name in save else frozenset()
        _check_tf(node, extra, f"{prefix}the main graph", library, audit)
    for fn, body in library.items():
        extra = _RESTORE_OPS if fn in restore_fns else _SAVE_OPS if fn in save_fns else frozenset()
        for node in body:
            _check_tf(node, extra, f"{prefix}function '{fn}'", library, audit)


def audit_savedmodel_zip(zf: zipfile.ZipFile) -> GraphAudit:
    """Audit the SavedModel inside an opened (already size-checked) zip: exactly one graph file, and a
    binary one, so the file audited is the file any loader reads."""
    graphs = [i for i in zf.infolist() if not i.is_dir()
              and PurePosixPath(i.filename.replace("\\", "/")).name in ("saved_model.pb", "saved_model.pbtxt",
                                                                        "saved_model.cpb")]
    if len(graphs) != 1:
        names = ", ".join(sorted(i.filename for i in graphs)) or "none"
        return GraphAudit("savedmodel", problem=f"the SavedModel zip must hold exactly one graph file "
                                                f"saved_model.pb, it holds {len(graphs)} ({names})")
    info = graphs[0]
    if not info.filename.endswith("saved_model.pb"):
        return GraphAudit("savedmodel", problem=f"'{info.filename}' is a text or chunked SavedModel, which "
                                                "cannot be audited; re-export it as a binary saved_model.pb")
    if info.file_size > MAX_GRAPH_BYTES:
        return GraphAudit("savedmodel", problem=f"saved_model.pb is {info.file_size:,} bytes (limit "
                                                f"{MAX_GRAPH_BYTES:,})")
    with zf.open(info) as fh:
        data = fh.read(info.file_size + 1)
    if len(data) != info.file_size:
        return GraphAudit("savedmodel", problem="saved_model.pb inflates to another size than it declares")
    return audit_savedmodel(data)


# --- ONNX --------------------------------------------------------------------------------------------------

def _onnx_tensor_external(buf: memoryview, a: int, b: int) -> str | None:
    """The external-data location of a ``TensorProto`` (data_location = 14 is EXTERNAL, 13 the entries)."""
    external = False
    location = "?"
    for n, wire, s, e in fields(buf, a, b):
        if n == 14 and wire == VARINT and s == 1:
            external = True
        elif n == 13 and wire == LEN:
            external = True
            if string_field(buf, 1, s, e) == "location":
                location = string_field(buf, 2, s, e)
    return location if external else None


class _OnnxWalk:
    def __init__(self, buf: memoryview, audit: GraphAudit, functions: dict[tuple[str, str], tuple[int, int]]) -> None:
        self.buf, self.audit, self.functions = buf, audit, functions
        self.used_functions: set[tuple[str, str]] = set()

    def graph(self, a: int, b: int, where: str, depth: int) -> None:
        if depth > MAX_SUBGRAPH_DEPTH:
            raise WireError(f"subgraphs nest deeper than {MAX_SUBGRAPH_DEPTH} levels")
        buf = self.buf
        for n, wire, s, e in fields(buf, a, b):
            if wire != LEN:
                continue
            if n == 1:
                self.node(s, e, where, depth)
            elif n in (5, 15):  # initializer / sparse_initializer (values = 1)
                tensors = [(s, e)] if n == 5 else list(messages(buf, 1, s, e))
                for ts, te in tensors:
                    self.tensor(ts, te, where)

    def tensor(self, a: int, b: int, where: str) -> None:
        location = _onnx_tensor_external(self.buf, a, b)
        if location is not None:
            name = string_field(self.buf, 8, a, b)
            self.audit.unsafe.append(UnsafeOp("external data", f"reads the file '{location}' outside the package",
                                              f"tensor '{name}' of {where}"))

    def node(self, a: int, b: int, where: str, depth: int) -> None:
        buf = self.buf
        op = domain = name = ""
        attributes: list[tuple[int, int]] = []
        for n, wire, s, e in fields(buf, a, b):  # one pass: NodeProto name = 3, op_type = 4, attribute = 5, domain = 7
            if wire != LEN:
                continue
            if n == 4:
                op = text(buf, s, e)
            elif n == 7:
                domain = text(buf, s, e)
            elif n == 3:
                name = text(buf, s, e)
            elif n == 5:
                attributes.append((s, e))
        label = op if domain in ("", "ai.onnx") else f"{domain}::{op}"
        self.audit.count(label)
        if domain not in STANDARD_ONNX_DOMAINS:
            if (domain, op) in self.functions:
                self.used_functions.add((domain, op))
            else:
                why = ("is an ONNX Runtime contrib operator (domain 'com.microsoft'), not standard ONNX"
                       if domain.startswith("com.microsoft") else
                       f"comes from the custom domain '{domain}', not standard ONNX")
                self.audit.unsafe.append(UnsafeOp(label, why, where, name))
        for attr_s, attr_e in attributes:
            for n, wire, s, e in fields(buf, attr_s, attr_e):
                if wire != LEN:
                    continue
                if n in (6, 11):  # g / graphs
                    self.graph(s, e, f"a subgraph of node '{name or op}' in {where}", depth + 1)
                elif n in (5, 10):  # t / tensors
                    self.tensor(s, e, where)


def audit_onnx(data: bytes) -> GraphAudit:
    """Audit an ONNX ``ModelProto``: standard domains or clean local functions only, no external data."""
    audit = GraphAudit("onnx")
    buf = memoryview(data)
    try:
        functions: dict[tuple[str, str], tuple[int, int]] = {}
        graphs: list[tuple[int, int, str]] = []
        for n, wire, s, e in fields(buf):
            if wire != LEN:
                continue
            if n == 7:
                graphs.append((s, e, "the main graph"))
            elif n == 25:  # functions: FunctionProto name = 1, domain = 10
                functions[(string_field(buf, 10, s, e), string_field(buf, 1, s, e))] = (s, e)
            elif n == 20:  # training_info: initialization = 1, algorithm = 2
                graphs += [(gs, ge, "a training-info graph") for k in (1, 2) for gs, ge in messages(buf, k, s, e)]
        if not graphs:
            audit.problem = "the ONNX model holds no graph"
        walk = _OnnxWalk(buf, audit, functions)
        for s, e, where in graphs:
            walk.graph(s, e, where, 0)
        audit.functions = len(functions)
        done: set[tuple[str, str]] = set()
        while pending := walk.used_functions - done:  # a function's body may call further local functions
            for key in sorted(pending):
                done.add(key)
                s, e = functions[key]
                for ns, ne in messages(buf, 7, s, e):
                    walk.node(ns, ne, f"function '{key[0]}::{key[1]}'", 1)
        for key in sorted(set(functions) - done):  # never called: still audited, a runtime may call it
            s, e = functions[key]
            for ns, ne in messages(buf, 7, s, e):
                walk.node(ns, ne, f"function '{key[0]}::{key[1]}'", 1)
    except WireError as exc:
        audit.problem = f"model.model is not a readable ONNX model ({exc})"
    return audit


# --- packages ----------------------------------------------------------------------------------------------

def audit_package(package: Package) -> GraphAudit:
    """The audit of a package's model, computed once per opened package (``Package.cache``)."""
    cached = package.cache.get("graph_audit")
    if isinstance(cached, GraphAudit):
        return cached
    audit = _audit_package(package)
    package.cache["graph_audit"] = audit
    return audit


def _audit_package(package: Package) -> GraphAudit:
    import dataclasses

    from .package import archive_findings
    from .report import Severity

    if package.model_format == "onnx":
        if package.model_size > MAX_GRAPH_BYTES:
            return GraphAudit("onnx", problem=f"the ONNX model is {package.model_size:,} bytes (limit "
                                              f"{MAX_GRAPH_BYTES:,})")
        return audit_onnx(package.read_model_bytes())
    if package.model_format != "savedmodel":
        return GraphAudit(package.model_format, problem="model.model is neither ONNX nor a zipped SavedModel")
    limits = dataclasses.replace(package.limits, max_members=max(package.limits.max_members, 10_000))
    with package.model_file() as path:
        try:
            with zipfile.ZipFile(path) as zf:
                errors = [f for f in archive_findings(zf.infolist(), limits) if f.severity is Severity.ERROR]
                if errors:
                    return GraphAudit("savedmodel", problem=f"the zipped SavedModel: {errors[0].message}")
                return audit_savedmodel_zip(zf)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            return GraphAudit("savedmodel", problem=f"model.model is not a readable zipped SavedModel ({exc})")


def require_clean(package: Package) -> GraphAudit:
    """The package's audit, or ``UnsafeGraphError`` (exit 5) naming the first refused operation."""
    audit = audit_package(package)
    if not audit.clean:
        name = package.path.name
        raise UnsafeGraphError(
            f"refusing to run the model of {name}: {audit.summary()}",
            hint=f"see 'czreg validate --static {name}' for the whole audit; only if this is your own model and "
                 "you trust it, pass --trust-graph", audit=audit.to_dict())
    return audit
