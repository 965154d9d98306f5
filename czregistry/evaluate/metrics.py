"""Metric definitions: pixel classes, objects (StarDist's ``matching``), regression.

Everything here works on per-image *sufficient statistics* that add up over images (a confusion matrix,
object match counts, sums of errors). Dataset values are computed from the pooled statistics, never by
averaging per-image values, so a bootstrap over images (``compare``) recomputes exactly the dataset
metric on each resample. The definitions are named by ``DEFINITION``; change that id whenever a value
could change (docs/evaluate.md documents version 1).

Empty cases are defined, never NaN: a class with no pixel in label or prediction has IoU/Dice ``None``
(JSON ``null``) and is left out of the means; object scores follow StarDist (0 when nothing matched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFINITION", "MATCHING", "OBJECT_FIELDS", "PSNR_CAP_DB", "THRESHOLDS", "ObjectCounts",
           "class_scores", "confusion_matrix", "label_components", "match_objects", "object_scores",
           "regression_scores", "regression_stats", "ssim_map"]

#: Id of these definitions; stored with every result and part of the registry key.
DEFINITION = "czreg-metrics/1"
#: What "object metrics" means here (other tools call other things "AP").
MATCHING = ("stardist.matching: IoU criterion, one-to-one assignment maximising the number of pairs with "
            "IoU >= thresh (matched IoU as tie-breaker), objects = face-connected components per class")
THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: PSNR of identical images is unbounded; it is reported as this many dB.
PSNR_CAP_DB = 100.0
OBJECT_FIELDS = ("tp", "fp", "fn", "n_true", "n_pred", "sum_matched_score")
_SSIM_SIGMA, _SSIM_RADIUS, _K1, _K2 = 1.5, 5, 0.01, 0.03


# --- pixel classes ------------------------------------------------------------------------------------


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of pixels of true class ``i`` predicted as ``j`` (int64, ``n x n``)."""
    if truth.shape != pred.shape:
        raise ValueError(f"label shape {truth.shape} != prediction shape {pred.shape}")
    n = int(n_classes)
    if truth.dtype == np.bool_:
        truth = truth.view(np.uint8)
    if n <= 3:  # a few passes of count_nonzero beat bincount's cast of every pixel to intp
        eq = [truth == i for i in range(n)]
        out = np.zeros((n, n), np.int64)
        for j in range(n):
            pj = pred == j
            for i in range(n):
                out[i, j] = np.count_nonzero(np.logical_and(eq[i], pj))
        return out
    small = n * n <= 256
    dtype = np.uint8 if small else np.int64
    key: np.ndarray = truth.astype(dtype, copy=True)
    np.multiply(key, dtype(n), out=key)
    np.add(key, pred.astype(dtype, copy=False), out=key)
    return np.bincount(key.ravel(), minlength=n * n)[: n * n].reshape(n, n).astype(np.int64)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def class_scores(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """IoU and Dice per class, their means over defined classes, and pixel accuracy.

    IoU_c = TP/(TP+FP+FN), Dice_c = 2TP/(2TP+FP+FN) from the confusion matrix; ``None`` when the class is
    in neither label nor prediction (0/0). ``mean_iou`` / ``mean_dice`` average the defined classes.
    """
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    fp = c.sum(axis=0) - tp
    fn = c.sum(axis=1) - tp
    iou = {name: _ratio(tp[i], tp[i] + fp[i] + fn[i]) for i, name in enumerate(classes)}
    dice = {name: _ratio(2 * tp[i], 2 * tp[i] + fp[i] + fn[i]) for i, name in enumerate(classes)}
    return {"iou": iou, "mean_iou": _mean(list(iou.values())), "dice": dice,
            "mean_dice": _mean(list(dice.values())), "pixel_accuracy": _ratio(float(tp.sum()), float(c.sum())),
            "confusion": [[int(v) for v in row] for row in np.asarray(confusion)]}


# --- objects ------------------------------------------------------------------------------------------


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Face-connected components (4-connected in 2D, 6 in 3D) of a boolean mask, numbered 1..n."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    labels, n = ndimage.label(mask, structure=structure, output=np.int32)
    return labels, int(n)


@dataclass(frozen=True)
class ObjectCounts:
    """Match counts at one IoU threshold; they add up over images (``+``)."""

    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    sum_matched_score: float

    def __add__(self, other: ObjectCounts) -> ObjectCounts:
        return ObjectCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.n_true + other.n_true,
                            self.n_pred + other.n_pred, self.sum_matched_score + other.sum_matched_score)

    def as_list(self) -> list[float]:
        return [self.tp, self.fp, self.fn, self.n_true, self.n_pred, self.sum_matched_score]


