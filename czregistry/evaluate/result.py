"""What an evaluation produces: its JSON data and the previews of its worst images. A leaf module, so the
engine that makes them and the HTML report that draws them both import it (no circle, not even for types).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Evaluation", "Preview"]


@dataclass
class Preview:
    """Downsampled input (uint8 grey/RGB), label and prediction of one image (first plane / middle slice)."""

    stem: str
    score: float
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray


@dataclass
class Evaluation:
    data: dict[str, Any]
    previews: list[Preview] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.data
