"""Publish gates: ``--gate "mean_iou>=0.8"`` bounds and ``--no-regression-from NAME@ALIAS``.

A gate names a flat metric (``czregistry.evaluate.compare.flat_metrics``), a comparison and a bound. An
undefined value (a class absent from labels and predictions) fails its gate: a gate is a promise about a
number, and there is none. ``--no-regression-from`` refuses when the candidate is worse than the baseline
on a gated metric (or the headline metric: ``mean_iou``, ``psnr`` for regression) *and* the paired 95%
bootstrap interval of the difference lies entirely on the worse side: a drop the data can show.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError, UsageError
from .compare import LOWER_IS_BETTER, compare_evaluations, flat_metrics, headline_metric

if TYPE_CHECKING:
    from ..registry.records import RegistryClient
    from .engine import EvalOptions

__all__ = ["Gate", "check_gates", "check_no_regression", "evaluation_failures", "parse_gate", "refuse"]

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                   "<": operator.lt}
_GATE = re.compile(r"^\s*([A-Za-z0-9_.@ -]+?)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_gate(text: str) -> Gate:
    m = _GATE.match(text)
    if m is None:
        raise UsageError(f"invalid gate '{text}'", hint='write METRIC>=VALUE, e.g. --gate "mean_iou>=0.8"')
    return Gate(m.group(1).strip(), m.group(2), float(m.group(3)))


def _known(name: str, values: dict[str, Any]) -> None:
    if name not in values:
        close = [k for k in values if name.split(".")[0] in k][:6] or list(values)[:6]
        raise UsageError(f"unknown metric '{name}' in a gate", hint="known metrics include " + ", ".join(close))


def check_gates(data: dict[str, Any], gates: list[Gate]) -> list[str]:
    """One line per failed gate, naming the metric, its value and the bound (empty: all passed)."""
    values = flat_metrics(data)
    failures = []
    for g in gates:
        _known(g.metric, values)
        v = values[g.metric]
        if v is None:
            failures.append(f"{g.metric} is undefined (no such pixels in labels or predictions), gate {g}")
        elif not _OPS[g.op](v, g.bound):
            failures.append(f"{g.metric} = {v:.4f}, gate {g}")
    return failures


def check_no_regression(candidate: dict[str, Any], baseline: dict[str, Any], gates: list[Gate],
                        baseline_label: str) -> list[str]:
    """One line per metric on which the candidate is significantly worse than ``baseline``."""
    names = list(dict.fromkeys(g.metric for g in gates)) or [headline_metric(candidate)]
    values = flat_metrics(candidate)
    for n in names:
        _known(n, values)
    cmp = compare_evaluations(baseline, candidate, metrics=names)
    failures = []
    for row in cmp["metrics"]:
        if row["better"] == "A":  # A = baseline
            lo, hi = row["ci95"]
            failures.append(f"{row['metric']} = {row['b']:.4f} vs {row['a']:.4f} for {baseline_label} "
                            f"(difference {row['difference']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]"
                            f"{', lower is better' if row['metric'] in LOWER_IS_BETTER else ''})")
    return failures


def refuse(path_name: str, failures: list[str]) -> RegistryError:
    return RegistryError(f"{path_name} failed its gate: " + "; ".join(failures) + "; not published",
                         hint="improve the model, or change the gate")


def evaluation_failures(reg: RegistryClient | None, data: dict[str, Any], gates: list[Gate], baseline: str | None,
                        images: Path, labels: Path, eval_options: EvalOptions | None = None) -> list[str]:
    """The failed gates of evaluation ``data``, and its significant regressions from ``baseline`` (its
    recorded evaluation on the same dataset, else evaluated now)."""
    from .engine import evaluate
    from .sources import package_file

    failures = check_gates(data, gates)
    if baseline is not None:
        if reg is None:
            raise UsageError("--no-regression-from needs a registry", hint="give --registry")
        version = reg.resolve(baseline).version
        digest = version["digest"].removeprefix("sha256:")
        recorded = reg.find_evaluations(digest, data["dataset"]["digest"], data["definition"])
        if recorded:
            base = recorded[-1]
        else:
            with package_file(baseline, reg) as (base_path, _):
                base = evaluate(base_path, images, labels, eval_options).data
        failures += check_no_regression(data, base, gates, f"{version['name']} {version['version']}")
    return failures