def _overlaps(true_lab: np.ndarray, n_true: int, pred_lab: np.ndarray, n_pred: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse IoU: ``(true ids, pred ids, IoU)`` of every overlapping pair (ids from 1)."""
    from scipy.sparse import coo_matrix

    both = (true_lab > 0) & (pred_lab > 0)
    t = true_lab[both]
    if t.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float64)
    # COO -> CSR sums duplicate (true, pred) pairs with a counting sort: linear, unlike np.unique's sort
    m = coo_matrix((np.ones(t.size, np.int64), (t, pred_lab[both])), shape=(n_true + 1, n_pred + 1)).tocsr()
    m.sum_duplicates()
    ti = np.repeat(np.arange(n_true + 1, dtype=np.int64), np.diff(m.indptr))
    pj = m.indices.astype(np.int64)
    inter = m.data
    area_t = np.bincount(true_lab.ravel(), minlength=n_true + 1)
    area_p = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    inter = inter.astype(np.float64)
    iou = inter / (area_t[ti] + area_p[pj] - inter)
    return ti, pj, iou


def match_objects(true_lab: np.ndarray, n_true: int, pred_lab: np.ndarray, n_pred: int,
                  thresholds: Sequence[float] = THRESHOLDS) -> list[ObjectCounts]:
    """StarDist's ``matching`` (criterion ``iou``) between two label images, at each threshold.

    StarDist solves one ``linear_sum_assignment`` over the full ``n_true x n_pred`` matrix with costs
    ``-(IoU >= t) - IoU / (2 min(n_true, n_pred))``. Pairs that do not overlap cost 0, so that problem splits
    into the connected groups of overlapping objects; we solve each group on its own (most are a single
    pair, decided without a solver). Same optimum, without an ``n^2`` matrix for thousands of nuclei.
    """
    from scipy.optimize import linear_sum_assignment

    ti, pj, iou = _overlaps(true_lab, n_true, pred_lab, n_pred)
    n_matched = min(n_true, n_pred)
    groups = _groups(ti, pj, n_true)
    singles = np.array([g[0] for g in groups if len(g) == 1], np.int64)  # a lone overlapping pair: no choice
    single_iou = iou[singles] if singles.size else np.zeros(0)
    multi = [g for g in groups if len(g) > 1]
    out = []
    for thr in thresholds:
        hit = single_iou >= thr
        tp = int(np.count_nonzero(hit))
        score = float(single_iou[hit].sum())
        for members in multi:
            rows, rinv = np.unique(ti[members], return_inverse=True)
            cols, cinv = np.unique(pj[members], return_inverse=True)
            scores = np.zeros((len(rows), len(cols)))
            scores[rinv, cinv] = iou[members]
            costs = -(scores >= thr).astype(float) - scores / (2 * n_matched)
            r, c = linear_sum_assignment(costs)
            ok = scores[r, c] >= thr
            tp += int(np.count_nonzero(ok))
            score += float(scores[r, c][ok].sum())
        out.append(ObjectCounts(tp, n_pred - tp, n_true - tp, n_true, n_pred, score))
    return out


def _groups(ti: np.ndarray, pj: np.ndarray, n_true: int) -> list[np.ndarray]:
    """Edge indices of each connected group of the overlap graph (true ids and pred ids as nodes)."""
    if ti.size == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes_t, t_idx = np.unique(ti, return_inverse=True)
    nodes_p, p_idx = np.unique(pj, return_inverse=True)
    n = len(nodes_t) + len(nodes_p)
    graph = coo_matrix((np.ones(len(ti)), (t_idx, len(nodes_t) + p_idx)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[t_idx]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    return list(np.split(order, bounds))


def object_scores(c: ObjectCounts, thresh: float) -> dict[str, Any]:
    """StarDist's derived scores: 0 (not NaN) when nothing matched, as ``stardist.matching`` does."""
    tp, fp, fn, n_true = c.tp, c.fp, c.fn, c.n_true

    def safe(x: float, y: float) -> float:
        return float(x / y) if y > 0 else 0.0

    return {
        "thresh": thresh, "tp": tp, "fp": fp, "fn": fn, "n_true": n_true, "n_pred": c.n_pred,
        "precision": safe(tp, tp + fp) if tp > 0 else 0.0,
        "recall": safe(tp, tp + fn) if tp > 0 else 0.0,
        "accuracy": safe(tp, tp + fp + fn) if tp > 0 else 0.0,
        "f1": safe(2 * tp, 2 * tp + fp + fn) if tp > 0 else 0.0,
        "mean_matched_score": safe(c.sum_matched_score, tp),
        "mean_true_score": safe(c.sum_matched_score, n_true),
        "panoptic_quality": safe(c.sum_matched_score, tp + fp / 2 + fn / 2),
    }


# --- regression ---------------------------------------------------------------------------------------


def _gauss_filter(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian (sigma 1.5, 11 taps) over the last two axes; only the valid region is returned."""
    from scipy import ndimage

    r = _SSIM_RADIUS
    ax = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(ax**2) / (2 * _SSIM_SIGMA**2))
    w /= w.sum()
    y = ndimage.correlate1d(x, w, axis=-1, mode="nearest")
    y = ndimage.correlate1d(y, w, axis=-2, mode="nearest")
    return y[..., r:-r, r:-r]


def ssim_map(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Local SSIM (Wang et al. 2004) of two 2D planes, over the valid region (windows inside the image).

    Gaussian window sigma 1.5 truncated to 11x11, K1 = 0.01, K2 = 0.03, population (not sample) variances.
    Planes smaller than the window give an empty map.
    """
    x = np.asarray(pred, np.float64)
    y = np.asarray(target, np.float64)
    if min(x.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        return np.zeros((0, 0))
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mx, my = _gauss_filter(x), _gauss_filter(y)
    sxx = _gauss_filter(x * x) - mx * mx
    syy = _gauss_filter(y * y) - my * my
    sxy = _gauss_filter(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def regression_stats(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Additive statistics of one plane ``(*spatial, C)``: pixel count, sums of |e| and e^2, SSIM sum/count.

    SSIM is taken per channel over the last two spatial axes (3D volumes slice by slice)."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(target, np.float64)
    e = p - t
    ssim_sum, ssim_n = 0.0, 0
    planes_p = np.moveaxis(p, -1, 0).reshape(-1, *p.shape[-3:-1])
    planes_t = np.moveaxis(t, -1, 0).reshape(-1, *t.shape[-3:-1])
    for a, b in zip(planes_p, planes_t):
        m = ssim_map(a, b)
        ssim_sum += float(m.sum())
        ssim_n += int(m.size)
    return {"n": float(e.size), "sum_abs": float(np.abs(e).sum()), "sum_sq": float((e * e).sum()),
            "ssim_sum": ssim_sum, "ssim_n": float(ssim_n)}


def regression_scores(stats: dict[str, float]) -> dict[str, float | None]:
    """MAE, RMSE, PSNR (data range 1; capped at ``PSNR_CAP_DB``) and SSIM from pooled statistics."""
    n = stats["n"]
    if n <= 0:
        return {"mae": None, "rmse": None, "psnr": None, "ssim": None}
    mse = stats["sum_sq"] / n
    psnr = PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else float(10 * np.log10(1.0 / mse))
    return {"mae": stats["sum_abs"] / n, "rmse": float(np.sqrt(mse)), "psnr": psnr,
            "ssim": stats["ssim_sum"] / stats["ssim_n"] if stats["ssim_n"] > 0 else None}
