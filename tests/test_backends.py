"""Inference backends on real Keras-built models exported both ways (ONNX via tf2onnx, SavedModel via Keras 3
``export``), backend selection, device handling, and hostile model files."""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from czregistry_onnx import OnnxRuntimeBackend
from czregistry_tensorflow import TensorFlowBackend
from czregistry_tensorflow.backend import extract_savedmodel

from czregistry.errors import BackendError, NoBackendError, UnsafeGraphError, UsageError
from czregistry.package import ReadLimits, open_package, write_package, zip_directory
from czregistry.plugins import reset_host
from czregistry.selection import load_session, select_backend
from czregistry.testing import check_backend, check_input
from tests.models import metadata_for

TOLERANCE = 1e-4


def _batch(shape: tuple[int, ...], n: int = 2, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize(("kind", "shape"), [
    ("unet", (64, 64, 1)),
    ("dilated", (48, 40, 1)),  # a size other than the tile: dims are free
    ("logits", (64, 64, 1)),
    ("unet3d", (8, 32, 32, 1)),
])
def test_onnx_and_tensorflow_agree_with_keras(model_cache: Callable[..., Path], kind: str,
                                              shape: tuple[int, ...]) -> None:
    x = _batch(shape)
    want = np.asarray(model_cache.keras_model(kind)(x))  # type: ignore[attr-defined]
    outputs = {}
    for fmt, backend in (("onnx", "onnxruntime"), ("savedmodel", "tensorflow")):
        with load_session(open_package(model_cache(kind, fmt=fmt)), device="cpu") as session:
            assert session.backend == backend and session.device == "cpu"
            outputs[fmt] = session.predict(x)
            assert outputs[fmt].dtype == np.float32 and outputs[fmt].shape == want.shape
    onnx_vs_tf = float(np.abs(outputs["onnx"] - outputs["savedmodel"]).max())
    assert onnx_vs_tf <= TOLERANCE
    assert float(np.abs(outputs["onnx"] - want).max()) <= TOLERANCE
    assert float(np.abs(outputs["savedmodel"] - want).max()) <= TOLERANCE
    print(f"{kind}: max |onnx - tensorflow| = {onnx_vs_tf:.3g}")


@pytest.mark.parametrize(("fmt", "backend_cls", "in_name"), [
    ("onnx", OnnxRuntimeBackend, "input"),
    ("savedmodel", TensorFlowBackend, None),  # Keras names it after the Input layer ('keras_tensor' ...)
])
def test_backend_contract(model_cache: Callable[..., Path], fmt: str, backend_cls: Any,
                          in_name: str | None) -> None:
    path = model_cache("unet", fmt=fmt, tile=32)
    keras_model = model_cache.keras_model("unet")  # type: ignore[attr-defined]
    reference = np.asarray(keras_model(check_input((32, 32, 1))))
    result = check_backend(backend_cls, path, reference=reference)
    assert result.output_shape == (2, 32, 32, 2)
    sig = result.signature
    assert sig.inputs[0].name == (in_name or sig.inputs[0].name) and sig.inputs[0].name
    assert sig.inputs[0].shape == (None, None, None, 1) and sig.inputs[0].dtype == "float32"
    assert sig.outputs[0].shape == (None, None, None, 2)


def test_tensorflow_uses_serving_default_of_keras_export(model_cache: Callable[..., Path]) -> None:
    with TensorFlowBackend().load(open_package(model_cache("unet", fmt="savedmodel"))) as session:
        assert session.signature_name == "serving_default"  # type: ignore[attr-defined]


def test_selection_by_format_and_by_choice(model_cache: Callable[..., Path]) -> None:
    assert select_backend("onnx") is OnnxRuntimeBackend
    assert select_backend("savedmodel") is TensorFlowBackend
    assert select_backend("savedmodel", "tensorflow") is TensorFlowBackend
    package = open_package(model_cache("unet", fmt="savedmodel"))
    with pytest.raises(NoBackendError, match="backend 'onnxruntime' cannot run savedmodel models"):
        load_session(package, backend="onnxruntime")
    with pytest.raises(UsageError, match=r"unknown backend 'tensorrt' \(installed: onnxruntime, tensorflow, torch\)"):
        load_session(package, backend="tensorrt")


def test_missing_backend_names_the_plugin_to_install(model_cache: Callable[..., Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    package = open_package(model_cache("unet", fmt="savedmodel"))
    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime")
    reset_host()
    with pytest.raises(NoBackendError) as err:
        load_session(package)
    assert err.value.message == "no installed backend can run savedmodel models"
    # the plugin is installed here, only CZREG_PLUGINS leaves it out: the hint says so instead of "pip install"
    assert err.value.hint == ("plugin 'tensorflow' (czregistry-tensorflow) is installed but disabled by "
                              "CZREG_PLUGINS='onnxruntime'; unset CZREG_PLUGINS or add tensorflow to it")
    assert err.value.exit_code == 5


@pytest.mark.parametrize("fmt", ["onnx", "savedmodel"])
def test_gpu_request_without_gpu_is_refused(model_cache: Callable[..., Path], fmt: str) -> None:
    """The tests hide GPUs (CUDA_VISIBLE_DEVICES=''), so an explicit GPU request must fail, not fall back."""
    package = open_package(model_cache("unet", fmt=fmt))
    with pytest.raises(BackendError, match="--device gpu"):
        load_session(package, device="gpu")
    backend = OnnxRuntimeBackend() if fmt == "onnx" else TensorFlowBackend()
    with pytest.raises(BackendError, match="--device gpu"):
        backend.load(package, "gpu")


def test_tensorflow_session_removes_its_temp_dir(model_cache: Callable[..., Path]) -> None:
    session = TensorFlowBackend().load(open_package(model_cache("unet", fmt="savedmodel")))
    workdir = Path(session._workdir.name)  # type: ignore[attr-defined]
    assert (workdir / "sm" / "saved_model.pb").is_file()
    session.close()
    session.close()
    assert not workdir.exists()
    with pytest.raises(BackendError, match="session is closed"):
        session.predict(np.zeros((1, 8, 8, 1), np.float32))


# -- older TF2 SavedModels and signature discovery -------------------------------------------------------


def _tf2_savedmodel(tmp_path: Path, keras_model: Any, signatures: tuple[str, ...]) -> Path:
    """A SavedModel written by ``tf.saved_model.save`` (the TF2 / tf.keras 2 layout), zipped in a top folder."""
    import tensorflow as tf

    class Wrapper(tf.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="image")])
        def predict(self, image: Any) -> dict[str, Any]:
            return {"scores": self.model(image)}

    wrapper = Wrapper(keras_model)
    folder = tmp_path / "export" / "mymodel"
    tf.saved_model.save(wrapper, str(folder), signatures=dict.fromkeys(signatures, wrapper.predict))
    zipped = zip_directory(tmp_path / "export")  # the SavedModel sits inside 'mymodel/'
    assert isinstance(zipped, bytes)
    return write_package(tmp_path / "tf2.czann", metadata_for("unet"), zipped)


def test_older_tf2_savedmodel_in_a_subfolder(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    keras_model = model_cache.keras_model("unet")  # type: ignore[attr-defined]
    path = _tf2_savedmodel(tmp_path, keras_model, ("serving_default",))
    x = _batch((32, 32, 1))
    with load_session(open_package(path)) as session:
        assert session.signature.inputs[0].name == "image"
        assert session.signature.outputs[0].name == "scores"
        assert float(np.abs(session.predict(x) - np.asarray(keras_model(x))).max()) <= TOLERANCE


def test_single_custom_signature_is_used(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    path = _tf2_savedmodel(tmp_path, model_cache.keras_model("unet"), ("predict",))  # type: ignore[attr-defined]
    with load_session(open_package(path)) as session:
        assert session.signature_name == "predict"  # type: ignore[attr-defined]


def test_several_custom_signatures_are_refused(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    path = _tf2_savedmodel(tmp_path, model_cache.keras_model("unet"), ("a", "b"))  # type: ignore[attr-defined]
    with pytest.raises(BackendError, match=r"several signatures \(a, b\) and none is called serving_default"):
        load_session(open_package(path))


# -- hostile model files --------------------------------------------------------------------------------


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("members", "message"), [
    ([("../evil.pb", b"x"), ("saved_model.pb", b"")], "climbs out of the package"),
    ([("/etc/cron.d/evil", b"x"), ("saved_model.pb", b"")], "is an absolute path"),
    ([("sm\\..\\..\\evil", b"x")], "climbs out of the package"),
    ([(_symlink("variables", "/etc"), b"/etc"), ("saved_model.pb", b"")], "is a symlink"),
    ([("variables/variables.index", b"x")], "holds no saved_model.pb"),
])
def test_hostile_savedmodel_zip_is_refused(tmp_path: Path, members: list[tuple[Any, bytes]], message: str) -> None:
    zipped = tmp_path / "model.model"
    zipped.write_bytes(_zip(members))
    dest = tmp_path / "out" / "sm"
    with pytest.raises(BackendError, match=message):
        extract_savedmodel(zipped, dest)
    assert not (tmp_path / "evil.pb").exists() and not (tmp_path / "out" / "evil").exists()


def test_savedmodel_zip_bomb_is_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "model.model"
    zipped.write_bytes(_zip([("saved_model.pb", b""), ("variables/variables.data", b"\0" * 200_000)]))
    limits = ReadLimits(ratio_floor_bytes=10_000, max_ratio=20)
    with pytest.raises(BackendError, match="inflates"):
        extract_savedmodel(zipped, tmp_path / "sm", limits)
    with pytest.raises(BackendError, match="over the 1,000-byte limit"):
        extract_savedmodel(zipped, tmp_path / "sm2", ReadLimits(max_member_bytes=1000))


def test_savedmodel_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "model.model"
    zipped.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BackendError, match="not a readable zipped SavedModel"):
        extract_savedmodel(zipped, tmp_path / "sm")


def _onnx_with_external_weights(location: str) -> bytes:
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["input", "w"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None, None, 1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, None, None, 1])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(np.float32(42).tobytes())
    path = write_package(tmp_path / "ext.czann", metadata_for("unet"), _onnx_with_external_weights("../secret.bin"))
    # the static audit refuses it before any backend sees it ...
    with pytest.raises(UnsafeGraphError, match=r"external data reads the file '\.\./secret\.bin' outside the package"):
        load_session(open_package(path))
    # ... and the backend's own check still stands behind it for a caller who trusts the graph
    with pytest.raises(BackendError, match=r"ONNX tensor 'w' stores its data outside the model, in '\.\./secret\.bin'"):
        load_session(open_package(path), trust_graph=True)


def test_onnx_garbage_is_a_backend_error(tmp_path: Path) -> None:
    path = write_package(tmp_path / "bad.czann", metadata_for("unet"), b"\x08\x07garbage-not-protobuf\xff\xff")
    with pytest.raises(BackendError, match=r"not a readable ONNX model|cannot load the model"):
        load_session(open_package(path))


@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_tensorflow_conversion_equals_the_runner_bit_for_bit(classes: int) -> None:
    """``convert_tensor`` (what the TensorFlow session runs on a GPU) on crafted values: ties, NaN, x.5/255,
    values outside [0, 1]."""
    from czregistry_tensorflow.backend import convert_tensor

    from czregistry._quiet import import_tensorflow_quietly
    from czregistry.run.assemble import convert_output

    import_tensorflow_quietly()
    import tensorflow as tf

    rng = np.random.default_rng(classes)
    y = rng.random((3, 9, 11, classes), dtype=np.float32)
    y[0, 0] = 0.5
    y[0, 2, :] = (rng.integers(0, 256, (11, classes)) + 0.5).astype(np.float32) / np.float32(255)
    y[1, 0, :4, 0] = np.array([1.0000001, -1e-7, 3.0, -2.0], np.float32)
    finite = y.copy()
    if classes > 2:
        y[2, 0, 0, :] = np.float32(0.2)
        y[2, 0, 0, 1] = np.nan  # a larger value after a NaN loses, as with np.maximum
        y[2, 0, 0, -1] = np.float32(0.9)
        y[2, 0, 1, 0] = np.nan
    labels = convert_tensor(tf, tf.constant(y), "labels").numpy()
    assert labels.dtype == np.uint8 and np.array_equal(labels, convert_output(y, "labels"))
    u8 = convert_tensor(tf, tf.constant(finite), "uint8").numpy()
    assert u8.dtype == np.uint8 and np.array_equal(u8, convert_output(finite, "uint8"))


def test_tensorflow_runs_converted_on_the_device_equal_host_conversion(model_cache: Callable[..., Path],
                                                                       tmp_path: Path) -> None:
    """A tiled run whose session converts (as on a GPU; forced here on the CPU) writes the same files as
    the run that converts on the host."""
    from czregistry.hookspecs import hookimpl
    from czregistry.plugins import get_host
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    class PipelineBackend(TensorFlowBackend):
        name = "tensorflow-pipeline"
        device_pipeline = True

    class Plugin:
        @hookimpl
        def register_backends(self, register: Any) -> None:
            register(PipelineBackend)

    package = model_cache("unet", fmt="savedmodel", classes=3)
    np.save(tmp_path / "in.npy", (np.random.default_rng(4).random((150, 170)) * 255).astype(np.uint8))
    host = get_host()
    host.register_plugin(Plugin(), "test-tf-pipeline")
    try:
        with PipelineBackend().load(open_package(package), "cpu") as session:
            assert session.converts_on_device("labels") and session.converts_on_device("uint8")
        with TensorFlowBackend().load(open_package(package), "cpu") as session:
            assert not session.converts_on_device("labels")  # on the CPU the host converts
        for kind in ("labels", "uint8"):
            outs = []
            for backend in ("tensorflow", "tensorflow-pipeline"):
                out = tmp_path / f"{backend}-{kind}.zarr"
                run(package, tmp_path / "in.npy", out, RunOptions(output_kind=kind, backend=backend,  # type: ignore[arg-type]
                                                                  device="cpu", probe=False, batch_size=3))
                from czregistry.run.omezarr import read_ome_zarr

                outs.append(read_ome_zarr(out))
            assert outs[0].dtype == np.uint8 and np.array_equal(outs[0], outs[1]), kind
            assert len(np.unique(outs[1])) > 1
    finally:
        host.unregister_plugin("test-tf-pipeline")
