"""The shared model fixtures build real packages that the reader accepts."""

from __future__ import annotations

import pytest

from czregistry.package import inspect_package


@pytest.mark.parametrize("fmt", ["onnx", "savedmodel"])
def test_model_cache_builds_readable_packages(model_cache, fmt):
    path = model_cache("unet", fmt)
    package, findings = inspect_package(path)
    assert package is not None, findings
    assert package.model_format == fmt
    assert package.metadata["InputShape"] == [64, 64, 1]
    assert model_cache("unet", fmt) == path  # cached
