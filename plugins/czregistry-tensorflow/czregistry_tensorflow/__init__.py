"""TensorFlow plugin for czregistry: a SavedModel backend and the Keras model source (``keras.Model`` objects,
SavedModel folders, ``.keras`` files) that ``czreg pack`` reads. The Keras source builds the Keras form of a
layer (``LayerSpec.factory``) when it composes a Keras model; the built-in layers themselves are the core's
(``czregistry.builtin_layers``), with an ONNX form that needs no TensorFlow.

Importing this module is cheap: TensorFlow and Keras load only when a model is run or a layer is built.
"""

from __future__ import annotations

from typing import Any

from czregistry.hookspecs import hookimpl

from .backend import TensorFlowBackend
from .source import KerasSource

__all__ = ["KerasSource", "TensorFlowBackend"]


@hookimpl
def register_backends(register: Any) -> None:
    register(TensorFlowBackend)


@hookimpl
def register_sources(register: Any) -> None:
    register(KerasSource)
