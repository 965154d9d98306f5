"""Fuzzing with hypothesis: whatever the metadata or archive bytes, the reader and validator return findings;
they never raise, crash a check, or hang (each example has a deadline)."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from czregistry.checks import ValidateOptions
from czregistry.checks.metadata import validate_conversion_spec
from czregistry.errors import PackageError
from czregistry.package import inspect_package, parse_legacy_xml, write_package
from czregistry.report import Report
from czregistry.validate import validate
from tests.static_packages import ONNX_BYTES

STATIC = ValidateOptions(static=True)
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=10), children, max_size=5), max_leaves=20)
small_ints = st.integers(-3, 300)
KEYS = ["FormatVersion", "Id", "Type", "InputShape", "OutputShape", "MinOverlap", "Classes", "ModelName", "Scaling"]
field_values = (json_values | st.lists(small_ints, max_size=5) | st.sampled_from(["1.0.0", "1.1.0", "2.0.0", "2.1.0",
                                                                                  "2.1.9", "9.0.0"])
                | st.sampled_from(["MultiClassSemanticSegmentation", "Regression", "MultiClassClassification"])
                | st.just(str(uuid.uuid4())) | st.lists(st.floats(allow_nan=False), max_size=4)
                | st.lists(st.text(max_size=3), max_size=4))
metadata_dicts = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), field_values, max_size=10)


def assert_only_findings(report: Report) -> None:
    assert isinstance(report, Report)
    assert not [f for f in report.findings if f.check == "plugin.check_crashed"], report.findings
    json.dumps(report.to_dict())


@FUZZ
@given(meta=metadata_dicts)
def test_fuzz_czann_metadata(tmp_path: Path, meta: dict[str, Any]) -> None:
    path = write_package(tmp_path / "fuzz.czann", meta, ONNX_BYTES)
    assert_only_findings(validate(path, STATIC))


@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_raw_metadata_bytes(tmp_path: Path, raw: bytes) -> None:
    path = write_package(tmp_path / "raw.czann", raw, ONNX_BYTES)
    assert_only_findings(validate(path, STATIC))


@FUZZ
@given(spec=json_values | st.dictionaries(st.sampled_from(["ModelMetadata", "ModelPath", "BorderSize", "PixelType",
                                                           "Classes", "ColorHandling"]),
                                          field_values | metadata_dicts, max_size=6))
def test_fuzz_conversion_spec(spec: Any) -> None:
    for finding in validate_conversion_spec(spec):
        assert finding.check.startswith(("conversion_spec.", "metadata."))


_XML_PARTS = st.sampled_from(['<Model Version="3.1.0">', "</Model>", "<Id>", "</Id>", "<Channels>", "</Channels>",
                              '<Item PixelType="Gray8"/>', "<TrainingClasses>", "</TrainingClasses>", "<Item>",
                              "</Item>", "<Name>x</Name>", "<LabelValue>1</LabelValue>", "<BorderSize>4</BorderSize>",
                              "<!DOCTYPE x>", "&amp;", "<![CDATA[x]]>", "<?pi x?>", "text", "<a b='1'/>"])


@FUZZ
@given(xml=st.lists(_XML_PARTS, max_size=20).map("".join) | st.text(max_size=200))
def test_fuzz_legacy_xml(tmp_path: Path, xml: str) -> None:
    try:
        parsed = parse_legacy_xml(xml.encode())
    except PackageError:
        return
    assert isinstance(parsed, dict)


def _valid_zip_bytes(tmp_path: Path) -> bytes:
    """Deterministic (fixed Id, reproducible writer), so hypothesis sees the same base every time."""
    meta = {"FormatVersion": "2.1.0", "Id": "0f8fad5b-d9cb-469f-a165-70867728950e", "Type": "Regression",
            "InputShape": [32, 32, 1], "OutputShape": [32, 32, 1], "MinOverlap": [8, 8]}
    return write_package(tmp_path / "base.czann", meta, ONNX_BYTES * 4, license_text="MIT").read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_archive_bytes(tmp_path: Path, data: st.DataObject) -> None:
    base = bytearray(_valid_zip_bytes(tmp_path))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=8))
    for pos, value in edits:
        base[pos] = value
    cut = data.draw(st.integers(0, len(base)))
    blob = bytes(base[:cut]) if data.draw(st.booleans()) else bytes(base)
    path = tmp_path / "mutated.czann"
    path.write_bytes(blob)
    package, findings = inspect_package(path)
    assert package is not None or findings
    assert_only_findings(validate(path, STATIC))


@FUZZ
@given(blob=st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "blob.czann"
    path.write_bytes(blob)
    assert_only_findings(validate(path, STATIC))


@FUZZ
@given(members=st.lists(st.tuples(st.text(min_size=1, max_size=12), st.binary(max_size=50)), max_size=6))
def test_fuzz_member_names(tmp_path: Path, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, content in members:
                zf.writestr(zipfile.ZipInfo(name), content)
    path = tmp_path / "names.czann"
    path.write_bytes(buffer.getvalue())
    assert_only_findings(validate(path, STATIC))
