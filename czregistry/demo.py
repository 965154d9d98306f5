"""The README's main job, end to end, on an embedded example: pack -> validate -> publish -> pull -> run ->
evaluate (against the generated image's known ground truth).

Everything is generated here (model with hand-set weights, synthetic image), so it runs on a fresh machine
with no data and no network. Each step uses the same public library call a user would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODEL_NAME", "DemoResult", "run_demo", "side_by_side_png"]

DEMO_MODEL_NAME = "example-nuclei"
DEMO_VERSION = "1.0.0"
DEMO_TILE = (256, 256)


@dataclass
class DemoResult:
    package: str
    valid: bool
    published: dict[str, Any]
    pulled: str
    image: str
    output: str
    picture: str
    run: dict[str, Any]
    findings: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    report: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def side_by_side_png(image: Any, labels: Any, path: Path, max_side: int = 384) -> Path:
    """Input (grey) and the predicted mask (nuclei in colour over the input), next to each other.

    A full-resolution crop of at most ``max_side`` pixels from the image centre, so single nuclei and
    their outlines are visible rather than averaged away."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    y0, x0 = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    window = (slice(y0, y0 + max_side), slice(x0, x0 + max_side))
    img = np.asarray(image[window], dtype=np.float32)
    img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-6)).astype(np.uint8)
    lab = np.asarray(labels[window]) > 0
    left = np.stack([img] * 3, axis=-1)
    right = left.copy()
    right[lab] = (0.4 * right[lab] + 0.6 * np.array([255, 64, 160])).astype(np.uint8)
    gap = np.full((img.shape[0], 8, 3), 255, dtype=np.uint8)
    from .package import atomic_output

    with atomic_output(path) as tmp:
        Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(tmp, format="PNG")
    return path


def run_demo(workdir: Path | str, *, registry: str | None = None, size: int = 2048,
             echo: Callable[[str], None] = print, quiet: bool = True, create: bool = True) -> DemoResult:
    """The six steps. ``create=False`` (the CLI): a registry named by ``registry`` or ``CZREG_REGISTRY`` must
    exist, as for every other command (only the per-user default is created); checked before anything is
    written, so a typo costs nothing."""
    import numpy as np
    import tifffile

    given = registry or os.environ.get("CZREG_REGISTRY")
    if not create and given:  # the rule of every other command (registry.api.open_registry), before any work
        from .registry.location import require_existing, resolve_location

        require_existing(resolve_location(registry), given)

    from .examples import EXAMPLE_CLASSES, EXAMPLE_NORMALIZATION, build_example_model, synthetic_nuclei
    from .pack.core import pack
    from .registry.api import open_registry
    from .report import render_text
    from .run.plan import RunOptions
    from .run.runner import run
    from .validate import validate

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    package = work / "nuclei.czann"

    echo(f"1/6 pack: example Keras model + normalize layer -> {package}")
    norm = EXAMPLE_NORMALIZATION
    pack(build_example_model(),
         {"Type": "SingleClassSemanticSegmentation", "Classes": EXAMPLE_CLASSES, "MinOverlap": [8, 8],
          "ModelName": "Example nuclei segmentation"},
         package, preprocessing=[f"normalize:mean={norm['mean']},std={norm['std']}"], spatial_dims=DEMO_TILE)

    echo("2/6 validate (archive, schema, metadata, model checks)")
    report = validate(package)
    echo("    " + render_text(report, verbose=False).replace("\n", "\n    "))

    echo(f"3/6 publish {DEMO_MODEL_NAME} {DEMO_VERSION} to the registry")
    with open_registry(registry, create=create) as reg:
        published = reg.publish(package, name=DEMO_MODEL_NAME, version=DEMO_VERSION)
        pub = published.to_dict()
        echo(f"    {published.status}: {pub.get('name', DEMO_MODEL_NAME)} {pub.get('version', DEMO_VERSION)} "
             f"{str(pub.get('digest', ''))[:23]}...  (registry: {reg.location.display()})")
        spec = f"{DEMO_MODEL_NAME}>=1,<2"
        echo(f"4/6 pull \"{spec}\"")
        (work / "pulled").mkdir(exist_ok=True)
        pulled = reg.pull(spec, work / "pulled")
        echo(f"    -> {pulled.path}")

    echo(f"5/6 run tiled on a generated {size}x{size} image")
    image = work / "nuclei.tif"
    pixels, truth = synthetic_nuclei(size, size, seed=1)
    tifffile.imwrite(image, pixels)
    output = work / "nuclei-labels.ome.tiff"
    result = run(pulled.path, image, output, RunOptions(output_kind="labels"))
    labels = tifffile.imread(output)
    labels = np.squeeze(labels)
    picture = side_by_side_png(pixels, labels, work / "side_by_side.png")
    echo(f"    {result.tiles} tiles in {result.seconds:.1f} s on {result.backend}/{result.device}; "
         f"nucleus pixels: {float((labels > 0).mean()):.1%}")
    echo(f"output: {output}")
    echo(f"picture (input | prediction): {picture}")

    evaluation, html = _evaluate(pulled.path, work, pixels, truth, echo)
    return DemoResult(str(package), report.valid, pub, str(pulled.path), str(image), str(output), str(picture),
                      result.to_dict(), [f"{f.severity.value}: {f.check}" for f in report.findings
                                         if f.severity.value != "info"], evaluation, str(html))


def _evaluate(package: Path, work: Path, pixels: Any, truth: Any, echo: Callable[[str], None]
              ) -> tuple[dict[str, Any], Path]:
    """Step 6: the generated image's ground truth is known (inside an ellipse = nucleus), so measure."""
    import tifffile
    from PIL import Image

    from .evaluate import EvalOptions, evaluate
    from .evaluate.report_html import write_report

    images, labels = work / "eval" / "images", work / "eval" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(images / "nuclei.tif", pixels)
    Image.fromarray(truth).save(labels / "nuclei.png")
    echo("6/6 evaluate against the generated image's ground truth")
    ev = evaluate(package, images, labels, EvalOptions(keep_worst=1))
    m = ev.data["metrics"]
    obj = m["objects"]["classes"]["nucleus"][0]
    echo(f"    IoU nucleus {m['iou']['nucleus']:.3f}, background {m['iou']['background']:.3f}; mean IoU "
         f"{m['mean_iou']:.3f}; pixel accuracy {m['pixel_accuracy']:.3f}")
    echo(f"    objects at IoU 0.5 (StarDist matching): {obj['tp']} matched of {obj['n_true']} true / "
         f"{obj['n_pred']} predicted; precision {obj['precision']:.3f}, recall {obj['recall']:.3f}, "
         f"F1 {obj['f1']:.3f}")
    html = write_report(work / "evaluation.html", ev)
    echo(f"evaluation report: {html}")
    return ev.data["metrics"], html
