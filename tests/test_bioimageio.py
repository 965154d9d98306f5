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
        "torchscript3d": build_package(root / "ts3d", weights="torchscript", dims=3, size=16),
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


# --- export: CZANN -> bioimage.io ------------------------------------------------------------------------


def _torch_czann(kind: str, out: Path) -> Path:
    """A small CZANN packed by czregistry from a PyTorch module: an smp-like segmentation net (softmax over
    2 classes), a CARE-style regression net (sigmoid) or a 3D regression net; license member with the
    fields bioimage.io needs."""
    import torch

    from czregistry.pack import pack

    torch.manual_seed(0)
    conv = torch.nn.Conv3d if kind == "regression3d" else torch.nn.Conv2d
    head = torch.nn.Softmax(dim=1) if kind == "segmentation" else torch.nn.Sigmoid()
    classes = 2 if kind == "segmentation" else 1
    net = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, classes, 3, padding=1), head).eval()
    meta: dict[str, object] = {"Type": "SingleClassSemanticSegmentation" if kind == "segmentation" else "Regression",
                               "MinOverlap": [4, 4, 4] if kind == "regression3d" else [4, 4],
                               "ModelName": f"tiny {kind}", "Scaling": [2e-7, 2e-7]}
    if kind == "segmentation":
        meta["Classes"] = ["background", "cell"]
    if kind == "regression3d":
        meta["Scaling"] = [2e-7, 2e-7, 1e-6]
    lic = out.parent / "LICENSE.txt"
    lic.write_text("License: MIT\nAuthors: Ada Lovelace, Alan Turing\n")
    tile = (16, 32, 32) if kind == "regression3d" else (32, 32)
    pack(net, meta, out, spatial_dims=tile, license_file=lic)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(czann, bioimage.io zip) per kind, built once."""
    from czregistry_bioimageio.export import export_bioimageio

    root = tmp_path_factory.mktemp("exports")
    out: dict[str, tuple[Path, Path]] = {}
    for kind in ("segmentation", "regression", "regression3d"):
        czann = _torch_czann(kind, root / f"{kind}.czann")
        out[kind] = (czann, export_bioimageio(czann, root / f"{kind}.zip").path)
    return out


def _bioimageio_test(path: Path) -> tuple[int, str]:
    """bioimageio.core's own CLI, ``bioimageio test PATH``, in a subprocess (offline, pydantic fix)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "BIOIMAGEIO_CACHE_PATH": str(path.parent / "bioimageio-cache"), "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "czregistry_bioimageio.bioimageio_cli", "test", str(path)],
                       capture_output=True, text=True, timeout=300, env=env)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segmentation", "regression", "regression3d"])
