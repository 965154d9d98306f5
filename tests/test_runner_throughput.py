"""The runner's throughput work keeps outputs bit for bit: every output kind and format against a
reference that follows the pre-optimisation pipeline step by step, device-side conversion (null and torch
sessions), Zarr chunk files identical to Zarr's own, reflected band reads, recycled batch buffers."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from czregistry.backends import Session, Signature, TensorInfo
from czregistry.metadata import ModelInfo
from czregistry.package import open_package
from czregistry.run.assemble import convert_output
from czregistry.run.omezarr import ZarrWriterSink
from czregistry.run.pipeline import TiledPredictor
from czregistry.run.plan import OutputKind, RunOptions, plan_for_model
from czregistry.run.runner import run
from czregistry.run.source import _take_runs
from czregistry.run.tiling import plan_tiles, reflect_indices
from czregistry.run.writers import ArrayWriter, OutputSpec
from czregistry.selection import load_session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.null_backend import build_null_package, register_null_backend  # noqa: E402

KINDS: tuple[OutputKind, ...] = ("probabilities", "uint8", "labels")
SUFFIXES = (".ome.tif", ".zarr")


@pytest.fixture(scope="module")
def unet(model_cache: Callable[..., Path]) -> Path:
    return model_cache("unet")


def _read_output(path: Path) -> np.ndarray:
    if path.suffix == ".zarr":
        from czregistry.run.omezarr import read_ome_zarr

        return read_ome_zarr(path)
    import tifffile

    got = tifffile.imread(path)
    return got if got.ndim == 4 or (got.ndim == 3 and got.shape[-1] == 2) else got[..., None]


def _reference(package: Path, image: np.ndarray, batch: int) -> np.ndarray:
    """What the runner computed before the throughput work, written out plainly: reflect-pad each tile
    with ``np.ix_``, scale as ``astype / max``, predict batches of ``batch`` tiles in grid order (ONNX
    Runtime's result depends on the batch, so the batches must be the same), place each kept interior
    into a float32 image. ``image`` is uint16 ``(planes, H, W)``."""
    pkg = open_package(package)
    info = ModelInfo.from_package(pkg)
    with load_session(pkg, device="cpu") as session:
        grid, _, _, out_ch = plan_for_model(session, info, image.shape[1:], RunOptions(batch_size=batch), [])
        out = np.zeros((image.shape[0], *grid.padded_shape, out_ch), np.float32)
        items = [(p, t) for p in range(image.shape[0]) for t in grid]
        for i in range(0, len(items), batch):
            xs = []
            for p, t in items[i:i + batch]:
                idx = [reflect_indices(s.origin, s.origin + s.size, n) for s, n in zip(t.spans, image.shape[1:])]
                raw = image[p][np.ix_(*idx)][..., None]
                scaled = raw.astype(np.float32)
                scaled /= np.float32(65535)
                xs.append(scaled)
            ys = session.predict_batch(np.stack(xs))
            for (p, t), y in zip(items[i:i + batch], ys):
                out[(p, *t.keep_slices)] = y[t.local_keep_slices]
    return out[:, :image.shape[1], :image.shape[2]]


def _as_kind(probabilities: np.ndarray, kind: OutputKind) -> np.ndarray:
    if kind == "labels":
        return np.argmax(probabilities, axis=-1).astype(np.uint8)[..., None]
    if kind == "uint8":
        return np.clip(np.rint(probabilities * np.float32(255)), 0, 255).astype(np.uint8)
    return probabilities


@pytest.mark.parametrize("batch", [3, 4])
def test_every_output_kind_and_format_equals_the_reference_bit_for_bit(unet: Path, tmp_path: Path,
                                                                       batch: int) -> None:
    image = (np.random.default_rng(batch).random((2, 230, 300)) * 65535).astype(np.uint16)
    np.save(tmp_path / "in.npy", image)
    want = _reference(unet, image, batch)
    assert want.shape == (2, 230, 300, 2)
    for kind in KINDS:
        expected = _as_kind(want, kind)
        for suffix in SUFFIXES:
            out = tmp_path / f"{kind}{suffix}"
            run(unet, tmp_path / "in.npy", out, RunOptions(batch_size=batch, output_kind=kind, device="cpu"))
            got = _read_output(out)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (kind, suffix)
            assert np.array_equal(got, expected), (kind, suffix, int(np.count_nonzero(got != expected)))


def test_blended_uint8_equals_converting_blended_probabilities(unet: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", (np.random.default_rng(7).random((200, 260)) * 255).astype(np.uint8))
    for kind in ("probabilities", "uint8", "labels"):
        run(unet, tmp_path / "in.npy", tmp_path / f"{kind}.zarr", RunOptions(output_kind=kind, blend=True))  # type: ignore[arg-type]
    p = _read_output(tmp_path / "probabilities.zarr")
    assert np.array_equal(_read_output(tmp_path / "uint8.zarr"), convert_output(p, "uint8"))
    assert np.array_equal(_read_output(tmp_path / "labels.zarr"), convert_output(p, "labels"))


def test_device_side_conversion_gives_the_same_files(tmp_path: Path) -> None:
    """A session that converts to labels/uint8 itself (as torch on a GPU) yields exactly the host's output."""
    package = build_null_package(tmp_path)
    np.save(tmp_path / "in.npy", (np.random.default_rng(8).random((600, 700)) * 255).astype(np.uint8))
    outputs: dict[tuple[bool, str, str], np.ndarray] = {}
    for device_convert in (False, True):
        register_null_backend(device_convert=device_convert)
        for kind in ("uint8", "labels"):
            for suffix in SUFFIXES:
                out = tmp_path / f"{device_convert}-{kind}{suffix}"
                res = run(package, tmp_path / "in.npy", out, RunOptions(backend="null", output_kind=kind,  # type: ignore[arg-type]
                                                                         probe=False, step=2, batch_size=3))
                assert res.backend == "null"
                outputs[(device_convert, kind, suffix)] = _read_output(out)
    for kind in ("uint8", "labels"):
        for suffix in SUFFIXES:
            a, b = outputs[(False, kind, suffix)], outputs[(True, kind, suffix)]
            assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b), (kind, suffix)
            assert len(np.unique(a)) > 1  # real content, not a constant


