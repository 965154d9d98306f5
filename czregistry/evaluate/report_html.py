"""Pictures of an evaluation: overlay PNGs and one self-contained HTML report.

The report has no external references at all (pictures are inlined PNG data URIs, the chart is inline
SVG, the style is inline), so it can be mailed or attached to a ticket and still render.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..report import printable

if TYPE_CHECKING:
    from .result import Evaluation, Preview

__all__ = ["overlay_panels", "render_report", "write_overlay_png", "write_report"]

_PALETTE = np.array([[0, 0, 0], [255, 64, 160], [40, 190, 255], [255, 200, 0], [90, 220, 90], [170, 110, 255],
                     [255, 120, 40], [0, 210, 190]], np.float32)
_GAP = 6


def _colour(c: int) -> tuple[int, int, int]:
    r, g, b = _PALETTE[1 + (c - 1) % (len(_PALETTE) - 1)] if c else _PALETTE[0]
    return int(r), int(g), int(b)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == 2 else grey[..., :3]


def _overlay(base: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Classes > 0 tinted over the (dimmed) input, with full-colour outlines."""
    out = _rgb(base).astype(np.float32) * 0.8
    edge = np.zeros(classes.shape, bool)
    edge[:-1] |= classes[:-1] != classes[1:]
    edge[1:] |= classes[1:] != classes[:-1]
    edge[:, :-1] |= classes[:, :-1] != classes[:, 1:]
    edge[:, 1:] |= classes[:, 1:] != classes[:, :-1]
    for c in np.unique(classes):
        if c == 0:
            continue
        colour = np.array(_colour(int(c)), np.float32)
        m = classes == c
        out[m] = 0.55 * out[m] + 0.45 * colour
        out[m & edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    v = values[..., 0] if values.ndim == 3 else values
    return (np.clip(v, 0, 1) * 255).astype(np.uint8)


def overlay_panels(preview: Preview, task: str) -> np.ndarray:
    """input | label overlay | prediction overlay (regression: input | target | prediction), RGB uint8."""
    base = preview.image
    if task == "segmentation":
        panels = [_rgb(base), _overlay(base, np.asarray(preview.label)), _overlay(base, np.asarray(preview.pred))]
    else:
        panels = [_rgb(base), _rgb(_grey(preview.label)), _rgb(_grey(preview.pred))]
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, _GAP, 3), 255, np.uint8)
    row: list[np.ndarray] = []
    for p in panels:
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], *p.shape[1:]), 255, np.uint8)])
        row += [p, gap]
    return np.concatenate(row[:-1], axis=1)


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_overlay_png(path: Path, preview: Preview, task: str, n_classes: int) -> Path:
    from ..package import atomic_output

    del n_classes
    with atomic_output(path) as tmp:
        tmp.write_bytes(_png_bytes(overlay_panels(preview, task)))
    return path


