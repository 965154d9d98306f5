"""Metadata and dummy model bytes for static tests (no TensorFlow needed).

Packages built from these are only valid for ``--static`` / ``ValidateOptions(static=True)``: the model
member merely starts like an ONNX file.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["ONNX_BYTES", "czann_meta", "legacy_xml"]

#: Starts like an ONNX ModelProto (field 1, ir_version), so the reader sniffs "onnx"; not a runnable model.
ONNX_BYTES = b"\x08\x07\x12\x07tf2onnx" + b"\x00" * 64


def czann_meta(**overrides: Any) -> dict[str, Any]:
    """Valid CZANN 2.1.0 metadata for a 2-class 64x64 segmentation model; ``Key=None`` removes a key."""
    meta: dict[str, Any] = {
        "FormatVersion": "2.1.0", "Id": str(uuid.uuid4()), "Type": "SingleClassSemanticSegmentation",
        "InputShape": [64, 64, 1], "OutputShape": [64, 64, 2], "MinOverlap": [16, 16],
        "Classes": ["background", "cell"], "ModelName": "test",
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def legacy_xml(version: str = "3.1.0", model_id: str | None = None, *, pixel_types: tuple[str, ...] = ("Gray8",),
               classes: tuple[tuple[str, int], ...] = (("background", 1), ("nucleus", 2)), border: int = 16,
               color_handling: str = "ConvertToMonochrome") -> bytes:
    """Legacy CZMODEL XML metadata (``{Id}.xml``) in the layout of the format facts."""
    channels = "".join(f'<Item PixelType="{p}" />' for p in pixel_types)
    items = "".join(f'\n    <Item><Name>{name}</Name><LabelValue>{value}</LabelValue>'
                    f'<Color colR="{(37 * value) % 256}" colG="0" colB="0" /></Item>' for name, value in classes)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<Model Version="{version}">
  <Id>{model_id or uuid.uuid4()}</Id>
  <ModelName>nuclei</ModelName>
  <Status>Trained</Status>
  <FeatureExtractor>DeepNeuralNetwork</FeatureExtractor>
  <Postprocessing />
  <ColorHandling>{color_handling}</ColorHandling>
  <Channels>{channels}</Channels>
  <TrainingClasses>{items}
  </TrainingClasses>
  <BorderSize>{border}</BorderSize>
</Model>
""".encode()
