"""ONNX Runtime's device pipeline (what it does on CUDA): I/O binding and labels / uint8 computed by nodes
appended to the graph. Both run here on the CPU provider with the same calls (``device_pipeline=True``),
which is how they are tested without a GPU.

The conversion must equal the runner's numpy conversion bit for bit: checked on crafted values (ties,
NaN, values on the rounding boundary and outside [0, 1]) through an identity graph, and end to end on an
smp U-Net with three classes (random weights, packed from the module), run tiled over a whole image into
OME-TIFF and Zarr, against the same run converted on the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from czregistry.onnx.session import CONVERTED_OUTPUTS, OnnxSession, with_converted_outputs
from czregistry.run.assemble import convert_output
from czregistry.run.plan import OutputKind, RunOptions
from czregistry.run.runner import run

torch = pytest.importorskip("torch")
with contextlib.suppress(ImportError):  # before anything imports TensorFlow (see test_pack_torch)
    import segmentation_models_pytorch  # noqa: F401

onnx = pytest.importorskip("onnx")
KINDS: tuple[OutputKind, ...] = ("uint8", "labels")


def _identity_model(classes: int | None, *, opset: int = 18, elem: int | None = None) -> bytes:
    """y = x for (N, H, W, classes) tensors: whatever values a test feeds come out as the 'probabilities'."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if elem is None else elem
    last: Any = classes if classes is not None else "classes"
    x = helper.make_tensor_value_info("x", elem, ["n", "h", "w", last])
    y = helper.make_tensor_value_info("y", elem, ["n", "h", "w", last])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _awkward(classes: int, seed: int) -> np.ndarray:
    """Random probabilities plus the values where conversions differ if done carelessly."""
    rng = np.random.default_rng(seed)
    y = rng.random((3, 9, 11, classes), dtype=np.float32)
    y[0, 0] = 0.5  # every class tied: the lowest wins
    y[0, 1, :, :] = np.float32(0.25)
    y[0, 2, :] = (rng.integers(0, 256, (11, classes)) + 0.5).astype(np.float32) / np.float32(255)  # x.5 / 255
    y[1, 0, 0] = np.float32(1.0000001)
    y[1, 0, 1] = np.float32(-1e-7)
    y[1, 0, 2] = np.float32(3.0)
    y[1, 0, 3] = np.float32(-2.0)
    if classes > 1:
        y[2, 0, 0, 0] = np.nan  # NaN in the first class propagates through the running maximum
        y[2, 0, 1, classes - 1] = np.nan
        y[2, 0, 2, :] = np.float32(0.75)
        y[2, 0, 2, classes // 2] = np.nan
    if classes > 2:  # a larger value after a NaN loses: np.maximum carried the NaN forward
        y[2, 0, 3, :] = np.float32(0.2)
        y[2, 0, 3, 1] = np.nan
        y[2, 0, 3, -1] = np.float32(0.9)
    return y


@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_graph_conversion_equals_the_runner_bit_for_bit(classes: int) -> None:
    session = OnnxSession(_identity_model(classes), "cpu", device_pipeline=True)
    assert session.converts_on_device("labels") and session.converts_on_device("uint8")
    assert [o.name for o in session.signature.outputs] == ["y"]  # the added outputs stay internal
    for seed in range(3):
        y = _awkward(classes, seed)
        assert np.array_equal(session.predict(y), y, equal_nan=True)
        labels = session.predict_converted(y, "labels")
        assert labels.dtype == np.uint8 and np.array_equal(labels, convert_output(y, "labels"))
        finite = np.where(np.isnan(y), np.float32(0.3), y)  # NaN -> uint8 is undefined in numpy and ONNX alike
        u8 = session.predict_converted(finite, "uint8")
        assert u8.dtype == np.uint8 and np.array_equal(u8, convert_output(finite, "uint8"))


def test_models_the_graph_cannot_convert_keep_host_conversion() -> None:
    from onnx import TensorProto

    assert with_converted_outputs(_identity_model(None)) is None  # class count unknown
    assert with_converted_outputs(_identity_model(300)) is None  # labels would not fit uint8
    assert with_converted_outputs(_identity_model(2, opset=10)) is None  # no Round before opset 11
    assert with_converted_outputs(_identity_model(2, elem=TensorProto.FLOAT16)) is None
    session = OnnxSession(_identity_model(2, opset=10), "cpu", device_pipeline=True)
    assert not session.converts_on_device("labels")
    y = _awkward(2, 0)
    assert np.array_equal(session.predict(y), y, equal_nan=True)  # still runs, through I/O binding


def test_cpu_sessions_keep_the_plain_path_by_default() -> None:
    session = OnnxSession(_identity_model(2), "cpu")
    assert not session.converts_on_device("labels") and not session.converts_on_device("uint8")
    assert set(CONVERTED_OUTPUTS.values()).isdisjoint(o.name for o in session.signature.outputs)


def _read_output(path: Path) -> np.ndarray:
    if path.suffix == ".zarr":
        from czregistry.run.omezarr import read_ome_zarr

        return read_ome_zarr(path)
    import tifffile

    got = tifffile.imread(path)
    return got[..., None] if got.ndim == 2 else got


@pytest.fixture(scope="module")
def unet3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smp U-Net (resnet18 encoder, random weights, three classes), packed from the module. The class head
    is scaled up so the softmax uses the whole [0, 1] range (the corpus' ``_confident`` scales by 40, which
    puts this three-class export just past pack's parity tolerance)."""
    import segmentation_models_pytorch as smp

    import czregistry
    from czregistry.checks import ValidateOptions

    torch.manual_seed(3)
    module = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=3).eval()
    with torch.no_grad():
        module.segmentation_head[0].weight.mul_(10.0)
    out = tmp_path_factory.mktemp("ortpipe") / "unet3.czann"
    meta = {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "cell", "edge"],
            "MinOverlap": [64, 64]}
    czregistry.pack(module, meta, out, spatial_dims=(128, 128), postprocessing=["softmax"],
                    validate_options=ValidateOptions(static=True))
    return out


