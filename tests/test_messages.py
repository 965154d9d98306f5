"""Messages (issue 12): what a careless user meets says what happened and what to do, in one line, and
leaves nothing behind: a folder given as a package, a zip bomb in the metadata, damaged TIFFs, a full disk,
ONNX with external data, a tile off the model's size step, TensorFlow's start-up chatter."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from czregistry.cli import main
from czregistry.cli._common import os_error
from czregistry.errors import as_disk_full
from tests.sandbox import tmpfs_namespace

ROOT = Path(__file__).resolve().parents[1]
PACK_META = ["--type", "SingleClassSemanticSegmentation", "--classes", "background,cells"]


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    return errors[0]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Callable[..., Path]) -> Path:
    folder = tmp_path_factory.mktemp("msg-onnx")
    with zipfile.ZipFile(model_cache("unet")) as zf:
        (folder / "model.onnx").write_bytes(zf.read("model.model"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    import tifffile

    path = tmp_path_factory.mktemp("msg-tiff") / "cells.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8))
    return path


def test_a_folder_is_not_a_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (["validate", "."], ["validate", "--static", str(tmp_path)], ["inspect", "."]):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "is a folder, not a package file" in _one_error_line(r.output)
        assert "*.czann" in r.output and "no such package file" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_a_zip_bomb_in_model_json_is_not_called_weights(tmp_path: Path, model_cache: Callable[..., Path]) -> None:
    src = model_cache("unet")
    with zipfile.ZipFile(src) as zf:
        meta, model = json.loads(zf.read("model.json")), zf.read("model.model")
    meta["ModelName"] = "a" * 10_000_000
    bomb = tmp_path / "bomb.czann"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.json", json.dumps(meta))
        zf.writestr("model.model", model)
    r = cli("validate", "--static", str(bomb))
    assert r.exit_code == 1, r.output
    assert "archive.zip_bomb: member 'model.json' inflates" in r.output
    assert "model.json is metadata" in r.output and "weights" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.czann"]


def test_a_truncated_tiff_says_truncated(tmp_path: Path, tiff: Path, model_cache: Callable[..., Path]) -> None:
    cut = tmp_path / "cut.tif"
    data = tiff.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    r = cli("run", str(model_cache("unet")), str(cut), "-o", str(out / "m.ome.tiff"))
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output)
    assert "TIFF cut.tif is truncated: its image data needs" in line and "mmap" not in r.output
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("content", "detail"), [
    (b"II*\x00" + bytes(range(256)) * 20, "invalid offset to first page"),  # a TIFF header, garbage after it
    (b"not a tiff at all", "not a TIFF file"),
])
def test_a_garbage_tiff_is_one_line_without_a_stray_log_line(content: bytes, detail: str, tmp_path: Path,
                                                            model_cache: Callable[..., Path]) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "czregistry", "run", str(model_cache("unet")), str(bad), "-o",
                        str(out / "m.ome.tiff")], capture_output=True, text=True, env=_env(), check=False,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    line = _one_error_line(p.stderr)
    assert "cannot read TIFF bad.tif: the file is damaged or not a TIFF" in line and detail in line
    assert "list index out of range" not in p.stderr
    assert [x for x in p.stderr.splitlines() if x.strip()] == [line, p.stderr.splitlines()[-1]]  # + Hint
    assert p.stderr.splitlines()[-1].startswith("Hint:")
    assert list(out.iterdir()) == []


# --- a full disk -------------------------------------------------------------------------------------


def test_a_short_write_is_mapped_to_a_full_disk() -> None:
    """NumPy's real short-write error (``/dev/full`` refuses every byte) has no errno; the CLI answers it
    as a full disk, naming the place."""
    import numpy as np

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as fh:  # noqa: PTH123
        np.zeros(40_000).tofile(fh)
    assert info.value.errno is None and "requested and" in str(info.value)
    mapped = as_disk_full(info.value, "/data/out")
    assert mapped is not None and mapped.errno == errno.ENOSPC and mapped.filename == "/data/out"
    error = os_error(info.value)
    assert error.message == "cannot write: no space left on the device" and error.exit_code == 2
    assert "free some space" in (error.hint or "")
    with pytest.raises(OSError) as real, open("/dev/full", "wb", buffering=0) as fh:  # noqa: PTH123
        fh.write(b"x")
    assert real.value.errno == errno.ENOSPC and as_disk_full(real.value) is real.value
    assert as_disk_full(OSError(errno.EACCES, "denied")) is None and as_disk_full(ValueError("x")) is None


def _tiny_tmpfs(folder: Path, size: str) -> list[str]:
    unshare = tmpfs_namespace(folder, f"size={size}")
    # list what is left on the small file system after the command, from inside the namespace
    return [unshare, "-rm", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs "$0" && "$@"; rc=$?; echo LEFT: $(ls -A "$0"); exit $rc',
            str(folder)]


@pytest.mark.parametrize("command", ["run", "pack"])
def test_a_full_disk_says_so_and_leaves_nothing(command: str, tmp_path: Path, onnx_model: Path,
                                                model_cache: Callable[..., Path]) -> None:
    import numpy as np
    import tifffile

    full = tmp_path / "full"
    full.mkdir()
    if command == "run":
        image = tmp_path / "big.tif"
        tifffile.imwrite(image, (np.random.default_rng(2).random((768, 768)) * 255).astype(np.uint8))
        prefix, args = _tiny_tmpfs(full, "256k"), ["run", str(model_cache("unet")), str(image), "-o",
                                                   str(full / "m.ome.tiff"), "-q"]
    else:
        prefix, args = _tiny_tmpfs(full, "8k"), ["pack", str(onnx_model), "-o", str(full / "p.czann"), *PACK_META,
                                                 "--tile", "64", "64"]
    p = subprocess.run([*prefix, sys.executable, "-m", "czregistry", *args], capture_output=True, text=True,
                       env=_env(), check=False, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    line = _one_error_line(p.stderr)
    assert "no space left on the device" in line and "requested and" not in p.stderr
    assert "LEFT: \n" in p.stdout or p.stdout.rstrip().endswith("LEFT:"), p.stdout  # nothing on the full disk


# --- pack ------------------------------------------------------------------------------------------


def test_pack_of_onnx_with_external_data_says_how_to_merge(tmp_path: Path, onnx_model: Path) -> None:
    import onnx

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(onnx.load(onnx_model), src / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    r = cli("pack", str(src / "ext.onnx"), "-o", str(tmp_path / "p.czann"), *PACK_META, "--tile", "64", "64")
    assert r.exit_code == 6, r.output
    line = _one_error_line(r.output)
    assert "ext.onnx keeps its weights outside the file (in ext.onnx.data)" in line
    assert "ONNXRuntimeError" not in r.output and "onnx.save(onnx.load(" in r.output
    assert not (tmp_path / "p.czann").exists() and sorted(p.name for p in src.iterdir()) == ["ext.onnx",
                                                                                             "ext.onnx.data"]


def test_pack_with_a_tile_off_the_size_step_names_the_step(tmp_path: Path, onnx_model: Path) -> None:
    r = cli("pack", str(onnx_model), "-o", str(tmp_path / "p.czann"), *PACK_META, "--tile", "7", "7")
    assert r.exit_code == 6, r.output
    line = _one_error_line(r.output)
    assert "multiples of 4x4" in line and "global pooling" not in r.output and "dense" not in r.output
    assert not (tmp_path / "p.czann").exists()


def test_pack_of_a_keras_file_keeps_tensorflow_chatter_off_stderr(tmp_path: Path,
                                                                  model_cache: Callable[..., Path]) -> None:
    model_cache.keras_model("unet").save(tmp_path / "m.keras")  # type: ignore[attr-defined]
    env = _env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    p = subprocess.run([sys.executable, "-m", "czregistry", "pack", str(tmp_path / "m.keras"), "-o",
                        str(tmp_path / "k.czann"), *PACK_META, "--tile", "64", "64"], capture_output=True,
                       text=True, env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "k.czann").is_file()
    for noise in ("absl", "cudart", "cuda drivers", "cpu_feature_guard", "oneDNN"):
        assert noise not in p.stderr, p.stderr
    assert "tiles" not in p.stderr


def test_run_prints_no_progress_line_when_stderr_is_not_a_terminal(tmp_path: Path, tiff: Path,
                                                                    model_cache: Callable[..., Path]) -> None:
    p = subprocess.run([sys.executable, "-m", "czregistry", "run", str(model_cache("unet")), str(tiff), "-o",
                        str(tmp_path / "m.ome.tiff")], capture_output=True, text=True, env=_env(), check=False,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert not any(line.lstrip().startswith("tiles") for line in p.stderr.splitlines()), p.stderr


def test_the_demo_folder_is_ignored_by_git() -> None:
    assert "czreg-demo/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


# --- plugins -------------------------------------------------------------------------------------------


def test_a_plugin_that_fails_to_import_is_named_by_validate_run_and_smoke(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Callable[..., Path], tiff: Path) -> None:
    from czregistry.plugins import reset_host
    from tests.test_plugins import _fake_distribution

    _fake_distribution(tmp_path / "site", "czreg-broken", "broken", "czreg_broken_mod",
                       "raise ImportError('no numpy 3')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime,broken")
    reset_host()
    warning = "Warning: plugin 'broken' failed to load (failed to import: ImportError: no numpy 3); see 'czreg plugins'"
    out = tmp_path / "out"
    out.mkdir()
    pkg = model_cache("unet")
    for args, code in ((["validate", "--static", str(pkg)], 0),
                       (["run", str(pkg), str(tiff), "-o", str(out / "m.ome.tiff"), "-q"], 0)):
        r = cli(*args)
        assert r.exit_code == code, r.output
        assert r.output.count(warning) == 1, r.output  # and the command still did its work
    assert (out / "m.ome.tiff").is_file()
    r = cli("plugins")
    assert r.exit_code == 4 and "ERROR: failed to import: ImportError: no numpy 3" in r.output


def test_disabled_plugins_are_not_reported_as_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      model_cache: Callable[..., Path], tiff: Path) -> None:
    from czregistry.plugins import reset_host

    monkeypatch.setenv("CZREG_PLUGINS", "none")
    reset_host()
    pkg = model_cache("unet")
    r = cli("validate", str(pkg))
    assert r.exit_code == 1, r.output
    assert "plugin 'onnxruntime' (czregistry-onnx) is installed but disabled by CZREG_PLUGINS='none'" in r.output
    assert "pip install" not in r.output
    r = cli("run", str(pkg), str(tiff), "-o", str(tmp_path / "m.ome.tiff"))
    assert r.exit_code == 5, r.output
    _one_error_line(r.output)
    assert "disabled by CZREG_PLUGINS='none'; unset CZREG_PLUGINS or add onnxruntime to it" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_trace_plugins_prints_the_hook_calls_of_a_command(monkeypatch: pytest.MonkeyPatch,
                                                          model_cache: Callable[..., Path]) -> None:
    from czregistry.plugins import reset_host

    monkeypatch.setenv("CZREG_TRACE_PLUGINS", "1")
    reset_host()
    r = cli("validate", str(model_cache("unet")))
    assert r.exit_code == 0, r.output
    for line in ("[czreg plugins] register_checks -> checks", "[czreg plugins] register_backends -> onnxruntime",
                 "[czreg plugins] register_backends -> torch"):
        assert line in r.output, r.output
