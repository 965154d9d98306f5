"""The package's shape, kept by tests: no import circles in ``czregistry/``, no module reaching into a plugin
package by name, and the CLI holding no library logic.

The import graph counts every ``import`` of a ``czregistry`` module, at module level or inside a function (a
lazy import is still a dependency), except those under ``if TYPE_CHECKING:``. Importing ``a.b.c`` is an edge
to ``a.b.c``, not to its parents, as import-linter counts it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "czregistry"
PLUGIN_PACKAGES = sorted(p.name for p in (ROOT / "plugins").glob("*/czregistry_*") if p.is_dir())


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def _imports(name: str, path: Path, modules: dict[str, Path], *, type_only: bool = False) -> set[str]:
    """The ``czregistry`` modules ``name`` imports; with ``type_only`` also those under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_only else _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_in_czregistry() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150, "the graph was not read"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a planted circle is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_plugin_package_by_name() -> None:
    """Built-ins come in through hooks: no ``import czregistry_tensorflow`` (nor an ``importlib`` string naming
    it) anywhere in the core."""
    assert len(PLUGIN_PACKAGES) >= 3, PLUGIN_PACKAGES
    pattern = re.compile(r"\b(" + "|".join(PLUGIN_PACKAGES) + r")\b")
    offenders = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if pattern.search(node.value) and "." in node.value and " " not in node.value \
                    else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names  # type: ignore[attr-defined]
                          if pattern.search(n)]
    assert offenders == []


def test_the_wings_are_subpackages() -> None:
    for wing, members in {"pack": ("core", "sources", "sessions", "tile", "metadata", "unpack"),
                          "onnx": ("graph", "session", "source"), "sharing": ("signing", "oci", "_smallfile"),
                          "run": ("runner", "plan", "readers", "adapt", "pipeline", "assemble", "writers", "omezarr",
                                  "source", "tiling", "czi", "smoke", "dask_run", "blocks", "resume",
                                  "cluster", "worker")}.items():
        for member in members:
            assert (PKG / wing / f"{member}.py").is_file(), f"czregistry/{wing}/{member}.py"
    assert not list(PKG.glob("_pack_*.py")), "packing modules belong in czregistry/pack/"


def test_the_compatibility_shims_are_gone() -> None:
    """The five alias modules of the move to subpackages were removed (issue 24): one name per module."""
    import importlib

    for old in ("czregistry.runner", "czregistry.smoke", "czregistry.dask_run", "czregistry.packing",
                "czregistry.checks.probing"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    import czregistry

    assert callable(czregistry.pack)


def test_cli_modules_hold_no_library_logic() -> None:
    """A CLI module defines commands, their option helpers and ``register``; functions that a library user would
    call (they take no click context and return data) live in the library. Caught here: module-level functions
    of ``cli/`` that nothing in ``cli/`` decorates as a command and whose names say library (unpack_, inspect_,
    load_, read_, write_, compute_, measure_)."""
    library_words = re.compile(r"^(unpack|inspect|load|read|write|compute|measure|evaluate|pack)_")
    offenders = []
    for path in (PKG / "cli").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.decorator_list and library_words.match(node.name):
                offenders.append(f"{path.name}:{node.name}")
    assert offenders == []


def test_no_import_circles_even_for_type_checking() -> None:
    """Types two modules both need live in a leaf module (``registry/records.py``, ``evaluate/result.py``), so
    there is no circle even counting the imports under ``if TYPE_CHECKING:`` (issue 24)."""
    modules = _modules()
    graph = {name: _imports(name, path, modules, type_only=True) for name, path in modules.items()}
    assert _cycles(graph) == []


def _documented_tree() -> list[tuple[str, str]]:
    """``(path, description)`` for every line of the ``czregistry/`` tree in ``docs/architecture.md``: two
    spaces of indent per level, a folder ends in ``/`` and stands for its ``__init__.py``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"^```\n(czregistry/.*?)^```$", text, re.S | re.M)
    assert block is not None, "docs/architecture.md has no ```czregistry/ tree block"
    rows: list[tuple[str, str]] = []
    folders: list[str] = []
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name, _, description = line.strip().partition(" ")
        folders = folders[:depth]
        path = "/".join([*folders, name.rstrip("/")])
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            path += "/__init__.py"
        rows.append((path, description.strip()))
    return rows


def test_the_architecture_tree_is_the_real_tree() -> None:
    """``docs/architecture.md`` shows ``czregistry/`` one line per module, and only modules that exist, so the
    picture cannot drift from the code (issue 24). A folder without ``__init__.py`` (migration versions) is
    listed for its modules only."""
    rows = _documented_tree()
    paths = [p for p, _ in rows]
    real = {str(f.relative_to(ROOT).as_posix()) for f in PKG.rglob("*.py")}
    folders_without_init = {p for p in paths if p.endswith("/__init__.py") and p not in real
                            and (ROOT / p).parent.is_dir()}
    listed = set(paths) - folders_without_init
    assert sorted(p for p in paths if paths.count(p) > 1) == [], "listed twice"
    assert sorted(real - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - real) == [], "listed in docs/architecture.md but not in czregistry/"
    assert [p for p, d in rows if not d] == [], "every line says what the module is for"


def test_the_tree_reader_reads_nesting() -> None:
    """The check above can fail: nesting is read from the indent, and a folder stands for its ``__init__.py``."""
    rows = _documented_tree()
    assert ("czregistry/__init__.py" in dict(rows)) and ("czregistry/onnx/graph.py" in dict(rows))
    assert "czregistry/registry/migrations/versions/r0001_initial.py" in dict(rows)
