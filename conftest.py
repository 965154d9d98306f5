"""Test isolation: only our own plugins load, user data lives in a temp dir, models are built once."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BUILTIN_PLUGINS = "onnxruntime,tensorflow,example,torch,bioimageio"
os.environ["CZREG_PLUGINS"] = BUILTIN_PLUGINS
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# `bash .ci/postgres.sh && pytest -m postgres` (the README's command) runs the PostgreSQL tests: the server
# the script started is read from .ci/postgres.env unless CZREG_TEST_POSTGRES_URL is set already.
from tests.postgres_env import load_postgres_env  # noqa: E402

load_postgres_env()


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from czregistry.plugins import reset_host

    home = tmp_path_factory.mktemp("czreg-home")
    monkeypatch.setenv("CZREG_HOME", str(home))
    monkeypatch.delenv("CZREG_REGISTRY", raising=False)
    monkeypatch.setenv("CZREG_PLUGINS", BUILTIN_PLUGINS)
    # step progress on stderr (czregistry.cli._progress) would land in CliRunner's output whenever a busy
    # machine makes a step slow; tests/test_progress.py turns it on where it is the subject
    monkeypatch.setenv("CZREG_PROGRESS", "off")
    reset_host()
    yield
    reset_host()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``model_cache(kind, fmt="onnx"|"savedmodel", **metadata_overrides)`` -> path of a .czann package.

    Keras models and their exports are built once per session and shared by every test.
    """
    from czregistry.package import write_package
    from tests.models import build_model, export_onnx, export_savedmodel_zip, metadata_for

    root = tmp_path_factory.mktemp("models")
    models: dict[tuple[Any, ...], Any] = {}
    exports: dict[tuple[Any, ...], bytes] = {}
    packages: dict[tuple[Any, ...], Path] = {}

    def get(kind: str, fmt: str = "onnx", *, tile: int = 64, channels: int = 1, classes: int = 2,
            overlap: int = 16, **meta_overrides: Any) -> Path:
        key = (kind, fmt, tile, channels, classes, overlap, json.dumps(meta_overrides, sort_keys=True, default=str))
        if key in packages:
            return packages[key]
        mkey = (kind, channels, classes, tile if kind == "dense_head" else None)
        if mkey not in models:
            models[mkey] = build_model(kind, channels=channels, classes=classes, tile=tile)
        ekey = (*mkey, fmt)
        if ekey not in exports:
            exports[ekey] = (export_onnx(models[mkey]) if fmt == "onnx"
                             else export_savedmodel_zip(models[mkey], root))
        meta = metadata_for(kind, tile=tile, channels=channels, classes=classes, overlap=overlap)
        meta.update({k: v for k, v in meta_overrides.items() if v is not None})
        for k in [k for k, v in meta_overrides.items() if v is None]:
            meta.pop(k, None)
        path = root / f"{kind}-{fmt}-{len(packages)}.czann"
        write_package(path, meta, exports[ekey])
        packages[key] = path
        return path

    get.keras_model = lambda kind, **kw: models.setdefault(  # type: ignore[attr-defined]
        (kind, kw.get("channels", 1), kw.get("classes", 2), kw.get("tile") if kind == "dense_head" else None),
        build_model(kind, **kw))
    return get
