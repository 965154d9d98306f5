"""A corpus of architectures users actually train, built in code with random weights (no downloads).

Each entry builds a network from the library people train with (segmentation_models_pytorch, torchvision,
Keras), exports it to ONNX the way ZEISS's czmodel 6.2 does for PyTorch (TorchScript exporter, an NHWC
wrapper, softmax, dynamic batch and spatial dims, opset 18) or with tf2onnx for Keras, and packs it with the
metadata a user would write (for the smp networks: InputShape 256, MinOverlap 128, as in the issue report).

The tests (``tests/test_corpus.py``) validate every package and check each claim the validator makes
(verdict, stride, halo or halo bound, seam error) against whole-image inference computed in the test.
Exports are cached per session by ``corpus_package`` in ``conftest.py``.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One architecture: how to build it and what metadata a user would pack it with."""

    name: str
    build: Callable[[], Any]  # a torch.nn.Module (NCHW/NCDHW) or a keras.Model (NHWC)
    framework: str  # "torch" or "keras"
    mtype: str = "MultiClassSemanticSegmentation"
    tile: tuple[int, ...] = (256, 256)
    channels: int = 3
    classes: int = 2
    min_overlap: tuple[int, ...] = (128, 128)
    #: Post-processing the export wraps around a torch module: "softmax" (segmentation logits), "none".
    post: str = "softmax"
    #: Fixed batch of 1 in the exported graph (ZEISS's LiveDenoise models are exported that way).
    fixed_batch: bool = False
    #: Export with the spatial dims fixed at ``tile`` (czmodel 6.2's PyTorch export, ZEISS's workshop models): the
    #: graph then runs only on its tile, and ``validate`` and ``smoke`` must measure its seams as ZEN tiles.
    fixed_size: bool = False
    slow: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_ndim(self) -> int:
        return len(self.tile)


def _smp(arch: str, encoder: str = "resnet18") -> Callable[[], Any]:
    def build() -> Any:
        import segmentation_models_pytorch as smp
        import torch

        torch.manual_seed(0)
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=2).eval()

    return build


def _confident(head: Any) -> Any:
    """Scale a randomly initialised class head so its softmax spans [0, 1] the way a trained network's does:
    at default initialisation two-class outputs hover around 0.5 and every difference hides below the
    validator's absolute tolerance, which would make the test model say nothing."""
    import torch

    with torch.no_grad():
        head.weight.mul_(40.0)
    return head


def _dilated_torch() -> Any:
    """A context-aggregation (atrous) network: dilations 1..16, no pooling, stride 1, halo ~ 31 px."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    ch = 1
    for rate in (1, 2, 4, 8, 16, 1):
        layers += [nn.Conv2d(ch, 16, 3, padding=rate, dilation=rate), nn.BatchNorm2d(16), nn.ReLU()]
        ch = 16
    layers.append(_confident(nn.Conv2d(16, 2, 1)))
    return nn.Sequential(*layers).eval()


def _classifier_torch() -> Any:
    """torchvision's resnet18 with a two-class head: one class vector per image."""
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=2).eval()


def _unet3d_torch() -> Any:
    """A two-level 3D U-Net (Cicek et al. 2016 layout, reduced width): conv-BN-ReLU pairs, max pooling,
    transposed-convolution upsampling, skip concatenation."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def double(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(),
                             nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())

    class UNet3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.b = double(1, 8), double(8, 16), double(16, 32)
            self.pool = nn.MaxPool3d(2)
            self.u2, self.d2 = nn.ConvTranspose3d(32, 16, 2, stride=2), double(32, 16)
            self.u1, self.d1 = nn.ConvTranspose3d(16, 8, 2, stride=2), double(16, 8)
            self.head = _confident(nn.Conv3d(8, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e1 = self.e1(x)
            e2 = self.e2(self.pool(e1))
            b = self.b(self.pool(e2))
            d2 = self.d2(torch.cat([self.u2(b), e2], 1))
            d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
            return self.head(d1)

    return UNet3d().eval()


def _keras_encoder_decoder(skips: bool) -> Callable[[], Any]:
    """Conv, MaxPooling2D, Conv, UpSampling2D, Conv, softmax (the issue's plain encoder-decoder), with or
    without a skip connection."""

    def build() -> Any:
        import keras
        from keras import layers

        keras.utils.set_random_seed(7)
        inp = keras.Input((None, None, 1))
        c1 = layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
        x = layers.MaxPooling2D(2)(c1)
        x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
        x = layers.UpSampling2D(2)(x)
        if skips:
            x = layers.Concatenate()([x, c1])
        out = layers.Conv2D(2, 3, padding="same", activation="softmax")(x)
        return keras.Model(inp, out)

    return build


def _care_unet() -> Any:
    """A CARE-style denoising U-Net (csbdeep's layout: depth 2, two 3x3 convs per level, max pooling,
    upsampling with skip concatenation, a linear 1x1 output added to the input), ending in a sigmoid so the
    output lies in [0, 1] as the format asks."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(11)
    inp = keras.Input((None, None, 1))

    def conv2(x: Any, n: int) -> Any:
        x = layers.Conv2D(n, 3, padding="same", activation="relu")(x)
        return layers.Conv2D(n, 3, padding="same", activation="relu")(x)

    l1 = conv2(inp, 16)
    l2 = conv2(layers.MaxPooling2D(2)(l1), 32)
    b = conv2(layers.MaxPooling2D(2)(l2), 64)
    u2 = conv2(layers.Concatenate()([layers.UpSampling2D(2)(b), l2]), 32)
    u1 = conv2(layers.Concatenate()([layers.UpSampling2D(2)(u2), l1]), 16)
    res = layers.Conv2D(1, 1)(u1)
    out = layers.Activation("sigmoid")(layers.Add()([res, inp]))
    return keras.Model(inp, out)


def _monai(kind: str) -> Callable[[], Any]:
    """MONAI networks, small widths (the verdicts depend on the layers, not the width): ``basicunet`` with
    BatchNorm (local), ``unet-instancenorm`` (per-image InstanceNorm: global), ``unetr`` (ViT encoder with
    position embeddings learnt at its 64x64 ``img_size``: only that size runs), ``swinunetr`` (Swin encoder,
    shifted 7x7 windows whose padding and masks are traced at the export size, instance norm)."""

    def build() -> Any:
        import torch
        from monai.networks.nets import UNETR, BasicUNet, SwinUNETR, UNet

        torch.manual_seed(0)
        net: Any
        if kind == "basicunet":
            net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8),
                            norm=("batch", {}))
            head = net.final_conv
        elif kind == "unet-instancenorm":
            net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                       num_res_units=1, norm="instance")
            head = None
        elif kind == "unetr":
            net = UNETR(in_channels=1, out_channels=2, img_size=(64, 64), spatial_dims=2, feature_size=8,
                        hidden_size=96, mlp_dim=192, num_heads=4)
            head = None
        else:  # swinunetr: MONAI's defaults (window 7, patch 2, instance norm) at the smallest width and depth
            net = SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1))
            head = net.out.conv.conv
        if head is not None:
            _confident(head)
        return net.eval()

    return build


