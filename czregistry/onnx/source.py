"""The ONNX model source: ``.onnx`` files and ONNX bytes, run by ONNX Runtime on the CPU as packing's parity
reference. Registered by this wing's ``__init__`` through the same ``register_sources`` hook a plugin uses;
``onnx_reference`` is public because the PyTorch and bioimage.io sources hand over ONNX bytes too and take
their reference the same way. ``onnx`` and ``onnxruntime`` are imported only when a model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, PackError, first_line
from ..sources import LoadedSource, LoadOptions, Source

if TYPE_CHECKING:
    from ..backends import Session

__all__ = ["OnnxSource", "onnx_reference"]


class OnnxSource(Source):
    """ONNX files (``.onnx``) and ONNX bytes: the core's own source; the reference is ONNX Runtime on the CPU."""

    name = "onnx"
    description = "ONNX files (.onnx) and bytes"
    priority = 10

    @classmethod
    def recognise(cls, source: Any) -> bool:
        if isinstance(source, bytes):
            return True
        return isinstance(source, str | os.PathLike) and Path(source).suffix.lower() == ".onnx" \
            and Path(source).is_file()

    def load(self, source: Any, options: LoadOptions) -> LoadedSource:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if not isinstance(source, bytes):
            _refuse_external_data(Path(source), data)
        what = "ONNX bytes" if isinstance(source, bytes) else f"ONNX file {source}"
        return LoadedSource(what, onnx_reference(data), onnx_bytes=data)


def _refuse_external_data(path: Path, data: bytes) -> None:
    """An ONNX file whose weights live in separate files (``save_as_external_data``, the rule above 2 GB):
    a package embeds one self-contained model, and ONNX Runtime's own complaint ("Cannot parse data from
    external tensors") does not say what to do. Say which file, and how to merge."""
    import re

    from .graph import check_external_data

    try:
        check_external_data(data)
    except Exception as exc:  # BackendError: external data found, or not ONNX at all (ORT reports that)
        where = re.search(r"in '([^']*)'$", getattr(exc, "message", ""))
        if where is None:
            return
        raise PackError(f"{path.name} keeps its weights outside the file (in {where.group(1)}); a package "
                        "embeds one self-contained model",
                        hint=f"merge them first: python -c \"import onnx; onnx.save(onnx.load('{path}'), "
                             f"'{path.with_name(path.stem + '-merged.onnx')}')\" (models under 2 GB)") from None


def onnx_reference(data: bytes) -> Session:
    """ONNX bytes run by ONNX Runtime on the CPU, as a parity reference: one input and one output, else
    ``PackError`` (a package has exactly one of each)."""
    from .session import OnnxSession

    try:
        session = OnnxSession(data, "cpu")
    except BackendError as exc:
        raise PackError(f"ONNX Runtime cannot load the source model: {first_line(exc)}",
                        hint=exc.hint) from exc
    sig = session.signature
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        session.close()
        raise PackError(f"the ONNX model has {len(sig.inputs)} inputs and {len(sig.outputs)} outputs; "
                        "a package needs exactly one of each")
    return session
