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
           "RunEncoder", "Runs", "class_objects", "class_scores", "confusion_matrix", "encode_runs",
           "label_components", "match_objects", "object_scores", "regression_scores", "regression_stats",
           "run_components", "segmentation_stats", "ssim_map"]

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


# --- one plane, all classes: statistics on runs -------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """A class map as maximal runs of one class along its last axis: flat (C-order) ``[start, stop)``
    positions, sorted, every pixel in exactly one run.

    A segmentation has a few runs per hundred pixels, so everything the metrics need (confusion matrix,
    components, object overlaps) is computed on runs instead of pixels: one pass over the pixels to find
    the runs, and that pass can be done on rows as the tiled runner finishes them (``RunEncoder``).
    """

    shape: tuple[int, ...]
    starts: np.ndarray  # int64
    stops: np.ndarray  # int64
    values: np.ndarray  # the class of each run

    def of_class(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        sel = self.values == c
        return self.starts[sel], self.stops[sel]


class RunEncoder:
    """``Runs`` of a class map whose blocks of rows (first axis) arrive in order (``add``), as the tiled
    runner emits them; ``finish`` joins them. Runs never cross a line (last axis), so blocks of whole rows
    can be encoded on their own and concatenated."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 2:
            raise ValueError(f"runs are encoded row by row: a class map needs 2 or more axes, got {self.shape}")
        self.row_size = int(np.prod(self.shape[1:]))
        self.rows = 0
        self._starts: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    def add(self, start: int, block: np.ndarray) -> None:
        if start != self.rows or tuple(block.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows {start}.. of shape {block.shape} do not continue rows 0..{self.rows} of "
                             f"{self.shape}")
        if block.size:
            w = block.shape[-1]
            lines = block.reshape(-1, w)
            change = np.empty(lines.shape, np.bool_)
            change[:, 0] = True
            np.not_equal(lines[:, 1:], lines[:, :-1], out=change[:, 1:])
            starts = np.flatnonzero(change)
            self._values.append(lines.reshape(-1)[starts])
            self._starts.append(starts + start * self.row_size)
        self.rows += block.shape[0]

    def finish(self) -> Runs:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.rows} of {self.shape[0]} rows were encoded")
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        values = np.concatenate(self._values) if self._values else np.zeros(0, np.uint8)
        stops = np.empty_like(starts)
        stops[:-1] = starts[1:]
        if stops.size:
            stops[-1] = int(np.prod(self.shape))
        return Runs(self.shape, starts.astype(np.int64, copy=False), stops.astype(np.int64, copy=False), values)


def encode_runs(class_map: np.ndarray, bands: int = 1) -> Runs:
    """``Runs`` of a class map (2 or more axes), encoded in ``bands`` blocks of rows (same result)."""
    enc = RunEncoder(class_map.shape)
    edges = np.linspace(0, class_map.shape[0], max(1, int(bands)) + 1).round().astype(int)
    for a, b in itertools.pairwise(edges):
        enc.add(int(a), class_map[a:b])
    return enc.finish()


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ``(i, j)`` with ``lo[i] <= j < hi[i]`` (empty ranges skipped), as two index arrays."""
    count = np.maximum(hi - lo, 0)
    i = np.repeat(np.arange(lo.size), count)
    within = np.arange(i.size) - np.repeat(np.cumsum(count) - count, count)
    return i, np.repeat(lo, count) + within


def _overlapping(starts_a: np.ndarray, stops_a: np.ndarray, starts_b: np.ndarray, stops_b: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of runs of ``a`` and ``b`` (each sorted and disjoint) that share pixels, with how many."""
    lo = np.searchsorted(stops_b, starts_a, "right")
    hi = np.searchsorted(starts_b, stops_a, "left")
    i, j = _expand(lo, hi)
    return i, j, np.minimum(stops_a[i], stops_b[j]) - np.maximum(starts_a[i], starts_b[j])