def _e(text: Any) -> str:
    """Text from the package or the data set (class names, the model name, file names), inert in HTML:
    control and bidi characters written as escapes (``printable``), then HTML-escaped, quotes included
    (``alt='...'`` is an attribute)."""
    return html.escape(printable(text), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(str(v))


def _bar_chart(metrics: dict[str, Any], classes: list[str]) -> str:
    """Inline SVG: IoU and Dice bars per class (0..1), values written on the bars."""
    width, row_h, left, bar_w = 640, 44, 150, 440
    height = 40 + row_h * len(classes)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="IoU and Dice per class" style="font:12px sans-serif">']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * bar_w
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 16}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{height - 2}" text-anchor="middle" fill="#666">{t:g}</text>')
    parts.append('<rect x="150" y="2" width="10" height="10" fill="#3b6fd8"/><text x="164" y="11">IoU</text>'
                 '<rect x="210" y="2" width="10" height="10" fill="#f0a030"/><text x="224" y="11">Dice</text>')
    for i, c in enumerate(classes):
        y = 24 + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 20}" text-anchor="end">{_e(c)}</text>')
        for j, (key, colour) in enumerate((("iou", "#3b6fd8"), ("dice", "#f0a030"))):
            v = metrics[key].get(c)
            yy = y + j * 17
            if v is None:
                parts.append(f'<text x="{left + 4}" y="{yy + 12}" fill="#999">n/a (class absent)</text>')
                continue
            w = max(1.0, v * bar_w)
            parts.append(f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="15" fill="{colour}"/>'
                         f'<text x="{left + w + 4:.1f}" y="{yy + 12}">{v:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.meta{color:#555;font-size:12px}
.kpi{display:inline-block;margin:6px 18px 6px 0}.kpi b{display:block;font-size:24px}
figure{margin:10px 0 18px}figcaption{font-size:12px;color:#444}img{max-width:100%;image-rendering:pixelated}
code{font-size:12px}"""


def render_report(evaluation: Evaluation) -> str:
    d = evaluation.data
    m, pkg, ds = d["metrics"], d["package"], d["dataset"]
    title = f"Evaluation of {pkg.get('name') or pkg.get('file')}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>",
           f"<p class='meta'>package sha256:{_e(pkg['sha256'])} ({_e(str(pkg.get('type')))})<br>"
           f"dataset {_e(ds['digest'])}: {ds['images']} image(s), {ds['planes']} plane(s) from "
           f"<code>{_e(ds['images_dir'])}</code><br>definition <code>{_e(d['definition'])}</code>"
           f" &middot; {_e(d['inference']['backend'])}/{_e(d['inference']['device'])} &middot; "
           f"{_e(d['created_at'])} &middot; czregistry {_e(d['czregistry_version'])}</p>"]
    if d["task"] == "segmentation":
        classes = pkg["classes"]
        out.append("".join(f"<div class='kpi'>{k}<b>{_fmt(m[k])}</b></div>"
                           for k in ("mean_iou", "mean_dice", "pixel_accuracy")))
        out.append("<h2>Per class</h2>" + _bar_chart(m, classes))
        out.append(_table(["class", "IoU", "Dice"], [[c, m["iou"][c], m["dice"][c]] for c in classes]))
        out.append("<h2>Confusion matrix</h2><p class='meta'>rows: label, columns: prediction (pixels)</p>")
        out.append(_table(["label \\ prediction", *classes],
                          [[c, *row] for c, row in zip(classes, m["confusion"])]))
        obj = m["objects"]
        out.append(f"<h2>Objects</h2><p class='meta'>{_e(obj['matching'])}; connectivity "
                   f"{_e(obj['connectivity'])}. accuracy = TP/(TP+FP+FN).</p>")
        for c, rows in obj["classes"].items():
            out.append(f"<h3>{_e(c)} (mean accuracy over thresholds {obj['mean_accuracy'][c]:.3f})</h3>")
            out.append(_table(["IoU thresh", "TP", "FP", "FN", "precision", "recall", "F1", "accuracy"],
                              [[r["thresh"], r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"],
                                r["accuracy"]] for r in rows]))
        per = sorted(d["per_image"], key=lambda r: (r["mean_iou"] if r["mean_iou"] is not None else 0.0))
        fg = classes[1:]
        per_rows = [[r["image"], r["mean_iou"], r["pixel_accuracy"], *(r["f1@0.5"].get(c) for c in fg)] for r in per]
        per_head = ["image", "mean IoU", "pixel accuracy", *(f"F1@0.5 {c}" for c in fg)]
        legend = ", ".join(f"<span style='color:rgb{_colour(i)}'>&#9632;</span> {_e(c)}"
                           for i, c in enumerate(classes) if i)
        caption = f"input | label | prediction &middot; {legend}"
    else:
        out.append("".join(f"<div class='kpi'>{k}<b>{_fmt(m[k])}</b></div>" for k in ("psnr", "ssim", "mae", "rmse")))
        per = sorted(d["per_image"], key=lambda r: (r["psnr"] if r["psnr"] is not None else 0.0))
        per_rows = [[r["image"], r["psnr"], r["ssim"], r["mae"], r["rmse"]] for r in per]
        per_head = ["image", "PSNR (dB)", "SSIM", "MAE", "RMSE"]
        caption = "input | target | prediction"
    if evaluation.previews:
        out.append(f"<h2>Worst {len(evaluation.previews)} image(s)</h2>")
        for pv in evaluation.previews:
            data = base64.b64encode(_png_bytes(overlay_panels(pv, d["task"]))).decode()
            out.append(f"<figure><img alt='{_e(pv.stem)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption><b>{_e(pv.stem)}</b> (score {pv.score:.3f}): {caption}</figcaption>"
                       "</figure>")
    out.append("<h2>Per image (worst first)</h2>" + _table(per_head, per_rows))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: Path | str, evaluation: Evaluation) -> Path:
    from ..package import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(render_report(evaluation), encoding="utf-8")
    return path
