"""``czreg run --dask``: on a real LocalCluster of 2 worker processes, the output equals the single-process
run bit for bit (2D, 3D, several images, blending), a SIGKILLed run resumes to the same bytes, a block that
fails twice stops the run naming the block, and each worker loads the model once; ``local:1`` runs in the
client process with the client's session (one load), equal to the single process, and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("distributed")

from czregistry.cli import main
from czregistry.errors import RunError
from czregistry.package import sha256_file
from czregistry.run.cluster import open_dask_client
from czregistry.run.dask_run import read_output, run_dask
from czregistry.run.plan import RunOptions
from czregistry.run.runner import run
from czregistry.run.worker import worker_stats

ModelCache = Callable[..., Path]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """One LocalCluster (2 single-threaded worker processes) shared by the module's library-level tests."""
    with open_dask_client("local:2", timeout=60) as c:
        c.wait_for_workers(2, timeout=120)
        yield c


def _single(package: Path, image: Path, out: Path, options: RunOptions) -> np.ndarray:
    run(package, image, out, options)
    return read_output(out)


def _image(path: Path, shape: tuple[int, ...], seed: int, dtype: Any = np.uint8) -> Path:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so the models' outputs vary across the image
    base = rng.random(shape)
    img = (base * np.iinfo(dtype).max).astype(dtype)
    np.save(path, img)
    return path


@pytest.mark.parametrize(("kind", "blend"), [("probabilities", False), ("labels", True)])
def test_2d_planes_equal_the_single_process_run(client: Any, model_cache: ModelCache, tmp_path: Path,
                                                 kind: str, blend: bool) -> None:
    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (2, 300, 420), 1)
    options = RunOptions(output_kind=kind, blend=blend, axes="TYX")  # type: ignore[arg-type]
    want = _single(pkg, img, tmp_path / "ref.zarr", options)
    res = run_dask(pkg, [img], tmp_path / "out.zarr", options, client=client, block=128)
    got = read_output(tmp_path / "out.zarr")
    assert got.dtype == want.dtype and got.shape == want.shape == (2, 300, 420, 1 if kind == "labels" else 2)
    assert np.array_equal(got, want)
    assert res.blocks == 2 * 3 * 4 and res.blocks_run == res.blocks and res.tiles_skipped == 0
    assert res.tiles_run > res.tiles  # seam tiles are predicted by both neighbouring blocks
    assert res.workers == 2
    assert len(list((tmp_path / "out.zarr" / ".czreg" / "blocks").glob("*.done"))) == res.blocks
    assert not list(tmp_path.glob(".out.zarr*"))  # the part folder was renamed into place
    # a valid OME-Zarr group that czreg's own reader opens (channel axis before space)
    from czregistry.run.readers import open_image

    src = open_image(tmp_path / "out.zarr")
    assert src.axes == "TCYX" and src.shape == (2, want.shape[-1], 300, 420)


@pytest.mark.parametrize("kind", ["labels", "uint8"])
def test_one_zarr_format_in_both_paths_and_equal_to_the_ome_tiff(client: Any, model_cache: ModelCache,
                                                                   tmp_path: Path, kind: str) -> None:
    """``-o x.zarr`` is the same OME-Zarr 0.5 with or without --dask: the same metadata, array layout
    (CYX, 256 px chunks, shards of up to 2048 x 2048 px) and shard files byte for byte; the pixels equal the OME-TIFF
    output's."""
    import tifffile
    import zarr

    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (300, 2600), 4)
    options = RunOptions(output_kind=kind)  # type: ignore[arg-type]
    single = _single(pkg, img, tmp_path / "single.zarr", options)
    run(pkg, img, tmp_path / "single.ome.tiff", options)
    run_dask(pkg, [img], tmp_path / "dask.zarr", options, client=client)
    tiff = tifffile.imread(tmp_path / "single.ome.tiff")
    tiff = tiff[..., None] if tiff.ndim == 2 else tiff
    assert np.array_equal(read_output(tmp_path / "dask.zarr"), single) and np.array_equal(single, tiff)
    groups = [zarr.open_group(str(tmp_path / n), mode="r") for n in ("single.zarr", "dask.zarr")]
    arrays: list[Any] = [g["0"] for g in groups]
    assert groups[0].attrs["ome"] == groups[1].attrs["ome"]
    ome = groups[0].attrs["ome"]
    assert ome["version"] == "0.5" and [a["name"] for a in ome["multiscales"][0]["axes"]] == ["c", "y", "x"]
    assert ome["multiscales"][0]["datasets"][0]["path"] == "0"
    for a in arrays:
        assert a.metadata.zarr_format == 3 and a.shape == (single.shape[-1], 300, 2600)
        assert a.chunks == (single.shape[-1], 256, 256) and a.shards == (single.shape[-1], 512, 2048)

    def shard_files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in (root / "0" / "c").rglob("*") if p.is_file()}

    assert shard_files(tmp_path / "single.zarr") == shard_files(tmp_path / "dask.zarr")


