"""Test helpers for plugin authors: check a layer or a backend against czregistry's contract in one call.

    from czregistry.testing import check_layer, check_backend

    def test_my_layer():
        check_layer(MY_SPEC, {"low": 1.0, "high": 99.8}, channels=1, value_scale=65535)

    def test_my_backend(my_package_path):
        check_backend(MyBackend, my_package_path)

Each helper raises ``AssertionError`` with a message that says which part of the contract failed and
returns a small result with what it measured. ONNX, ONNX Runtime, TensorFlow, Keras and tf2onnx are imported
inside the functions. A layer's ONNX form is checked with ``onnx`` and ``onnxruntime`` only (no TensorFlow);
its Keras form, where it has one and Keras is installed, with the ``czregistry-tensorflow`` plugin.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, Device, Session, Signature, TensorInfo, validate_backend_class
from .errors import CzregError
from .layers import LayerSpec, validate_layer_spec

__all__ = ["BackendCheck", "LayerCheck", "check_backend", "check_input", "check_layer", "invariant_conv_model",
           "invariant_conv_onnx"]

#: Two 3x3 'same' convolutions: an output pixel sees input pixels at most this far away.
_HALO = 2


@dataclass
class LayerCheck:
    """What ``check_layer`` measured (max absolute differences)."""

    name: str
    output_shape: tuple[int, ...]
    #: The Keras form exported as a SavedModel against Keras; ``None`` when the Keras form was not checked.
    savedmodel_max_abs: float | None
    #: The layer in the packaged ONNX graph against its reference: the ONNX form spliced into a model against
    #: the Keras composition (or, without a Keras form, the fragment and the model run one after the other);
    #: for a Keras-only layer, its tf2onnx conversion against Keras.
    onnx_max_abs: float
    #: Max difference between tiled and whole-image output of an invariant model with the layer;
    #: ``None`` when the layer declares ``local=False`` (tiles then legitimately differ).
    invariance_max_abs: float | None
    notes: list[str] = field(default_factory=list)
    #: The forms checked: ``onnx``, ``keras``.
    forms: list[str] = field(default_factory=list)
    #: The ONNX form against the Keras form on the same input (``None`` without both).
    keras_max_abs: float | None = None
    #: The ONNX form against the ``reference`` function given to ``check_layer`` (``None`` without one).
    reference_max_abs: float | None = None


@dataclass
class BackendCheck:
    """What ``check_backend`` saw."""

    backend: str
    device: str
    signature: Signature
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output: np.ndarray = field(repr=False)


def _fail(what: str, detail: str) -> AssertionError:
    return AssertionError(f"{what}: {detail}")


def invariant_conv_model(in_channels: int, out_channels: int, *, activation: str | None = None,
                         seed: int = 7) -> Any:
    """A small fully convolutional Keras model (two 3x3 'same' convs, no pooling): translation-equivariant
    away from its borders, with a halo of 2 pixels. Any input size works."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, in_channels), name="input")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Conv2D(out_channels, 3, padding="same", activation=activation)(x)
    return keras.Model(inp, out, name="invariant_conv")


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0


