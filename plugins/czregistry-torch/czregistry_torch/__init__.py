"""PyTorch backend for czregistry: ONNX packages converted with ``onnx2torch``, run on CUDA when PyTorch
sees a GPU, else on the CPU.

Why a second ONNX backend: ONNX Runtime needs its separate ``onnxruntime-gpu`` build for CUDA, while many
GPU machines already have a CUDA build of PyTorch. Its priority (5) is below ONNX Runtime's (10), so with
``--device auto`` it is picked only when it has a GPU and ONNX Runtime has none (see
``czregistry.backends.select_backend``), or when the user asks for it (``--backend torch``).

It also registers the PyTorch model source (``czregistry_torch.source.TorchSource``): ``czreg pack`` reads
``torch.nn.Module`` objects, TorchScript ``.pt`` and ``torch.export`` ``.pt2`` files directly.

``torch``, ``onnx`` and ``onnx2torch`` are imported only inside functions, so listing plugins stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czregistry.backends import Backend, Device, Session, Signature, TensorInfo
from czregistry.errors import BackendError, first_line
from czregistry.hookspecs import hookimpl
from czregistry.onnx.graph import check_external_data

if TYPE_CHECKING:
    import numpy as np

    from czregistry.package import Package

__all__ = ["TorchBackend", "TorchSession", "check_external_data", "convert_onnx", "make_same_padding_explicit"]

_GPU_HINT = "install a CUDA build of torch (https://pytorch.org/get-started/locally/), or use --device cpu"
#: Device files whose absence on Linux means no CUDA/ROCm GPU, so ``gpu_available`` need not import torch.
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
#: Ops whose ``auto_pad=SAME_*`` is rewritten to explicit ``pads`` (onnx2torch does not implement SAME).
_SAME_PAD_OPS = frozenset({"Conv", "MaxPool"})

@functools.cache
def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, asked once per process. On Linux without GPU device files the answer
    is False without importing torch (a second or more), so backend selection stays cheap on CPU hosts."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules \
            and not any(Path(p).exists() for p in _GPU_DEVICE_FILES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _stub_torchvision() -> None:
    """Let ``onnx2torch`` import without a working ``torchvision``.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and RoiAlign converters.
    A GPU host with a CUDA torch but no matching torchvision (or a torchvision wheel built for another
    CUDA, which fails to load) would otherwise lose the whole backend. The stub is installed only when the
    real import fails; models using those two ops then fail at run time with a clear message.
    """
    try:
        importlib.import_module("torchvision.ops")
        return
    except Exception:  # absent, or present but built for another torch: both leave it unusable
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("this model uses NonMaxSuppression or RoiAlign, which need torchvision",
                           hint="install the torchvision build that matches your torch")

    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    package.__czregistry_stub__ = True  # type: ignore[attr-defined]
    sys.modules["torchvision"] = package
    sys.modules["torchvision.ops"] = ops


def _import_onnx2torch() -> Any:
    if "onnx2torch" not in sys.modules:
        _stub_torchvision()
    try:
        import onnx2torch  # type: ignore[import-untyped]
    except ImportError as exc:
        raise BackendError(f"the torch backend cannot import onnx2torch: {exc}",
                           hint="pip install onnx2torch (or use the onnxruntime backend)") from exc
    from . import _converters

    _converters.register()
    return onnx2torch


def _onnx2torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnx2torch")
    except PackageNotFoundError:
        return "?"


def make_same_padding_explicit(proto: Any) -> int:
    """Rewrite ``auto_pad=SAME_UPPER/SAME_LOWER`` of stride-1 ``Conv`` and ``MaxPool`` nodes into the
    equivalent explicit ``pads``; return how many nodes changed.

    tf2onnx emits SAME_UPPER for every Keras ``padding="same"`` convolution when the spatial size is
    unknown, and onnx2torch refuses SAME. With stride 1 the padding does not depend on the input size
    (total ``(k - 1) * dilation`` per axis, the odd pixel at the end for UPPER, at the start for LOWER),
    so the rewrite is exact. Strided SAME nodes are left alone: their padding depends on the input size,
    and converting them fails with an error naming the node.
    """
    import onnx

    initializers = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    changed = 0
    for node in proto.graph.node:
        if node.op_type not in _SAME_PAD_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        kernel = list(attrs.get("kernel_shape") or [])
        if not kernel and node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            kernel = list(initializers[node.input[1]][2:])
        if not kernel:
            continue
        strides = list(attrs.get("strides") or [1] * len(kernel))
        dilations = list(attrs.get("dilations") or [1] * len(kernel))
        if any(s != 1 for s in strides):
            continue
        totals = [(k - 1) * d for k, d in zip(kernel, dilations)]
        begins = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))
        changed += 1
    return changed


def _failing_node(proto: Any) -> str | None:
    """Which node onnx2torch cannot convert, as ``'name' (OpType, opset N): reason``. Called only after
    a conversion failed, to name the op in the error instead of showing onnx2torch's traceback."""
    from onnx2torch.node_converters.registry import get_converter  # type: ignore[import-untyped]
    from onnx2torch.onnx_graph import OnnxGraph  # type: ignore[import-untyped]

    opsets = {o.domain: o.version for o in proto.opset_import}
    try:
        graph = OnnxGraph(proto.graph)
    except Exception as exc:
        return f"(graph) ({first_line(exc)})"
    for name, node in graph.nodes.items():
        version = opsets.get(node.domain, opsets.get("", 0))
        where = f"'{name}' ({node.operation_type}, opset {version})"
        try:
            converter = get_converter(domain=node.domain, operation_type=node.operation_type, version=version)
        except NotImplementedError:
            return f"{where}: onnx2torch {_onnx2torch_version()} has no converter for this op"
        try:
            converter(node, graph)
        except Exception as exc:
            return f"{where}: {first_line(exc)}"
    return None


