"""Model checks on real Keras models, exported to ONNX and SavedModel: both backends, same verdicts.

Expected halos and steps follow from the architectures in tests/models.py (derivations in the tests).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from czregistry.checks import ValidateOptions
from czregistry.package import write_package
from czregistry.report import Report, Severity
from czregistry.validate import validate

FORMATS = ["onnx", "savedmodel"]
MODEL_CHECK_IDS = ["model.signature", "model.output", "model.invariance", "model.receptive_field"]


def run(path: Path, **options: Any) -> Report:
    return validate(path, ValidateOptions(**options))


def ids(report: Report, severity: Severity) -> set[str]:
    return {f.check for f in report.findings if f.severity is severity}


def model_errors(report: Report) -> set[str]:
    return ids(report, Severity.ERROR)


def message(report: Report, check: str) -> str:
    return " | ".join(f.message for f in report.findings if f.check == check)


# -- invariant models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_unet_is_invariant_with_step_4_and_halo_10(model_cache: Callable[..., Path], fmt: str) -> None:
    """The U-Net has two 2x2 poolings: sizes in steps of 4, equivariant under shifts of 4.

    Halo 10, derived: for output pixel p = 4m + a the receptive field reaches 11, 12, 9, 10 px to the left
    and 10, 9, 12, 11 px to the right (a = 0..3; conv3 r1 + pool + conv3 r2 + pool + conv3 r4 + up + conv3 r2).
    Pixel i is affected by the left window edge iff reach(i mod 4) > i: i = 9 (reach 12) is the last, so
    pixels at distance >= 10 are exact (symmetrically on the right). The single largest reach (12) would
    over-estimate it; an impulse probe at one phase would under-estimate it.
    """
    report = run(model_cache("unet", fmt, overlap=20))
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["accepts_other_sizes"] is True and m["fixed_size"] is None
    assert m["step"] == [4, 4]
    assert m["stride"] == [4, 4]
    assert m["halo"] == [10, 10]
    assert m["global_context"] is False
    assert m["equivariance_error"] <= 1e-4
    assert m["output_follows_input"] is True
    assert m["min_overlap_exact"] == [20, 20]
    assert m["seam_overlap"] == [20, 20] and m["seam_method"] == "tiled-vs-whole"
    assert m["seam_error"] <= 1e-4
    assert m["offgrid_shift_error"] > 1e-3  # a one-pixel shift changes the pooling phase
    assert m["backend"] == ("onnxruntime" if fmt == "onnx" else "tensorflow")
    assert set(m["timings_s"]) == set(MODEL_CHECK_IDS)
    assert m["output"]["softmax_sum_error"] < 1e-5 and m["output"]["determinism_error"] == 0
    sizes = {tuple(p["size"]): p["accepted"] for p in m["probe"]["sizes"]}
    assert sizes[(63, 63)] is False and sizes[(62, 62)] is False and sizes[(61, 61)] is False  # off-grid refused
    assert sizes[(60, 60)] is True and sizes[(62, 64)] is False and sizes[(56, 56)] is True


@pytest.mark.parametrize("fmt", FORMATS)
def test_unet_border_below_halo_warns_and_fails_strict(model_cache: Callable[..., Path], fmt: str) -> None:
    path = model_cache("unet", fmt, overlap=16)  # border 8 < halo 10
    report = run(path)
    assert report.valid and ids(report, Severity.WARNING) == {"model.receptive_field.border"}
    assert "declared border [8, 8]" in message(report, "model.receptive_field.border")
    assert report.measurements["seam_overlap"] == [16, 16]
    assert report.measurements["seam_error"] > 1e-3  # real seams at the declared overlap
    assert report.measurements["min_overlap_exact_seam_error"] <= 1e-4  # and none at twice the halo
    strict = run(path, strict=True)
    assert not strict.valid and not strict.errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_dilated_wide_receptive_field_warns(model_cache: Callable[..., Path], fmt: str) -> None:
    """Dilations 1, 2, 4, 8 with 3x3 kernels and no pooling: stride 1, halo 1 + 2 + 4 + 8 = 15."""
    path = model_cache("dilated", fmt, overlap=2)
    report = run(path)
    m = report.measurements
    assert report.valid, report.to_json()
    assert ids(report, Severity.WARNING) == {"model.receptive_field.border"}
    assert m["step"] == [1, 1] and m["stride"] == [1, 1] and m["halo"] == [15, 15]
    assert m["min_overlap_exact"] == [30, 30]
    assert m["seam_error"] > 1e-3 and m["seam_error_rel"] > 0.01
    hint = next(f.hint for f in report.findings if f.check == "model.receptive_field.border")
    assert hint == "set MinOverlap to [30, 30] for seamless tiling"
    strict = run(path, strict=True)
    assert not strict.valid


@pytest.mark.parametrize("fmt", FORMATS)
def test_regression_valid_and_out_of_range_warns(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("regression", fmt, overlap=20))
    assert report.valid and not report.warnings, report.to_json()
    assert report.measurements["halo"] == [10, 10]
    assert report.measurements["output"]["min"] >= 0 and report.measurements["output"]["max"] <= 1
    # logits declared as regression: finite, but outside [0, 1] -> a warning, not an error
    logits = run(model_cache("logits", fmt, overlap=20, Type="Regression", Classes=None))
    assert logits.valid and "model.output.range" in ids(logits, Severity.WARNING)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unet3d_step_and_halo(model_cache: Callable[..., Path], fmt: str) -> None:
    """One 2x2x2 pooling: step and stride 2; halo 4 (reach 3/4 px by phase; pixel i = 3 is the last one the
    edge reaches), on every axis including z."""
    report = run(model_cache("unet3d", fmt, overlap=8))
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["step"] == [2, 2, 2] and m["stride"] == [2, 2, 2] and m["halo"] == [4, 4, 4]
    assert m["min_overlap_exact"] == [8, 8, 8]
    assert m["equivariance_error"] <= 1e-4
    assert m["seam_error"] <= 1e-4


# -- models that must fail ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_global_pool_fails(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("global_pool", fmt))
    assert model_errors(report) == {"model.invariance.equivariance"}
    assert report.measurements["global_context"] is True
    assert report.measurements["halo"] == [None, None]
    assert report.measurements["equivariance_error"] > 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_head_is_fixed_size_and_fails_for_segmentation(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("dense_head", fmt))
    m = report.measurements
    assert model_errors(report) == {"model.invariance.equivariance"}
    assert "model.invariance.fixed_size" in ids(report, Severity.INFO)
    assert m["accepts_other_sizes"] is False and m["fixed_size"] == [64, 64]
    assert m["global_context"] is True and m["step"] == [None, None]
    assert "within the fixed tile" in message(report, "model.invariance.equivariance")


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_head_fails_for_regression_too(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("dense_head", fmt, Type="Regression", Classes=None))
    assert "model.invariance.equivariance" in model_errors(report)


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_segmentation_fails(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("logits", fmt))
    assert model_errors(report) == {"model.output.probabilities"}
    assert "must lie in [0, 1]" in message(report, "model.output.probabilities")


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_and_channel_mismatches(model_cache: Callable[..., Path], fmt: str) -> None:
    # tuples, not lists: the fixture hashes its overrides (JSON writes tuples as arrays)
    report = run(model_cache("unet", fmt, Classes=("a", "b", "c"), OutputShape=(64, 64, 3)))
    assert model_errors(report) == {"model.signature.output_channels", "model.signature.classes"}
    assert "gives 2 output channel(s) but OutputShape[-1] is 3" in message(report, "model.signature.output_channels")
    assert "names 3 class(es)" in message(report, "model.signature.classes")
    report = run(model_cache("unet", fmt, InputShape=(64, 64, 3)))
    assert model_errors(report) == {"model.signature.input_channels"}
    assert "takes 1 input channel(s) but InputShape[-1] is 3" in message(report, "model.signature.input_channels")
    # later model checks are skipped once the signature is wrong
    assert {f.message.split("'")[1] for f in report.findings if f.check == "model.skipped"} == {
        "model.output", "model.invariance", "model.receptive_field"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_dims_disagree_with_input_shape(model_cache: Callable[..., Path], fmt: str) -> None:
    report = run(model_cache("dense_head", fmt, InputShape=(32, 32, 1), OutputShape=(32, 32, 2)))
    assert "model.signature.fixed_dims" in model_errors(report)
    assert "fixed to 64 on axis h but InputShape says 32" in message(report, "model.signature.fixed_dims")


@pytest.fixture(scope="module")
def noisy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A segmentation model that adds fresh uniform noise on every run (like dropout left active)."""
    import keras
    import tensorflow as tf
    from keras import layers

    from tests.models import export_onnx, export_savedmodel_zip, metadata_for

    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 1))
    x = layers.Conv2D(2, 3, padding="same")(inp)
    x = layers.Lambda(lambda t: t + tf.random.uniform(tf.shape(t)))(x)
    model = keras.Model(inp, layers.Softmax()(x), name="noisy")
    root = tmp_path_factory.mktemp("noisy")
    exports = {"onnx": export_onnx(model), "savedmodel": export_savedmodel_zip(model, root)}
    return {fmt: write_package(root / f"noisy-{fmt}.czann", metadata_for("unet", overlap=4), data)
            for fmt, data in exports.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_nondeterministic_model_fails(noisy_models: dict[str, Path], fmt: str) -> None:
    report = run(noisy_models[fmt])
    assert model_errors(report) == {"model.output.determinism"}
    assert report.measurements["output"]["determinism_error"] > 0.1


# -- legacy packages ----------------------------------------------------------------------------------------

def _legacy_xml(pixel_types: tuple[str, ...], border: int, model_id: str) -> bytes:
    items = "".join(f'<Item PixelType="{p}" />' for p in pixel_types)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<Model Version="3.1.0">
  <Id>{model_id}</Id>
  <ModelName>legacy-unet</ModelName>
  <Status>Trained</Status>
  <FeatureExtractor>DeepNeuralNetwork</FeatureExtractor>
  <Postprocessing />
  <ColorHandling>ConvertToMonochrome</ColorHandling>
  <Channels>{items}</Channels>
  <TrainingClasses>
    <Item><Name>background</Name><LabelValue>1</LabelValue><Color colR="0" colG="0" colB="0" /></Item>
    <Item><Name>nucleus</Name><LabelValue>2</LabelValue><Color colR="255" colG="0" colB="0" /></Item>
  </TrainingClasses>
  <BorderSize>{border}</BorderSize>
</Model>
""".encode()


@pytest.fixture(scope="module")
def fixed_unet_onnx(model_cache: Callable[..., Path]) -> bytes:
    """The test U-Net exported with a fixed 64x64 input (legacy hosts need fixed dims), opset 12."""
    import tensorflow as tf
    import tf2onnx

    model = model_cache.keras_model("unet")  # type: ignore[attr-defined]
    spec = (tf.TensorSpec((None, 64, 64, 1), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=12)
    return bytes(proto.SerializeToString())


def _legacy(tmp_path: Path, model: bytes, pixel_types: tuple[str, ...], border: int) -> Path:
    model_id = str(uuid.uuid4())
    return write_package(tmp_path / "legacy.czmodel", _legacy_xml(pixel_types, border, model_id), model,
                         kind="czmodel")


def test_legacy_package_takes_tile_from_the_graph(tmp_path: Path, fixed_unet_onnx: bytes) -> None:
    report = run(_legacy(tmp_path, fixed_unet_onnx, ("Gray8",), border=10))
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["tile"] == [64, 64] and m["fixed_size"] == [64, 64]
    # fixed graphs: stride and halo still measured by shifting tile-size windows
    assert m["stride"] == [4, 4] and m["halo"] == [10, 10] and m["declared_border"] == [10, 10]
    assert m["seam_method"] == "tiles-vs-centre-window" and m["seam_error"] <= 1e-4


def test_legacy_border_below_halo_names_border_size(tmp_path: Path, fixed_unet_onnx: bytes) -> None:
    report = run(_legacy(tmp_path, fixed_unet_onnx, ("Gray8",), border=4))
    finding = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert finding.severity is Severity.WARNING and "BorderSize" in finding.message
    assert finding.hint == "set BorderSize to 10 for seamless tiling"
    assert report.measurements["seam_error"] > 1e-3  # the centre-window comparison sees the seam


def test_legacy_channels_are_the_sum_of_pixel_types(tmp_path: Path, fixed_unet_onnx: bytes) -> None:
    report = run(_legacy(tmp_path, fixed_unet_onnx, ("Gray8", "Bgr24"), border=10))
    assert "model.signature.input_channels" in model_errors(report)
    assert "sum of the pixel types' channels is 4" in message(report, "model.signature.input_channels")


def test_legacy_needs_fixed_dims(tmp_path: Path, model_cache: Callable[..., Path]) -> None:
    from czregistry.package import open_package

    free = open_package(model_cache("unet")).read_model_bytes()
    report = run(_legacy(tmp_path, free, ("Gray8",), border=10))
    assert "model.signature.legacy_dims" in model_errors(report)


# -- options, reuse, the public API, the CLI ----------------------------------------------------------------

def test_static_skips_model_checks(model_cache: Callable[..., Path]) -> None:
    report = run(model_cache("logits"), static=True)
    assert report.valid
    assert not [f for f in report.findings if f.check.startswith("model.")]
    assert "timings_s" not in report.measurements and "backend" not in report.measurements


def test_probing_cost_is_shared_between_checks(model_cache: Callable[..., Path]) -> None:
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package
    from czregistry.probing import Prober
    from czregistry.selection import load_session

    path = model_cache("unet", overlap=20)
    report = run(path)
    package = open_package(path)
    with load_session(package) as session:
        prober = Prober(session, ModelInfo.from_package(package))
        prober.tile_prediction()
        prober.measure_invariance()
        prober.measure_tiling([20, 20])
        alone = prober.predictions
        prober.measure_invariance()
        prober.measure_tiling([20, 20])
        assert prober.predictions == alone  # everything cached
    # the four checks together cost what the measurements cost alone, plus one determinism re-run
    assert report.measurements["probe"]["predictions"] <= alone + 1


def test_measure_invariance_public_api(model_cache: Callable[..., Path]) -> None:
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package
    from czregistry.probing import InvarianceResult, measure_invariance
    from czregistry.selection import load_session

    for kind, expect in (("unet", (True, (4, 4), (10, 10), False)), ("global_pool", (True, (1, 1), (None, None), True)),
                         ("dense_head", (False, (None, None), (None, None), True))):
        package = open_package(model_cache(kind))
        with load_session(package) as session:
            res = measure_invariance(session, ModelInfo.from_package(package), max_probe_size=256, time_budget=30)
        assert isinstance(res, InvarianceResult)
        assert (res.accepts_other_sizes, res.step, res.halo, res.global_context) == expect, kind
        json.dumps(res.to_dict())


def test_max_probe_size_bounds_windows(model_cache: Callable[..., Path]) -> None:
    report = run(model_cache("unet", overlap=20), max_probe_size=32)
    m = report.measurements
    assert m["probe"]["window"] == [32, 32]
    assert all(max(p["size"]) <= 32 for p in m["probe"]["sizes"])
    assert m["halo"] == [10, 10] and m["step"] == [4, 4]


def test_probe_window_too_small_for_the_halo_is_not_an_error(model_cache: Callable[..., Path]) -> None:
    """dilated (halo 15) probed in 16-pixel windows of a 64-pixel tile: not measurable, not global."""
    report = run(model_cache("dilated", overlap=30), max_probe_size=24)
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["probe"]["window"] == [16, 16] and m["halo"] == [None, None] and m["global_context"] is False
    assert "raise --max-probe-size" in message(report, "model.receptive_field.halo")
    # In a 16-pixel window a global statistic cannot be told from a 15-pixel receptive field (neither error falls
    # with distance there): no verdict without evidence, a note instead; at the default size it is caught.
    glob = run(model_cache("global_pool"), max_probe_size=24)
    assert not model_errors(glob) and glob.measurements["global_context"] is False
    assert "raise --max-probe-size" in message(glob, "model.receptive_field.halo")
    assert model_errors(run(model_cache("global_pool"))) == {"model.invariance.equivariance"}


def test_tile_off_the_step_grid_fails(model_cache: Callable[..., Path]) -> None:
    report = run(model_cache("unet", tile=62))
    assert model_errors(report) == {"model.output.runs"}
    assert "fails on its declared tile [62, 62]" in message(report, "model.output.runs")


def test_time_budget_zero_reports_partial(model_cache: Callable[..., Path]) -> None:
    report = run(model_cache("unet", overlap=20), time_budget=0)
    assert not report.errors
    assert report.measurements["probe"]["partial"] is True
    assert "model.invariance.budget" in ids(report, Severity.INFO)


def test_cli_json_carries_measurements(model_cache: Callable[..., Path]) -> None:
    from czregistry.cli import main as cli

    path = model_cache("dilated", overlap=2)
    result = CliRunner().invoke(cli, ["validate", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("["):])[0]
    m = data["measurements"]
    assert m["halo"] == [15, 15] and m["backend"] == "onnxruntime" and m["device"] == "cpu"
    assert {"seam_error", "seam_error_rel", "min_overlap_exact", "step", "timings_s"} <= set(m)
    strict = CliRunner().invoke(cli, ["validate", "--strict", str(path)])
    assert strict.exit_code == 1
    static = CliRunner().invoke(cli, ["validate", "--static", "--json", str(path)])
    static_report = json.loads(static.output[static.output.index("["):])[0]
    assert static.exit_code == 0 and "halo" not in static_report["measurements"]


def test_lazy_registrations_match_the_model_checks() -> None:
    """The default plugin registers model checks by name (so --static never imports NumPy); the names,
    ids and orders must stay those of the real checks."""
    from czregistry.checks import MODEL_CHECKS, model

    assert [(c.id, c.order, c.needs_model) for c in MODEL_CHECKS] == [
        (c.id, c.order, c.needs_model) for c in model.CHECKS  # type: ignore[attr-defined]
    ]
    assert [type(c).__name__ for c in model.CHECKS] == [c.cls for c in MODEL_CHECKS]


# -- classification -----------------------------------------------------------------------------------------
#
# A classifier gives one class vector per image, not an image: OutputShape keeps the schema's [h, w, c] form
# with spatial entries 1 (``[1, 1, classes]``), and the network may return ``[batch, classes]`` (flat) or
# ``[batch, 1, 1, classes]``. Global pooling is how such a network forgets position, so it is no fault here;
# the spatial checks do not apply. Its outputs are class probabilities like a segmentation model's.

CLASSIFIER_TILE = 32


def build_classifier(classes: int, head: str = "softmax") -> Any:
    """Conv + global average pooling + dense: one class vector per image.

    ``head``: "softmax" (valid), "logits" (no softmax: not probabilities), "map" (softmax per pixel, no
    pooling: an image where one vector is due), "keepdims" (pooled with keepdims: ``[batch, 1, 1, classes]``).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    inp = keras.Input((None, None, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    if head == "map":
        out = layers.Conv2D(classes, 1, activation="softmax")(layers.UpSampling2D(2)(x))
    elif head == "keepdims":
        x = layers.GlobalAveragePooling2D(keepdims=True)(x)
        out = layers.Conv2D(classes, 1, activation="softmax")(x)
    else:
        x = layers.GlobalAveragePooling2D()(x)
        out = layers.Dense(classes, activation="softmax" if head == "softmax" else None)(x)
    return keras.Model(inp, out, name=f"classifier_{head}_{classes}")


def classifier_metadata(classes: int, type_: str = "MultiClassClassification", **overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "FormatVersion": "2.1.0",
        "Id": str(uuid.uuid4()),
        "Type": type_,
        "InputShape": [CLASSIFIER_TILE, CLASSIFIER_TILE, 1],
        "OutputShape": [1, 1, classes],
        "Classes": [f"class{i}" for i in range(classes)],
        "ModelName": "test-classifier",
    }
    meta.update(overrides)
    return meta


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``classifiers(head, fmt, classes=3, **metadata)`` -> a .czann of a real Keras classifier (built once)."""
    from tests.models import export_onnx, export_savedmodel_zip

    root = tmp_path_factory.mktemp("classifiers")
    exports: dict[tuple[str, int, str], bytes] = {}

    def get(head: str = "softmax", fmt: str = "onnx", classes: int = 3, model_classes: int | None = None,
            **meta: Any) -> Path:
        key = (head, model_classes or classes, fmt)
        if key not in exports:
            model = build_classifier(key[1], head)
            exports[key] = export_onnx(model) if fmt == "onnx" else export_savedmodel_zip(model, root)
        return write_package(root / f"{head}-{fmt}-{uuid.uuid4().hex[:8]}.czann", classifier_metadata(classes, **meta),
                             exports[key])

    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_classifier_with_global_pooling_is_valid(classifiers: Callable[..., Path], fmt: str) -> None:
    report = run(classifiers("softmax", fmt))
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["signature"]["outputs"][0]["shape"][-1] == 3
    assert m["output"]["shape"] == [3]
    assert m["output"]["softmax_sum_error"] < 1e-5 and m["output"]["determinism_error"] == 0
    # no spatial verdicts for a classifier: global pooling is not an equivariance error here
    assert "global_context" not in m and "halo" not in m
    assert "not an image-to-image model" in message(report, "model.invariance")
    assert "not an image-to-image model" in message(report, "model.receptive_field")


def test_single_class_classifier_and_keepdims_output_are_valid(classifiers: Callable[..., Path]) -> None:
    report = run(classifiers("softmax", classes=2, type_="SingleClassClassification"))
    assert report.valid and not report.warnings, report.to_json()
    report = run(classifiers("keepdims"))  # [batch, 1, 1, classes] matches OutputShape [1, 1, classes] exactly
    assert report.valid and not report.warnings, report.to_json()
    assert report.measurements["output"]["shape"] == [1, 1, 3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_classifier_logits_are_not_probabilities(classifiers: Callable[..., Path], fmt: str) -> None:
    report = run(classifiers("logits", fmt))
    assert model_errors(report) == {"model.output.probabilities"}
    text = message(report, "model.output.probabilities")
    assert text.startswith("classification output ") and ("must lie in [0, 1]" in text or "sum to 1" in text)
    assert report.measurements["output"]["softmax_sum_error"] > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_classifier_class_count_mismatch(classifiers: Callable[..., Path], fmt: str) -> None:
    report = run(classifiers("softmax", fmt, classes=4, model_classes=3))  # metadata: 4 classes; model: 3
    assert model_errors(report) == {"model.signature.output_channels", "model.signature.classes"}
    assert "gives 3 output channel(s) but OutputShape[-1] is 4" in message(report, "model.signature.output_channels")
    assert "the metadata names 4 class(es)" in message(report, "model.signature.classes")


def test_classifier_that_returns_an_image_is_an_error(classifiers: Callable[..., Path]) -> None:
    """A per-pixel softmax declared as a classifier: probabilities are fine, but it gives a [32, 32, 3] map
    where OutputShape [1, 1, 3] promises one vector per image."""
    report = run(classifiers("map"))
    assert model_errors(report) == {"model.output.shape"}
    assert message(report, "model.output.shape") == (
        "output shape [32, 32, 3] is not one class vector per image: OutputShape is [1, 1, 3], so the model must "
        "give [batch, 3] or [batch, 1, 1, 3]")


def test_classifier_declared_as_segmentation_is_an_error(classifiers: Callable[..., Path]) -> None:
    """The other way round: the pooled class vector cannot be a segmentation's per-pixel image."""
    report = run(classifiers("softmax", type_="MultiClassSemanticSegmentation", OutputShape=[32, 32, 3],
                             MinOverlap=[0, 0]))
    assert model_errors(report) == {"model.output.shape"}
    assert message(report, "model.output.shape") == "output spatial size [] differs from the input tile [32, 32]"


def test_smoke_reports_a_classifier_as_not_tiled(classifiers: Callable[..., Path]) -> None:
    from czregistry.cli import main as cli

    result = CliRunner().invoke(cli, ["smoke", "--json", str(classifiers("softmax"))])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["valid"] is True
    assert [(f["check"], f["severity"]) for f in data["findings"]] == [("smoke.not_tiled", "info")]
    assert "smoke.tiles" not in data["measurements"]
    assert "one result per tile" in data["findings"][0]["message"]
