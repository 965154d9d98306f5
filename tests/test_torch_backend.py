"""The PyTorch backend (plugins/czregistry-torch): real tf2onnx exports of the test models converted with
onnx2torch must match ONNX Runtime; conversion failures name the op; and the device-aware backend
selection rule in ``czregistry.backends.select_backend``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import pytest
from czregistry_onnx import OnnxRuntimeBackend
from czregistry_torch import TorchBackend, TorchSession, make_same_padding_explicit

from czregistry.backends import Backend
from czregistry.errors import BackendError, NoBackendError
from czregistry.hookspecs import hookimpl
from czregistry.package import open_package, write_package
from czregistry.plugins import get_host, reset_host
from czregistry.selection import available_backends, load_session, plugin_infos, select_backend
from czregistry.testing import check_backend, check_input

if not TorchBackend.is_available():  # not importorskip: importing onnx2torch first needs the torchvision shim
    pytest.skip("czregistry-torch needs torch and onnx2torch (requirements/all.txt)", allow_module_level=True)

PLUGINS = "onnxruntime,tensorflow,example,torch"
#: onnx2torch's Slice indexes with a list; the plugin silences torch's deprecation warning about it, but
#: pytest resets warning filters per test. Outputs are compared with ONNX Runtime below.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
#: Every kind of tests/models.py: all convert now, including dilated (SpaceToDepth/DepthToSpace/Split/Pad
#: at opset 18) and global_pool (ReduceMean-18), through the converters czregistry_torch adds.
KINDS = ("unet", "dilated", "logits", "regression", "unet3d", "global_pool", "dense_head")
META = {"FormatVersion": "2.1.0", "Id": "3f1c2b7e-5d0a-4c8e-9a51-2b6f0e7d9c11", "Type": "Regression",
        "InputShape": [16, 16, 1], "OutputShape": [16, 16, 1], "ModelName": "t"}


@pytest.fixture(autouse=True)
def _with_torch_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZREG_PLUGINS", PLUGINS)
    reset_host()


def _onnx_package(tmp_path: Path, nodes: list[Any], initializers: list[Any], *, opset: int = 18,
                  shape: tuple[int | None, ...] = (1, 1, 16, 16), out_shape: tuple[int | None, ...] | None = None,
                  name: str = "m") -> Path:
    """A package around a hand-built ONNX graph with input ``x`` and output ``y`` (NCHW float32)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape or shape))],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return write_package(tmp_path / f"{name}.czann", META, model.SerializeToString())


