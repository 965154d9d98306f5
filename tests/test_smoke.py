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


@pytest.mark.parametrize("kind", ["unet", "dilated", "regression", "unet3d"])
def test_seamless_models_pass(model_cache: ModelCache, kind: str) -> None:
    report = smoke_test(model_cache(kind))
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
    report = smoke_test(model_cache("unet"), image=tmp_path / "img.npy")
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
    res = cli.invoke(main, ["smoke", str(model_cache("unet")), "--json"])
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
    report = smoke_test(model_cache("unet", fmt="savedmodel"))
    assert report.valid, report.findings
    assert report.measurements["smoke.backend"] == "tensorflow"
    assert report.measurements["smoke.seam_error"] <= 1e-5