def _assert_close(what: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> float:
    if got.shape != want.shape:
        raise _fail(what, f"output shape {got.shape} differs from the Keras output {want.shape}")
    diff = _max_abs(got, want)
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        raise _fail(what, f"max abs difference {diff:.3g} to the Keras output exceeds atol={atol:g}, rtol={rtol:g}")
    return diff


def check_layer(spec: LayerSpec, kwargs: dict[str, Any] | None = None, *, channels: int = 3, tile: int = 32,
                value_scale: float = 1.0, atol: float = 1e-4, rtol: float = 1e-5, opset: int | None = None,
                seed: int = 0, reference: Callable[[np.ndarray], np.ndarray] | None = None) -> LayerCheck:
    """Check a registered layer end to end, in every form it has.

    The ONNX form (``spec.onnx``; needs only ``onnx`` and ``onnxruntime``):

    1. builds for NHWC and NDHWC inputs at ``opset`` (default 18) and at 12 (legacy ``.czmodel``), runs in
       ONNX Runtime, and gives the same output at both opsets;
    2. equals ``reference(x)`` (a NumPy function you give) and the Keras form (if it has one and Keras is
       installed) within ``atol``/``rtol``;
    3. spliced into a small invariant ONNX convolutional model (before it for ``pre`` layers, after it for
       ``post``), gives what the fragment and the model give one after the other;
    4. for layers declared ``local`` (the default), keeps that model spatially invariant: the output for a crop
       equals the crop of the whole-image output away from the crop's edges. A layer that uses whole-image
       statistics must say ``local=False``; the validator measures it either way.

    The Keras form (``spec.factory``, when Keras is installed): the factory builds a Keras layer whose
    ``get_config`` round-trips (``from_config`` and ``keras.saving``), and composed with a small invariant
    model it survives a SavedModel export and an ONNX conversion; for ``local`` layers it stays invariant.

    ``channels`` is what the layer receives; ``value_scale`` scales the random input (65535 for 16-bit).
    """
    try:
        validate_layer_spec(spec)
    except TypeError as exc:
        raise _fail(f"layer spec {spec!r}", str(exc)) from exc
    kwargs = dict(kwargs or {})
    what = f"layer '{spec.name}'"
    rng = np.random.default_rng(seed)
    sample = (rng.random((2, tile, tile, channels)) * value_scale).astype(np.float32)
    use_keras = spec.factory is not None and importlib.util.find_spec("keras") is not None
    notes: list[str] = []
    if spec.factory is not None and not use_keras:
        notes.append("Keras form not checked: Keras is not installed")
    keras_result = _check_keras_form(spec, kwargs, what, sample, rng, value_scale, atol, rtol, opset) \
        if use_keras else None
    if spec.onnx is None:
        if keras_result is None:
            raise _fail(what, "has only a Keras form and Keras is not installed here; give it an ONNX form "
                              "(LayerSpec(..., onnx=...)) or install czregistry-tensorflow")
        keras_result.forms = ["keras"]
        keras_result.notes = notes + keras_result.notes
        return keras_result
    result = _check_onnx_form(spec, kwargs, what, sample, rng, value_scale, atol, rtol, opset, reference)
    result.notes = notes + result.notes
    if keras_result is not None:
        keras_out = np.asarray(spec.factory(**kwargs)(sample))  # type: ignore[misc]
        result.keras_max_abs = _assert_close(f"{what}: the ONNX form against the Keras form",
                                             _run_fragment(spec, kwargs, sample, opset), keras_out, atol, rtol)
        result.savedmodel_max_abs = keras_result.savedmodel_max_abs
        result.onnx_max_abs = max(result.onnx_max_abs, keras_result.onnx_max_abs)
        result.forms = ["onnx", "keras"]
    return result


def _ort_run(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _fragment_bytes(spec: LayerSpec, kwargs: dict[str, Any], shape: tuple[int | None, ...], opset: int) -> bytes:
    from .onnx.graph import layers_to_onnx

    return layers_to_onnx([(spec, kwargs)], shape, opset)[0]


def _run_fragment(spec: LayerSpec, kwargs: dict[str, Any], x: np.ndarray, opset: int | None) -> np.ndarray:
    from .onnx.graph import DEFAULT_OPSET

    shape = (None,) * (x.ndim - 1) + (int(x.shape[-1]),)
    return _ort_run(_fragment_bytes(spec, kwargs, shape, opset or DEFAULT_OPSET), x)


def invariant_conv_onnx(in_channels: int, out_channels: int, *, rank: int = 4, activation: str | None = None,
                        opset: int = 18, seed: int = 7) -> bytes:
    """``invariant_conv_model`` as ONNX, without Keras: channels-last input, two 3x3 (3x3x3) convolutions with
    'same' padding and a ReLU between, an optional ``"softmax"`` / ``"sigmoid"`` over the channels. Any
    spatial size works; an output pixel sees input pixels at most 2 away."""
    import onnx
    from onnx import helper, numpy_helper

    spatial = rank - 2
    w_rng = np.random.default_rng(seed)
    to_first, to_last = [0, rank - 1, *range(1, rank - 1)], [0, *range(2, rank), 1]
    w1 = (w_rng.standard_normal((4, in_channels, *[3] * spatial)) * 0.5).astype(np.float32)
    w2 = (w_rng.standard_normal((out_channels, 4, *[3] * spatial)) * 0.5).astype(np.float32)
    conv: dict[str, Any] = {"kernel_shape": [3] * spatial, "pads": [1] * (2 * spatial)}
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=to_first),
             helper.make_node("Conv", ["nchw", "w1"], ["c1"], **conv),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], **conv),
             helper.make_node("Transpose", ["c2"], ["logits" if activation else "output"], perm=to_last)]
    if activation == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["output"], axis=-1))
    elif activation == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["output"]))
    dims: list[int | str] = ["batch", *[f"s{i}" for i in range(spatial)]]
    graph = helper.make_graph(
        nodes, "invariant_conv",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [*dims, in_channels])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [*dims, out_channels])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _check_onnx_form(spec: LayerSpec, kwargs: dict[str, Any], what: str, sample: np.ndarray,
                     rng: np.random.Generator, value_scale: float, atol: float, rtol: float, opset: int | None,
                     reference: Callable[[np.ndarray], np.ndarray] | None) -> LayerCheck:
    from .errors import CzregError
    from .onnx.graph import DEFAULT_OPSET, LEGACY_OPSET, splice_onnx

    use_opset = opset or DEFAULT_OPSET
    channels = int(sample.shape[-1])
    notes: list[str] = []
    # 1. NHWC and NDHWC, at the package's opset and the legacy one
    volume = (rng.random((2, 6, 10, 8, channels)) * value_scale).astype(np.float32)
    outputs: dict[int, np.ndarray] = {}
    for x in (sample, volume):
        for op in [use_opset, *([LEGACY_OPSET] if use_opset != LEGACY_OPSET else [])]:
            try:
                out = _run_fragment(spec, kwargs, x, op)
            except CzregError as exc:
                raise _fail(what, f"the ONNX form does not build for input {list(x.shape)} at opset {op}: "
                                  f"{exc.message}") from exc
            except Exception as exc:
                raise _fail(what, f"the ONNX form does not run on input {list(x.shape)} at opset {op}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if out.ndim != x.ndim or out.shape[:-1] != x.shape[:-1]:
                raise _fail(what, f"the ONNX form maps {list(x.shape)} to {list(out.shape)}; a layer keeps the "
                                  "batch and spatial axes")
            if x is sample and op != use_opset:
                _assert_close(f"{what}: the ONNX form at opset {op} against opset {use_opset}", out,
                              outputs[use_opset], atol, rtol)
            if x is sample:
                outputs[op] = out
    out = outputs[use_opset]
    # 2. against the user's NumPy reference
    reference_diff: float | None = None
    if reference is not None:
        reference_diff = _assert_close(f"{what}: the ONNX form against the reference", out,
                                       np.asarray(reference(sample), dtype=np.float32), atol, rtol)
    # 3. spliced into a model
    layer_shape = (None, None, None, channels)
    fragment = _fragment_bytes(spec, kwargs, layer_shape, use_opset)
    if spec.kind == "pre":
        model = invariant_conv_onnx(int(out.shape[-1]), 2, activation="softmax", opset=use_opset)
        x = sample
        chained = _ort_run(model, out)
        spliced = splice_onnx(model, fragment, None)
    else:
        model = invariant_conv_onnx(1, channels, activation="sigmoid", opset=use_opset)
        x = (rng.random((2, sample.shape[1], sample.shape[2], 1)) * value_scale).astype(np.float32)
        chained = _ort_run(fragment, _ort_run(model, x))
        spliced = splice_onnx(model, None, fragment)
    got = _ort_run(spliced, x)
    onnx_diff = _assert_close(f"{what} spliced into an ONNX model", got, chained, atol, rtol)
    # 4. spatial invariance of the spliced model
    invariance: float | None = None
    if spec.local:
        invariance = _invariance(what, lambda crop: _ort_run(spliced, crop), x, got, atol, rtol)
    else:
        notes.append("declared local=False: tiled inference differs from whole-image inference")
    return LayerCheck(spec.name, tuple(int(d) for d in got.shape), None, onnx_diff, invariance, notes,
                      forms=["onnx"], reference_max_abs=reference_diff)


def _invariance(what: str, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, want: np.ndarray,
                atol: float, rtol: float) -> float:
    """Crop vs whole image, away from the crop's edges; fails with the local=False advice."""
    half = x.shape[1] // 2
    crop = x[:, half // 2: half // 2 + half, half // 2: half // 2 + half]
    whole = want[:, half // 2: half // 2 + half, half // 2: half // 2 + half]
    tiled = np.asarray(run(crop))
    m = _HALO
    diff = _max_abs(tiled[:, m:-m, m:-m], whole[:, m:-m, m:-m])
    if not np.allclose(tiled[:, m:-m, m:-m], whole[:, m:-m, m:-m], atol=atol, rtol=rtol):
        raise _fail(what, f"breaks spatial invariance (tile vs whole image differ by {diff:.3g}); "
                          "if it uses whole-image statistics, declare LayerSpec(..., local=False)")
    return diff


def _check_keras_form(spec: LayerSpec, kwargs: dict[str, Any], what: str, sample: np.ndarray,
                      rng: np.random.Generator, value_scale: float, atol: float, rtol: float,
                      opset: int | None) -> LayerCheck:
    import keras

    from .onnx.graph import DEFAULT_OPSET
    from .selection import layer_builder
    from .sources import LoadOptions

    assert spec.factory is not None
    # the Keras layers' plugin (the source that builds them: czregistry-tensorflow) exports the models
    builder = layer_builder()
    channels = int(sample.shape[-1])
    layer = spec.factory(**kwargs)
    if not isinstance(layer, keras.layers.Layer):
        raise _fail(what, f"factory returned {type(layer).__name__}, not a keras.layers.Layer")
    out = np.asarray(layer(sample))

    # serialization
    config = layer.get_config()
    clone = type(layer).from_config(config)
    if not np.allclose(np.asarray(clone(sample)), out, atol=atol, rtol=rtol):
        raise _fail(what, "from_config(get_config()) builds a layer with different output; "
                          "put every constructor argument in get_config()")
    serialized = keras.saving.serialize_keras_object(layer)
    try:
        revived = keras.saving.deserialize_keras_object(serialized)
    except Exception as exc:
        raise _fail(what, f"keras.saving cannot deserialize it ({exc}); decorate the class with "
                          "@keras.saving.register_keras_serializable(package=...)") from exc
    if type(revived) is not type(layer):
        raise _fail(what, f"keras.saving revived a {type(revived).__name__}, not a {type(layer).__name__}; "
                          "register it with keras.saving.register_keras_serializable")

    # export survival
    tile = int(sample.shape[1])
    if spec.kind == "pre":
        base = invariant_conv_model(int(out.shape[-1]), 2, activation="softmax")
        inp = keras.Input((None, None, channels), name="input", dtype="float32")
        model = keras.Model(inp, base(spec.factory(**kwargs)(inp)))
        x = sample
    else:
        base = invariant_conv_model(1, channels, activation="sigmoid")
        model = keras.Model(base.input, spec.factory(**kwargs)(base.output))
        x = (rng.random((2, tile, tile, 1)) * value_scale).astype(np.float32)
    want = np.asarray(model(x))
    use_opset = opset or DEFAULT_OPSET
    loaded = builder.load(model, LoadOptions(opset=use_opset))
    sm_diff = _check_savedmodel(what, loaded.export("savedmodel", use_opset), x, want, atol, rtol)
    onnx_diff = _check_onnx(what, loaded.export("onnx", use_opset), x, want, atol, rtol, use_opset)

    # spatial invariance
    invariance: float | None = None
    notes: list[str] = []
    if spec.local:
        invariance = _invariance(what, lambda crop: np.asarray(model(crop)), x, want, atol, rtol)
    else:
        notes.append("declared local=False: tiled inference differs from whole-image inference")
    return LayerCheck(spec.name, tuple(int(d) for d in want.shape), sm_diff, onnx_diff, invariance, notes)


def _check_savedmodel(what: str, zipped: bytes, x: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> float:
    """Run the zipped SavedModel through the backend a host would pick for it (the TensorFlow plugin's)."""
    import uuid

    from .package import open_package, write_package
    from .selection import load_session

    meta = {"Id": str(uuid.uuid4()), "Type": "Regression", "InputShape": [*map(int, x.shape[1:])],
            "OutputShape": [*map(int, want.shape[1:])], "MinOverlap": [0] * (x.ndim - 2), "Classes": [],
            "ModelName": "check_layer", "Version": "1.0.0"}
    with tempfile.TemporaryDirectory(prefix="czreg-check-") as tmp:
        path = write_package(Path(tmp) / "layer.czann", meta, zipped)
        with load_session(open_package(path), device="cpu") as session:
            got = session.predict(x)
    return _assert_close(f"{what} in a SavedModel", got, want, atol, rtol)


def _check_onnx(what: str, data: bytes, x: np.ndarray, want: np.ndarray, atol: float, rtol: float,
                opset: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])
    return _assert_close(f"{what} in ONNX (opset {opset})", got, want, atol, rtol)


def _check_tensor_infos(what: str, infos: Any) -> None:
    if not isinstance(infos, tuple) or not infos:
        raise _fail(what, f"must be a non-empty tuple of TensorInfo, got {infos!r}")
    for t in infos:
        if not isinstance(t, TensorInfo):
            raise _fail(what, f"{t!r} is not a TensorInfo")
        if not all(d is None or (isinstance(d, int) and d >= 0) for d in t.shape):
            raise _fail(what, f"shape {t.shape} of '{t.name}' must hold ints or None (unknown)")
        try:
            np.dtype(t.dtype)
        except TypeError as exc:
            raise _fail(what, f"dtype {t.dtype!r} of '{t.name}' is not a numpy dtype name") from exc


def check_backend(backend_cls: type[Backend], package_path: Path | str, *, device: Device = "cpu",
                  batch: int = 2, reference: np.ndarray | None = None, atol: float = 1e-4,
                  seed: int = 0) -> BackendCheck:
    """Check a backend on a real package.

    Verifies: the class is a valid ``Backend``; ``load`` returns a ``Session`` reporting its backend,
    device and a well-formed signature whose input rank matches the metadata's ``InputShape``; ``predict``
    on a float32 ``[batch, *InputShape]`` batch returns a float ndarray with the batch axis first,
    deterministically; ``close`` is idempotent and a closed session refuses to predict with a czregistry
    error. With ``reference`` (the expected output for the same seeded input, see ``check_input``), the
    output must match within ``atol``.
    """
    from .package import open_package

    try:
        validate_backend_class(backend_cls)
    except TypeError as exc:
        raise _fail(f"backend {backend_cls!r}", str(exc)) from exc
    what = f"backend '{backend_cls.name}'"
    package = open_package(package_path)
    if package.model_format not in backend_cls.formats:
        raise _fail(what, f"cannot be checked on a {package.model_format} package "
                          f"(it runs {sorted(backend_cls.formats)})")
    meta = package.metadata or {}
    shape = tuple(int(d) for d in meta.get("InputShape", []))
    if not shape:
        raise _fail(what, f"{package_path}: metadata has no InputShape to build a test batch from")
    session = backend_cls().load(package, device)
    if not isinstance(session, Session):
        raise _fail(what, f"load() returned {type(session).__name__}, not a czregistry.backends.Session")
    try:
        if session.backend != backend_cls.name:
            raise _fail(what, f"session.backend is {session.backend!r}, expected {backend_cls.name!r}")
        if not isinstance(session.device, str) or not session.device:
            raise _fail(what, "session.device must name the device that runs the model")
        if device == "cpu" and session.device != "cpu":
            raise _fail(what, f"device='cpu' was requested but the session runs on {session.device!r}")
        sig = session.signature
        if not isinstance(sig, Signature):
            raise _fail(what, f"signature is {type(sig).__name__}, not a Signature")
        _check_tensor_infos(f"{what} signature inputs", sig.inputs)
        _check_tensor_infos(f"{what} signature outputs", sig.outputs)
        if sig.inputs[0].shape and len(sig.inputs[0].shape) != len(shape) + 1:
            raise _fail(what, f"input shape {sig.inputs[0].shape} has not the rank of [batch, *InputShape] "
                              f"= {len(shape) + 1}")
        x = check_input(shape, batch=batch, seed=seed)
        y = session.predict(x)
        if not isinstance(y, np.ndarray):
            raise _fail(what, f"predict returned {type(y).__name__}, not a numpy array")
        if y.shape[:1] != (batch,):
            raise _fail(what, f"predict returned shape {y.shape}; the batch axis ({batch}) must come first")
        if not np.issubdtype(y.dtype, np.floating):
            raise _fail(what, f"predict returned dtype {y.dtype}, expected floating point")
        if not np.array_equal(session.predict(x), y):
            raise _fail(what, "predict is not deterministic for the same input")
        if reference is not None:
            _assert_close(what, y, np.asarray(reference), atol, 0.0)
    finally:
        session.close()
    session.close()  # idempotent
    try:
        session.predict(x)
    except CzregError:
        pass
    except Exception as exc:
        raise _fail(what, f"predict after close raised {type(exc).__name__}, expected a czregistry error "
                          "(BackendError)") from exc
    else:
        raise _fail(what, "predict after close still ran; close() must release the model")
    return BackendCheck(backend_cls.name, session.device, sig, x.shape, tuple(y.shape), y)


def check_input(shape: tuple[int, ...], *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """The seeded float32 batch ``check_backend`` feeds: ``[batch, *shape]`` uniform in [0, 1)."""
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)
