"""The PyTorch model source: ``torch.nn.Module`` objects, TorchScript files (``.pt``) and ``torch.export``
programs (``.pt2``, or an ``ExportedProgram`` object), packed without a hand-made ONNX export.

Why it is built this way:

- **NHWC in, as the format says.** PyTorch modules take NCHW / NCDHW; ZEN and arivis feed NHWC / NDHWC.
  The module is wrapped in transposes (channels-last in, channels-last out for spatial outputs), as czmodel
  does, and that wrapper is exported. The parity reference (``TorchModuleSession``) runs the *unwrapped*
  module in NCHW with NumPy transposes around it, so the parity check covers the wrapper too.
- **TorchScript exporter by default** (``torch.onnx.export(..., dynamo=False)``): it writes one self-contained
  graph. ``.pt2`` programs can only go through the dynamo exporter; its graph is taken from memory
  (``ONNXProgram.model_proto``), and a graph that still refers to external ``.onnx.data`` is refused, so a
  package never loses its weights.
- **Dynamic H/W where the module allows:** the spatial axes are exported as dynamic axes; if that export
  fails the module is exported at the tile size only (with a note).
- Channels and spatial rank come from ``InputShape`` or the tile, else from the first 4-D/5-D weight
  (a Conv2d/Conv3d); ``torch`` is imported only when a model is loaded.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czregistry.backends import Session, Signature, TensorInfo
from czregistry.errors import BackendError, PackError, UsageError, first_line
from czregistry.onnx.source import onnx_reference
from czregistry.sources import LoadedSource, LoadOptions, Source

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TorchModuleSession", "TorchSource", "channels_last_wrapper", "export_onnx"]

_HINT_TILE = "pass --tile H W (spatial_dims=...) or InputShape in the metadata"


def _is_torch_object(obj: Any) -> bool:
    """Without importing torch: an object can only be a torch module if torch is already imported."""
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(obj, torch.nn.Module | torch.export.ExportedProgram)


class TorchModuleSession(Session):
    """The source module itself, on the CPU: NHWC batches are transposed to NCHW, run, and transposed back."""

    backend = "torch-module"
    device = "cpu"

    def __init__(self, module: Any, rank: int, channels: int, out_shape: tuple[int | None, ...],
                 dynamic: bool, tile: tuple[int, ...]) -> None:
        self._module = module
        self._rank = rank
        spatial: tuple[int | None, ...] = (None,) * rank if dynamic else tile
        self._signature = Signature((TensorInfo("input", (None, *spatial, channels), "float32"),),
                                    (TensorInfo("output", out_shape, "float32"),))

    @property
    def signature(self) -> Signature:
        return self._signature

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np
        import torch

        to_first = (0, self._rank + 1, *range(1, self._rank + 1))
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(batch, to_first), dtype=np.float32))
        try:
            with torch.no_grad():
                out = _single_output(self._module(x))
        except Exception as exc:
            raise BackendError(f"the PyTorch module failed on input of shape {tuple(batch.shape)}: "
                               f"{first_line(exc)}") from exc
        y = out.detach().cpu().numpy()
        if y.ndim == self._rank + 2:
            y = np.transpose(y, (0, *range(2, self._rank + 2), 1))
        return np.asarray(y, dtype=np.float32)


def _single_output(out: Any) -> Any:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        if len(out) != 1:
            raise PackError(f"the module returns {len(out)} outputs; a package needs exactly one",
                            hint="wrap it in a module that returns only the output the host should use")
        out = out[0]
    return out


def channels_last_wrapper(module: Any, rank: int) -> Any:
    """``module`` between transposes: NHWC / NDHWC in, channels-last out when the output is spatial."""
    from ._channels_last import ChannelsLast

    return ChannelsLast(module, rank)


def export_onnx(module: Any, example: Any, opset: int, *, dynamic: bool, scripted: bool = False,
                dynamo: bool = False) -> bytes:
    """``module`` (already channels-last) as ONNX bytes with input ``input`` and output ``output``.

    TorchScript exporter unless ``dynamo``; ``scripted`` scripts the wrapper first (a TorchScript module
    inside cannot be traced). Raises the exporter's exception; the caller words it.
    """
    import torch

    rank = example.dim() - 2
    spatial_axes = {i: f"s{i}" for i in range(1, rank + 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        if dynamo:
            dims = {i: torch.export.Dim(f"s{i}", min=1) for i in range(1, rank + 1)} if dynamic else None
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["output"],
                                        dynamic_shapes=(dims,) if dims else None, verbose=False)
            assert program is not None
            return bytes(program.model_proto.SerializeToString())
        target = torch.jit.script(module) if scripted else module
        buf = io.BytesIO()
        torch.onnx.export(target, (example,), buf, dynamo=False, opset_version=opset,  # type: ignore[arg-type]
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", **spatial_axes}, "output": {0: "batch"}}
                          if dynamic else {"input": {0: "batch"}, "output": {0: "batch"}})
        return buf.getvalue()


def _first_weight(module: Any) -> tuple[int, int] | None:
    """``(spatial rank, input channels)`` from the first 4-D or 5-D parameter (a Conv2d / Conv3d weight)."""
    for _, p in module.named_parameters():
        if p.dim() in (4, 5):
            return p.dim() - 2, int(p.shape[1])
    return None


class TorchSource(Source):
    name = "torch"
    description = "torch.nn.Module objects, TorchScript .pt, torch.export .pt2"
    priority = 10

    @classmethod
    def recognise(cls, source: Any) -> bool:
        if _is_torch_object(source):
            return True
        return isinstance(source, str | os.PathLike) and Path(source).is_file() \
            and Path(source).suffix.lower() in (".pt", ".pt2", ".pth")

    def load(self, source: Any, options: LoadOptions) -> LoadedSource:
        import torch

        dynamo = False
        scripted = False
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            what = f"{path.suffix.lower()} file {path}"
            module, dynamo, scripted = _load_file(path)
        elif isinstance(source, torch.export.ExportedProgram):
            what, module, dynamo = "torch.export program", source, True
        else:
            what = f"PyTorch module {type(source).__name__}"
            module = source
            scripted = isinstance(source, torch.jit.ScriptModule)
            if not scripted:
                module.eval()
        fixed_size = False
        if isinstance(module, torch.export.ExportedProgram):
            # a program exported without dynamic shapes runs only at its example size: say so, so the tile
            # is not "reset" by probing other sizes the program's guards refuse
            fixed_size = not module.range_constraints
            module = module.module()
        rank, channels = self._input_layout(module, options, what)
        tile = options.tile or (tuple(options.input_shape[:-1]) if options.input_shape else None)
        if tile is None:
            raise UsageError(f"{what} takes any tile size; say which one the host uses", hint=_HINT_TILE)
        if len(tile) != rank:
            raise UsageError(f"the tile {'x'.join(map(str, tile))} has {len(tile)} axes; {what} takes "
                             f"{rank}-D input", hint=_HINT_TILE)
        example = torch.zeros((1, *tile, channels), dtype=torch.float32)
        wrapper = channels_last_wrapper(module, rank)
        if not dynamo:
            # eval mode for the wrapper too: the exporter restores the wrapper's mode afterwards, and a wrapper
            # left in training mode would switch the module's BatchNorm/Dropout back to training
            wrapper.eval()
        notes: list[str] = []
        try:
            with torch.no_grad():
                probe = _single_output(wrapper(example))
        except PackError:
            raise
        except Exception as exc:
            raise PackError(f"{what} fails on an input of shape {[1, channels, *tile]} (NC{'DHW'[-rank:]}): "
                            f"{first_line(exc)}", hint="check the tile size and the input channels") from exc
        dynamic = not fixed_size
        try:
            data = export_onnx(wrapper, example, options.opset, dynamic=dynamic, scripted=scripted, dynamo=dynamo)
        except Exception as first:
            if not dynamic:
                raise PackError(f"torch.onnx cannot export {what} at opset {options.opset}: {first_line(first)}",
                                hint="try another --opset, or export to ONNX yourself") from first
            dynamic = False
            try:
                data = export_onnx(wrapper, example, options.opset, dynamic=False, scripted=scripted, dynamo=dynamo)
            except Exception as exc:
                raise PackError(f"torch.onnx cannot export {what} at opset {options.opset}: {first_line(exc)}",
                                hint="try another --opset, or export to ONNX yourself") from exc
            notes.append(f"{what} exports only at its tile size ({first_line(first)}); the package has a fixed tile")
        from czregistry.onnx.graph import check_external_data

        check_external_data(data)  # the dynamo exporter must not leave weights in an .onnx.data beside it
        onnx_reference(data).close()  # ONNX Runtime must load what was exported, or the error names the export
        out = tuple(int(d) for d in probe.shape)  # channels-last already (the wrapper's output)
        spatial_out = probe.dim() == rank + 2
        out_shape: tuple[int | None, ...] = (
            (None, *((None,) * rank if dynamic else out[1:-1]), out[-1]) if spatial_out else (None, *out[1:]))
        reference = TorchModuleSession(module, rank, channels, out_shape, dynamic, tuple(tile))
        return LoadedSource(what, reference, onnx_bytes=data, notes=notes)

    @staticmethod
    def _input_layout(module: Any, options: LoadOptions, what: str) -> tuple[int, int]:
        found = _first_weight(module)
        if options.input_shape:
            return len(options.input_shape) - 1, int(options.input_shape[-1])
        if found is None:
            raise UsageError(f"cannot tell the input channels of {what} (no Conv2d/Conv3d weight found)",
                             hint="give InputShape in the metadata, e.g. [128, 128, 3]")
        rank, channels = found
        if options.tile is not None and len(options.tile) != rank:
            raise UsageError(f"the tile has {len(options.tile)} axes but {what} starts with a {rank}-D "
                             "convolution", hint=_HINT_TILE)
        return rank, channels


def _load_file(path: Path) -> tuple[Any, bool, bool]:
    """``(module or ExportedProgram, use dynamo, is scripted)`` for a ``.pt`` (TorchScript) or ``.pt2``
    (torch.export) file."""
    import torch

    suffix = path.suffix.lower()
    if suffix == ".pth":
        raise UsageError(f"{path}: a .pth file usually holds a state_dict (weights without the code)",
                         hint="pass the module object to pack(), or save it with torch.jit.save (.pt) or "
                              "torch.export.save (.pt2)")
    if suffix == ".pt2":
        if not hasattr(torch.export, "load"):
            raise UsageError(f"{path}: this torch {torch.__version__} cannot load torch.export programs",
                             hint="upgrade torch, or save the model with torch.jit.save (.pt)")
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise UsageError(f"{path} is not a loadable torch.export program: {first_line(exc)}") from exc
        return program, True, False
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise UsageError(f"{path} is not a TorchScript file: {first_line(exc)}",
                         hint="save the model with torch.jit.save(torch.jit.script(model), path); a pickled "
                              "model or state_dict cannot be packed from a file") from exc
    module.eval()
    return module, False, True
