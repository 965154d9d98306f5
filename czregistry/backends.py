"""The inference-backend interface and backend selection.

A backend plugin registers a ``Backend`` subclass. ``Backend.load`` turns a package's model into a
``Session``: loaded once, then ``predict`` is called per batch (never load per tile). Sessions report
the model's real signature, so checks compare it with the metadata instead of trusting either.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from .errors import BackendError, NoBackendError, UsageError

if TYPE_CHECKING:
    from .package import ModelFormat, Package

__all__ = ["Backend", "Device", "Session", "Signature", "TensorInfo", "available_backends", "load_session",
           "select_backend", "validate_backend_class"]

Device = Literal["auto", "cpu", "gpu"]
#: Which plugin to install for a model format, quoted in the "no backend" error.
PLUGIN_FOR_FORMAT = {"onnx": "czregistry-onnx", "savedmodel": "czregistry-tensorflow"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]  # unknown dims are None
    dtype: str  # numpy dtype name, e.g. "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


class Session(abc.ABC):
    """A loaded model. Use as a context manager, or call ``close``, to release device memory."""

    backend: str
    device: str  # what actually runs it, e.g. "cpu", "cuda:0", "gpu:0"

    @property
    @abc.abstractmethod
    def signature(self) -> Signature: ...

    @abc.abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 batch ``[n, h, w, c]`` (or ``[n, z, h, w, c]``); return the single output."""

    def close(self) -> None:  # noqa: B027 - optional for backends holding nothing
        """Release resources; idempotent."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """An inference engine. Subclasses set ``name``, ``formats`` and ``plugin_hint``."""

    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]
    #: Larger wins when several backends can run a format and the user chose none.
    priority: ClassVar[int] = 0

    @classmethod
    def is_available(cls) -> bool:
        """Whether the engine's library imports here (cheap: do not import heavy modules at top level)."""
        return True

    @classmethod
    def gpu_available(cls) -> bool:
        return False

    @abc.abstractmethod
    def load(self, package: Package, device: Device = "auto") -> Session:
        """Load the package's model once. Raise ``BackendError`` naming what is wrong."""


def validate_backend_class(obj: Any) -> str:
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError("register_backends expects a czregistry.backends.Backend subclass")
    if not getattr(obj, "name", None) or not getattr(obj, "formats", None):
        raise TypeError("a Backend needs a non-empty 'name' and 'formats'")
    return str(obj.name)


def available_backends() -> dict[str, tuple[str, type[Backend]]]:
    """``{backend name: (plugin name, class)}`` for every registered backend."""
    from .plugins import get_host

    return {cls.name: (plugin, cls) for plugin, cls in get_host().backends()}


def select_backend(model_format: ModelFormat, name: str | None = None) -> type[Backend]:
    backends = available_backends()
    if name is not None:
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none installed"
            raise UsageError(f"unknown backend '{name}' (installed: {known})",
                             hint="see 'czreg plugins' for what is installed")
        cls = backends[name][1]
        if model_format not in cls.formats:
            raise NoBackendError(f"backend '{name}' cannot run {model_format} models "
                                 f"(it runs {', '.join(sorted(cls.formats))})")
        if not cls.is_available():
            raise NoBackendError(f"backend '{name}' is installed but its engine does not import here",
                                 hint=f"reinstall plugin '{backends[name][0]}'")
        return cls
    candidates = sorted((cls for _, cls in backends.values() if model_format in cls.formats and cls.is_available()),
                        key=lambda c: -c.priority)
    if not candidates:
        plugin = PLUGIN_FOR_FORMAT.get(model_format, "a backend plugin")
        raise NoBackendError(f"no installed backend can run {model_format} models",
                             hint=f"install the {plugin} plugin (pip install {plugin})")
    return candidates[0]


def load_session(package: Package, backend: str | None = None, device: Device = "auto") -> Session:
    cls = select_backend(package.model_format, backend)
    if device == "gpu" and not cls.gpu_available():
        raise BackendError(f"--device gpu was requested but backend '{cls.name}' sees no usable GPU",
                           hint="use --device auto or cpu, or install the GPU build of the engine")
    return cls().load(package, device)
