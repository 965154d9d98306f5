"""The ``null`` backend: a session whose ``predict`` returns a correctly shaped output without computing.

It measures the runner's own (host-side) ceiling: reading, cutting, batching, assembling, converting,
encoding and writing, with no model in the way. Registered in-process only by the benchmarks and the
tests (``register_null_backend``); it is never installed as a plugin, so users cannot select it.

What ``predict`` returns is one of two output profiles (``register_null_backend(profile=...)``), because
how well the output compresses decides what compressed outputs cost:

- ``demo`` (the default): the output of the README's demo model (``czregistry.examples``: a 7x7 Gaussian
  blur and a two-class softmax, the model ``czreg demo`` packs and runs) on the demo's synthetic nuclei
  image, computed here in NumPy. Like a trained segmentation network's, it is confident almost
  everywhere: on the demo's 2048x2048 run, 95% of the uint8 probabilities are 0 or 255 and ISA-L deflate
  shrinks uint8 tiles 16-fold in 0.10 ms each.
- ``noisy``: smooth class regions plus independent per-pixel logit noise (sigma 0.5): a worst case that
  barely compresses (uint8 tiles shrink by a fifth and cost ISA-L 0.7 ms each, zstd 1.3 ms), kept to bound
  what outputs no model we know produces would cost.

Constant output would compress to nothing and flatter the writers; neither profile is constant. The
output is computed once per batch shape per process (``warm`` does it before a timed run: the first
computation costs ~0.2 s, a third of a whole 8192 x 8192 run, which the pipeline's figures must not
include) and the same read-only array is returned afterwards, so ``predict`` costs nothing. With
``device_convert=True`` the session also offers ``predict_converted`` (the capability a GPU backend uses
to take the argmax / uint8 quantisation before the copy back), converting with the runner's own numpy
code once per shape, so the host ceiling with device-side conversion can be measured too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TILE = 256
OVERLAP = 32

__all__ = ["NULL_BACKEND", "PROFILES", "NullSession", "build_null_package", "register_null_backend", "warm"]

NULL_BACKEND = "null"
PROFILES = ("demo", "noisy")
#: outputs by (profile, kind, batch, *spatial, classes), shared by every null session of the process
_OUTPUTS: dict[tuple[Any, ...], np.ndarray] = {}


def _noisy(n: int, spatial: tuple[int, ...], classes: int) -> np.ndarray:
    """The ``noisy`` profile: smooth class regions plus independent per-pixel logit noise."""
    grids = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in spatial), indexing="ij")
    rng = np.random.default_rng(n)
    logits = []
    for i in range(n):
        base = np.ones(spatial, np.float32)
        for d, g in enumerate(grids):
            base = base * (np.sin(g / (19 + 4 * d) + i) if d % 2 == 0 else np.cos(g / (23 + 4 * d) - i))
        logits.append(3 * base)
    logit = np.stack(logits) + rng.normal(0, 0.5, (n, *spatial)).astype(np.float32)
    if classes == 1:
        return (1 / (1 + np.exp(-logit))).astype(np.float32)[..., None]
    shifted = np.stack([logit * (1 - 2 * (c % 2)) + 0.3 * c for c in range(classes)], axis=-1)
    e = np.exp(shifted - shifted.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _demo(n: int, spatial: tuple[int, ...], classes: int) -> np.ndarray:
    """The ``demo`` profile: the demo model's output (``czregistry.examples.build_example_model``, default
    threshold and sharpness, behind the ``normalize`` layer the demo packs) on synthetic nuclei tiles, one
    seed per batch item. Two classes (one: the nucleus probability); other shapes get the noisy profile."""
    from czregistry.examples import _BLUR_RADIUS, EXAMPLE_NORMALIZATION, synthetic_nuclei_image

    if len(spatial) != 2 or classes > 2:
        return _noisy(n, spatial, classes)
    ax = np.arange(2 * _BLUR_RADIUS + 1) - _BLUR_RADIUS
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    g = (g / g.sum()).astype(np.float32)  # the model's 7x7 Gaussian is this kernel's outer product
    sharpness, threshold = 4.0, 0.5
    out = np.empty((n, *spatial, classes), np.float32)
    for i in range(n):
        x = synthetic_nuclei_image(*spatial, seed=i).astype(np.float32) / 255
        x = (x - EXAMPLE_NORMALIZATION["mean"]) / EXAMPLE_NORMALIZATION["std"]
        # 'same' convolution with zero padding, as Keras's Conv2D(padding="same")
        x = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 0, x)
        x = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 1, x)
        logit = sharpness * (x - threshold)
        # softmax over [-logit, logit] is a sigmoid of twice the logit
        p = 1 / (1 + np.exp(-2 * logit))
        out[i] = p[..., None] if classes == 1 else np.stack([1 - p, p], axis=-1)
    return out


def _probabilities(n: int, spatial: tuple[int, ...], classes: int, profile: str = "demo") -> np.ndarray:
    if profile not in PROFILES:
        raise ValueError(f"unknown null output profile {profile!r}: one of {', '.join(PROFILES)}")
    return (_demo if profile == "demo" else _noisy)(n, spatial, classes)


def _session_classes() -> tuple[type[Any], type[Any]]:
    from czregistry.backends import Backend, Session, Signature, TensorInfo

    class NullSession(Session):
        backend = NULL_BACKEND
        device = "none"

        def __init__(self, in_channels: int = 1, classes: int = 2, spatial_ndim: int = 2,
                     device_convert: bool = False, batch_suggestion: int | None = None,
                     profile: str = "demo") -> None:
            self.in_channels, self.classes, self.nd, self.profile = in_channels, classes, spatial_ndim, profile
            self.device_convert, self.batch_suggestion = device_convert, batch_suggestion
            free = (None,) * (spatial_ndim + 1)
            self._signature = Signature((TensorInfo("input", (*free, in_channels), "float32"),),
                                        (TensorInfo("output", (*free, classes), "float32"),))

        @property
        def signature(self) -> Signature:  # built once: the runner asks for it per batch (batch_limit)
            return self._signature

        def _cached(self, key: tuple[Any, ...], make: Any) -> np.ndarray:
            key = (self.profile, *key, self.classes)
            out = _OUTPUTS.get(key)
            if out is None:
                out = make()
                out.flags.writeable = False
                _OUTPUTS[key] = out
            return out

        def predict(self, batch: np.ndarray) -> np.ndarray:
            n, *spatial = batch.shape[:-1]
            return self._cached(("float32", n, *spatial),
                                lambda: _probabilities(n, tuple(spatial), self.classes, self.profile))

        def suggest_batch_size(self, tile_shape: tuple[int, ...], limit: int = 32) -> int | None:
            return self.batch_suggestion

        def converts_on_device(self, kind: str) -> bool:
            return self.device_convert and kind in ("labels", "uint8")

        def predict_converted(self, batch: np.ndarray, kind: str) -> np.ndarray:
            from czregistry.run.assemble import convert_output

            y = self.predict(batch)
            return self._cached((kind, *batch.shape[:-1]), lambda: convert_output(y, kind))  # type: ignore[arg-type]

    class NullBackend(Backend):
        name = NULL_BACKEND
        formats = frozenset({"onnx"})
        device_convert = False
        batch_suggestion: int | None = None
        profile = "demo"

        def load(self, package: Any, device: Any = "auto") -> Session:
            return NullSession(device_convert=self.device_convert, batch_suggestion=self.batch_suggestion,
                               profile=self.profile)

    return NullSession, NullBackend


def NullSession(**kwargs: Any) -> Any:
    """A null session (see the module docstring); keyword arguments as ``NullSession.__init__``."""
    return _session_classes()[0](**kwargs)


def warm(batch: int, tile: int = TILE, *, tiles: int = 0, kinds: tuple[str, ...] = (),
         profile: str = "demo") -> None:
    """Compute the null outputs a run will ask for, outside the timed pipeline: full batches of ``batch``
    tiles, the short last batch of a run of ``tiles`` tiles, and their conversions to ``kinds``."""
    session = NullSession(device_convert=bool(kinds), profile=profile)
    for n in {batch, tiles % batch or batch}:
        x = np.zeros((n, tile, tile, 1), np.float32)
        session.predict(x)
        for kind in kinds:
            session.predict_converted(x, kind)


def register_null_backend(*, device_convert: bool = False, batch_suggestion: int | None = None,
                          profile: str = "demo") -> None:
    """Register the ``null`` backend in this process's plugin host (benchmarks and tests only).

    ``device_convert`` makes its sessions offer device-side conversion (``predict_converted``);
    ``batch_suggestion`` is what they answer to ``suggest_batch_size`` (as a GPU backend would);
    ``profile`` which output they return (``PROFILES``, see the module docstring)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown null output profile {profile!r}: one of {', '.join(PROFILES)}")
    from czregistry.hookspecs import hookimpl
    from czregistry.plugins import get_host

    _, backend_cls = _session_classes()
    backend_cls.device_convert = device_convert
    backend_cls.batch_suggestion = batch_suggestion
    backend_cls.profile = profile

    class NullPlugin:
        @hookimpl
        def register_backends(self, register: Any) -> None:
            register(backend_cls)

    host = get_host()
    host.unregister_plugin("benchmark-null")
    host.register_plugin(NullPlugin(), "benchmark-null")


