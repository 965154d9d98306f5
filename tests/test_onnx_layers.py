"""Layers in their ONNX form (issue 28): PyTorch users pack with ``--pre`` / ``--post`` without TensorFlow, and
the ``local`` flag of a layer is checked by the validator, not trusted.

The no-TensorFlow tests run the CLI (and ``czregistry.pack``) in a subprocess where ``import tensorflow``,
``import keras`` and ``import tf2onnx`` fail (``sys.modules[name] = None``) and ``CZREG_PLUGINS`` leaves the
TensorFlow plugin out: any code path that still needed TensorFlow would fail there. The expected output is
computed here in NumPy and torch, independently of the package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SEG = {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "foreground"], "MinOverlap": [16, 16]}
NO_TF_PLUGINS = "onnxruntime,torch,example"
#: Runs what follows it with TensorFlow, Keras and tf2onnx unimportable.
BLOCK_TF = "import sys\nfor _m in ('tensorflow', 'keras', 'tf2onnx'):\n    sys.modules[_m] = None\n"


def _tiny_net() -> Any:
    """Conv -> ReLU -> pool -> conv -> upsample: local (fully convolutional, halo of a few pixels), logits."""
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 2, 3, padding=1),
                        nn.Upsample(scale_factor=2, mode="nearest"))
    with torch.no_grad():
        net[3].weight.mul_(4.0)
    return net.eval()


def _expected(net: Any, x: np.ndarray) -> np.ndarray:
    """normalize:mean=0.5,std=0.25, then percentile_normalize:low=1,high=99.8, the net, softmax: in NumPy/torch."""
    z = (x.astype(np.float64) - 0.5) / 0.25
    for i in range(len(z)):
        lo, hi = np.percentile(z[i], [1.0, 99.8])
        z[i] = (z[i] - lo) / (hi - lo)
    with torch.no_grad():
        logits = net(torch.from_numpy(np.moveaxis(z, -1, 1).astype(np.float32)))
        probs = torch.softmax(logits, dim=1).numpy()
    return np.moveaxis(probs, 1, -1)


def _run_package(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from czregistry.package import open_package

    session = ort.InferenceSession(open_package(path).read_model_bytes(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _no_tf(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "no_tf.py"
    script.write_text(BLOCK_TF + textwrap.dedent(code), encoding="utf-8")
    root = str(Path(__file__).resolve().parents[1])  # the API script imports tests.test_onnx_layers
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CZREG_PLUGINS": NO_TF_PLUGINS, "CZREG_PROGRESS": "off", "CZREG_HOME": str(tmp_path / "home"),
           "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


CLI = """
from czregistry.cli import main
main(prog_name="czreg")
"""


@pytest.mark.slow
def test_czreg_pack_torch_with_layers_without_tensorflow(tmp_path: Path) -> None:
    """The issue's command: packs, validates and equals the module with the same steps in NumPy within 1e-5."""
    net = _tiny_net()
    with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; packing still reads .pt files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(tmp_path / "net.pt"))
    out = tmp_path / "net.czann"
    res = _no_tf(tmp_path, CLI, "pack", "net.pt", "-o", str(out), "--type", SEG["Type"], "--classes",
                 "background,foreground", "--min-overlap", "16", "--tile", "64", "64",
                 "--pre", "normalize:mean=0.5,std=0.25", "--pre", "percentile_normalize:low=1,high=99.8",
                 "--post", "softmax")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"packed {out} (czann, onnx, opset 18)")
    assert "layer 'percentile_normalize' uses whole-tile statistics" in res.stderr
    x = (np.random.default_rng(3).random((2, 64, 64, 1)) * 4000).astype(np.float32)
    np.testing.assert_allclose(_run_package(out, x), _expected(net, x), atol=1e-5)

    res = _no_tf(tmp_path, CLI, "validate", str(out), "--json")
    assert res.returncode == 0, res.stderr
    [report] = json.loads(res.stdout)
    assert report["valid"] is True
    assert "global context" in next(f["message"] for f in report["findings"]
                                    if f["check"] == "model.invariance.equivariance")

    res = _no_tf(tmp_path, CLI, "plugins", "--json")
    assert res.returncode == 0, res.stderr
    listed = {layer["name"]: layer for layer in json.loads(res.stdout)["layers"]}
    assert set(listed) == {"rgb_to_bgr", "rgba_to_bgra", "per_image_standardization", "normalize", "shift", "scale",
                           "transpose_channels", "sigmoid_to_softmax", "softmax", "percentile_normalize"}
    assert all("onnx" in layer["forms"] for layer in listed.values())