def convert_onnx(proto: Any) -> Any:
    """Convert an ONNX ``ModelProto`` to a ``torch.fx.GraphModule`` in eval mode. A model onnx2torch
    cannot convert raises ``BackendError`` naming the first unsupported node and its op."""
    onnx2torch = _import_onnx2torch()
    make_same_padding_explicit(proto)
    try:
        module = onnx2torch.convert(proto)
    except Exception as exc:
        culprit = _failing_node(proto)
        what = f"node {culprit}" if culprit else first_line(exc)
        raise BackendError(f"onnx2torch cannot convert the model: {what}",
                           hint="use the onnxruntime backend (--backend onnxruntime), or re-export the model "
                                "with ops onnx2torch supports") from exc
    return module.eval()


def _tensor_infos(values: Any, skip: frozenset[str]) -> tuple[TensorInfo, ...]:
    import numpy as np
    import onnx

    infos = []
    for value in values:
        if value.name in skip:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                     for d in tensor.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except Exception:
            dtype = "float32"
        infos.append(TensorInfo(value.name, dims, dtype))
    return tuple(infos)


@contextlib.contextmanager
def _exact_float32(on_cuda: bool) -> Iterator[None]:
    """No TF32 in cuDNN convolutions while predicting: an ONNX float32 model should give float32 results
    (PyTorch allows TF32 for convolutions by default, which changes outputs by ~1e-3). Other cuDNN flags
    are kept as the user set them."""
    if not on_cuda:
        yield
        return
    import torch

    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


