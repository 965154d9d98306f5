"""Metric definitions against an independent pure-NumPy/Python reference written here from the definitions.

The reference labels components by flood fill, builds the dense IoU matrix from masks and finds the best
one-to-one matching by enumerating every matching (StarDist's objective: most pairs with IoU >= thresh,
then the largest sum of assigned IoUs). Nothing from scipy is used here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from czregistry.errors import UsageError
from czregistry.evaluate import metrics as M
from czregistry.evaluate.compare import compare_evaluations, flat_metrics
from czregistry.evaluate.dataset import dataset_digest, pair_dataset
from czregistry.evaluate.engine import summarize

TOL = 1e-9

# --- the reference -----------------------------------------------------------------------------------


def ref_components(mask: np.ndarray) -> list[np.ndarray]:
    """Face-connected components as boolean masks, by breadth-first flood fill."""
    seen = np.zeros(mask.shape, bool)
    comps = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp = np.zeros(mask.shape, bool)
        queue = [start]
        seen[start] = True
        while queue:
            p = queue.pop()
            comp[p] = True
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    q = list(p)
                    q[axis] += step
                    if 0 <= q[axis] < mask.shape[axis]:
                        qt = tuple(q)
                        if mask[qt] and not seen[qt]:
                            seen[qt] = True
                            queue.append(qt)
        comps.append(comp)
    return comps


def ref_matching(truth: list[np.ndarray], pred: list[np.ndarray], thr: float) -> tuple[int, float]:
    """(tp, sum of matched IoU) of the best one-to-one matching, by enumeration."""
    iou = np.zeros((len(truth), len(pred)))
    for i, t in enumerate(truth):
        for j, p in enumerate(pred):
            inter = np.logical_and(t, p).sum()
            iou[i, j] = inter / np.logical_or(t, p).sum()
    best = (0, 0.0, 0.0)
    small, large = (truth, pred) if len(truth) <= len(pred) else (pred, truth)
    for perm in itertools.permutations(range(len(large)), len(small)):
        pairs = [(i, j) if len(truth) <= len(pred) else (j, i) for i, j in enumerate(perm)]
        scores = [iou[i, j] for i, j in pairs]
        count = sum(s >= thr for s in scores)
        key = (count, sum(scores), sum(s for s in scores if s >= thr))
        if key[:2] > best[:2]:
            best = key
    return int(best[0]), float(best[2])


def ref_object_scores(tp: int, n_true: int, n_pred: int, matched: float) -> dict[str, float]:
    fp, fn = n_pred - tp, n_true - tp
    z = tp == 0
    return {"precision": 0.0 if z else tp / (tp + fp), "recall": 0.0 if z else tp / (tp + fn),
            "accuracy": 0.0 if z else tp / (tp + fp + fn), "f1": 0.0 if z else 2 * tp / (2 * tp + fp + fn),
            "mean_matched_score": matched / tp if tp else 0.0,
            "panoptic_quality": matched / (tp + fp / 2 + fn / 2) if (tp + fp + fn) else 0.0}


def ref_class_scores(truth: np.ndarray, pred: np.ndarray, n: int) -> dict[str, Any]:
    iou, dice = [], []
    for c in range(n):
        t, p = truth == c, pred == c
        inter = float(np.logical_and(t, p).sum())
        union = float(np.logical_or(t, p).sum())
        iou.append(inter / union if union else None)
        dice.append(2 * inter / (t.sum() + p.sum()) if union else None)
    defined = [v for v in iou if v is not None]
    return {"iou": iou, "dice": dice, "mean_iou": sum(defined) / len(defined),
            "pixel_accuracy": float((truth == pred).mean())}


# --- label sets ----------------------------------------------------------------------------------------


def blobs(shape: tuple[int, int], n: int, rng: np.random.Generator, classes: int = 2) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(2, 7), rng.integers(2, 7)
        out[y:y + h, x:x + w] = rng.integers(1, classes)
    return out


def label_sets() -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    rng = np.random.default_rng(7)
    sets = []
    truth = blobs((24, 24), 5, rng)
    pred = np.roll(truth, 1, axis=1)
    pred[0:3, 0:3] = 1  # an extra object
    sets.append(("shifted", truth, pred, 2))
    t3 = blobs((24, 24), 6, rng, classes=3)
    p3 = blobs((24, 24), 5, rng, classes=3)
    p3[t3 > 0] = t3[t3 > 0]  # overlapping, split and merged objects
    p3[5:7, :] = 0
    sets.append(("three classes, cuts", t3, p3, 3))
    sets.append(("empty class 2 and 3", blobs((20, 20), 4, rng), blobs((20, 20), 4, rng), 4))
    sets.append(("no objects at all", np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8), 2))
    sets.append(("objects only in truth", blobs((16, 16), 3, rng), np.zeros((16, 16), np.uint8), 2))
    sets.append(("objects only in prediction", np.zeros((16, 16), np.uint8), blobs((16, 16), 3, rng), 2))
    half = np.zeros((12, 12), np.uint8)
    half[2:6, 2:10] = 1  # one true object split exactly in half by the prediction: IoU exactly 0.5 twice
    split = half.copy()
    split[2:6, 6] = 0
    split[2:6, 2:6] = 1
    split[2:6, 6:10] = 0
    split[2:6, 7:10] = 1
    sets.append(("ties at 0.5", half, split, 2))
    return sets


@pytest.mark.parametrize("name,truth,pred,n", label_sets(), ids=[s[0] for s in label_sets()])
def test_pixel_and_object_metrics_equal_the_reference(name: str, truth: np.ndarray, pred: np.ndarray,
                                                      n: int) -> None:
    classes = [f"c{i}" for i in range(n)]
    got = M.class_scores(M.confusion_matrix(truth, pred, n), classes)
    ref = ref_class_scores(truth, pred, n)
    for i, c in enumerate(classes):
        for key in ("iou", "dice"):
            if ref[key][i] is None:
                assert got[key][c] is None
            else:
                assert abs(got[key][c] - ref[key][i]) < TOL
    assert abs(got["mean_iou"] - ref["mean_iou"]) < TOL
    assert abs(got["pixel_accuracy"] - ref["pixel_accuracy"]) < TOL
    for c in range(1, n):
        t_objs, p_objs = ref_components(truth == c), ref_components(pred == c)
        tl, tn = M.label_components(truth == c)
        pl, pn = M.label_components(pred == c)
        assert (tn, pn) == (len(t_objs), len(p_objs))
        counts = M.match_objects(tl, tn, pl, pn, M.THRESHOLDS)
        for thr, cnt in zip(M.THRESHOLDS, counts):
            tp, matched = ref_matching(t_objs, p_objs, thr)
            assert (cnt.tp, cnt.fp, cnt.fn) == (tp, len(p_objs) - tp, len(t_objs) - tp), (c, thr)
            assert abs(cnt.sum_matched_score - matched) < TOL
            scores = M.object_scores(cnt, thr)
            for key, value in ref_object_scores(tp, len(t_objs), len(p_objs), matched).items():
                assert abs(scores[key] - value) < TOL, (key, thr)
                assert np.isfinite(scores[key])


LOW_AND_HIGH = (0.1, 0.3, 0.45, *M.THRESHOLDS)


@pytest.mark.parametrize("name,truth,pred,n", label_sets(), ids=[s[0] for s in label_sets()])
def test_one_pass_plane_statistics_equal_the_reference(name: str, truth: np.ndarray, pred: np.ndarray,
                                                       n: int) -> None:
    """What the engine uses (class masks reused, one overlap pass for all classes), at thresholds on both sides
    of 0.5: above it the pairs need no solver, below it the per-group assignment runs."""
    ref_conf = [[int(np.count_nonzero((truth == i) & (pred == j))) for j in range(n)] for i in range(n)]
    refs = {c: (ref_components(truth == c), ref_components(pred == c)) for c in range(1, n)}
    for bands in (1, 2, 3, 7):  # cut into bands counted on threads; seams cross objects, the result must not care
        conf, per_class = M.segmentation_stats(M.class_objects(truth, n), pred, LOW_AND_HIGH, bands=bands)
        assert conf.tolist() == ref_conf
        assert len(per_class) == n - 1
        for c in range(1, n):
            t_objs, p_objs = refs[c]
            for thr, cnt in zip(LOW_AND_HIGH, per_class[c - 1]):
                tp, matched = ref_matching(t_objs, p_objs, thr)
                assert (cnt.tp, cnt.fp, cnt.fn, cnt.n_true, cnt.n_pred) == (
                    tp, len(p_objs) - tp, len(t_objs) - tp, len(t_objs), len(p_objs)), (bands, c, thr)
                assert abs(cnt.sum_matched_score - matched) < TOL


def test_matching_below_half_uses_the_assignment() -> None:
    """One true object overlapped by two predictions at IoU 1/3 each, and a second true object touching one of
    them: below 0.5 the choice matters and the optimum pairs both true objects."""
    truth = np.zeros((6, 12), np.uint8)
    truth[1:4, 0:6] = 1
    truth[1:4, 8:12] = 1
    pred = np.zeros((6, 12), np.uint8)
    pred[1:4, 0:2] = 1
    pred[1:4, 3:9] = 1
    tl, tn = M.label_components(truth == 1)
    pl, pn = M.label_components(pred == 1)
    counts = M.match_objects(tl, tn, pl, pn, (0.1, 0.3, 0.5))
    for thr, cnt in zip((0.1, 0.3, 0.5), counts):
        tp, matched = ref_matching(ref_components(truth == 1), ref_components(pred == 1), thr)
        assert (cnt.tp, abs(cnt.sum_matched_score - matched) < TOL) == (tp, True)
    assert counts[0].tp == 2 and counts[2].tp == 0


def test_the_split_object_has_one_match_at_half() -> None:
    _, truth, pred, _ = label_sets()[-1]
    tl, tn = M.label_components(truth == 1)
    pl, pn = M.label_components(pred == 1)
    counts = M.match_objects(tl, tn, pl, pn, (0.5, 0.55))
    assert (tn, pn) == (1, 2)
    assert [(c.tp, c.fp, c.fn) for c in counts] == [(1, 1, 0), (0, 2, 1)]


def test_three_d_components_are_face_connected() -> None:
    mask = np.zeros((3, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal: two objects
    mask[2, 2:4, 2] = True
    _, n = M.label_components(mask)
    assert n == len(ref_components(mask)) == 3


def _partition(ids: np.ndarray, mask: np.ndarray) -> set[frozenset[int]]:
    """The components of ``mask`` as sets of flat pixel indices, whatever their numbering."""
    flat, where = ids.ravel(), np.flatnonzero(mask.ravel())
    return {frozenset(where[flat[where] == k].tolist()) for k in np.unique(flat[where])}


@pytest.mark.parametrize("shape", [(24, 24), (1, 17), (9, 1), (5, 6, 7), (2, 1, 9)])
def test_run_components_equal_the_flood_fill(shape: tuple[int, ...]) -> None:
    """What the engine uses (components of runs) against the reference flood fill, in 2D and 3D, including
    single rows and columns, where neighbouring lines are the only connections."""
    rng = np.random.default_rng(len(shape) * 31 + shape[-1])
    for density in (0.0, 0.3, 0.55, 1.0):
        class_map = (rng.random(shape) < density).astype(np.uint8)
        runs = M.encode_runs(class_map)
        starts, stops = runs.of_class(1)
        ids, k = M.run_components(starts, stops, shape)
        pixel_ids = np.zeros(class_map.size, np.int64)
        for a, b, i in zip(starts, stops, ids):
            pixel_ids[a:b] = i
        ref = ref_components(class_map == 1)
        assert k == len(ref)
        assert _partition(pixel_ids.reshape(shape), class_map == 1) == {
            frozenset(np.flatnonzero(c.ravel()).tolist()) for c in ref}


def test_runs_encoded_from_blocks_of_rows_equal_the_whole() -> None:
    """The engine encodes rows as the runner finishes them: any cut into blocks gives the same runs, and
    every pixel lies in exactly one run of its class. Rows out of order or missing are refused."""
    rng = np.random.default_rng(5)
    class_map = rng.integers(0, 3, (37, 11)).astype(np.uint8)
    whole = M.encode_runs(class_map)
    assert whole.starts[0] == 0 and whole.stops[-1] == class_map.size
    assert np.array_equal(whole.starts[1:], whole.stops[:-1])
    decoded = np.repeat(whole.values, whole.stops - whole.starts).reshape(class_map.shape)
    assert np.array_equal(decoded, class_map)
    for bands in (2, 5, 37):
        cut = M.encode_runs(class_map, bands)
        assert all(np.array_equal(getattr(cut, f), getattr(whole, f)) for f in ("starts", "stops", "values"))
    enc = M.RunEncoder(class_map.shape)
    enc.add(0, class_map[:10])
    with pytest.raises(ValueError, match="do not continue"):
        enc.add(12, class_map[12:20])
    with pytest.raises(ValueError, match="rows were encoded"):
        enc.finish()


# --- pooled dataset values and the bootstrap -------------------------------------------------------


def _fake_evaluation(pairs: list[tuple[np.ndarray, np.ndarray]], n: int, tag: str = "a") -> dict[str, Any]:
    classes = [f"c{i}" for i in range(n)]
    rows = []
    for k, (t, p) in enumerate(pairs):
        row: dict[str, Any] = {"image": f"im{k}", "image_sha256": f"i{k}", "label_sha256": f"l{k}"}
        row.update(M.class_scores(M.confusion_matrix(t, p, n), classes))
        row["objects"] = {}
        for c in range(1, n):
            tl, tn = M.label_components(t == c)
            pl, pn = M.label_components(p == c)
            row["objects"][classes[c]] = [x.as_list() for x in M.match_objects(tl, tn, pl, pn)]
        rows.append(row)
    data = {"task": "segmentation", "package": {"classes": classes, "sha256": tag, "file": tag},
            "dataset": {"digest": "sha256:x"}, "definition": M.DEFINITION, "per_image": rows, "metrics": {}}
    data["metrics"] = summarize(data, M.THRESHOLDS)
    return data


def test_dataset_values_pool_images_and_match_the_reference() -> None:
    sets = [s for s in label_sets() if s[3] == 2]
    data = _fake_evaluation([(t, p) for _, t, p, _ in sets], 2)
    truth_all = np.concatenate([t.ravel() for _, t, _, _ in sets])
    pred_all = np.concatenate([p.ravel() for _, _, p, _ in sets])
    ref = ref_class_scores(truth_all, pred_all, 2)
    m = data["metrics"]
    assert abs(m["mean_iou"] - ref["mean_iou"]) < TOL
    assert abs(m["iou"]["c1"] - ref["iou"][1]) < TOL
    for j, thr in enumerate(M.THRESHOLDS):  # StarDist's matching_dataset(by_image=False): pooled counts
        tp = fp = fn = 0
        matched = 0.0
        for _, t, p, _ in sets:
            to, po = ref_components(t == 1), ref_components(p == 1)
            k, s = ref_matching(to, po, thr)
            tp, fp, fn, matched = tp + k, fp + len(po) - k, fn + len(to) - k, matched + s
        row = m["objects"]["classes"]["c1"][j]
        assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn)
        assert abs(row["f1"] - ref_object_scores(tp, tp + fn, tp + fp, matched)["f1"]) < TOL
    flat = flat_metrics(data)  # the vectorised names used by gates and compare agree with the JSON
    assert abs(flat["mean_iou"] - m["mean_iou"]) < TOL  # type: ignore[operator]
    assert abs(flat["objects.c1.f1@0.5"] - m["objects"]["classes"]["c1"][0]["f1"]) < TOL  # type: ignore[operator]
    assert abs(flat["objects.c1.mean_accuracy"] - m["objects"]["mean_accuracy"]["c1"]) < TOL  # type: ignore[operator]


def test_an_absent_class_is_null_and_left_out_of_the_mean() -> None:
    t = np.zeros((8, 8), np.uint8)
    t[2:4, 2:4] = 1
    m = M.class_scores(M.confusion_matrix(t, t, 3), ["bg", "a", "b"])
    assert m["iou"]["b"] is None and m["dice"]["b"] is None
    assert m["mean_iou"] == 1.0
    import json

    assert "NaN" not in json.dumps(m)


def test_bootstrap_is_paired_seeded_and_signals_a_clear_difference() -> None:
    rng = np.random.default_rng(3)
    truths = [blobs((24, 24), 5, rng) for _ in range(8)]
    good = _fake_evaluation([(t, t) for t in truths], 2, "good")
    bad_preds = [np.roll(t, 2, axis=0) for t in truths]
    bad = _fake_evaluation(list(zip(truths, bad_preds)), 2, "bad")
    out = compare_evaluations(bad, good, n_boot=500, seed=1)
    again = compare_evaluations(bad, good, n_boot=500, seed=1)
    assert out == again
    row = next(r for r in out["metrics"] if r["metric"] == "mean_iou")
    assert row["b"] == 1.0 and row["difference"] > 0
    assert row["ci95"][0] > 0 and row["better"] == "B"
    same = compare_evaluations(good, good, n_boot=200)
    assert all(r["better"] in ("neither", None) for r in same["metrics"])
    assert next(r for r in same["metrics"] if r["metric"] == "mean_iou")["ci95"] == [0.0, 0.0]


# --- regression ------------------------------------------------------------------------------------------


def ref_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean local SSIM over windows fully inside the image, one window at a time."""
    r, sigma = 5, 1.5
    ax = np.arange(-r, r + 1)
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            a, b = x[i - r:i + r + 1, j - r:j + r + 1], y[i - r:i + r + 1, j - r:j + r + 1]
            mx, my = (g * a).sum(), (g * b).sum()
            vx, vy = (g * a * a).sum() - mx**2, (g * b * b).sum() - my**2
            cxy = (g * a * b).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_regression_metrics_equal_the_reference() -> None:
    rng = np.random.default_rng(5)
    target = rng.random((20, 17, 1))
    pred = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1)
    s = M.regression_stats(pred, target)
    got = M.regression_scores(s)
    e = pred - target
    mse = float((e**2).mean())
    assert abs(got["mae"] - float(np.abs(e).mean())) < TOL  # type: ignore[operator]
    assert abs(got["rmse"] - mse**0.5) < TOL  # type: ignore[operator]
    assert abs(got["psnr"] - 10 * np.log10(1 / mse)) < TOL  # type: ignore[operator]
    assert abs(got["ssim"] - ref_ssim(pred[..., 0], target[..., 0])) < TOL  # type: ignore[operator]
    same = M.regression_scores(M.regression_stats(target, target))
    assert same["psnr"] == M.PSNR_CAP_DB and abs(same["ssim"] - 1.0) < TOL  # type: ignore[operator]
    tiny = M.regression_scores(M.regression_stats(target[:5, :5], target[:5, :5]))
    assert tiny["ssim"] is None  # smaller than the window: undefined, not NaN


