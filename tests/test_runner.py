"""The tiled runner on real models: tiled equals whole, file formats, CLI, interruption, bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from czregistry.backends import Session
from czregistry.cli import main
from czregistry.errors import RunError, UsageError
from czregistry.metadata import ModelInfo
from czregistry.package import open_package
from czregistry.run.omezarr import read_ome_zarr
from czregistry.run.pipeline import predict_image
from czregistry.run.plan import OutputKind, RunOptions
from czregistry.run.runner import run
from czregistry.run.tiling import reflect_indices
from czregistry.selection import load_session

ModelCache = Callable[..., Path]


@pytest.fixture(scope="module")
def unet(model_cache: ModelCache) -> Path:
    return model_cache("unet")


@pytest.fixture
def unet_session(unet: Path) -> Iterator[tuple[Session, ModelInfo]]:
    pkg = open_package(unet)
    with load_session(pkg) as session:
        yield session, ModelInfo.from_package(pkg)


def _whole(session: Session, img: np.ndarray, padded: tuple[int, ...]) -> np.ndarray:
    """Whole-image prediction on the image reflected out to ``padded`` (as the runner pads), cropped back."""
    idx = [reflect_indices(0, p, n) for p, n in zip(padded, img.shape[:-1])]
    out = session.predict(img[np.ix_(*idx, np.arange(img.shape[-1]))][None])[0]
    return np.asarray(out[tuple(slice(0, n) for n in img.shape[:-1])])


@pytest.mark.parametrize("shape", [(200, 264), (256, 256), (203, 131), (40, 50), (64, 64), (97, 300)])
def test_tiled_equals_whole_for_the_unet(unet_session: tuple[Session, ModelInfo], shape: tuple[int, int]) -> None:
    session, info = unet_session
    img = np.random.default_rng(sum(shape)).random((*shape, 1), dtype=np.float32)
    out, grid = predict_image(session, info, img, RunOptions(batch_size=3))
    assert grid.step == (4, 4)  # measured: two 2x2 poolings
    assert min(grid.border) >= 10  # the measured halo, above the declared border of 8
    whole = _whole(session, img, grid.padded_shape)
    assert out.shape == (*shape, 2)
    assert np.abs(out - whole).max() <= 1e-5


def test_labels_and_finished_rows_from_predict_image(unet_session: tuple[Session, ModelInfo]) -> None:
    """``output_kind="labels"`` gives the argmax of the probabilities (what ``czreg run`` writes) without the
    float plane; ``on_rows`` sees every row once, in order, as it is in the result; an integer image is
    scaled band by band exactly as the float image scaled beforehand."""
    session, info = unet_session
    raw = np.random.default_rng(4).integers(0, 256, (203, 131, 1), dtype=np.uint8)
    img = raw.astype(np.float32) / np.float32(255)
    probs, _ = predict_image(session, info, img, RunOptions(batch_size=3))
    seen: list[tuple[int, np.ndarray]] = []
    labels, grid = predict_image(session, info, raw, RunOptions(batch_size=3, output_kind="labels"),
                                 on_rows=lambda start, rows: seen.append((start, rows.copy())))
    assert labels.dtype == np.uint8 and labels.shape == (203, 131, 1)
    assert np.array_equal(labels[..., 0], np.argmax(probs, axis=-1))
    assert [s for s, _ in seen] == list(np.cumsum([0] + [len(r) for _, r in seen])[:-1])
    assert np.array_equal(np.concatenate([r for _, r in seen]), labels)
    assert len(seen) > 1  # several blocks, handed over while inference went on
    assert grid.n_tiles > 1


def test_borders_below_the_halo_leave_seams_that_the_runner_avoids(unet_session: tuple[Session, ModelInfo]) -> None:
    session, info = unet_session
    img = np.random.default_rng(1).random((256, 256, 1), dtype=np.float32)
    whole = _whole(session, img, (256, 256))
    thin, _ = predict_image(session, info, img, RunOptions(border=2))
    assert np.abs(thin - whole).max() > 1e-3  # the test can fail: a thin border shows
    blended, _ = predict_image(session, info, img, RunOptions(blend=True))
    assert np.abs(blended - whole).max() <= 1e-5  # blending exact tiles stays exact


def test_zen_geometry_is_exact_for_a_stride_1_model(model_cache: ModelCache) -> None:
    pkg = open_package(model_cache("dilated", overlap=32))
    with load_session(pkg) as session:
        info = ModelInfo.from_package(pkg)
        img = np.random.default_rng(2).random((150, 170, 1), dtype=np.float32)
        out, grid = predict_image(session, info, img, RunOptions(geometry="zen"))
        assert grid.geometry == "zen"
        assert np.abs(out - _whole(session, img, (150, 170))).max() <= 1e-5


def _as_uint16(rng_seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return (np.random.default_rng(rng_seed).random(shape) * 65535).astype(np.uint16)


def _expected(unet: Path, img: np.ndarray) -> np.ndarray:
    scaled = img.astype(np.float32) / 65535 if img.dtype == np.uint16 else img.astype(np.float32) / 255
    with load_session(open_package(unet)) as s:
        return np.asarray(s.predict(scaled[None, ..., None])[0])


def test_tiff_in_ome_tiff_out(unet: Path, tmp_path: Path) -> None:
    import tifffile

    img = _as_uint16(3, (300, 420))
    src = tmp_path / "in.ome.tif"
    tifffile.imwrite(src, img, tile=(64, 64), compression="zlib",
                     metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    out = tmp_path / "out.ome.tiff"
    result = run(unet, src, out, RunOptions(batch_size=5))
    with tifffile.TiffFile(out) as tif:
        got = tif.asarray()
        assert tif.series[0].axes == "YXS"
        assert 'PhysicalSizeX="0.25"' in (tif.ome_metadata or "")
        assert tif.pages.first.is_tiled
    assert got.shape == (300, 420, 2) and got.dtype == np.float32
    assert np.abs(got - _expected(unet, img)).max() <= 1e-5
    assert result.tiles == result.grid["tiles"][0] * result.grid["tiles"][1]
    assert result.device == "cpu" and result.pixel_size_um == {"X": 0.25, "Y": 0.25}
    assert not list(tmp_path.glob(".*.part"))


def test_memmapped_tiff_zarr_output_and_labels(unet: Path, tmp_path: Path) -> None:
    import tifffile
    import zarr

    img = _as_uint16(4, (2, 260, 300))  # T, Y, X: planes are iterated
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, img, metadata={"axes": "TYX"})  # uncompressed: read through a memory map
    out = tmp_path / "labels.zarr"
    result = run(unet, src, out, RunOptions(output_kind="labels"))
    group = zarr.open_group(str(out), mode="r")  # OME-Zarr 0.5: axes T, C, Y, X in the metadata
    assert [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]] == ["t", "c", "y", "x"]
    assert group["0"].shape == (2, 1, 260, 300) and group["0"].dtype == np.uint8
    arr = read_ome_zarr(out)
    assert arr.shape == (2, 260, 300, 1) and result.planes == 2
    for t in range(2):
        want = np.argmax(_expected(unet, img[t]), axis=-1)
        assert (arr[t, ..., 0] == want).mean() > 0.999  # argmax ties may flip on 1e-7 noise


def test_zarr_npy_png_inputs_and_uint8(unet: Path, tmp_path: Path) -> None:
    import zarr
    from PIL import Image

    img8 = (np.random.default_rng(5).random((140, 200)) * 255).astype(np.uint8)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=img8.shape, chunks=(64, 64), dtype=np.uint8)
    z[:] = img8
    np.save(tmp_path / "in.npy", img8)
    rgb = np.repeat(img8[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "in.png")  # RGB into a 1-channel model: converted to monochrome
    want = np.clip(np.rint(_expected(unet, img8) * 255), 0, 255).astype(np.uint8)
    for name in ("in.zarr", "in.npy", "in.png"):
        out = tmp_path / f"{name}.out.tif"
        run(unet, tmp_path / name, out, RunOptions(output_kind="uint8"))
        import tifffile

        got = tifffile.imread(out)
        assert got.dtype == np.uint8 and got.shape == (140, 200, 2)
        assert np.abs(got.astype(int) - want).max() <= 1, name


def test_tile_by_tile_reading_matches_band_reading(unet: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    import czregistry.run.pipeline

    np.save(tmp_path / "a.npy", _as_uint16(9, (130, 250)))
    run(unet, tmp_path / "a.npy", tmp_path / "band.tif")
    monkeypatch.setattr(czregistry.run.pipeline, "MAX_BAND_BYTES", 0)  # as for a very wide image
    run(unet, tmp_path / "a.npy", tmp_path / "tiles.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "band.tif"), tifffile.imread(tmp_path / "tiles.tif"))


def test_regression_writes_float32_and_refuses_labels(model_cache: ModelCache, tmp_path: Path) -> None:
    import tifffile

    reg = model_cache("regression")
    np.save(tmp_path / "a.npy", np.random.default_rng(6).random((100, 90), dtype=np.float32))
    run(reg, tmp_path / "a.npy", tmp_path / "r.tif")
    assert tifffile.imread(tmp_path / "r.tif").dtype == np.float32
    with pytest.raises(UsageError, match="segmentation"):
        run(reg, tmp_path / "a.npy", tmp_path / "l.tif", RunOptions(output_kind="labels"))


def test_3d_model(model_cache: ModelCache, tmp_path: Path) -> None:
    import tifffile

    pkg = model_cache("unet3d")
    vol = np.random.default_rng(7).random((20, 70, 80), dtype=np.float32)
    np.save(tmp_path / "v.npy", vol)
    run(pkg, tmp_path / "v.npy", tmp_path / "v.ome.tif", RunOptions(axes="ZYX"))
    got = tifffile.imread(tmp_path / "v.ome.tif")
    assert got.shape == (20, 70, 80, 2)
    with load_session(open_package(pkg)) as s:
        grid_pad = (20, 70, 80)
        want = _whole(s, vol[..., None], grid_pad)
    assert np.abs(got - want).max() <= 1e-5


def test_interrupted_run_leaves_no_file(unet: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((600, 600), np.float32))
    out = tmp_path / "out.ome.tiff"
    out_z = tmp_path / "out.zarr"

    def interrupt(done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    for target in (out, out_z):
        with pytest.raises(KeyboardInterrupt):
            run(unet, tmp_path / "a.npy", target, RunOptions(batch_size=2), progress=interrupt)
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_a_failing_model_leaves_the_old_output_untouched(model_cache: ModelCache, tmp_path: Path) -> None:
    # dense_head has a fixed graph: a tile override makes ONNX Runtime refuse every batch
    pkg = model_cache("dense_head")
    np.save(tmp_path / "a.npy", np.zeros((100, 100), np.float32))
    out = tmp_path / "o.tif"
    out.write_bytes(b"previous")
    with pytest.raises(UsageError, match="fixed"):
        run(pkg, tmp_path / "a.npy", out, RunOptions(tile=(32, 32)))
    assert out.read_bytes() == b"previous"


def _peak_bytes(unet: Path, src: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        # probing is skipped: its cached probes are a fixed cost that would blur the measurement
        run(unet, src, out, RunOptions(tile=(128, 128), batch_size=4, probe=False, step=4, border=10))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_image_height(unet: Path, tmp_path: Path) -> None:
    small, large = tmp_path / "small.npy", tmp_path / "large.npy"
    for path, rows in ((small, 1024), (large, 8192)):
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 384))
        mm[:] = np.random.default_rng(rows).random((rows, 384), dtype=np.float32)
        mm.flush()
        del mm
    peak_small = _peak_bytes(unet, small, tmp_path / "s.zarr")
    peak_large = _peak_bytes(unet, large, tmp_path / "l.zarr")
    image_bytes = 8192 * 384 * 4
    output_bytes = 8192 * 384 * 2 * 4
    # the output would be 25 MB and the input 12.6 MB; the runner never holds more than a band of either
    assert peak_large < image_bytes / 2 and peak_large < output_bytes / 4, (peak_small, peak_large)
    assert peak_large < 1.5 * peak_small + 256 * 1024, (peak_small, peak_large)


def test_unknown_image_and_output_types(unet: Path, tmp_path: Path) -> None:
    (tmp_path / "a.xyz").write_bytes(b"x")
    with pytest.raises(UsageError, match="unsupported image type"):
        run(unet, tmp_path / "a.xyz", tmp_path / "o.tif")
    np.save(tmp_path / "a.npy", np.zeros((70, 70), np.float32))
    with pytest.raises(UsageError, match="must end in"):
        run(unet, tmp_path / "a.npy", tmp_path / "o.png")
    np.save(tmp_path / "c.npy", np.zeros((70, 70, 2), np.float32))
    with pytest.raises(UsageError, match="1 channel"):
        run(unet, tmp_path / "c.npy", tmp_path / "o.tif")
    run(unet, tmp_path / "c.npy", tmp_path / "o.tif", RunOptions(channels=(1,)))
    assert (tmp_path / "o.tif").exists()


def test_cli_run_json_and_exit_codes(unet: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(8).random((150, 160), dtype=np.float32))
    cli = CliRunner()
    res = cli.invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.ome.tiff"),
                            "--json", "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data: dict[str, Any] = json.loads(res.stdout)
    assert data["device"] == "cpu" and data["backend"] == "onnxruntime" and data["shape"] == [150, 160, 2]
    res = cli.invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o2.tif"),
                            "--tile", "96", "96", "--geometry", "zen", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and "tiles/s" in res.stdout
    res = cli.invoke(main, ["run", str(tmp_path / "missing.czann"), str(tmp_path / "a.npy"), "-o", "x.tif"])
    assert res.exit_code == 2
    res = cli.invoke(main, ["run", str(unet), str(tmp_path / "nope.tif"), "-o", str(tmp_path / "x.tif")])
    assert res.exit_code == 2 and "image not found" in res.output
    res = cli.invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "x.tif"),
                            "--channels", "3"])
    assert res.exit_code == 2 and "channel 3 does not exist" in res.output
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("classes", [1, 2, 3, 300])
def test_fast_argmax_matches_numpy(classes: int) -> None:
    from czregistry.run.assemble import argmax_labels

    block = np.random.default_rng(classes).random((7, 9, classes), dtype=np.float32)
    block[0, 0, :] = 0.5  # a tie goes to the lower class, as with np.argmax
    got = argmax_labels(block)
    assert got.shape == (7, 9, 1) and got.dtype == (np.uint8 if classes <= 256 else np.uint16)
    assert np.array_equal(got[..., 0], np.argmax(block, axis=-1))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "uint32"])
@pytest.mark.parametrize("predictor", [False, True])
@pytest.mark.parametrize("layout", ["tiles", "strips"])
def test_deflated_chunks_inflate_as_tifffile_decodes_them(dtype: str, predictor: bool, layout: str,
                                                          tmp_path: Path) -> None:
    """ISA-L inflate (and the parallel decode of a request's chunks) gives exactly tifffile's pixels: both
    byte orders, one and three samples, horizontal differencing, a short last strip, edge tiles."""
    import tifffile

    from czregistry.run.readers import TiffChunkArray, open_image

    rng = np.random.default_rng(7)
    info = np.iinfo(np.dtype(dtype))
    for samples, order in ((1, "<"), (3, ">")):
        shape = (300, 280) + ((samples,) if samples > 1 else ())
        img = rng.integers(info.min, info.max, shape, dtype=np.dtype(dtype), endpoint=True)
        layout_args: dict[str, Any] = {"tile": (64, 48)} if layout == "tiles" else {"rowsperstrip": 64}
        tifffile.imwrite(tmp_path / "a.tif", img, compression="zlib", predictor=predictor, byteorder=order,
                         photometric="rgb" if samples == 3 else "minisblack", **layout_args)
        src = open_image(tmp_path / "a.tif")
        try:
            assert isinstance(src.array, TiffChunkArray) and src.array._inflate is not None
            src.array.workers = 2  # the parallel path, whatever this machine's core count
            assert np.array_equal(src.array[0:300, 0:280], img)
            assert np.array_equal(src.array[130:131, 5:270], img[130:131, 5:270])
        finally:
            src.close()


@pytest.mark.parametrize("case", ["lzma-uint16", "zlib-float32"])
def test_other_codecs_are_decoded_by_tifffile_in_parallel(case: str, tmp_path: Path) -> None:
    """Codecs and sample formats the ISA-L path leaves alone (the ones tifffile writes without imagecodecs)."""
    import tifffile

    from czregistry.run.readers import TiffChunkArray, open_image

    compression, dtype = case.split("-")
    img = (np.random.default_rng(8).random((200, 260)) * 60000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", img, tile=(64, 64), compression=compression)
    src = open_image(tmp_path / "a.tif")
    try:
        assert isinstance(src.array, TiffChunkArray) and src.array._inflate is None
        src.array.workers = 2
        assert np.array_equal(src.array[0:200, 0:260], img)
    finally:
        src.close()


def test_run_error_is_typed() -> None:
    assert RunError.exit_code == 8


# --- host-side pipeline: TIFF chunk reader, output packing, compression, stage timings -------------------


_LAYOUTS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "tiled-uint16-zlib": ({"tile": (64, 64), "compression": "zlib"}, (300, 420)),
    "tiled-rgb-zlib": ({"tile": (64, 48), "photometric": "rgb", "compression": "zlib"}, (130, 200, 3)),
    "tiled-pages-tyx": ({"tile": (32, 48), "metadata": {"axes": "TYX"}}, (5, 100, 130)),
    "strips-zyx-zlib": ({"rowsperstrip": 16, "compression": "zlib", "metadata": {"axes": "ZYX"}}, (2, 90, 70)),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_tiff_chunk_reader_matches_tifffile(layout: str, tmp_path: Path) -> None:
    import tifffile

    from czregistry.run.readers import TiffChunkArray, open_image

    kwargs, shape = _LAYOUTS[layout]
    rng = np.random.default_rng(len(layout))
    img = (rng.random(shape) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", img, **kwargs)
    src = open_image(tmp_path / "a.tif")
    try:
        assert isinstance(src.array, TiffChunkArray)  # not Zarr: these layouts take the direct path
        lead = len(shape) - (3 if src.axes.endswith("C") else 2)
        for _ in range(60):  # random regions, random order: the chunk cache must never serve stale data
            key: list[Any] = [int(rng.integers(0, n)) for n in shape[:lead]]
            for n in shape[lead:lead + 2]:
                lo = int(rng.integers(0, n))
                key.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
            key += [slice(None)] * (len(shape) - len(key))
            assert np.array_equal(src.array[tuple(key)], img[tuple(key)]), key
        # the runner's reads: bands top to bottom; an integer row index too
        h = shape[lead]
        for y in range(0, h, 40):
            band: tuple[Any, ...] = (*[0] * lead, slice(y, min(h, y + 64)))
            assert np.array_equal(src.array[band], img[band])
        assert np.array_equal(src.array[(*[0] * lead, 7)], img[(*[0] * lead, 7)])
    finally:
        src.close()


def test_planar_tiff_falls_back_to_zarr_and_still_runs(unet: Path, tmp_path: Path) -> None:
    import tifffile

    from czregistry.run.readers import TiffChunkArray, open_image

    img = _as_uint16(11, (2, 72, 96))  # two channels stored as separate planes (planar configuration)
    tifffile.imwrite(tmp_path / "p.tif", img, tile=(32, 32), planarconfig="separate", photometric="minisblack",
                     metadata={"axes": "CYX"})
    src = open_image(tmp_path / "p.tif")
    assert not isinstance(src.array, TiffChunkArray)
    assert np.array_equal(np.asarray(src.array[:, 5:60, 3:80]), img[:, 5:60, 3:80])
    src.close()
    run(unet, tmp_path / "p.tif", tmp_path / "o.tif", RunOptions(channels=(1,)))
    import tifffile as tf

    assert np.abs(tf.imread(tmp_path / "o.tif") - _expected(unet, img[1])).max() <= 1e-5


def test_compression_auto_none_and_zlib_hold_the_same_values(unet: Path, tmp_path: Path) -> None:
    import tifffile

    img = _as_uint16(12, (300, 532))  # edge tiles in both directions
    tifffile.imwrite(tmp_path / "a.tif", img, tile=(64, 64), compression="zlib")
    results = {}
    for comp in ("auto", "none", "zlib"):
        results[comp] = run(unet, tmp_path / "a.tif", tmp_path / f"{comp}.ome.tif", RunOptions(compression=comp))
    assert results["auto"].compression == "none"  # float32 output: uncompressed by default
    got = {}
    for comp in ("auto", "none", "zlib"):
        with tifffile.TiffFile(tmp_path / f"{comp}.ome.tif") as tif:
            page = tif.pages.first
            assert page.is_tiled and page.tilewidth == 256
            assert page.compression == (tifffile.COMPRESSION.ADOBE_DEFLATE if comp == "zlib"
                                        else tifffile.COMPRESSION.NONE)
            got[comp] = tif.asarray()
    assert np.array_equal(got["none"], got["zlib"]) and np.array_equal(got["auto"], got["zlib"])
    assert np.abs(got["zlib"] - _expected(unet, img)).max() <= 1e-5
    labels = run(unet, tmp_path / "a.tif", tmp_path / "l.ome.tif", RunOptions(output_kind="labels"))
    assert labels.compression == "zlib"
    with tifffile.TiffFile(tmp_path / "l.ome.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert np.array_equal(tif.asarray(), np.argmax(got["zlib"], axis=-1).astype(np.uint8))
    with pytest.raises(UsageError, match="compression"):
        run(unet, tmp_path / "a.tif", tmp_path / "x.tif", RunOptions(compression="lzw"))  # type: ignore[arg-type]
    assert not (tmp_path / "x.tif").exists()


def test_stage_timings_are_reported(unet: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(13).random((200, 300), dtype=np.float32))
    res = run(unet, tmp_path / "a.npy", tmp_path / "o.tif")
    assert set(res.stage_seconds) == {"read", "predict", "assemble", "convert", "write", "encode"}
    assert all(v >= 0 for v in res.stage_seconds.values())
    assert res.stage_seconds["predict"] == res.predict_seconds > 0


@pytest.mark.parametrize("kind", ["probabilities", "uint8", "labels"])
def test_packer_emits_aligned_converted_blocks(kind: str) -> None:
    from czregistry.run.assemble import Packer, convert_output, out_dtype

    classes = 3
    rows = np.random.default_rng(14).random((2, 700, 50, classes), dtype=np.float32)
    got: list[tuple[int, int, np.ndarray]] = []
    out_c = 1 if kind == "labels" else classes
    packer = Packer(lambda p, s, b: got.append((p, s, b.copy())), kind,  # type: ignore[arg-type]
                     256, (700, 50), out_c, out_dtype(kind, classes))  # type: ignore[arg-type]
    for plane in range(2):
        for start, stop in ((0, 224), (224, 448), (448, 600), (600, 700)):  # tile-row steps, not 256
            packer(plane, start, rows[plane, start:stop])
    assert [(p, s, b.shape[0]) for p, s, b in got] == [(p, s, n) for p in range(2)
                                                       for s, n in ((0, 256), (256, 256), (512, 188))]
    for plane in range(2):
        whole = np.concatenate([b for p, _, b in got if p == plane])
        assert np.array_equal(whole, convert_output(rows[plane], kind))  # type: ignore[arg-type]
    with pytest.raises(RunError, match="out of order"):
        packer(0, 10, rows[0, 10:20])


@pytest.mark.parametrize("classes", [2, 3])
def test_convert_into_a_buffer_equals_convert(classes: int) -> None:
    from czregistry.run.assemble import convert_output, out_dtype

    block = np.random.default_rng(classes).random((9, 11, classes), dtype=np.float32)
    block[0, 0] = 0.5  # ties
    kinds: tuple[OutputKind, ...] = ("probabilities", "uint8", "labels")
    for kind in kinds:
        want = convert_output(block, kind)
        out = np.full(want.shape, 7, out_dtype(kind, classes))
        assert convert_output(block, kind, out) is out
        assert np.array_equal(out, want), kind


def test_planar_tiff_layout_equals_interleaved_pixel_for_pixel(unet: Path, tmp_path: Path) -> None:
    """``--tiff-layout planar``: a page per class, read by tifffile as ``CYX`` with one named OME channel per
    class, holding exactly the interleaved file's pixels; no spool file stays behind; labels are one page."""
    import re

    import tifffile

    from czregistry.run.readers import open_image

    img = _as_uint16(21, (300, 532))  # edge tiles in both directions
    tifffile.imwrite(tmp_path / "a.tif", img, tile=(64, 64), compression="zlib")
    info = ModelInfo.from_package(open_package(unet))
    for kind in ("uint8", "probabilities"):
        got = {}
        for layout in ("interleaved", "planar"):
            out = tmp_path / f"{kind}-{layout}.ome.tif"
            res = run(unet, tmp_path / "a.tif", out, RunOptions(output_kind=kind, tiff_layout=layout))
            assert res.tiff_layout == layout
            with tifffile.TiffFile(out) as tif:
                series = tif.series[0]
                got[layout] = series.asarray()
                xml = tif.ome_metadata or ""
                pages = len(tif.pages)
            pixels = re.search(r"<Pixels\b[^>]*>", xml)
            assert pixels is not None
            if layout == "planar":
                assert series.axes == "CYX" and series.shape == (2, 300, 532) and pages == 2
                assert 'DimensionOrder="XYCZT"' in pixels.group(0) and 'SizeC="2"' in pixels.group(0)
                assert 'Interleaved="true"' not in pixels.group(0)
                assert re.findall(r'<Channel [^>]*SamplesPerPixel="1"', xml) and len(
                    re.findall(r"<Channel ", xml)) == 2
                if info.classes:
                    assert re.findall(r'<Channel [^>]*Name="([^"]*)"', xml) == list(info.classes)
                assert np.array_equal(tifffile.imread(out), got[layout])
            else:
                assert series.axes == "YXS" and series.shape == (300, 532, 2) and pages == 1
        assert np.array_equal(np.moveaxis(got["planar"], 0, -1), got["interleaved"]), kind
        # the runner reads its own planar output back as an input image, classes as channels
        src = open_image(tmp_path / f"{kind}-planar.ome.tif")
        try:
            assert src.channels == 2 and src.layout(2) == ("", (), (300, 532))
            assert np.array_equal(src.read((), [slice(0, 300), slice(0, 532)]), got["interleaved"])
        finally:
            src.close()
    for layout in ("interleaved", "planar"):
        run(unet, tmp_path / "a.tif", tmp_path / f"l-{layout}.ome.tif",
            RunOptions(output_kind="labels", tiff_layout=layout))
    labels = {}
    for layout in ("interleaved", "planar"):
        with tifffile.TiffFile(tmp_path / f"l-{layout}.ome.tif") as tif:
            labels[layout] = (tif.series[0].axes, len(tif.pages), tif.series[0].asarray())
    assert labels["planar"][:2] == labels["interleaved"][:2] == ("YX", 1)
    assert np.array_equal(labels["planar"][2], labels["interleaved"][2])
    assert not [p.name for p in tmp_path.iterdir() if "spool" in p.name or p.name.endswith(".part")]


@pytest.mark.parametrize("case", ["uint8-zlib-2d", "float32-none-2d", "uint8-zlib-3d", "float32-zlib-planes",
                                  "uint8-none-3classes"])
def test_planar_writer_matches_interleaved_for_planes_volumes_and_classes(case: str, tmp_path: Path) -> None:
    """The writer alone, fed rows in small blocks as the runner feeds them: T planes (a spool per plane),
    3D volumes (``ZCYX``: a slice's classes follow each other), 3 classes, with and without deflate."""
    import tifffile

    from czregistry.run.writers import OutputSpec, TiffWriterSink

    dtype_name, compression, shape_name = case.split("-")
    dtype = np.dtype(dtype_name)
    lead, spatial, classes = {"2d": ((), (530, 300), 2), "3d": ((), (3, 270, 300), 2),
                              "planes": ((2,), (300, 270), 2), "3classes": ((), (300, 520), 3)}[shape_name]
    data = (np.random.default_rng(5).random((*lead, *spatial, classes)) * 200).astype(dtype)
    files = {}
    for layout in ("interleaved", "planar"):
        spec = OutputSpec("T" if lead else "", lead, spatial, classes, dtype, {"X": 0.5, "Y": 0.5},
                          {"name": "m", "classes": [f"c{i}" for i in range(classes)]},
                          compression=compression, tiff_layout=layout)
        files[layout] = tmp_path / f"{layout}.ome.tif"
        writer = TiffWriterSink(files[layout], spec)
        step = 100 if len(spatial) == 2 else 1
        for plane, pixels in enumerate(data.reshape(-1, *spatial, classes)):
            for start in range(0, spatial[0], step):
                writer.write(plane, start, pixels[start:start + step])
        writer.close()
    with tifffile.TiffFile(files["planar"]) as tif:
        axes, planar = tif.series[0].axes, tif.series[0].asarray()
    assert axes == {"2d": "CYX", "3d": "ZCYX", "planes": "TCYX", "3classes": "CYX"}[shape_name]
    assert np.array_equal(np.moveaxis(planar, -3, -1), tifffile.imread(files["interleaved"]))
    assert np.array_equal(np.moveaxis(planar, -3, -1), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interleaved.ome.tif", "planar.ome.tif"]


@pytest.mark.parametrize("dtype,classes", [("uint8", 2), ("uint8", 4), ("uint8", 8), ("uint8", 3), ("uint16", 2),
                                           ("float32", 2), ("float32", 3), (">f4", 2)])
def test_split_classes_gives_contiguous_class_planes(dtype: str, classes: int) -> None:
    from czregistry.run.writers import _split_classes

    tile = (np.random.default_rng(3).random((64, 48, classes)) * 250).astype(dtype)
    planes = _split_classes(tile)
    assert len(planes) == classes
    for c, plane in enumerate(planes):
        assert plane.flags.c_contiguous and plane.dtype == tile.dtype
        assert np.array_equal(plane, tile[..., c])


def test_cli_tiff_layout_option(unet: Path, tmp_path: Path) -> None:
    import tifffile

    np.save(tmp_path / "a.npy", np.random.default_rng(16).random((80, 96), dtype=np.float32))
    res = CliRunner().invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.ome.tif"),
                                    "--tiff-layout", "planar", "--output-kind", "uint8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiff_layout"] == "planar"
    assert tifffile.TiffFile(tmp_path / "o.ome.tif").series[0].axes == "CYX"
    res = CliRunner().invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "d.ome.tif"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiff_layout"] == "interleaved"
    res = CliRunner().invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "z.zarr"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiff_layout"] == ""


def test_cli_compression_option(unet: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(15).random((80, 96), dtype=np.float32))
    res = CliRunner().invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.ome.tif"),
                                    "--compression", "zlib", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["compression"] == "zlib" and set(data["stage_seconds"]) >= {"read", "predict", "encode"}
    res = CliRunner().invoke(main, ["run", str(unet), str(tmp_path / "a.npy"), "-o", str(tmp_path / "p.tif"),
                                    "--compression", "jpeg"])
    assert res.exit_code == 2


def test_tiff_chunk_cache_is_bounded(tmp_path: Path) -> None:
    import tifffile

    from czregistry.run.readers import TiffChunkArray

    img = _as_uint16(16, (256, 512))
    tifffile.imwrite(tmp_path / "a.tif", img, tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        arr = TiffChunkArray(tif, tif.series[0], cache_bytes=10 * 32 * 32 * 2)  # ten chunks
        for y in range(0, 200, 24):  # overlapping full-width bands, as the runner reads them
            assert np.array_equal(arr[y:y + 56, :], img[y:y + 56, :])
            assert len(arr.cache) <= 10 and arr.cached == sum(a.nbytes for a in arr.cache.values())
        assert np.array_equal(arr[0:40, 100:300], img[0:40, 100:300])  # going back up re-reads