class TorchSession(Session):
    """One converted ``torch.fx.GraphModule``, created once per package, on ``cuda:0`` or the CPU.

    ``device``: ``cpu`` runs on the CPU; ``gpu`` requires a CUDA GPU that PyTorch sees and fails
    otherwise; ``auto`` uses the GPU when there is one.
    """

    backend = "torch"

    def __init__(self, model_bytes: bytes, device: Device) -> None:
        import numpy as np
        import onnx
        import torch

        on_gpu = device in ("auto", "gpu") and _cuda_available()
        if device == "gpu" and not on_gpu:
            raise BackendError("--device gpu was requested but PyTorch sees no CUDA GPU", hint=_GPU_HINT)
        self.device = "cuda:0" if on_gpu else "cpu"
        self._torch_device = torch.device(self.device)
        try:
            proto = onnx.load_model_from_string(model_bytes)
        except Exception as exc:
            raise BackendError(f"model.model is not a readable ONNX model: {first_line(exc)}",
                               hint="re-export the model with tf2onnx or torch.onnx") from exc
        initializers = frozenset(t.name for t in proto.graph.initializer)
        self._signature = Signature(_tensor_infos(proto.graph.input, initializers),
                                    _tensor_infos(proto.graph.output, frozenset()))
        ins, outs = self._signature.inputs, self._signature.outputs
        if len(ins) != 1 or not outs:
            raise BackendError(f"the ONNX model has {len(ins)} inputs and {len(outs)} outputs; "
                               "packages need exactly one input and at least one output")
        in_dtype = ins[0].dtype
        self._dtype = np.dtype(in_dtype) if in_dtype in ("float32", "float64", "float16") else np.dtype(np.float32)
        module = convert_onnx(proto)
        self._pinned_in: dict[tuple[int, ...], Any] = {}
        self._out_ring: dict[tuple[Any, ...], tuple[list[Any], list[int]]] = {}
        self._hold = 0
        try:
            self._module: Any = module.to(self._torch_device)
        except Exception as exc:
            raise BackendError(f"PyTorch cannot move the model to {self.device}: {first_line(exc)}",
                               hint="use --device cpu") from exc

    @property
    def signature(self) -> Signature:
        return self._signature

    def _run(self, batch: np.ndarray, kind: str | None) -> np.ndarray:
        """Run one batch, convert to ``kind`` on the device if given, and copy the result back.

        On CUDA the input goes through a reused pinned (page-locked) buffer with an asynchronous copy, and
        the output comes back into pinned buffers too: page-locked copies run at full PCIe speed and need
        no staging copy. When the caller promised (``hold_outputs``) to keep few outputs alive, the pinned
        output buffers are recycled from a ring; otherwise each result gets its own memory.
        These CUDA paths cannot be exercised without a GPU (the CPU path is the tested one)."""
        import numpy as np
        import torch

        if self._module is None:
            raise BackendError("session is closed")
        on_cuda = self._torch_device.type == "cuda"
        host = np.ascontiguousarray(batch, dtype=self._dtype)
        try:
            if on_cuda:  # pragma: no cover - needs a CUDA GPU
                pinned = self._pinned_in.get(host.shape)
                if pinned is None:
                    self._pinned_in.clear()
                    dtype = torch.from_numpy(host[:0]).dtype
                    pinned = self._pinned_in[host.shape] = torch.empty(host.shape, dtype=dtype, pin_memory=True)
                pinned.numpy()[...] = host
                x = pinned.to(self._torch_device, non_blocking=True)
            else:
                x = torch.from_numpy(host)
            with torch.inference_mode(), _exact_float32(on_cuda):
                out = self._module(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if kind is not None:
                    out = _convert_tensor(out, kind)
                if on_cuda:  # pragma: no cover - needs a CUDA GPU
                    result = self._pinned_out(tuple(out.shape), out.dtype)
                    result.copy_(out, non_blocking=True)
                    torch.cuda.current_stream(self._torch_device).synchronize()
                    return np.asarray(result.numpy())
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"the GPU ran out of memory on a batch of shape {tuple(batch.shape)}",
                               hint="lower --batch-size, or use --device cpu") from exc
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"PyTorch failed on input of shape {tuple(batch.shape)}: {first_line(exc)}") from exc
        return np.asarray(out.detach().numpy())

    def _pinned_out(self, shape: tuple[int, ...], dtype: Any) -> Any:  # pragma: no cover - needs a CUDA GPU
        import torch

        if self._hold <= 0:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        ring, turn = self._out_ring.setdefault((shape, dtype), ([], [0]))
        if len(ring) < self._hold + 1:  # one more than the caller holds: the one being filled
            ring.append(torch.empty(shape, dtype=dtype, pin_memory=True))
            turn[0] = len(ring) - 1
            return ring[-1]
        turn[0] = (turn[0] + 1) % len(ring)  # the least recently returned buffer
        return ring[turn[0]]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, None)

    def converts_on_device(self, kind: str) -> bool:
        """labels and uint8 are computed by the same elementwise steps as the runner's numpy code (the
        argmax as a running ``>`` comparison, so ties and NaN resolve alike), so they are exact."""
        if kind == "uint8":
            return True
        classes = self._signature.outputs[0].shape[-1] if self._signature.outputs[0].shape else None
        return kind == "labels" and classes is not None and classes <= 256

    def predict_converted(self, batch: np.ndarray, kind: str) -> np.ndarray:
        if not self.converts_on_device(kind):
            raise BackendError(f"the torch backend cannot convert outputs to {kind}")
        return self._run(batch, kind)

    def hold_outputs(self, count: int) -> None:
        self._hold = max(0, int(count))
        self._out_ring.clear()

    def suggest_batch_size(self, tile_shape: tuple[int, ...], limit: int = 32) -> int | None:
        """On CUDA: the largest power of two up to ``limit`` whose activations, measured on a batch of 2,
        fit in half of the free device memory. None on the CPU."""
        if self._module is None or self._torch_device.type != "cuda":
            return None
        return self._suggest_cuda(tile_shape, limit)  # pragma: no cover - needs a CUDA GPU

    def _suggest_cuda(self, tile_shape: tuple[int, ...], limit: int) -> int | None:  # pragma: no cover - needs a GPU
        import torch

        dev = self._torch_device
        try:
            torch.cuda.synchronize(dev)
            free, _ = torch.cuda.mem_get_info(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            x = torch.zeros((2, *tile_shape), dtype=torch.float32, device=dev)
            with torch.inference_mode(), _exact_float32(True):
                self._module(x)
            torch.cuda.synchronize(dev)
            per_tile = max(1.0, (torch.cuda.max_memory_allocated(dev) - base) / 2)
            del x
        except Exception:  # measuring is a nicety: keep the caller's default
            return None
        fits = int(free * 0.5 // per_tile)
        batch = 1
        while batch * 2 <= min(fits, limit):
            batch *= 2
        return batch

    def close(self) -> None:
        if self._module is None:
            return
        self._module = None
        self._pinned_in.clear()
        self._out_ring.clear()
        if self._torch_device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _convert_tensor(out: Any, kind: str) -> Any:
    """The runner's ``convert_output`` in torch, step for step (see ``czregistry.run.runner.argmax_labels``)."""
    import torch

    if kind == "uint8":
        scaled = torch.round(out * 255.0)  # float32 x float32, round half to even like np.rint
        return torch.clamp(scaled, 0, 255).to(torch.uint8)
    n = out.shape[-1]
    if n == 2:
        return (out[..., 1] > out[..., 0]).to(torch.uint8)[..., None]
    labels = torch.zeros(out.shape[:-1], dtype=torch.uint8, device=out.device)
    best = out[..., 0].clone()
    for c in range(1, n):
        channel = out[..., c]
        labels = torch.where(channel > best, torch.tensor(c, dtype=torch.uint8, device=out.device), labels)
        best = torch.maximum(best, channel)
    return labels[..., None]


class TorchBackend(Backend):
    name = "torch"
    formats = frozenset({"onnx"})
    priority = 5

    @classmethod
    def is_available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx2torch", "onnx"))

    @classmethod
    def gpu_available(cls) -> bool:
        return _cuda_available()

    def load(self, package: Package, device: Device = "auto") -> Session:
        if package.model_format != "onnx":
            raise BackendError(f"the torch backend cannot run a {package.model_format} model",
                               hint="it runs ONNX models; a SavedModel needs the tensorflow backend")
        data = package.read_model_bytes()
        check_external_data(data)
        return TorchSession(data, device)


@hookimpl
def register_backends(register: Any) -> None:
    register(TorchBackend)


@hookimpl
def register_sources(register: Any) -> None:
    from .source import TorchSource

    register(TorchSource)