@pytest.mark.parametrize("kind", ["labels", "uint8"])
def test_sharded_output_reads_in_zarr_and_ome_zarr_py_as_the_ome_tiff(client: Any, model_cache: ModelCache,
                                                                       tmp_path: Path, kind: str) -> None:
    """What OME-Zarr consumers see: the sharded output (2 x 2 shards of up to 8 x 8 chunks, appended chunk
    row by chunk row) of the single process and of Dask (2048 px blocks) read with zarr and with
    ome-zarr-py (``ome_zarr.io.parse_url`` + ``ome_zarr.reader.Reader``) holds the OME-TIFF output's pixels
    of the same run, on the same axes (the class axis ``c`` is the OME-TIFF's samples ``S``)."""
    import tifffile
    import zarr

    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (2300, 2200), 6)
    options = RunOptions(output_kind=kind)  # type: ignore[arg-type]
    run(pkg, img, tmp_path / "single.ome.tiff", options)
    run(pkg, img, tmp_path / "single.zarr", options)
    run_dask(pkg, [img], tmp_path / "dask.zarr", options, client=client, block=2048)
    with tifffile.TiffFile(tmp_path / "single.ome.tiff") as tf:
        tiff, tiff_axes = tf.series[0].asarray(), tf.series[0].axes
    classes = 1 if kind == "labels" else 2
    assert tiff_axes == ("YX" if classes == 1 else "YXS") and len(np.unique(tiff)) > 1
    want = tiff.reshape(2300, 2200, classes)
    for name in ("single.zarr", "dask.zarr"):
        array = zarr.open_group(str(tmp_path / name), mode="r")["0"]
        assert array.chunks == (classes, 256, 256) and array.shards == (classes, 2048, 2048)
        assert len([p for p in (tmp_path / name / "0" / "c").rglob("*") if p.is_file()]) == 4
        assert np.array_equal(np.moveaxis(array[...], 0, -1), want)
        location = parse_url(str(tmp_path / name))
        assert location is not None
        nodes = list(reader.Reader(location)())
        image = nodes[0]
        axes = [a["name"] for a in image.metadata["axes"]]
        assert axes == ["c", "y", "x"] and [a.get("type") for a in image.metadata["axes"]] == [
            "channel", "space", "space"]
        assert len(image.data) == 1  # one resolution level
        pixels = image.data[0].compute(scheduler="synchronous")
        assert pixels.dtype == tiff.dtype and pixels.shape == (classes, 2300, 2200)
        assert np.array_equal(np.moveaxis(pixels, 0, -1), want)
        # the same axes as the OME-TIFF's: its samples axis S is the class axis c
        assert "".join(a.upper() for a in axes).replace("C", "") + ("S" if classes > 1 else "") == tiff_axes


def test_3d_volume_equals_the_single_process_run(client: Any, model_cache: ModelCache, tmp_path: Path) -> None:
    pkg = model_cache("unet3d")
    img = _image(tmp_path / "vol.npy", (20, 90, 110), 2, np.uint16)
    options = RunOptions(axes="ZYX")
    want = _single(pkg, img, tmp_path / "ref.zarr", options)
    res = run_dask(pkg, [img], tmp_path / "out.zarr", options, client=client, block=64)
    got = read_output(tmp_path / "out.zarr")
    assert got.shape == want.shape == (20, 90, 110, 2)
    assert np.array_equal(got, want)
    assert res.blocks == 1 * 2 * 2


