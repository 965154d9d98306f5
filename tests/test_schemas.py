"""The bundled schemas: every version accepts valid files and rejects invalid ones at the right location;
schema selection by FormatVersion / XML Version; loading from a wheel layout; ``czreg schemas``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators

from czregistry._minischema import compile_schema
from czregistry.checks.metadata import validate_conversion_spec
from czregistry.cli import main
from czregistry.errors import SchemaError
from czregistry.report import Severity
from czregistry.schemas import (
    list_schemas,
    load_schema,
    schema_names,
    schema_text,
    select_schema,
    validate_against,
    validate_metadata,
)

REPO = Path(__file__).resolve().parent.parent
ALL = ["conversion-spec-czann", "conversion-spec-legacy", "czann-1.0.0", "czann-1.1.0", "czann-2.0.0", "czann-2.1.0",
       "czmodel-3.0.0", "czmodel-3.1.0"]


def czann(version: str | None, **overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "Id": str(uuid.uuid4()), "Type": "MultiClassSemanticSegmentation", "InputShape": [128, 128, 3],
        "OutputShape": [128, 128, 3], "MinOverlap": [32, 32], "Classes": ["bg", "nucleus", "membrane"],
        "ModelName": "cells",
    }
    if version is not None:
        meta["FormatVersion"] = version
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def czmodel(version: str, **overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "Version": version, "Id": str(uuid.uuid4()), "ModelName": "nuclei", "Status": "Trained",
        "FeatureExtractor": "DeepNeuralNetwork", "Postprocessing": "", "ColorHandling": "SplitRgb",
        "Channels": [{"PixelType": "Bgr24"}],
        "TrainingClasses": [{"Name": "bg", "LabelValue": 1, "colR": 0, "colG": 0, "colB": 0},
                            {"Name": "nucleus", "LabelValue": 2, "colR": 255, "colG": 0, "colB": 0}],
        "BorderSize": 8,
    }
    meta.update(overrides)
    return meta


VALID_CZANN: dict[str, dict[str, Any]] = {
    "1.0.0": czann(None),
    "1.1.0": czann(None, Scaling=[2.2e-7, 2.2e-7]),
    "2.0.0": czann("2.0.0", Scaling=[1e-7, 1e-7]),
    "2.1.0": czann("2.1.0", InputShape=[16, 64, 64, 1], OutputShape=[16, 64, 64, 3], MinOverlap=[4, 16, 16],
                   Scaling=[1e-7, 1e-7, 5e-7], Type="MultiClassSemanticSegmentation"),
}


def errors(findings: list[Any]) -> list[tuple[str, str | None]]:
    return [(f.check, f.location) for f in findings if f.severity is Severity.ERROR]


# --- the schema files themselves ----------------------------------------------------------------------------


def test_all_schemas_are_listed() -> None:
    assert list(schema_names()) == ALL
    assert [s.name for s in list_schemas()] == ALL


@pytest.mark.parametrize("name", ALL)
def test_schema_files_are_valid_2020_12_with_id_and_title(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:czregistry:schema:{name}"
    assert schema["title"] and schema["description"]
    assert json.loads(schema_text(f"{name}.json")) == schema
    assert (REPO / "schemas" / f"{name}.json").read_text() == schema_text(name)


def test_unknown_schema_name() -> None:
    with pytest.raises(SchemaError, match=r"unknown schema 'czann-9\.9\.9'"):
        load_schema("czann-9.9.9")


# --- CZANN versions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted(VALID_CZANN))
def test_valid_czann_in_every_version(version: str) -> None:
    assert validate_against(f"czann-{version}", VALID_CZANN[version], "model.json") == []
    used, findings = validate_metadata("czann", VALID_CZANN[version], "model.json")
    assert used == version
    assert [f.severity for f in findings] in ([], [Severity.INFO])


@pytest.mark.parametrize(("version", "change", "location"), [
    ("1.0.0", {"Id": None}, "model.json#/Id"),
    ("1.0.0", {"InputShape": [64, 64]}, "model.json#/InputShape"),
    ("1.1.0", {"Type": "Segmentation"}, "model.json#/Type"),
    ("1.1.0", {"MinOverlap": [16, "16"]}, "model.json#/MinOverlap/1"),
    ("2.0.0", {"FormatVersion": None}, "model.json#/FormatVersion"),
    ("2.0.0", {"Classes": ["only-one"]}, "model.json#/Classes"),
    ("2.1.0", {"OutputShape": [128, 128, 0]}, "model.json#/OutputShape/2"),
    ("2.1.0", {"InputShape": [128.0, 128, 3]}, "model.json#/InputShape/0"),
    ("2.1.0", {"Scaling": [1e-7, 1e-7, 1e-7, 1e-7]}, "model.json#/Scaling"),
    ("2.1.0", {"Scaling": [1e-7, -1e-7]}, "model.json#/Scaling/1"),
    ("2.1.0", {"Classes": ["a", 2, "c"]}, "model.json#/Classes/1"),
    ("2.1.0", {"ModelName": True}, "model.json#/ModelName"),
])
def test_invalid_czann_fails_at_the_right_location(version: str, change: dict[str, Any], location: str) -> None:
    base = dict(VALID_CZANN[version])
    base.update(change)
    doc = {k: v for k, v in base.items() if v is not None}
    assert (("metadata.schema", location)) in errors(validate_against(f"czann-{version}", doc, "model.json"))


def test_1_1_0_scaling_has_exactly_two_values() -> None:
    doc = dict(VALID_CZANN["1.1.0"], Scaling=[1e-7, 1e-7, 1e-7])
    assert errors(validate_against("czann-1.1.0", doc, "model.json")) == [("metadata.schema", "model.json#/Scaling")]


def test_unknown_fields_are_warnings_with_a_suggestion() -> None:
    doc = dict(VALID_CZANN["2.1.0"], Clases=["a"])
    findings = validate_against("czann-2.1.0", doc, "model.json")
    assert [(f.check, f.severity, f.location) for f in findings] == [
        ("metadata.unknown_field", Severity.WARNING, "model.json#/Clases")]
    assert findings[0].hint == "did you mean 'Classes'?"


def test_json_pointer_escapes_special_keys() -> None:
    doc = dict(VALID_CZANN["2.1.0"], **{"a/b~c": 1})
    assert validate_against("czann-2.1.0", doc, "model.json")[0].location == "model.json#/a~1b~0c"


def test_schema_findings_are_capped() -> None:
    doc = dict(VALID_CZANN["2.1.0"], Classes=[1] * 10_000)
    findings = validate_against("czann-2.1.0", doc, "model.json")
    assert len(findings) == 51 and findings[-1].severity is Severity.INFO


def test_huge_values_are_shortened_in_messages() -> None:
    findings = validate_against("czann-2.1.0", dict(VALID_CZANN["2.1.0"], Type="x" * 100_000), "model.json")
    assert len(findings[0].message) < 400


# --- selection ----------------------------------------------------------------------------------------------


def test_no_format_version_matches_1_0_0_with_an_info() -> None:
    version, findings = validate_metadata("czann", VALID_CZANN["1.0.0"], "model.json")
    assert version == "1.0.0"
    assert [(f.check, f.severity) for f in findings] == [("metadata.format_version", Severity.INFO)]
    assert "matches CZANN 1.0.0" in findings[0].message


def test_no_format_version_with_scaling_matches_1_1_0() -> None:
    version, findings = validate_metadata("czann", VALID_CZANN["1.1.0"], "model.json")
    assert version == "1.1.0" and "matches CZANN 1.1.0" in findings[0].message


def test_no_format_version_and_no_exact_match_reports_the_closest() -> None:
    version, findings = validate_metadata("czann", czann(None, Scaling=[1e-7, 1e-7], Id=None), "model.json")
    assert version == "1.1.0"
    assert "closest" in findings[0].message
    assert errors(findings) == [("metadata.schema", "model.json#/Id")]


@pytest.mark.parametrize(("value", "schema"), [("2.0.0", "czann-2.0.0"), ("2.1.0", "czann-2.1.0"),
                                               ("1.1.0", "czann-1.1.0"), ("2.1.7", "czann-2.1.0")])
def test_format_version_selects_the_schema(value: str, schema: str) -> None:
    selection = select_schema("czann", {"FormatVersion": value}, "model.json")
    assert selection.candidates == (schema,) and selection.declared


def test_patch_version_is_checked_with_its_minor_schema() -> None:
    version, findings = validate_metadata("czann", czann("2.1.7"), "model.json")
    assert version == "2.1.0"
    assert [(f.check, f.severity) for f in findings] == [("metadata.format_version", Severity.INFO)]


@pytest.mark.parametrize(("value", "words"), [
    ("3.0.0", "newer than this czregistry understands"), ("2.2.0", "newer than"),
    ("1.5.0", "not a known czann metadata version"), ("0.9.0", "not a known"),
    ("2.1", "not a version like"), (2.1, "not a version like"), ("latest", "not a version like"),
])
def test_unknown_or_malformed_format_version_is_a_clear_error(value: Any, words: str) -> None:
    version, findings = validate_metadata("czann", czann("2.1.0", FormatVersion=value), "model.json")
    assert version is None
    assert errors(findings) == [("metadata.format_version", "model.json#/FormatVersion")]
    assert words in findings[0].message


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0"])
def test_valid_czmodel_in_every_version(version: str) -> None:
    used, findings = validate_metadata("czmodel", czmodel(version), "x.xml")
    assert used == version and findings == []


@pytest.mark.parametrize(("version", "change", "location"), [
    ("3.0.0", {"Channels": [{"PixelType": "Gray8"}, {"PixelType": "Bgr24"}]}, "x.xml#/Channels"),
    ("3.0.0", {"BorderSize": "16"}, "x.xml#/BorderSize"),
    ("3.1.0", {"Channels": [{"PixelType": "Gray8"}, {"PixelType": "Rgb24"}]}, "x.xml#/Channels/1/PixelType"),
    ("3.1.0", {"ColorHandling": "KeepRgb"}, "x.xml#/ColorHandling"),
    ("3.1.0", {"Status": "Untrained"}, "x.xml#/Status"),
    ("3.1.0", {"TrainingClasses": [{"Name": "bg", "LabelValue": 0}]}, "x.xml#/TrainingClasses/0/LabelValue"),
    ("3.1.0", {"TrainingClasses": [{"Name": "bg", "LabelValue": 1, "colR": 300}]},
     "x.xml#/TrainingClasses/0/colR"),
])
def test_invalid_czmodel_fails_at_the_right_location(version: str, change: dict[str, Any], location: str) -> None:
    _, findings = validate_metadata("czmodel", czmodel(version, **change), "x.xml")
    assert ("metadata.schema", location) in errors(findings)


def test_multiple_channels_are_fine_in_3_1_0() -> None:
    _, findings = validate_metadata("czmodel", czmodel("3.1.0", Channels=[{"PixelType": "Gray8"},
                                                                          {"PixelType": "Bgr24"}]), "x.xml")
    assert findings == []


def test_czmodel_unknown_and_missing_version() -> None:
    _, findings = validate_metadata("czmodel", czmodel("4.0.0"), "x.xml")
    assert errors(findings) == [("metadata.format_version", "x.xml#/Version")]
    meta = czmodel("3.1.0")
    del meta["Version"]
    version, findings = validate_metadata("czmodel", meta, "x.xml")
    assert version is None and errors(findings) == [("metadata.format_version", "x.xml#/Version")]


# --- conversion specs ---------------------------------------------------------------------------------------


def test_conversion_specs_valid_in_both_styles() -> None:
    legacy = {"BorderSize": 16, "ColorHandling": "ConvertToMonochrome", "PixelType": ["Gray8", "Bgr24"],
              "Classes": ["bg", "fg"], "ModelPath": "saved_model", "TestImageFile": "t.png", "LicenseFile": None}
    assert validate_conversion_spec(legacy) == []
    assert validate_conversion_spec(dict(legacy, PixelType="Gray16")) == []
    new = {"ModelMetadata": {"Type": "SingleClassSemanticSegmentation", "Classes": ["bg", "fg"],
                             "InputShape": [256, 256, 1], "OutputShape": [256, 256, 2], "ModelName": "m",
                             "MinOverlap": [32, 32], "Scaling": [1e-7, 1e-7]},
           "ModelPath": "model.onnx", "LicenseFile": None}
    assert validate_conversion_spec(new) == []


@pytest.mark.parametrize(("spec", "expected"), [
    ([1, 2], ("conversion_spec.schema", "spec.json#")),
    ({"ModelMetadata": {"Type": "Nope"}, "ModelPath": "m"},
     ("conversion_spec.schema", "spec.json#/ModelMetadata/Type")),
    ({"ModelMetadata": {"Type": "Regression"}}, ("conversion_spec.schema", "spec.json#/ModelPath")),
    ({"BorderSize": -1, "ColorHandling": "SplitRgb", "PixelType": "Gray8", "Classes": ["a"], "ModelPath": "m"},
     ("conversion_spec.schema", "spec.json#/BorderSize")),
    ({"BorderSize": 1, "ColorHandling": "SplitRgb", "PixelType": "Gray7", "Classes": ["a"], "ModelPath": "m"},
     ("conversion_spec.schema", "spec.json#/PixelType")),
    ({"ModelMetadata": {"Type": "MultiClassSemanticSegmentation", "Classes": ["a", "b"],
                        "OutputShape": [64, 64, 3], "InputShape": [64, 64, 1]}, "ModelPath": "m"},
     ("metadata.classes_count", "spec.json#/ModelMetadata/Classes")),
    ({"ModelMetadata": {"Type": "Regression", "MinOverlap": [3, 4], "InputShape": [64, 64, 1]}, "ModelPath": "m"},
     ("metadata.min_overlap", "spec.json#/ModelMetadata/MinOverlap/0")),
])
def test_invalid_conversion_specs(spec: Any, expected: tuple[str, str]) -> None:
    assert expected in errors(validate_conversion_spec(spec, source="spec.json"))


# --- the built-in validator agrees with jsonschema ---------------------------------------------------------------


def _reference_validator(name: str) -> Any:
    """jsonschema itself, with the one deliberate difference of ours: floats are never integers."""
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _c, v: isinstance(v, int) and not isinstance(v, bool))
    return validators.extend(Draft202012Validator, type_checker=checker)(load_schema(name))


def _issues(errors: Any) -> list[tuple[str, str]]:
    return sorted((json.dumps(list(e.absolute_path)), e.validator) for e in errors)


_leaf = (st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False, allow_infinity=False)
         | st.sampled_from(["", "x", "2.1.0", "3.0.0", "Gray8", "Bgr24", "Trained", "SplitRgb", "Regression",
                            "DeepNeuralNetwork", "MultiClassSemanticSegmentation"]))
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["PixelType", "Name", "LabelValue", "colR", "Type", "x"]), c, max_size=3), max_leaves=12)
_SAMPLES = {"czann": czann("2.1.0"), "czmodel": czmodel("3.1.0"),
            "conversion-spec": {"ModelMetadata": {"Type": "Regression"}, "ModelPath": "m", "BorderSize": 3,
                                "PixelType": ["Gray8"], "Classes": ["a"], "ColorHandling": "SplitRgb"}}


@settings(max_examples=150, deadline=None, database=None)
@given(name=st.sampled_from(ALL), data=st.data())
def test_builtin_validator_agrees_with_jsonschema(name: str, data: st.DataObject) -> None:
    base = dict(_SAMPLES[name.rsplit("-", 1)[0] if name.startswith("czmodel") or name.startswith("czann")
                         else "conversion-spec"])
    for key in data.draw(st.lists(st.sampled_from([*base, "Extra"]), max_size=3)):
        if data.draw(st.booleans()):
            base.pop(key, None)
        else:
            base[key] = data.draw(_json)
    doc = data.draw(st.just(base) | _json)
    ours = _issues(compile_schema(load_schema(name)).iter_errors(doc))
    assert ours == _issues(_reference_validator(name).iter_errors(doc))


@pytest.mark.parametrize("schema", [{"$ref": "#/x"}, {"properties": {"a": {"format": "uuid"}}},
                                    {"additionalProperties": {"type": "string"}}, {"items": [1]}])
def test_builtin_validator_refuses_keywords_it_does_not_implement(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"unsupported|only object|true or false"):
        compile_schema(schema)


def test_static_validation_does_not_import_jsonschema(tmp_path: Path) -> None:
    code = ("import sys\nfrom czregistry.schemas import validate_metadata\n"
            "validate_metadata('czann', {'Id': 'x'}, 'model.json')\nprint('jsonschema' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "False", out.stderr


# --- shipping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zipped", [False, True])
def test_schemas_load_from_a_wheel_layout(tmp_path: Path, zipped: bool) -> None:
    """A wheel holds czregistry/_schemas (pyproject force-include) and no repo-root schemas/: copy that
    layout (optionally zipped, as zipimport sees a wheel) and load the schemas in a bare interpreter."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "czregistry", site / "czregistry", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "schemas", site / "czregistry" / "_schemas")
    root = site
    if zipped:
        root = tmp_path / "czregistry-0-py3-none-any.whl"
        with zipfile.ZipFile(root, "w") as zf:
            for p in sorted(site.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(site).as_posix())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import czregistry.schemas as s; "
            "assert sys.argv[1] in s.__file__, s.__file__; "
            "print(len(s.list_schemas()), s.load_schema('czann-2.1.0')['$id'])")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(root)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "urn:czregistry:schema:czann-2.1.0"]


def test_pyproject_ships_the_schemas() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"schemas" = "czregistry/_schemas"' in text


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_schemas_lists_all() -> None:
    result = CliRunner().invoke(main, ["schemas"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == ALL


def test_cli_schemas_json() -> None:
    result = CliRunner().invoke(main, ["schemas", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [d["name"] for d in data] == ALL
    assert set(data[0]) == {"name", "title", "id", "description"}


@pytest.mark.parametrize("name", ["czann-2.1.0", "czmodel-3.0.0.json"])
def test_cli_schemas_show_prints_the_file(name: str) -> None:
    result = CliRunner().invoke(main, ["schemas", "show", name])
    assert result.exit_code == 0
    assert result.output == (REPO / "schemas" / f"{name.removesuffix('.json')}.json").read_text()


def test_cli_schemas_show_unknown_exits_2() -> None:
    result = CliRunner().invoke(main, ["schemas", "show", "czann-9"])
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == "Error: unknown schema 'czann-9'"
    assert "Traceback" not in result.output