def run_components(starts: np.ndarray, stops: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """Face-connected components (4-connected in 2D, 6 in 3D) of one class's runs: the component id (1..k)
    of each run, and k. Two runs are connected when they lie in lines one step apart along an axis other
    than the last (the same coordinates on the others) and share a column; runs in one line never touch
    (they are maximal). Same components as ``label_components`` on the class mask."""
    n = int(starts.size)
    if n == 0:
        return np.zeros(0, np.int64), 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    w = int(shape[-1])
    line = starts // w
    heads, tails = [], []
    step = 1  # lines per step along ``axis``
    for axis in range(len(shape) - 2, -1, -1):
        has_prev = np.flatnonzero((line // step) % int(shape[axis]) > 0)
        shift = step * w  # the same column one line-step back along ``axis``
        i, j, _ = _overlapping(starts[has_prev] - shift, stops[has_prev] - shift, starts, stops)
        heads.append(has_prev[i])
        tails.append(j)
        step *= int(shape[axis])
    a, b = np.concatenate(heads), np.concatenate(tails)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    k, comp = connected_components(graph, directed=False)
    return comp.astype(np.int64) + 1, int(k)


@dataclass
class ClassObjects:
    """A class map (label or prediction), its runs, and for each foreground class 1..n-1 the runs of that
    class with their component ids (``objects[c - 1] = (starts, stops, ids, count)``)."""

    class_map: np.ndarray | None
    n_classes: int
    runs: Runs
    objects: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]

    @property
    def counts(self) -> list[int]:
        return [k for *_, k in self.objects]

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def class_objects(class_map: np.ndarray | None, n_classes: int, runs: Runs | None = None) -> ClassObjects:
    """Runs and components of every foreground class of a class map (label or prediction), from the map
    or from its ``runs`` (the map is then only kept, for pictures)."""
    if runs is None:
        if class_map is None:
            raise ValueError("class_objects needs a class map or its runs")
        runs = encode_runs(class_map)
    objects = []
    for c in range(1, int(n_classes)):
        starts, stops = runs.of_class(c)
        ids, k = run_components(starts, stops, runs.shape)
        objects.append((starts, stops, ids, k))
    return ClassObjects(class_map, int(n_classes), runs, objects)


def _run_confusion(truth: Runs, pred: Runs, n: int) -> np.ndarray:
    """The confusion matrix from the overlaps of all runs of label and prediction (one bincount)."""
    i, j, pixels = _overlapping(truth.starts, truth.stops, pred.starts, pred.stops)
    key = truth.values[i].astype(np.int64) * n + pred.values[j]
    counts = np.bincount(key, weights=pixels, minlength=n * n)  # float64: exact for counts below 2**53
    return counts[: n * n].reshape(n, n).astype(np.int64)


def segmentation_stats(truth: ClassObjects, pred: np.ndarray | Runs, thresholds: Sequence[float] = THRESHOLDS,
                       *, bands: int = 1) -> tuple[np.ndarray, list[list[ObjectCounts]]]:
    """Confusion matrix and, per foreground class, ``match_objects`` counts of one plane.

    The same values as ``confusion_matrix`` and ``match_objects`` on each class's components, computed on
    runs: the pixels are visited once, to find the prediction's runs (``pred`` may already be ``Runs``,
    which the engine builds from rows as the tiled runner finishes them; a class map is encoded in
    ``bands`` blocks of rows, as the engine receives it, and the result does not depend on them).
    ``truth`` (``class_objects``) does not depend on the prediction: the engine builds it during inference.
    """
    n = truth.n_classes
    p_runs = pred if isinstance(pred, Runs) else encode_runs(pred, bands)
    if p_runs.shape != truth.runs.shape:
        raise ValueError(f"label shape {truth.runs.shape} != prediction shape {p_runs.shape}")
    conf = _run_confusion(truth.runs, p_runs, n)
    out = []
    for c in range(1, n):
        t_starts, t_stops, t_ids, n_true = truth.objects[c - 1]
        p_starts, p_stops = p_runs.of_class(c)
        p_ids, n_pred = run_components(p_starts, p_stops, p_runs.shape)
        out.append(_match_pairs(*_run_ious(t_starts, t_stops, t_ids, n_true, p_starts, p_stops, p_ids, n_pred),
                                n_true, n_pred, thresholds))
    return conf, out


def _run_ious(t_starts: np.ndarray, t_stops: np.ndarray, t_ids: np.ndarray, n_true: int, p_starts: np.ndarray,
              p_stops: np.ndarray, p_ids: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse IoU ``(true ids, pred ids, IoU)`` of every overlapping pair of objects, from their runs: the
    run overlaps summed per pair of ids (the sparse overlap table), areas summed per id."""
    i, j, pixels = _overlapping(t_starts, t_stops, p_starts, p_stops)
    key = t_ids[i] * (n_pred + 1) + p_ids[j]
    pairs, where = np.unique(key, return_inverse=True)
    inter = np.bincount(where, weights=pixels, minlength=pairs.size)
    ti, pj = pairs // (n_pred + 1), pairs % (n_pred + 1)
    area_t = np.bincount(t_ids, weights=t_stops - t_starts, minlength=n_true + 1)  # float64, exact counts
    area_p = np.bincount(p_ids, weights=p_stops - p_starts, minlength=n_pred + 1)
    return ti, pj, inter / (area_t[ti] + area_p[pj] - inter)


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
