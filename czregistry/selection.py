"""Choosing among what the plugins registered: the backend that runs a format, the source that packs a model,
layers by name, the checks to run, and the plugin report.

The interface modules (``backends``, ``layers``, ``checks``, ``sources``) are leaves that define what a plugin
registers and how it is validated; ``plugins`` loads plugins and calls hooks; this module joins the two.
Keeping selection here is what keeps the import graph free of circles (``tests/test_layout.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .backends import GPU_HINT_FOR_FORMAT, PLUGIN_FOR_FORMAT, Backend, Device, Session, validate_backend_class
from .checks import validate_check
from .errors import BackendError, CzregError, NoBackendError, PackError, UsageError
from .layers import LayerSpec, parse_layer_arg, validate_layer_spec
from .package import ModelFormat, Package
from .plugins import PluginInfo, get_host
from .sources import Source, validate_source_class

__all__ = ["available_backends", "available_layers", "available_sources", "layer_builder", "layer_specs",
           "load_session", "parse_layer", "plugin_infos", "problems", "registered_checks", "select_backend",
           "select_source"]


def available_layers() -> dict[str, tuple[str, LayerSpec]]:
    """``{layer name: (plugin name, LayerSpec)}``, layer names unique."""
    return {spec.name: (plugin, spec) for plugin, spec in
            get_host().collect("register_layers", validate_layer_spec, key=lambda spec: str(spec.name))}


def layer_specs() -> dict[str, LayerSpec]:
    """``{layer name: LayerSpec}`` for ``layers.parse_layer_arg``."""
    return {name: spec for name, (_, spec) in available_layers().items()}


def parse_layer(arg: str) -> tuple[LayerSpec, dict[str, Any]]:
    """``layers.parse_layer_arg`` against the installed layers: ``normalize:mean=0.5,std=0.2``."""
    return parse_layer_arg(arg, layer_specs())


def registered_checks() -> list[tuple[str, Any]]:
    """``[(plugin name, Check)]`` in run order (``order``, then id); check ids unique."""
    found = get_host().collect("register_checks", validate_check, key=lambda check: str(check.id))
    return sorted(found, key=lambda pc: (pc[1].order, pc[1].id))


def plugin_infos() -> list[PluginInfo]:
    """Every plugin with what it registered and its errors (each hook is run once for this)."""
    available_backends()
    available_layers()
    registered_checks()
    available_sources()
    return get_host().collected_infos()


def problems() -> list[str]:
    """One line per plugin error, each naming the plugin (for warnings in reports and ``czreg plugins``)."""
    lines = [f"CZREG_PLUGINS names '{name}' but no installed plugin has that entry-point name"
             for name in get_host().missing]
    for info in plugin_infos():
        lines.extend(f"plugin '{info.name}': {err}" for err in info.errors)
    return lines


def available_backends() -> dict[str, tuple[str, type[Backend]]]:
    """``{backend name: (plugin name, class)}`` for every registered backend."""
    return {cls.name: (plugin, cls) for plugin, cls in
            get_host().collect("register_backends", validate_backend_class, key=lambda cls: str(cls.name))}


def _ask(plugin: str, cls: type[Backend], question: str) -> bool:
    """``cls.is_available()`` or ``cls.gpu_available()``; a crash in that plugin code becomes a
    ``BackendError`` naming the plugin, never a traceback."""
    try:
        return bool(getattr(cls, question)())
    except Exception as exc:
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' crashed in {question}(): "
                           f"{type(exc).__name__}: {exc}",
                           hint=f"report this to the author of plugin '{plugin}'") from exc


def _no_backend_hint(package: str) -> str:
    """What to do when no backend runs a format: install the plugin, unless it is installed and only
    ``CZREG_PLUGINS`` keeps it out, or it is installed and failed to load."""
    import os

    host = get_host()
    skipped = [name for name, dist in host.skipped.items() if dist.lower().replace("_", "-") == package]
    if skipped:
        setting = os.environ.get("CZREG_PLUGINS", "")
        return (f"plugin '{skipped[0]}' ({package}) is installed but disabled by CZREG_PLUGINS={setting!r}; "
                f"unset CZREG_PLUGINS or add {skipped[0]} to it")
    if host.load_failures():
        return f"a plugin failed to load: see 'czreg plugins' (else pip install {package})"
    return f"install the {package} plugin (pip install {package})"


def select_backend(model_format: ModelFormat, name: str | None = None, device: Device = "auto") -> type[Backend]:
    """The backend class to run ``model_format``: the user's choice (``--backend``), else among the
    available backends for the format: with ``device="auto"`` the first (by priority) that has a GPU, else
    the highest priority; with ``"gpu"`` only backends with a GPU; with ``"cpu"`` the highest priority.
    ``gpu_available()`` is asked only of backends that can run the format, in priority order, stopping at
    the first yes. Raises ``UsageError`` for an unknown name and ``NoBackendError`` (whose hint names the
    plugin to install) when nothing can run the format, or nothing can run it on a GPU for ``"gpu"``."""
    backends = available_backends()
    if name is not None:
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none installed"
            raise UsageError(f"unknown backend '{name}' (installed: {known})",
                             hint="see 'czreg plugins' for what is installed")
        plugin, cls = backends[name]
        if model_format not in cls.formats:
            raise NoBackendError(f"backend '{name}' cannot run {model_format} models "
                                 f"(it runs {', '.join(sorted(cls.formats))})",
                                 hint="leave out --backend to pick one that can")
        if not _ask(plugin, cls, "is_available"):
            raise NoBackendError(f"backend '{name}' is installed but its engine does not import here",
                                 hint=f"reinstall plugin '{plugin}'")
        if device == "gpu" and not _ask(plugin, cls, "gpu_available"):
            raise BackendError(f"--device gpu was requested but backend '{name}' sees no usable GPU",
                               hint="use --device auto or cpu, or install the GPU build of the engine")
        return cls
    candidates = sorted((cls for plugin, cls in backends.values()
                         if model_format in cls.formats and _ask(plugin, cls, "is_available")),
                        key=lambda c: -c.priority)
    if not candidates:
        package = PLUGIN_FOR_FORMAT.get(model_format)
        if package is None:
            raise NoBackendError(f"no installed backend can run {model_format} models",
                                 hint="model.model is neither ONNX nor a zipped SavedModel; see 'czreg plugins'")
        raise NoBackendError(f"no installed backend can run {model_format} models", hint=_no_backend_hint(package))
    if device == "cpu" or (device == "auto" and len(candidates) == 1):
        return candidates[0]
    for cls in candidates:
        if _ask(backends[cls.name][0], cls, "gpu_available"):
            return cls
    if device == "gpu":
        tried = ", ".join(c.name for c in candidates)
        raise NoBackendError(f"--device gpu was requested but no installed backend for {model_format} models "
                             f"sees a usable GPU (tried: {tried})",
                             hint=f"{GPU_HINT_FOR_FORMAT.get(model_format, 'see czreg plugins')}, or use --device cpu")
    return candidates[0]


def load_session(package: Package, backend: str | None = None, device: Device = "auto", *,
                 trust_graph: bool = False) -> Session:
    """Load the package's model once with the selected backend. Any failure is a ``BackendError``; one
    caused by a bug in a backend plugin (not a ``CzregError``) names the plugin.

    Every path that runs a package's model comes through here, so this is where the static graph audit is
    enforced: a graph that fails it raises ``UnsafeGraphError`` before any backend sees it, unless the caller
    trusts it (``--trust-graph``, for one's own models)."""
    if not trust_graph:
        from .audit import require_clean

        require_clean(package)
    cls = select_backend(package.model_format, backend, device)
    plugin = available_backends()[cls.name][0]
    try:
        session = cls().load(package, device)
    except CzregError:
        raise
    except Exception as exc:
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' failed to load the model: "
                           f"{type(exc).__name__}: {exc}",
                           hint=f"if the package is valid, report this to the author of plugin '{plugin}'") from exc
    if not isinstance(session, Session):
        raise BackendError(f"backend '{cls.name}' from plugin '{plugin}' returned {type(session).__name__}, "
                           "not a Session", hint=f"report this to the author of plugin '{plugin}'")
    return session


