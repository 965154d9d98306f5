"""``czreg evaluate`` end to end: through the tiled runner, recorded in the registry (SQLite and PostgreSQL),
compared, and gating a publish. Small packages (``model_cache``) and 128 x 128 images keep it fast."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import text

from czregistry.cli import main
from czregistry.evaluate import EvalOptions, evaluate
from czregistry.evaluate import metrics as M
from czregistry.examples import synthetic_nuclei
from czregistry.registry import open_registry
from tests.test_registry import location  # noqa: F401  (fixture)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Three 128 x 128 nuclei images (PNG, .npy, TIFF) and their ground-truth class maps."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i, suffix in enumerate((".png", ".npy", ".tif")):
        img, truth = synthetic_nuclei(128, 128, seed=10 + i)
        if suffix == ".png":
            Image.fromarray(img).save(images / f"im{i}.png")
        elif suffix == ".npy":
            np.save(images / f"im{i}.npy", img)
        else:
            tifffile.imwrite(images / f"im{i}.tif", img)
        Image.fromarray(truth).save(labels / f"im{i}.png")
    return images, labels


def _labels_from_runner(package: Path, image: Path, tmp: Path) -> np.ndarray:
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    out = tmp / f"{image.stem}-pred.ome.tiff"
    run(package, image, out, RunOptions(output_kind="labels"))
    return np.squeeze(tifffile.imread(out))


def test_evaluation_measures_what_czreg_run_writes(model_cache: Callable[..., Path], dataset: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    package = model_cache("unet")
    images, labels = dataset
    data = evaluate(package, images, labels).data
    assert data["definition"] == M.DEFINITION and data["dataset"]["images"] == 3
    assert data["dataset"]["digest"].startswith("sha256:")
    for row, image in zip(data["per_image"], sorted(images.iterdir())):
        pred = _labels_from_runner(package, image, tmp_path)
        truth = np.asarray(Image.open(labels / f"{row['image']}.png"))
        ref = np.zeros((2, 2), np.int64)
        for i in range(2):
            for j in range(2):
                ref[i, j] = np.count_nonzero((truth == i) & (pred == j))
        assert row["confusion"] == ref.tolist()
    json.dumps(data, allow_nan=False)  # no NaN or inf anywhere


def test_regression_package(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    package = model_cache("regression", classes=1)
    images, targets = tmp_path / "i", tmp_path / "t"
    images.mkdir()
    targets.mkdir()
    img, _ = synthetic_nuclei(96, 96, seed=3)
    np.save(images / "a.npy", img)
    np.save(targets / "a.npy", img)
    data = evaluate(package, images, targets).data
    assert data["task"] == "regression"
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    run(package, images / "a.npy", tmp_path / "p.ome.tiff", RunOptions())
    pred = np.squeeze(tifffile.imread(tmp_path / "p.ome.tiff")).astype(np.float64)
    e = pred - img / 255.0
    assert abs(data["metrics"]["mae"] - np.abs(e).mean()) < 1e-6
    assert abs(data["metrics"]["psnr"] - 10 * np.log10(1 / (e**2).mean())) < 1e-4
    assert 0 < data["metrics"]["ssim"] <= 1


def test_cli_json_report_and_overlays(model_cache: Callable[..., Path], dataset: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    images, labels = dataset
    report, overlays = tmp_path / "eval.html", tmp_path / "ov"
    r = CliRunner().invoke(main, ["evaluate", str(model_cache("unet")), "--images", str(images), "--labels",
                                  str(labels), "--json", "--report", str(report), "--overlays", str(overlays),
                                  "--worst", "2"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert set(data["metrics"]["iou"]) == {"class0", "class1"}
    assert len(data["metrics"]["objects"]["classes"]["class1"]) == len(M.THRESHOLDS)
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 2 and "<svg" in page
    assert "src='http" not in page and 'src="http' not in page
    assert sorted(p.name for p in overlays.iterdir()) == ["im0.png", "im1.png", "im2.png"]
    assert Image.open(overlays / "im0.png").size == (128 * 3 + 2 * 6, 128)
    again = CliRunner().invoke(main, ["evaluate", str(model_cache("unet")), "--images", str(images), "--labels",
                                      str(labels), "--report", str(report)])
    assert again.exit_code == 2 and "exists" in again.output


def test_bad_inputs_are_usage_errors(model_cache: Callable[..., Path], dataset: tuple[Path, Path]) -> None:
    images, labels = dataset
    (labels / "im0.png").unlink()
    r = CliRunner().invoke(main, ["evaluate", str(model_cache("unet")), "--images", str(images), "--labels",
                                  str(labels)])
    assert r.exit_code == 2 and "without a label (im0.png)" in r.output and "Traceback" not in r.output
    Image.fromarray(np.full((128, 128), 5, np.uint8)).save(labels / "im0.png")
    r = CliRunner().invoke(main, ["evaluate", str(model_cache("unet")), "--images", str(images), "--labels",
                                  str(labels)])
    assert r.exit_code == 2 and "holds class 5" in r.output
    r = CliRunner().invoke(main, ["evaluate", "missing.czann", "--images", str(images), "--labels", str(labels)])
    assert r.exit_code == 2 and "no such package file" in r.output


# --- registry: record, show, compare, gate (SQLite and PostgreSQL) --------------------------------------


def _cli(loc: tuple[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--registry", loc[0], "--blob-store", loc[1]])


def _json(r: Result) -> Any:
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_record_show_compare_and_gate(model_cache: Callable[..., Path], dataset: tuple[Path, Path],
                                      location: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    images, labels = dataset
    base, other = model_cache("unet"), model_cache("dilated")
    ds = ["--images", str(images), "--labels", str(labels)]
    _json(_cli(location, "publish", str(base), "--name", "seg", "--version", "1.0.0", "--static", "--json"))
    rec = _json(_cli(location, "evaluate", "seg==1.0.0", *ds, "--record", "--json"))
    assert rec["recorded"]["status"] == "recorded" and rec["package"]["registry"]["version"] == "1.0.0"
    assert _json(_cli(location, "evaluate", "seg==1.0.0", *ds, "--record", "--json"))["recorded"]["status"] == "exists"
    shown = _json(_cli(location, "show", "seg==1.0.0", "--json"))
    assert len(shown["evaluations"]) == 1
    ev = shown["evaluations"][0]
    assert ev["dataset"]["digest"] == rec["dataset"]["digest"] and ev["definition"] == M.DEFINITION
    assert abs(ev["metrics"]["mean_iou"] - rec["metrics"]["mean_iou"]) < 1e-12
    text_out = _cli(location, "show", "seg==1.0.0")
    assert "evaluated:  mean_iou" in text_out.output

    with open_registry(*location) as reg, reg.engine.connect() as conn:  # append-only in the database
        for sql in ("UPDATE evaluations SET images = 99", "DELETE FROM evaluations"):
            with pytest.raises(Exception, match="append-only"):
                conn.execute(text(sql))
            conn.rollback()

    # a gate that fails stores nothing and names metric, value and bound
    r = _cli(location, "publish", str(other), "--name", "seg", "--version", "1.1.0", "--static", *ds,
             "--gate", "mean_iou>=0.999")
    assert r.exit_code == 7, r.output
    assert "mean_iou = " in r.output and "gate mean_iou>=0.999" in r.output and "not published" in r.output
    assert [v["version"] for v in _json(_cli(location, "show", "seg", "--json"))["versions"]] == ["1.0.0"]
    r = _cli(location, "publish", str(other), "--name", "seg", "--version", "1.1.0", "--static", *ds,
             "--gate", "nonsense>=1")
    assert r.exit_code == 2 and "unknown metric 'nonsense'" in r.output

    # baseline that is perfect on its own predictions: the candidate regresses against it
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for image in sorted(images.iterdir()):
        pred = _labels_from_runner(base, image, tmp_path).astype(np.uint8)
        Image.fromarray(pred).save(perfect / f"{image.stem}.png")
    _json(_cli(location, "alias", "set", "seg", "prod", "1.0.0", "--json"))
    _json(_cli(location, "evaluate", "seg@prod", "--images", str(images), "--labels", str(perfect), "--record",
               "--json"))
    r = _cli(location, "publish", str(other), "--name", "seg", "--version", "1.1.0", "--static", "--images",
             str(images), "--labels", str(perfect), "--no-regression-from", "seg@prod")
    assert r.exit_code == 7 and "mean_iou" in r.output and "seg 1.0.0" in r.output and "95% CI" in r.output
    assert [v["version"] for v in _json(_cli(location, "show", "seg", "--json"))["versions"]] == ["1.0.0"]

    # a passing gate publishes and records the evaluation with the new version
    pub = _json(_cli(location, "publish", str(other), "--name", "seg", "--version", "1.1.0", "--static", *ds,
                     "--gate", "mean_iou>=0", "--gate", "iou.class1>=0", "--json"))
    assert pub["status"] == "published" and pub["evaluation"]["dataset"]["digest"] == rec["dataset"]["digest"]
    assert len(_json(_cli(location, "show", "seg==1.1.0", "--json"))["evaluations"]) == 1

    # compare from the recorded results (common dataset: the first one) and by evaluating now
    recorded = _json(_cli(location, "compare", "seg==1.0.0", "seg==1.1.0", "--json", "--resamples", "300"))
    fresh = _json(_cli(location, "compare", "seg==1.0.0", "seg==1.1.0", *ds, "--json", "--resamples", "300"))
    assert recorded["metrics"] == fresh["metrics"]
    row = next(r for r in fresh["metrics"] if r["metric"] == "mean_iou")
    assert abs(row["difference"] - (row["b"] - row["a"])) < 1e-12 and row["ci95"][0] <= row["ci95"][1]
    assert row["better"] in ("A", "B", "neither")
    assert fresh["bootstrap"] == {"resamples": 300, "seed": 0, "interval": "percentile 2.5..97.5 of B - A",
                                  "paired": True}
    listing = _cli(location, "compare", "seg==1.0.0", "seg==1.1.0", "--resamples", "300")
    assert listing.exit_code == 0 and "mean_iou" in listing.output and "95% CI" in listing.output


def test_record_needs_a_published_package(model_cache: Callable[..., Path], dataset: tuple[Path, Path],
                                          location: tuple[str, str]) -> None:  # noqa: F811
    images, labels = dataset
    r = _cli(location, "evaluate", str(model_cache("unet")), "--images", str(images), "--labels", str(labels),
             "--record")
    assert r.exit_code == 7 and "is not in registry" in r.output


def test_keep_worst_orders_previews(model_cache: Callable[..., Path], dataset: tuple[Path, Path]) -> None:
    images, labels = dataset
    ev = evaluate(model_cache("unet"), images, labels, EvalOptions(keep_worst=2))
    scores = sorted(r["mean_iou"] for r in ev.data["per_image"])
    assert [round(p.score, 12) for p in ev.previews] == [round(s, 12) for s in scores[:2]]


def test_a_stack_of_planes_is_measured_plane_by_plane(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    """Two planes in one file (a lead axis): each plane's prediction is encoded from the runner's finished rows,
    and the image's confusion matrix is the sum over planes of what ``czreg run`` writes against the label."""
    package = model_cache("unet")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    planes = [synthetic_nuclei(96, 112, seed=s) for s in (3, 4)]
    tifffile.imwrite(images / "stack.tif", np.stack([p for p, _ in planes]))
    tifffile.imwrite(labels / "stack.tif", np.stack([t for _, t in planes]))
    row = evaluate(package, images, labels).data["per_image"][0]
    assert row["planes"] == 2 and row["shape"] == [2, 96, 112]
    pred = _labels_from_runner(package, images / "stack.tif", tmp_path)
    assert pred.shape == (2, 96, 112)
    truth = np.stack([t for _, t in planes])
    ref = [[int(np.count_nonzero((truth == i) & (pred == j))) for j in range(2)] for i in range(2)]
    assert row["confusion"] == ref
    assert ref[1][1] > 0  # nuclei found: the comparison is not between two empty maps
