"""Small real Keras models for tests, exported with real TensorFlow and tf2onnx, cached per session.

Import TensorFlow lazily: test modules that never build a model must not pay for it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

MODEL_KINDS = ("unet", "dilated", "global_pool", "dense_head", "logits", "regression", "unet3d")


def build_model(kind: str, channels: int = 1, classes: int = 2, tile: int | None = None) -> Any:
    """Build a deterministic, untrained (seeded) model of a named kind.

    - unet: two 2x2 poolings, same-padding convs, softmax: spatially invariant, step 4, small halo.
    - dilated: dilated convolutions with a wide receptive field (halo ~ 15 px), softmax.
    - global_pool: adds a global-average feature map back to every pixel: output depends on the whole tile.
    - dense_head: fixed-size input, flatten + dense, reshaped to an image: not translation-equivariant.
    - logits: like unet but without softmax (segmentation outputs that are not probabilities).
    - regression: sigmoid image output with ``classes`` channels.
    - unet3d: a [z, h, w, c] model with one 2x2x2 pooling.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(1234)
    spatial: tuple[int | None, ...] = (tile, tile) if kind == "dense_head" else (None, None)
    if kind == "unet3d":
        inp = keras.Input((None, None, None, channels))
        x = layers.Conv3D(4, 3, padding="same", activation="relu")(inp)
        d = layers.MaxPooling3D(2)(x)
        d = layers.Conv3D(4, 3, padding="same", activation="relu")(d)
        u = layers.UpSampling3D(2)(d)
        x = layers.Concatenate()([x, u])
        out = layers.Conv3D(classes, 1, activation="softmax")(x)
        return keras.Model(inp, out, name=kind)
    inp = keras.Input((*spatial, channels))
    if kind in ("unet", "logits", "regression"):
        c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        p1 = layers.MaxPooling2D(2)(c1)
        c2 = layers.Conv2D(8, 3, padding="same", activation="relu")(p1)
        p2 = layers.MaxPooling2D(2)(c2)
        b = layers.Conv2D(8, 3, padding="same", activation="relu")(p2)
        u2 = layers.Concatenate()([layers.UpSampling2D(2)(b), c2])
        u2 = layers.Conv2D(8, 3, padding="same", activation="relu")(u2)
        u1 = layers.Concatenate()([layers.UpSampling2D(2)(u2), c1])
        act = {"unet": "softmax", "logits": None, "regression": "sigmoid"}[kind]
        out = layers.Conv2D(classes, 1, activation=act)(u1)
    elif kind == "dilated":
        x = inp
        for rate in (1, 2, 4, 8):
            x = layers.Conv2D(8, 3, padding="same", dilation_rate=rate, activation="relu")(x)
        out = layers.Conv2D(classes, 1, activation="softmax")(x)
    elif kind == "global_pool":
        x = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        g = layers.GlobalAveragePooling2D(keepdims=True)(x)
        x = layers.Add()([x, layers.Lambda(lambda t: t[0] * 0 + t[1])([x, g])])
        out = layers.Conv2D(classes, 1, activation="softmax")(x)
    elif kind == "dense_head":
        assert tile is not None
        x = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
        x = layers.Flatten()(x)
        x = layers.Dense(tile * tile * classes // 16)(x)
        x = layers.Reshape((tile // 4, tile // 4, classes))(x)
        x = layers.UpSampling2D(4)(x)
        out = layers.Softmax()(x)
    else:
        raise ValueError(kind)
    return keras.Model(inp, out, name=kind)


def metadata_for(kind: str, tile: int = 64, channels: int = 1, classes: int = 2, overlap: int = 16,
                 fmt_version: str = "2.1.0") -> dict[str, Any]:
    is3d = kind == "unet3d"
    spatial = [16, tile, tile] if is3d else [tile, tile]
    meta: dict[str, Any] = {
        "FormatVersion": fmt_version,
        "Id": str(uuid.UUID(int=abs(hash(kind)) % (1 << 128))),
        "Type": "Regression" if kind == "regression" else (
            "MultiClassSemanticSegmentation" if classes > 2 else "SingleClassSemanticSegmentation"),
        "InputShape": [*spatial, channels],
        "OutputShape": [*spatial, classes],
        # a z tile of 16 cannot advance with an overlap of 16: cap the z overlap
        "MinOverlap": [min(overlap, 8), overlap, overlap] if is3d else [overlap, overlap],
        "ModelName": f"test-{kind}",
    }
    if kind != "regression":
        meta["Classes"] = [f"class{i}" for i in range(classes)]
    return meta


def export_onnx(model: Any, opset: int = 18) -> bytes:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return bytes(proto.SerializeToString())


def export_savedmodel_zip(model: Any, workdir: Path) -> bytes:
    from czregistry.package import zip_directory

    folder = workdir / f"sm-{model.name}-{uuid.uuid4().hex[:8]}"
    model.export(str(folder), format="tf_saved_model", verbose=False)
    data = zip_directory(folder)
    assert isinstance(data, bytes)
    return data
