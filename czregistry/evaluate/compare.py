"""Flat metric names (for gates and comparisons) and a paired bootstrap over images.

``flat_metrics`` names every dataset value: ``mean_iou``, ``iou.nucleus``, ``objects.nucleus.f1@0.5``,
``psnr``... Each is computed from pooled per-image statistics, so a bootstrap resample of images (drawn
with replacement, the same draw for both packages: the images are paired) recomputes exactly that value.
The 95% interval is the 2.5th..97.5th percentile of B - A over ``n_boot`` resamples from a seeded
generator (``numpy.random.default_rng(seed)``), so the same inputs always give the same interval.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["LOWER_IS_BETTER", "N_BOOT", "SEED", "compare_evaluations", "flat_metrics", "headline_metric"]

N_BOOT = 2000
SEED = 0
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
_OBJ_FIELDS = ("precision", "recall", "f1", "accuracy", "panoptic_quality")


def headline_metric(data: dict[str, Any]) -> str:
    return "psnr" if data["task"] == "regression" else "mean_iou"


def _stats(data: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-image additive statistics, one row per image."""
    rows = data["per_image"]
    if data["task"] == "regression":
        keys = ("n", "sum_abs", "sum_sq", "ssim_sum", "ssim_n")
        return {"reg": np.array([[r["stats"][k] for k in keys] for r in rows], np.float64).reshape(len(rows), 5)}
    classes = data["package"]["classes"]
    n = len(classes)
    out = {"conf": np.array([np.asarray(r["confusion"], np.float64).ravel() for r in rows]).reshape(len(rows), n * n)}
    n_t = len(data["metrics"]["objects"]["thresholds"])
    for c in classes[1:]:
        out[f"obj:{c}"] = np.array([np.asarray(r["objects"].get(c) or np.zeros((n_t, 6)), np.float64).ravel()
                                    for r in rows]).reshape(len(rows), n_t * 6)
    return out


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _values(data: dict[str, Any], pooled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every flat metric for each row of pooled statistics (NaN where undefined)."""
    out: dict[str, np.ndarray] = {}
    if data["task"] == "regression":
        npix, sa, ss, ssum, sn = (pooled["reg"][:, i] for i in range(5))
        mse = _div(ss, npix)
        out["mae"] = _div(sa, npix)
        out["rmse"] = np.sqrt(mse)
        from .metrics import PSNR_CAP_DB

        with np.errstate(divide="ignore"):
            psnr = np.where(mse <= 10 ** (-PSNR_CAP_DB / 10), PSNR_CAP_DB, -10 * np.log10(mse))
        out["psnr"] = np.where(np.isnan(mse), np.nan, psnr)
        out["ssim"] = _div(ssum, sn)
        return out
    classes = data["package"]["classes"]
    n = len(classes)
    conf = pooled["conf"].reshape(-1, n, n)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    fp = conf.sum(axis=1) - tp
    fn = conf.sum(axis=2) - tp
    iou = _div(tp, tp + fp + fn)
    dice = _div(2 * tp, 2 * tp + fp + fn)
    with warnings.catch_warnings():  # all-NaN rows (an undefined mean) are expected: NaN means undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        out["mean_iou"] = np.nanmean(iou, axis=1)
        out["mean_dice"] = np.nanmean(dice, axis=1)
    out["pixel_accuracy"] = _div(tp.sum(axis=1), conf.sum(axis=(1, 2)))
    for i, c in enumerate(classes):
        out[f"iou.{c}"] = iou[:, i]
        out[f"dice.{c}"] = dice[:, i]
    ths = data["metrics"]["objects"]["thresholds"]
    for c in classes[1:]:
        counts = pooled[f"obj:{c}"].reshape(-1, len(ths), 6)
        t, f_p, f_n, n_true = counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3]
        s = counts[..., 5]

        def z(x: np.ndarray, tp: np.ndarray = t) -> np.ndarray:  # StarDist: 0 when nothing matched
            return np.where(tp > 0, np.nan_to_num(x), 0.0)

        fields = {"precision": z(_div(t, t + f_p)), "recall": z(_div(t, t + f_n)),
                  "f1": z(_div(2 * t, 2 * t + f_p + f_n)), "accuracy": z(_div(t, t + f_p + f_n)),
                  "panoptic_quality": np.nan_to_num(_div(s, t + f_p / 2 + f_n / 2))}
        del n_true
        for name in _OBJ_FIELDS:
            for j, th in enumerate(ths):
                out[f"objects.{c}.{name}@{th:g}"] = fields[name][:, j]
        out[f"objects.{c}.mean_accuracy"] = fields["accuracy"].mean(axis=1) if ths else np.zeros(len(t))
    return out


def flat_metrics(data: dict[str, Any]) -> dict[str, float | None]:
    """Every named dataset value of an evaluation (``None`` where undefined)."""
    stats = _stats(data)
    pooled = {k: v.sum(axis=0, keepdims=True) for k, v in stats.items()}
    return {k: (None if np.isnan(v[0]) else float(v[0])) for k, v in _values(data, pooled).items()}


def _align(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` with its per-image rows in ``a``'s order (paired by image and label bytes)."""
    key = {(r["image_sha256"], r["label_sha256"]): r for r in b["per_image"]}
    rows = [key.get((r["image_sha256"], r["label_sha256"])) for r in a["per_image"]]
    if any(r is None for r in rows) or len(rows) != len(b["per_image"]):
        raise UsageError("the two evaluations are not on the same images", hint="compare on one dataset")
    return {**b, "per_image": rows}


def compare_evaluations(a: dict[str, Any], b: dict[str, Any], *, n_boot: int = N_BOOT, seed: int = SEED,
                        metrics: list[str] | None = None) -> dict[str, Any]:
    """B - A per metric with a paired 95% bootstrap interval; ``better`` names the side the interval favours."""
    if a["dataset"]["digest"] != b["dataset"]["digest"]:
        raise UsageError(f"A and B were evaluated on different datasets ({a['dataset']['digest'][:19]}... vs "
                         f"{b['dataset']['digest'][:19]}...)", hint="evaluate both on the same --images/--labels")
    if a["definition"] != b["definition"]:
        raise UsageError(f"A and B use different metric definitions ({a['definition']} vs {b['definition']})",
                         hint="re-evaluate with this czregistry")
    if a["task"] != b["task"]:
        raise UsageError(f"cannot compare a {a['task']} model with a {b['task']} model")
    b = _align(a, b)
    n_img = len(a["per_image"])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_img, np.full(n_img, 1.0 / n_img), size=n_boot).astype(np.float64)
    sa, sb = _stats(a), _stats(b)
    va = _values(a, {k: weights @ v for k, v in sa.items()})
    vb = _values(b, {k: weights @ v for k, v in sb.items()})
    pa, pb = flat_metrics(a), flat_metrics(b)
    names = metrics or _default_metrics(a, b)
    rows = []
    for name in names:
        if name not in pa or name not in pb:
            continue
        x, y = pa[name], pb[name]
        row: dict[str, Any] = {"metric": name, "a": x, "b": y, "difference": None, "ci95": None, "better": None}
        if x is not None and y is not None:
            d = vb[name] - va[name]
            d = d[np.isfinite(d)]
            row["difference"] = y - x
            if d.size:
                lo, hi = (float(q) for q in np.percentile(d, [2.5, 97.5]))
                row["ci95"] = [lo, hi]
                up = "B" if name not in LOWER_IS_BETTER else "A"
                down = "A" if up == "B" else "B"
                row["better"] = up if lo > 0 else down if hi < 0 else "neither"
        rows.append(row)
    return {"dataset": a["dataset"]["digest"], "definition": a["definition"], "images": n_img,
            "bootstrap": {"resamples": n_boot, "seed": seed, "interval": "percentile 2.5..97.5 of B - A",
                          "paired": True},
            "a": a["package"], "b": b["package"], "metrics": rows}


def _default_metrics(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    if a["task"] == "regression":
        return ["psnr", "ssim", "mae", "rmse"]
    classes = [c for c in a["package"]["classes"] if c in (b["package"]["classes"] or [])]
    names = ["mean_iou", "mean_dice", "pixel_accuracy", *(f"iou.{c}" for c in classes),
             *(f"dice.{c}" for c in classes)]
    for c in classes[1:]:
        names += [f"objects.{c}.f1@0.5", f"objects.{c}.accuracy@0.5", f"objects.{c}.mean_accuracy"]
    return names