def build_null_package(dest: Path, *, tile: int = TILE, overlap: int = OVERLAP) -> Path:
    """A .czann holding a pointwise ONNX model (x * w + b, softmax over 2 classes) built with onnx.helper.
    The null backend never runs it; it gives the runner a real package and signature."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(ROOT))
    from czregistry.package import write_package

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None, None, 1])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, None, None, 2])
    w = numpy_helper.from_array(np.array([4.0, -4.0], np.float32), "w")
    b = numpy_helper.from_array(np.array([-2.0, 2.0], np.float32), "b")
    graph = helper.make_graph([helper.make_node("Mul", ["input", "w"], ["m"]),
                               helper.make_node("Add", ["m", "b"], ["a"]),
                               helper.make_node("Softmax", ["a"], ["output"], axis=-1)],
                              "tiny", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    meta = {"FormatVersion": "2.1.0", "Id": "00000000-0000-4000-8000-00000000b0b0",
            "Type": "SingleClassSemanticSegmentation", "InputShape": [tile, tile, 1],
            "OutputShape": [tile, tile, 2], "MinOverlap": [overlap, overlap], "ModelName": "benchmark-null",
            "Classes": [{"Name": "background", "Color": "#000000"}, {"Name": "object", "Color": "#FF0000"}],
            "ModelPath": "model.model"}
    path = dest / "null.czann"
    write_package(path, meta, model.SerializeToString())
    return path