def test_several_images_one_output_each(client: Any, model_cache: ModelCache, tmp_path: Path) -> None:
    pkg = model_cache("unet")
    a = _image(tmp_path / "a.npy", (300, 420), 3)
    b = _image(tmp_path / "b.npy", (130, 250), 4)
    res = run_dask(pkg, [a, b], tmp_path / "outs", RunOptions(), client=client, block=128)
    assert [Path(o["output"]).name for o in res.outputs] == ["a.ome.zarr", "b.ome.zarr"]
    for img in (a, b):
        want = _single(pkg, img, tmp_path / f"ref-{img.stem}.zarr", RunOptions())
        assert np.array_equal(read_output(tmp_path / "outs" / f"{img.stem}.ome.zarr"), want)


def test_each_worker_loads_the_model_once(client: Any, model_cache: ModelCache, tmp_path: Path) -> None:
    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (400, 520), 5)
    for n in range(2):
        run_dask(pkg, [img], tmp_path / f"out{n}.zarr", RunOptions(), client=client, block=128)
    stats = list(client.run(worker_stats).values())
    digest = sha256_file(pkg)
    busy = [s for s in stats if s["blocks"]]
    assert len(busy) == 2 and sum(s["blocks"] for s in busy) >= 2 * 4 * 5
    assert all(s["loads"][digest] == 1 for s in busy), stats
    assert len({s["pid"] for s in stats}) == 2 and os.getpid() not in {s["pid"] for s in stats}


def test_local_1_runs_in_this_process_with_the_clients_session(model_cache: ModelCache, tmp_path: Path) -> None:
    """``local:1`` is one worker thread in the client process that predicts with the client's own session:
    the model is loaded once (by the client; the worker borrows it), the default block is the whole image
    (no seam tile predicted twice) and the output equals the single-process run's, shard files included."""
    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (300, 2600), 11)
    digest = sha256_file(pkg)
    before = worker_stats()
    for kind in ("labels", "probabilities"):
        options = RunOptions(output_kind=kind)  # type: ignore[arg-type]
        want = _single(pkg, img, tmp_path / f"ref-{kind}.zarr", options)
        res = run_dask(pkg, [img], tmp_path / f"{kind}.zarr", options, scheduler="local:1")
        assert np.array_equal(read_output(tmp_path / f"{kind}.zarr"), want)
        assert res.model_loads == 1 and res.workers == 1
        assert res.blocks == 1 and res.tiles_run == res.tiles and res.redundancy == 1.0
        assert res.block_shape == [4096, 4096]

        def shard_files(root: Path) -> dict[str, bytes]:
            return {str(p.relative_to(root)): p.read_bytes() for p in (root / "0" / "c").rglob("*") if p.is_file()}

        assert shard_files(tmp_path / f"ref-{kind}.zarr") == shard_files(tmp_path / f"{kind}.zarr")
    after = worker_stats()
    # the blocks ran here, with the lent session: no load in this process, two sessions lent
    assert after["pid"] == os.getpid() and after["blocks"] == before["blocks"] + 2
    assert after["loads"].get(digest, 0) == before["loads"].get(digest, 0) == 0
    assert after["lent"][digest] == before["lent"].get(digest, 0) + 2
    from czregistry.run import worker

    # nothing kept after the run: no session loaded or lent, no reader or writer open
    assert not worker._SESSIONS and not worker._LENT_BY_RUN and not worker._SOURCES and not worker._ARRAYS