@pytest.fixture()
def pipeline_backend() -> Any:
    """An in-process backend whose sessions use the device pipeline on the CPU (as ONNX Runtime does on CUDA)."""
    from czregistry.backends import Backend, Session
    from czregistry.hookspecs import hookimpl
    from czregistry.plugins import get_host

    class PipelineBackend(Backend):
        name = "onnxruntime-pipeline"
        formats = frozenset({"onnx"})

        def load(self, package: Any, device: Any = "auto") -> Session:
            return OnnxSession(package.read_model_bytes(), "cpu", device_pipeline=True)

    class Plugin:
        @hookimpl
        def register_backends(self, register: Any) -> None:
            register(PipelineBackend)

    host = get_host()
    host.register_plugin(Plugin(), "test-onnx-pipeline")
    yield PipelineBackend.name
    host.unregister_plugin("test-onnx-pipeline")


@pytest.mark.parametrize("suffix", [".ome.tif", ".zarr"])
def test_tiled_run_converted_in_the_graph_equals_host_conversion(unet3: Path, pipeline_backend: str,
                                                                 tmp_path: Path, suffix: str) -> None:
    """The whole image, tiled, with the conversion in the graph, equals the run that converts on the host;
    and both equal converting the run's own float32 probabilities."""
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(unet3), pipeline_backend, "cpu") as session:
        assert session.converts_on_device("labels") and session.converts_on_device("uint8")
    image = (np.random.default_rng(5).random((333, 410)) * 65535).astype(np.uint16)
    np.save(tmp_path / "in.npy", image)
    # not probed (probing is not what is tested): the U-Net's stride 32, the declared border
    opts: dict[str, Any] = {"batch_size": 3, "device": "cpu", "probe": False, "step": 32}
    probs = run(unet3, tmp_path / "in.npy", tmp_path / f"p{suffix}",
                RunOptions(output_kind="probabilities", backend="onnxruntime", **opts))
    p = _read_output(tmp_path / f"p{suffix}")
    for kind in KINDS:
        host = run(unet3, tmp_path / "in.npy", tmp_path / f"host-{kind}{suffix}",
                   RunOptions(output_kind=kind, backend="onnxruntime", **opts))
        graph = run(unet3, tmp_path / "in.npy", tmp_path / f"graph-{kind}{suffix}",
                    RunOptions(output_kind=kind, backend=pipeline_backend, **opts))
        assert graph.backend == "onnxruntime" and host.grid == graph.grid == probs.grid
        a = _read_output(tmp_path / f"host-{kind}{suffix}")
        b = _read_output(tmp_path / f"graph-{kind}{suffix}")
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b), kind
        assert np.array_equal(b, convert_output(p, kind)), kind
        assert len(np.unique(b)) > 2  # three classes really present, not a constant


def test_a_failing_binding_falls_back_to_plain_runs_and_a_refused_batch_still_fails() -> None:
    """The CUDA binding cannot be tested here: if binding fails where a plain run works, the session must go
    on without it (same values, conversion included); a batch the model refuses must still fail."""
    from czregistry.errors import BackendError

    session = OnnxSession(_identity_model(3), "cpu", device_pipeline=True)
    y = _awkward(3, 1)

    def broken() -> Any:
        raise RuntimeError("no such device")

    session._session.io_binding = broken  # type: ignore[method-assign]
    assert np.array_equal(session.predict_converted(y, "labels"), convert_output(y, "labels"))
    assert session._bind_device is None and session.converts_on_device("labels")
    assert np.array_equal(session.predict(y), y, equal_nan=True)

    fixed = OnnxSession(_identity_model(3), "cpu", device_pipeline=True)
    with pytest.raises(BackendError, match="ONNX Runtime failed on input of shape"):
        fixed.predict(np.zeros((2, 4, 4, 5), np.float32))  # 5 classes into a 3-class graph
    assert fixed._bind_device == "cpu"  # the model's refusal is not the binding's fault
