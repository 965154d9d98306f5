"""bioimage.io both ways (plugins/czregistry-bioimageio, docs/bioimageio.md): packages built in code by
tests/bioimageio_packages.py, packed with ``czreg pack``, checked against their own test tensors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("bioimageio.spec")

from czregistry.cli import main

from .bioimageio_packages import build_package


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bioimageio")
    return {
        "onnx": build_package(root / "onnx", weights="onnx"),
        "torchscript": build_package(root / "ts", weights="torchscript", post="none"),
        "per_sample": build_package(root / "ps", weights="onnx", pre="per_sample"),
        "corrupt": build_package(root / "bad", weights="onnx", corrupt_output=True),
    }


def _pack(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["pack", str(src), "-o", str(out), *extra])
    return r.exit_code, r.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_import_packs_and_reproduces_test_tensors(packages: dict[str, Path], tmp_path: Path, kind: str) -> None:
    out = tmp_path / "x.czann"
    code, output = _pack(packages[kind], out)
    assert code == 0, output
    assert "the package's test tensors are reproduced within its tolerance" in output
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("model.json"))
        license_text = zf.read("license.txt").decode()
    assert meta["Type"] == "Regression"
    assert meta["InputShape"] == [32, 32, 1] and meta["OutputShape"] == [32, 32, 1]
    assert meta["MinOverlap"] == [4, 4]  # halo 2 on each side
    assert meta["ModelName"] == "tiny 2D net"
    assert "License: MIT" in license_text and "Authors: Test Author" in license_text
    assert "doi:10.1234/test" in license_text
    # the CZANN on the package's own test input (host [0, 1] = raw / 255) gives its test output
    from czregistry.package import open_package
    from czregistry.selection import load_session

    folder = packages[kind].parent
    x = np.load(folder / "in.npy")[0].transpose(1, 2, 0)[None] / 255
    want = np.load(folder / "out.npy")[0].transpose(1, 2, 0)[None]
    with load_session(open_package(out), device="cpu") as session:
        got = session.predict(x.astype("float32"))
    assert np.max(np.abs(got - want)) < 1e-4


@pytest.mark.slow
def test_import_refuses_a_package_that_does_not_reproduce_its_test_output(packages: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "x.czann"
    code, output = _pack(packages["corrupt"], out)
    assert code == 6, output
    assert "Error: the converted model does not reproduce the package's test output: 1024 of 1024 elements " \
        "differ by more than 0.001 + 0.001 x |expected|" in output
    assert "nothing was written" in output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_import_per_sample_normalisation_is_said_and_measured(packages: dict[str, Path], tmp_path: Path) -> None:
    """Per-sample statistics become per-tile statistics: the validator's tiling check measures the global
    context and refuses the package (nothing written)."""
    out = tmp_path / "x.czann"
    code, output = _pack(packages["per_sample"], out)
    assert code == 6, output
    assert "Error: the packed model failed its own verification (model.invariance.equivariance: global context: " \
        "the output depends on the whole tile" in output
    assert not out.exists()