def test_local_1_interrupted_stops_its_block_and_resumes_on_other_workers(client: Any, model_cache: ModelCache,
                                                                           tmp_path: Path) -> None:
    """Ctrl-C during a ``local:1`` run: the block still running in the worker thread stops at its next tile
    (the cluster closes without waiting for it), finished blocks keep their markers, and ``--resume`` on a
    cluster of two worker processes finishes it to the single-process output."""
    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (1024, 1024), 12)
    out = tmp_path / "out.zarr"
    seen: list[int] = []

    def interrupt(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dask(pkg, [img], out, RunOptions(), scheduler="local:1", block=256, progress=interrupt)
    markers = list((tmp_path / ".out.zarr.dask.part" / ".czreg" / "blocks").glob("*.done"))
    assert 2 <= len(markers) < 16 and not out.exists()
    from czregistry.run import worker

    assert not worker._LENT_BY_RUN and not worker._STOPPED  # the lent session was taken back
    res = run_dask(pkg, [img], out, RunOptions(), client=client, resume=True, block=256)
    assert res.blocks_skipped == len(markers) and res.blocks_run == 16 - len(markers)
    assert np.array_equal(read_output(out), _single(pkg, img, tmp_path / "ref.zarr", RunOptions()))


def test_resume_keeps_the_planned_block_edge_on_another_cluster(client: Any, model_cache: ModelCache,
                                                                tmp_path: Path) -> None:
    """The default block edge depends on the worker count (one block for ``local:1``, at least two per
    worker otherwise); ``--resume`` without ``--block-size`` takes the edge from the earlier run's manifest,
    so resuming a ``local:1`` output on two workers is not refused as 'the options differ (block)'."""
    pkg = model_cache("unet")
    img = _image(tmp_path / "img.npy", (300, 2600), 13)
    first = run_dask(pkg, [img], tmp_path / "out.zarr", RunOptions(), scheduler="local:1")
    fresh = run_dask(pkg, [img], tmp_path / "other.zarr", RunOptions(), client=client)
    assert first.block_shape == [4096, 4096] and fresh.block_shape == [2048, 2048]  # 1 block; 2 for 2 workers
    again = run_dask(pkg, [img], tmp_path / "out.zarr", RunOptions(), client=client, resume=True)
    assert again.tiles_run == 0 and again.block_shape == [4096, 4096]
    assert np.array_equal(read_output(tmp_path / "out.zarr"), read_output(tmp_path / "other.zarr"))


@pytest.mark.parametrize(("images", "per_pixel", "workers", "edge"), [
    ([(1, (8192, 8192))], 2, 1, 8192),  # labels of 8-bit grey, one worker: one block, no seam tiles
    ([(1, (8192, 8192))], 2, 2, 4096),  # two workers: 4 blocks, 2 each
    ([(1, (8192, 8192))], 2, 4, 2048),  # four: 16 blocks (4096 px would leave 4, one each)
    ([(1, (8192, 8192))], 2, None, 4096),  # worker count unknown (a scheduler address): the earlier rule
    ([(1, (8192, 8192))], 9, 1, 4096),  # float32 of 2 classes: 8192 px would hold 576 MiB
    ([(1, (8192, 8192))], 80, 1, 2048),  # float32 of 20 classes: even 2048 px exceeds it; never below
    ([(3, (4000, 4000))], 2, 2, 2048),  # 3 planes: 4096 px gives 3 blocks for 2 workers, 2048 px 12
    ([(1, (40000, 40000))], 2, 1, 10240),  # a 40k slide on one worker: the byte bound decides
])
def test_default_block_edge(images: list[tuple[int, tuple[int, int]]], per_pixel: float, workers: int | None,
                            edge: int) -> None:
    from czregistry.run.blocks import default_block_edge

    assert default_block_edge(images, per_pixel, workers, lambda e: True, 2048) == edge


def test_a_block_failing_twice_stops_the_run_and_names_it(client: Any, model_cache: ModelCache,
                                                          tmp_path: Path) -> None:
    import zarr

    pkg = model_cache("unet")
    src = tmp_path / "in.zarr"
    arr = zarr.open_array(str(src), mode="w", shape=(600, 200), chunks=(100, 200), dtype=np.uint8)
    arr[...] = np.random.default_rng(6).integers(0, 255, (600, 200), dtype=np.uint8)
    chunk = src / "c" / "5" / "0"  # rows 500..600: only the last block reads them
    assert chunk.is_file()
    chunk.write_bytes(b"not a zstd frame" * 4)
    with pytest.raises(RunError) as err:
        run_dask(pkg, [src], tmp_path / "out.zarr", RunOptions(), client=client, block=128)
    msg = str(err.value)
    # blocks in block rows 3 and 4 read rows 500..600 (tiles reach past their block); the first to fail is named
    assert re.search(r"in\.zarr plane 0 block \[[34], [01]\] \(y \d+:\d+, x \d+:\d+\) failed twice: .*Zstd", msg), msg
    assert "--resume" in (err.value.hint or "")
    assert not (tmp_path / "out.zarr").exists()
    markers = {m.name for m in (tmp_path / ".out.zarr.dask.part" / ".czreg" / "blocks").glob("*.done")}
    assert markers and not {m for m in markers if m.startswith(("p0-3-", "p0-4-"))}


def _czreg(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "czregistry", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_sigkilled_run_resumes_to_identical_output(model_cache: ModelCache, tmp_path: Path) -> None:
    pkg = model_cache("unet")
    img = _image(tmp_path / "big.npy", (1536, 1536), 7)
    out = tmp_path / "out.zarr"
    markers = tmp_path / ".out.zarr.dask.part" / ".czreg" / "blocks"
    args = ["run", str(pkg), str(img), "-o", str(out), "--dask", "local:2", "--block-size", "128", "--json"]
    proc = _czreg(*args, start_new_session=True)  # its own process group: the kill reaches the workers too
    try:
        deadline = time.monotonic() + 240
        while len(list(markers.glob("*.done"))) < 3:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.05)
    finally:
        with_kill = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert with_kill and not out.exists()  # killed part way
    finished = len(list(markers.glob("*.done")))
    assert 0 < finished < 144

    done = _czreg(*args, "--resume", "-q")
    stdout, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr
    res = json.loads(stdout)
    assert res["tiles_skipped"] > 0 and res["tiles_run"] > 0 and res["blocks_skipped"] >= finished
    assert res["blocks_skipped"] + res["blocks_run"] == res["blocks"] == 144
    assert np.array_equal(read_output(out), _single(pkg, img, tmp_path / "ref.zarr", RunOptions()))

    # resuming a finished output runs nothing
    again = CliRunner().invoke(main, [*args, "--resume", "--dask", "local:1"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tiles_run"] == 0


def test_cli_refuses_dask_options_it_cannot_honour(model_cache: ModelCache, tmp_path: Path) -> None:
    pkg = model_cache("unet")
    img = _image(tmp_path / "a.npy", (64, 64), 8)
    cases = [
        ([str(img), str(img), "-o", str(tmp_path / "o.zarr")], "single-process runner takes one"),
        ([str(img), "-o", str(tmp_path / "o.zarr"), "--resume"], "--resume needs --dask"),
        ([str(img), "-o", str(tmp_path / "o.ome.tiff"), "--dask", "local:1"], "writes OME-Zarr"),
        ([str(img), "-o", str(tmp_path / "o.zarr"), "--dask", "local:0"], "give a worker count"),
        ([str(img), "-o", str(tmp_path / "o.zarr"), "--dask", "nonsense"], "expected local:N"),
    ]
    for args, words in cases:
        res = CliRunner().invoke(main, ["run", str(pkg), *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and "Traceback" not in res.output


def test_content_sha256_sees_content_not_size_or_mtime(tmp_path: Path) -> None:
    """What --resume compares: a file's bytes; a folder's files in sorted order with their relative paths.
    Same size and mtime with other bytes differ; a copy with other mtimes does not; a link loop ends."""
    import shutil

    from czregistry.run.resume import content_sha256

    f = tmp_path / "a.npy"
    f.write_bytes(b"x" * 3_000_000)
    st = f.stat()
    first = content_sha256(f)
    f.write_bytes(b"x" * 2_999_999 + b"y")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_sha256(f) != first and f.stat().st_size == st.st_size

    store = tmp_path / "in.zarr"
    (store / "c" / "0").mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (store / "c" / "0" / "0").write_bytes(b"chunk-a")
    (store / "c" / "0" / "1").write_bytes(b"chunk-b")
    (store / "c" / "loop").symlink_to(store)  # followed once, not forever
    digest = content_sha256(store)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy, symlinks=True)
    (copy / "c" / "loop").unlink()
    (copy / "c" / "loop").symlink_to(copy)
    assert content_sha256(copy) == digest
    (copy / "c" / "0" / "1").write_bytes(b"chunk-c")  # same size, other bytes
    assert content_sha256(copy) != digest
    (copy / "c" / "0" / "1").write_bytes(b"chunk-b")
    (copy / "c" / "0" / "1").rename(copy / "c" / "0" / "2")  # same bytes under another name
    assert content_sha256(copy) != digest


def test_the_in_process_worker_runs_without_dasks_stack_sampler() -> None:
    """``local:1`` shares this process's GIL with the predictor's threads: Dask's statistical profiler (a stack
    sample of every thread each 10 ms) is off there, and on for process workers, which have a GIL of their own."""
    with open_dask_client("local:1", timeout=60) as c:
        sampling = c.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert sampling == dict.fromkeys(c.scheduler_info()["workers"], False)
