"""Start-up (issue 12): ``czreg list`` on a local registry answers without SQLAlchemy, plugins or NumPy,
and its quick read path gives exactly what the full registry API gives. Speed itself is measured by
``benchmarks/startup.py``, not asserted here."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from czregistry.cli import main
from czregistry.registry import open_registry
from czregistry.registry.quicklist import quick_search, render_module
from tests.test_registry import make_package

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with finals, a pre-release, a yanked and an invalid version, and a local version (shared:
    tests must not change it)."""
    tmp_path = tmp_path_factory.mktemp("startup")
    reg_dir = tmp_path / "reg"
    with open_registry(str(reg_dir)) as reg:
        for name, version in [("nuclei-seg", "1.0.0"), ("nuclei-seg", "1.1.0"), ("nuclei-seg", "2.0.0rc1"),
                              ("Cells_Big", "0.1"), ("cells-big", "0.2+local"), ("other", "3.0")]:
            reg.publish(make_package(tmp_path), name=name, version=version, static=True)
        reg.publish(make_package(tmp_path, MinOverlap=[15, 15]), name="shaky", version="1.0.0", static=True,
                    allow_invalid=True)
        reg.yank("other", "3.0", reason="bad")
    return reg_dir


@pytest.mark.parametrize("name", [None, "nuclei", "cells*", "CELLS_big", "nothing-matches"])
@pytest.mark.parametrize("all_versions", [False, True])
@pytest.mark.parametrize("include_yanked", [False, True])
@pytest.mark.parametrize("limit", [None, 2])
def test_quick_list_equals_the_full_search(populated: Path, name: str | None, all_versions: bool,
                                           include_yanked: bool, limit: int | None) -> None:
    filters = {"name": name, "all_versions": all_versions, "include_yanked": include_yanked, "limit": limit}
    quick = quick_search(str(populated), None, **filters)
    with open_registry(str(populated)) as reg:
        full = reg.search(**filters)
    assert quick is not None
    assert quick == full
    if name is None and not limit:
        assert len(full) == (7 if all_versions else 4) - (0 if include_yanked else 1)


def test_quick_list_steps_aside_when_it_cannot_be_sure(populated: Path, tmp_path: Path) -> None:
    """Other filters, a missing database, a server URL or a schema other than HEAD: ``None`` (the caller
    opens the registry normally), never a guess."""
    base = {"name": None, "all_versions": False, "include_yanked": False, "limit": None}
    assert quick_search(str(populated), None, **base, model_type="x") is None
    assert quick_search(str(populated), None, **base, tag="stage") is None
    assert quick_search(str(tmp_path / "nowhere"), None, **base) is None
    assert quick_search("http://127.0.0.1:9", None, **base) is None
    import shutil
    import sqlite3

    copy = tmp_path / "copy"
    shutil.copytree(populated, copy)
    assert quick_search(str(copy), None, **base) is not None
    with sqlite3.connect(copy / "registry.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'r0005'")
    assert quick_search(str(copy), None, **base) is None


def test_generated_sql_matches_the_search_statement() -> None:
    """``_quicklist_sql.py`` is compiled from ``api.search_statement`` and the migration HEAD; after a
    change to either, run ``python -m czregistry.registry.quicklist``."""
    generated = ROOT / "czregistry" / "registry" / "_quicklist_sql.py"
    assert generated.read_text(encoding="utf-8") == render_module(), (
        "stale: run python -m czregistry.registry.quicklist")


def test_cli_list_output_is_the_same_on_both_paths(populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["list", "--all-versions", "--yanked", "--registry", str(populated)]
    quick = CliRunner().invoke(main, args)
    quick_json = CliRunner().invoke(main, [*args, "--json"])
    monkeypatch.setattr("czregistry.registry.quicklist.quick_search", lambda *a, **k: None)
    full = CliRunner().invoke(main, args)
    full_json = CliRunner().invoke(main, [*args, "--json"])
    assert quick.exit_code == full.exit_code == 0, quick.output + full.output
    assert quick.output == full.output
    assert "[yanked]" in quick.output and "[invalid]" in quick.output
    assert json.loads(quick_json.output) == json.loads(full_json.output)


def test_czreg_list_loads_no_sqlalchemy_plugins_onnx_or_numpy(populated: Path) -> None:
    code = ("import sys, runpy\n"
            "sys.argv = ['czreg', 'list', '--registry', sys.argv[1]]\n"
            "try:\n"
            "    runpy.run_module('czregistry', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "               ('sqlalchemy', 'pluggy', 'numpy', 'alembic', 'onnx', 'onnxruntime', 'tensorflow'))\n"
            "print('HEAVY', heavy)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code, str(populated)], capture_output=True, text=True, env=env,
                       check=False, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "nuclei-seg" in p.stdout
    assert "HEAVY []" in p.stdout, p.stdout


def test_lazy_command_table_matches_what_the_modules_register() -> None:
    """``czreg`` imports a command's module only when the command runs; the table that says which module
    defines which command must list exactly what each module's ``register`` adds."""
    import importlib

    import click

    from czregistry.cli import COMMAND_MODULES

    found: dict[str, str] = {}
    for module in sorted(set(COMMAND_MODULES.values())):
        group = click.Group()
        importlib.import_module(f"czregistry.cli.{module}").register(group)
        found.update(dict.fromkeys(group.commands, module))
    assert found == COMMAND_MODULES


def test_a_registry_command_imports_only_the_registry_command_modules(populated: Path) -> None:
    code = ("import sys; from czregistry.cli import main\n"
            "try:\n    main(['list'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('czregistry.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CZREG_REGISTRY": str(populated)})
    loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert "registry" in loaded and not {"pack", "run", "evaluate", "serve", "demo", "validate"} & set(loaded)


def test_an_unknown_command_is_one_line_after_every_builtin_and_plugin_was_asked() -> None:
    """With command modules loaded lazily, a name nobody defines still gets click's one-line answer (exit 2),
    and only after the built-ins and the plugins were all consulted."""
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "Error: No such command 'frobnicate'."
    assert {"list", "pack", "run", "evaluate", "serve"} <= set(main.commands)
