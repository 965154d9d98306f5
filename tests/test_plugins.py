"""The plugin host: entry points, the CZREG_PLUGINS switch, misbehaving plugins, ``czreg plugins``, and the
rule that every hook is documented and tested (``test_hook_<name>`` below)."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
from click.testing import CliRunner

from czregistry import hookspecs
from czregistry.backends import Backend
from czregistry.errors import BackendError, NoBackendError, PluginError
from czregistry.hookspecs import hookimpl
from czregistry.layers import LayerSpec, Param
from czregistry.package import open_package, write_package
from czregistry.plugins import PluginHost, get_host, reset_host
from czregistry.report import Finding
from czregistry.selection import (
    available_backends,
    available_layers,
    load_session,
    plugin_infos,
    problems,
    registered_checks,
    select_backend,
)
from tests.static_packages import fake_onnx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_"))


def _plugin(name: str, **hooks: Callable[..., Any]) -> ModuleType:
    """An in-process plugin module with the given hook implementations."""
    module = ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


def _spec(name: str) -> LayerSpec:
    return LayerSpec(name, "pre", lambda **kw: None, {"x": Param("float", default=1.0)}, "test layer")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A tiny ONNX-format package (the model bytes are never run by these tests)."""
    meta = {"FormatVersion": "2.1.0", "Id": "8ec0dbd1-7b6e-4e1b-8b55-4c6b0aaf1b0a", "Type": "Regression",
            "InputShape": [32, 32, 1], "OutputShape": [32, 32, 1], "ModelName": "t"}
    return write_package(tmp_path / "t.czann", meta, fake_onnx())


