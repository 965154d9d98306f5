"""The reference layers: numerics, survival through SavedModel and ONNX, spatial invariance, composition
with a model, and the ``name:key=value`` command-line syntax."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from czregistry_tensorflow.compose import prepend_and_append
from czregistry_tensorflow.export import export_savedmodel_zip, to_onnx

from czregistry.builtin_layers import LAYER_SPECS
from czregistry.errors import PackError, UsageError
from czregistry.layers import LayerSpec
from czregistry.selection import parse_layer
from czregistry.testing import check_layer

SPECS = {spec.name: spec for spec in LAYER_SPECS}
RNG = np.random.default_rng(11)
X3 = RNG.random((2, 16, 12, 3), dtype=np.float32)
X4 = RNG.random((2, 16, 12, 4), dtype=np.float32)


def _apply(arg: str, x: np.ndarray) -> np.ndarray:
    spec, kwargs = parse_layer(arg)
    return np.asarray(spec.factory(**kwargs)(x))


# -- numerics -------------------------------------------------------------------------------------------


def test_reference_set_is_registered_with_stable_names() -> None:
    assert [s.name for s in LAYER_SPECS] == ["rgb_to_bgr", "rgba_to_bgra", "per_image_standardization", "normalize",
                                             "shift", "scale", "transpose_channels", "sigmoid_to_softmax",
                                             "softmax"]
    assert {s.name for s in LAYER_SPECS if s.kind == "post"} == {"sigmoid_to_softmax", "softmax"}
    assert {s.name for s in LAYER_SPECS if not s.local} == {"per_image_standardization"}


def test_channel_order_layers() -> None:
    np.testing.assert_array_equal(_apply("rgb_to_bgr", X3), X3[..., ::-1])
    np.testing.assert_array_equal(_apply("rgba_to_bgra", X4), X4[..., [2, 1, 0, 3]])
    np.testing.assert_array_equal(_apply("transpose_channels:order=[1,2,0]", X3), X3[..., [1, 2, 0]])


def test_affine_layers() -> None:
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.float32(0.2)
    np.testing.assert_allclose(_apply("normalize:mean=[0.5,0.4,0.3],std=0.2", X3), (X3 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(_apply("normalize:mean=0.5,std=[1,2,4]", X3), (X3 - 0.5) / [1, 2, 4], rtol=1e-6)
    np.testing.assert_allclose(_apply("shift:offset=-0.25", X3), X3 - 0.25, rtol=1e-6)
    np.testing.assert_allclose(_apply("scale:factor=[1,2,3]", X3), X3 * [1, 2, 3], rtol=1e-6)


def test_per_image_standardization_matches_tensorflow() -> None:
    import tensorflow as tf

    x = (X3 * 1000).astype(np.float32)
    np.testing.assert_allclose(_apply("per_image_standardization", x), tf.image.per_image_standardization(x),
                               atol=1e-5)
    flat = np.full((1, 8, 8, 1), 7.0, np.float32)  # a flat image divides by 1/sqrt(N), not by 0
    np.testing.assert_array_equal(_apply("per_image_standardization", flat), np.zeros_like(flat))


def test_sigmoid_to_softmax_scores() -> None:
    p = RNG.random((2, 8, 8, 1), dtype=np.float32)
    out = _apply("sigmoid_to_softmax", p)
    assert out.shape == (2, 8, 8, 2)
    np.testing.assert_allclose(out[..., 1:], p)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(("arg", "x", "message"), [
    ("rgb_to_bgr", X4, "needs 3 channels, the input has 4"),
    ("normalize:mean=[1,2],std=1", X3, "2 per-channel values given but the input has 3 channels"),
    ("sigmoid_to_softmax", X3, "expects a 1-channel sigmoid output, got 3 channels"),
])
def test_layers_refuse_the_wrong_channel_count(arg: str, x: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _apply(arg, x)


# -- the contract: config round trip, SavedModel and ONNX survival, spatial invariance --------------------

CONTRACT_ARGS: dict[str, tuple[str, int]] = {
    "rgb_to_bgr": ("rgb_to_bgr", 3),
    "rgba_to_bgra": ("rgba_to_bgra", 4),
    "per_image_standardization": ("per_image_standardization", 3),
    "normalize": ("normalize:mean=[0.5,0.4,0.3],std=[0.2,0.25,0.3]", 3),
    "shift": ("shift:offset=0.1", 2),
    "scale": ("scale:factor=[2,3,4]", 3),
    "transpose_channels": ("transpose_channels:order=[2,0,1]", 3),
    "sigmoid_to_softmax": ("sigmoid_to_softmax", 1),
    "softmax": ("softmax", 3),
}


@pytest.mark.parametrize("name", sorted(CONTRACT_ARGS))
def test_layer_survives_savedmodel_and_onnx(name: str) -> None:
    arg, channels = CONTRACT_ARGS[name]
    spec, kwargs = parse_layer(arg)
    result = check_layer(spec, kwargs, channels=channels, value_scale=255.0 if name != "sigmoid_to_softmax" else 1.0)
    assert result.savedmodel_max_abs <= 1e-4 and result.onnx_max_abs <= 1e-4
    assert (result.invariance_max_abs is None) == (not spec.local)


def test_contract_check_catches_an_undeclared_whole_image_layer() -> None:
    """per_image_standardization really breaks tiling: declared local, check_layer must fail."""
    liar = dataclasses.replace(SPECS["per_image_standardization"], local=True)
    with pytest.raises(AssertionError, match="breaks spatial invariance"):
        check_layer(liar, {}, channels=3)


def _scale_layer_class(*, registered: bool, complete_config: bool) -> type:
    import keras

    class TimesFactor(keras.layers.Layer):
        def __init__(self, factor: float = 1.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x: Any) -> Any:
            return x * self.factor

        def get_config(self) -> dict[str, Any]:
            config = {"name": self.name, "trainable": self.trainable}
            return {**config, "factor": self.factor} if complete_config else config

    name = f"TimesFactor_{registered}_{complete_config}"
    TimesFactor.__name__ = TimesFactor.__qualname__ = name
    if registered:
        return keras.saving.register_keras_serializable(package="czregistry_tests")(TimesFactor)
    return TimesFactor


def test_contract_check_catches_an_incomplete_config() -> None:
    cls = _scale_layer_class(registered=True, complete_config=False)
    with pytest.raises(AssertionError, match=r"from_config\(get_config\(\)\) builds a layer with different output"):
        check_layer(LayerSpec("times", "pre", cls), {"factor": 3.0})


def test_contract_check_catches_an_unregistered_layer() -> None:
    cls = _scale_layer_class(registered=False, complete_config=True)
    with pytest.raises(AssertionError, match="register_keras_serializable"):
        check_layer(LayerSpec("times", "pre", cls), {"factor": 3.0})
    check_layer(LayerSpec("times", "pre", _scale_layer_class(registered=True, complete_config=True)), {"factor": 3.0})


def test_local_layers_keep_the_projects_unet_invariant(model_cache: Callable[..., Path]) -> None:
    """Tiles of a U-Net (step 4) with every local pre layer give the whole image's output away from edges."""
    unet = model_cache.keras_model("unet", channels=3)  # type: ignore[attr-defined]
    pre = [parse_layer(a) for a in ("rgb_to_bgr", "normalize:mean=[0.5,0.4,0.3],std=0.2", "shift:offset=0.1",
                                        "scale:factor=0.5", "transpose_channels:order=[1,0,2]")]
    model = prepend_and_append(unet, pre, [], spatial_dims=(None, None))
    x = np.random.default_rng(5).random((1, 96, 96, 3), dtype=np.float32)
    whole = np.asarray(model(x))
    tile = np.asarray(model(x[:, 16:80, 32:96]))  # offsets are multiples of the U-Net's step (4)
    margin = 16
    np.testing.assert_allclose(tile[:, margin:-margin, margin:-margin],
                               whole[:, 16 + margin:80 - margin, 32 + margin:96 - margin], atol=1e-5)


