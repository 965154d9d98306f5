"""Import TensorFlow without its C++ start-up chatter on the terminal.

TensorFlow prints CPU-feature notices, "no CUDA drivers" and oneDNN banners straight to file
descriptor 2 before its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them.
We point fd 2 at /dev/null only for the duration of the import; any real import failure still raises a
Python exception afterwards, when the caller imports the module for use.
"""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["import_tensorflow_quietly"]


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules or os.environ.get("CZREG_TF_VERBOSE") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        for name in ("tensorflow", "keras", "tf2onnx"):
            try:
                importlib.import_module(name)
            except Exception:  # reported properly when the caller imports it for real
                break
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
