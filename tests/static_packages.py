"""Metadata and dummy model bytes for static tests (no TensorFlow needed).

Packages built from these are only valid for ``--static`` / ``ValidateOptions(static=True)``: the model
member merely starts like an ONNX file.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["ONNX_BYTES", "conv_onnx", "czann_meta", "fake_onnx", "legacy_xml"]


def _len_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads here stay below 2**21 bytes per varint byte math)."""
    length, out = len(payload), bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(out) + payload


def fake_onnx(payload: bytes = b"\x00" * 64) -> bytes:
    """A tiny well-formed ONNX ModelProto written by hand (no ``onnx`` import): ir_version 7, producer
    tf2onnx, opset 11 (old enough for every host), a graph of one ``Identity`` node, and ``payload`` as its
    doc_string (distinct bytes or a size). The reader sniffs "onnx" and the static graph audit reads it as
    clean; it is not a model that meets its metadata, so packages built from it are only valid for
    ``--static``."""
    node = _len_field(1, b"x") + _len_field(2, b"y") + _len_field(4, b"Identity")
    graph = _len_field(1, node) + _len_field(2, b"g")
    return (b"\x08\x07" + _len_field(2, b"tf2onnx") + _len_field(8, b"\x10\x0b") + _len_field(7, graph)
            + _len_field(6, payload))


def conv_onnx() -> bytes:
    """A runnable model for tests that need one to run in milliseconds: NHWC in, 2-class softmax out, free
    batch and spatial dims, one 3x3 convolution with fixed random weights (scaled so the softmax is decisive)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 1])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "H", "W", 2])
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((2, 1, 3, 3)) * 4).astype(np.float32), "w")
    nodes = [helper.make_node("Transpose", ["input"], ["a"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["a", "w"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["b"], ["c"], axis=1),
             helper.make_node("Transpose", ["c"], ["output"], perm=[0, 2, 3, 1])]
    model = helper.make_model(helper.make_graph(nodes, "conv", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 18)], producer_name="test")
    model.ir_version = 8
    return bytes(model.SerializeToString())


#: Starts like an ONNX ModelProto (field 1, ir_version), so the reader sniffs "onnx"; not a runnable model.
ONNX_BYTES = fake_onnx()


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
