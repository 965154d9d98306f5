"""``czreg validate``: the CLI contract of issue 2 (exact exit codes, --json shape, --report, --strict,
no traceback for any input), and that --static stays light (no TensorFlow / ONNX Runtime imported)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from czregistry.cli import main
from czregistry.package import write_package
from tests.static_packages import ONNX_BYTES
from tests.static_packages import czann_meta as meta

REPORT_KEYS = {"report_version", "path", "valid", "strict", "format", "schema_version", "sha256", "findings",
               "measurements"}
FINDING_KEYS = {"check", "severity", "message", "location", "hint"}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_package(tmp_path / "good.czann", meta(), ONNX_BYTES)


@pytest.fixture
def warned(tmp_path: Path) -> Path:
    """Valid, but with a warning (duplicate class names)."""
    return write_package(tmp_path / "warned.czann", meta(Classes=["cell", "cell"]), ONNX_BYTES)


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    return write_package(tmp_path / "bad.czann", meta(MinOverlap=[15, 16]), ONNX_BYTES)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["validate", *(str(a) for a in args)])


def test_valid_package_exits_0(good: Path) -> None:
    result = invoke(good, "--static")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"{good}: VALID  [czann, schema 2.1.0]"


def test_invalid_package_exits_1(bad: Path) -> None:
    result = invoke(bad, "--static")
    assert result.exit_code == 1
    assert f"{bad}: INVALID" in result.output
    assert "ERROR   metadata.min_overlap: MinOverlap[0] is 15" in result.output
    assert "(model.json#/MinOverlap/0)" in result.output


def test_json_shape(bad: Path) -> None:
    result = invoke(bad, "--static", "--json")
    assert result.exit_code == 1
    reports = json.loads(result.output)
    assert isinstance(reports, list) and len(reports) == 1  # one shape for any number of packages
    data = reports[0]
    assert set(data) == REPORT_KEYS
    assert data["path"] == str(bad) and data["valid"] is False and data["format"] == "czann"
    assert data["schema_version"] == "2.1.0" and data["report_version"] == "1"
    assert data["sha256"] == hashlib.sha256(bad.read_bytes()).hexdigest()
    assert all(set(f) == FINDING_KEYS for f in data["findings"])
    assert {"check": "metadata.min_overlap", "severity": "error", "location": "model.json#/MinOverlap/0"}.items() \
        <= data["findings"][0].items()


def test_json_for_several_paths_is_a_list(good: Path, bad: Path) -> None:
    result = invoke(good, bad, "--static", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert [(d["path"], d["valid"]) for d in data] == [(str(good), True), (str(bad), False)]


def test_several_paths_all_valid_exit_0(good: Path, warned: Path) -> None:
    result = invoke(good, warned, "--static")
    assert result.exit_code == 0
    assert result.output.count(": VALID") == 2


def test_strict_makes_warnings_errors(warned: Path) -> None:
    assert invoke(warned, "--static").exit_code == 0
    result = invoke(warned, "--static", "--strict", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)[0]
    assert data["valid"] is False and data["strict"] is True
    assert invoke(warned, "--static", "--strict").output.splitlines()[0].endswith(
        "INVALID (warnings count as errors with --strict)  [czann, schema 2.1.0]")


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_report_file_with_sha256(bad: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "reports" / f"report{suffix}"
    result = invoke(bad, "--static", "--report", out)
    assert result.exit_code == 1
    text = out.read_text()
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in text
    assert "metadata.min_overlap" in text and "INVALID" in text
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]


def test_report_html_escapes_package_content(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "x.czann", meta(Id="<script>alert(1)</script>"), ONNX_BYTES)
    out = tmp_path / "r.html"
    invoke(pkg, "--static", "--report", out)
    assert "<script>" not in out.read_text()


def test_report_with_json_still_prints_json(good: Path, tmp_path: Path) -> None:
    result = invoke(good, "--static", "--json", "--report", tmp_path / "r.md")
    assert result.exit_code == 0 and json.loads(result.output)[0]["valid"] is True


# --- usage errors: exit 2, one clear line, no traceback -----------------------------------------------------


def assert_usage_error(result: Result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert_usage_error(invoke(tmp_path / "nope.czann", "--static"), f"no such package file: {tmp_path / 'nope.czann'}")


def test_missing_among_several_exits_2_before_validating(good: Path, tmp_path: Path) -> None:
    result = invoke(good, tmp_path / "nope.czann", "--static")
    assert_usage_error(result, "no such package file")
    assert "VALID" not in result.output


def test_directory_exits_2(tmp_path: Path) -> None:
    assert_usage_error(invoke(tmp_path, "--static"), f"{tmp_path} is a folder, not a package file")


def test_no_paths_exits_2() -> None:
    assert_usage_error(invoke("--static"), "Missing argument")


def test_bad_option_exits_2(good: Path) -> None:
    assert_usage_error(invoke(good, "--bogus"), "No such option")


def test_bad_report_suffix_exits_2(good: Path, tmp_path: Path) -> None:
    assert_usage_error(invoke(good, "--report", tmp_path / "r.pdf"), "must end in .html or .md")
    assert not (tmp_path / "r.pdf").exists()


def test_report_with_several_paths_exits_2(good: Path, bad: Path, tmp_path: Path) -> None:
    assert_usage_error(invoke(good, bad, "--report", tmp_path / "r.md"), "one package at a time")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_exits_2(good: Path) -> None:
    good.chmod(0)
    try:
        assert_usage_error(invoke(good, "--static"), "cannot read")
    finally:
        good.chmod(0o644)


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04" + b"\x00" * 100, b"PK\x05\x06" + b"\xff" * 18,
                                     os.urandom(4096)])
def test_garbage_input_is_a_finding_not_a_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.czann"
    path.write_bytes(content)
    result = invoke(path, "--static", "--json")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    data = json.loads(result.output)[0]
    assert data["valid"] is False and data["format"] is None
    assert data["findings"][0]["check"] in {"archive.not_zip", "archive.truncated", "archive.corrupt"}


# --- start-up cost ------------------------------------------------------------------------------------------


def test_static_validate_does_not_import_heavy_libraries(good: Path) -> None:
    code = (
        "import sys\n"
        "from czregistry.cli import main\n"
        "try:\n"
        "    main(['validate', '--static', '--json', sys.argv[1]])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'onnxruntime', 'onnx', 'keras', 'tf2onnx', 'sqlalchemy', 'tifffile',"
        " 'zarr') if m in sys.modules)\n"
        "print('HEAVY', heavy, code)\n"
    )
    env = {**os.environ, "CZREG_PLUGINS": "onnxruntime,tensorflow,example"}
    out = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, env=env,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY [] 0"
