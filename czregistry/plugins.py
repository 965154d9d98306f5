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
#: Modules inside czregistry itself that register through the same hooks (static + model checks, the ONNX
#: model source, the built-in layers in their ONNX and Keras forms).
DEFAULT_PLUGINS: tuple[str, ...] = ("czregistry.checks", "czregistry.onnx", "czregistry.builtin_layers")


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
        #: Names given in ``CZREG_PLUGINS`` that match no installed entry point.
        self.missing: list[str] = []
        #: Installed plugins ``CZREG_PLUGINS`` left out: entry-point name -> distribution name.
        self.skipped: dict[str, str] = {}
        if os.environ.get("CZREG_TRACE_PLUGINS") == "1":
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[czreg plugins] {msg}"))
            self.pm.enable_tracing()

    def _trace(self, hook_name: str, plugin: str) -> None:
        """``CZREG_TRACE_PLUGINS=1``: we call hook implementations one by one (to attribute what each plugin
        registers), which bypasses pluggy's own tracing; say each call here instead."""
        if os.environ.get("CZREG_TRACE_PLUGINS") == "1":
            sys.stderr.write(f"[czreg plugins] {hook_name} -> {plugin}\n")

    # -- loading --------------------------------------------------------------------------------------

    def load(self) -> None:
        """Register the default plugins, then every selected entry point of group ``czregistry``."""
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._register(module, module_name.rsplit(".", 1)[-1], module_name, None, builtin=True)
        wanted = _selection()
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                self.skipped[ep.name] = ep.dist.name if ep.dist is not None else ep.name
                continue
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in seen:
                self.infos[ep.name].errors.append(
                    f"a second distribution also provides plugin '{ep.name}' ({ep.value} {version or ''}); ignored")
                continue
            seen.add(ep.name)
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                info = PluginInfo(ep.name, version, ep.value)
                info.errors.append(f"failed to import: {type(exc).__name__}: {exc}")
                self.infos[ep.name] = info
                continue
            self._register(module, ep.name, ep.value, version)
        self.missing = sorted((wanted or set()) - seen)

    def _register(self, module: Any, name: str, module_name: str, version: str | None,
                  builtin: bool = False) -> None:
        if self.pm.has_plugin(name) or self.pm.is_registered(module):
            self.infos.setdefault(name, PluginInfo(name, version, module_name, builtin=builtin)).errors.append(
                f"plugin name '{name}' or module {module_name} is already registered; ignored")
            return
        info = PluginInfo(name, version, module_name, builtin=builtin)
        self.infos[name] = info
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as exc:  # pluggy rejects unknown hooks (check_pending) and bad signatures
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

    def collect(self, hook_name: str, validate: Callable[[Any], str],
                 key: Callable[[Any], str] | None = None) -> list[tuple[str, Any]]:
        """Call one hook plugin by plugin, so a misbehaving plugin is named and skipped, not fatal.

        Per plugin it is all or nothing: if the hook raises or registers one invalid object, none of
        what that plugin registered in this hook is used. ``key`` names objects that must be unique
        (backend and layer names); a later plugin cannot silently replace an earlier one's object.
        """
        if hook_name in self._cache:
            return self._cache[hook_name]
        found: list[tuple[str, Any]] = []
        owners: dict[str, str] = {}
        what = hook_name.removeprefix("register_")
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy calls them in reverse): built-ins first
            plugin = impl.plugin_name
            info = self.infos.setdefault(plugin, PluginInfo(plugin, None, str(impl.plugin)))
            mine: list[tuple[str, Any]] = []
            failures: list[str] = []

            def register(obj: Any, _plugin: str = plugin, _mine: list[tuple[str, Any]] = mine,
                         _failures: list[str] = failures) -> None:
                try:
                    label = validate(obj)
                except Exception as exc:
                    message = f"registered an invalid object {obj!r} in {hook_name}: {exc}"
                    _failures.append(message)  # recorded even if the plugin swallows the exception
                    raise PluginError(f"plugin '{_plugin}' {message}") from exc
                _mine.append((label, obj))

            try:
                self._trace(hook_name, plugin)
                returned = impl.function(register=register)
            except Exception as exc:
                if not (isinstance(exc, PluginError) and failures):  # else already recorded by register()
                    failures.append(f"{hook_name} failed: {type(exc).__name__}: {exc}")
            else:
                if returned is not None:
                    failures.append(f"{hook_name} returned {type(returned).__name__}; hooks must call "
                                    "register(...) and return None")
            if failures:
                info.errors.extend(dict.fromkeys(failures))
                continue
            for label, obj in mine:
                if key is not None:
                    k = key(obj)
                    if k in owners:
                        info.errors.append(f"{what[:-1]} '{k}' is already registered by plugin "
                                           f"'{owners[k]}'; this one is ignored")
                        continue
                    owners[k] = plugin
                found.append((plugin, obj))
                info.registered.setdefault(what, []).append(label)
        self._cache[hook_name] = found
        return found

    def add_commands(self, cli: Any) -> None:
        """Let plugins add commands; one that would replace an existing command is undone and reported."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.infos.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name, None, str(impl.plugin)))
            before = dict(cli.commands)
            try:
                self._trace("register_commands", impl.plugin_name)
                impl.function(cli=cli)
            except Exception as exc:
                info.errors.append(f"register_commands failed: {type(exc).__name__}: {exc}")
                cli.commands.clear()
                cli.commands.update(before)
                continue
            for name, command in list(cli.commands.items()):
                if name in before and command is not before[name]:
                    cli.commands[name] = before[name]
                    info.errors.append(f"command '{name}' already exists; the plugin's version is ignored")
                elif name not in before:
                    info.registered.setdefault("commands", []).append(name)

    def collected_infos(self) -> list[PluginInfo]:
        """Every plugin known so far with what it registered and its errors, built-ins first. Only hooks
        already collected are reflected: ``czregistry.selection.plugin_infos`` collects every kind first."""
        return sorted(self.infos.values(), key=lambda i: (not i.builtin, i.name))

    def load_failures(self) -> list[str]:
        """One line per plugin that could not be loaded at all (import failed, or pluggy rejected it)."""
        return [f"plugin '{info.name}' failed to load ({err})" for info in self.infos.values()
                for err in info.errors if err.startswith(("failed to import:", "rejected:"))]


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