def test_auto_batch_asks_the_session(tmp_path: Path) -> None:
    package = build_null_package(tmp_path)
    np.save(tmp_path / "in.npy", np.zeros((300, 300), np.uint8))
    register_null_backend(batch_suggestion=16)
    opts: dict[str, Any] = {"backend": "null", "probe": False, "step": 2, "output_kind": "labels"}
    res = run(package, tmp_path / "in.npy", tmp_path / "a.tif", RunOptions(auto_batch=True, **opts))
    assert res.batch_size == 16 and any("batch size 16" in n for n in res.notes)
    res = run(package, tmp_path / "in.npy", tmp_path / "b.tif", RunOptions(batch_size=5, **opts))
    assert res.batch_size == 5  # an explicit size is kept
    register_null_backend(batch_suggestion=None)
    res = run(package, tmp_path / "in.npy", tmp_path / "c.tif", RunOptions(auto_batch=True, **opts))
    assert res.batch_size == 4  # no answer (CPU backends): the default


class _Identity(Session):
    """Returns its input batch itself (same memory), as an identity graph on torch CPU can."""

    backend = "identity"
    device = "cpu"

    def __init__(self) -> None:
        self.seen: set[int] = set()

    @property
    def signature(self) -> Signature:
        return Signature((TensorInfo("x", (None, None, None, 1), "float32"),),
                         (TensorInfo("y", (None, None, None, 1), "float32"),))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.seen.add(batch.__array_interface__["data"][0])
        return batch