def test_export_passes_bioimageio_test(exports: dict[str, tuple[Path, Path]], kind: str) -> None:
    _, zipped = exports[kind]
    code, output = _bioimageio_test(zipped)
    assert code == 0, output
    assert "Reproduce test outputs from test inputs (onnx)" in output
    with zipfile.ZipFile(zipped) as zf:
        names = set(zf.namelist())
        rdf = zf.read("rdf.yaml").decode()
        readme = zf.read("README.md").decode()
    assert {"rdf.yaml", "model.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    assert "format_version: 0.5" in rdf and "license: MIT" in rdf and "Ada Lovelace" in rdf
    assert "halo: 2" in rdf  # two 3x3 convolutions, measured by the invariance probe
    assert "czregistry validation report" in readme


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segmentation", "regression3d"])
def test_round_trip_keeps_output_and_metadata(exports: dict[str, tuple[Path, Path]], tmp_path: Path,
                                              kind: str) -> None:
    """CZANN -> bioimage.io -> CZANN: the same metadata and the same outputs."""
    from czregistry.package import open_package
    from czregistry.selection import load_session

    czann, zipped = exports[kind]
    back = tmp_path / "back.czann"
    code, output = _pack(zipped, back)
    assert code == 0, output
    first, second = open_package(czann), open_package(back)
    assert second.metadata == first.metadata
    shape = first.metadata["InputShape"]
    x = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    with load_session(first, device="cpu") as a, load_session(second, device="cpu") as b:
        assert np.max(np.abs(a.predict(x) - b.predict(x))) < 1e-6


def test_export_refuses_a_package_without_license_or_authors(exports: dict[str, tuple[Path, Path]],
                                                             tmp_path: Path) -> None:
    from czregistry.package import open_package, write_package

    czann, _ = exports["regression"]
    src = open_package(czann)
    bare = tmp_path / "bare.czann"
    write_package(bare, src.metadata, src.read_model_bytes())
    out = tmp_path / "model.zip"
    r = CliRunner().invoke(main, ["export-bioimageio", str(bare), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output == ("Error: bare.czann names no license; bioimage.io packages need an SPDX license id\n"
                        "Hint: pass --license, e.g. --license MIT (or CC-BY-4.0)\n")
    r = CliRunner().invoke(main, ["export-bioimageio", str(bare), "-o", str(out), "--license", "MIT"])
    assert r.exit_code == 2, r.output
    assert r.output == ("Error: bare.czann names no authors; bioimage.io packages need at least one\n"
                        "Hint: pass --author 'First Last' (repeat it for several)\n")
    assert list(tmp_path.iterdir()) == [bare]


def test_export_refuses_to_overwrite(exports: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    czann, _ = exports["regression"]
    out = tmp_path / "model.zip"
    out.write_bytes(b"keep")
    r = CliRunner().invoke(main, ["export-bioimageio", str(czann), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"Error: {out} already exists\n")
    assert out.read_bytes() == b"keep"


# --- a trained model from the field's tooling --------------------------------------------------------------


@pytest.mark.slow
def test_trained_unet_imports_validates_and_tiles_like_the_whole_image(tmp_path: Path) -> None:
    """A tiny PyTorch U-Net trained for a few seconds, written with bioimageio.spec's builder (TorchScript
    weights), packed, validated (its halo measured) and run tiled: the tiled prediction equals the
    whole-image prediction of the original network at the recommended overlap."""
    import torch

    from czregistry.package import open_package
    from czregistry.run.pipeline import predict_image
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import open_tileable
    from czregistry.selection import load_session

    from .bioimageio_packages import train_denoiser

    net = train_denoiser(seconds=3.0)
    zipped = build_package(tmp_path / "unet", weights="torchscript", net=net, halo=8, name="tiny denoiser")
    out = tmp_path / "unet.czann"
    code, output = _pack(zipped, out)
    assert code == 0, output
    meta = open_package(out).metadata
    assert meta["MinOverlap"] == [16, 16]
    from czregistry.validate import validate

    report = validate(out)
    assert report.valid, report.to_json()
    halo = report.measurements["halo"]
    assert all(h is not None and 2 * h <= 16 for h in halo), halo
    image = np.random.default_rng(3).integers(0, 256, (96, 80)).astype(np.float32)
    pkg, info = open_tileable(out, "probabilities")
    with load_session(pkg, device="cpu") as session:
        tiled, grid = predict_image(session, info, (image / 255)[..., None], RunOptions(device="cpu"))
    assert grid.n_tiles > 1 and grid.tile == (32, 32), grid
    with torch.no_grad():
        whole = torch.sigmoid(net(torch.from_numpy((image / 255 - 0.5)[None, None].astype(np.float32)))).numpy()
    assert np.max(np.abs(tiled[..., 0] - whole[0, 0])) < 1e-4


# --- registry: pull --format bioimageio ------------------------------------------------------------------


@pytest.mark.slow
def test_pull_as_bioimageio(exports: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    czann, _ = exports["regression"]
    reg = ["--registry", f"sqlite:///{tmp_path / 'reg' / 'registry.db'}", "--blob-store", str(tmp_path / "blobs")]
    runner = CliRunner()
    assert runner.invoke(main, ["init", reg[1]]).exit_code == 0
    r = runner.invoke(main, ["publish", str(czann), "--name", "tiny-care", "--version", "1.0.0", *reg])
    assert r.exit_code == 0, r.output
    out = tmp_path / "bio"
    r = runner.invoke(main, ["pull", "tiny-care==1.0.0", "--format", "bioimageio", "-o", str(out), *reg])
    assert r.exit_code == 0, r.output
    zipped = out / "tiny-care-1.0.0.bioimageio.zip"
    assert r.output == (f"exported {zipped} (bioimage.io 0.5, ONNX weights, license MIT, output halo 2x2)\n"
                        f"Pulled tiny-care 1.0.0 -> {zipped} (bioimage.io 0.5, sha256 verified)\n")
    assert sorted(p.name for p in out.iterdir()) == [zipped.name]
    with zipfile.ZipFile(zipped) as zf:
        assert "license: MIT" in zf.read("rdf.yaml").decode()
    # a second pull does not overwrite without --force
    r = runner.invoke(main, ["pull", "tiny-care==1.0.0", "--format", "bioimageio", "-o", str(out), *reg])
    assert r.exit_code == 2 and f"Error: {zipped} already exists" in r.output
    r = runner.invoke(main, ["pull", "tiny-care==1.0.0", "--format", "bioimageio", *reg])
    assert r.exit_code == 2 and r.output == "Error: --format bioimageio needs -o FOLDER\nHint: e.g. -o models/\n"


_RDF_04 = """format_version: 0.4.10
type: model
name: tiny 04 net
description: a tiny conv net in format 0.4
authors: [{name: Test Author}]
cite: [{text: a test, doi: 10.1234/test}]
license: MIT
documentation: README.md
tags: [test]
timestamp: "2024-01-01T00:00:00"
test_inputs: [in.npy]
test_outputs: [out.npy]
inputs:
  - {name: raw, axes: bcyx, data_type: float32, data_range: [0, 255],
     shape: {min: [1, 1, 16, 16], step: [0, 0, 8, 8]},
     preprocessing: [{name: scale_linear, kwargs: {gain: 0.00392156862745098, offset: -0.5}}]}
outputs:
  - {name: pred, axes: bcyx, data_type: float32, data_range: [0, 1], halo: [0, 0, 2, 2],
     shape: {reference_tensor: raw, scale: [1, 1, 1, 1], offset: [0, 0, 0, 0]},
     postprocessing: [{name: sigmoid}]}
weights:
  onnx: {source: w.onnx, opset_version: 17}
"""


@pytest.mark.slow
def test_import_format_0_4_through_bioimageio_spec_conversion(packages: dict[str, Path], tmp_path: Path) -> None:
    """A format 0.4 description (axes as 'bcyx', halo per axis, test_inputs/test_outputs lists) is converted
    to 0.5 by bioimageio.spec and packs like a 0.5 one."""
    folder = tmp_path / "v04"
    with zipfile.ZipFile(packages["onnx"]) as zf:
        zf.extractall(folder)
    (folder / "rdf.yaml").write_text(_RDF_04)
    out = tmp_path / "x.czann"
    code, output = _pack(folder / "rdf.yaml", out)
    assert code == 0, output
    assert "the package's test tensors are reproduced within its tolerance" in output
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("model.json"))
    assert meta["MinOverlap"] == [4, 4] and meta["InputShape"] == [32, 32, 1]


@pytest.mark.slow
def test_import_3d_package(packages: dict[str, Path], tmp_path: Path) -> None:
    """A 3D package (axes b, c, z, y, x; TorchScript weights) packs as NDHWC with a 3D tile and overlap."""
    out = tmp_path / "x.czann"
    code, output = _pack(packages["torchscript3d"], out)
    assert code == 0, output
    assert "the package's test tensors are reproduced within its tolerance" in output
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("model.json"))
    assert meta["InputShape"] == [16, 16, 16, 1] and meta["OutputShape"] == [16, 16, 16, 1]
    assert meta["MinOverlap"] == [4, 4, 4] and meta["ModelName"] == "tiny 3D net"


_DEMO_EXPORT = """
import sys
from pathlib import Path
from czregistry.demo import DEMO_TILE
from czregistry.examples import EXAMPLE_CLASSES, EXAMPLE_NORMALIZATION, build_example_model
from czregistry.pack import pack
from czregistry_bioimageio.export import export_bioimageio
out = Path(sys.argv[1])
norm = EXAMPLE_NORMALIZATION
pack(build_example_model(), {"Type": "SingleClassSemanticSegmentation", "Classes": EXAMPLE_CLASSES,
     "MinOverlap": [8, 8], "ModelName": "Example nuclei segmentation"}, out / "nuclei.czann",
     preprocessing=[f"normalize:mean={norm['mean']},std={norm['std']}"], spatial_dims=DEMO_TILE)
export_bioimageio(out / "nuclei.czann", out / "nuclei.zip", license_id="MIT", authors=["czregistry demo"])
"""


@pytest.mark.slow
def test_the_demo_model_exports_and_passes_bioimageio_test(tmp_path: Path) -> None:
    """The main job's own package (a Keras model with a normalize layer, exactly as ``czreg demo`` packs it)
    as a bioimage.io model. Built in a subprocess: TensorFlow and torchvision do not share a process here."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CZREG_PROGRESS": "off"}
    r = subprocess.run([sys.executable, "-c", _DEMO_EXPORT, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    code, output = _bioimageio_test(tmp_path / "nuclei.zip")
    assert code == 0, output
    assert "Reproduce test outputs from test inputs (onnx)" in output


@pytest.mark.slow
def test_an_smp_unet_package_exports_and_passes_bioimageio_test(tmp_path: Path) -> None:
    """A real segmentation_models_pytorch U-Net (ResNet-18 encoder, random weights), packed from the module
    as the README shows, exported and checked by bioimage.io's own test."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    import torch
    from czregistry_bioimageio.export import export_bioimageio

    from czregistry.checks import ValidateOptions
    from czregistry.pack import pack

    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2).eval()
    lic = tmp_path / "LICENSE.txt"
    lic.write_text("License: MIT\nAuthors: Ada Lovelace\n")
    czann = tmp_path / "unet.czann"
    pack(net, {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "cell"], "MinOverlap": [32, 32],
               "ModelName": "smp unet"}, czann, postprocessing=["softmax"], spatial_dims=(64, 64), license_file=lic,
         validate_options=ValidateOptions(static=True))
    zipped = export_bioimageio(czann, tmp_path / "unet.zip").path
    code, output = _bioimageio_test(zipped)
    assert code == 0, output
    with zipfile.ZipFile(zipped) as zf:
        rdf = zf.read("rdf.yaml").decode()
    assert "format_version: 0.5" in rdf and "license: MIT" in rdf
