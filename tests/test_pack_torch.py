"""Packing PyTorch directly (the torch plugin's model source): modules, TorchScript .pt, torch.export .pt2.

Every packed model is compared, in the test, with the module itself on NHWC input transposed to NCHW (the
expected output is computed here, independently of the plugin's reference session), validated, and read by
ZEISS's czmodel where it is installed. Models are tiny or built once per module (an smp U-Net with random
weights from tests/corpus.py, no downloads) to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from czregistry.cli import main
from czregistry.errors import PackError, UsageError

torch = pytest.importorskip("torch")
# smp imports torchvision; in this environment importing torchvision after TensorFlow segfaults (checked:
# `import tensorflow, torchvision` exits 139, the other order works), so import it before any test loads TF
with contextlib.suppress(ImportError):
    import segmentation_models_pytorch  # noqa: F401

SEG = {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "foreground"], "MinOverlap": [16, 16]}


def _tiny(rank: int = 2, channels: int = 1, classes: int = 2) -> Any:
    """Conv -> ReLU -> pool -> conv -> upsample: fully convolutional, step 2, ends in logits."""
    nn = torch.nn
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if rank == 2 else (nn.Conv3d, nn.MaxPool3d)
    torch.manual_seed(0)
    net = nn.Sequential(conv(channels, 8, 3, padding=1), nn.ReLU(), pool(2), conv(8, classes, 3, padding=1),
                        nn.Upsample(scale_factor=2, mode="nearest"))
    with torch.no_grad():  # confident logits, so the softmax spans [0, 1] like a trained net's
        net[3].weight.mul_(8.0)
    return net.eval()


def _expected(module: Any, x_nhwc: np.ndarray, *, mean: float = 0.0, std: float = 1.0,
              softmax: bool = True) -> np.ndarray:
    """The module on NHWC input: normalise, to NCHW/NCDHW, run, softmax over channels, back to channels-last."""
    rank = x_nhwc.ndim - 2
    x = (x_nhwc.astype(np.float32) - mean) / std
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    with torch.no_grad():
        y = module(t)
        if softmax:
            y = torch.softmax(y, dim=1)
    out = np.moveaxis(y.numpy(), 1, -1)
    assert out.ndim == rank + 2
    return out


def _run_package(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from czregistry.package import open_package

    session = ort.InferenceSession(open_package(path).read_model_bytes(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _opset(path: Path) -> int:
    import onnx

    from czregistry.package import open_package

    proto = onnx.load_model_from_string(open_package(path).read_model_bytes())
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def smp_unet_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The corpus' smp U-Net (resnet18, random weights) packed once from the module, as the issue asks."""
    import czregistry
    from czregistry.checks import ValidateOptions
    from tests.corpus import CORPUS

    module = CORPUS["smp-unet-resnet18"].build()
    out = tmp_path_factory.mktemp("torch") / "unet.czann"
    # pack validates statically here; the test below runs the full validation (model checks) once
    result = czregistry.pack(module, {**SEG, "MinOverlap": [64, 64]}, out, spatial_dims=(128, 128),
                             preprocessing=["normalize:mean=0.5,std=0.25"], postprocessing=["softmax"],
                             validate_options=ValidateOptions(static=True))
    return module, result


def test_pack_torch_module_equals_the_module(smp_unet_package: tuple[Any, Any]) -> None:
    from czregistry.validate import validate

    module, result = smp_unet_package
    assert result.valid and result.opset == 18 and result.model_format == "onnx"
    assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff <= 1e-4
    assert result.metadata["InputShape"] == [128, 128, 3]
    x = np.random.default_rng(7).random((2, 128, 128, 3), dtype=np.float32)
    got = _run_package(result.path, x)
    want = _expected(module, x, mean=0.5, std=0.25)
    assert got.shape == want.shape == (2, 128, 128, 2)
    assert float(np.max(np.abs(got - want))) <= 1e-4
    report = validate(result.path)
    assert report.valid, report.to_json()


def test_czmodel_reads_a_torch_package(smp_unet_package: tuple[Any, Any], tmp_path: Path) -> None:
    pytest.importorskip("czmodel")
    from czmodel.core.util._extract_model import extract_czann_model

    _, result = smp_unet_package
    meta, model_file = extract_czann_model(str(result.path), tmp_path / "czann")
    assert meta.input_shape == [128, 128, 3] and meta.classes == ["background", "foreground"]
    with zipfile.ZipFile(result.path) as zf:
        assert Path(model_file).read_bytes() == zf.read("model.model")


def test_pack_3d_module(tmp_path: Path) -> None:
    import czregistry
    from czregistry.validate import validate

    module = _tiny(rank=3, channels=1)
    meta = {**SEG, "MinOverlap": [4, 8, 8]}
    result = czregistry.pack(module, meta, tmp_path / "u3d.czann", spatial_dims=(16, 32, 32),
                             postprocessing=["softmax"])
    assert result.valid and result.metadata["InputShape"] == [16, 32, 32, 1]
    x = np.random.default_rng(3).random((1, 16, 32, 32, 1), dtype=np.float32)
    got = _run_package(result.path, x)
    assert got.shape == (1, 16, 32, 32, 2)
    assert float(np.max(np.abs(got - _expected(module, x)))) <= 1e-4
    assert validate(result.path).valid
    pytest.importorskip("czmodel")
    from czmodel.core.util._extract_model import extract_czann_model

    czmeta, _ = extract_czann_model(str(result.path), tmp_path / "czann")
    assert czmeta.input_shape == [16, 32, 32, 1]


