"""The plugin manager: loads built-in and third-party plugins through one entry-point group.

Only the library calls hooks, through the typed methods of ``PluginHost``; the rest of the code never
touches ``pm.hook``. A plugin that fails to import or raises in a hook is recorded with its name and
skipped, so one broken plugin never takes down the others or the static validator.

Environment:
- ``CZREG_PLUGINS``: unset loads every installed plugin; ``none`` (or empty) loads none; a comma list
  loads only those entry-point names. Tests set it so they never pick up whatever happens to be installed.
- ``CZREG_TRACE_PLUGINS=1``: print every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PluginHost", "PluginInfo", "get_host", "reset_host"]

ENTRY_POINT_GROUP = "czregistry"
#: Modules inside czregistry itself that register through the same hooks (static + model checks).
DEFAULT_PLUGINS: tuple[str, ...] = ("czregistry.checks",)


@dataclass
class PluginInfo:
    name: str
    version: str | None
    module: str
    builtin: bool = False
    registered: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "module": self.module, "builtin": self.builtin,
                "registers": self.registered, "errors": self.errors}


def _selection() -> set[str] | None:
    raw = os.environ.get("CZREG_PLUGINS")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.lower() in ("", "none", "0"):
        return set()
    return {p.strip() for p in raw.split(",") if p.strip()}


class PluginHost:
    """Typed wrapper over a ``pluggy.PluginManager``; create it with ``get_host()``."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("czregistry")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._cache: dict[str, list[tuple[str, Any]]] = {}
        if os.environ.get("CZREG_TRACE_PLUGINS") == "1":
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[czreg plugins] {msg}"))
            self.pm.enable_tracing()

    # -- loading --------------------------------------------------------------------------------------

    def load(self) -> None:
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._register(module, module_name.rsplit(".", 1)[-1], module_name, None, builtin=True)
        wanted = _selection()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            version = ep.dist.version if ep.dist is not None else None
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                info = PluginInfo(ep.name, version, ep.value)
                info.errors.append(f"failed to import: {type(exc).__name__}: {exc}")
                self.infos[ep.name] = info
                continue
            self._register(module, ep.name, ep.value, version)

    def _register(self, module: Any, name: str, module_name: str, version: str | None,
                  builtin: bool = False) -> None:
        info = PluginInfo(name, version, module_name, builtin=builtin)
        self.infos[name] = info
        if self.pm.is_registered(module) or self.pm.has_plugin(name):
            return
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            info.errors.append(f"rejected: {exc}")

    def register_plugin(self, module: Any, name: str) -> None:
        """Register an in-process plugin object (tests and embedding applications)."""
        self._register(module, name, getattr(module, "__name__", name), None)
        self._cache.clear()

    def unregister_plugin(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._cache.clear()

    # -- calling --------------------------------------------------------------------------------------

    def _collect(self, hook_name: str, validate: Callable[[Any], str]) -> list[tuple[str, Any]]:
        """Call one hook plugin by plugin, so a raising plugin is named and skipped, not fatal."""
        if hook_name in self._cache:
            return self._cache[hook_name]
        found: list[tuple[str, Any]] = []
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            plugin = impl.plugin_name
            info = self.infos.setdefault(plugin, PluginInfo(plugin, None, str(impl.plugin)))
            lock = threading.Lock()

            def register(obj: Any, _plugin: str = plugin, _info: PluginInfo = info, _lock: Any = lock) -> None:
                try:
                    label = validate(obj)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin '{_plugin}' registered an invalid object {obj!r}: {exc}") from exc
                with _lock:
                    found.append((_plugin, obj))
                    _info.registered.setdefault(hook_name.removeprefix("register_"), []).append(label)

            try:
                impl.function(register=register)
            except Exception as exc:
                info.errors.append(f"{hook_name} failed: {type(exc).__name__}: {exc}")
        self._cache[hook_name] = found
        return found

    def backends(self) -> list[tuple[str, Any]]:
        from .backends import validate_backend_class

        return self._collect("register_backends", validate_backend_class)

    def layers(self) -> list[tuple[str, Any]]:
        from .layers import validate_layer_spec

        return self._collect("register_layers", validate_layer_spec)

    def checks(self) -> list[tuple[str, Any]]:
        from .checks import validate_check

        return self._collect("register_checks", validate_check)

    def add_commands(self, cli: Any) -> None:
        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):
            try:
                impl.function(cli=cli)
            except Exception as exc:
                self.infos.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name, None, "")).errors.append(
                    f"register_commands failed: {type(exc).__name__}: {exc}")

    def plugin_infos(self) -> list[PluginInfo]:
        # make sure every hook ran once so 'registers' is complete
        self.backends()
        self.layers()
        self.checks()
        return sorted(self.infos.values(), key=lambda i: (not i.builtin, i.name))


_host: PluginHost | None = None
_host_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded once (idempotent, thread-safe)."""
    global _host
    with _host_lock:
        if _host is None:
            host = PluginHost()
            host.load()
            _host = host
        return _host


def reset_host() -> None:
    """Forget the loaded plugins (tests change ``CZREG_PLUGINS`` and reload)."""
    global _host
    with _host_lock:
        _host = None
