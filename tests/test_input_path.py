"""One input path (issue 23): the input facts (legacy BGR order, ``ColorHandling``, 8/16-bit scaling) are derived
once, on ``ModelInfo``, and ``InputAdapter`` turns pixels into model input for run, Dask, smoke and evaluate alike.
Before, smoke skipped BGR and SplitRgb and checked different input than ``czreg run`` feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from czregistry.metadata import ModelInfo
from czregistry.run.adapt import InputAdapter


def _legacy(pixel_types: list[str], color: str = "ConvertToMonochrome") -> ModelInfo:
    return ModelInfo.from_metadata("czmodel", {
        "Id": "00000000-0000-0000-0000-000000000001", "ColorHandling": color, "BorderSize": 8,
        "Channels": [{"PixelType": t} for t in pixel_types],
        "TrainingClasses": [{"Name": "a", "LabelValue": 1}, {"Name": "b", "LabelValue": 2}]})


RGB8 = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
GRAY16 = (np.arange(4 * 5, dtype=np.uint16).reshape(4, 5, 1) * 3000)

CASES = {
    # legacy Bgr24: the model takes colour reversed
    "bgr": (_legacy(["Bgr24"]), 3, RGB8, (RGB8[..., ::-1] / np.float32(255)).astype(np.float32)),
    # SplitRgb into a 3-channel model: channels pass apart, in RGB order for a Gray8 x3 model
    "splitrgb": (_legacy(["Gray8", "Gray8", "Gray8"], "SplitRgb"), 3, RGB8, RGB8 / np.float32(255)),
    # 16-bit gray: scaled by 65535 as the host does
    "gray16": (_legacy(["Gray16"]), 1, GRAY16, GRAY16 / np.float32(65535)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_path_feeds_the_same_model_input(case: str, tmp_path: Path) -> None:
    from czregistry.evaluate.engine import _model_input
    from czregistry.run.smoke import _load_given
    from czregistry.run.worker import ImageJob

    info, channels, raw, want = CASES[case]
    assert info.bgr is (case == "bgr") and info.color_handling == ("SplitRgb" if case == "splitrgb" else
                                                                    "ConvertToMonochrome")
    adapter = InputAdapter.for_model(info, channels)
    np.testing.assert_allclose(adapter(raw), want, rtol=0, atol=1e-7)
    # czreg run (one process) passes 8/16-bit pixels raw only when scaling is all they need
    assert adapter.passes_raw(raw.dtype, raw.shape[-1]) is (case != "bgr")
    # Dask workers rebuild the same adapter from the job
    job = ImageJob(package="p", digest="d", backend="onnxruntime", device="cpu", image="i", axes=None,
                   lead_shape=(), spatial=raw.shape[:-1], in_channels=channels, out_channels=2, select=None,
                   color_handling=info.color_handling, bgr=info.bgr, batch_size=1, blend=False,
                   output_kind="labels", array_axes="YX", lead_axes="", out_array="", markers="")
    np.testing.assert_array_equal(job.adapter()(raw), adapter(raw))
    # evaluate: the plane is either passed raw for the runner to scale (same division) or adapted
    got = _model_input(raw, info, channels, None)
    got = got.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max) if got.dtype == raw.dtype else got
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    # smoke on a given image
    np.save(tmp_path / "img.npy", raw if raw.shape[-1] > 1 else raw[..., 0])
    np.testing.assert_allclose(_load_given(tmp_path / "img.npy", info, 2, channels, 1 << 20), want, rtol=0,
                               atol=1e-7)