def test_composed_model_serializes_as_keras_file(tmp_path: Path) -> None:
    import keras

    from czregistry.testing import invariant_conv_model

    pre = [parse_layer(a) for a in ("rgb_to_bgr", "normalize:mean=0.5,std=0.25", "per_image_standardization")]
    post = [parse_layer("sigmoid_to_softmax")]
    model = prepend_and_append(invariant_conv_model(3, 1, activation="sigmoid"), pre, post)
    model.save(tmp_path / "m.keras")
    revived = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(revived(X3)), np.asarray(model(X3)), atol=1e-6)
    assert [type(layer).__name__ for layer in revived.layers[1:4]] == [
        "RgbToBgr", "Normalization", "PerImageStandardization"]


# -- composition and export helpers -----------------------------------------------------------------------


def test_prepend_and_append_sets_spatial_dims_and_keeps_weights(model_cache: Callable[..., Path]) -> None:
    unet = model_cache.keras_model("unet", channels=3)  # type: ignore[attr-defined]
    model = prepend_and_append(unet, [parse_layer("scale:factor=1")], [], spatial_dims=(64, 64))
    assert model.input_shape == (None, 64, 64, 3)
    x = np.random.default_rng(1).random((1, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(unet(x)), atol=1e-6)
    with pytest.raises(PackError, match=r"spatial_dims \(64,\) has 1 axes; model 'unet' takes 2"):
        prepend_and_append(unet, [], [], spatial_dims=(64,))


@pytest.mark.parametrize(("pre", "post", "message"), [
    (["sigmoid_to_softmax"], [], "layer 'sigmoid_to_softmax' is a post-processing layer; it cannot go before"),
    ([], ["scale:factor=2"], "layer 'scale' is a pre-processing layer; it cannot go after"),
    (["transpose_channels:order=[0,0,1]"], [],
     r"layer 'transpose_channels' \(plugin 'builtin_layers'\) cannot be built"),
    (["rgba_to_bgra"], [], "cannot compose model 'unet' with the requested layers"),
])
def test_prepend_and_append_errors_name_the_layer(model_cache: Callable[..., Path], pre: list[str],
                                                  post: list[str], message: str) -> None:
    unet = model_cache.keras_model("unet", channels=3)  # type: ignore[attr-defined]
    with pytest.raises(PackError, match=message):
        prepend_and_append(unet, [parse_layer(a) for a in pre], [parse_layer(a) for a in post])


def test_export_helpers(model_cache: Callable[..., Path]) -> None:
    import onnx

    unet = model_cache.keras_model("unet")  # type: ignore[attr-defined]
    names = zipfile.ZipFile(io.BytesIO(export_savedmodel_zip(unet))).namelist()
    assert "saved_model.pb" in names and "variables/variables.index" in names
    proto = onnx.load_model_from_string(to_onnx(unet, 17))
    assert proto.opset_import[0].version == 17
    (inp,) = proto.graph.input
    assert inp.name == "input"
    assert [d.dim_value or None for d in inp.type.tensor_type.shape.dim] == [None, None, None, 1]


# -- command-line syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "expected"), [
    ("normalize:mean=[0.5,0.4,0.3],std=0.2", {"mean": [0.5, 0.4, 0.3], "std": [0.2]}),
    ("normalize: mean = 0.5 , std = 1/2/4", {"mean": [0.5], "std": [1.0, 2.0, 4.0]}),
    ("transpose_channels:order=[2,0,1]", {"order": [2, 0, 1]}),
    ("scale:factor=0.00392156862745098", {"factor": [0.00392156862745098]}),
    ("rgb_to_bgr", {}),
    ("percentile_normalize", {"low": 1.0, "high": 99.8, "clip": False}),
    ("percentile_normalize:high=99,clip=yes", {"low": 1.0, "high": 99.0, "clip": True}),
])
def test_parse_layer_arg(arg: str, expected: dict[str, Any]) -> None:
    _, kwargs = parse_layer(arg)
    assert kwargs == expected


