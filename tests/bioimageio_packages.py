"""bioimage.io model packages built in code (no downloads): a tiny PyTorch conv net written out with
bioimageio.spec's own classes, with ONNX or TorchScript weights, fixed or per-sample normalisation, 2D or 3D.
The test output is computed here with NumPy processing around the PyTorch net, independent of czregistry."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def tiny_net(dims: int = 2, seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, 1, 3, padding=1)).eval()


def build_package(folder: Path, *, weights: str = "onnx", dims: int = 2, pre: str = "fixed",
                  post: str = "sigmoid", size: int = 32, corrupt_output: bool = False, seed: int = 0,
                  net: Any = None, halo: int = 2, name: str | None = None) -> Path:
    """A bioimage.io 0.5 model zip in ``folder``: uint8-range float input, ``pre`` in ('fixed', 'per_sample',
    'none'), ``post`` in ('sigmoid', 'none'); ``net`` defaults to ``tiny_net`` (halo 2: two 3x3 convolutions)."""
    import torch
    from czregistry_bioimageio._compat import ensure_ready

    ensure_ready()
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as b

    folder.mkdir(parents=True, exist_ok=True)
    net = tiny_net(dims, seed) if net is None else net.eval()
    spatial = ["z", "y", "x"][-dims:]
    shape = (1, 1, *([size] * dims))
    x = np.random.default_rng(seed).integers(0, 256, shape).astype("float32")
    ops: list[Any] = []
    if pre == "fixed":
        ops = [b.ScaleLinearDescr(kwargs=b.ScaleLinearKwargs(gain=1 / 255, offset=-0.5))]
        xp = x / 255 - 0.5
    elif pre == "per_sample":
        ops = [b.ZeroMeanUnitVarianceDescr(kwargs=b.ZeroMeanUnitVarianceKwargs(axes=[b.AxisId(a) for a in spatial]))]
        xp = (x - x.mean()) / (x.std() + 1e-6)
    else:
        xp = x / 255
    with torch.no_grad():
        y = net(torch.from_numpy(xp.astype("float32"))).numpy()
    post_ops: list[Any] = []
    if post == "sigmoid":
        post_ops = [b.SigmoidDescr()]
        y = 1 / (1 + np.exp(-y))
    if corrupt_output:
        y = y + 0.5
    np.save(folder / "in.npy", x)
    np.save(folder / "out.npy", y.astype("float32"))
    (folder / "README.md").write_text("# tiny net\n\nbuilt in a test\n")
    if weights == "onnx":
        buf = io.BytesIO()
        axes = {0: "b", **{i + 2: f"s{i}" for i in range(dims)}}
        torch.onnx.export(net, (torch.from_numpy(xp.astype("float32")),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": axes, "y": axes})
        (folder / "w.onnx").write_bytes(buf.getvalue())
        wd = b.WeightsDescr(onnx=b.OnnxWeightsDescr(source=b.FileDescr(source=folder / "w.onnx").source,
                                                    opset_version=17))
    else:
        torch.jit.trace(net, torch.from_numpy(xp.astype("float32"))).save(str(folder / "w.pt"))
        version = b.Version(torch.__version__.split("+")[0])
        wd = b.WeightsDescr(torchscript=b.TorchscriptWeightsDescr(source=folder / "w.pt", pytorch_version=version))
    in_axes = [b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier("raw")]),
               *[b.SpaceInputAxis(id=b.AxisId(a), size=b.ParameterizedSize(min=max(8, 4 * halo), step=8))
                 for a in spatial]]
    out_axes = [b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier("pred")]),
                *[b.SpaceOutputAxisWithHalo(id=b.AxisId(a), halo=halo,
                                            size=b.SizeReference(tensor_id=b.TensorId("raw"), axis_id=b.AxisId(a)))
                  for a in spatial]]
    descr = b.ModelDescr(
        name=name or f"tiny {dims}D net", description="a tiny conv net built in a test",
        authors=[b.Author(name="Test Author")], cite=[b.CiteEntry(text="a test", doi=b.Doi("10.1234/test"))],
        license=b.LicenseId("MIT"), documentation=b.FileDescr(source=folder / "README.md"),
        inputs=[b.InputTensorDescr(id=b.TensorId("raw"), axes=in_axes,
                                   test_tensor=b.FileDescr(source=folder / "in.npy"),
                                   data=b.IntervalOrRatioDataDescr(type="float32", range=(0, 255)),
                                   preprocessing=ops)],
        outputs=[b.OutputTensorDescr(id=b.TensorId("pred"), axes=out_axes,
                                     test_tensor=b.FileDescr(source=folder / "out.npy"),
                                     data=b.IntervalOrRatioDataDescr(type="float32"), postprocessing=post_ops)],
        weights=wd)
    summary = descr.validation_summary
    assert summary.status != "failed", summary.display() if hasattr(summary, "display") else summary
    out = folder / "model.zip"
    save_bioimageio_package(descr, output_path=out)
    return out


def tiny_unet(seed: int = 0) -> Any:
    """A two-level 2D U-Net (one max-pool, one upsampling, a skip connection): the shape of CARE/StarDist
    backbones at toy size."""
    import torch

    torch.manual_seed(seed)

    class UNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU())
            self.mid = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1),
                                           torch.nn.ReLU(), torch.nn.Upsample(scale_factor=2, mode="nearest"))
            self.out = torch.nn.Conv2d(16, 1, 3, padding=1)

        def forward(self, x: Any) -> Any:
            d = self.down(x)
            return self.out(torch.cat([d, self.mid(d)], dim=1))

    return UNet()


def train_denoiser(seconds: float = 3.0, seed: int = 0) -> Any:
    """Train ``tiny_unet`` for a few seconds to denoise synthetic blobs (inputs in [0, 1], after the
    package's preprocessing x / 255 - 0.5); returns the trained module in eval mode."""
    import time

    import torch

    net = tiny_unet(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    end = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < end or steps < 20:
        clean = np.zeros((8, 1, 32, 32), dtype=np.float32)
        for i in range(8):
            cy, cx, r = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(3, 7)
            clean[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        noisy = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32) - 0.5
        loss = torch.nn.functional.mse_loss(net(torch.from_numpy(noisy)), torch.from_numpy(clean) - 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return net.eval()