# -- model sources (packing) ---------------------------------------------------------------------------

def available_sources() -> dict[str, tuple[str, type[Source]]]:
    """``{source name: (plugin name, Source subclass)}`` of every loaded plugin."""
    return {cls.name: (plugin, cls) for plugin, cls in
            get_host().collect("register_sources", validate_source_class, key=lambda cls: str(cls.name))}


def _describe(source: Any) -> str:
    if isinstance(source, bytes):
        return "bytes"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return f"folder {path}" if path.is_dir() else f"{path} ('{path.suffix.lower() or 'no suffix'}' file)"
    return f"a {type(source).__module__}.{type(source).__qualname__}"


def select_source(source: Any) -> tuple[str, type[Source]]:
    """``(plugin, Source subclass)`` for ``source``: the highest-priority source that recognises it.

    A source whose ``recognise`` raises is skipped (a broken plugin must not stop the others); when none
    recognises the input, ``UsageError`` names the installed sources and what each packs.
    """
    found: list[tuple[int, str, type[Source]]] = []
    installed = available_sources()
    for plugin, cls in installed.values():
        try:
            if cls.recognise(source):
                found.append((int(cls.priority), plugin, cls))
        except Exception:  # a plugin's broken recognise must not hide the other sources
            continue
    if found:
        _, plugin, cls = max(found, key=lambda t: t[0])
        return plugin, cls
    listing = "; ".join(f"{name} ({cls.description or plugin})" for name, (plugin, cls) in sorted(installed.items()))
    raise UsageError(f"cannot pack {_describe(source)}: no installed model source recognises it "
                     f"(installed: {listing or 'none'})", hint=_install_hint(source))