def _care_unet3d_torch() -> Any:
    """CARE's 3D denoising U-Net (csbdeep layout as ``_care_unet``: depth 2, two 3x3x3 convs per level, max
    pooling, upsampling with skip concatenation, a linear 1x1x1 output added to the input, then a sigmoid)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def conv2(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv3d(cout, cout, 3, padding=1),
                             nn.ReLU())

    class Care3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.b = conv2(1, 8), conv2(8, 16), conv2(16, 16)
            self.u2, self.u1 = conv2(32, 16), conv2(24, 8)
            self.pool, self.up = nn.MaxPool3d(2), nn.Upsample(scale_factor=2, mode="nearest")
            self.res = nn.Conv3d(8, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            l1 = self.l1(x)
            l2 = self.l2(self.pool(l1))
            b = self.b(self.pool(l2))
            u2 = self.u2(torch.cat([self.up(b), l2], 1))
            u1 = self.u1(torch.cat([self.up(u2), l1], 1))
            return torch.sigmoid(self.res(u1) + x)

    net = Care3d()
    with torch.no_grad():
        net.res.weight.mul_(10.0)  # a residual the size a trained denoiser's is, not hidden below the tolerance
    return net.eval()


CORPUS: dict[str, Entry] = {e.name: e for e in [
    Entry("smp-unet-resnet18", _smp("Unet"), "torch"),
    Entry("smp-fpn-resnet18", _smp("FPN"), "torch"),
    Entry("smp-linknet-resnet18", _smp("Linknet"), "torch"),
    Entry("smp-unetplusplus-resnet18", _smp("UnetPlusPlus"), "torch", slow=True),
    Entry("smp-deeplabv3plus-resnet18", _smp("DeepLabV3Plus"), "torch"),
    Entry("smp-pan-resnet18", _smp("PAN"), "torch"),
    Entry("smp-unet-efficientnet-b0", _smp("Unet", "efficientnet-b0"), "torch", slow=True),
    # ConvNeXt (timm through smp): a 4x4 stride-4 patchify stem, 7x7 depthwise convolutions and LayerNorm over the
    # channels of each pixel (local, unlike GroupNorm or InstanceNorm)
    Entry("smp-unet-convnext_atto", _smp("Unet", "tu-convnext_atto"), "torch", slow=True),
    Entry("keras-encoder-decoder", _keras_encoder_decoder(False), "keras", tile=(128, 128), channels=1,
          min_overlap=(16, 16)),
    Entry("keras-encoder-decoder-skip", _keras_encoder_decoder(True), "keras", tile=(128, 128), channels=1,
          min_overlap=(16, 16)),
    Entry("care-unet", _care_unet, "keras", mtype="Regression", tile=(256, 256), channels=1, classes=1,
          min_overlap=(64, 64)),
    Entry("care-unet-batch1", _care_unet, "keras", mtype="Regression", tile=(256, 256), channels=1, classes=1,
          min_overlap=(64, 64), fixed_batch=True),
    Entry("care-unet-1024-batch1", _care_unet, "keras", mtype="Regression", tile=(1024, 1024), channels=1,
          classes=1, min_overlap=(64, 64), fixed_batch=True),
    Entry("dilated-context", _dilated_torch, "torch", tile=(128, 128), channels=1, min_overlap=(16, 16)),
    Entry("resnet18-classifier", _classifier_torch, "torch", mtype="MultiClassClassification",
          tile=(224, 224), min_overlap=(0, 0)),
    Entry("unet3d", _unet3d_torch, "torch", tile=(32, 64, 64), channels=1, min_overlap=(8, 8, 8)),
    # fixed-size exports (issue 23): the README's PyTorch example, a CARE U-Net and the dilated network
    Entry("smp-unet-resnet18-fixed128", _smp("Unet"), "torch", tile=(128, 128), min_overlap=(64, 64),
          fixed_size=True),
    Entry("smp-linknet-resnet18-fixed", _smp("Linknet"), "torch", tile=(256, 256), fixed_size=True, slow=True),
    Entry("care-unet-fixed", _care_unet, "keras", mtype="Regression", tile=(256, 256), channels=1, classes=1,
          min_overlap=(64, 64), fixed_size=True),
    Entry("dilated-context-fixed", _dilated_torch, "torch", tile=(128, 128), channels=1, min_overlap=(16, 16),
          fixed_size=True),
    # wider corpus (issue 23): MobileNet and MiT (SegFormer: attention) encoders, MONAI, a 3D CARE U-Net
    Entry("smp-unet-mobilenet_v2", _smp("Unet", "mobilenet_v2"), "torch", slow=True),
    Entry("smp-segformer-mit_b0", _smp("Segformer", "mit_b0"), "torch", slow=True),
    Entry("monai-basicunet", _monai("basicunet"), "torch", tile=(128, 128), channels=1, min_overlap=(16, 16)),
    Entry("monai-unet-instancenorm", _monai("unet-instancenorm"), "torch", tile=(128, 128), channels=1,
          min_overlap=(16, 16)),
    Entry("monai-unetr", _monai("unetr"), "torch", tile=(64, 64), channels=1, min_overlap=(16, 16)),
    Entry("monai-swinunetr", _monai("swinunetr"), "torch", tile=(64, 64), channels=1, min_overlap=(16, 16)),
    Entry("care-unet3d", _care_unet3d_torch, "torch", mtype="Regression", tile=(16, 64, 64), channels=1, classes=1,
          min_overlap=(8, 16, 16), post="none"),
]}


def export_onnx(entry: Entry) -> bytes:
    """The model as ONNX bytes with a channels-last input, the way czmodel 6.2 exports it."""
    return _export_torch(entry) if entry.framework == "torch" else _export_keras(entry)


def _export_torch(entry: Entry) -> bytes:
    import torch

    module = entry.build()
    nd = entry.spatial_ndim
    dense = entry.mtype != "MultiClassClassification"

    class ChannelsLast(torch.nn.Module):
        """czmodel's wrapper: NHWC in, the module's NCHW in between, softmax over classes, NHWC out."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x.permute(0, nd + 1, *range(1, nd + 1)))
            if entry.post == "softmax":
                y = torch.softmax(y, dim=1)
            return y.permute(0, *range(2, nd + 2), 1) if dense else y

    wrapped = ChannelsLast(module).eval()
    example = torch.zeros((1, *entry.tile, entry.channels))
    axes: dict[int, str] = {} if entry.fixed_batch else {0: "batch"}
    spatial = dense and not entry.fixed_size
    if spatial:
        axes.update({i + 1: f"s{i}" for i in range(nd)})
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(wrapped, (example,), buf, input_names=["input"], output_names=["output"],
                          opset_version=18, dynamo=False,
                          dynamic_axes={"input": axes, "output": ({} if entry.fixed_batch else {0: "batch"})
                                        | ({i + 1: f"s{i}" for i in range(nd)} if spatial else {})})
    return buf.getvalue()


def _export_keras(entry: Entry) -> bytes:
    import onnx
    import tensorflow as tf
    import tf2onnx

    model = entry.build()
    nd = entry.spatial_ndim
    batch = 1 if entry.fixed_batch else None
    dims = tuple(entry.tile) if entry.fixed_size else (None,) * nd
    spec = (tf.TensorSpec((batch, *dims, entry.channels), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=18)
    data: bytes = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def metadata(entry: Entry) -> dict[str, Any]:
    """The metadata a user would pack the entry with (CZANN 2.1.0)."""
    classes = [f"class{i}" for i in range(entry.classes)] if entry.mtype != "Regression" else None
    out_shape = ([1, 1, entry.classes] if entry.mtype == "MultiClassClassification"
                 else [*entry.tile, entry.classes])
    meta: dict[str, Any] = {
        "FormatVersion": "2.1.0", "Id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"czregistry/corpus/{entry.name}")),
        "Type": entry.mtype, "InputShape": [*entry.tile, entry.channels], "OutputShape": out_shape,
        "MinOverlap": list(entry.min_overlap), "ModelName": entry.name,
        "Scaling": [1e-6] * min(3, max(2, entry.spatial_ndim)),
    }
    if classes is not None:
        meta["Classes"] = classes
    return meta
