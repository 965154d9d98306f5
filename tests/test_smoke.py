"""``smoke_test`` and ``czreg smoke`` on real models: seamless ones pass, seamy or non-softmax ones fail."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from czregistry.cli import main
from czregistry.report import Severity
from czregistry.run.smoke import smoke_test, synthetic_image

ModelCache = Callable[..., Path]


def _by_check(report: object) -> dict[str, Severity]:
    return {f.check: f.severity for f in report.findings}  # type: ignore[attr-defined]


#: MinOverlap covering each test model's halo (docs/model-checks.md): smoke tiles at the declared overlap, as ZEN.
SEAMLESS_OVERLAP = {"unet": 20, "dilated": 32, "regression": 20, "unet3d": 8}


@pytest.mark.parametrize("kind", ["unet", "dilated", "regression", "unet3d"])
def test_seamless_models_pass(model_cache: ModelCache, kind: str) -> None:
    report = smoke_test(model_cache(kind, overlap=SEAMLESS_OVERLAP[kind]))
    assert report.valid, report.findings
    m = report.measurements
    assert m["smoke.seam_error"] <= 1e-5
    assert m["smoke.device"] == "cpu" and m["smoke.backend"] == "onnxruntime"
    assert m["smoke.tiles_per_second"] > 0
    assert all(n >= 2 for n in m["smoke.grid"]["tiles"])  # several tiles in each direction
    assert _by_check(report)["smoke.seams"] is Severity.INFO


def test_global_context_fails_with_a_seam_error(model_cache: ModelCache) -> None:
    report = smoke_test(model_cache("global_pool"))
    assert not report.valid
    assert _by_check(report)["smoke.seams"] is Severity.ERROR
    assert report.measurements["smoke.seam_error"] > 1e-4


def test_fixed_size_dense_head_fails(model_cache: ModelCache) -> None:
    report = smoke_test(model_cache("dense_head"))
    assert _by_check(report)["smoke.seams"] is Severity.ERROR


def test_logits_fail_value_semantics(model_cache: ModelCache) -> None:
    report = smoke_test(model_cache("logits"))
    assert _by_check(report)["smoke.value_semantics"] is Severity.ERROR


def test_given_image(model_cache: ModelCache, tmp_path: Path) -> None:
    img = (synthetic_image((150, 170), 1, seed=3)[..., 0] * 255).astype(np.uint8)
    np.save(tmp_path / "img.npy", img)
    report = smoke_test(model_cache("unet", overlap=20), image=tmp_path / "img.npy")
    assert report.valid
    assert report.measurements["smoke.image_shape"] == [150, 170, 1]


def test_classification_is_not_tiled_and_broken_packages_are_reported(model_cache: ModelCache,
                                                                        tmp_path: Path) -> None:
    report = smoke_test(model_cache("unet", Type="MultiClassClassification"))
    assert _by_check(report) == {"smoke.not_tiled": Severity.INFO}
    (tmp_path / "bad.czann").write_bytes(b"not a zip")
    report = smoke_test(tmp_path / "bad.czann")
    assert _by_check(report) == {"smoke.package": Severity.ERROR}


def test_cli_smoke(model_cache: ModelCache) -> None:
    cli = CliRunner()
    res = cli.invoke(main, ["smoke", str(model_cache("unet", overlap=20)), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["valid"] and data["measurements"]["smoke.seam_error"] <= 1e-5
    res = cli.invoke(main, ["smoke", str(model_cache("global_pool"))])
    assert res.exit_code == 1 and "FAIL" in res.stdout and "smoke.seams" in res.stdout
    res = cli.invoke(main, ["smoke", "missing.czann"])
    assert res.exit_code == 2


def test_savedmodel_package_through_its_backend(model_cache: ModelCache) -> None:
    """The runner is backend-agnostic: a SavedModel package runs through the TensorFlow plugin."""
    from czregistry.selection import available_backends

    if "tensorflow" not in available_backends():
        pytest.skip("the TensorFlow backend plugin is not installed")
    report = smoke_test(model_cache("unet", fmt="savedmodel", overlap=20))
    assert report.valid, report.findings
    assert report.measurements["smoke.backend"] == "tensorflow"
    assert report.measurements["smoke.seam_error"] <= 1e-5


# --- fixed-size graphs (issue 12): seams measured between the stitched output and tiles on the cuts ----


def _fixed_size(src_path: Path, dest: Path, size: int) -> Path:
    """The same network with its graph's spatial size fixed (as an exporter with static shapes writes it)."""
    import onnx

    from czregistry.package import open_package, write_package

    src = open_package(src_path)
    model = onnx.load_model_from_string(src.read_model_bytes())
    for t in (*model.graph.input, *model.graph.output):
        for axis in (1, 2):
            t.type.tensor_type.shape.dim[axis].dim_value = size
    return write_package(dest, src.metadata or {}, model.SerializeToString())


