"""The one ONNX Runtime session class: what the ``czregistry-onnx`` backend runs packages with, and what packing
runs ONNX sources (and exported PyTorch graphs) with as the parity reference. It lives in the core because
packing ONNX is a core feature; the plugin re-exports it, so there is one implementation of device choice,
dtype handling and error wording.

On CUDA the session feeds the model through ONNX Runtime's I/O binding (the input is copied to the device
once, outputs are allocated there and only the requested one is copied back), and it converts outputs to
``labels`` / ``uint8`` on the device (``converts_on_device``): the graph gets a few extra nodes that repeat
the runner's numpy conversion step for step, so the host receives 4-8x fewer bytes and converts nothing.

``onnxruntime``, ``onnx`` and ``numpy`` are imported inside methods: importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends import Device, Session, Signature, TensorInfo
from ..errors import BackendError, first_line

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CONVERTED_OUTPUTS", "OnnxSession", "with_converted_outputs"]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


def _dims(shape: list[Any]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


#: graph outputs added by ``with_converted_outputs``, one per output kind
CONVERTED_OUTPUTS = {"labels": "czregistry_labels", "uint8": "czregistry_uint8"}
#: the first default-domain opset with every operator the conversion uses (Round, Clip with inputs)
_CONVERT_MIN_OPSET = 11


def _augment(model_bytes: bytes) -> bytes | None:
    """``with_converted_outputs``, or None when ``onnx`` cannot read the model (the session then runs it
    as it is, and reports whatever ONNX Runtime says about it)."""
    try:
        return with_converted_outputs(model_bytes)
    except Exception:
        return None


def with_converted_outputs(model_bytes: bytes) -> bytes | None:
    """The model with two more outputs computed from its first one (channels last, float32), exactly as the
    runner's numpy ``convert_output`` computes them:

    - ``czregistry_uint8``: ``rint(p * 255)`` clipped to [0, 255], as uint8 (ONNX ``Round`` rounds half to
      even, like ``np.rint``; float32 times float32 is the same IEEE product everywhere);
    - ``czregistry_labels``: the argmax over the last axis as uint8 ``(..., 1)``, as the runner's running
      ``>`` comparison: ties go to the lower class and a NaN propagates through the running maximum, as
      ``np.maximum`` does. (ONNX ``ArgMax`` leaves ties to the kernel, and cuDNN's reduction does not promise
      the first index.)

    None when the model does not allow it: its first output is not float32 or has no fixed class count
    (or more than 256 classes), or its opset predates the operators used."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_model_from_string(model_bytes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    graph = model.graph
    if opset is None or opset < _CONVERT_MIN_OPSET or not graph.output:
        return None
    first = graph.output[0]
    tensor = first.type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type != TensorProto.FLOAT or not dims or not dims[-1].HasField("dim_value"):
        return None
    classes = int(dims[-1].dim_value)
    if not 1 <= classes <= 256:
        return None
    taken = ({n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.input}
             | {t.name for t in graph.initializer})
    counter = iter(range(1 << 30))

    def name(stem: str) -> str:
        while (candidate := f"czregistry_{stem}_{next(counter)}") in taken:
            continue
        return candidate

    nodes: list[Any] = []
    consts: list[Any] = []

    def const(stem: str, value: Any, dtype: int = TensorProto.FLOAT, dims: tuple[int, ...] = ()) -> str:
        out = name(stem)
        consts.append(helper.make_tensor(out, dtype, list(dims), [value]))
        return out

    def node(op: str, inputs: list[str], stem: str, out: str | None = None, **attrs: Any) -> str:
        out = out or name(stem)
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    y = first.name
    # uint8: rint(p * 255), clipped, cast
    scaled = node("Round", [node("Mul", [y, const("f255", 255.0)], "scaled")], "rounded")
    clipped = node("Clip", [scaled, const("zero", 0.0), const("max", 255.0)], "clipped")
    node("Cast", [clipped], "uint8", CONVERTED_OUTPUTS["uint8"], to=TensorProto.UINT8)
    # labels: a running comparison over the classes, as czregistry.run.runner.argmax_labels
    last = const("axis", -1, TensorProto.INT64, (1,))

    def channel(c: int) -> str:
        start, end = const("start", c, TensorProto.INT64, (1,)), const("end", c + 1, TensorProto.INT64, (1,))
        return node("Slice", [y, start, end, last], f"class{c}")

    best = channel(0)
    # zeros of the right shape: x > x is false for every x, NaN included
    labels = node("Cast", [node("Greater", [best, best], "false")], "zeros", to=TensorProto.UINT8)
    for c in range(1, classes):
        ch = channel(c)
        better = node("Greater", [ch, best], "better")
        labels = node("Where", [better, const("class", c, TensorProto.UINT8), labels], "labels")
        take = node("Or", [better, node("IsNaN", [ch], "nan")], "take")
        best = node("Where", [take, ch, best], "best")
    node("Identity", [labels], "labels_out", CONVERTED_OUTPUTS["labels"])
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    for kind, out in CONVERTED_OUTPUTS.items():
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
        if kind == "labels":
            shape[-1] = 1
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.UINT8, shape))
    return bytes(model.SerializeToString())