def _run_both(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    package = open_package(path)
    with OnnxRuntimeBackend().load(package, "cpu") as ort, TorchBackend().load(package, "cpu") as torch_:
        return torch_.predict(x), ort.predict(x)


# -- the plugin ----------------------------------------------------------------------------------------


def test_plugin_registers_the_torch_backend() -> None:
    infos = {i.name: i for i in plugin_infos()}
    assert infos["torch"].registered == {"backends": ["torch"], "sources": ["torch"]}
    assert not infos["torch"].errors
    assert available_backends()["torch"] == ("torch", TorchBackend)
    assert TorchBackend.formats == {"onnx"} and TorchBackend.priority < OnnxRuntimeBackend.priority
    assert TorchBackend.is_available()


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = "import sys, czregistry_torch; print('torch' in sys.modules, 'onnx2torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- real models: outputs equal ONNX Runtime's --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_matches_onnxruntime(kind: str, model_cache: Callable[..., Path]) -> None:
    path = model_cache(kind)
    reference = OnnxRuntimeBackend().load(open_package(path), "cpu")
    shape = tuple((open_package(path).metadata or {})["InputShape"])
    want = reference.predict(check_input(shape, batch=2))
    reference.close()
    result = check_backend(TorchBackend, path, device="cpu", batch=2, reference=want, atol=1e-4)
    diff = float(np.max(np.abs(result.output - want)))
    print(f"{kind}: max |torch - onnxruntime| = {diff:.3g}")
    assert result.backend == "torch" and result.device == "cpu"
    assert result.output.shape == want.shape and result.output.dtype == np.float32
    assert diff < 1e-4


@pytest.mark.parametrize("kind", ["unet", "unet3d"])
def test_signature_matches_onnxruntime(kind: str, model_cache: Callable[..., Path]) -> None:
    package = open_package(model_cache(kind))
    with TorchBackend().load(package, "cpu") as ours, OnnxRuntimeBackend().load(package, "cpu") as ort:
        assert ours.signature == ort.signature
        assert ours.signature.inputs[0].dtype == "float32"
        assert ours.signature.inputs[0].shape[0] is None  # the batch axis stays unknown
        assert len(ours.signature.inputs[0].shape) == (6 if kind == "unet3d" else 5) - 1


def test_other_sizes_than_the_tile(model_cache: Callable[..., Path]) -> None:
    """The converted graph keeps ONNX's dynamic spatial dims: a larger (step-aligned) tile runs too."""
    package = open_package(model_cache("unet"))
    x = check_input((96, 128, 1), batch=3, seed=4)
    with TorchBackend().load(package, "cpu") as ours, OnnxRuntimeBackend().load(package, "cpu") as ort:
        np.testing.assert_allclose(ours.predict(x), ort.predict(x), atol=1e-5)


# -- devices, close ------------------------------------------------------------------------------------


def test_device_reporting(model_cache: Callable[..., Path]) -> None:
    import torch

    package = open_package(model_cache("unet"))
    with TorchBackend().load(package, "cpu") as session:
        assert session.device == "cpu" and session.backend == "torch"
    with TorchBackend().load(package, "auto") as session:
        assert session.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert TorchBackend.gpu_available() is torch.cuda.is_available()


@pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") != "", reason="needs CUDA hidden (conftest does)")
def test_device_gpu_without_a_gpu_is_a_clear_error(model_cache: Callable[..., Path]) -> None:
    package = open_package(model_cache("unet"))
    with pytest.raises(BackendError, match="PyTorch sees no CUDA GPU") as err:
        TorchBackend().load(package, "gpu")
    assert "CUDA build of torch" in (err.value.hint or "")
    with pytest.raises(BackendError, match="backend 'torch' sees no usable GPU"):
        load_session(package, backend="torch", device="gpu")


def test_close_is_idempotent_and_final(model_cache: Callable[..., Path]) -> None:
    session = TorchBackend().load(open_package(model_cache("logits")), "cpu")
    x = check_input((64, 64, 1), batch=1)
    assert session.predict(x).shape == (1, 64, 64, 2)
    session.close()
    session.close()
    with pytest.raises(BackendError, match="session is closed"):
        session.predict(x)


def test_load_session_by_name(model_cache: Callable[..., Path]) -> None:
    with load_session(open_package(model_cache("regression")), backend="torch", device="cpu") as session:
        assert isinstance(session, TorchSession) and session.backend == "torch"


def test_refuses_a_savedmodel_package(model_cache: Callable[..., Path]) -> None:
    with pytest.raises(BackendError, match="cannot run a savedmodel model"):
        TorchBackend().load(open_package(model_cache("unet", fmt="savedmodel")), "cpu")


# -- hostile or unsupported models ---------------------------------------------------------------------


def test_refuses_external_data(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../etc/passwd")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = write_package(tmp_path / "ext.czann", META, model.SerializeToString())
    with pytest.raises(BackendError, match=r"stores its data outside the model, in '\.\./\.\./\.\./etc/passwd'"):
        TorchBackend().load(open_package(path), "cpu")


def test_garbage_model_bytes(tmp_path: Path) -> None:
    path = write_package(tmp_path / "junk.czann", META, b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(BackendError, match="not a readable ONNX model"):
        TorchBackend().load(open_package(path), "cpu")


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    from onnx import helper

    path = _onnx_package(tmp_path, [helper.make_node("Hardmax", ["x"], ["y"], name="pick_max", axis=1)], [])
    with pytest.raises(BackendError, match=r"onnx2torch cannot convert the model: node 'pick_max' "
                                           r"\(Hardmax, opset 18\): onnx2torch [\d.]+ has no converter") as err:
        TorchBackend().load(open_package(path), "cpu")
    assert "--backend onnxruntime" in (err.value.hint or "")


def test_strided_same_padding_is_refused_with_the_node_named(tmp_path: Path) -> None:
    """SAME padding with stride 2 depends on the input size: not rewritten, so conversion fails by name."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="down", auto_pad="SAME_UPPER", strides=[2, 2])
    path = _onnx_package(tmp_path, [node], [w])
    with pytest.raises(BackendError, match=r"node 'down' \(Conv, opset 18\): \"SAME_UPPER\" auto_pad"):
        TorchBackend().load(open_package(path), "cpu")
    assert TensorProto.FLOAT  # the graph itself is valid ONNX (checked in _onnx_package)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("kernel", [3, 2, 4])
def test_same_padding_rewrite_is_exact(tmp_path: Path, mode: str, kernel: int) -> None:
    """Even kernels put the odd padding pixel at the end (UPPER) or start (LOWER): compare with ONNX
    Runtime, which implements SAME itself, on Conv and MaxPool."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(kernel)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, kernel, kernel)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=mode),
             helper.make_node("MaxPool", ["c"], ["y"], auto_pad=mode, kernel_shape=[kernel, kernel])]
    path = _onnx_package(tmp_path, nodes, [w], shape=(None, 1, None, None))
    x = rng.random((2, 1, 13, 16), dtype=np.float32)
    got, want = _run_both(path, x)
    assert got.shape == want.shape == (2, 2, 13, 16)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("mode", "before", "after"), [("SAME_UPPER", 1, 2), ("SAME_LOWER", 2, 1)])
def test_same_padding_rewrite_with_dilation(tmp_path: Path, mode: str, before: int, after: int) -> None:
    """ONNX Runtime refuses SAME with dilation, so the reference pads explicitly as the ONNX spec says:
    kernel 2, dilation 3 needs 3 pixels per axis, the odd one after (UPPER) or before (LOWER)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((1, 1, 2, 2)).astype(np.float32), "w")
    x = rng.random((1, 1, 11, 12), dtype=np.float32)
    ours = _onnx_package(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=mode, dilations=[3, 3])],
                         [w], shape=(None, 1, None, None), name="same")
    pads = numpy_helper.from_array(np.array([0, 0, before, before, 0, 0, after, after], np.int64), "pads")
    reference = _onnx_package(tmp_path, [helper.make_node("Pad", ["x", "pads"], ["p"]),
                                         helper.make_node("Conv", ["p", "w"], ["y"], dilations=[3, 3])],
                              [w, pads], shape=(None, 1, None, None), name="explicit")
    with TorchBackend().load(open_package(ours), "cpu") as session:
        got = session.predict(x)
    with OnnxRuntimeBackend().load(open_package(reference), "cpu") as session:
        want = session.predict(x)
    assert got.shape == want.shape == x.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_make_same_padding_explicit_counts_only_stride_one(tmp_path: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["a", "w"], ["b"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Conv", ["b", "w"], ["y"], pads=[1, 1, 1, 1])]
    proto = onnx.load_model_from_string(
        open_package(_onnx_package(tmp_path, nodes, [w])).read_model_bytes())
    assert make_same_padding_explicit(proto) == 1
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in proto.graph.node]
    assert attrs[0] == {"pads": [1, 1, 1, 1]}
    assert attrs[1]["auto_pad"] == b"SAME_UPPER"


def test_opset18_split_and_reduce(tmp_path: Path) -> None:
    """The converters added for opset 18: Split with num_outputs (uneven: ceil-sized chunks, last smaller)
    and ReduceMax/ReduceMean with axes as an input, compared with ONNX Runtime."""
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(np.array([2, -1], np.int64), "axes")
    nodes = [helper.make_node("Split", ["x"], ["s0", "s1", "s2"], axis=3, num_outputs=3),
             helper.make_node("ReduceMax", ["s0", "axes"], ["m0"], keepdims=1),
             helper.make_node("ReduceMean", ["s2", "axes"], ["m2"], keepdims=1),
             helper.make_node("Add", ["m0", "m2"], ["m"]),
             helper.make_node("Add", ["s1", "m"], ["y"])]
    path = _onnx_package(tmp_path, nodes, [axes], shape=(2, 1, 5, 7))
    x = np.random.default_rng(3).random((2, 1, 5, 7), dtype=np.float32)
    got, want = _run_both(path, x)
    assert got.shape == want.shape == (2, 1, 5, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)


# -- device-aware backend selection (czregistry.backends.select_backend) -------------------------------


class _Recorder:
    calls: ClassVar[list[str]] = []


def _backend(name: str, priority: int, gpu: bool | None, formats: frozenset[str] = frozenset({"onnx"})
             ) -> type[Backend]:
    """A Backend whose gpu_available() answers ``gpu`` (``None``: raises) and records that it was asked."""

    def gpu_available(cls: type[Backend]) -> bool:
        _Recorder.calls.append(cls.name)
        if gpu is None:
            raise RuntimeError("driver exploded")
        return gpu

    def load(self: Backend, package: Any, device: Any = "auto") -> Any:
        raise NotImplementedError

    return type(f"B_{name}", (Backend,), {"name": name, "formats": formats, "priority": priority,
                                          "gpu_available": classmethod(gpu_available), "load": load})


def _register(*classes: type[Backend], plugin: str = "fakes") -> None:
    module = ModuleType(plugin)

    def register_backends(register: Callable[[Any], None]) -> None:
        for cls in classes:
            register(cls)

    module.register_backends = hookimpl(register_backends)  # type: ignore[attr-defined]
    get_host().register_plugin(module, plugin)


@pytest.fixture
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the backends a test registers itself."""
    monkeypatch.setenv("CZREG_PLUGINS", "none")
    reset_host()
    _Recorder.calls.clear()


@pytest.mark.usefixtures("no_plugins")
def test_auto_prefers_a_gpu_backend_over_priority() -> None:
    cpu_high, gpu_low = _backend("cpu_high", 10, False), _backend("gpu_low", 5, True)
    _register(cpu_high, gpu_low)
    assert select_backend("onnx", device="auto") is gpu_low
    assert _Recorder.calls == ["cpu_high", "gpu_low"]  # asked in priority order
    assert select_backend("onnx") is gpu_low  # auto is the default
    assert select_backend("onnx", device="cpu") is cpu_high
    assert select_backend("onnx", "cpu_high", device="auto") is cpu_high  # a named backend is kept


@pytest.mark.usefixtures("no_plugins")
def test_auto_without_any_gpu_falls_back_to_priority() -> None:
    cpu_high, cpu_low = _backend("cpu_high", 10, False), _backend("cpu_low", 5, False)
    _register(cpu_low, cpu_high)
    assert select_backend("onnx", device="auto") is cpu_high


@pytest.mark.usefixtures("no_plugins")
def test_gpu_questions_stay_cheap() -> None:
    """gpu_available() is asked only of backends for the format, stops at the first yes, and not at all
    for --device cpu or when one backend is the only choice."""
    gpu_high, gpu_low = _backend("gpu_high", 10, True), _backend("gpu_low", 5, True)
    other_format = _backend("saved", 50, None, frozenset({"savedmodel"}))  # would raise if asked
    _register(gpu_high, gpu_low, other_format)
    assert select_backend("onnx", device="auto") is gpu_high
    assert select_backend("onnx", device="gpu") is gpu_high
    assert _Recorder.calls == ["gpu_high", "gpu_high"]
    _Recorder.calls.clear()
    assert select_backend("onnx", device="cpu") is gpu_high
    assert select_backend("savedmodel", device="auto") is other_format  # the only candidate: not asked
    assert _Recorder.calls == []


@pytest.mark.usefixtures("no_plugins")
def test_device_gpu_considers_only_gpu_backends() -> None:
    cpu_high, gpu_low = _backend("cpu_high", 10, False), _backend("gpu_low", 1, True)
    _register(cpu_high, gpu_low)
    assert select_backend("onnx", device="gpu") is gpu_low


@pytest.mark.usefixtures("no_plugins")
@pytest.mark.parametrize(("fmt", "install"), [("onnx", "onnxruntime-gpu, or a CUDA build of torch"),
                                              ("savedmodel", "TensorFlow with GPU support")])
def test_device_gpu_without_gpu_backends_names_what_to_install(fmt: str, install: str) -> None:
    _register(_backend("a", 10, False, frozenset({fmt})), _backend("b", 5, False, frozenset({fmt})))
    with pytest.raises(NoBackendError) as err:
        select_backend(fmt, device="gpu")  # type: ignore[arg-type]
    assert str(err.value.message) == (f"--device gpu was requested but no installed backend for {fmt} models "
                                      "sees a usable GPU (tried: a, b)")
    assert install in (err.value.hint or "") and "--device cpu" in (err.value.hint or "")


@pytest.mark.usefixtures("no_plugins")
def test_a_crashing_gpu_check_names_its_plugin() -> None:
    _register(_backend("boom", 10, None), plugin="crashy")
    _register(_backend("fine", 5, False), plugin="fine")
    with pytest.raises(BackendError, match="backend 'boom' from plugin 'crashy' crashed in gpu_available"):
        select_backend("onnx", device="auto")


def test_real_plugins_on_this_host(model_cache: Callable[..., Path]) -> None:
    """With onnxruntime and torch installed, auto picks a GPU one if any, else onnxruntime (priority)."""
    import torch

    chosen = select_backend("onnx", device="auto")
    if OnnxRuntimeBackend.gpu_available():
        assert chosen is OnnxRuntimeBackend
    elif torch.cuda.is_available():
        assert chosen is TorchBackend
    else:
        assert chosen is OnnxRuntimeBackend
        with pytest.raises(NoBackendError, match="tried: onnxruntime, torch"):
            load_session(open_package(model_cache("unet")), device="gpu")


def test_selection_for_onnx_does_not_import_tensorflow() -> None:
    """Selecting for an ONNX package asks only ONNX backends: TensorFlow stays unimported, and on a
    Linux host without GPU device files torch is not imported either."""
    code = ("import sys; from czregistry.selection import select_backend; "
            "print(select_backend('onnx', device='auto').name, 'tensorflow' in sys.modules, 'torch' in sys.modules)")
    env = {**os.environ, "CZREG_PLUGINS": PLUGINS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    name, tf_imported, torch_imported = out.split()
    assert tf_imported == "False"
    no_gpu_files = sys.platform.startswith("linux") and not any(
        Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))
    if no_gpu_files:
        assert (name, torch_imported) == ("onnxruntime", "False")