@pytest.mark.parametrize(("arg", "message"), [
    ("nope", "unknown layer 'nope' (available: normalize, per_image_standardization, percentile_normalize, "
             "rgb_to_bgr, rgba_to_bgra, scale, shift, sigmoid_to_softmax, softmax, transpose_channels)"),
    ("normalize:mean=0.5",
     "layer 'normalize' needs parameter 'std' (standard deviation, one value or one per channel)"),
    ("scale:factor=abc", "layer 'scale': parameter 'factor' expects floats, got 'abc'"),
    ("scale:factor=nan", "layer 'scale': parameter 'factor' expects floats, got 'nan'"),
    ("scale:factor=[]", "layer 'scale': parameter 'factor' expects floats, got '[]'"),
    ("shift:delta=1", "layer 'shift': bad parameter 'delta=1' (takes offset)"),
    ("shift:offset", "layer 'shift': bad parameter 'offset' (takes offset)"),
    ("shift:offset=1,offset=2", "layer 'shift': parameter 'offset' is given twice"),
    ("transpose_channels:order=[1.5,0]", "layer 'transpose_channels': parameter 'order' expects ints, got '[1.5,0]'"),
    ("transpose_channels:order=[1,0", "layer 'transpose_channels': parameter 'order' expects ints, got '[1,0'"),
    ("percentile_normalize:clip=maybe", "layer 'percentile_normalize': parameter 'clip' expects bool, got 'maybe'"),
    ("rgb_to_bgr:x=1", "layer 'rgb_to_bgr': bad parameter 'x=1' (takes no parameters)"),
])
def test_parse_layer_arg_errors(arg: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_layer(arg)
    assert err.value.message == message
    assert err.value.exit_code == 2


# -- the ONNX form of every layer (issue 28): equal to the Keras form, NHWC and NDHWC, at opsets 18 and 12 ----

#: Per layer: the argument, the channel count it takes, the input scale. The closing note's parity table is
#: what this test measures (``pytest -s`` prints it).
PARITY_CASES: list[tuple[str, int, float]] = [
    ("rgb_to_bgr", 3, 255.0),
    ("rgba_to_bgra", 4, 255.0),
    ("per_image_standardization", 3, 255.0),
    ("normalize:mean=[0.5,0.4,0.3],std=[0.2,0.25,0.3]", 3, 1.0),
    ("shift:offset=[0.1,-0.2]", 2, 1.0),
    ("scale:factor=0.00392156862745098", 1, 255.0),
    ("transpose_channels:order=[2,0,1]", 3, 1.0),
    ("sigmoid_to_softmax", 1, 1.0),
    ("softmax", 3, 8.0),
    ("percentile_normalize:low=1,high=99.8", 1, 65535.0),
    ("percentile_normalize:low=2,high=98,clip=true", 2, 65535.0),
]


def test_every_layer_has_an_onnx_form() -> None:
    from czregistry.selection import available_layers

    layers = available_layers()
    assert {arg.split(":")[0] for arg, *_ in PARITY_CASES} == set(layers)
    assert all(spec.onnx is not None for _, spec in layers.values())
    assert {name: plugin for name, (plugin, _) in layers.items() if plugin != "builtin_layers"} == {
        "percentile_normalize": "example"}


@pytest.mark.parametrize(("arg", "channels", "scale"), PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_onnx_form_equals_keras_form(arg: str, channels: int, scale: float) -> None:
    """The same inputs through both forms: within 1e-6 (absolute) for 2D and 3D inputs, at both opsets."""
    import onnxruntime as ort

    from czregistry.onnx.graph import layers_to_onnx

    spec, kwargs = parse_layer(arg)
    assert spec.factory is not None and spec.onnx is not None
    rng = np.random.default_rng(28)
    worst = 0.0
    for spatial in ((24, 20), (6, 10, 8)):
        x = (rng.random((2, *spatial, channels)) * scale).astype(np.float32)
        keras_out = np.asarray(spec.factory(**kwargs)(x))
        for opset in (18, 12):
            data, out_shape = layers_to_onnx([(spec, kwargs)], (None,) * (len(spatial) + 1) + (channels,), opset)
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x})[0]
            assert got.shape == keras_out.shape and out_shape[-1] == keras_out.shape[-1]
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - keras_out))))
    print(f"parity {arg}: {worst:.3g}")
    assert worst <= 1e-6


