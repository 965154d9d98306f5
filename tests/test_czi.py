"""CZI input through ZEISS's pylibCZIrw: files are written with its own writer, then read lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pyczi = pytest.importorskip("pylibCZIrw.czi", reason="the czi extra (pylibCZIrw) is not installed")

from czregistry.errors import UsageError  # noqa: E402
from czregistry.run.czi import open_czi  # noqa: E402


def _write(path: Path, planes: dict[tuple[int, int, int], np.ndarray], scale: float | None = None) -> Path:
    with pyczi.create_czi(str(path), exist_ok=True) as writer:
        for (c, t, z), data in planes.items():
            writer.write(data if data.ndim == 3 else data[..., None], plane={"C": c, "T": t, "Z": z})
        if scale is not None:
            writer.write_metadata(document_name="test", scale_x=scale, scale_y=scale)
    return path


def test_gray_channels_read_by_region(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65535, (120, 200), dtype=np.uint16)
    b = rng.integers(0, 65535, (120, 200), dtype=np.uint16)
    src = open_czi(_write(tmp_path / "two.czi", {(0, 0, 0): a, (1, 0, 0): b}, scale=0.5e-6))
    try:
        assert src.axes == "YXC"
        assert src.shape == (120, 200, 2)
        assert src.dtype == np.uint16
        assert src.pixel_size == {"X": pytest.approx(0.5), "Y": pytest.approx(0.5)}
        block = src.read((), [slice(10, 50), slice(30, 130)])
        np.testing.assert_array_equal(block, np.stack([a, b], axis=-1)[10:50, 30:130])
        padded = src.read_padded((), [100, 180], [130, 210], (120, 200))  # reflected past the far edge
        assert padded.shape == (30, 30, 2)
    finally:
        src.close()


def test_rgb_is_turned_from_bgr_into_rgb_and_planes_are_leading_axes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bgr = {(0, t, 0): rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for t in range(3)}
    src = open_czi(_write(tmp_path / "rgb.czi", bgr))
    try:
        assert src.axes == "TYXC"
        assert src.shape == (3, 64, 80, 3)
        for t in range(3):
            np.testing.assert_array_equal(src.read((t,), [slice(0, 64), slice(0, 80)]), bgr[(0, t, 0)][..., ::-1])
    finally:
        src.close()


def test_runner_on_czi_equals_runner_on_tiff(tmp_path: Path, model_cache) -> None:
    import tifffile

    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    image = (np.random.default_rng(2).random((150, 170)) * 255).astype(np.uint8)
    czi = _write(tmp_path / "img.czi", {(0, 0, 0): image})
    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, image)
    package = model_cache("unet", overlap=20)
    opts = RunOptions(output_kind="probabilities")
    run(package, czi, tmp_path / "from-czi.ome.tiff", opts)
    run(package, tif, tmp_path / "from-tif.ome.tiff", opts)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "from-czi.ome.tiff"),
                                  tifffile.imread(tmp_path / "from-tif.ome.tiff"))


def test_mixed_pixel_types_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.czi", {(0, 0, 0): np.zeros((32, 32), np.uint8),
                                           (1, 0, 0): np.zeros((32, 32), np.uint16)})
    with pytest.raises(UsageError, match="mix pixel types"):
        open_czi(path)
