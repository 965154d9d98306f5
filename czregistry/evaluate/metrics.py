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

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFINITION", "MATCHING", "OBJECT_FIELDS", "PSNR_CAP_DB", "THRESHOLDS", "ClassObjects", "ObjectCounts",
           "class_objects", "class_scores", "confusion_matrix", "default_bands", "label_components", "match_objects",
           "object_scores", "regression_scores", "regression_stats", "segmentation_stats", "ssim_map"]

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
        return _confusion_from_masks([truth == i for i in range(1, n)], [pred == j for j in range(1, n)],
                                     truth.size)
    small = n * n <= 256
    dtype = np.uint8 if small else np.int64
    key: np.ndarray = truth.astype(dtype, copy=True)
    np.multiply(key, dtype(n), out=key)
    np.add(key, pred.astype(dtype, copy=False), out=key)
    return np.bincount(key.ravel(), minlength=n * n)[: n * n].reshape(n, n).astype(np.int64)


def _confusion_from_masks(truth_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                          size: int) -> np.ndarray:
    """The confusion matrix from the masks of classes 1..n-1 (``truth == i``, ``pred == j``): the cells of
    class 0 follow from the row and column sums, so class 0 needs no pass of its own."""
    n = len(truth_masks) + 1
    out = np.zeros((n, n), np.int64)
    for i, tm in enumerate(truth_masks, 1):
        for j, pm in enumerate(pred_masks, 1):
            out[i, j] = np.count_nonzero(np.logical_and(tm, pm))
    rows = np.array([np.count_nonzero(m) for m in truth_masks], np.int64)
    cols = np.array([np.count_nonzero(m) for m in pred_masks], np.int64)
    out[1:, 0] = rows - out[1:, 1:].sum(axis=1)
    out[0, 1:] = cols - out[1:, 1:].sum(axis=0)
    out[0, 0] = int(size) - int(out.sum())
    return out


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
    if mask.dtype == np.bool_:  # same labels, but scipy labels uint8 input about twice as fast as bool
        mask = mask.view(np.uint8)
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


