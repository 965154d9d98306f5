"""The inference-backend interface and backend selection.

A backend plugin registers a ``Backend`` subclass. ``Backend.load`` turns a package's model into a
``Session``: loaded once, then ``predict`` is called per batch (never load per tile). Sessions report
the model's real signature, so checks compare it with the metadata instead of trusting either.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import BackendError, CzregError, NoBackendError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from .package import ModelFormat, Package

__all__ = ["Backend", "Device", "Session", "Signature", "TensorInfo", "available_backends", "load_session",
           "select_backend", "validate_backend_class"]

Device = Literal["auto", "cpu", "gpu"]
#: Which plugin to install for a model format, quoted in the "no backend" error.
PLUGIN_FOR_FORMAT = {"onnx": "czregistry-onnx", "savedmodel": "czregistry-tensorflow"}
#: What to install to run a model format on a GPU, quoted when ``--device gpu`` finds no GPU backend.
GPU_HINT_FOR_FORMAT = {"onnx": "install onnxruntime-gpu, or a CUDA build of torch with the czregistry-torch plugin",
                       "savedmodel": "install TensorFlow with GPU support (pip install 'tensorflow[and-cuda]')"}


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

    @property
    def batch_limit(self) -> int | None:
        """The most tiles one ``predict`` call takes: the graph's fixed batch dimension (ZEISS exports some
        models with batch 1, which the format allows), or None when it is free."""
        shape = self.signature.inputs[0].shape if self.signature.inputs else ()
        return int(shape[0]) if shape and shape[0] is not None else None

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """``predict`` for any number of tiles: split into calls the graph accepts when its batch is fixed.

        Raises ``BackendError`` for a graph whose batch is fixed at more than 1 (the format allows 1 or free)
        and a batch that is not a multiple of it."""
        limit = self.batch_limit
        n = int(batch.shape[0])
        if limit is None or n == limit:
            return self.predict(batch)
        if limit != 1:
            raise BackendError(f"the model's batch dimension is fixed at {limit}; CZANN models take batch 1 or a "
                               "free batch", hint="re-export the model with a free (or size 1) batch dimension")
        import numpy as np

        return np.concatenate([self.predict(batch[i:i + 1]) for i in range(n)], axis=0)

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


def _ask(plugin: str, cls: type[Backend], question: str) -> bool:
    """``cls.is_available()`` or ``cls.gpu_available()``; a crash in that plugin code becomes a
    ``BackendError`` naming the plugin, never a traceback."""
    try:
        return bool(getattr(cls, question)())
    except Exception as exc:
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' crashed in {question}(): "
                           f"{type(exc).__name__}: {exc}",
                           hint=f"report this to the author of plugin '{plugin}'") from exc


def _no_backend_hint(package: str) -> str:
    """What to do when no backend runs a format: install the plugin, unless it is installed and only
    ``CZREG_PLUGINS`` keeps it out, or it is installed and failed to load."""
    import os

    from .plugins import get_host

    host = get_host()
    skipped = [name for name, dist in host.skipped.items() if dist.lower().replace("_", "-") == package]
    if skipped:
        setting = os.environ.get("CZREG_PLUGINS", "")
        return (f"plugin '{skipped[0]}' ({package}) is installed but disabled by CZREG_PLUGINS={setting!r}; "
                f"unset CZREG_PLUGINS or add {skipped[0]} to it")
    if host.load_failures():
        return f"a plugin failed to load: see 'czreg plugins' (else pip install {package})"
    return f"install the {package} plugin (pip install {package})"


def select_backend(model_format: ModelFormat, name: str | None = None, device: Device = "auto") -> type[Backend]:
    """The backend class to run ``model_format``: the user's choice (``--backend``), else among the
    available backends for the format: with ``device="auto"`` the first (by priority) that has a GPU, else
    the highest priority; with ``"gpu"`` only backends with a GPU; with ``"cpu"`` the highest priority.
    ``gpu_available()`` is asked only of backends that can run the format, in priority order, stopping at
    the first yes. Raises ``UsageError`` for an unknown name and ``NoBackendError`` (whose hint names the
    plugin to install) when nothing can run the format, or nothing can run it on a GPU for ``"gpu"``."""
    backends = available_backends()
    if name is not None:
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none installed"
            raise UsageError(f"unknown backend '{name}' (installed: {known})",
                             hint="see 'czreg plugins' for what is installed")
        plugin, cls = backends[name]
        if model_format not in cls.formats:
            raise NoBackendError(f"backend '{name}' cannot run {model_format} models "
                                 f"(it runs {', '.join(sorted(cls.formats))})",
                                 hint="leave out --backend to pick one that can")
        if not _ask(plugin, cls, "is_available"):
            raise NoBackendError(f"backend '{name}' is installed but its engine does not import here",
                                 hint=f"reinstall plugin '{plugin}'")
        if device == "gpu" and not _ask(plugin, cls, "gpu_available"):
            raise BackendError(f"--device gpu was requested but backend '{name}' sees no usable GPU",
                               hint="use --device auto or cpu, or install the GPU build of the engine")
        return cls
    candidates = sorted((cls for plugin, cls in backends.values()
                         if model_format in cls.formats and _ask(plugin, cls, "is_available")),
                        key=lambda c: -c.priority)
    if not candidates:
        package = PLUGIN_FOR_FORMAT.get(model_format)
        if package is None:
            raise NoBackendError(f"no installed backend can run {model_format} models",
                                 hint="model.model is neither ONNX nor a zipped SavedModel; see 'czreg plugins'")
        raise NoBackendError(f"no installed backend can run {model_format} models", hint=_no_backend_hint(package))
    if device == "cpu" or (device == "auto" and len(candidates) == 1):
        return candidates[0]
    for cls in candidates:
        if _ask(backends[cls.name][0], cls, "gpu_available"):
            return cls
    if device == "gpu":
        tried = ", ".join(c.name for c in candidates)
        raise NoBackendError(f"--device gpu was requested but no installed backend for {model_format} models "
                             f"sees a usable GPU (tried: {tried})",
                             hint=f"{GPU_HINT_FOR_FORMAT.get(model_format, 'see czreg plugins')}, or use --device cpu")
    return candidates[0]


def load_session(package: Package, backend: str | None = None, device: Device = "auto") -> Session:
    """Load the package's model once with the selected backend. Any failure is a ``BackendError``; one
    caused by a bug in a backend plugin (not a ``CzregError``) names the plugin."""
    cls = select_backend(package.model_format, backend, device)
    plugin = available_backends()[cls.name][0]
    try:
        session = cls().load(package, device)
    except CzregError:
        raise
    except Exception as exc:
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' failed to load the model: "
                           f"{type(exc).__name__}: {exc}",
                           hint=f"if the package is valid, report this to the author of plugin '{plugin}'") from exc
    if not isinstance(session, Session):
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' returned {type(session).__name__}, "
                           "not a Session", hint=f"report this to the author of plugin '{plugin}'")
    return session