def test_recycled_batch_buffers_never_leak_into_outputs() -> None:
    image = np.random.default_rng(9).random((700, 900, 1), dtype=np.float32)
    grid = plan_tiles(image.shape[:-1], (64, 64), border=(8, 8))
    session = _Identity()
    sink = ArrayWriter((), image.shape[:-1], 1)

    def read(plane: int, tile: Any) -> np.ndarray:
        idx = [reflect_indices(s.origin, s.origin + s.size, n) for s, n in zip(tile.spans, image.shape[:-1])]
        return image[np.ix_(*idx, [0])]

    predictor = TiledPredictor(session, grid, 1, batch_size=3)
    predictor.run(1, read, sink.write)
    assert grid.n_tiles > 30 and np.array_equal(sink.array, image)
    assert len(session.seen) <= TiledPredictor._QUEUE + 2  # a small ring, reused


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_raw_pixels_scaled_into_the_batch_equal_scale_to_unit(dtype: Any) -> None:
    """``run`` hands 8/16-bit pixels to the predictor unscaled (``scale``): every possible value must come
    out with exactly the bits ``scale_to_unit`` gives."""
    from czregistry.run.adapt import scale_to_unit

    top = int(np.iinfo(dtype).max)
    side = 256 if dtype == np.uint16 else 16
    image = np.arange(top + 1, dtype=np.int64).astype(dtype).reshape(side, side, 1)
    grid = plan_tiles(image.shape[:-1], (16, 16), border=(0, 0))
    sink = ArrayWriter((), image.shape[:-1], 1)

    def read(plane: int, tile: Any) -> np.ndarray:
        return image[tuple(slice(s.origin, s.origin + s.size) for s in tile.spans)]

    TiledPredictor(_Identity(), grid, 1, batch_size=3).run(1, read, sink.write, scale=top)
    want = scale_to_unit(image)
    assert sink.array.dtype == want.dtype == np.float32
    assert np.array_equal(sink.array.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_reflected_reads_by_runs_equal_take(n: int) -> None:
    rng = np.random.default_rng(n)
    block = rng.random((n, 5, 2))
    for start in range(0, 3 * n + 1, max(1, n // 4)):
        for stop in range(start + 1, start + 3 * n + 2, max(1, n // 3)):
            idx = reflect_indices(start, stop, n)
            lo = int(idx.min())
            sub = block[lo:int(idx.max()) + 1]
            assert np.array_equal(_take_runs(sub, idx - lo, 0), np.take(sub, idx - lo, axis=0))
            moved = np.moveaxis(sub, 0, 1)
            assert np.array_equal(_take_runs(moved, idx - lo, 1), np.take(moved, idx - lo, axis=1))


def _shard_chunks(raw: bytes, per: tuple[int, ...]) -> dict[tuple[int, ...], bytes]:
    """A shard file's chunks by position, read through its index (checked against its CRC32C)."""
    import google_crc32c

    n = math.prod(per)
    index_bytes = raw[-(16 * n + 4):-4]
    assert google_crc32c.value(index_bytes) == int.from_bytes(raw[-4:], "little")
    index = np.frombuffer(index_bytes, "<u8").reshape(*per, 2)
    out = {}
    for pos in np.ndindex(*per):
        off, length = (int(v) for v in index[pos])
        if off != 2**64 - 1:
            out[pos] = raw[off:off + length]
    # the chunks fill the file before the index, each once
    assert sum(len(b) for b in out.values()) == len(raw) - 16 * n - 4
    return out


@pytest.mark.parametrize("case", [("float32", 2, (), (600, 530)), ("uint8", 1, (2,), (300, 700)),
                                  ("uint8", 2, (), (3, 300, 280)), ("uint8", 3, (), (520, 2600)),
                                  ("uint8", 1, (), (2600, 4500)), ("uint8", 1, (), (2, 2300, 2100))])
def test_zarr_shard_files_hold_zarrs_own_chunks(tmp_path: Path,
                                                case: tuple[str, int, tuple[int, ...], tuple[int, ...]]) -> None:
    """Our shard files, appended chunk row by chunk row, hold exactly the chunks Zarr writes for the same
    OME-Zarr array (same encoded bytes, the same chunks left out as empty, a valid index and CRC32C), in C
    order instead of Zarr's Morton order: byte for byte Zarr's file where the two orders agree (shards one
    chunk high). All-empty shards and empty chunks are left out as Zarr leaves them."""
    import zarr

    from czregistry.run.omezarr import read_ome_zarr

    dtype, channels, lead, spatial = case
    data = (np.random.default_rng(len(spatial)).random((*lead, *spatial, channels))
            * (255 if dtype == "uint8" else 1)).astype(dtype)
    data[..., :256, :256, :] = 0  # an empty chunk: Zarr does not write it, neither may we
    if spatial[-2] > 2048:
        data[..., 2048:, 2048:, :] = 0  # an empty shard: no file
    spec = OutputSpec("T" * len(lead), lead, spatial, channels, np.dtype(dtype))
    sink = ZarrWriterSink(tmp_path / "ours.zarr", spec)
    assert sink.shards.direct and sink.workers >= 1
    step = 100 if len(spatial) == 2 else 1
    planes = data.reshape(-1, *spatial, channels)
    for plane in range(len(planes)):
        for s in range(0, spatial[0], step):
            sink.write(plane, s, planes[plane, s:s + step])
    sink.close()
    ours_array = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")["0"]
    ref = zarr.create_array(str(tmp_path / "ref.zarr"), shape=ours_array.shape, chunks=ours_array.chunks,
                            shards=ours_array.shards, dtype=dtype, fill_value=0)
    ref[...] = ours_array[...]

    def shard_files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
                and p.name != "zarr.json"}

    ours, theirs = shard_files(tmp_path / "ours.zarr" / "0"), shard_files(tmp_path / "ref.zarr")
    per = tuple(s // c for s, c in zip(ours_array.shards, ours_array.chunks))
    assert sorted(ours) == sorted(theirs) and theirs
    for name in theirs:
        assert _shard_chunks(ours[name], per) == _shard_chunks(theirs[name], per)
        if sum(n > 1 for n in per) <= 1:  # Morton order is C order: the very same file
            assert ours[name] == theirs[name]
    assert np.array_equal(read_ome_zarr(tmp_path / "ours.zarr"), data)
    assert np.array_equal(ref[...], ours_array[...])
    if spatial[-2] > 2048:  # shards of up to 8 x 8 chunks: one file per 2048 x 2048 px that holds a label
        assert ours_array.shards[-2:] == (2048, 2048)
        held = [bool(data[..., y:y + 2048, x:x + 2048, :].any()) for y in range(0, spatial[-2], 2048)
                for x in range(0, spatial[-1], 2048)]
        assert False in held and len(ours) == sum(held) * (spatial[0] if len(spatial) == 3 else 1)
    assert not list((tmp_path / "ours.zarr").rglob("*.tmp"))


def test_zarr_abort_leaves_no_partial_shard(tmp_path: Path) -> None:
    """Shards stay open across chunk rows; an abort closes and removes their temporary files."""
    spec = OutputSpec("", (), (2300, 600), 1, np.dtype(np.uint8))
    sink = ZarrWriterSink(tmp_path / "a.zarr", spec)
    data = np.random.default_rng(5).integers(1, 255, (2300, 600, 1), dtype=np.uint8)
    for s in range(0, 1000, 100):
        sink.write(0, s, data[s:s + 100])
    while sink._pending:
        sink._retire()
    tmps = list((tmp_path / "a.zarr").rglob("*.tmp"))
    assert len(tmps) == 1 and sink.shards.unfinished == 1  # the first shard row: open, not renamed yet
    sink.abort()
    assert sink.shards.unfinished == 0 and not [p for p in (tmp_path / "a.zarr" / "0").rglob("*") if p.is_file()
                                                and p.name != "zarr.json"]


def test_zarr_fallback_path_writes_the_same_array(tmp_path: Path) -> None:
    from czregistry.run.omezarr import read_ome_zarr

    data = np.random.default_rng(3).random((300, 520, 2)).astype(np.float32)
    spec = OutputSpec("", (), (300, 520), 2, np.dtype(np.float32))
    sink = ZarrWriterSink(tmp_path / "a.zarr", spec)
    sink.shards.direct = False  # as for a layout the direct path does not know: Zarr's own writes
    for s in range(0, 300, 70):
        sink.write(0, s, data[s:s + 70])
    sink.close()
    assert np.array_equal(read_ome_zarr(tmp_path / "a.zarr"), data)


TORCH_CHECK = r"""
import sys
import numpy as np
import torch
from czregistry_torch import TorchBackend, _convert_tensor
from czregistry.package import open_package
from czregistry.run.assemble import convert_output

rng = np.random.default_rng(11)
for classes in (1, 2, 3, 5):
    y = rng.random((3, 17, 19, classes), dtype=np.float32)
    y[0, 0, 0] = 0.5  # ties go to the lower class
    y[1, 1, :] = np.float32(0.25)
    y[2, :3, :3] = rng.integers(0, 2, (3, 3, classes)).astype(np.float32) / 2  # x.5 for rint
    for kind in ("uint8", "labels"):
        got = _convert_tensor(torch.from_numpy(y), kind).numpy()
        assert got.dtype == np.uint8 and np.array_equal(got, convert_output(y, kind)), (classes, kind)
with TorchBackend().load(open_package(sys.argv[1]), "cpu") as session:
    x = rng.random((3, 64, 64, 1), dtype=np.float32)
    p = session.predict(x)
    assert session.converts_on_device("labels") and session.converts_on_device("uint8")
    for kind in ("uint8", "labels"):
        assert np.array_equal(session.predict_converted(x, kind), convert_output(p, kind)), kind
    session.hold_outputs(5)
    assert np.array_equal(session.predict(x), p)
    assert session.suggest_batch_size((64, 64, 1)) is None  # CPU: keep the caller's batch
print("torch-ok")
"""


def test_torch_converts_like_the_runner(model_cache: Callable[..., Path]) -> None:
    """In a child process: importing torchvision after TensorFlow (which the model cache loads) crashes
    in some environments, and the check needs neither."""
    import importlib.util
    import os
    import subprocess

    if any(importlib.util.find_spec(m) is None for m in ("torch", "onnx2torch")):
        pytest.skip("needs torch and onnx2torch (requirements/torch.txt)")
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "czregistry-torch"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", TORCH_CHECK, str(model_cache("unet"))], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": path,
                                                       "CZREG_PLUGINS": "onnxruntime,torch"}, check=False)
    assert proc.returncode == 0 and "torch-ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("predictor", [False, True])
def test_deflated_input_runs_like_the_raw_pixels(unet: Path, tmp_path: Path, predictor: bool) -> None:
    """A deflated tiled TIFF (read through ISA-L, chunks decoded in parallel) gives the same output as the
    same pixels from a .npy: the reader changes nothing the model sees."""
    import tifffile

    img = (np.random.default_rng(12).random((530, 610)) * 65535).astype(np.uint16)
    np.save(tmp_path / "in.npy", img)
    tifffile.imwrite(tmp_path / "in.tif", img, tile=(128, 128), compression="zlib", predictor=predictor)
    opts = RunOptions(output_kind="probabilities", batch_size=3)
    run(unet, tmp_path / "in.npy", tmp_path / "a.zarr", opts)
    run(unet, tmp_path / "in.tif", tmp_path / "b.zarr", opts)
    assert np.array_equal(_read_output(tmp_path / "a.zarr"), _read_output(tmp_path / "b.zarr"))