#: The commands that install a missing model source, run in a clone of czregistry (README, "Plugins").
TORCH_INSTALL = "pip install -r requirements/torch.txt"
TORCH_CPU_INSTALL = "pip install -r requirements/torch-cpu.txt"
TENSORFLOW_INSTALL = "pip install -e plugins/czregistry-tensorflow"
_TORCH_SUFFIXES = (".pt", ".pt2", ".pth", ".ptl")


def _install_hint(source: Any) -> str:
    """Name the exact command for the plugin the input most likely needs: a hint without a command leaves a
    new user to guess the package name and the pairing of torch and torchvision."""
    torch_cmd = (f"PyTorch models need the czregistry-torch plugin: in the czregistry clone run '{TORCH_INSTALL}' "
                 f"(CPU-only PyTorch, much smaller: '{TORCH_CPU_INSTALL}')")
    tf_cmd = f"Keras/SavedModel models need czregistry-tensorflow: '{TENSORFLOW_INSTALL}'"
    is_path = isinstance(source, str | os.PathLike)
    from_torch = not is_path and any(c.__module__.split(".")[0] == "torch" for c in type(source).__mro__)
    if from_torch or (is_path and Path(source).suffix.lower() in _TORCH_SUFFIXES):
        return torch_cmd
    return f"{torch_cmd}; {tf_cmd}; 'czreg plugins' lists what is installed"


def layer_builder() -> Source:
    """The source that builds ``--pre`` / ``--post`` layers (``builds_layers``), or ``PackError``."""
    for _, (_, cls) in sorted(available_sources().items()):
        if cls.builds_layers:
            return cls()
    raise PackError("these layers exist only as Keras layers (no ONNX form), and no plugin that builds Keras "
                    "layers is loaded", hint="pip install czregistry-tensorflow (plugins/czregistry-tensorflow), "
                    "or give the layer an ONNX form (docs/plugins.md)")