# --- datasets --------------------------------------------------------------------------------------------


def _write(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, arr)


def test_pairing_by_stem_and_the_digest(tmp_path: Path) -> None:
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    _write(tmp_path / "i", "x.npy", a)
    _write(tmp_path / "i", "y.npy", a + 1)
    _write(tmp_path / "l", "x.npy", a % 2)
    _write(tmp_path / "l", "y.npy", a % 3)
    pairs = pair_dataset(tmp_path / "i", tmp_path / "l")
    assert [p.stem for p in pairs] == ["x", "y"]
    digest = dataset_digest(pairs)
    (tmp_path / "i" / "x.npy").rename(tmp_path / "i" / "z.npy")  # renaming both keeps the digest
    (tmp_path / "l" / "x.npy").rename(tmp_path / "l" / "z.npy")
    assert dataset_digest(pair_dataset(tmp_path / "i", tmp_path / "l")) == digest
    (tmp_path / "l" / "z.npy").rename(tmp_path / "l" / "tmp.npy")  # swapping the pairing changes it
    (tmp_path / "l" / "y.npy").rename(tmp_path / "l" / "z.npy")
    (tmp_path / "l" / "tmp.npy").rename(tmp_path / "l" / "y.npy")
    assert dataset_digest(pair_dataset(tmp_path / "i", tmp_path / "l")) != digest
    _write(tmp_path / "i", "extra.npy", a)
    with pytest.raises(UsageError, match=r"1 image\(s\) without a label \(extra.npy\)"):
        pair_dataset(tmp_path / "i", tmp_path / "l")
