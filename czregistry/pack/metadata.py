"""Package metadata as packing writes it: the CZANN ``model.json`` object and legacy CZMODEL XML.

Split from ``czregistry.pack`` (which re-exports the public names) so the metadata rules can be read on
their own: which fields a spec or caller may give, how legacy fields map to CZANN ones, and the exact XML a
CZMODEL host expects.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any
from xml.etree import ElementTree

from ..errors import UsageError
from ..metadata import PIXEL_TYPE_CHANNELS, SEGMENTATION_TYPES

__all__ = ["CZANN_FORMAT_VERSION", "LEGACY_XML_VERSION", "legacy_xml"]

CZANN_FORMAT_VERSION = "2.1.0"
LEGACY_XML_VERSION = "3.1.0"
#: Namespace for content-derived model ids (a fixed, arbitrary UUID).
_ID_NAMESPACE = uuid.UUID("6f1d3c0e-9a57-4b8e-8d52-2c0b7f4e9a11")

_CZANN_KEYS = ("FormatVersion", "Id", "Type", "InputShape", "OutputShape", "MinOverlap", "Classes", "ModelName",
               "Scaling")
_LEGACY_KEYS = ("BorderSize", "ColorHandling", "PixelType", "Postprocessing")
_COLOR_HANDLING = ("ConvertToMonochrome", "SplitRgb")
#: Distinct, stable colours for legacy TrainingClasses (R, G, B).
_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def _content_id(model_bytes: bytes, metadata: dict[str, Any]) -> str:
    """A UUID derived from the model and metadata, so repacking the same inputs gives the same archive."""
    h = hashlib.sha256(model_bytes)
    h.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    return str(uuid.uuid5(_ID_NAMESPACE, h.hexdigest()))


def _default_pixel_types(channels: int) -> list[str]:
    defaults = {1: ["Gray8"], 3: ["Bgr24"], 4: ["Bgra32"]}
    if channels not in defaults:
        raise UsageError(f"the model takes {channels} input channels; say which pixel types feed them",
                         hint="pass PixelType (--pixel-type), e.g. Gray8 and Bgr24 for 4 channels")
    return defaults[channels]


def legacy_xml(meta: dict[str, Any], channels: int, output_channels: int) -> tuple[bytes, list[str]]:
    """Build CZMODEL 3.1.0 XML from metadata; returns the XML bytes and warnings."""
    notes: list[str] = []
    model_id = str(meta["Id"])
    pixel_types = meta.get("PixelType") or _default_pixel_types(channels)
    if isinstance(pixel_types, str):
        pixel_types = [pixel_types]
    unknown = [p for p in pixel_types if p not in PIXEL_TYPE_CHANNELS]
    if unknown:
        raise UsageError(f"unknown pixel type(s) {', '.join(map(str, unknown))}",
                         hint=f"use {', '.join(PIXEL_TYPE_CHANNELS)}")
    total = sum(PIXEL_TYPE_CHANNELS[p] for p in pixel_types)
    if total != channels:
        raise UsageError(f"pixel types {pixel_types} give {total} channels but the model takes {channels}")
    color = meta.get("ColorHandling") or ("ConvertToMonochrome" if channels == 1 else "SplitRgb")
    if color not in _COLOR_HANDLING:
        raise UsageError(f"ColorHandling '{color}' is not one of {', '.join(_COLOR_HANDLING)}")
    classes = meta.get("Classes")
    if not classes:
        classes = [f"Class {i + 1}" for i in range(output_channels)]
        notes.append(f"no class names given; legacy TrainingClasses named {', '.join(classes)}")
    if len(classes) != output_channels:
        raise UsageError(f"{len(classes)} classes given but the model outputs {output_channels} channels")
    border = meta.get("BorderSize")
    if border is None:
        overlap = meta.get("MinOverlap")
        border = int(max(overlap)) // 2 if overlap else 0
    root = ElementTree.Element("Model", {"Version": LEGACY_XML_VERSION})
    for tag, text in (("Id", model_id), ("ModelName", str(meta.get("ModelName") or "DNN model")),
                      ("Status", "Trained"), ("FeatureExtractor", "DeepNeuralNetwork"),
                      ("Postprocessing", str(meta.get("Postprocessing") or "")), ("ColorHandling", color)):
        ElementTree.SubElement(root, tag).text = text
    channels_el = ElementTree.SubElement(root, "Channels")
    for p in pixel_types:
        ElementTree.SubElement(channels_el, "Item", {"PixelType": p})
    classes_el = ElementTree.SubElement(root, "TrainingClasses")
    for i, name in enumerate(classes):
        r, g, b = _PALETTE[i % len(_PALETTE)]
        ElementTree.SubElement(classes_el, "Item", {"Name": str(name), "LabelValue": str(i + 1),
                                                    "colR": str(r), "colG": str(g), "colB": str(b)})
    ElementTree.SubElement(root, "BorderSize").text = str(int(border))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n", notes


def _czann_metadata(meta: dict[str, Any], style: str | None, input_shape: list[int],
                    output_shape: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"FormatVersion": CZANN_FORMAT_VERSION}
    mtype = meta.get("Type")
    if mtype is None and style == "legacy":
        n = len(meta.get("Classes") or []) or output_shape[-1]
        mtype = "MultiClassSemanticSegmentation" if n > 2 else "SingleClassSemanticSegmentation"
    if mtype is None:
        raise UsageError("metadata needs a model Type", hint="pass --type, e.g. SingleClassSemanticSegmentation")
    out["Id"] = meta.get("Id")
    out["Type"] = mtype
    out["InputShape"] = input_shape
    if len(output_shape) == 1 and len(input_shape) > 1:
        # one vector per image (a classifier, e.g. a torchvision ResNet): the format's form is [1, 1, classes]
        output_shape = [1] * (len(input_shape) - 1) + output_shape
    out["OutputShape"] = output_shape
    overlap = meta.get("MinOverlap")
    if overlap is None and style == "legacy" and meta.get("BorderSize") is not None:
        overlap = [2 * int(meta["BorderSize"])] * (len(input_shape) - 1)
    if isinstance(overlap, int):
        overlap = [overlap]
    if isinstance(overlap, list | tuple) and len(overlap) == 1:
        overlap = list(overlap) * (len(input_shape) - 1)
    if overlap is not None:
        out["MinOverlap"] = [int(v) for v in overlap]
    for key in ("Classes", "ModelName", "Scaling"):
        if meta.get(key) is not None:
            out[key] = list(meta[key]) if isinstance(meta[key], list | tuple) else meta[key]
    if out.get("Classes") is not None and mtype in SEGMENTATION_TYPES and len(out["Classes"]) != output_shape[-1]:
        raise UsageError(f"{len(out['Classes'])} classes given but the model outputs {output_shape[-1]} channels")
    return out