def test_fixed_size_model_reports_a_measured_seam_error(model_cache: ModelCache, tmp_path: Path) -> None:
    """A fixed-size copy of the U-Net gives the same verdict and seam error as the dynamic one, which is
    checked against whole-image inference: both tile without seams."""
    dynamic = smoke_test(model_cache("unet", overlap=20))
    fixed = smoke_test(_fixed_size(model_cache("unet", overlap=20), tmp_path / "fixed.czann", 64))
    assert dynamic.valid and fixed.valid, fixed.findings
    assert dynamic.measurements["smoke.seam_error"] <= 1e-5  # tiled == whole image
    assert fixed.measurements["smoke.seam_error"] <= 1e-5
    assert "fixed-size tiles centred on the cuts" in fixed.measurements["smoke.seam_method"]
    assert "smoke.seam_method" not in dynamic.measurements
    seams = next(f for f in fixed.findings if f.check == "smoke.seams")
    assert seams.severity is Severity.INFO and "fixed tile size [64, 64]" in seams.message
    r = CliRunner().invoke(main, ["smoke", str(tmp_path / "fixed.czann")])
    assert r.exit_code == 0, r.output
    assert "seam error n/a" not in r.output and "seam error 0.0 (between tiled output and" in r.output


def test_fixed_size_seams_are_found_when_the_border_is_too_small(model_cache: ModelCache, tmp_path: Path) -> None:
    """With a border below the model's halo the stitched output has seams; the fixed-size check finds them
    and gives the same size as the comparison with whole-image inference of the dynamic model."""
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package
    from czregistry.report import Report
    from czregistry.run.pipeline import predict_image
    from czregistry.run.plan import RunOptions, model_geometry
    from czregistry.run.smoke import _compare_fixed_tiles, _compare_whole
    from czregistry.selection import load_session

    img = synthetic_image((200, 200), 1, seed=5)
    errors = {}
    for label, path in (("dynamic", model_cache("unet", overlap=20)),
                        ("fixed", _fixed_size(model_cache("unet", overlap=20), tmp_path / "fixed.czann", 64))):
        pkg = open_package(path)
        info = ModelInfo.from_package(pkg)
        with load_session(pkg, None, "cpu") as session:
            geom = model_geometry(session, info)
            assert geom.halo[0] > 4  # the U-Net's halo is 10 px
            out, grid = predict_image(session, info, img, RunOptions(border=4), geometry=geom)
            report = Report(path=str(path))
            if label == "fixed":
                _compare_fixed_tiles(report, session, img, out, grid, tuple(geom.stride), geom.global_context)
            else:
                _compare_whole(report, session, img, out, grid, 1 << 22, geom.global_context)
        seams = next(f for f in report.findings if f.check == "smoke.seams")
        assert seams.severity is Severity.ERROR, seams
        errors[label] = report.measurements["smoke.seam_error"]
    assert errors["fixed"] > 1e-3
    assert errors["dynamic"] / 3 <= errors["fixed"] <= errors["dynamic"] * 1.0001  # same seams, seen locally


def test_a_border_below_the_halo_fails_as_validate_warns(model_cache: ModelCache) -> None:
    """Smoke tiles at the declared overlap, as the host does (it no longer widens the border to the halo it
    measured, which hid the seams ZEN shows): the test U-Net (halo 10) at MinOverlap 16 fails smoke exactly where
    validate warns, with seam errors within 2x of each other."""
    from czregistry.checks import ValidateOptions
    from czregistry.validate import validate

    path = model_cache("unet", overlap=16)
    report = smoke_test(path)
    assert _by_check(report)["smoke.seams"] is Severity.ERROR
    assert report.measurements["smoke.border"] == [8, 8]
    checked = validate(path, ValidateOptions())
    assert "model.receptive_field.border" in {f.check for f in checked.warnings}
    ratio = checked.measurements["seam_error"] / report.measurements["smoke.seam_error"]
    assert 0.5 <= ratio <= 2, ratio
