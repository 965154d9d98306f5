"""TensorFlow SavedModel backend.

``model.model`` of a package holding a SavedModel is itself a zip: hostile input like the package. It is
extracted into a private temp dir under the package reader's limits (no absolute or ``..`` paths, no links,
bounded member and total sizes), loaded once with ``tf.saved_model.load``, and run through its serving
signature (``serving_default``, else ``serve``, else the only one). Works with Keras 3 ``model.export()``
folders and older TF2 SavedModels (``tf.saved_model.save`` / tf.keras 2 ``model.save``).
TensorFlow is imported only inside functions, so listing plugins stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from czregistry.backends import Backend, Device, Session, Signature, TensorInfo
from czregistry.errors import BackendError, first_line
from czregistry.package import ReadLimits, archive_findings
from czregistry.report import Severity

if TYPE_CHECKING:
    import numpy as np

    from czregistry.package import Package

__all__ = ["SIGNATURE_PREFERENCE", "TensorFlowBackend", "TensorFlowSession", "extract_savedmodel",
           "find_signature", "load_savedmodel_folder"]

#: Serving signatures tried in order; a SavedModel with exactly one other signature uses that one.
SIGNATURE_PREFERENCE = ("serving_default", "serve")
#: A SavedModel folder holds few files, but assets may add some: more than a package, still bounded.
_MAX_SAVEDMODEL_MEMBERS = 10_000
_CHUNK = 1024 * 1024


def extract_savedmodel(zip_path: Path, dest: Path, limits: ReadLimits | None = None) -> Path:
    """Extract a zipped SavedModel into ``dest`` safely; return the folder holding ``saved_model.pb``.

    The zip may hold the SavedModel at its root or inside one top folder. Everything the package reader
    refuses in a package (unsafe paths, links, encryption, zip bombs) is refused here too.
    """
    limits = dataclasses.replace(limits or ReadLimits(),
                                 max_members=max((limits or ReadLimits()).max_members, _MAX_SAVEDMODEL_MEMBERS))
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BackendError(f"model.model is not a readable zipped SavedModel: {exc}") from exc
    with zf:
        infos = zf.infolist()
        errors = [f for f in archive_findings(infos, limits) if f.severity is Severity.ERROR]
        if errors:
            raise BackendError(f"model.model (zipped SavedModel): {errors[0].message}",
                               hint=errors[0].hint or "rebuild the SavedModel zip")
        root = dest.resolve()
        total = 0
        for info in infos:
            parts = [p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("", ".")]
            if not parts:
                continue
            target = root.joinpath(*parts)
            if root not in target.resolve().parents:  # belt and braces after archive_findings
                raise BackendError(f"model.model (zipped SavedModel): member '{info.filename}' leaves the folder")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, target.open("xb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if written > min(info.file_size, limits.max_member_bytes) or total > limits.max_total_bytes:
                            raise BackendError(f"model.model (zipped SavedModel): member '{info.filename}' "
                                               "inflates beyond its declared size or the size limit")
                        out.write(chunk)
            except FileExistsError as exc:
                raise BackendError(f"model.model (zipped SavedModel): member '{info.filename}' appears twice "
                                   "(after normalising its path)") from exc
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise BackendError(f"model.model (zipped SavedModel): member '{info.filename}' "
                                   f"is corrupt: {exc}") from exc
    found = sorted((p for p in root.rglob("saved_model.pb*") if p.name in ("saved_model.pb", "saved_model.pbtxt")),
                   key=lambda p: len(p.parts))
    if not found:
        raise BackendError("model.model is a zip but holds no saved_model.pb",
                           hint="zip the SavedModel folder's contents (saved_model.pb, variables/)")
    return found[0].parent


def find_signature(loaded: Any) -> tuple[str, Any]:
    """Pick the serving signature: ``serving_default``, else ``serve``, else the only signature."""
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    for key in SIGNATURE_PREFERENCE:
        if key in signatures:
            return key, signatures[key]
    if len(signatures) == 1:
        return next(iter(signatures.items()))
    if not signatures:
        raise BackendError("the SavedModel has no serving signature",
                           hint="export with keras Model.export() or tf.saved_model.save(..., signatures=...)")
    raise BackendError(f"the SavedModel has several signatures ({', '.join(sorted(signatures))}) and none "
                       "is called serving_default or serve", hint="re-export with one serving signature")


def _tensor_info(name: str, spec: Any) -> TensorInfo:
    shape: tuple[int | None, ...]
    try:
        shape = tuple(spec.shape.as_list())
    except ValueError:  # unknown rank
        shape = ()
    return TensorInfo(name, shape, spec.dtype.name)


def _configure_gpus(tf: Any) -> list[Any]:
    """Let TensorFlow grow GPU memory instead of taking it all (other sessions may share the card)."""
    gpus = list(tf.config.list_physical_devices("GPU"))
    for gpu in gpus:
        # RuntimeError once the GPU is initialised: keep whatever was configured then
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)
    return gpus


class TensorFlowSession(Session):
    """A SavedModel's serving signature. On a GPU it also converts outputs to labels / uint8 there
    (``converts_on_device``), with ``convert_tensor``: the host then receives 4-8x fewer bytes.
    ``device_pipeline`` forces that on (the tests, on the CPU) or off; None means: on a GPU only."""

    backend = "tensorflow"

    def __init__(self, folder: Path, device: Device, workdir: tempfile.TemporaryDirectory[str] | None = None,
                 *, device_pipeline: bool | None = None) -> None:
        from czregistry._quiet import import_tensorflow_quietly

        import_tensorflow_quietly()
        import tensorflow as tf

        self._tf = tf
        self._workdir = workdir
        gpus = _configure_gpus(tf) if device != "cpu" else []
        if device == "gpu" and not gpus:
            raise BackendError("--device gpu was requested but TensorFlow sees no GPU",
                               hint="install a CUDA build of TensorFlow, or use --device cpu")
        self._tf_device = "/GPU:0" if gpus else "/CPU:0"
        self.device = "gpu:0" if gpus else "cpu"
        try:
            with tf.device(self._tf_device):
                self._loaded: Any = tf.saved_model.load(str(folder))
        except Exception as exc:
            self.close()
            raise BackendError(f"TensorFlow cannot load the SavedModel: {first_line(exc)}",
                               hint="the SavedModel may need a newer TensorFlow or custom ops") from exc
        self.signature_name, self._fn = find_signature(self._loaded)
        _, kwargs = self._fn.structured_input_signature
        outputs = self._fn.structured_outputs
        if not isinstance(outputs, dict):
            outputs = {"output_0": outputs}
        self._signature = Signature(
            tuple(_tensor_info(k, v) for k, v in sorted(kwargs.items())),
            tuple(_tensor_info(k, v) for k, v in sorted(outputs.items())))
        if len(self._signature.inputs) != 1:
            raise BackendError(f"the serving signature '{self.signature_name}' takes "
                               f"{len(self._signature.inputs)} inputs; packages need exactly one")
        self._input = self._signature.inputs[0]
        self._output = self._signature.outputs[0].name
        first = self._signature.outputs[0]
        classes = first.shape[-1] if first.shape else None
        on = bool(gpus) if device_pipeline is None else device_pipeline
        #: the output kinds converted where the model runs
        self._kinds = frozenset(() if not on or first.dtype != "float32" else
                                ("uint8", "labels") if classes is not None and classes <= 256 else ("uint8",))

    @property
    def signature(self) -> Signature:
        return self._signature

    def _run(self, batch: np.ndarray, kind: str | None) -> np.ndarray:
        import numpy as np

        if self._loaded is None:
            raise BackendError("session is closed")
        tf = self._tf
        try:
            with tf.device(self._tf_device):
                tensor = tf.convert_to_tensor(np.asarray(batch, dtype=self._input.dtype))
                out = self._fn(**{self._input.name: tensor})
                result = out[self._output] if isinstance(out, dict) else out
                if kind is not None:
                    result = convert_tensor(tf, result, kind)
                return np.asarray(result.numpy())
        except Exception as exc:
            raise BackendError(f"TensorFlow failed on input of shape {tuple(batch.shape)}: {first_line(exc)}") from exc

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, None)

    def converts_on_device(self, kind: str) -> bool:
        return kind in self._kinds

    def predict_converted(self, batch: np.ndarray, kind: str) -> np.ndarray:
        if kind not in self._kinds:
            raise BackendError(f"this TensorFlow session cannot convert outputs to {kind} itself")
        return self._run(batch, kind)

    def close(self) -> None:
        self._loaded = None
        self._fn = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def convert_tensor(tf: Any, out: Any, kind: str) -> Any:
    """The runner's ``convert_output`` in TensorFlow, step for step (see ``czregistry.run.runner.argmax_labels``):
    uint8 is ``round(p * 255)`` (``tf.math.round`` rounds half to even, like ``np.rint``) clipped and cast;
    labels are a running ``>`` comparison over the classes, so ties go to the lower class and a NaN is
    carried through the running maximum as ``np.maximum`` carries it."""
    if kind == "uint8":
        scaled = tf.math.round(out * tf.constant(255.0, out.dtype))
        return tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)
    best = out[..., 0:1]
    labels = tf.zeros_like(best, dtype=tf.uint8)
    for c in range(1, int(out.shape[-1])):
        channel = out[..., c:c + 1]
        better = tf.math.greater(channel, best)
        labels = tf.where(better, tf.constant(c, tf.uint8), labels)
        best = tf.where(tf.math.logical_or(better, tf.math.is_nan(channel)), channel, best)
    return labels


class TensorFlowBackend(Backend):
    name = "tensorflow"
    formats = frozenset({"savedmodel"})
    priority = 10
    #: passed to the sessions: None converts on the device on a GPU only (see ``TensorFlowSession``)
    device_pipeline: bool | None = None

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("tensorflow") is not None

    @classmethod
    def gpu_available(cls) -> bool:
        from czregistry._quiet import import_tensorflow_quietly

        import_tensorflow_quietly()
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))

    def load(self, package: Package, device: Device = "auto") -> Session:
        if package.model_format != "savedmodel":
            raise BackendError(f"tensorflow cannot run a {package.model_format} model")
        workdir = tempfile.TemporaryDirectory(prefix="czreg-savedmodel-")
        try:
            with package.model_file() as zipped:
                folder = extract_savedmodel(zipped, Path(workdir.name) / "sm", package.limits)
            return TensorFlowSession(folder, device, workdir, device_pipeline=self.device_pipeline)
        except BaseException:
            workdir.cleanup()
            raise


def load_savedmodel_folder(folder: Path | str, device: Device = "auto") -> TensorFlowSession:
    """Open a SavedModel folder directly (tests, the packing helper's round-trip check)."""
    return TensorFlowSession(Path(folder), device)

