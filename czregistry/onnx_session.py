"""The one ONNX Runtime session class: what the ``czregistry-onnx`` backend runs packages with, and what packing
runs ONNX sources (and exported PyTorch graphs) with as the parity reference. It lives in the core because
packing ONNX is a core feature; the plugin re-exports it, so there is one implementation of device choice,
dtype handling and error wording.

``onnxruntime`` and ``numpy`` are imported inside methods: importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import Device, Session, Signature, TensorInfo
from .errors import BackendError, first_line

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OnnxSession"]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


def _dims(shape: list[Any]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


class OnnxSession(Session):
    """One ``InferenceSession``, created once per package.

    ``device``: ``cpu`` uses only the CPU provider; ``gpu`` requires CUDA and fails rather than silently
    falling back (ONNX Runtime falls back to the CPU when the CUDA libraries do not load); ``auto``
    tries CUDA, then the CPU.
    """

    backend = "onnxruntime"

    def __init__(self, model_bytes: bytes, device: Device) -> None:
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
        try:
            self._session: Any = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
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
        ins, outs = self._session.get_inputs(), self._session.get_outputs()
        self._signature = Signature(
            tuple(TensorInfo(i.name, _dims(i.shape), _ORT_DTYPES.get(i.type, i.type)) for i in ins),
            tuple(TensorInfo(o.name, _dims(o.shape), _ORT_DTYPES.get(o.type, o.type)) for o in outs))
        if len(ins) != 1 or not outs:
            self._session = None
            raise BackendError(f"the ONNX model has {len(ins)} inputs and {len(outs)} outputs; "
                               "packages need exactly one input and at least one output")
        self._input = ins[0].name
        in_dtype = self._signature.inputs[0].dtype
        self._dtype = np.dtype(in_dtype) if in_dtype in _ORT_DTYPES.values() else np.dtype(np.float32)

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        if self._session is None:
            raise BackendError("session is closed")
        try:
            out = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=self._dtype)})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc
        return np.asarray(out[0])

    def close(self) -> None:
        self._session = None
