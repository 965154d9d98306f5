"""ONNX Runtime backend for czregistry.

The CUDA execution provider is used when ONNX Runtime has it and a GPU answers; otherwise the CPU.
``onnxruntime`` is imported only when a model is loaded, so listing plugins stays fast. The session class
lives in the core's ONNX wing (``czregistry.onnx.session``), since packing runs ONNX sources with the same
class.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from czregistry.backends import Backend, Device, Session
from czregistry.errors import BackendError
from czregistry.hookspecs import hookimpl
from czregistry.onnx.graph import check_external_data
from czregistry.onnx.session import OnnxSession  # the one ONNX Runtime session (packing uses it too)

if TYPE_CHECKING:
    from czregistry.package import Package

__all__ = ["OnnxRuntimeBackend", "OnnxSession", "check_external_data"]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = frozenset({"onnx"})
    priority = 10

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def gpu_available(cls) -> bool:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()

    def load(self, package: Package, device: Device = "auto") -> Session:
        if package.model_format != "onnx":
            raise BackendError(f"onnxruntime cannot run a {package.model_format} model")
        data = package.read_model_bytes()
        check_external_data(data)
        return OnnxSession(data, device)


@hookimpl
def register_backends(register: Any) -> None:
    register(OnnxRuntimeBackend)