@pytest.mark.slow
def test_pack_api_torch_module_with_layers_without_tensorflow(tmp_path: Path) -> None:
    """``czregistry.pack(torch_module, ..., preprocessing=[...])`` in a process where TensorFlow cannot load."""
    res = _no_tf(tmp_path, """
        import json, sys, warnings
        import numpy as np
        import torch
        import czregistry
        from tests.test_onnx_layers import _tiny_net
        warnings.simplefilter("ignore")
        result = czregistry.pack(_tiny_net(), {"Type": "SingleClassSemanticSegmentation",
                                               "Classes": ["background", "foreground"], "MinOverlap": [16, 16]},
                                 "api.czann", spatial_dims=(64, 64),
                                 preprocessing=["normalize:mean=0.5,std=0.25", ("percentile_normalize",
                                                                               {"low": 1.0, "high": 99.8})],
                                 postprocessing=["softmax"])
        loaded = sorted(m for m in ("tensorflow", "keras", "tf2onnx") if sys.modules.get(m) is not None)
        print(json.dumps({"valid": result.valid, "parity": result.parity_max_abs_diff, "loaded": loaded}))
    """)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["valid"] is True and summary["parity"] < 1e-5 and summary["loaded"] == []
    x = (np.random.default_rng(4).random((1, 64, 64, 1)) * 255).astype(np.float32)
    np.testing.assert_allclose(_run_package(tmp_path / "api.czann", x), _expected(_tiny_net(), x), atol=1e-5)


# -- the local flag is checked, not trusted --------------------------------------------------------------


def _global_context(path: Path) -> tuple[str, str] | None:
    """The validator's global-context finding for a package, ``(severity, message)``, or None."""
    from czregistry.validate import validate

    report = validate(path)
    return next(((f.severity.value, f.message) for f in report.findings
                 if f.check == "model.invariance.equivariance" and "global context" in f.message), None)


def test_local_network_alone_has_no_global_context(tmp_path: Path) -> None:
    import czregistry

    result = czregistry.pack(_tiny_net(), SEG, tmp_path / "bare.czann", spatial_dims=(64, 64),
                             postprocessing=["softmax"])
    assert result.valid and result.warnings == []
    assert _global_context(tmp_path / "bare.czann") is None


@pytest.mark.parametrize(("layer", "severity"), [("per_image_standardization", "error"),
                                                  ("percentile_normalize", "warning")])
def test_per_image_layer_in_front_of_a_local_network_is_reported_global(layer: str, severity: str,
                                                                        tmp_path: Path) -> None:
    """The validator measures the packed graph with the layer inside it: image-global, even when the spec lies
    (``local=True``), and packing then says the claim is wrong. Standardising by the tile's own mean and
    standard deviation moves a segmentation's output so much (39% of its range here) that the validator refuses
    it (kept here with ``force``); the 1st/99.8th percentiles move less: a "weak global context" warning."""
    import czregistry
    from czregistry.selection import parse_layer

    spec, kwargs = parse_layer(layer)
    liar = dataclasses.replace(spec, local=True)
    with pytest.warns(UserWarning) as record:
        result = czregistry.pack(_tiny_net(), SEG, tmp_path / "l.czann", spatial_dims=(64, 64),
                                 preprocessing=[(liar, kwargs)], postprocessing=["softmax"], force=True)
    assert result.valid is (severity == "warning")
    found = _global_context(tmp_path / "l.czann")
    assert found is not None and found[0] == severity
    assert "global context: the output depends on the whole tile" in found[1]
    claim = ("the packed model has global context (validator: model.invariance) although the model alone has "
             f"none and layer(s) '{layer}', 'softmax' declare local=True: one of them uses whole-image "
             "statistics, so tiled predictions will differ from whole-image ones (its LayerSpec should say "
             "local=False)")
    assert claim in result.warnings
    assert any(str(w.message) == claim for w in record)


# -- the tutorial's onnxscript layer (docs/plugins.md, step 2) -------------------------------------------


def test_docs_onnxscript_layer(tmp_path: Path) -> None:
    """Registered through the hook, checked with check_layer against NumPy, packed in front of a PyTorch model
    with ``czreg pack``; the package equals gamma, the net and the softmax done here."""
    pytest.importorskip("onnxscript")
    from types import ModuleType

    from click.testing import CliRunner

    from czregistry.cli import main
    from czregistry.hookspecs import hookimpl
    from czregistry.layers import LayerSpec, Param
    from czregistry.plugins import get_host
    from czregistry.testing import check_layer
    from tests.onnxscript_layer import gamma

    spec = LayerSpec("gamma", "pre", None, {"gamma": Param("float", default=0.5)}, "max(x, 0) ** gamma",
                     onnx=gamma)
    result = check_layer(spec, {"gamma": 0.5}, channels=1, value_scale=255,
                         reference=lambda x: np.maximum(x, 0) ** 0.5)
    assert result.forms == ["onnx"] and result.reference_max_abs is not None and result.reference_max_abs < 1e-5

    plugin = ModuleType("gamma_plugin")

    def register_layers(register: Any) -> None:
        register(spec)

    plugin.register_layers = hookimpl(register_layers)  # type: ignore[attr-defined]
    get_host().register_plugin(plugin, "gamma_plugin")
    net = _tiny_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(tmp_path / "net.pt"))
    out = tmp_path / "g.czann"
    res = CliRunner().invoke(main, ["pack", str(tmp_path / "net.pt"), "-o", str(out), "--type", SEG["Type"],
                                    "--classes", "background,foreground", "--min-overlap", "16", "--tile", "64",
                                    "64", "--pre", "gamma:gamma=0.25", "--post", "softmax"])
    assert res.exit_code == 0, res.output
    x = (np.random.default_rng(6).random((1, 64, 64, 1)) * 4).astype(np.float32)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(np.moveaxis(x ** 0.25, -1, 1))), dim=1).numpy()
    np.testing.assert_allclose(_run_package(out, x), np.moveaxis(probs, 1, -1), atol=1e-5)
