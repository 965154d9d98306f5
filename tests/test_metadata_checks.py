"""Semantic metadata checks: what the schemas cannot express. Each rule is exercised through the real
validator on a real (static) package, so ids, severities and locations are what users see."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from czregistry.checks import ValidateOptions
from czregistry.package import write_package
from czregistry.report import Report, Severity
from czregistry.selection import registered_checks
from czregistry.validate import validate
from tests.static_packages import ONNX_BYTES, czann_meta, legacy_xml

STATIC = ValidateOptions(static=True)
SEMANTIC_IDS = ["metadata.id_uuid", "metadata.dimensionality", "metadata.spatial_dims", "metadata.classes_count",
                "metadata.class_names", "metadata.min_overlap", "metadata.scaling", "metadata.pixel_types",
                "metadata.label_values", "metadata.privacy", "metadata.compatibility"]


def meta(**overrides: Any) -> dict[str, Any]:
    """A three-class segmentation model (so two-name Classes lists are wrong)."""
    base = {"Type": "MultiClassSemanticSegmentation", "OutputShape": [64, 64, 3], "Classes": ["bg", "a", "b"]}
    return czann_meta(**{**base, **overrides})


def run(tmp_path: Path, metadata: dict[str, Any] | bytes, kind: str = "czann") -> Report:
    path = write_package(tmp_path / ("p.czmodel" if kind == "czmodel" else "p.czann"), metadata, ONNX_BYTES,
                         kind=kind)  # type: ignore[arg-type]
    return validate(path, STATIC)


def found(report: Report, check: str) -> list[tuple[Severity, str | None]]:
    return [(f.severity, f.location) for f in report.findings if f.check == check]


def test_checks_are_registered_in_order_with_stable_ids() -> None:
    ids = [c.id for _, c in registered_checks()
           if c.id.startswith("metadata.")]
    assert ids == ["metadata.schema", *SEMANTIC_IDS]
    assert not any(c.needs_model for _, c in registered_checks() if c.id.startswith("metadata."))


def test_clean_package_has_no_findings(tmp_path: Path) -> None:
    report = run(tmp_path, meta())
    assert report.findings == [] and report.valid
    assert report.schema_version == "2.1.0" and report.format == "czann"


# --- classes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["MultiClassSemanticSegmentation", "MultiClassClassification",
                               "SingleClassInstanceSegmentation"])
def test_classes_count_must_match_output_channels(tmp_path: Path, t: str) -> None:
    report = run(tmp_path, meta(Type=t, Classes=["bg", "a"]))
    assert found(report, "metadata.classes_count") == [(Severity.ERROR, "model.json#/Classes")]
    assert "2 names" in report.findings[0].message and "3 classes" in report.findings[0].message
    assert not report.valid


def test_classes_count_does_not_apply_to_regression(tmp_path: Path) -> None:
    report = run(tmp_path, meta(Type="Regression", Classes=None, OutputShape=[64, 64, 1]))
    assert report.findings == []


def test_missing_classes_is_an_info(tmp_path: Path) -> None:
    report = run(tmp_path, meta(Classes=None))
    assert found(report, "metadata.classes_count") == [(Severity.INFO, "model.json#/Classes")]
    assert report.valid


def test_duplicate_class_names_warn(tmp_path: Path) -> None:
    report = run(tmp_path, meta(Classes=["bg", "Cell", "cell "]))
    assert found(report, "metadata.class_names") == [(Severity.WARNING, "model.json#/Classes/1")]
    assert report.valid
    report.strict = True
    assert not report.valid


# --- MinOverlap ---------------------------------------------------------------------------------------------


def test_min_overlap_must_be_even(tmp_path: Path) -> None:
    report = run(tmp_path, meta(MinOverlap=[16, 15]))
    assert found(report, "metadata.min_overlap") == [(Severity.ERROR, "model.json#/MinOverlap/1")]
    assert report.findings[0].hint == "use 16 (or 14)"


def test_min_overlap_one_per_spatial_dim(tmp_path: Path) -> None:
    report = run(tmp_path, meta(MinOverlap=[16, 16, 16]))
    assert found(report, "metadata.min_overlap") == [(Severity.ERROR, "model.json#/MinOverlap")]


def test_min_overlap_smaller_than_tile(tmp_path: Path) -> None:
    report = run(tmp_path, meta(InputShape=[16, 64, 64, 1], OutputShape=[16, 64, 64, 3], MinOverlap=[16, 8, 64]))
    assert found(report, "metadata.min_overlap") == [(Severity.ERROR, "model.json#/MinOverlap/0"),
                                                      (Severity.ERROR, "model.json#/MinOverlap/2")]


def test_missing_min_overlap_is_an_info_for_dense_models(tmp_path: Path) -> None:
    assert found(run(tmp_path, meta(MinOverlap=None)), "metadata.min_overlap") == [
        (Severity.INFO, "model.json#/MinOverlap")]


# --- shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["MultiClassSemanticSegmentation", "Regression"])
def test_spatial_dims_must_agree_for_dense_types(tmp_path: Path, t: str) -> None:
    classes = None if t == "Regression" else ["a", "b", "c"]
    report = run(tmp_path, meta(Type=t, OutputShape=[32, 32, 3], Classes=classes))
    assert found(report, "metadata.spatial_dims") == [(Severity.ERROR, "model.json#/OutputShape")]


def test_spatial_dims_do_not_apply_to_classification(tmp_path: Path) -> None:
    report = run(tmp_path, meta(Type="MultiClassClassification", OutputShape=[1, 1, 3], MinOverlap=None))
    assert report.findings == []


def test_dimensionality_2d_vs_3d(tmp_path: Path) -> None:
    report = run(tmp_path, meta(OutputShape=[8, 64, 64, 3]))
    assert found(report, "metadata.dimensionality") == [(Severity.ERROR, "model.json#/OutputShape")]
    assert "2D [h, w, c]" in report.findings[0].message
    assert found(report, "metadata.spatial_dims") == []  # not reported twice


def test_3d_package_is_clean(tmp_path: Path) -> None:
    report = run(tmp_path, meta(InputShape=[16, 64, 64, 1], OutputShape=[16, 64, 64, 3], MinOverlap=[4, 16, 16],
                                Scaling=[1e-7, 1e-7, 4e-7]))
    assert report.findings == []


# --- Id -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["not-a-uuid", "12345678-1234-1234-1234-1234567890", "{" + str(uuid.uuid4()) + "}"])
def test_id_must_be_a_uuid(tmp_path: Path, value: str) -> None:
    assert found(run(tmp_path, meta(Id=value)), "metadata.id_uuid") == [(Severity.ERROR, "model.json#/Id")]


# --- Scaling ------------------------------------------------------------------------------------------------


def test_scaling_in_micrometres_is_flagged(tmp_path: Path) -> None:
    report = run(tmp_path, meta(Scaling=[0.22, 0.22]))
    assert found(report, "metadata.scaling") == [(Severity.WARNING, "model.json#/Scaling/0"),
                                                  (Severity.WARNING, "model.json#/Scaling/1")]
    assert report.findings[0].hint == "if 0.22 is in micrometres, write 2.2e-07"


def test_scaling_z_only_for_3d(tmp_path: Path) -> None:
    assert found(run(tmp_path, meta(Scaling=[1e-7, 1e-7, 1e-7])), "metadata.scaling") == [
        (Severity.WARNING, "model.json#/Scaling")]
    report = run(tmp_path, meta(InputShape=[16, 64, 64, 1], OutputShape=[16, 64, 64, 3], MinOverlap=[4, 16, 16],
                                Scaling=[1e-7, 1e-7]))
    assert found(report, "metadata.scaling") == [(Severity.WARNING, "model.json#/Scaling")]


def test_scaling_version_fit_without_format_version(tmp_path: Path) -> None:
    """Three Scaling values need 2.x: a 1.x file (no FormatVersion) with three is an error."""
    report = run(tmp_path, meta(FormatVersion=None, Scaling=[1e-7, 1e-7, 1e-7]))
    assert report.schema_version == "1.0.0"
    assert (Severity.ERROR, "model.json#/Scaling") in found(report, "metadata.scaling")
    assert not report.valid


def test_1_1_0_scaling_is_clean(tmp_path: Path) -> None:
    report = run(tmp_path, meta(FormatVersion=None, Scaling=[1e-7, 1e-7]))
    assert report.schema_version == "1.1.0" and report.valid
    assert [f.check for f in report.findings] == ["metadata.format_version"]


# --- legacy -------------------------------------------------------------------------------------------------


def legacy(version: str = "3.1.0", channels: tuple[str, ...] = ("Gray8",), labels: tuple[int, ...] = (1, 2),
           model_id: str | None = None, names: tuple[str, ...] = ("bg", "nucleus")) -> bytes:
    return legacy_xml(version, model_id, pixel_types=channels, classes=tuple(zip(names, labels)),
                      color_handling="SplitRgb")


def test_legacy_pixel_types_sum_to_channels(tmp_path: Path) -> None:
    report = run(tmp_path, legacy(channels=("Gray8", "Bgr24")), kind="czmodel")
    assert report.valid and report.schema_version == "3.1.0"
    [info] = [f for f in report.findings if f.check == "metadata.pixel_types"]
    assert info.message == "input channels: Gray8 + Bgr24 = 4" and info.severity is Severity.INFO


def test_legacy_3_0_0_allows_one_channel_group(tmp_path: Path) -> None:
    report = run(tmp_path, legacy("3.0.0", channels=("Gray8", "Bgr24")), kind="czmodel")
    assert [f.check for f in report.errors] == ["metadata.schema"]
    assert (report.errors[0].location or "").endswith(".xml#/Channels")


def test_legacy_complex_pixel_type_warns(tmp_path: Path) -> None:
    report = run(tmp_path, legacy(channels=("Gray64ComplexFloat",)), kind="czmodel")
    assert (Severity.WARNING, report.findings[-1].location) in found(report, "metadata.pixel_types")


def test_legacy_label_values_are_1_to_n(tmp_path: Path) -> None:
    report = run(tmp_path, legacy(labels=(1, 1)), kind="czmodel")
    [err] = report.errors
    assert err.check == "metadata.label_values" and "1 is used twice" in err.message


def test_legacy_id_must_name_the_members(tmp_path: Path) -> None:
    model_id = str(uuid.uuid4())
    path = write_package(tmp_path / "m.czmodel", legacy(model_id=model_id), ONNX_BYTES, kind="czmodel")
    report = validate(path, STATIC)
    assert report.valid
    import zipfile

    other = str(uuid.uuid4())
    renamed = tmp_path / "renamed.czmodel"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(renamed, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace(model_id, other), src.read(info))
    report = validate(renamed, STATIC)
    assert [(f.check, f.severity) for f in report.errors] == [("metadata.id_uuid", Severity.ERROR)]


def test_legacy_duplicate_class_names_warn(tmp_path: Path) -> None:
    report = run(tmp_path, legacy(names=("cell", "cell")), kind="czmodel")
    assert [f.check for f in report.warnings] == ["metadata.class_names"]


# --- robustness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"InputShape": "64x64", "OutputShape": None, "MinOverlap": "x", "Classes": 3, "Scaling": "1"},
    {"InputShape": [], "OutputShape": [True, False], "MinOverlap": [None], "Classes": [None, 1], "Scaling": [None]},
    {"Type": ["list"], "Id": 5, "InputShape": [-1, 0, 1, 2, 3]},
])
def test_semantic_checks_survive_garbage(tmp_path: Path, bad: dict[str, Any]) -> None:
    report = run(tmp_path, meta(**bad))
    assert not report.valid
    assert not [f for f in report.findings if f.check == "plugin.check_crashed"]


# --- privacy and compatibility (for packages shared with third parties) ----------------------------------------


@pytest.mark.parametrize(("field", "value", "what"), [
    ("ModelName", r"C:\Users\jdoe\models\unet", "a Windows user folder"),
    ("ModelName", "/home/jdoe/exp3/unet.keras", "a home folder"),
    ("ModelName", "/Users/jane/Desktop/model", "a home folder"),
    ("ModelName", r"\\labserver\share\models", "a network share"),
    ("Classes", ["background", "ask jane.doe@lab.example"], "an e-mail address"),
])
def test_privacy_lint_names_the_field(tmp_path: Path, field: str, value: Any, what: str) -> None:
    meta_ = meta(**{field: value}) if field != "Classes" else meta(Classes=["a", *value], OutputShape=[64, 64, 3])
    report = run(tmp_path, meta_)
    hits = [f for f in report.findings if f.check == "metadata.privacy"]
    assert len(hits) == 1 and hits[0].severity is Severity.WARNING, report.to_json()
    assert what in hits[0].message and hits[0].location is not None and field in hits[0].location
    assert report.valid  # a warning: the package works, it just says too much


def test_privacy_lint_catches_this_machines_user_name_and_spares_ordinary_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "mkowalski")
    leaked = run(tmp_path, meta(ModelName="unet trained by mkowalski"))
    assert [f.check for f in leaked.findings] == ["metadata.privacy"]
    assert "user name 'mkowalski'" in leaked.findings[0].message
    for clean in ("nuclei v2 (lab/2024)", "U-Net 256/128", "cells @ 40x", "home-made denoiser"):
        assert run(tmp_path, meta(ModelName=clean)).findings == [], clean


def _onnx(opset: int) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(("kind", "opset", "warns"), [("czann", 18, False), ("czann", 21, True),
                                                     ("czmodel", 12, False), ("czmodel", 18, True)])
def test_compatibility_facts_and_opset_newer_than_the_target(tmp_path: Path, kind: str, opset: int,
                                                             warns: bool) -> None:
    metadata = meta() if kind == "czann" else legacy_xml()
    path = write_package(tmp_path / f"p.{kind}", metadata, _onnx(opset), kind=kind)  # type: ignore[arg-type]
    report = validate(path, STATIC)
    facts = report.measurements["compatibility"]
    assert facts["onnx_opset"] == opset and facts["onnx_ir_version"] == 8
    assert ("3.13" in facts["min_host"]) is (kind == "czann")
    opset_findings = [f for f in report.findings if f.check == "metadata.compatibility.opset"]
    assert bool(opset_findings) is warns, report.to_json()
    if warns:
        assert f"opset {opset}" in opset_findings[0].message and opset_findings[0].severity is Severity.WARNING
