"""Packing: every input kind, every built-in layer, tile resets and their refusals, parity, reproducibility,
atomic failure, legacy output, unpack safety and inspect. Real Keras models, real tf2onnx, real backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from czregistry.cli import main
from czregistry.errors import PackError, UsageError
from czregistry.report import Finding

SEG = {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "foreground"], "MinOverlap": [24, 24]}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models() -> Callable[..., Any]:
    """Keras models built once per session (``build_model`` from tests/models.py)."""
    from tests.models import build_model

    cache: dict[tuple[Any, ...], Any] = {}

    def get(kind: str, channels: int = 1, classes: int = 2, tile: int | None = None) -> Any:
        key = (kind, channels, classes, tile)
        if key not in cache:
            cache[key] = build_model(kind, channels=channels, classes=classes, tile=tile)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def unet_files(models: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same U-Net as a .keras file, a SavedModel folder and an ONNX file."""
    from tests.models import export_onnx

    root = tmp_path_factory.mktemp("sources")
    model = models("unet")
    model.save(root / "unet.keras")
    model.export(str(root / "unet_savedmodel"), format="tf_saved_model", verbose=False)
    (root / "unet.onnx").write_bytes(export_onnx(model))
    return {"keras": root / "unet.keras", "savedmodel": root / "unet_savedmodel", "onnx": root / "unet.onnx"}


def _predict_package(path: Path, x: np.ndarray) -> np.ndarray:
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(path), device="cpu") as session:
        return session.predict(x)


