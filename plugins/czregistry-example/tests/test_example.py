"""Tests of the example plugin: the contract (via ``czregistry.testing``), the numerics, and registration.

Copy this file when you write your own plugin: the first test is the one that matters most.
"""

from __future__ import annotations

import numpy as np
import pytest
from czregistry_example import PERCENTILE_NORMALIZE

from czregistry.selection import available_layers, parse_layer
from czregistry.testing import check_layer


def test_layer_meets_the_contract() -> None:
    """Config round trip, SavedModel and ONNX survival (on 16-bit-range input)."""
    result = check_layer(PERCENTILE_NORMALIZE, {"low": 1.0, "high": 99.8}, channels=1, value_scale=65535)
    assert result.savedmodel_max_abs <= 1e-4
    assert result.onnx_max_abs <= 1e-4
    assert result.invariance_max_abs is None  # percentiles are whole-image statistics: declared local=False


@pytest.mark.parametrize(("low", "high", "clip"), [(1.0, 99.8, False), (0.0, 100.0, False), (5.0, 95.0, True)])
def test_matches_numpy_percentile(low: float, high: float, clip: bool) -> None:
    from czregistry_example.layers import PercentileNormalization

    x = np.random.default_rng(0).integers(0, 65536, (2, 24, 20, 2)).astype(np.float32)
    got = np.asarray(PercentileNormalization(low, high, clip)(x))
    for i in range(len(x)):
        lo, hi = np.percentile(x[i], [low, high])
        want = (x[i] - lo) / (hi - lo)
        np.testing.assert_allclose(got[i], np.clip(want, 0, 1) if clip else want, atol=1e-5)


def test_flat_image_does_not_divide_by_zero() -> None:
    from czregistry_example.layers import PercentileNormalization

    out = np.asarray(PercentileNormalization()(np.full((1, 8, 8, 1), 1000.0, np.float32)))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_registered_and_parsed_from_the_command_line() -> None:
    assert available_layers()["percentile_normalize"][0] == "example"
    spec, kwargs = parse_layer("percentile_normalize:low=2,high=99.5")
    assert spec is PERCENTILE_NORMALIZE
    assert kwargs == {"low": 2.0, "high": 99.5, "clip": False}


def test_bad_percentiles_are_refused() -> None:
    spec, kwargs = parse_layer("percentile_normalize:low=50,high=10")
    with pytest.raises(ValueError, match="need 0 <= low < high <= 100"):
        spec.factory(**kwargs)