def _fake_distribution(root: Path, dist: str, entry_name: str, module: str, source: str) -> None:
    """Install a real (importlib.metadata-visible) distribution with one czregistry entry point."""
    info = root / f"{dist}-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(f"[czregistry]\n{entry_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


# -- loading -------------------------------------------------------------------------------------------


def test_builtin_plugins_load_through_entry_points() -> None:
    infos = {i.name: i for i in plugin_infos()}
    assert {"onnxruntime", "tensorflow", "example"} <= set(infos)
    assert infos["checks"].builtin and not infos["tensorflow"].builtin
    assert infos["onnxruntime"].version == "0.1.0"
    assert infos["onnxruntime"].registered == {"backends": ["onnxruntime"]}
    assert infos["tensorflow"].registered["backends"] == ["tensorflow"]
    assert "percentile_normalize (pre)" in infos["example"].registered["layers"]
    assert all(not i.errors for i in infos.values()), problems()


def test_loading_plugins_does_not_import_engines() -> None:
    import subprocess
    import sys

    code = ("import sys; from czregistry.selection import plugin_infos; plugin_infos(); "
            "import czregistry.cli; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'onnxruntime', 'tf2onnx', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_czreg_plugins_none_loads_no_external_plugin(monkeypatch: pytest.MonkeyPatch, package: Path) -> None:
    monkeypatch.setenv("CZREG_PLUGINS", "none")
    reset_host()
    assert sorted(i.name for i in plugin_infos()) == ["builtin_layers", "checks", "onnx"]  # built-ins still run
    assert available_backends() == {}
    # the built-in layers are the core's (ONNX form, no framework): they stay, nothing else registers one
    assert {plugin for plugin, _ in available_layers().values()} == {"builtin_layers"}
    with pytest.raises(NoBackendError) as err:
        load_session(open_package(package))
    assert "disabled by CZREG_PLUGINS='none'" in str(err.value)  # installed: not "pip install" (issue 12)


def test_czreg_plugins_only_these(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime, nosuchplugin")
    reset_host()
    host = get_host()
    assert sorted(i.name for i in plugin_infos()) == ["builtin_layers", "checks", "onnx", "onnxruntime"]
    assert host.missing == ["nosuchplugin"]
    assert any("'nosuchplugin'" in p for p in problems())
    assert select_backend("onnx").name == "onnxruntime"
    with pytest.raises(NoBackendError, match="no installed backend can run savedmodel") as err:
        select_backend("savedmodel")
    assert "czregistry-tensorflow" in str(err.value)


def test_plugin_that_fails_to_import_is_named_and_isolated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: Path) -> None:
    from czregistry.checks import ValidateOptions
    from czregistry.validate import validate

    _fake_distribution(tmp_path, "czreg-broken", "broken", "czreg_broken_mod", "raise ImportError('no numpy 3')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime,tensorflow,example,broken")
    reset_host()
    get_host()
    infos = {i.name: i for i in plugin_infos()}
    assert infos["broken"].version == "0.3.0"
    assert infos["broken"].errors == ["failed to import: ImportError: no numpy 3"]
    assert "plugin 'broken': failed to import: ImportError: no numpy 3" in problems()
    assert {"onnxruntime", "tensorflow"} <= set(available_backends())  # the others still work
    report = validate(package, ValidateOptions(static=True))  # and so does the static validator
    assert not [f for f in report.findings if f.check.startswith("plugin")]


def test_plugin_with_misspelt_hook_is_rejected_by_check_pending() -> None:
    host = get_host()
    host.register_plugin(_plugin("typo", register_layer=lambda register: None), "typo")
    info = host.infos["typo"]
    assert info.errors and info.errors[0].startswith("rejected:")
    assert "register_layer" in info.errors[0]
    assert not host.pm.has_plugin("typo")


def test_plugin_with_unknown_hook_argument_is_rejected() -> None:
    host = get_host()
    host.register_plugin(_plugin("badargs", register_layers=lambda register, colour: None), "badargs")
    assert "colour" in host.infos["badargs"].errors[0]


def test_plugin_that_raises_is_named_and_others_still_register() -> None:
    def boom(register: Any) -> None:
        register(_spec("half_registered"))
        raise RuntimeError("disk on fire")

    host = get_host()
    host.register_plugin(_plugin("raiser", register_layers=boom), "raiser")
    names = {spec.name for _, spec in available_layers().values()}
    assert "normalize" in names and "percentile_normalize" in names
    assert "half_registered" not in names  # all or nothing per plugin
    assert "plugin 'raiser': register_layers failed: RuntimeError: disk on fire" in problems()


@pytest.mark.parametrize(("hook", "nonsense", "expected"), [
    ("register_layers", "normalize", "registered an invalid object 'normalize' in register_layers"),
    ("register_backends", object, "registered an invalid object <class 'object'> in register_backends"),
    ("register_checks", 42, "registered an invalid object 42 in register_checks"),
])
def test_plugin_that_registers_nonsense_is_named(hook: str, nonsense: Any, expected: str) -> None:
    def impl(register: Any) -> None:
        with contextlib.suppress(PluginError):  # even a plugin that swallows the error is reported
            register(nonsense)

    host = get_host()
    host.register_plugin(_plugin("nonsense", **{hook: impl}), "nonsense")
    collected = {"register_layers": lambda: available_layers().values(),
                 "register_backends": lambda: available_backends().values(), "register_checks": registered_checks}
    assert all(plugin != "nonsense" for plugin, _ in collected[hook]())
    found = problems()
    assert any(p.startswith("plugin 'nonsense': " + expected) for p in found), found


def test_plugin_that_returns_nonsense_is_named() -> None:
    host = get_host()
    host.register_plugin(_plugin("returner", register_layers=lambda register: [_spec("x")]), "returner")
    assert not [s for p, s in available_layers().values() if p == "returner"]
    assert any("'returner': register_layers returned list" in p for p in problems())


def test_duplicate_layer_name_keeps_the_first_and_names_the_second() -> None:
    host = get_host()
    host.register_plugin(_plugin("copycat", register_layers=lambda register: register(_spec("normalize"))),
                         "copycat")
    owners = {spec.name: plugin for plugin, spec in available_layers().values()}
    assert owners["normalize"] == "builtin_layers"
    assert "plugin 'copycat': layer 'normalize' is already registered by plugin 'builtin_layers'; this one is ignored" \
        in problems()


def test_backend_that_crashes_is_named(package: Path) -> None:
    class Crashy(Backend):
        name = "crashy"
        formats = frozenset({"onnx"})
        priority = 50

        def load(self, package: Any, device: Any = "auto") -> Any:
            return 1 / 0

    class Unavailable(Crashy):
        name = "unavailable"

        @classmethod
        def is_available(cls) -> bool:
            raise OSError("libcuda.so missing")

    host = get_host()
    host.register_plugin(_plugin("crashy_plugin", register_backends=lambda register: register(Crashy)), "crashy_plugin")
    with pytest.raises(BackendError, match="backend 'crashy' from plugin 'crashy_plugin' failed to load the model: "
                                           "ZeroDivisionError: division by zero"):
        load_session(open_package(package))
    host.register_plugin(_plugin("unavail", register_backends=lambda register: register(Unavailable)), "unavail")
    with pytest.raises(BackendError, match="backend 'unavailable' from plugin 'unavail' crashed in is_available"):
        load_session(open_package(package), backend="unavailable")


def test_check_that_crashes_is_a_finding_naming_the_plugin(package: Path) -> None:
    from czregistry.checks import ValidateOptions
    from czregistry.validate import validate

    class Crash:
        id = "crash.static"
        needs_model = False
        order = 1

        def run(self, ctx: Any) -> list[Finding]:
            raise KeyError("oops")

    class After:
        id = "crash.after"
        needs_model = False
        order = 2

        def run(self, ctx: Any) -> list[Finding]:
            return [Finding.info(self.id, "still running")]

    def register_checks(register: Any) -> None:
        register(Crash())
        register(After())

    get_host().register_plugin(_plugin("crasher", register_checks=register_checks), "crasher")
    report = validate(package, ValidateOptions(static=True))
    crashed = [f for f in report.findings if f.check == "plugin.check_crashed"]
    assert len(crashed) == 1 and "from plugin 'crasher' crashed" in crashed[0].message
    assert any(f.check == "crash.after" for f in report.findings)  # later checks still run


def test_trace_plugins_prints_hook_calls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CZREG_TRACE_PLUGINS", "1")
    host = PluginHost()
    host.load()
    host.pm.hook.register_layers(register=lambda spec: None)
    assert "register_layers" in capsys.readouterr().err


# -- czreg plugins --------------------------------------------------------------------------------------


def test_cli_plugins_json() -> None:
    from czregistry.cli import main

    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["tensorflow"]["version"] == "0.1.0"
    assert by_name["tensorflow"]["registers"]["backends"] == ["tensorflow"]
    formats = {b["name"]: b["formats"] for b in data["backends"]}
    assert formats == {"onnxruntime": ["onnx"], "tensorflow": ["savedmodel"], "torch": ["onnx"]}
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["normalize"]["usage"] == "normalize:mean=<floats>,std=<floats>"
    assert layers["normalize"]["params"]["mean"] == {"type": "floats", "default": None, "required": True,
                                                     "help": layers["normalize"]["params"]["mean"]["help"]}
    assert layers["percentile_normalize"]["plugin"] == "example" and layers["percentile_normalize"]["local"] is False
    assert data["problems"] == []


def test_cli_plugins_text_names_a_broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from czregistry.cli import main

    _fake_distribution(tmp_path, "czreg-broken2", "broken2", "czreg_broken2_mod",
                       "from czregistry.hookspecs import hookimpl\n\n@hookimpl\ndef register_backends(register):\n"
                       "    register('not a backend')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime,broken2,ghost")
    reset_host()
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 4  # a plugin error is the README's exit 4, still listing everything
    assert "broken2 0.3.0\n  ERROR: registered an invalid object 'not a backend'" in result.output
    assert "onnxruntime 0.1.0\n  backends: onnxruntime" in result.output
    assert "WARNING: CZREG_PLUGINS names 'ghost'" in result.output


# -- every hook has a test and documentation ------------------------------------------------------------


def test_hook_register_backends(package: Path) -> None:
    class EchoBackend(Backend):
        name = "echo"
        formats = frozenset({"onnx"})
        priority = 100

        def load(self, package: Any, device: Any = "auto") -> Any:
            raise NotImplementedError

    get_host().register_plugin(_plugin("echo", register_backends=lambda register: register(EchoBackend)), "echo")
    assert available_backends()["echo"] == ("echo", EchoBackend)
    assert select_backend("onnx") is EchoBackend  # highest priority wins
    assert select_backend("onnx", "onnxruntime").name == "onnxruntime"  # unless the user chooses


def test_hook_register_layers() -> None:
    from czregistry.selection import parse_layer

    get_host().register_plugin(_plugin("mine", register_layers=lambda register: register(_spec("mine"))), "mine")
    assert available_layers()["mine"][0] == "mine"
    spec, kwargs = parse_layer("mine:x=2.5")
    assert spec.name == "mine" and kwargs == {"x": 2.5}


def test_hook_register_checks(package: Path) -> None:
    from czregistry.checks import ValidateOptions
    from czregistry.validate import validate

    class NameCheck:
        id = "example.name_length"
        needs_model = False
        order = 500

        def run(self, ctx: Any) -> list[Finding]:
            return [Finding.warning(self.id, "model name is short")]

    get_host().register_plugin(_plugin("namecheck", register_checks=lambda register: register(NameCheck())),
                               "namecheck")
    report = validate(package, ValidateOptions(static=True))
    assert any(f.check == "example.name_length" for f in report.findings)


def test_hook_register_sources(model_cache: Callable[..., Path], tmp_path: Path) -> None:
    """A plugin's source is asked by pack(); the highest priority wins; unknown input names the sources."""
    from czregistry.errors import UsageError
    from czregistry.onnx.source import onnx_reference
    from czregistry.pack.core import pack
    from czregistry.package import open_package as open_pkg
    from czregistry.selection import available_sources, select_source
    from czregistry.sources import LoadedSource, LoadOptions, Source

    onnx_bytes = open_pkg(model_cache("unet")).read_model_bytes()

    class LinkSource(Source):
        name = "onnx-link"
        description = ".onnxlink files naming an ONNX model"
        priority = 5

        @classmethod
        def recognise(cls, source: Any) -> bool:
            return isinstance(source, str | Path) and Path(source).suffix == ".onnxlink"

        def load(self, source: Any, options: LoadOptions) -> LoadedSource:
            data = Path(Path(source).read_text().strip()).read_bytes()
            return LoadedSource(f"link {source}", onnx_reference(data), onnx_bytes=data)

    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_bytes)
    link = tmp_path / "model.onnxlink"
    link.write_text(str(model))
    with pytest.raises(UsageError, match=r"no installed model source recognises it \(installed: .*onnx \(ONNX"):
        select_source(link)
    get_host().register_plugin(_plugin("link", register_sources=lambda register: register(LinkSource)), "link")
    assert available_sources()["onnx-link"] == ("link", LinkSource)
    assert available_sources()["onnx"][0] == "onnx"  # the core's own source, through the same hook
    assert select_source(link) == ("link", LinkSource)
    assert select_source(model)[1].name == "onnx"
    meta = open_pkg(model_cache("unet")).metadata
    result = pack(link, {k: meta[k] for k in ("Type", "Classes", "MinOverlap", "InputShape")}, tmp_path / "out.czann")
    assert result.valid and result.parity_max_abs_diff is not None and result.parity_max_abs_diff <= 1e-4
    assert open_pkg(result.path).read_model_bytes() != b""
    assert get_host().infos["link"].registered["sources"] == ["onnx-link"]


def test_hook_register_commands() -> None:
    from czregistry.cli import main

    @click.command("hello")
    def hello() -> None:
        click.echo("hello from a plugin")

    def add(cli: click.Group) -> None:
        cli.add_command(hello)
        cli.add_command(click.Command("validate", callback=lambda: None))  # may not replace a built-in

    main.load_builtin_commands()  # built-ins load lazily, and always before any plugin command
    original = main.commands["validate"]
    host = get_host()
    host.register_plugin(_plugin("cmds", register_commands=add), "cmds")
    try:
        host.add_commands(main)
        assert main.commands["validate"] is original
        assert "plugin 'cmds': command 'validate' already exists; the plugin's version is ignored" in problems()
        assert host.infos["cmds"].registered["commands"] == ["hello"]
        result = CliRunner().invoke(main, ["hello"])
        assert result.output == "hello from a plugin\n"
    finally:
        main.commands.pop("hello", None)


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook: str) -> None:
    """docs/plugins.md has a section ``### register_x(args)`` whose signature matches the hookspec."""
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(rf"^### `?{hook}\(([^)]*)\)`?$", text, re.MULTILINE)
    assert match, f"docs/plugins.md lacks a '### {hook}({params})' section"
    assert match.group(1) == params, \
        f"docs/plugins.md documents {hook}({match.group(1)}), the hookspec takes ({params})"
    section = text[match.end():].split("\n### ", 1)[0]
    assert "@hookimpl" in section, f"the {hook} section of docs/plugins.md has no example"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook: str) -> None:
    assert callable(globals().get(f"test_hook_{hook}")), f"tests/test_plugins.py lacks test_hook_{hook}"


def test_hookspecs_have_docstrings() -> None:
    for hook in HOOKS:
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook
