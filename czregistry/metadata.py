"""One normalised view of a package's metadata, whatever its format and version.

Checks, the runner and the registry need the same few facts (type, shapes, tile, border, classes,
channels); ``ModelInfo`` derives them once so nobody re-parses CZANN JSON or CZMODEL XML by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .package import Package

__all__ = ["CLASSIFICATION_TYPES", "MODEL_TYPES", "PIXEL_TYPE_CHANNELS", "SEGMENTATION_TYPES", "ModelInfo"]

PIXEL_TYPE_CHANNELS = {
    "Gray8": 1, "Gray16": 1, "Gray32Float": 1, "Bgr24": 3, "Bgr48": 3, "Bgr96Float": 3, "Bgra32": 4,
    "Gray64ComplexFloat": 1, "Bgr192ComplexFloat": 3,
}
SEGMENTATION_TYPES = frozenset({
    "SingleClassInstanceSegmentation", "MultiClassInstanceSegmentation",
    "SingleClassSemanticSegmentation", "MultiClassSemanticSegmentation",
})
CLASSIFICATION_TYPES = frozenset({"SingleClassClassification", "MultiClassClassification"})
#: Types whose output is an image the same size as the input (and so must tile without seams).
DENSE_TYPES = SEGMENTATION_TYPES | {"Regression"}
#: Every model Type the CZANN schema allows, in the order the format facts list them (``czreg pack --type``).
MODEL_TYPES = ("SingleClassInstanceSegmentation", "MultiClassInstanceSegmentation", "SingleClassSemanticSegmentation",
               "MultiClassSemanticSegmentation", "SingleClassClassification", "MultiClassClassification",
               "ObjectDetection", "Regression")


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


@dataclass(frozen=True)
class ModelInfo:
    """Facts from metadata. ``None`` means the metadata does not say (legacy packages give no shapes)."""

    kind: str  # "czann" | "czmodel"
    type: str | None
    input_shape: tuple[int, ...] | None  # without batch: [h, w, c] or [z, h, w, c]
    output_shape: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    min_overlap: tuple[int, ...] | None
    border: tuple[int, ...] | None  # per spatial dim; MinOverlap/2 or legacy BorderSize
    input_channels: int | None
    scaling: tuple[float, ...] | None
    name: str | None
    id: str | None
    format_version: str | None
    #: Input facts, derived here once so every path that feeds pixels (run, Dask, smoke, evaluate, validate)
    #: agrees: legacy ``Bgr*`` pixel types take colour in BGR order; ``ColorHandling`` (``SplitRgb`` keeps RGB
    #: channels apart instead of converting to monochrome). See ``czregistry.run.adapt.InputAdapter``.
    bgr: bool = False
    color_handling: str | None = None

    @property
    def spatial_ndim(self) -> int | None:
        if self.input_shape is not None:
            return len(self.input_shape) - 1
        return 2 if self.kind == "czmodel" else None

    @property
    def tile(self) -> tuple[int, ...] | None:
        return self.input_shape[:-1] if self.input_shape else None

    @property
    def output_channels(self) -> int | None:
        if self.output_shape:
            return self.output_shape[-1]
        return len(self.classes) if self.classes else None

    @property
    def is_segmentation(self) -> bool:
        return self.type in SEGMENTATION_TYPES

    @property
    def is_dense(self) -> bool:
        return self.type in DENSE_TYPES

    @classmethod
    def from_metadata(cls, kind: str, meta: dict[str, Any]) -> ModelInfo:
        if kind == "czmodel":
            channels = meta.get("Channels") or []
            n_ch = sum(PIXEL_TYPE_CHANNELS.get(str(c.get("PixelType")), 0) for c in channels
                       if isinstance(c, dict)) or None
            names = tuple(str(c.get("Name")) for c in meta.get("TrainingClasses") or [] if isinstance(c, dict))
            border = meta.get("BorderSize")
            b = (border, border) if isinstance(border, int) else None
            bgr = any(str(c.get("PixelType", "")).startswith("Bgr") for c in channels if isinstance(c, dict))
            color = meta.get("ColorHandling") if isinstance(meta.get("ColorHandling"), str) else None
            return cls(kind, "MultiClassSemanticSegmentation" if len(names) > 2 else
                       "SingleClassSemanticSegmentation", None, None, names or None,
                       tuple(2 * v for v in b) if b else None, b, n_ch, None,
                       meta.get("ModelName"), meta.get("Id"), meta.get("Version"), bgr, color)
        inp, out = _ints(meta.get("InputShape")), _ints(meta.get("OutputShape"))
        overlap = _ints(meta.get("MinOverlap"))
        classes_raw = meta.get("Classes")
        classes: tuple[str, ...] | None = tuple(str(c) for c in classes_raw) if isinstance(classes_raw, list) else None
        scaling_raw = meta.get("Scaling")
        scaling = (tuple(float(v) for v in scaling_raw)
                   if isinstance(scaling_raw, list) and all(isinstance(v, int | float) for v in scaling_raw)
                   else None)
        return cls(kind, meta.get("Type") if isinstance(meta.get("Type"), str) else None, inp, out, classes,
                   overlap, tuple(v // 2 for v in overlap) if overlap else None,
                   inp[-1] if inp else None, scaling, meta.get("ModelName"), meta.get("Id"),
                   meta.get("FormatVersion"), False,
                   meta.get("ColorHandling") if isinstance(meta.get("ColorHandling"), str) else None)

    @classmethod
    def from_package(cls, package: Package) -> ModelInfo:
        return cls.from_metadata(package.kind, package.metadata or {})