class OnnxSession(Session):
    """One ``InferenceSession``, created once per package.

    ``device``: ``cpu`` uses only the CPU provider; ``gpu`` requires CUDA and fails rather than silently
    falling back (ONNX Runtime falls back to the CPU when the CUDA libraries do not load); ``auto``
    tries CUDA, then the CPU.

    ``device_pipeline``: use I/O binding and convert outputs in the graph (see the module docstring).
    None (the default) does so on CUDA only: on the CPU both would only move work between threads of the
    same cores. The tests set it on the CPU, where the same calls run with device ``cpu``.
    """

    backend = "onnxruntime"

    def __init__(self, model_bytes: bytes, device: Device, *, device_pipeline: bool | None = None) -> None:
        import numpy as np
        import onnxruntime as ort

        available = ort.get_available_providers()
        want_gpu = device in ("auto", "gpu") and "CUDAExecutionProvider" in available
        if device == "gpu" and not want_gpu:
            raise BackendError("--device gpu was requested but ONNX Runtime has no CUDA execution provider",
                               hint="pip install onnxruntime-gpu, or use --device cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_gpu else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: refused probe sizes are findings, not console noise
        pipeline = want_gpu if device_pipeline is None else device_pipeline
        augmented = _augment(model_bytes) if pipeline else None
        try:
            self._session: Any = ort.InferenceSession(augmented or model_bytes, sess_options=options,
                                                      providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load the model: {first_line(exc)}",
                               hint="the opset may be newer than this ONNX Runtime; upgrade onnxruntime") from exc
        used = self._session.get_providers()
        on_gpu = bool(used) and used[0] == "CUDAExecutionProvider"
        if device == "gpu" and not on_gpu:
            self._session = None
            raise BackendError("--device gpu was requested but ONNX Runtime could not start CUDA "
                               "(it fell back to the CPU)",
                               hint="check the CUDA/cuDNN libraries onnxruntime-gpu needs, or use --device cpu")
        self.device = "cuda:0" if on_gpu else "cpu"
        #: I/O binding: where outputs are allocated ("cuda" on the GPU), or None to call ``run``
        self._bind_device = ("cuda" if on_gpu else "cpu") if pipeline else None
        #: the output names of the kinds the graph converts to itself
        self._converted = dict(CONVERTED_OUTPUTS) if augmented is not None else {}
        added = set(self._converted.values())
        ins = self._session.get_inputs()
        outs = [o for o in self._session.get_outputs() if o.name not in added]
        self._signature = Signature(
            tuple(TensorInfo(i.name, _dims(i.shape), _ORT_DTYPES.get(i.type, i.type)) for i in ins),
            tuple(TensorInfo(o.name, _dims(o.shape), _ORT_DTYPES.get(o.type, o.type)) for o in outs))
        if len(ins) != 1 or not outs:
            self._session = None
            raise BackendError(f"the ONNX model has {len(ins)} inputs and {len(outs)} outputs; "
                               "packages need exactly one input and at least one output")
        self._input = ins[0].name
        self._output = outs[0].name
        in_dtype = self._signature.inputs[0].dtype
        self._dtype = np.dtype(in_dtype) if in_dtype in _ORT_DTYPES.values() else np.dtype(np.float32)

    @property
    def signature(self) -> Signature:
        return self._signature

    def _run(self, batch: np.ndarray, output: str) -> np.ndarray:
        """One output of one batch. With I/O binding the input is copied to the device once and only
        ``output`` comes back (the others stay where they were computed).

        If a bound run fails where a plain ``run`` of the same batch succeeds, the binding itself is at fault
        (the CUDA path cannot be tested without a GPU): the session stops binding and goes on with ``run``
        rather than failing every batch. A batch the model refuses fails both ways and keeps the binding."""
        import numpy as np

        if self._session is None:
            raise BackendError("session is closed")
        x = np.ascontiguousarray(batch, dtype=self._dtype)
        try:
            if self._bind_device is None:
                return np.asarray(self._session.run([output], {self._input: x})[0])
            try:
                return self._bound(x, output)
            except Exception:
                result = np.asarray(self._session.run([output], {self._input: x})[0])
                self._bind_device = None
                return result
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc

    def _bound(self, x: np.ndarray, output: str) -> np.ndarray:
        import numpy as np

        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input, x)
        binding.bind_output(output, self._bind_device)
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, self._output)

    def converts_on_device(self, kind: str) -> bool:
        return kind in self._converted

    def predict_converted(self, batch: np.ndarray, kind: str) -> np.ndarray:
        if kind not in self._converted:
            raise BackendError(f"this ONNX Runtime session cannot convert outputs to {kind} itself")
        return self._run(batch, self._converted[kind])

    def close(self) -> None:
        self._session = None