def _pair_counts(true_lab: np.ndarray, pred_lab: np.ndarray, either: np.ndarray, n_pred: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(true id, pred id, pixels)`` of every pair that shares a pixel, 0 standing for background.

    Only the pixels in ``either`` (foreground in label or prediction) are visited. In raster order most
    neighbours carry the same pair, so runs are collapsed first and only the (few) runs are sorted: linear
    in the pixels, without an ``n_true x n_pred`` table. Pairs with id 0 give the object areas.
    """
    idx = np.flatnonzero(either)
    if idx.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    t = np.ravel(true_lab).take(idx)
    p = np.ravel(pred_lab).take(idx)
    del idx
    change = np.empty(t.size, np.bool_)
    change[0] = True
    np.not_equal(t[1:], t[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    run_len = np.diff(np.append(starts, t.size))
    key = t[starts].astype(np.int64) * (n_pred + 1) + p[starts]
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    pixels = np.add.reduceat(run_len[order], first).astype(np.int64)
    key = key[first]
    return key // (n_pred + 1), key % (n_pred + 1), pixels


def _iou_pairs(ti: np.ndarray, pj: np.ndarray, pixels: np.ndarray, n_true: int, n_pred: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From ``_pair_counts``: ``(true ids, pred ids, IoU)`` of every overlapping object pair (ids from 1)."""
    area_t = np.bincount(ti, weights=pixels, minlength=n_true + 1)  # float64, exact for integer counts
    area_p = np.bincount(pj, weights=pixels, minlength=n_pred + 1)
    both = (ti > 0) & (pj > 0)
    ti, pj = ti[both], pj[both]
    inter = pixels[both].astype(np.float64)
    return ti, pj, inter / (area_t[ti] + area_p[pj] - inter)


def _overlaps(true_lab: np.ndarray, n_true: int, pred_lab: np.ndarray, n_pred: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse IoU: ``(true ids, pred ids, IoU)`` of every overlapping pair (ids from 1)."""
    either = np.logical_or(true_lab > 0, pred_lab > 0)
    return _iou_pairs(*_pair_counts(true_lab, pred_lab, either, n_pred), n_true, n_pred)


def match_objects(true_lab: np.ndarray, n_true: int, pred_lab: np.ndarray, n_pred: int,
                  thresholds: Sequence[float] = THRESHOLDS) -> list[ObjectCounts]:
    """StarDist's ``matching`` (criterion ``iou``) between two label images, at each threshold."""
    ti, pj, iou = _overlaps(true_lab, n_true, pred_lab, n_pred)
    return _match_pairs(ti, pj, iou, n_true, n_pred, thresholds)


def _match_pairs(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray, n_true: int, n_pred: int,
                 thresholds: Sequence[float]) -> list[ObjectCounts]:
    """StarDist's optimum from the sparse IoU of the overlapping pairs, at each threshold.

    At ``thresh >= 0.5`` no solver is needed: IoU(A, B) >= 0.5 means |A & B| >= |A|/2 (and >= |B|/2), and
    objects of one image are disjoint, so an object has at most one partner with IoU > 0.5, and two only in
    the tie where it is cut into two exact halves, each with IoU exactly 0.5 and no other partner. The pairs
    with IoU >= thresh are therefore a matching (keeping one pair of each tie, which gives the same count
    and score), and it is the assignment StarDist's ``linear_sum_assignment`` finds: most pairs >= thresh.

    Below 0.5 an object can have several partners above the threshold and the assignment matters. StarDist
    solves one ``linear_sum_assignment`` over the full ``n_true x n_pred`` matrix with costs
    ``-(IoU >= t) - IoU / (2 min(n_true, n_pred))``; pairs that do not overlap cost 0, so that problem splits
    into the connected groups of overlapping objects and we solve each group on its own.
    """
    out: list[ObjectCounts] = []
    high = iou >= 0.5
    hi_iou = iou[high]
    if hi_iou.size:
        keep = _one_partner(ti[high], pj[high])
        hi_iou = hi_iou[keep]
    low_groups: list[np.ndarray] | None = None
    for thr in thresholds:
        if thr >= 0.5:
            hit = hi_iou >= thr
            tp = int(np.count_nonzero(hit))
            score = float(hi_iou[hit].sum())
        else:
            if low_groups is None:
                low_groups = _groups(ti, pj)
            tp, score = _assign(ti, pj, iou, low_groups, min(n_true, n_pred), thr)
        out.append(ObjectCounts(tp, n_pred - tp, n_true - tp, n_true, n_pred, score))
    return out


def _one_partner(ti: np.ndarray, pj: np.ndarray) -> np.ndarray:
    """Indices of the pairs to keep so that each true and each predicted id occurs once (the IoU = 0.5 ties)."""
    _, first_t = np.unique(ti, return_index=True)
    if first_t.size == ti.size and np.unique(pj).size == pj.size:
        return np.arange(ti.size)
    _, first_p = np.unique(pj[first_t], return_index=True)
    return np.sort(first_t[first_p])


def _assign(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray, groups: list[np.ndarray], n_matched: int,
            thr: float) -> tuple[int, float]:
    """``(TP, sum of matched IoU)`` of StarDist's assignment at ``thr``, group by group."""
    from scipy.optimize import linear_sum_assignment

    tp, score = 0, 0.0
    for members in groups:
        if len(members) == 1:  # a lone overlapping pair: no choice
            if iou[members[0]] >= thr:
                tp += 1
                score += float(iou[members[0]])
            continue
        rows, rinv = np.unique(ti[members], return_inverse=True)
        cols, cinv = np.unique(pj[members], return_inverse=True)
        scores = np.zeros((len(rows), len(cols)))
        scores[rinv, cinv] = iou[members]
        costs = -(scores >= thr).astype(float) - scores / (2 * n_matched)
        r, c = linear_sum_assignment(costs)
        ok = scores[r, c] >= thr
        tp += int(np.count_nonzero(ok))
        score += float(scores[r, c][ok].sum())
    return tp, score


def _groups(ti: np.ndarray, pj: np.ndarray) -> list[np.ndarray]:
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


# --- one plane, all classes, in few passes ---------------------------------------------------------------


@dataclass
class ClassObjects:
    """A class map with its objects: one int32 image numbering the components of classes 1..n-1 one after
    the other (class c has ids ``offsets[c] + 1 .. offsets[c] + counts[c]``), and the class masks."""

    class_map: np.ndarray
    n_classes: int
    masks: list[np.ndarray]  # class_map == c for c = 1..n-1
    labels: np.ndarray
    counts: list[int]

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum([0, *self.counts[:-1]]).tolist()] if self.counts else [0]

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def class_of_id(self) -> np.ndarray:
        """Class index of every id 0..total (0 for background)."""
        return np.repeat(np.arange(self.n_classes, dtype=np.int64), [1, *self.counts])


def class_objects(class_map: np.ndarray, n_classes: int) -> ClassObjects:
    """Masks and components of every foreground class of a class map (label or prediction)."""
    n = int(n_classes)
    masks = [class_map == c for c in range(1, n)]
    counts: list[int] = []
    labels: np.ndarray | None = None
    for mask in masks:
        lab, k = label_components(mask)
        if labels is None:
            labels = lab
        else:
            np.add(lab, sum(counts), out=lab, where=mask)
            labels += lab  # the classes' masks are disjoint
        counts.append(k)
    if labels is None:
        labels = np.zeros(class_map.shape, np.int32)
    return ClassObjects(class_map, n, masks, labels, counts)


def default_bands(shape: Sequence[int]) -> int:
    """How many bands ``segmentation_stats`` cuts a plane into: one per available core, each of at least
    256 rows (the first axis), so that small planes stay in one piece."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, int(shape[0]) // 256 if len(shape) else 1))


@dataclass
class _Band:
    conf: np.ndarray
    pred: ClassObjects
    ti: np.ndarray
    pj: np.ndarray
    pixels: np.ndarray


def _band_stats(truth: ClassObjects, pred: np.ndarray, rows: slice) -> _Band:
    """Confusion, predicted objects (ids local to the band) and pair counts of one band of rows."""
    n = truth.n_classes
    band = pred[rows]
    p_obj = class_objects(band, n)
    t_masks = [m[rows] for m in truth.masks]
    conf = (_confusion_from_masks(t_masks, p_obj.masks, band.size) if n <= 3
            else confusion_matrix(truth.class_map[rows], band, n))
    if n == 2:
        either = np.logical_or(t_masks[0], p_obj.masks[0])
    else:
        either = truth.class_map[rows] != 0
        np.logical_or(either, band != 0, out=either)
    ti, pj, pixels = _pair_counts(truth.labels[rows], p_obj.labels, either, p_obj.total)
    return _Band(conf, p_obj, ti, pj, pixels)


def _sum_pairs(ti: np.ndarray, pj: np.ndarray, pixels: np.ndarray, n_pred: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs that occur more than once (from several bands) summed into one."""
    key = ti.astype(np.int64) * (n_pred + 1) + pj
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    summed = np.add.reduceat(pixels[order], first) if key.size else pixels[:0]
    key = key[first]
    return key // (n_pred + 1), key % (n_pred + 1), summed


def segmentation_stats(truth: ClassObjects, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                       *, bands: int = 1) -> tuple[np.ndarray, list[list[ObjectCounts]]]:
    """Confusion matrix and, per foreground class, ``match_objects`` counts of one plane.

    The same values as ``confusion_matrix`` and ``match_objects`` on each class's components, computed
    with the class masks reused and one overlap pass for all classes. ``truth`` (``class_objects``) does not
    depend on the prediction, so the engine builds it while the tiled inference runs.

    With ``bands > 1`` the plane is cut along its first axis and the bands are counted on as many threads
    (numpy and scipy's labelling release the GIL). A predicted object cut by a seam gets one id per band;
    ids of the same class that are face neighbours across a seam are joined afterwards on the small graph
    of ids and their pair counts summed, so the result does not depend on ``bands``.
    """
    n = truth.n_classes
    if pred.shape != truth.class_map.shape:
        raise ValueError(f"label shape {truth.class_map.shape} != prediction shape {pred.shape}")
    if n <= 1:
        return confusion_matrix(truth.class_map, pred, n), []
    bands = max(1, min(int(bands), int(pred.shape[0])))
    edges = np.linspace(0, pred.shape[0], bands + 1).round().astype(int)
    cuts = [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
    if len(cuts) == 1:
        parts = [_band_stats(truth, pred, cuts[0])]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(cuts), thread_name_prefix="czreg-metrics") as pool:
            parts = list(pool.map(lambda rows: _band_stats(truth, pred, rows), cuts))
    conf = parts[0].conf.copy()
    for p in parts[1:]:
        conf += p.conf
    # provisional predicted ids: id i of band b is start[b] + i (0 stays background)
    starts = [0]
    for p in parts[:-1]:
        starts.append(starts[-1] + p.pred.total)
    n_prov = starts[-1] + parts[-1].pred.total
    prov_class = np.zeros(n_prov + 1, np.int64)
    for s, p in zip(starts, parts):
        prov_class[s + 1: s + 1 + p.pred.total] = p.pred.class_of_id()[1:]
    ti = np.concatenate([p.ti for p in parts])
    pj = np.concatenate([np.where(p.pj > 0, p.pj + s, 0) for s, p in zip(starts, parts)])
    pixels = np.concatenate([p.pixels for p in parts])
    if len(parts) == 1:
        n_ids, id_class = n_prov, prov_class
    else:
        joined = _join_seams(parts, starts, prov_class)
        n_ids = int(joined.max(initial=0))
        id_class = np.zeros(n_ids + 1, np.int64)
        id_class[joined] = prov_class
        pj = joined[pj]
        ti, pj, pixels = _sum_pairs(ti, pj, pixels, n_ids)
    n_pred = np.bincount(id_class, minlength=n)  # per class; [0] counts background and unused ids, ignored
    ti, pj, iou = _iou_pairs(ti, pj, pixels, truth.total, n_ids)
    t_cls = truth.class_of_id()[ti]
    same = t_cls == id_class[pj]  # a true object of one class overlapping a predicted one of another: no pair
    ti, pj, iou, t_cls = ti[same], pj[same], iou[same], t_cls[same]
    out = []
    for c in range(1, n):
        sel = t_cls == c
        out.append(_match_pairs(ti[sel], pj[sel], iou[sel], truth.counts[c - 1], int(n_pred[c]), thresholds))
    return conf, out


def _join_seams(parts: list[_Band], starts: list[int], prov_class: np.ndarray) -> np.ndarray:
    """Joined id of every provisional id (0 -> 0): provisional ids of one class that touch across a seam
    (last row of a band, first row of the next, same position) are one object."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a_all, b_all = [], []
    for k in range(len(parts) - 1):
        a = parts[k].pred.labels[-1].ravel().astype(np.int64)
        b = parts[k + 1].pred.labels[0].ravel().astype(np.int64)
        touch = (a > 0) & (b > 0)
        a, b = a[touch] + starts[k], b[touch] + starts[k + 1]
        ok = prov_class[a] == prov_class[b]
        a_all.append(a[ok])
        b_all.append(b[ok])
    a = np.concatenate(a_all)
    b = np.concatenate(b_all)
    size = len(prov_class)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(size, size))
    _, comp = connected_components(graph, directed=False)
    joined = comp.astype(np.int64) + 1
    joined[0] = 0  # background has no edges: its component holds only itself
    return joined


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
