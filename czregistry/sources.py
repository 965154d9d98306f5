"""Model sources: what ``czregistry.pack`` can read, registered by plugins like backends are.

A ``Source`` subclass recognises what it can pack (an in-memory object, a file type, a folder) and loads it
into a ``LoadedSource``: a reference ``Session`` (the parity reference and the subject of the tile-size
invariance probe, taking NHWC / NDHWC batches) plus either

- ``onnx_bytes``: an ONNX graph with an NHWC / NDHWC input. Packing then does the rest in the core: opset
  conversion, layers spliced around the graph, the tile reset, canonicalisation. ONNX files
  (``czregistry.onnx.source.OnnxSource``) and PyTorch modules (the ``czregistry-torch`` plugin) take this path; or
- its own ``compose`` and ``export``: for frameworks that compose the layers in the framework itself and
  export the result (Keras, SavedModel and ``.keras`` in the ``czregistry-tensorflow`` plugin).

Why sources are plugins: the core must not import a framework plugin by name; a user with only PyTorch
installs only the torch plugin. ``pack`` asks every registered source, picks the highest ``priority`` among
those that recognise the input, and names the installed sources when none does.

Layers (``--pre`` / ``--post``) are built by the framework their plugin registered them for (the reference
layers are Keras layers). A source that can build them sets ``builds_layers`` and implements
``build_layers``; packing uses it for sources that hand over ONNX bytes, so a PyTorch or ONNX source gets
the same layers, spliced into its graph as ONNX subgraphs.

This module is the interface (a leaf, like ``backends``). The core's own ONNX source lives in the ``onnx/``
wing (``czregistry.onnx``, one of ``DEFAULT_PLUGINS`` in ``czregistry.plugins``), which registers it through
the same hook a third-party source uses. Choosing among the registered sources is ``czregistry.selection``'s
(``select_source``, ``layer_builder``). Nothing heavy is imported at module import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from .errors import PackError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from .backends import Session
    from .layers import LayerSpec

__all__ = ["LayerCall", "LayerStack", "LoadOptions", "LoadedSource", "Source", "validate_source_class"]

#: A layer spec with the keyword arguments to build it (what ``layers.parse_layer_arg`` returns).
LayerCall = tuple["LayerSpec", dict[str, Any]]


@dataclass(frozen=True)
class LoadOptions:
    """What ``pack`` knows before loading, for sources that must export at a size or opset (PyTorch)."""

    #: ONNX opset the package wants (18 for ``.czann``, 12 for legacy ``.czmodel``, or ``--opset``).
    opset: int
    #: The requested tile (``--tile`` / ``spatial_dims``), spatial axes only.
    tile: tuple[int, ...] | None = None
    #: ``InputShape`` from the metadata (spatial axes then channels), if given.
    input_shape: tuple[int, ...] | None = None
    target: Literal["czann", "czmodel"] = "czann"


class LayerStack(Protocol):
    """Pre- or post-processing layers built for one tensor shape: run eagerly (the parity reference) and
    exported as an ONNX graph that packing splices around an ONNX source."""

    @property
    def output_shape(self) -> tuple[int | None, ...]: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def to_onnx(self, opset: int) -> bytes: ...


@dataclass
class LoadedSource:
    """A loaded source; see the module docstring for the two ways it hands its model to packing."""

    description: str
    #: The source model behind the backend ``Session`` interface, taking NHWC / NDHWC batches.
    reference: Session
    #: ONNX with an NHWC / NDHWC input, or ``None`` when the source composes and exports itself.
    onnx_bytes: bytes | None = None
    #: Things worth telling the user about the load (e.g. "exported with dynamic H/W").
    notes: list[str] = field(default_factory=list)
    #: CZANN metadata the source itself carries (a foreign package's name, tile, halo): used where the caller
    #: and a conversion spec give none (what the user says always wins).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The license member's text when the source carries its own license and the caller gives no file.
    license_text: bytes | None = None

    def compose(self, pre: Sequence[LayerCall], post: Sequence[LayerCall],
                spatial: tuple[int, ...] | None) -> LoadedSource:
        """The model with ``pre`` / ``post`` layers and the input tile fixed to ``spatial`` (self-composing
        sources only; ONNX-bytes sources are composed by packing)."""
        raise PackError(f"{self.description} cannot compose layers itself")

    def export(self, model_format: str, opset: int) -> bytes:
        """The model bytes for the package (``onnx`` or ``savedmodel``)."""
        if model_format == "onnx" and self.onnx_bytes is not None:
            return self.onnx_bytes
        raise UsageError(f"{self.description} cannot be packed as a {model_format} model",
                         hint="use --model-format onnx")


class Source:
    """Base class for model sources. Subclasses set ``name`` and implement ``recognise`` and ``load``."""

    #: Stable name shown by ``czreg plugins`` and in errors.
    name: ClassVar[str] = ""
    #: What it packs, for the "no source recognises" error (e.g. "ONNX files (.onnx) and bytes").
    description: ClassVar[str] = ""
    #: Higher wins when several sources recognise the same input.
    priority: ClassVar[int] = 0
    #: True when ``build_layers`` works (the plugin that registered the reference layers).
    builds_layers: ClassVar[bool] = False

    @classmethod
    def recognise(cls, source: Any) -> bool:
        """Whether this source can load ``source`` (an object, or an existing ``Path``). Must be cheap: no
        framework import unless the object already comes from that framework."""
        raise NotImplementedError

    def load(self, source: Any, options: LoadOptions) -> LoadedSource:
        """Load ``source``; raise ``UsageError`` for input the user must fix, ``PackError`` when it cannot pack."""
        raise NotImplementedError

    def build_layers(self, calls: Sequence[LayerCall], input_shape: Sequence[int | None]) -> LayerStack:
        """``calls`` built on tensors of ``input_shape`` (batch first); only when ``builds_layers``."""
        raise NotImplementedError(f"source '{self.name}' does not build layers")


def validate_source_class(obj: Any) -> str:
    if not (isinstance(obj, type) and issubclass(obj, Source)):
        raise TypeError("register_sources expects a czregistry.sources.Source subclass")
    if not obj.name or not obj.name.replace("_", "").replace("-", "").isalnum():
        raise TypeError(f"source {obj.__name__} needs a name of letters, digits, '-' and '_'")
    if obj.recognise is Source.recognise or obj.load is Source.load:
        raise TypeError(f"source '{obj.name}' must implement recognise and load")
    return str(obj.name)