def test_torchscript_file_through_the_cli(tmp_path: Path) -> None:
    module = _tiny(channels=3)
    pt = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(module), str(pt))
    out = tmp_path / "out.czann"
    res = CliRunner().invoke(main, ["pack", str(pt), "-o", str(out), "--type", "SingleClassSemanticSegmentation",
                                    "--classes", "background,foreground", "--min-overlap", "16",
                                    "--tile", "128", "128", "--post", "softmax", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["valid"] and report["opset"] == 18 and report["parity"]["max_abs_diff"] <= 1e-4
    x = np.random.default_rng(1).random((1, 128, 128, 3), dtype=np.float32)
    assert float(np.max(np.abs(_run_package(out, x) - _expected(module, x)))) <= 1e-4
    # without --post softmax the logits are refused by the validator, and nothing is written
    again = CliRunner().invoke(main, ["pack", str(pt), "-o", str(tmp_path / "logits.czann"), "--type",
                                      "SingleClassSemanticSegmentation", "--classes", "background,foreground",
                                      "--min-overlap", "16", "--tile", "128", "128"])
    assert again.exit_code == 6 and "class probabilities must lie in [0, 1]" in again.output
    assert not (tmp_path / "logits.czann").exists()


def test_exported_program_file(tmp_path: Path) -> None:
    if not hasattr(torch.export, "load"):
        pytest.skip(f"torch {torch.__version__} cannot save/load torch.export programs")
    import czregistry

    module = _tiny(channels=1)
    x0 = torch.zeros(1, 1, 64, 64)
    pt2 = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(module, (x0,)), str(pt2))
    result = czregistry.pack(pt2, SEG, tmp_path / "ep.czann", spatial_dims=(64, 64), postprocessing=["softmax"])
    assert result.valid and result.parity_max_abs_diff is not None and result.parity_max_abs_diff <= 1e-4
    x = np.random.default_rng(2).random((1, 64, 64, 1), dtype=np.float32)
    assert float(np.max(np.abs(_run_package(result.path, x) - _expected(module, x)))) <= 1e-4
    assert not list(tmp_path.glob("*.data"))  # the weights are inside the package, not beside it


def test_legacy_czmodel_is_opset_12(tmp_path: Path) -> None:
    import czregistry

    module = _tiny(channels=1)
    result = czregistry.pack(module, {"Classes": ["bg", "fg"], "MinOverlap": [16, 16]}, tmp_path / "m.czmodel",
                             spatial_dims=(64, 64), postprocessing=["softmax"])
    assert result.valid and result.kind == "czmodel" and result.opset == 12 and _opset(result.path) == 12
    x = np.random.default_rng(4).random((1, 64, 64, 1), dtype=np.float32)
    assert float(np.max(np.abs(_run_package(result.path, x) - _expected(module, x)))) <= 1e-4


def _onnx_at_18(tmp_path: Path) -> Path:
    """The tiny net with its softmax, exported by hand at opset 18 (a user's ONNX file)."""
    import io
    import warnings

    net = torch.nn.Sequential(_tiny(channels=1), torch.nn.Softmax(dim=1)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from czregistry_torch.source import channels_last_wrapper

        torch.onnx.export(channels_last_wrapper(net, 2), (torch.zeros(1, 64, 64, 1),), buf, dynamo=False,
                          opset_version=18, input_names=["input"], output_names=["output"])
    path = tmp_path / "net.onnx"
    path.write_bytes(buf.getvalue())
    return path


def test_opset_down_conversion_is_checked(tmp_path: Path) -> None:
    import czregistry

    src = _onnx_at_18(tmp_path)
    result = czregistry.pack(src, SEG, tmp_path / "o17.czann", opset=17)
    assert result.valid and result.opset == 17 and _opset(result.path) == 17
    assert any(n.startswith("opset 18 -> 17: converted graph matches the original within") for n in result.notes)
    # Relu has no adapter below its version 14: refused in one line, nothing written
    with pytest.raises(PackError, match=r"cannot convert the ONNX model to opset 13: onnx's version converter "
                                        r"has no adapter for Relu \(version 14\)"):
        czregistry.pack(src, SEG, tmp_path / "o13.czann", opset=13)
    assert not (tmp_path / "o13.czann").exists()
    res = CliRunner().invoke(main, ["pack", str(src), "-o", str(tmp_path / "cli13.czann"), "--opset", "13",
                                    "--type", "SingleClassSemanticSegmentation", "--classes", "a,b",
                                    "--min-overlap", "16"])
    assert res.exit_code == 6 and "no adapter for Relu" in res.output and "Traceback" not in res.output


def test_unrecognised_input_names_the_installed_sources(tmp_path: Path) -> None:
    import czregistry

    odd = tmp_path / "model.xyz"
    odd.write_bytes(b"\0")
    installed = r"no installed model source recognises it \(installed: (bioimageio .*)?keras .*onnx .*torch"
    with pytest.raises(UsageError, match=installed):
        czregistry.pack(odd, SEG, tmp_path / "x.czann")
    state = tmp_path / "weights.pth"
    torch.save(_tiny().state_dict(), str(state))
    with pytest.raises(UsageError, match="usually holds a state_dict"):
        czregistry.pack(state, SEG, tmp_path / "x.czann", spatial_dims=(64, 64))
    with pytest.raises(UsageError, match="takes any tile size"):
        czregistry.pack(_tiny(), SEG, tmp_path / "x.czann")
    assert not (tmp_path / "x.czann").exists()
