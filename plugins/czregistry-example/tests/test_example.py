"""Tests of the example plugin: the contract (via ``czregistry.testing``), the numerics, and registration.

Copy this file when you write your own plugin: the first test is the one that matters most. Only the last
test needs Keras (it compares the optional Keras form); the rest run without TensorFlow.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from czregistry_example import PERCENTILE_NORMALIZE

from czregistry.selection import available_layers, parse_layer
from czregistry.testing import check_layer


def _numpy_percentile_normalize(x: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    out = np.empty_like(x)
    for i in range(len(x)):
        lo, hi = np.percentile(x[i], [low, high])
        out[i] = (x[i] - lo) / (hi - lo)
    return out


def test_layer_meets_the_contract() -> None:
    """The ONNX form against NumPy, at two opsets, in 2D and 3D, spliced into a model (and the Keras form
    against it where Keras is installed), on 16-bit-range input."""
    result = check_layer(PERCENTILE_NORMALIZE, {"low": 1.0, "high": 99.8}, channels=1, value_scale=65535,
                         reference=_numpy_percentile_normalize)
    assert "onnx" in result.forms
    assert result.reference_max_abs is not None and result.reference_max_abs <= 1e-4
    assert result.onnx_max_abs <= 1e-4
    assert result.invariance_max_abs is None  # percentiles are whole-image statistics: declared local=False


def _onnx_form(x: np.ndarray, **kwargs: object) -> np.ndarray:
    import onnxruntime as ort

    from czregistry.onnx.graph import layers_to_onnx

    spec, parsed = PERCENTILE_NORMALIZE, {"low": 1.0, "high": 99.8, "clip": False, **kwargs}
    data, _ = layers_to_onnx([(spec, parsed)], (None,) * (x.ndim - 1) + (x.shape[-1],), 18)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize(("low", "high", "clip"), [(1.0, 99.8, False), (0.0, 100.0, False), (5.0, 95.0, True)])
def test_matches_numpy_percentile(low: float, high: float, clip: bool) -> None:
    x = np.random.default_rng(0).integers(0, 65536, (2, 24, 20, 2)).astype(np.float32)
    got = _onnx_form(x, low=low, high=high, clip=clip)
    want = _numpy_percentile_normalize(x, low, high)
    np.testing.assert_allclose(got, np.clip(want, 0, 1) if clip else want, atol=1e-5)


def test_flat_image_does_not_divide_by_zero() -> None:
    out = _onnx_form(np.full((1, 8, 8, 1), 1000.0, np.float32))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_registered_and_parsed_from_the_command_line() -> None:
    assert available_layers()["percentile_normalize"][0] == "example"
    spec, kwargs = parse_layer("percentile_normalize:low=2,high=99.5")
    assert spec is PERCENTILE_NORMALIZE
    assert kwargs == {"low": 2.0, "high": 99.5, "clip": False}


def test_bad_percentiles_are_refused() -> None:
    from czregistry.errors import PackError
    from czregistry.onnx.graph import layers_to_onnx

    spec, kwargs = parse_layer("percentile_normalize:low=50,high=10")
    with pytest.raises(PackError, match="need 0 <= low < high <= 100"):
        layers_to_onnx([(spec, kwargs)], (None, None, None, 1), 18)


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="the Keras form needs Keras")
def test_keras_form_equals_the_onnx_form() -> None:
    from czregistry_example.layers import PercentileNormalization

    x = np.random.default_rng(1).integers(0, 65536, (2, 24, 20, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(PercentileNormalization(1.0, 99.8)(x)), _onnx_form(x), atol=1e-6)