def _rand(*shape: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# --- round trips from each input kind ------------------------------------------------------------------


def test_in_memory_model_with_preprocessing_and_tile(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    model = models("unet")
    result = czregistry.pack(model, SEG, tmp_path / "nuclei.czann", preprocessing=["normalize:mean=0.5,std=0.2"],
                             spatial_dims=(64, 64))
    assert result.valid, result.report.to_json()
    assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff < 1e-4
    meta = result.metadata
    assert meta["FormatVersion"] == "2.1.0"
    assert uuid.UUID(meta["Id"])
    assert meta["InputShape"] == [64, 64, 1] and meta["OutputShape"] == [64, 64, 2]
    assert meta["Classes"] == ["background", "foreground"] and meta["MinOverlap"] == [24, 24]
    # independent check of the composition: the package computes model((x - 0.5) / 0.2)
    x = _rand(1, 64, 64, 1)
    want = np.asarray(model((x - 0.5) / 0.2))
    got = _predict_package(result.path, x)
    assert np.abs(got - want).max() < 1e-4
    with zipfile.ZipFile(result.path) as zf:
        assert zf.namelist() == ["model.json", "model.model"]
        assert json.loads(zf.read("model.json")) == meta
    from czregistry.validate import validate

    assert validate(result.path).valid


@pytest.mark.parametrize("kind", ["keras", "savedmodel", "onnx"])
def test_each_file_kind_round_trips_through_the_cli(kind: str, unet_files: dict[str, Path],
                                                   models: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.czann"
    res = CliRunner().invoke(main, ["pack", str(unet_files[kind]), "-o", str(out), "--type",
                                    "SingleClassSemanticSegmentation", "--classes", "bg,fg", "--min-overlap", "24",
                                    "--tile", "32", "48", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["valid"] is True and payload["parity"]["max_abs_diff"] < 1e-4
    assert payload["metadata"]["InputShape"] == [32, 48, 1]
    assert payload["metadata"]["MinOverlap"] == [24, 24]
    x = _rand(1, 32, 48, 1)
    assert np.abs(_predict_package(out, x) - np.asarray(models("unet")(x))).max() < 1e-4


def test_onnx_source_takes_layers(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry
    from czregistry.selection import parse_layer
    from tests.models import export_onnx

    model = models("regression", classes=1)
    src = tmp_path / "reg.onnx"
    src.write_bytes(export_onnx(model))
    result = czregistry.pack(src, {"Type": "Regression", "MinOverlap": [24, 24]}, tmp_path / "reg.czann",
                             spatial_dims=(32, 32), preprocessing=["normalize:mean=0.5,std=0.2"],
                             postprocessing=["sigmoid_to_softmax"])
    assert result.valid, result.report.to_json()
    assert result.metadata["OutputShape"] == [32, 32, 2] and result.parity_max_abs_diff < 1e-4  # type: ignore[operator]
    pre = [parse_layer(a) for a in ("normalize:mean=0.5,std=0.2", "sigmoid_to_softmax")]
    x = _rand(1, 32, 32, 1)
    want = np.asarray(pre[1][0].factory(**pre[1][1])(model(pre[0][0].factory(**pre[0][1])(x))))
    assert np.abs(_predict_package(result.path, x) - want).max() < 1e-4


def test_keras_source_takes_an_onnx_only_layer(models: Callable[..., Any], tmp_path: Path) -> None:
    """A layer with only an ONNX form on a Keras model: the model is exported to ONNX and the layer spliced in
    (issue 28); a SavedModel package cannot hold it, and says so."""
    import czregistry
    from czregistry.builtin_layers import normalize
    from czregistry.checks import ValidateOptions
    from czregistry.layers import LayerSpec

    halve = LayerSpec("halve", "pre", None, {}, "x / 2", onnx=lambda ctx: normalize(ctx, 0.0, 2.0))
    model = models("unet")
    result = czregistry.pack(model, SEG, tmp_path / "h.czann", spatial_dims=(32, 32), preprocessing=[(halve, {})],
                             validate_options=ValidateOptions(static=True))
    assert result.valid and result.model_format == "onnx", result.report.to_json()
    x = _rand(1, 32, 32, 1)
    assert np.abs(_predict_package(result.path, x) - np.asarray(model(x / 2))).max() < 1e-4
    with pytest.raises(UsageError, match="layer 'halve' has only an ONNX form and cannot go into a SavedModel"):
        czregistry.pack(model, SEG, tmp_path / "s.czann", spatial_dims=(32, 32), preprocessing=[(halve, {})],
                        model_format="savedmodel")
    assert not (tmp_path / "s.czann").exists()


def test_czann_style_spec_resolves_paths_relative_to_the_json(unet_files: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir = tmp_path / "spec"
    (spec_dir / "m").mkdir(parents=True)
    (spec_dir / "m" / "unet.keras").write_bytes(unet_files["keras"].read_bytes())
    (spec_dir / "LICENSE.txt").write_text("Apache-2.0\n")
    meta = {"Type": "MultiClassSemanticSegmentation", "Classes": ["a", "b"], "InputShape": [32, 32, 1],
            "OutputShape": [32, 32, 2], "ModelName": "spec-unet", "MinOverlap": [24, 24], "Scaling": [1e-7, 1e-7]}
    (spec_dir / "spec.json").write_text(json.dumps({"ModelMetadata": meta, "ModelPath": "m/unet.keras",
                                                    "LicenseFile": "LICENSE.txt"}))
    monkeypatch.chdir(tmp_path)  # not the spec's folder: paths must resolve against the JSON
    res = CliRunner().invoke(main, ["pack", "spec/spec.json", "-o", "out/spec.czann", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["metadata"]["ModelName"] == "spec-unet" and payload["metadata"]["Scaling"] == [1e-7, 1e-7]
    assert payload["metadata"]["InputShape"] == [32, 32, 1]
    with zipfile.ZipFile(tmp_path / "out" / "spec.czann") as zf:
        assert zf.read("LICENSE.txt") == b"Apache-2.0\n"
    # the model kept free spatial dims (InputShape is metadata only, no reset)
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(tmp_path / "out" / "spec.czann"), device="cpu") as s:
        assert s.signature.inputs[0].shape[1:3] == (None, None)


def test_bad_spec_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ModelMetadata": {"Type": "Segmentation"}, "ModelPath": "m.keras"}))
    res = CliRunner().invoke(main, ["pack", str(bad), "-o", str(tmp_path / "x.czann")])
    assert res.exit_code == 2 and "czann style" in res.output and "Type" in res.output
    bad.write_text(json.dumps({"ModelPath": "m.keras", "Whatever": 1}))
    res = CliRunner().invoke(main, ["pack", str(bad), "-o", str(tmp_path / "x.czann")])
    assert res.exit_code == 2 and "legacy style" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_legacy_style_spec_packs_czmodel_and_czann(unet_files: dict[str, Path], tmp_path: Path) -> None:
    spec = {"BorderSize": 12, "ColorHandling": "ConvertToMonochrome", "PixelType": "Gray16",
            "Classes": ["background", "cells"], "ModelPath": "unet_savedmodel"}
    path = unet_files["savedmodel"].parent / "legacy_spec.json"
    path.write_text(json.dumps(spec))
    legacy = tmp_path / "legacy.czmodel"
    res = CliRunner().invoke(main, ["pack", str(path), "-o", str(legacy), "--tile", "64", "64", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    model_id = payload["metadata"]["Id"]
    assert payload["opset"] == 12 and payload["kind"] == "czmodel"
    _assert_legacy_package(legacy, model_id, border=12, pixel_types=["Gray16"], classes=["background", "cells"])
    res = CliRunner().invoke(main, ["pack", str(path), "-o", str(tmp_path / "legacy.czann"), "--tile", "64", "64",
                                    "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output)["metadata"]
    assert meta["Type"] == "SingleClassSemanticSegmentation" and meta["MinOverlap"] == [24, 24]
    assert meta["ModelName"] == "unet_savedmodel"


def _assert_legacy_package(path: Path, model_id: str, *, border: int, pixel_types: list[str],
                           classes: list[str]) -> None:
    import onnx

    from czregistry.package import open_package

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names == [f"{model_id}.xml", f"{model_id}.model", f"modelid={model_id}"]
        xml = zf.read(f"{model_id}.xml")
        proto = onnx.load_model_from_string(zf.read(f"{model_id}.model"))
    assert b'<Model Version="3.1.0">' in xml
    pkg = open_package(path)
    assert pkg.kind == "czmodel" and pkg.ok
    meta = pkg.metadata or {}
    assert meta["BorderSize"] == border and meta["Status"] == "Trained"
    assert [c["PixelType"] for c in meta["Channels"]] == pixel_types
    assert [c["Name"] for c in meta["TrainingClasses"]] == classes
    assert [c["LabelValue"] for c in meta["TrainingClasses"]] == list(range(1, len(classes) + 1))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 12
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.HasField("dim_value") for d in list(dims)[1:])  # fully defined spatial dims


def test_onnx_source_to_legacy(unet_files: dict[str, Path], models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry
    from tests.models import export_onnx

    # opset 18 -> 12 needs adapters ONNX does not have (Shape 15 -> 14): a clear refusal, nothing written
    with pytest.raises(PackError, match="cannot convert the ONNX model to opset 12"):
        czregistry.pack(unet_files["onnx"], {"Classes": ["bg", "fg"]}, tmp_path / "o.czmodel", spatial_dims=(32, 32))
    assert not list(tmp_path.iterdir())
    src = tmp_path / "unet12.onnx"
    src.write_bytes(export_onnx(models("unet"), opset=12))
    result = czregistry.pack(src, {"Classes": ["bg", "fg"], "BorderSize": 10},
                             tmp_path / "o.czmodel", spatial_dims=(32, 32))
    assert result.valid and result.opset == 12 and result.parity_max_abs_diff < 1e-4  # type: ignore[operator]
    assert any("invariance check" in n for n in result.notes)
    _assert_legacy_package(result.path, result.metadata["Id"], border=10, pixel_types=["Gray8"], classes=["bg", "fg"])


def test_legacy_czmodel_from_keras(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    result = czregistry.pack(models("unet"), {"Classes": ["bg", "fg"], "MinOverlap": [16, 16]},
                             tmp_path / "m.czmodel", spatial_dims=(32, 32))
    assert result.valid and result.opset == 12
    _assert_legacy_package(result.path, result.metadata["Id"], border=8, pixel_types=["Gray8"], classes=["bg", "fg"])


def test_legacy_needs_defined_spatial_dims(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(UsageError, match="fully defined spatial input dims"):
        czregistry.pack(models("unet"), {"Classes": ["bg", "fg"]}, tmp_path / "m.czmodel")
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="up to opset 12"):
        czregistry.pack(models("unet"), {}, tmp_path / "m.czmodel", spatial_dims=(32, 32), opset=18)


def test_savedmodel_model_format(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.warns(UserWarning, match="not byte-reproducible"):
        result = czregistry.pack(models("unet"), SEG, tmp_path / "sm.czann", spatial_dims=(32, 32),
                                 model_format="savedmodel")
    assert result.model_format == "savedmodel" and result.valid, result.report.to_json()
    assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff < 1e-4
    assert any("not byte-reproducible" in w for w in result.warnings)
    with zipfile.ZipFile(result.path) as zf, zf.open("model.model") as fh:
        assert fh.read(4) == b"PK\x03\x04"


def test_onnx_failure_falls_back_to_savedmodel_with_a_warning(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.warns(UserWarning) as record:
        result = czregistry.pack(models("unet"), SEG, tmp_path / "f.czann", spatial_dims=(32, 32), opset=99)
    assert any("ONNX conversion failed" in str(w.message) for w in record)
    assert result.model_format == "savedmodel" and result.opset is None and result.valid
    assert any("ONNX conversion failed" in w for w in result.warnings)


# --- layers --------------------------------------------------------------------------------------------


def _layer_cases() -> Iterable[tuple[str, str, int, str]]:
    """(layer argument, kind, model input channels, model kind) for every built-in layer."""
    yield "normalize:mean=[0.5,0.4,0.3],std=[0.2,0.25,0.3]", "pre", 3, "unet"
    yield "per_image_standardization", "pre", 1, "unet"
    yield "percentile_normalize:low=2,high=98", "pre", 1, "unet"
    yield "rgb_to_bgr", "pre", 3, "unet"
    yield "rgba_to_bgra", "pre", 4, "unet"
    yield "scale:factor=2.5", "pre", 1, "unet"
    yield "shift:offset=-0.5", "pre", 1, "unet"
    yield "transpose_channels:order=[2,0,1]", "pre", 3, "unet"
    yield "sigmoid_to_softmax", "post", 1, "regression"
    yield "softmax", "post", 1, "unet"


def test_every_installed_layer_is_covered() -> None:
    from czregistry.selection import available_layers

    covered = {arg.split(":")[0] for arg, *_ in _layer_cases()}
    assert set(available_layers()) == covered


@pytest.mark.parametrize(("arg", "kind", "channels", "model_kind"), list(_layer_cases()),
                         ids=[c[0].split(":")[0] for c in _layer_cases()])
def test_every_builtin_layer_packs_with_parity(arg: str, kind: str, channels: int, model_kind: str,
                                               models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry
    from czregistry.checks import ValidateOptions
    from czregistry.selection import parse_layer

    classes = 1 if model_kind == "regression" else 2
    model = models(model_kind, channels=channels, classes=classes)
    meta = {"Type": "SingleClassSemanticSegmentation", "MinOverlap": [24, 24]}
    layers = {"preprocessing": [arg]} if kind == "pre" else {"postprocessing": [arg]}
    with pytest.warns(UserWarning) if arg.startswith(("per_image", "percentile")) else _nullcontext():
        result = czregistry.pack(model, meta, tmp_path / "l.czann", spatial_dims=(32, 32),
                                 validate_options=ValidateOptions(static=True), **layers)  # type: ignore[arg-type]
    assert result.valid, result.report.to_json()
    assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff < 1e-4
    # the package equals layer(model) / model(layer) computed eagerly with the same layer
    spec, kwargs = parse_layer(arg)
    layer = spec.factory(**kwargs)
    x = _rand(1, 32, 32, channels)
    want = np.asarray(model(layer(x))) if kind == "pre" else np.asarray(layer(model(x)))
    assert np.abs(_predict_package(result.path, x) - want).max() < 1e-4
    if kind == "post":
        assert result.metadata["OutputShape"] == [32, 32, 2]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_layer_errors(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(UsageError, match="unknown layer 'nope'"):
        czregistry.pack(models("unet"), SEG, tmp_path / "x.czann", preprocessing=["nope"], spatial_dims=(32, 32))
    with pytest.raises(UsageError, match="post-processing layer"):
        czregistry.pack(models("unet"), SEG, tmp_path / "x.czann", preprocessing=["sigmoid_to_softmax"])
    res = CliRunner().invoke(main, ["pack", "missing.keras", "-o", str(tmp_path / "x.czann")])
    assert res.exit_code == 2 and "no such model" in res.output
    assert not list(tmp_path.iterdir())


# --- tile resets and refusals --------------------------------------------------------------------------


def test_tile_refused_for_fixed_size_model(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(PackError, match=r"runs only at 32x32 \(invariance check"):
        czregistry.pack(models("dense_head", tile=32), SEG, tmp_path / "d.czann", spatial_dims=(64, 64))
    res = CliRunner().invoke(main, ["pack", "--help"])
    assert "--tile H W" in res.output
    assert not list(tmp_path.iterdir())


def test_tile_refused_for_global_context_model(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(PackError, match=r"not spatially invariant.*invariance check: .*, global context,"):
        czregistry.pack(models("global_pool"), SEG, tmp_path / "g.czann", spatial_dims=(32, 32))
    assert not list(tmp_path.iterdir())


def test_tile_refused_off_step(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(PackError, match=r"multiples of 4x4") as info:
        czregistry.pack(models("unet"), SEG, tmp_path / "u.czann", spatial_dims=(30, 32))
    assert info.value.hint is not None and "28x32" in info.value.hint
    res = CliRunner().invoke(main, ["pack", "x.keras", "-o", str(tmp_path / "u.czann"), "--tile", "0", "3"])
    assert res.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_dynamic_model_needs_a_tile(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    with pytest.raises(UsageError, match="takes any tile size"):
        czregistry.pack(models("unet"), SEG, tmp_path / "u.czann")
    with pytest.raises(UsageError, match="needs a model Type"):
        czregistry.pack(models("unet"), {}, tmp_path / "u.czann", spatial_dims=(32, 32))


def test_fixed_model_packs_at_its_own_size(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry
    from czregistry.checks import ValidateOptions

    result = czregistry.pack(models("dense_head", tile=32), SEG, tmp_path / "d.czann",
                             validate_options=ValidateOptions(static=True))
    assert result.metadata["InputShape"] == [32, 32, 1] and result.parity_max_abs_diff < 1e-4  # type: ignore[operator]


# --- reproducibility -----------------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_packages(models: Callable[..., Any], unet_files: dict[str, Path],
                                                  tmp_path: Path) -> None:
    import czregistry

    a = czregistry.pack(models("unet"), SEG, tmp_path / "a.czann", preprocessing=["scale:factor=2"],
                        spatial_dims=(32, 32))
    b = czregistry.pack(models("unet"), SEG, tmp_path / "b.czann", preprocessing=["scale:factor=2"],
                        spatial_dims=(32, 32))
    assert a.path.read_bytes() == b.path.read_bytes()
    # and across processes (fresh tf2onnx/Keras name counters), from a file
    src = unet_files["keras"]
    args = ["pack", str(src), "-o", "{out}", "--type", "SingleClassSemanticSegmentation", "--classes",
            "background,foreground", "--min-overlap", "24", "--tile", "32", "32", "--pre", "scale:factor=2"]
    here = CliRunner().invoke(main, [s.replace("{out}", str(tmp_path / "c.czann")) for s in args])
    assert here.exit_code == 0, here.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "czregistry", *[s.replace("{out}", str(tmp_path / "d.czann"))
                                                                 for s in args]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "c.czann").read_bytes() == (tmp_path / "d.czann").read_bytes()
    # a different parameter gives a different package and a different content-derived Id
    e = czregistry.pack(models("unet"), SEG, tmp_path / "e.czann", preprocessing=["scale:factor=3"],
                        spatial_dims=(32, 32))
    assert e.metadata["Id"] != a.metadata["Id"]


def test_canonicalized_onnx_is_stable_and_equivalent(models: Callable[..., Any]) -> None:
    import onnxruntime as ort

    from czregistry.pack.core import canonicalize_onnx
    from tests.models import export_onnx

    raw1, raw2 = export_onnx(models("dilated")), export_onnx(models("dilated"))
    assert raw1 != raw2  # tf2onnx itself is not reproducible: this is why we canonicalise
    c1, c2 = canonicalize_onnx(raw1), canonicalize_onnx(raw2)
    assert c1 == c2
    x = _rand(1, 24, 24, 1)
    outs = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for b in (raw1, c1)]
    np.testing.assert_array_equal(outs[0], outs[1])


# --- atomic failure and --force -------------------------------------------------------------------------


class _AlwaysFails:
    id = "test.always_fails"
    needs_model = False
    order = 1

    def run(self, ctx: Any) -> list[Finding]:
        return [Finding.error(self.id, "refused by a test plugin")]


class _FailingPlugin:
    from czregistry.hookspecs import hookimpl

    @staticmethod
    @hookimpl
    def register_checks(register: Any) -> None:
        register(_AlwaysFails())


def test_invalid_package_leaves_nothing_and_keeps_existing_output(models: Callable[..., Any],
                                                                  tmp_path: Path) -> None:
    import czregistry
    from czregistry.plugins import get_host

    out = tmp_path / "keep.czann"
    out.write_bytes(b"previous package")
    get_host().register_plugin(_FailingPlugin, "failing-test-plugin")
    with pytest.raises(PackError, match=r"failed its own verification.*refused by a test plugin"):
        czregistry.pack(models("unet"), SEG, out, spatial_dims=(32, 32))
    assert out.read_bytes() == b"previous package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.czann"]
    res = CliRunner().invoke(main, ["pack", "x.onnx", "-o", str(tmp_path / "n.czann")])
    assert res.exit_code == 2


def test_force_keeps_invalid_package_with_its_report(models: Callable[..., Any], tmp_path: Path,
                                                     unet_files: dict[str, Path]) -> None:
    from czregistry.plugins import get_host

    get_host().register_plugin(_FailingPlugin, "failing-test-plugin")
    out = tmp_path / "forced.czann"
    base = ["pack", str(unet_files["onnx"]), "-o", str(out), "--type", "SingleClassSemanticSegmentation",
            "--tile", "32", "32", "--min-overlap", "24"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 6 and "nothing was written" in res.output and not out.exists()
    res = CliRunner().invoke(main, [*base, "--force"])
    assert res.exit_code == 1
    assert "INVALID" in res.output and "--force" in res.output
    report = json.loads((tmp_path / "forced.czann.report.json").read_text())
    assert report["valid"] is False
    assert any(f["check"] == "test.always_fails" for f in report["findings"])
    assert out.is_file()
    get_host().unregister_plugin("failing-test-plugin")
    res = CliRunner().invoke(main, base)  # the kept package is not replaced silently
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(main, [*base, "--force"])  # valid now: replaced, and the stale report goes
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "forced.czann.report.json").exists()


def test_multi_output_model_is_refused(tmp_path: Path) -> None:
    import keras

    import czregistry

    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, [keras.layers.Conv2D(2, 1)(inp), keras.layers.Conv2D(1, 1)(inp)])
    with pytest.raises(PackError, match="2 outputs"):
        czregistry.pack(model, SEG, tmp_path / "m.czann", spatial_dims=(32, 32))
    assert not list(tmp_path.iterdir())


def test_conversion_failure_leaves_nothing(tmp_path: Path) -> None:
    import czregistry

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not really onnx")
    with pytest.raises(PackError):
        czregistry.pack(bad, SEG, tmp_path / "out" / "bad.czann", spatial_dims=(32, 32))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --- unpack and inspect --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_package(tmp_path_factory: pytest.TempPathFactory, models: Callable[..., Any]) -> Path:
    import czregistry

    root = tmp_path_factory.mktemp("pkg")
    (root / "license.txt").write_text("MIT\n")
    return czregistry.pack(models("unet"), SEG, root / "small.czann", spatial_dims=(32, 32),
                           license_file=root / "license.txt").path


def test_unpack_extracts_safely(small_package: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    res = CliRunner().invoke(main, ["unpack", str(small_package), str(dest), "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == ["license.txt", "model.json", "model.model"]
    with zipfile.ZipFile(small_package) as zf:
        assert (dest / "model.model").read_bytes() == zf.read("model.model")
    res = CliRunner().invoke(main, ["unpack", str(small_package), str(dest)])
    assert res.exit_code == 2 and "not empty" in res.output
    res = CliRunner().invoke(main, ["unpack", str(small_package), str(dest), "--force"])
    assert res.exit_code == 0


def test_unpack_and_inspect_legacy(models: Callable[..., Any], tmp_path: Path) -> None:
    import czregistry

    result = czregistry.pack(models("unet"), {"Classes": ["bg", "fg"], "MinOverlap": [16, 16]},
                             tmp_path / "m.czmodel", spatial_dims=(32, 32))
    model_id = result.metadata["Id"]
    res = CliRunner().invoke(main, ["unpack", str(result.path), str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [f"{model_id}.model", f"{model_id}.xml"]
    res = CliRunner().invoke(main, ["inspect", str(result.path), "--json"])
    info = json.loads(res.output)
    assert info["kind"] == "czmodel" and info["metadata"]["Version"] == "3.1.0"
    assert info["signature"]["inputs"][0]["shape"] == [None, 32, 32, 1]


def test_unpack_refuses_hostile_archive(tmp_path: Path) -> None:
    evil = tmp_path / "evil.czann"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("model.model", b"\x08\x07")
        zf.writestr("../escaped.txt", "owned")
    dest = tmp_path / "a" / "dest"
    res = CliRunner().invoke(main, ["unpack", str(evil), str(dest)])
    assert res.exit_code == 3 and "climbs out" in res.output
    assert not (tmp_path / "a" / "escaped.txt").exists() and not dest.exists()


def test_inspect_shows_metadata_and_signature(small_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = CliRunner().invoke(main, ["inspect", str(small_package), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["kind"] == "czann" and info["model_format"] == "onnx" and info["license_member"] == "license.txt"
    assert info["metadata"]["InputShape"] == [32, 32, 1]
    assert info["signature"]["inputs"][0]["shape"] == [None, 32, 32, 1]
    assert info["signature"]["outputs"][0]["shape"][-1] == 2 and info["backend"] == "onnxruntime"
    text = CliRunner().invoke(main, ["inspect", str(small_package)])
    assert "InputShape: 32, 32, 1" in text.output and "input input: [?, 32, 32, 1] float32" in text.output
    from czregistry.plugins import reset_host

    monkeypatch.setenv("CZREG_PLUGINS", "none")
    reset_host()
    res = CliRunner().invoke(main, ["inspect", str(small_package)])
    assert res.exit_code == 0 and "InputShape" in res.output
    assert "signature: not shown (no installed backend can run onnx models" in res.output
    res = CliRunner().invoke(main, ["inspect", "missing.czann"])
    assert res.exit_code == 2


# --- compatibility with ZEISS's czmodel reader ------------------------------------------------------------


def test_czmodel_reader_reads_our_packages(small_package: Path, models: Callable[..., Any],
                                           tmp_path: Path) -> None:
    pytest.importorskip("czmodel")
    from czmodel.core.util._extract_model import extract_czann_model, extract_czseg_model

    import czregistry

    meta, model_file = extract_czann_model(str(small_package), tmp_path / "czann")
    assert meta.input_shape == [32, 32, 1] and meta.classes == ["background", "foreground"]
    assert Path(model_file).name == "model.model"
    with zipfile.ZipFile(small_package) as zf:  # czmodel writes back exactly what we wrote
        assert meta.to_czann_dict() == json.loads(zf.read("model.json"))
    legacy = czregistry.pack(models("unet"), {"Classes": ["bg", "fg"], "MinOverlap": [16, 16]}, tmp_path / "m.czmodel",
                             spatial_dims=(32, 32))
    lmeta, _ = extract_czseg_model(str(legacy.path), tmp_path / "czseg")
    assert lmeta.classes[0].name == "bg" and lmeta.color_handling == "ConvertToMonochrome"
    assert int(lmeta.border_size) == 8 and lmeta.pixel_types == ["Gray8"]
