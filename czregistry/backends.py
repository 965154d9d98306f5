"""The inference-backend interface.

A backend plugin registers a ``Backend`` subclass. ``Backend.load`` turns a package's model into a
``Session``: loaded once, then ``predict`` is called per batch (never load per tile). Sessions report
the model's real signature, so checks compare it with the metadata instead of trusting either.

This module is a leaf (it imports nothing of czregistry but errors): choosing among the registered backends
is ``czregistry.selection``'s job, so the plugin host can validate what plugins register without a circle.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import BackendError

if TYPE_CHECKING:
    import numpy as np

    from .package import Package

__all__ = ["Backend", "Device", "Session", "Signature", "TensorInfo", "validate_backend_class"]

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

    # -- optional pipeline capabilities (the tiled runner uses them when a session offers them) ----------

    def converts_on_device(self, kind: str) -> bool:
        """Whether ``predict_converted`` can return ``kind`` ("labels": argmax as uint8 ``(..., 1)``;
        "uint8": ``rint(p * 255)`` clipped) computed where the model runs, before the copy back: a GPU then
        sends 2-8x fewer bytes and the host skips the conversion. The values must equal the runner's
        numpy conversion of ``predict``'s output exactly. False by default; torch, ONNX Runtime on CUDA and
        TensorFlow on a GPU convert on the device."""
        return False

    def predict_converted(self, batch: np.ndarray, kind: str) -> np.ndarray:
        """``predict`` followed by the conversion to ``kind``; only called when ``converts_on_device``."""
        raise BackendError(f"the {self.backend} backend cannot convert outputs to {kind} itself")

    def hold_outputs(self, count: int) -> None:  # noqa: B027 - a hint that backends may ignore
        """A hint from a caller that keeps at most ``count`` of the arrays ``predict`` returned alive at a
        time (0: no promise, the default): a session may then recycle output memory (e.g. pinned host
        buffers) after ``count`` further calls."""

    def suggest_batch_size(self, tile_shape: tuple[int, ...], limit: int = 32) -> int | None:
        """A batch size for tiles of ``tile_shape`` (spatial dims + channels) that fits the device's free
        memory, or None to keep the caller's default (CPU backends: larger batches do not help)."""
        return None

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
