"""Measured quality on labelled images, bound to the package bytes, the dataset bytes and the metric
definitions (``metrics.DEFINITION``). See docs/evaluate.md.

- ``engine.evaluate``: run a package tiled over a labelled dataset and measure it;
- ``metrics``: the definitions (pixel classes, StarDist object matching, regression);
- ``compare``: flat metric names and a paired bootstrap between two evaluations;
- ``gate``: publish gates; ``report_html``: overlays and the HTML report;
- ``sources``: a package file or a registry reference, as a local file.
"""

from __future__ import annotations

from .compare import compare_evaluations, flat_metrics
from .engine import EvalOptions, Evaluation, evaluate
from .metrics import DEFINITION

__all__ = ["DEFINITION", "EvalOptions", "Evaluation", "compare_evaluations", "evaluate", "flat_metrics"]