def test_check_layer_checks_an_onnx_only_layer_against_numpy() -> None:
    """A layer with only an ONNX form passes check_layer with a NumPy reference, and a wrong reference fails."""
    from czregistry.builtin_layers import normalize

    spec = LayerSpec("halve", "pre", None, {}, "x / 2", onnx=lambda ctx: normalize(ctx, 0.0, 2.0))
    result = check_layer(spec, {}, channels=2, reference=lambda x: x / 2)
    assert result.forms == ["onnx"] and result.savedmodel_max_abs is None
    assert result.reference_max_abs == 0.0 and result.invariance_max_abs is not None
    with pytest.raises(AssertionError, match="layer 'halve': the ONNX form against the reference: max abs"):
        check_layer(spec, {}, channels=2, reference=lambda x: x / 3)


def test_check_layer_catches_an_undeclared_whole_image_onnx_layer() -> None:
    """The ONNX form alone (no Keras) is checked for invariance: per_image_standardization declared local fails."""
    liar = dataclasses.replace(SPECS["per_image_standardization"], local=True, factory=None)
    with pytest.raises(AssertionError, match="breaks spatial invariance"):
        check_layer(liar, {}, channels=3)


@pytest.mark.slow
def test_keras_file_with_builtin_layers_packs_in_a_fresh_process(tmp_path: Path) -> None:
    """A ``.keras`` file saved with built-in layers (``czregistry>RgbToBgr``, ...) loads where nothing has
    imported the Keras forms yet: the Keras source registers them before deserialising."""
    import os
    import subprocess
    import sys

    import keras

    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.Conv2D(2, 3, padding="same", activation="softmax")(inp))
    composed = prepend_and_append(model, [parse_layer("rgb_to_bgr"), parse_layer("normalize:mean=0.5,std=0.2")],
                                  [], spatial_dims=(None, None))
    composed.save(tmp_path / "old.keras")
    res = subprocess.run([sys.executable, "-m", "czregistry", "pack", str(tmp_path / "old.keras"), "-o",
                          str(tmp_path / "old.czann"), "--type", "SingleClassSemanticSegmentation", "--classes", "a,b",
                          "--min-overlap", "8", "--tile", "32", "32"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CZREG_PROGRESS": "off"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"packed {tmp_path / 'old.czann'} (czann, onnx, opset 18)")
