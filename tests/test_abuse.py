"""Abuse cases, as a careless or hostile user would try them (issue 12): every answer is one clear line with
its exit code, no traceback, nothing lost and nothing left behind.

``COMMANDS`` is the table every command joins: a command that writes a file gets the *existing output*,
*read-only output* and *interrupt* cases by construction, and every command that reads a file gets the
*missing input* case. A new command adds one row. The read-only cases run the real CLI on a real read-only
file system (a tmpfs mounted read-only in a user namespace, ``unshare -rm``); interrupts and the registry
lock use real processes and real signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from czregistry.cli import main
from tests.sandbox import tmpfs_namespace
from tests.test_registry import make_package

ROOT = Path(__file__).resolve().parents[1]


# --- the shared world: a real package, image, registry and key ------------------------------------------


@dataclass
class World:
    pkg: Path  # a valid, runnable .czann (ONNX)
    static_pkg: Path  # a small package that passes static validation (registry cases)
    onnx: Path  # a plain ONNX model (pack's input)
    image: Path  # a PNG
    big_image: Path  # a .npy large enough that `run` takes seconds (interrupts)
    registry: str  # a SQLite registry holding abuse-seg 1.0.0 (= static_pkg)
    key: Path  # a signing key (PEM)
    home: Path  # CZREG_HOME for subprocesses
    eval_images: Path  # a folder with one image ...
    eval_labels: Path  # ... and its label (evaluate, compare)


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, model_cache: Callable[..., Path]) -> World:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("abuse")
    pkg = root / "seg.czann"
    shutil.copy(model_cache("unet"), pkg)
    assert cli("unpack", str(pkg), str(root / "unpacked")).exit_code == 0
    onnx = root / "model.onnx"
    shutil.copy(root / "unpacked" / "model.model", onnx)  # a CZANN stores its ONNX model as model.model
    image = root / "cells.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(image)
    big = root / "big.npy"
    np.save(big, np.random.default_rng(1).random((2048, 2048), dtype=np.float32))
    (root / "reg").mkdir()
    registry = str(root / "reg")
    static_pkg = make_package(root)
    r = cli("publish", str(static_pkg), "--name", "abuse-seg", "--version", "1.0.0", "--static",
            "--registry", registry)
    assert r.exit_code == 0, r.output
    assert cli("keygen", "-o", str(root / "key")).exit_code == 0
    home = root / "home"
    home.mkdir()
    (root / "eval" / "images").mkdir(parents=True)
    (root / "eval" / "labels").mkdir()
    shutil.copy(image, root / "eval" / "images" / "cells.png")
    label = (np.random.default_rng(2).random((96, 96)) > 0.5).astype(np.uint8)
    Image.fromarray(label).save(root / "eval" / "labels" / "cells.png")
    return World(pkg, static_pkg, onnx, image, big, registry, root / "key.pem", home, root / "eval" / "images",
                 root / "eval" / "labels")


# --- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One row: how to call the command writing into folder ``out`` (``missing``: with a missing input),
    and which path it writes (``None``: it writes nothing)."""

    name: str
    argv: Callable[[World, Path, bool], list[str]]
    output: Callable[[Path], Path] | None = None
    refuses_existing: bool = True  # an existing output needs --force (or a new name)
    occupy: Callable[[Path], Path] | None = None  # a file that makes the output "existing" (default: output)
    slow_write: bool = False  # writes long enough that SIGTERM lands mid-write
    reads_input: bool = True  # has an input that can be missing


def _missing(w: World, missing: bool, path: Path) -> str:
    return str(w.home / "does-not-exist.czann") if missing else str(path)


COMMANDS: list[Command] = [
    Command("validate --report", lambda w, o, m: ["validate", "--static", _missing(w, m, w.pkg), "--report",
                                                  str(o / "r.html")], lambda o: o / "r.html"),
    Command("pack", lambda w, o, m: ["pack", _missing(w, m, w.onnx).replace(".czann", ".onnx"), "-o",
                                     str(o / "p.czann"), "--type", "SingleClassSemanticSegmentation",
                                     "--classes", "background,cells", "--tile", "64", "64"],
            lambda o: o / "p.czann"),
    Command("unpack", lambda w, o, m: ["unpack", _missing(w, m, w.pkg), str(o / "u")], lambda o: o / "u",
            occupy=lambda o: o / "u" / "mine.txt"),
    Command("run", lambda w, o, m: ["run", _missing(w, m, w.pkg), str(w.image), "-o",
                                    str(o / "mask.ome.tiff"), "-q"], lambda o: o / "mask.ome.tiff"),
    Command("run (interrupted mid-write)", lambda w, o, m: ["run", _missing(w, m, w.pkg), str(w.big_image), "-o",
                                                            str(o / "big.ome.tiff"), "-q", "--no-probe"],
            lambda o: o / "big.ome.tiff", slow_write=True),
    Command("pull", lambda w, o, m: ["pull", "abuse-seg==1.0.0" if not m else "no-such-model", "-o",
                                     str(o / "p.czann"), "--registry", w.registry], lambda o: o / "p.czann"),
    Command("keygen", lambda w, o, m: ["keygen", "-o", str(o / "k")], lambda o: o / "k.pem", reads_input=False),
    Command("smoke", lambda w, o, m: ["smoke", _missing(w, m, w.pkg)]),
    Command("publish", lambda w, o, m: ["publish", _missing(w, m, w.static_pkg), "--bump", "patch", "--static",
                                        "--name", "abuse-other", "--registry", w.registry]),
    Command("inspect", lambda w, o, m: ["inspect", _missing(w, m, w.pkg)]),
    Command("sign", lambda w, o, m: ["sign", _missing(w, m, w.pkg), "--key", str(w.key), "--static"]),
    Command("verify-signature", lambda w, o, m: ["verify-signature", _missing(w, m, w.pkg), "--key",
                                                 str(w.key.with_suffix(".pub"))]),
    Command("evaluate", lambda w, o, m: ["evaluate", _missing(w, m, w.pkg), "--images", str(w.home),
                                         "--labels", str(w.home)]),
    Command("evaluate --report", lambda w, o, m: ["evaluate", _missing(w, m, w.pkg), "--images", str(w.eval_images),
                                                  "--labels", str(w.eval_labels), "--report", str(o / "e.html"),
                                                  "-q", "--no-probe"], lambda o: o / "e.html"),
    Command("evaluate --overlays", lambda w, o, m: ["evaluate", _missing(w, m, w.pkg), "--images",
                                                    str(w.eval_images), "--labels", str(w.eval_labels), "--overlays",
                                                    str(o / "ov"), "-q", "--no-probe"], lambda o: o / "ov",
            occupy=lambda o: o / "ov" / "mine.png"),
    Command("compare", lambda w, o, m: ["compare", _missing(w, m, w.pkg), str(w.pkg), "--images",
                                        str(w.eval_images), "--labels", str(w.eval_labels), "--no-probe"]),
    # the demo regenerates its own files in its workdir on purpose (a second `czreg demo` works); a user's
    # other files there are kept (test_demo_rerun_keeps_other_files)
    Command("demo", lambda w, o, m: ["demo", "--workdir", str(o / "d"), "--size", "64", "--registry", w.registry],
            lambda o: o / "d", refuses_existing=False, reads_input=False),
    Command("push (oci)", lambda w, o, m: ["push", _missing(w, m, w.pkg), "oci://127.0.0.1:9/lab/x:1",
                                           "--plain-http"]),
    # a registry named by --registry must exist: a typo never starts a server on, or adds a token to, a new
    # empty registry
    Command("serve", lambda w, o, m: ["serve", "--registry", str(w.home / "no-registry") if m else w.registry,
                                      "--port", "0"]),
    Command("token create", lambda w, o, m: ["token", "create", "abuse", "--scope", "read", "--registry",
                                             str(w.home / "no-registry") if m else w.registry]),
]
WRITERS = [c for c in COMMANDS if c.output is not None]


def _ids(cmd: Command) -> str:
    return cmd.name


def _assert_one_line(text: str) -> None:
    """``Error: ...`` (and at most a ``Hint: ...``), never a traceback."""
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.reads_input and not c.slow_write], ids=_ids)
def test_missing_input_is_one_line_exit_2(cmd: Command, world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = cli(*cmd.argv(world, out, True))
    assert r.exit_code in (2, 7), r.output  # 7: a registry reference that names nothing
    _assert_one_line(r.output)
    assert any(w in r.output for w in ("no such", "does not exist", "no model named")), r.output
    assert _files(out) == []


@pytest.mark.parametrize("cmd", [c for c in WRITERS if c.refuses_existing and not c.slow_write], ids=_ids)
def test_existing_output_is_refused_without_force(cmd: Command, world: World, tmp_path: Path) -> None:
    assert cmd.output is not None
    out = tmp_path / "out"
    target = (cmd.occupy or cmd.output)(out)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"precious")
    r = cli(*cmd.argv(world, out, False))
    assert r.exit_code == 2, r.output
    _assert_one_line(r.output)
    assert "already exists" in r.output or "not empty" in r.output
    assert target.read_bytes() == b"precious"
    assert _files(out) == [str(target.relative_to(out))] or cmd.occupy is not None  # a folder: it and the file
    assert not list(out.rglob("*.part"))


def _read_only_runner(ro: Path) -> list[str]:
    """A prefix that runs a command with ``ro`` a read-only tmpfs (real EROFS), or skips the test."""
    unshare = tmpfs_namespace(ro, "ro")
    return [unshare, "-rm", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(ro)]


def _env(world: World) -> dict[str, str]:
    return {**os.environ, "CZREG_HOME": str(world.home),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("cmd", [c for c in WRITERS if not c.slow_write], ids=_ids)
def test_read_only_output_is_one_line_exit_2(cmd: Command, world: World, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only_runner(ro)
    p = subprocess.run([*prefix, sys.executable, "-m", "czregistry", *cmd.argv(world, ro, False)],
                       capture_output=True, text=True, env=_env(world), check=False, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    _assert_one_line(p.stderr)
    assert "read-only" in p.stderr.lower(), p.stderr
    assert _files(ro) == []  # the mount is gone; the folder beneath it is untouched


@pytest.mark.parametrize("cmd", WRITERS, ids=_ids)
def test_sigterm_leaves_nothing_behind(cmd: Command, world: World, tmp_path: Path) -> None:
    """SIGTERM (mid-write for slow writers, else a second in): never a ``.part`` file afterwards; a file
    under the output name is complete by construction (written to a temp file, then renamed)."""
    assert cmd.output is not None
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "czregistry", *cmd.argv(world, out, False)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(world))
    deadline = time.monotonic() + (240 if cmd.slow_write else 1.0)
    saw_part = False
    while proc.poll() is None and time.monotonic() < deadline:
        if cmd.slow_write and any(out.glob(".*.part")):
            saw_part = True
            time.sleep(0.3)  # well inside the write
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert not list(out.rglob("*.part")), _files(out)
    if cmd.slow_write:
        assert saw_part and proc.returncode == 143, err
        assert "Terminated." in err and "Traceback" not in err
        assert _files(out) == []
    elif proc.returncode == 0:
        assert cmd.output(out).exists()
    if cmd.name == "keygen":  # a key pair or nothing, whenever the signal landed
        assert (out / "k.pem").exists() == (out / "k.pub").exists(), _files(out)


def _dead_pid() -> str:
    """The pid of a process that has exited: what a run killed with SIGKILL leaves in its part file's name."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_stale_part_of_a_dead_run_is_swept(world: World, tmp_path: Path) -> None:
    out = tmp_path / "mask.ome.tiff"
    dead = _dead_pid()
    stale = tmp_path / f".mask.ome.tiff.{dead}-0badc0de.part"
    stale.write_bytes(b"half")
    foreign = tmp_path / ".mask.ome.tiff.notours.part"  # not our naming: kept
    foreign.write_bytes(b"x")
    r = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert out.is_file() and not stale.exists() and foreign.exists()
    r = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q", "--force")
    assert r.exit_code == 0, r.output


# --- images and models ----------------------------------------------------------------------------------


def test_image_over_the_pixel_limit_is_one_line(world: World, tmp_path: Path) -> None:
    r = cli("run", str(world.pkg), str(world.image), "-o", str(tmp_path / "m.ome.tiff"),
            env={"CZREG_MAX_IMAGE_PIXELS": "5000"})
    assert r.exit_code == 2, r.output
    _assert_one_line(r.output)
    assert "96 x 96 = 0 M pixels, over the 0 M pixel limit" in r.output and "CZREG_MAX_IMAGE_PIXELS" in r.output
    assert _files(tmp_path) == []


def test_pack_refuses_a_name_that_is_not_a_package(world: World, tmp_path: Path) -> None:
    r = cli("pack", str(world.onnx), "-o", str(tmp_path / "x.zip"))
    assert r.exit_code == 2 and "must end in .czann" in r.output and "x.czann" in r.output
    assert _files(tmp_path) == []


def test_probe_window_below_its_minimum_is_one_line(world: World, tmp_path: Path) -> None:
    r = cli("validate", str(world.pkg), "--max-probe-size", "4", "--report", str(tmp_path / "r.html"))
    assert r.exit_code == 2, r.output
    assert "--max-probe-size" in r.output and "Traceback" not in r.output
    assert _files(tmp_path) == []


def test_run_with_a_larger_batch_than_a_fixed_batch_graph_says_how_it_ran(world: World, tmp_path: Path) -> None:
    """Not an error: a fixed-batch-1 graph runs each batch as single-tile calls, and the run says so (the
    corpus test checks the output against whole-image inference); a batch fixed above 1 is refused there."""
    import onnx

    from czregistry.package import open_package, write_package

    src = open_package(world.pkg)
    model = onnx.load_model_from_string(src.read_model_bytes())
    for t in (*model.graph.input, *model.graph.output):
        t.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "b1.czann"
    write_package(fixed, src.metadata or {}, model.SerializeToString())
    out = tmp_path / "o.ome.tiff"
    r = cli("run", str(fixed), str(world.image), "-o", str(out), "--batch-size", "8")
    assert r.exit_code == 0, r.output
    assert "single-tile calls" in r.output and out.exists()


# --- registry ------------------------------------------------------------------------------------------


def test_pull_of_identical_bytes_is_not_an_overwrite(world: World, tmp_path: Path) -> None:
    target = tmp_path / "p.czann"
    for _ in range(2):
        r = cli("pull", "abuse-seg==1.0.0", "-o", str(target), "--registry", world.registry)
        assert r.exit_code == 0, r.output
    target.write_bytes(b"other")
    r = cli("pull", "abuse-seg==1.0.0", "-o", str(target), "--registry", world.registry)
    assert r.exit_code == 2 and "already exists" in r.output and target.read_bytes() == b"other"
    r = cli("pull", "abuse-seg==1.0.0", "-o", str(target), "--registry", world.registry, "--force")
    assert r.exit_code == 0 and target.read_bytes() == world.static_pkg.read_bytes()


@pytest.mark.parametrize("location", ["not a url at all", "sqlite:///missing-dir/x.db"])
def test_a_registry_location_that_does_not_exist_is_refused(location: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = cli("list", env={"CZREG_REGISTRY": location})
    assert r.exit_code == 7, r.output
    _assert_one_line(r.output)
    assert "no registry at" in r.output and "czreg init" in r.output
    assert _files(tmp_path) == []
    r = cli("init", location)
    assert r.exit_code == 0 and "Registry ready" in r.output
    assert cli("list", env={"CZREG_REGISTRY": location}).output.strip() == "No models found."


def test_the_default_registry_is_private(tmp_path: Path) -> None:
    home = Path(os.environ["CZREG_HOME"])
    r = cli("publish", str(make_package(tmp_path)), "--name", "private", "--version", "1.0.0", "--static")
    assert r.exit_code == 0, r.output
    reg = home / "registry"
    assert reg.stat().st_mode & 0o777 == 0o700
    assert (reg / "registry.db").stat().st_mode & 0o777 == 0o600
    blobs = [p for p in (reg / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(p.stat().st_mode & 0o777 == 0o600 for p in blobs)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (reg / "blobs").rglob("*") if p.is_dir())


@pytest.mark.parametrize(("name", "words"), [("", "the model name is empty"),
                                             ("m" * 101, "101 characters long; at most 100")])
def test_empty_and_overlong_names_are_refused(name: str, words: str, tmp_path: Path) -> None:
    r = cli("publish", str(make_package(tmp_path)), "--name", name, "--version", "1.0.0", "--static")
    assert r.exit_code == 2 and words in r.output, r.output
    assert cli("list", "--json").output.strip() == "[]"


def test_bump_with_identical_bytes_is_a_re_release_keeping_note_and_tag(tmp_path: Path) -> None:
    p = make_package(tmp_path)
    assert cli("publish", str(p), "--name", "nuclei-seg", "--version", "1.0.0", "--static").exit_code == 0
    r = cli("publish", str(p), "--name", "nuclei-seg", "--bump", "minor", "--note", "retrained? no: re-release",
            "--tag", "stage=qa", "--static", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert (data["status"], data["version"], data["note"], data["tags"]) == (
        "published", "1.1.0", "retrained? no: re-release", {"stage": "qa"})
    r = cli("publish", str(p), "--name", "nuclei-seg", "--version", "1.1.0", "--note", "x", "--static")
    assert r.exit_code == 0 and "Already published" in r.output and "--note/--tag not stored" in r.output


def test_digest_pulls_prefer_non_yanked_and_explain_short_prefixes(tmp_path: Path) -> None:
    p = make_package(tmp_path)
    for v in ("1.0.0", "1.1.0"):
        assert cli("publish", str(p), "--name", "m", "--version", v, "--static").exit_code == 0
    digest = json.loads(cli("show", "m==1.0.0", "--json").output)["digest"]
    assert cli("yank", "m", "1.1.0", "--reason", "bad").exit_code == 0
    r = cli("pull", digest[:15], "-o", str(tmp_path / "x.czann"), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["version"] == "1.0.0", r.output
    assert cli("yank", "m", "1.0.0", "--reason", "worse").exit_code == 0
    r = cli("pull", digest[:15], "-o", str(tmp_path / "y.czann"))
    assert r.exit_code == 0 and "Warning: m 1.1.0 is yanked: bad" in r.output, r.output
    r = cli("pull", "sha256:e", "-o", str(tmp_path / "z.czann"))
    assert r.exit_code == 2 and "give 8 to 64 hex digits" in r.output
    assert not (tmp_path / "z.czann").exists()


def test_allow_invalid_versions_are_marked_and_warned(tmp_path: Path) -> None:
    bad = make_package(tmp_path, MinOverlap=[15, 15])  # odd overlap: a static validation error
    r = cli("publish", str(bad), "--name", "shaky", "--version", "1.0.0", "--static", "--allow-invalid")
    assert r.exit_code == 0 and "INVALID" in r.output, r.output
    assert "[invalid]" in cli("list").output
    r = cli("pull", "shaky", "-o", str(tmp_path / "s.czann"))
    assert r.exit_code == 0 and "published with --allow-invalid" in r.output


def test_show_orders_by_pep440_and_counts_versions(tmp_path: Path) -> None:
    for v in ("1.0.0+local", "1"):
        assert cli("publish", str(make_package(tmp_path)), "--name", "o", "--version", v, "--static").exit_code == 0
    lines = [line.split()[0] for line in cli("show", "o").output.splitlines()[1:]]
    assert lines == ["1.0.0+local", "1"]
    assert "(2 versions)" in cli("list", "o").output
    assert cli("publish", str(make_package(tmp_path)), "--name", "single", "--version", "1.0.0",
               "--static").exit_code == 0
    assert cli("list", "single").output.rstrip().endswith("(1 version)")


@contextlib.contextmanager
def _holding_the_write_lock(db: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock on ``db`` for the duration of the block."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sqlite3, sys, time\n"
                               "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                               "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)",
                               str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_held_registry_lock_is_announced_and_bounded(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock: publish says so after a second and gives up at the bound
    (CZREG_LOCK_TIMEOUT) with exit 13; nothing is published."""
    reg = tmp_path / "reg"
    assert cli("init", str(reg)).exit_code == 0
    with _holding_the_write_lock(reg / "registry.db"):
        env = {**os.environ, "CZREG_LOCK_TIMEOUT": "3", "CZREG_REGISTRY": str(reg),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "czregistry", "publish", str(make_package(tmp_path)),
                            "--name", "locked", "--version", "1.0.0", "--static"],
                           capture_output=True, text=True, env=env, check=False, timeout=120)
        took = time.monotonic() - t0
    assert p.returncode == 13, p.stdout + p.stderr
    assert "waiting for the registry lock held by another process" in p.stderr
    assert "locked by another process; gave up after 3 s" in p.stderr and "Traceback" not in p.stderr
    assert took < 60
    with sqlite3.connect(reg / "registry.db") as conn:
        assert conn.execute("SELECT count(*) FROM versions").fetchone() == (0,)


# --- validate --json has one shape ---------------------------------------------------------------------


def test_validate_json_is_an_array_for_any_count(world: World) -> None:
    one = json.loads(cli("validate", "--static", "--json", str(world.static_pkg)).output)
    two = json.loads(cli("validate", "--static", "--json", str(world.static_pkg), str(world.static_pkg)).output)
    assert isinstance(one, list) and len(one) == 1 and len(two) == 2
    assert one[0]["report_version"] == two[0]["report_version"] == "1"


# --- commands with their own cases: demo, serve, token, OCI, a locked registry ---------------------------


def test_demo_rerun_keeps_other_files(world: World, tmp_path: Path) -> None:
    """A second `czreg demo` regenerates the demo's own files; anything else in its folder stays."""
    work = tmp_path / "d"
    work.mkdir()
    (work / "mine.txt").write_text("precious")
    for _ in range(2):
        r = cli("demo", "--workdir", str(work), "--size", "64", "--registry", world.registry, "--json")
        assert r.exit_code == 0, r.output
    assert (work / "mine.txt").read_text() == "precious"
    assert (work / "nuclei-labels.ome.tiff").is_file() and not list(work.rglob("*.part"))


def test_serve_stops_cleanly_on_sigterm(world: World, tmp_path: Path) -> None:
    import urllib.request

    from tests.oci_registry import free_port

    pytest.importorskip("uvicorn")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "czregistry", "serve", "--registry", world.registry, "--port",
                             str(port), "--public-read", "--upload-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(world))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/models", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # uvicorn shuts down gracefully, then ends by the signal it caught (the shell's 143)
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err and "Finished server process" in err
    assert list(tmp_path.iterdir()) == []  # no upload left behind


@pytest.mark.parametrize("argv", [
    ["token", "create", "locked-token", "--scope", "read"],
    ["tag", "abuse-seg==1.0.0", "stage=qa"],
    ["alias", "set", "abuse-seg", "production", "1.0.0"],
], ids=lambda a: " ".join(a[:2]))
def test_registry_writes_wait_for_a_held_lock_within_the_bound(argv: list[str], world: World,
                                                                 tmp_path: Path) -> None:
    """Every command that writes the registry (not only publish) says it waits and gives up at the bound
    (exit 13), changing nothing."""
    reg = tmp_path / "reg"
    shutil.copytree(world.registry, reg)
    before = (reg / "registry.db").read_bytes()
    with _holding_the_write_lock(reg / "registry.db"):
        env = {**_env(world), "CZREG_LOCK_TIMEOUT": "2", "CZREG_REGISTRY": str(reg)}
        p = subprocess.run([sys.executable, "-m", "czregistry", *argv], capture_output=True, text=True, env=env,
                           check=False, timeout=120)
    assert p.returncode == 13, p.stdout + p.stderr
    _assert_one_line(p.stderr)
    assert "waiting for the registry lock held by another process" in p.stderr
    assert "gave up after 2 s" in p.stderr
    with sqlite3.connect(reg / "registry.db") as conn:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tags").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM aliases").fetchone() == (0,)
    assert before  # the copy was a real registry


@pytest.fixture(scope="module")
def oci_host(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[str]:
    from tests.oci_registry import BINARY, run_registry

    if BINARY is None:
        pytest.skip("docker-registry is not installed (.ci/run installs it)")
    with run_registry(tmp_path_factory.mktemp("abuse-oci")) as host:
        r = cli("push", str(world.static_pkg), f"oci://{host}/abuse/seg:1", "--plain-http", "--static")
        assert r.exit_code == 0, r.output
        yield host


def test_pull_oci_refuses_existing_output_and_reports_a_missing_tag(oci_host: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = cli("pull", f"oci://{oci_host}/abuse/seg:no-such-tag", "-o", str(out), "--plain-http")
    assert r.exit_code == 12, r.output
    _assert_one_line(r.output)
    assert _files(out) == []
    r = cli("pull", f"oci://{oci_host}/abuse/seg:1", "-o", str(out), "--plain-http", "--json")
    assert r.exit_code == 0, r.output
    pulled = Path(json.loads(r.output)["path"])
    pulled.write_bytes(b"precious")
    r = cli("pull", f"oci://{oci_host}/abuse/seg:1", "-o", str(out), "--plain-http")
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output, r.output
    assert pulled.read_bytes() == b"precious"
    r = cli("pull", f"oci://{oci_host}/abuse/seg:1", "-o", str(out), "--plain-http", "--force")
    assert r.exit_code == 0, r.output
    assert pulled.read_bytes() != b"precious" and not list(out.rglob("*.part"))


def test_pull_oci_into_a_read_only_folder_is_one_line(oci_host: str, world: World, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only_runner(ro)
    p = subprocess.run([*prefix, sys.executable, "-m", "czregistry", "pull", f"oci://{oci_host}/abuse/seg:1",
                        "-o", str(ro), "--plain-http"], capture_output=True, text=True, env=_env(world),
                       check=False, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    _assert_one_line(p.stderr)
    assert "read-only" in p.stderr.lower()
    assert _files(ro) == []


@pytest.mark.parametrize("dtype", ["uint8", "float32"])  # uint8: ISA-L inflates; float32: tifffile decodes
def test_run_on_a_tiff_with_a_damaged_tile_is_one_line(dtype: str, world: World, tmp_path: Path) -> None:
    """A deflated tile whose bytes were overwritten (a bad copy): found mid-run, in the reader's pool,
    answered like damage found on opening (exit 2, one line and a hint), and no output is left."""
    import numpy as np
    import tifffile

    bad = tmp_path / "bad.tif"
    img = (np.random.default_rng(5).random((300, 330)) * 200).astype(dtype)
    tifffile.imwrite(bad, img, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset, count = tif.pages[0].dataoffsets[12], tif.pages[0].databytecounts[12]
    data = bytearray(bad.read_bytes())
    data[offset + 2:offset + count] = bytes(count - 2)
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    r = cli("run", str(world.pkg), str(bad), "-o", str(out / "m.ome.tiff"))
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[1].startswith("Hint:"), r.output
    assert "cannot read TIFF bad.tif: the file is damaged" in lines[0] and "tile/strip 12 of page 0" in lines[0]
    assert "Traceback" not in r.output
    assert list(out.iterdir()) == []


# --- issue 22: foreign keys, bundles, OCI sizes, derived names, reports --------------------------------


@dataclass
class Signed:
    pkg: Path  # a static package, signed (PKG.sig / PKG.att beside it)
    pub: Path
    key: Path
    registry: str  # holds signed-seg 1.0.0 (the package, signed)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    root = tmp_path_factory.mktemp("issue22")
    pkg = make_package(root)
    assert cli("keygen", "-o", str(root / "k")).exit_code == 0
    r = cli("sign", str(pkg), "--key", str(root / "k.pem"), "--static")
    assert r.exit_code == 0, r.output
    (root / "reg").mkdir()
    r = cli("publish", str(pkg), "--name", "signed-seg", "--version", "1.0.0", "--static", "--sign",
            str(root / "k.pem"), "--registry", str(root / "reg"))
    assert r.exit_code == 0, r.output
    return Signed(pkg, root / "k.pub", root / "k.pem", str(root / "reg"))


def _hostile_file(kind: str, folder: Path, limit: int) -> tuple[Path, str]:
    """A path that is no key or bundle, and how the refusal describes it."""
    if kind == "urandom":
        return Path("/dev/urandom"), "is a character device, not a regular file"
    path = folder / f"hostile-{kind}"
    if kind == "fifo":  # opening a FIFO for reading blocks until a writer comes: it must never be opened
        os.mkfifo(path)
        return path, "is a named pipe (FIFO), not a regular file"
    if kind == "folder":
        path.mkdir()
        return path, "is a folder, not a regular file"
    with path.open("wb") as fh:  # sparse: one byte over the limit costs no disk
        fh.truncate(limit + 1)
    return path, f"is {limit + 1} bytes, too large to be one"


KEY_COMMANDS = {
    "verify-signature --key": ("public", lambda s, k, o: ["verify-signature", str(s.pkg), "--key", str(k)]),
    "sign --key": ("private", lambda s, k, o: ["sign", str(s.pkg), "--key", str(k), "--static", "--force"]),
    "pull --key": ("public", lambda s, k, o: ["pull", "signed-seg==1.0.0", "-o", str(o), "--key", str(k),
                                              "--registry", s.registry]),
    "publish --sign": ("private", lambda s, k, o: ["publish", str(s.pkg), "--name", "other", "--version", "2",
                                                   "--static", "--sign", str(k), "--registry", s.registry]),
}


@pytest.mark.parametrize("kind", ["urandom", "fifo", "folder", "over-64-KiB"])
@pytest.mark.parametrize("command", list(KEY_COMMANDS))
def test_key_files_are_refused_unread_unless_small_regular_files(command: str, kind: str, signed: Signed,
                                                                 tmp_path: Path) -> None:
    """``--key /dev/urandom`` read 21 GB before the kernel killed it; a FIFO blocked forever. A key is a
    few KB: anything but a regular file of at most 64 KiB is a usage error (exit 2, like every other
    problem with the key path), named with the limit, and nothing is written."""
    from czregistry.sharing.signing import MAX_KEY_BYTES

    what, argv = KEY_COMMANDS[command]
    key, why = _hostile_file(kind, tmp_path, MAX_KEY_BYTES)
    out = tmp_path / "out"
    out.mkdir()
    before = signed.pkg.with_name(signed.pkg.name + ".sig").read_bytes()
    r = cli(*argv(signed, key, out))
    assert r.exit_code == 2, r.output
    _assert_one_line(r.output)
    assert r.output.splitlines() == [
        f"Error: {what} key file {key} {why}; not read (a PEM key is a few KB; the limit is 64 KiB)"
        if kind != "over-64-KiB" else
        f"Error: {what} key file {key} {why} (a PEM key is a few KB; the limit is 64 KiB); not read",
        f"Hint: give the {what} key's PEM file (czreg keygen makes a key pair)"]
    assert _files(out) == []
    assert signed.pkg.with_name(signed.pkg.name + ".sig").read_bytes() == before
    assert "other" not in cli("list", "--registry", signed.registry).output


@pytest.mark.parametrize("kind", ["fifo", "urandom", "over-4-MiB"])
@pytest.mark.parametrize("which", ["beside", "--signature", "--attestation"])
def test_signature_bundles_are_read_bounded(which: str, kind: str, signed: Signed, tmp_path: Path) -> None:
    """A ``.sig``/``.att`` comes with the package: one that is not a regular file of at most 4 MiB is a bad
    signature (exit 10), refused before it is read."""
    from czregistry.sharing.signing import MAX_BUNDLE_BYTES

    pkg = tmp_path / "p.czann"
    shutil.copy(signed.pkg, pkg)
    for suffix in (".sig", ".att"):
        shutil.copy(signed.pkg.with_name(signed.pkg.name + suffix), pkg.with_name(pkg.name + suffix))
    bad, why = _hostile_file(kind, tmp_path, MAX_BUNDLE_BYTES)
    argv = ["verify-signature", str(pkg), "--key", str(signed.pub)]
    what = "attestation" if which == "--attestation" else "signature"
    if which == "beside":
        target = pkg.with_name(pkg.name + ".sig")
        target.unlink()
        target.symlink_to(bad)
        shown = target
    else:
        argv += [which, str(bad)]
        shown = bad
    r = cli(*argv)
    assert r.exit_code == 10, r.output
    _assert_one_line(r.output)
    bound = f"a {what} bundle is a few KB; the limit is 4 MiB"
    assert r.output.splitlines() == [
        f"Error: {what} file {shown} {why}; not read ({bound})" if kind != "over-4-MiB"
        else f"Error: {what} file {shown} {why} ({bound}); not read",
        "Hint: do not use it; get the package and its .sig/.att again from the publisher"]


@dataclass
class LyingRegistry:
    host: str
    manifest: dict[str, object]  # the honest package manifest pushed as abuse22/seg:1
    size: int  # the package's real size


@pytest.fixture(scope="module")
def lying_registry(tmp_path_factory: pytest.TempPathFactory, signed: Signed) -> Iterator[LyingRegistry]:
    """The real CNCF registry. It stores a manifest whose layer size lies (it checks only that the blob
    exists), so the hostile manifests below are served by the real thing, not a stand-in."""
    import urllib.request

    from czregistry.sharing import oci
    from tests.oci_registry import BINARY, run_registry

    if BINARY is None:
        pytest.skip("docker-registry is not installed (.ci/run installs it)")
    with run_registry(tmp_path_factory.mktemp("issue22-oci")) as host:
        r = cli("push", str(signed.pkg), f"oci://{host}/abuse22/seg:1", "--plain-http")
        assert r.exit_code == 0, r.output
        req = urllib.request.Request(f"http://{host}/v2/abuse22/seg/manifests/1",
                                     headers={"Accept": oci.MANIFEST_MEDIA_TYPE})
        manifest = json.loads(urllib.request.urlopen(req).read())
        yield LyingRegistry(host, manifest, signed.pkg.stat().st_size)


def _put_manifest(host: str, repo: str, reference: str, manifest: dict[str, object], media_type: str) -> str:
    import urllib.request

    from czregistry.sharing import oci

    body = oci.canonical_json(manifest)
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{reference}", data=body, method="PUT",
                                 headers={"Content-Type": media_type})
    assert urllib.request.urlopen(req).status == 201
    return "sha256:" + __import__("hashlib").sha256(body).hexdigest()


# (a size of "12" or 1.5 is refused by the real registry itself, so it never reaches a client from it)
@pytest.mark.parametrize("declared", ["more", "fewer", 10**18, -5])
def test_oci_pull_holds_the_registry_to_the_declared_layer_size(declared: object, lying_registry: LyingRegistry,
                                                                tmp_path: Path) -> None:
    """The layer's declared size is checked before the download (an int from 0 to 8 GiB) and enforced
    during it: the transfer stops as soon as more bytes arrive than declared. Exit 12, nothing left."""
    from czregistry.sharing import oci

    real = lying_registry.size
    size = {"more": 20, "fewer": real + 1000}.get(declared, declared)  # type: ignore[call-overload]
    manifest = json.loads(json.dumps(lying_registry.manifest))
    manifest["layers"][0]["size"] = size
    tag = f"lie-{abs(hash(repr(declared)))}"
    _put_manifest(lying_registry.host, "abuse22/seg", tag, manifest, oci.MANIFEST_MEDIA_TYPE)
    out = tmp_path / "out"
    out.mkdir()
    ref = f"oci://{lying_registry.host}/abuse22/seg:{tag}"
    r = cli("pull", ref, "-o", str(out), "--plain-http")
    assert r.exit_code == 12, r.output
    _assert_one_line(r.output)
    lines = r.output.splitlines()
    if declared == "more":
        assert lines == [f"Error: the package from {ref} is larger than the 20 bytes its manifest declares; "
                         f"stopped after {real} bytes, nothing written",
                         "Hint: the registry sent more than it should; do not trust it"]
    elif declared == "fewer":
        assert lines == [f"Error: the package from {ref} is shorter ({real} bytes) than the {real + 1000} bytes "
                         "its manifest declares; nothing written",
                         "Hint: the transfer was cut off (retry), or the manifest lies"]
    else:
        assert lines == [f"Error: the package layer of {ref} declares a size of {declared!r}; it must be a whole "
                         "number of bytes from 0 to 8 GiB; nothing downloaded",
                         "Hint: the manifest is broken or hostile; do not use it"]
    assert _files(out) == []


def test_oci_pull_holds_attachments_to_their_declared_size(lying_registry: LyingRegistry, signed: Signed,
                                                           tmp_path: Path) -> None:
    """A referrer (here the signature bundle) whose layer declares fewer bytes than the registry sends:
    reading stops there, exit 12, and neither the package nor its .sig/.att are left."""
    from czregistry.sharing import oci

    host = lying_registry.host
    r = cli("push", str(signed.pkg), f"oci://{host}/abuse22/att:1", "--plain-http", "--json")
    assert r.exit_code == 0, r.output
    pushed = json.loads(r.output)
    subject = {"mediaType": oci.MANIFEST_MEDIA_TYPE, "digest": pushed["digest"],
               "size": len(oci.canonical_json(lying_registry.manifest))}
    sig = signed.pkg.with_name(signed.pkg.name + ".sig").read_bytes()
    att = oci.attachments(signed.pkg.name, report=None, signature=sig, attestation=None)[0]
    lying = json.loads(att.manifest(subject))
    lying["layers"][0]["size"] = 10
    digest = _put_manifest(host, "abuse22/att", "lying-sig", lying, oci.MANIFEST_MEDIA_TYPE)
    index = {"schemaVersion": 2, "mediaType": oci.INDEX_MEDIA_TYPE, "manifests": [
        {"mediaType": oci.MANIFEST_MEDIA_TYPE, "digest": digest, "size": len(oci.canonical_json(lying)),
         "artifactType": oci.BUNDLE_MEDIA_TYPE, "annotations": lying["annotations"]}]}
    _put_manifest(host, "abuse22/att", oci.fallback_tag(pushed["digest"]), index, oci.INDEX_MEDIA_TYPE)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("pull", f"oci://{host}/abuse22/att:1", "-o", str(out), "--plain-http")
    assert r.exit_code == 12, r.output
    _assert_one_line(r.output)
    blob = lying["layers"][0]["digest"]
    assert r.output.splitlines() == [
        f"Error: attachment {blob[:19]}... from {host} is larger than the 10 bytes its descriptor declares; "
        f"refused after reading {len(sig)} bytes", "Hint: the registry sent more than it should; do not trust it"]
    assert _files(out) == []


def test_oci_manifest_bodies_are_read_bounded(tmp_path: Path) -> None:
    """A manifest larger than 4 MiB is refused after reading a little over 4 MiB, not read whole. The real
    registry refuses to *store* manifests over 4 MiB, so a tiny loopback server plays the hostile registry:
    it answers the API check and then offers a 1 GiB manifest."""
    import http.server
    import threading

    sent = [0]

    class Hostile(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # http.server calls it by this name
            if self.path == "/v2/":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            chunk = b" " * (1 << 16)
            with contextlib.suppress(OSError):
                while sent[0] < 1 << 30:
                    self.wfile.write(chunk)
                    sent[0] += len(chunk)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "out"
        out.mkdir()
        r = cli("pull", f"oci://{host}/evil/pkg:1", "-o", str(out), "--plain-http")
    finally:
        server.shutdown()
        server.server_close()
    assert r.exit_code == 12, r.output
    _assert_one_line(r.output)
    first = r.output.splitlines()[0]
    assert first.startswith(f"Error: manifest 1 from {host} is larger than 4 MiB; refused after reading "), first
    assert int(first.rsplit(" ", 2)[-2]) <= (4 << 20) + (1 << 16)
    assert sent[0] < 64 << 20  # what the socket buffers took, far from the 1 GiB offered
    assert _files(out) == []


HOSTILE_NAMES = {
    "rtl-override": ("evil\u202egnp.exe", "'evil\\u202egnp.exe'", "--name, e.g. --name evil-gnp.exe"),
    "nul": ("nuc\x00lei", "'nuc\\x00lei'", "--name, e.g. --name nuc-lei"),
    "script": ("<script>alert(1)</script>", "'<script>alert(1)</script>'",
               "--name, e.g. --name script-alert-1-script"),
    "only-punctuation": ("<<<>>>", "'<<<>>>'", "--name NAME (letters, digits, '.', '_' and '-')"),
    "dots": ("..", "'..'", "--name NAME (letters, digits, '.', '_' and '-')"),
}
_RULE = "a name has letters, digits, '.', '_', '-' and spaces, and starts and ends with a letter or digit"


@pytest.mark.parametrize("case", list(HOSTILE_NAMES))
def test_a_model_name_from_the_package_passes_the_name_rules(case: str, tmp_path: Path) -> None:
    """Without --name the package's ModelName became the registry name, past the rules --name enforces
    (and ``<<<>>>`` and ``..`` both became ``model``). Now it meets the same rules (a space may stand for
    '-'), or publishing is refused in one line that suggests a --name; the registry is unchanged."""
    model_name, shown, hint = HOSTILE_NAMES[case]
    reg = tmp_path / "reg"
    reg.mkdir()
    pkg = make_package(tmp_path, model_name=model_name)
    r = cli("publish", str(pkg), "--version", "1.0.0", "--static", "--registry", str(reg))
    assert r.exit_code == 2, r.output
    assert r.output.splitlines() == [
        f"Error: the package's ModelName {shown} is not a valid registry name ({_RULE}); not published",
        f"Hint: pass {hint}"]
    assert json.loads(cli("list", "--registry", str(reg), "--json").output) == []
    ok = cli("publish", str(pkg), "--name", "fine-name", "--version", "1.0.0", "--static", "--registry", str(reg))
    assert ok.exit_code == 0, ok.output


def test_the_server_applies_the_name_rules_to_a_model_name_from_the_package(tmp_path: Path) -> None:
    """The server's upload path derives the name the same way (and checks a token's model pattern with it):
    the same refusal comes back to the client, nothing is stored."""
    from tests.test_serve import _start

    gen = _start(tmp_path / "srv", "sqlite")
    srv = next(gen)
    try:
        pkg = make_package(tmp_path, model_name="evil\u202egnp.exe")
        env = {"CZREG_REGISTRY": srv.url, "CZREG_TOKEN": srv.tokens["publisher"]}
        r = cli("publish", str(pkg), "--version", "1.0.0", "--static", env=env)
        assert r.exit_code == 2, r.output
        assert r.output.splitlines()[0] == (f"Error: the package's ModelName 'evil\\u202egnp.exe' is not a valid "
                                            f"registry name ({_RULE}); not published")
        assert "evil" not in cli("list", env=env).output
    finally:
        gen.close()


#: Metadata text that tries HTML, Markdown table syntax, code spans, a newline, ANSI (clear screen), an OSC
#: window title ended by BEL, and a right-to-left override.
PAYLOAD = "<img src=x onerror=alert(1)>|`x`\n# h\x1b[2J\x1b]0;pwn\x07\u202eevil"
PAYLOAD_SHOWN = "<img src=x onerror=alert(1)>|`x`\\n# h\\x1b[2J\\x1b]0;pwn\\x07\\u202eevil"


@pytest.fixture(scope="module")
def hostile_metadata_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A statically valid package whose model.json has a field named by the payload: the validator quotes
    the name in its finding (``metadata.unknown_field``) and in the finding's location."""
    from czregistry.package import write_package
    from tests.static_packages import ONNX_BYTES, czann_meta

    path = tmp_path_factory.mktemp("hostile-meta") / "hostile.czann"
    write_package(path, czann_meta(**{PAYLOAD: 1}), ONNX_BYTES)
    return path


def _no_raw_payload(text: str) -> None:
    for raw in ("\x1b", "\x07", "\u202e", "<img src=x"):
        assert raw not in text, (raw, text)


def test_the_terminal_report_neutralises_control_characters(hostile_metadata_pkg: Path) -> None:
    r = cli("validate", str(hostile_metadata_pkg), "--static")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\u202e" not in r.output
    assert f"  WARNING metadata.unknown_field: unknown field '{PAYLOAD_SHOWN}' is not part of CZANN 2.1.0; " \
           f"hosts ignore it (model.json#/{PAYLOAD_SHOWN})" in r.output.splitlines()


def test_the_markdown_report_escapes_package_text(hostile_metadata_pkg: Path, tmp_path: Path) -> None:
    """Rendered by a real CommonMark + GFM-tables renderer: no HTML tag, no extra cell, the payload shown
    as the literal text it is."""
    markdown_it = pytest.importorskip("markdown_it")
    out = tmp_path / "r.md"
    r = cli("validate", str(hostile_metadata_pkg), "--static", "--report", str(out))
    assert r.exit_code == 0, r.output
    text = out.read_text()
    _no_raw_payload(text)
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    assert "<img" not in page and "<h1>" in page and page.count("<h1>") == 1
    row = next(tr for tr in page.split("<tr>") if "unknown_field" in tr)
    assert row.count("<td>") == 5, row
    import html

    assert f"unknown field '{PAYLOAD_SHOWN}' is not part of CZANN 2.1.0" in html.unescape(row)


def test_the_html_report_escapes_package_text(hostile_metadata_pkg: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    r = cli("validate", str(hostile_metadata_pkg), "--static", "--report", str(out))
    assert r.exit_code == 0, r.output
    text = out.read_text()
    _no_raw_payload(text)
    import html

    assert html.escape(f"unknown field '{PAYLOAD_SHOWN}' is not part of CZANN 2.1.0", quote=True) in text


def test_the_evaluation_report_escapes_package_text(world: World, tmp_path: Path) -> None:
    """A runnable package whose ModelName and class names carry the payload, evaluated for real."""
    from czregistry.package import write_package

    unpacked = tmp_path / "u"
    assert cli("unpack", str(world.pkg), str(unpacked)).exit_code == 0
    meta = json.loads((unpacked / "model.json").read_text())
    meta["ModelName"] = PAYLOAD
    meta["Classes"] = [f"{PAYLOAD}{i}" for i in range(len(meta["Classes"]))]
    pkg = tmp_path / "hostile.czann"
    write_package(pkg, meta, (unpacked / "model.model").read_bytes())
    out = tmp_path / "e.html"
    r = cli("evaluate", str(pkg), "--images", str(world.eval_images), "--labels", str(world.eval_labels),
            "--report", str(out), "--no-probe")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    _no_raw_payload(text)
    import html

    assert f"<title>Evaluation of {html.escape(PAYLOAD_SHOWN, quote=True)}</title>" in text
    assert f"{html.escape(PAYLOAD_SHOWN, quote=True)}1" in text

# --- issue 22: the Dask run (czreg run --dask) ---


def _dask_lines(output: str) -> list[str]:
    """The ``Error:``/``Hint:`` lines of a refused ``run --dask`` (Dask's own log lines left out)."""
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith(("Error:", "Hint:"))]


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.part"))


def test_run_dask_refuses_an_existing_output_without_force(world: World, tmp_path: Path) -> None:
    """As the single-process run: the same two lines and exit 2, the folder and its other files untouched;
    a part folder we did not write is not deleted either; --force replaces the output."""
    pytest.importorskip("distributed")
    from czregistry.run.dask_run import read_output

    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "mine.txt").write_bytes(b"precious")
    want = [f"Error: {out} already exists", "Hint: pass --force to replace it, or choose another -o path"]
    single = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q")
    r = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q", "--dask", "local:1")
    assert (single.exit_code, r.exit_code) == (2, 2), r.output
    assert _dask_lines(r.output) == _dask_lines(single.output) == want
    assert _files(out) == ["mine.txt"] and (out / "mine.txt").read_bytes() == b"precious"

    # several images into a folder: the folder may hold other files, an image's own output may not exist
    other = tmp_path / "other.png"
    shutil.copy(world.image, other)
    outs = tmp_path / "outs"
    (outs / "cells.ome.zarr").mkdir(parents=True)
    (outs / "cells.ome.zarr" / "mine.txt").write_bytes(b"precious")
    (outs / "notes.txt").write_bytes(b"mine")
    r = cli("run", str(world.pkg), str(world.image), str(other), "-o", str(outs), "-q", "--dask", "local:1")
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [f"Error: {outs / 'cells.ome.zarr'} already exists", want[1]]
    assert _files(outs) == ["cells.ome.zarr", "cells.ome.zarr/mine.txt", "notes.txt"]

    # a folder squatting on the part folder's name, without our manifest: not ours to delete
    squat = tmp_path / ".new.zarr.dask.part"
    squat.mkdir()
    (squat / "mine.txt").write_bytes(b"precious")
    r = cli("run", str(world.pkg), str(world.image), "-o", str(tmp_path / "new.zarr"), "-q", "--dask", "local:1")
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [f"Error: {squat} exists but was not written by czreg run --dask",
                                     "Hint: remove it, or pass --force to replace it"]
    assert _files(squat) == ["mine.txt"] and not (tmp_path / "new.zarr").exists()

    r = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q", "--dask", "local:1", "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "mine.txt").exists() and read_output(out).shape == (96, 96, 2)
    assert _parts(tmp_path) == [squat]


@pytest.mark.parametrize("spec", ["local:0", "local:-1", "local:999", "local:100000000000", "local:abc", "local:",
                                  "local:2.5", "local:4x2", "local:٣"])
def test_run_dask_worker_count_is_bounded(spec: str, world: World, tmp_path: Path) -> None:
    """A typo such as local:999 would fork hundreds of processes, each loading the model: a usage error
    (exit 2) before anything is loaded or written, naming the bound."""
    pytest.importorskip("distributed")
    from czregistry.run.cluster import max_local_workers

    top = max_local_workers()
    assert top == max(64, 4 * (os.cpu_count() or 1))
    out = tmp_path / "out"
    out.mkdir()
    r = cli("run", str(world.pkg), str(world.image), "-o", str(out / "m.zarr"), "-q", "--dask", spec)
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [
        f"Error: --dask {spec}: give a worker count from 1 to {top}, e.g. local:4",
        f"Hint: each worker is a process with its own copy of the model; {top} is max(64, 4 x "
        f"{os.cpu_count() or 1} cores)"]
    assert _files(out) == [] and _parts(tmp_path) == []


def test_run_dask_failed_start_leaves_no_part(world: World, tmp_path: Path) -> None:
    """A scheduler address nobody listens on: one line, exit 8, and no .NAME.dask.part (nor output) left;
    an earlier interrupted run's part folder beside it is left as it was."""
    pytest.importorskip("distributed")
    import socket

    import dask

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        r = cli("run", str(world.pkg), str(world.image), "-o", str(out / "m.zarr"), "-q", "--dask",
                f"127.0.0.1:{port}")
    assert r.exit_code == 8, r.output
    lines = _dask_lines(r.output)
    assert len(lines) == 2 and lines[0].startswith(f"Error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}:")
    assert lines[1] == "Hint: is the scheduler running, and is its port open from here?"
    assert _files(out) == []


def test_run_dask_where_every_block_fails_leaves_no_part(world: World, tmp_path: Path) -> None:
    """The cluster starts but no block is ever written (all but the first row of a Zarr input damaged):
    the run stops naming a block (exit 8) and removes its part folder: it holds nothing to resume."""
    pytest.importorskip("distributed")
    import numpy as np
    import zarr

    src = tmp_path / "in.zarr"
    arr = zarr.open_array(str(src), mode="w", shape=(256, 256), chunks=(1, 256), dtype=np.uint8)
    arr[...] = np.random.default_rng(9).integers(0, 255, (256, 256), dtype=np.uint8)
    for row in range(1, 256):
        (src / "c" / str(row) / "0").write_bytes(b"not a zstd frame" * 4)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("run", str(world.pkg), str(src), "-o", str(out / "m.zarr"), "-q", "--dask", "local:1",
            "--block-size", "128")
    assert r.exit_code == 8, r.output
    lines = _dask_lines(r.output)
    assert len(lines) == 2 and "in.zarr plane 0 block [" in lines[0] and "failed twice" in lines[0], r.output
    assert _files(out) == []


def _default_sigint() -> None:
    """In the child, before exec: Ctrl-C as a terminal delivers it. A suite started in the background by a
    non-interactive shell (``bash .ci/run &``) inherits SIGINT ignored, and Python keeps an ignored SIGINT
    ignored: the run would never see the interrupt this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_dask_run(world: World, pkg: Path, img: Path, out: Path) -> set[str]:
    """Start ``run --dask local:1`` in a subprocess, Ctrl-C it once two blocks are finished; return the
    finished blocks (the part folder is kept for --resume)."""
    markers = out.parent / f".{out.name}.dask.part" / ".czreg" / "blocks"
    proc = subprocess.Popen([sys.executable, "-m", "czregistry", "run", str(pkg), str(img), "-o", str(out),
                             "--dask", "local:1", "--block-size", "128", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(world),
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 240
        while len(list(markers.glob("*.done"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # the main process only: it closes its cluster itself
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and "Interrupted." in stderr, stderr
    assert not out.exists()
    done = {m.name for m in markers.glob("*.done")}
    assert 2 <= len(done) < 256, len(done)  # stopped: not every block of the 2048 px image finished
    return done


def test_run_dask_resume_is_bound_to_the_image_content_and_the_package(world: World, tmp_path: Path) -> None:
    """Same size, old mtime, other pixels (``cp`` + ``touch -r``): --resume refuses, saying what changed, and
    so for a changed package; the unchanged image and package resume to the single-process result."""
    pytest.importorskip("distributed")
    import zipfile

    import numpy as np

    from czregistry.run.dask_run import read_output

    pkg = tmp_path / "seg.czann"
    shutil.copy(world.pkg, pkg)
    img = tmp_path / "slide.npy"  # 256 blocks of 128 px: local:1 (in-process) cannot finish before the Ctrl-C
    np.save(img, np.random.default_rng(10).integers(0, 255, (2048, 2048), dtype=np.uint8))
    out = tmp_path / "out.zarr"
    part = tmp_path / ".out.zarr.dask.part"
    done = _interrupted_dask_run(world, pkg, img, out)
    original, stamp = img.read_bytes(), img.stat()

    def resume() -> Result:
        return cli("run", str(pkg), str(img), "-o", str(out), "--dask", "local:1", "--block-size", "128",
                   "--resume", "--json")

    # the image replaced by other content of the same size, its old mtime put back
    np.save(img, np.random.default_rng(11).integers(0, 255, (2048, 2048), dtype=np.uint8))
    os.utime(img, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert img.stat().st_size == stamp.st_size and img.stat().st_mtime_ns == stamp.st_mtime_ns
    assert img.read_bytes() != original
    r = resume()
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [
        f"Error: cannot resume {part}: the input image slide.npy changed since that run (its content's "
        "SHA-256 differs)", "Hint: run without --resume to start afresh, or pass --force"]
    assert {m.name for m in (part / ".czreg" / "blocks").glob("*.done")} == done and not out.exists()

    # the image back, the package changed (a zip comment: same model, other bytes)
    img.write_bytes(original)
    os.utime(img, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    package = pkg.read_bytes()
    with zipfile.ZipFile(pkg, "a") as z:
        z.comment = b"rebuilt"
    r = resume()
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [
        f"Error: cannot resume {part}: the package changed since that run (its SHA-256 differs)",
        "Hint: run without --resume to start afresh, or pass --force"]

    # both unchanged: the finished blocks are skipped and the output is the single-process run's
    pkg.write_bytes(package)
    r = resume()
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["blocks_skipped"] == len(done) and res["blocks_run"] == 256 - len(done), res
    assert cli("run", str(pkg), str(img), "-o", str(tmp_path / "ref.zarr"), "-q").exit_code == 0
    assert np.array_equal(read_output(out), read_output(tmp_path / "ref.zarr"))
    assert _parts(tmp_path) == []

    # a finished output, then the image replaced the same way: --resume refuses and keeps the output
    before = read_output(out)
    np.save(img, np.random.default_rng(12).integers(0, 255, (2048, 2048), dtype=np.uint8))
    os.utime(img, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    r = resume()
    assert r.exit_code == 2, r.output
    assert _dask_lines(r.output) == [
        f"Error: cannot resume {out}: the input image slide.npy changed since that run (its content's SHA-256 "
        "differs)", "Hint: pass --force to replace it with a fresh run, or choose another -o path"]
    assert np.array_equal(read_output(out), before)

    # --resume --force: what does not match is started afresh, said in a note
    r = cli("run", str(pkg), str(img), "-o", str(out), "--dask", "local:1", "--block-size", "128", "--resume",
            "--force", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["blocks_skipped"] == 0 and res["blocks_run"] == 256, res
    assert res["notes"][-1] == ("out.zarr: not resumed (the input image slide.npy changed since that run (its "
                                "content's SHA-256 differs)); --force: starting afresh")
    assert not np.array_equal(read_output(out), before) and _parts(tmp_path) == []


# --- issue 22: the registry server (sandboxed upload validation, HTTP answers) ----------------------------


def _endless_onnx(trips: int) -> bytes:
    """A valid graph whose output waits on a Loop of ``trips`` empty iterations: with 10**15 it never ends
    (the static checks cannot tell; running it is what hurts)."""
    from onnx import TensorProto, helper

    scalar = [helper.make_tensor_value_info(n, t, []) for n, t in (("i", TensorProto.INT64),
                                                                   ("cond_in", TensorProto.BOOL),
                                                                   ("v_in", TensorProto.FLOAT))]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", scalar, [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    nodes = [helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),  # depends on the input: never folded
             helper.make_node("Mul", ["s", "zero"], ["v0"]),
             helper.make_node("Loop", ["trips", "true", "v0"], ["v_end"], body=body),
             helper.make_node("Mul", ["input", "zero"], ["z"]), helper.make_node("Add", ["z", "half"], ["p"]),
             helper.make_node("Mul", ["v_end", "zero"], ["vz"]), helper.make_node("Add", ["p", "vz"], ["q"]),
             helper.make_node("Concat", ["q", "q"], ["output"], axis=3)]
    inits = [helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
             helper.make_tensor("true", TensorProto.BOOL, [], [True]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])]
    graph = helper.make_graph(nodes, "endless", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["n", "h", "w", 1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", "h", "w", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _endless_package(folder: Path, trips: int = 10**15) -> Path:
    from czregistry.package import write_package
    from tests.models import metadata_for

    return write_package(folder / f"endless-{trips}.czann", {**metadata_for("unet"), "ModelName": "endless"},
                         _endless_onnx(trips))


@dataclass
class LiveServer:
    port: int
    token: str
    upload_dir: Path
    log: Path
    proc: Any

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             token: bool = True) -> tuple[int, dict[str, Any] | str]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {**({"Authorization": f"Bearer {self.token}"} if token else {}), **(headers or {})}
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def _live_server(tmp: Path, *extra: str) -> Iterator[LiveServer]:
    from czregistry.registry import open_registry
    from czregistry.registry.tokens import create_token
    from czregistry.server.process import ServerProcess

    url, blobs, uploads = f"sqlite:///{tmp / 'reg' / 'registry.db'}", str(tmp / "blobs"), tmp / "uploads"
    uploads.mkdir()
    with open_registry(url, blobs) as reg:
        token = create_token(reg, "pub", "publish")[1]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "CZREG_HOME": str(tmp)}
    with ServerProcess.start(url, blobs, extra_args=("--upload-dir", str(uploads), "--log-level", "info", *extra),
                             env=env, log_path=tmp / "server.log") as proc:
        yield LiveServer(proc.port, token, uploads, tmp / "server.log", proc)


@pytest.fixture(scope="module")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Uploads checked in the sandbox (the default), with a short wall-time limit."""
    yield from _live_server(tmp_path_factory.mktemp("srv-sandbox"), "--sandbox-timeout", "8")


@pytest.fixture(scope="module")
def static_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from _live_server(tmp_path_factory.mktemp("srv-static"), "--upload-validation", "static")


def _error(status: int, body: Any) -> dict[str, Any]:
    """The documented error shape, checked whole: ``{"error": {"type", "message", "hint", "exit_code"}}``."""
    assert isinstance(body, dict) and list(body) == ["error"], (status, body)
    assert set(body["error"]) == {"type", "message", "hint", "exit_code"}, body
    return dict(body["error"])


def test_a_model_that_runs_forever_is_stopped_by_the_sandbox(sandbox_server: LiveServer, tmp_path: Path) -> None:
    """The static checks pass it; running it never ends. The server answers 422 within its limit, stays up,
    stores nothing and leaves no upload or sandbox folder behind."""
    pkg = _endless_package(tmp_path)
    start = time.monotonic()
    status, body = sandbox_server.http("POST", "/api/v1/publish?version=1.0", pkg.read_bytes(),
                                       {"X-Czreg-Filename": pkg.name})
    elapsed = time.monotonic() - start
    assert status == 422 and 8 <= elapsed < 30, (status, body, elapsed)
    assert _error(status, body) == {
        "type": "InvalidPackageError", "exit_code": 7,
        "message": f"validation of {pkg.name} did not finish within the server's limit of 8 s; it was stopped "
                   "and nothing was stored",
        "hint": "publish a model that runs faster, or ask the administrator to raise --sandbox-timeout"}
    assert sandbox_server.http("GET", "/api/v1/health")[0] == 200
    assert sandbox_server.http("GET", "/api/v1/models?all_versions=true&yanked=true") == (200, [])
    assert list(sandbox_server.upload_dir.iterdir()) == []
    # the CLI says it in one line, exit 7
    r = subprocess.run([sys.executable, "-m", "czregistry", "publish", str(pkg), "--version", "1.0"],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "CZREG_REGISTRY": f"http://127.0.0.1:{sandbox_server.port}",
                            "CZREG_TOKEN": sandbox_server.token})
    assert r.returncode == 7 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == (f"Error: validation of {pkg.name} did not finish within the server's limit "
                                        "of 8 s; it was stopped and nothing was stored")


def test_the_sandbox_still_publishes_a_model_that_ends(sandbox_server: LiveServer, tmp_path: Path) -> None:
    """The same graph with 3 iterations: model checks and the smoke test ran in the child, their reports are
    stored."""
    pkg = _endless_package(tmp_path, trips=3)
    status, body = sandbox_server.http("POST", "/api/v1/publish?version=1.0&smoke=true", pkg.read_bytes())
    assert status == 200 and isinstance(body, dict), body
    assert body["status"] == "published" and body["report"]["valid"] and body["smoke"]["valid"], body
    assert "model.receptive_field.halo" in {f["check"] for f in body["report"]["findings"]}
    assert list(sandbox_server.upload_dir.iterdir()) == []


def test_the_sandbox_child_gets_a_private_folder_no_secrets_and_limits(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """cwd, HOME and TMPDIR are one private folder, removed afterwards with what the child wrote there; the
    registry URL, token and server settings stay behind; limits, umask and no-new-privs are set; with user
    namespaces the child cannot reach even loopback."""
    import socket

    from czregistry.server.sandbox import SandboxLimits, namespaces_available, run_sandboxed

    for secret in ("CZREG_REGISTRY", "CZREG_TOKEN", "CZREG_SERVE_SETTINGS", "PGPASSWORD"):
        monkeypatch.setenv(secret, "secret")
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        facts = run_sandboxed("tests.sandbox_probe:facts", [listener.getsockname()[1]],
                              SandboxLimits(wall_s=60, memory_mb=2048), parent_dir=str(parent))
    work = Path(facts["cwd"])
    assert facts["home"] == facts["tmpdir"] == str(work) and work.parent.parent == parent
    assert list(parent.iterdir()) == [] and not work.exists()
    assert not {"CZREG_REGISTRY", "CZREG_TOKEN", "CZREG_SERVE_SETTINGS", "PGPASSWORD"} & set(facts["env"])
    assert (facts["rlimit_as"], facts["rlimit_core"], facts["rlimit_cpu"]) == (2048 * 1024**2, 0, 130)
    assert facts["rlimit_fsize"] == 8 * 1024**3 and facts["rlimit_nofile"] == 1024
    assert facts["umask"] == 0o077 and facts["no_new_privs"] is True
    assert max(facts["fds"]) <= 5, facts["fds"]  # stdin, stdout, stderr, the answer, the listing: nothing inherited
    if namespaces_available():
        assert facts["network"].startswith("refused"), facts["network"]


def test_the_sandbox_names_the_memory_limit(tmp_path: Path) -> None:
    from czregistry.errors import InvalidPackageError
    from czregistry.server.sandbox import SandboxLimits, run_sandboxed

    with pytest.raises(InvalidPackageError) as caught:
        run_sandboxed("builtins:bytearray", [16 * 1024**3], SandboxLimits(wall_s=60, memory_mb=1024),
                      label="huge.czann", parent_dir=str(tmp_path))
    assert caught.value.message == "validation of huge.czann ran out of memory (limit: 1024 MiB); nothing was stored"
    assert list(tmp_path.iterdir()) == []


def test_static_only_upload_validation_never_loads_the_model(static_server: LiveServer, tmp_path: Path) -> None:
    """``--upload-validation static``: the endless model is published at once (it never ran), the report says
    the model was not loaded, and a smoke test is refused."""
    pkg = _endless_package(tmp_path)
    start = time.monotonic()
    status, body = static_server.http("POST", "/api/v1/publish?version=1.0", pkg.read_bytes())
    assert status == 200 and time.monotonic() - start < 10, body
    assert isinstance(body, dict) and body["status"] == "published"
    report = body["report"]
    assert "timings_s" not in report["measurements"]  # no model check ran
    assert [f["check"] for f in report["findings"] if f["severity"] == "info"] == ["server.static_only"]
    status, body = static_server.http("POST", "/api/v1/publish?version=2.0&smoke=true", pkg.read_bytes())
    assert (status, _error(status, body)) == (400, {
        "type": "UsageError", "exit_code": 2, "hint": "publish without --smoke",
        "message": "this server checks uploads statically and runs no smoke tests "
                   "(czreg serve --upload-validation static)"})


_REQUEST_HINT = "see /openapi.json (or /docs) for what this endpoint takes"


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [
    ("POST", f"/api/v1/publish?version={'1' * 4300}", b"PK", 400,
     {"type": "UsageError", "exit_code": 2, "message": "the version is 4300 characters long; at most 100 are allowed",
      "hint": "use a PEP 440 version such as 1.2.0"}),
    ("GET", f"/api/v1/resolve?requirement=x=={'1' * 4301}", None, 400,
     {"type": "UsageError", "exit_code": 2, "hint": "use a PEP 440 specifier such as '>=1.2,<2'",
      "message": "the version specifier in the requirement is 4303 characters long; at most 500 are allowed"}),
    ("GET", "/api/v1/models?limit=1e23", None, 422,
     {"type": "UsageError", "exit_code": 2, "hint": _REQUEST_HINT,
      "message": "query parameter 'limit': Input should be a valid integer, unable to parse string as an integer"}),
    ("GET", f"/api/v1/history?limit={10**23}", None, 422,
     {"type": "UsageError", "exit_code": 2, "hint": _REQUEST_HINT,
      "message": "query parameter 'limit': Input should be less than or equal to 1000000"}),
    ("POST", "/api/v1/tags?requirement=endless==1.0", b"{not json", 422,
     {"type": "UsageError", "exit_code": 2, "hint": _REQUEST_HINT,
      "message": "the request body is not valid JSON (Expecting property name enclosed in double quotes)"}),
    ("PUT", "/api/v1/models/endless/aliases/prod", b"{}", 422,
     {"type": "UsageError", "exit_code": 2, "hint": _REQUEST_HINT,
      "message": "the request body field 'version': Field required"}),
    ("POST", "/api/v1/tags?requirement=endless==1.0", b'{"set": {" ": "x"}}', 400,
     {"type": "UsageError", "exit_code": 2, "message": "invalid tag ' =x'",
      "hint": "write --tag key=value (a key is not empty)"}),
    ("GET", "/api/v1/no-such-thing", None, 404,
     {"type": "RemoteError", "exit_code": 11, "message": "no such page or endpoint: /api/v1/no-such-thing",
      "hint": "see /docs for the endpoints of this server"}),
    ("DELETE", "/api/v1/health", None, 405,
     {"type": "RemoteError", "exit_code": 11, "message": "DELETE is not allowed on /api/v1/health",
      "hint": "see /docs for the methods it takes"}),
    ("GET", "/redoc", None, 404,
     {"type": "RemoteError", "exit_code": 11, "message": "no such page or endpoint: /redoc",
      "hint": "see /docs for the endpoints of this server"}),
], ids=["version-4300-digits", "requirement-4301-digits", "limit-1e23", "limit-10**23", "malformed-json",
        "missing-field", "blank-tag-key", "404", "405", "no-redoc"])
def test_bad_requests_get_the_documented_error_shape(sandbox_server: LiveServer, method: str, path: str,
                                                     body: bytes | None, status: int, error: dict[str, Any]) -> None:
    got, answer = sandbox_server.http(method, path, body, {"Content-Type": "application/json"})
    assert (got, _error(got, answer)) == (status, error)
    assert "Traceback" not in sandbox_server.log.read_text(errors="replace")


def test_a_client_that_disconnects_mid_upload_is_one_log_line(sandbox_server: LiveServer) -> None:
    import socket

    log_before = sandbox_server.log.read_text(errors="replace")
    with socket.create_connection(("127.0.0.1", sandbox_server.port)) as s:
        s.sendall(b"POST /api/v1/publish?version=9.0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + sandbox_server.token.encode() + b"\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000)
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while "cut off by the client" not in (new := sandbox_server.log.read_text(errors="replace")[len(log_before):]):
        assert time.monotonic() < deadline, new
        time.sleep(0.2)
    time.sleep(0.5)
    new = sandbox_server.log.read_text(errors="replace")[len(log_before):]
    assert [line for line in new.splitlines() if "publish" not in line or "cut off" in line] == [
        "upload from 127.0.0.1 cut off by the client after 5000 bytes; nothing stored"], new
    assert "Traceback" not in new
    assert list(sandbox_server.upload_dir.iterdir()) == []
    status, rows = sandbox_server.http("GET", "/api/v1/models?name=endless&all_versions=true")
    assert status == 200 and isinstance(rows, list) and "9.0" not in {r["version"] for r in rows}


def test_api_docs_load_nothing_from_other_hosts(sandbox_server: LiveServer) -> None:
    """``/docs`` is our own page (FastAPI's loads Swagger UI from a CDN: blank on an offline lab network)."""
    import re

    status, page = sandbox_server.http("GET", "/docs", token=False)
    assert status == 200 and isinstance(page, str) and "/api/v1/publish" in page and "/api/v1/health" in page
    assert "<script" not in page.lower()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    assert not re.search(r"https?://|@import|url\(", page, flags=re.IGNORECASE)
    assert sandbox_server.http("GET", "/openapi.json", token=False)[0] == 200


# --- issue 25: README commands, no silent overwrite, yanked aliases, demo's registry, help texts ---


def test_postgres_env_file_is_read_when_the_variable_is_unset(tmp_path: Path) -> None:
    """`bash .ci/postgres.sh && pytest -m postgres` (the README) runs the PostgreSQL tests: the root conftest
    reads the server from .ci/postgres.env; each reason to skip names what is missing."""
    import socket

    from tests.postgres_env import VAR, load_postgres_env

    env_file = tmp_path / "postgres.env"
    environ: dict[str, str] = {}
    assert load_postgres_env(env_file, environ) == (
        f"{VAR} is not set and {env_file} does not exist: run 'bash .ci/postgres.sh' first")
    env_file.write_text("OTHER=1\n")
    assert load_postgres_env(env_file, environ) == (
        f"{VAR} is not set and {env_file} has no {VAR}= line: rerun 'bash .ci/postgres.sh'")
    with socket.socket() as listener:  # a real server socket stands in for PostgreSQL's port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/czreg_test"
        env_file.write_text(f"{VAR}={url}\n")
        assert load_postgres_env(env_file, environ) is None and environ == {VAR: url}
    environ.clear()
    assert load_postgres_env(env_file, environ) == (  # the listener is closed: a server from an earlier boot
        f"the PostgreSQL server named in {env_file} (postgres@127.0.0.1:{port}) is not running: "
        "rerun 'bash .ci/postgres.sh'")
    assert environ == {}
    environ[VAR] = "postgresql+psycopg://set-by-the-caller/db"  # an exported variable always wins
    assert load_postgres_env(env_file, environ) is None and environ[VAR].endswith("set-by-the-caller/db")


def test_conftest_loads_the_env_file_in_a_fresh_process() -> None:
    """The root conftest itself (not only the function) reads .ci/postgres.env with the variable unset."""
    from tests.postgres_env import ENV_FILE, VAR, read_env_file, server_reachable

    env = {k: v for k, v in os.environ.items() if k != VAR}
    code = f"import conftest, os; print(os.environ.get({VAR!r}, ''))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       check=True, timeout=120)
    expected = read_env_file(ENV_FILE) if ENV_FILE.is_file() else None
    assert p.stdout.strip() == (expected if expected and server_reachable(expected) else "")


@pytest.mark.parametrize("suffix", [".html", ".md"])
def test_a_second_validate_report_needs_force(suffix: str, world: World, tmp_path: Path) -> None:
    report = tmp_path / f"r{suffix}"
    r = cli("validate", "--static", str(world.static_pkg), "--report", str(report))
    assert r.exit_code == 0, r.output
    first = report.read_bytes()
    report.write_bytes(first + b"<!-- the user's own note -->")  # so a rewrite would be visible
    mine = report.read_bytes()
    r = cli("validate", "--static", str(world.static_pkg), "--report", str(report))
    assert r.exit_code == 2, r.output
    assert r.output.splitlines() == [f"Error: {report} already exists",
                                     "Hint: pass --force to replace it, or choose another --report path"]
    assert report.read_bytes() == mine and _files(tmp_path) == [report.name]
    r = cli("validate", "--static", str(world.static_pkg), "--report", str(report), "--force")
    assert r.exit_code == 0, r.output
    assert report.read_bytes() == first and _files(tmp_path) == [report.name]


def test_evaluate_report_and_overlays_are_replaced_only_with_force(world: World, tmp_path: Path) -> None:
    report, overlays = tmp_path / "e.html", tmp_path / "ov"
    args = ["evaluate", str(world.pkg), "--images", str(world.eval_images), "--labels", str(world.eval_labels),
            "-q", "--no-probe"]
    report.write_bytes(b"mine")
    r = cli(*args, "--report", str(report))
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"Error: {report} already exists", "Hint: pass --force to replace it, or choose another --report path"]
    overlays.mkdir()
    (overlays / "cells.png").write_bytes(b"mine")
    r = cli(*args, "--overlays", str(overlays))
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"Error: {overlays} already exists and is not empty",
        "Hint: pass --force to write into it (files of the same name are replaced), or choose another --overlays "
        "folder"]
    assert report.read_bytes() == b"mine" and (overlays / "cells.png").read_bytes() == b"mine"
    r = cli(*args, "--report", str(report), "--overlays", str(overlays), "--force")
    assert r.exit_code == 0, r.output
    assert report.read_bytes().startswith(b"<!DOCTYPE html") or b"<html" in report.read_bytes()[:200]
    assert (overlays / "cells.png").read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.rglob("*.part"))


def test_an_alias_to_a_yanked_version_is_refused_by_pull_show_and_evaluate(world: World, tmp_path: Path) -> None:
    """`alias set m production 1.0.0; yank m 1.0.0; pull m@production` pulled the yanked version with a
    warning, against the README's rule (a yanked version only by an exact pin)."""
    for v in ("1.0.0", "1.1.0"):
        assert cli("publish", str(world.static_pkg), "--name", "m", "--version", v, "--static").exit_code == 0
    assert cli("alias", "set", "m", "production", "1.0.0").exit_code == 0
    r = cli("yank", "m", "1.0.0", "--reason", "wrong normalisation")
    assert r.exit_code == 0 and r.output.splitlines() == [
        "Yanked m 1.0.0: wrong normalisation",
        "Warning: m@production points at 1.0.0: resolving it is refused until you move it (czreg alias set m "
        "production VERSION) or unyank 1.0.0"]
    refused = ["Error: m@production points at 1.0.0, which is yanked: wrong normalisation",
               "Hint: pin it exactly (m==1.0.0) to use it anyway, or move the alias: czreg alias set m production "
               "VERSION"]
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["pull", "m@production", "-o", str(out / "m.czann")], ["show", "m@production"],
                 ["evaluate", "m@production", "--images", str(world.eval_images), "--labels",
                  str(world.eval_labels), "--report", str(out / "e.html"), "-q"]):
        r = cli(*argv)
        assert (r.exit_code, r.output.splitlines()) == (7, refused), argv
    r = cli("pull", "m<1.1", "-o", str(out / "m.czann"))
    assert (r.exit_code, r.output.splitlines()) == (7, [
        "Error: no version of m matches '<1.1' (1.0.0 is yanked: wrong normalisation)",
        "Hint: a yanked version is pulled only by an exact pin (m==1.0.0); czreg show m lists its versions"])
    assert _files(out) == []
    r = cli("pull", "m==1.0.0", "-o", str(out / "m.czann"))  # the exact pin still works, with the warning
    assert r.exit_code == 0 and "Warning: m 1.0.0 is yanked: wrong normalisation" in r.output
    assert cli("alias", "set", "m", "production", "1.1.0").exit_code == 0  # moving the alias is the way out
    assert json.loads(cli("show", "m@production", "--json").output)["version"] == "1.1.0"


@pytest.mark.parametrize("location", ["nowhere", "sqlite:///missing-dir/x.db"])
def test_demo_refuses_a_registry_that_does_not_exist(location: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`czreg demo --registry nowhere` created a registry that every other command refuses; now it gives
    their answer, before packing anything."""
    monkeypatch.chdir(tmp_path)
    for argv, env in ((["demo", "--size", "64", "--registry", location], None),
                      (["demo", "--size", "64"], {"CZREG_REGISTRY": location})):
        r = cli(*argv, env=env)
        assert r.exit_code == 7, r.output
        _assert_one_line(r.output)
        assert r.output.startswith(f"Error: no registry at '{location}' (") and "czreg init LOCATION" in r.output
        assert _files(tmp_path) == []  # no workdir, no registry


def _help(*argv: str) -> str:
    r = CliRunner().invoke(main, [*argv, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())  # words only: the wrapping depends on the width


def test_help_texts_say_what_the_commands_do() -> None:
    for admin in ("verify", "gc", "purge"):  # through a server these need an admin token (issue 24)
        assert "or a server https://host (needs an admin token: CZREG_TOKEN)" in _help(admin), admin
    assert "changing a setting there needs an admin token" in _help("setting")
    for remote in ("pull", "list", "show", "publish", "yank"):  # these work through a server too
        assert "or a server https://host (token: CZREG_TOKEN)" in _help(remote), remote
    demo = _help("demo")
    assert "run it tiled and evaluate the prediction against the generated image's ground truth" in demo
    assert "it must exist (czreg init LOCATION creates one)" in demo
    assert "an existing file is replaced only with --force" in _help("validate")


def test_every_command_summary_is_whole() -> None:
    """click cuts a summary at the first '.' (``e.g.``) or at its width with '...': each built-in command
    has a short help that fits."""
    r = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    rows = r.output.split("Commands:\n", 1)[1].splitlines()
    assert len(rows) >= 30
    for row in rows:
        assert not row.rstrip().endswith(("...", "e.g.", "i.e.")), row
    # the column width follows the longest command name (plugins add commands: export-bioimageio)
    assert "setting Show or change registry-wide settings." in {" ".join(row.split()) for row in rows}


def test_readme_names_every_extra_of_requirements_all() -> None:
    import re

    found = re.search(r"-e \.\[([^\]]+)\]", (ROOT / "requirements" / "all.txt").read_text())
    assert found is not None
    extras = found.group(1)
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentence = readme.split("Install what the main job needs", 1)[1].split(")", 1)[0]
    names = {"postgres": "PostgreSQL", "czi": "CZI", "sharing": "sharing", "serve": "server", "dask": "Dask"}
    assert {e.strip() for e in extras.split(",")} <= set(names), extras
    for extra in extras.split(","):
        assert names[extra.strip()] in sentence, (extra, sentence)


# --- issue 24: one registry contract (signatures, evaluations and settings over HTTP) ---


@pytest.fixture(scope="module")
def contract_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.test_serve import _start

    gen = _start(tmp_path_factory.mktemp("contract-srv"), "sqlite")
    yield next(gen)
    gen.close()


def _signed_upload(srv: Any, package: bytes, sig: bytes, att: bytes, pem: bytes, *, name: str,
                   lengths: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    import hashlib

    headers = {"Content-Type": "application/octet-stream", "X-Czreg-Filename": "p.czann",
               "X-Czreg-Sha256": hashlib.sha256(package).hexdigest(),
               "X-Czreg-Package-Length": str(len(package)), "X-Czreg-Signature-Length": str(len(sig)),
               "X-Czreg-Attestation-Length": str(len(att)), "X-Czreg-Public-Key-Length": str(len(pem))}
    if lengths is not None:
        headers = {k: v for k, v in headers.items() if "Length" not in k} | lengths
    status, body, _ = srv.http("POST", f"/api/v1/publish?name={name}&version=1.0.0&static=true",
                               token=srv.tokens["publisher"], body=package + sig + att + pem, headers=headers)
    return status, json.loads(body)["error"] if status >= 400 else json.loads(body)


def test_a_signature_for_other_bytes_is_refused_by_the_server(contract_srv: Any, tmp_path: Path) -> None:
    """A client (or a proxy) that sends package B with the signature of package A: the server verifies the
    bundles against the uploaded bytes with the uploaded key, refuses with exit 10, stores nothing."""
    from czregistry.sharing.signing import generate_keypair, sign_package
    from czregistry.validate import validate

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    a, b = make_package(tmp_path, model_name="swap"), make_package(tmp_path, model_name="swap")
    signed = sign_package(a, tmp_path / "k.pem", report=validate(a), write=False)
    status, err = _signed_upload(contract_srv, b.read_bytes(), signed.signature, signed.attestation,
                                 signed.public_key, name="swap")
    assert status == 400 and err["exit_code"] == 10, err
    assert err["message"] == "signature check failed for p.czann: the package bytes differ from the signed ones"
    assert "swap" not in cli("list", env={"CZREG_REGISTRY": contract_srv.url,
                                          "CZREG_TOKEN": contract_srv.tokens["reader"]}).output


def test_a_signed_upload_with_bad_framing_is_refused(contract_srv: Any, tmp_path: Path) -> None:
    """Length headers missing, or bundles over their bound: one error, nothing read past the bound."""
    pkg = make_package(tmp_path, model_name="framed").read_bytes()
    status, err = _signed_upload(contract_srv, pkg, b"s", b"a", b"k", name="framed",
                                 lengths={"X-Czreg-Package-Length": str(len(pkg))})
    assert (status, err["exit_code"]) == (400, 2)
    assert err["message"] == "a signed upload needs all four X-Czreg-*-Length headers (decimal)"
    status, err = _signed_upload(contract_srv, pkg, b"s", b"a", b"k", name="framed", lengths={
        "X-Czreg-Package-Length": str(len(pkg)), "X-Czreg-Signature-Length": str(5 << 20),
        "X-Czreg-Attestation-Length": "1", "X-Czreg-Public-Key-Length": "1"})
    assert err["exit_code"] == 10 and err["message"].startswith(
        "the signature, attestation or public key of the upload is too large; nothing stored"), err


def test_recording_something_that_is_not_an_evaluation(contract_srv: Any) -> None:
    status, body, _ = contract_srv.http("POST", "/api/v1/evaluations", token=contract_srv.tokens["publisher"],
                                        body=b'{"package": 1}', headers={"Content-Type": "application/json"})
    err = json.loads(body)["error"]
    assert status == 400 and err["exit_code"] == 2
    assert err["message"] == "this is not an evaluation (czreg evaluate --json writes one); nothing recorded"


def test_database_commands_name_the_reason_in_user_terms(contract_srv: Any) -> None:
    """`init` and `token` need the database itself: one line that says so, no Python hint."""
    r = cli("init", contract_srv.url)
    assert r.exit_code == 7
    assert r.output.splitlines()[0] == (f"Error: {contract_srv.url} is a registry server; this works on a registry "
                                        "database")
    assert "connect()" not in r.output
    r = cli("token", "list", "--registry", contract_srv.url)
    assert r.exit_code == 2
    assert r.output.splitlines()[0] == "Error: tokens are managed on the server, in its registry database"


# --- issue 28: layers as ONNX fragments (a plugin's layer is foreign code; its parameters are user input) ---


def _fragment_plugin(tmp_path: Path, onnx_form: Any) -> tuple[Path, Path]:
    """Register layer 'evil' with ``onnx_form`` in-process; return a real NHWC ONNX model and an output path."""
    from types import ModuleType

    from czregistry.hookspecs import hookimpl
    from czregistry.layers import LayerSpec
    from czregistry.plugins import get_host
    from czregistry.testing import invariant_conv_onnx

    plugin = ModuleType("evil_layers")

    def register_layers(register: Any) -> None:
        register(LayerSpec("evil", "pre", None, {}, "hostile", onnx=onnx_form))

    plugin.register_layers = hookimpl(register_layers)  # type: ignore[attr-defined]
    get_host().register_plugin(plugin, "evil_layers")
    src = tmp_path / "conv.onnx"
    src.write_bytes(invariant_conv_onnx(1, 2, activation="softmax"))
    return src, tmp_path / "out.czann"


def _pack_with(src: Path, out: Path, *pre: str) -> Any:
    args = ["pack", str(src), "-o", str(out), "--type", "SingleClassSemanticSegmentation", "--classes", "a,b",
            "--min-overlap", "8", "--tile", "32", "32"]
    for p in pre:
        args += ["--pre", p]
    return CliRunner().invoke(main, args)


def _evil_nodes(kind: str) -> Any:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from czregistry.layers import OnnxFragment

    def form(ctx: Any) -> Any:
        if kind == "not a fragment":
            return "rm -rf /"
        if kind == "two outputs":
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"]),
                                       helper.make_node("Identity", ["x"], ["z"])], "g",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "h", "w", "c"]),
                                       helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "h", "w", "c"])])
            return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        if kind == "unknown op":
            return OnnxFragment([helper.make_node("SystemCall", ["x"], ["y"])], (), ctx.opset)
        weight = numpy_helper.from_array(np.zeros(1, np.float32), "w")  # "external data": a host file
        weight.data_location = TensorProto.EXTERNAL
        weight.ClearField("raw_data")
        entry = weight.external_data.add()
        entry.key, entry.value = "location", "/etc/passwd"
        return OnnxFragment([helper.make_node("Add", ["x", "w"], ["y"])], [weight], ctx.opset)

    return form


@pytest.mark.parametrize(("kind", "message"), [
    ("not a fragment", "Error: layer 'evil': its onnx form returned str, not an OnnxFragment or onnx.ModelProto\n"
                       "Hint: see 'register_layers' in docs/plugins.md\n"),
    ("two outputs", "Error: layer 'evil': its ONNX form has 1 inputs and 2 outputs; a layer has exactly one of "
                    "each\n"),
    ("unknown op", "Error: layer 'evil': its ONNX form is not a valid graph: No Op registered for SystemCall with "
                   "domain_version of 18\n"),
    ("external data", "Error: layer 'evil': its ONNX form keeps tensor 'w' outside the graph (in '/etc/passwd')\n"
                      "Hint: a layer embeds its constants (numpy_helper.from_array)\n"),
])
def test_hostile_onnx_layer_form_is_refused_in_one_line(kind: str, message: str, tmp_path: Path) -> None:
    """A plugin's ONNX form that is no fragment, has two outputs, uses an op ONNX does not have, or points a
    tensor at a host file: exit 6 (PackError), one line naming the layer, nothing written (and no file read)."""
    src, out = _fragment_plugin(tmp_path, _evil_nodes(kind))
    res = _pack_with(src, out, "evil")
    assert res.exit_code == 6, res.output
    assert res.output.endswith(message) if kind != "unknown op" else res.output.startswith(message.rstrip("\n"))
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_layer_parameters_that_do_not_fit_the_model_are_one_line(tmp_path: Path) -> None:
    """User input: a per-channel vector longer than the model's channels, a transpose that is no permutation."""
    src, out = _fragment_plugin(tmp_path, _evil_nodes("unknown op"))
    res = _pack_with(src, out, "normalize:mean=[0.1,0.2],std=1")
    assert res.exit_code == 6, res.output
    assert res.output == ("Error: layer 'normalize' cannot be built with {'mean': [0.1, 0.2], 'std': [1.0]}: 2 "
                          "per-channel values given but the input has 1 channels\n"
                          "Hint: check the parameters of 'normalize' in 'czreg plugins'\n")
    res = _pack_with(src, out, "transpose_channels:order=[0,0]")
    assert res.exit_code == 6 and "order must be a permutation of 0..n-1, got [0, 0]" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_keras_only_layer_without_tensorflow_names_what_to_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer written before the ONNX form existed (Keras factory only), on an ONNX source, where the
    TensorFlow plugin is not loaded: one line saying what to install or write, nothing written."""
    from types import ModuleType

    from czregistry.hookspecs import hookimpl
    from czregistry.layers import LayerSpec
    from czregistry.plugins import get_host, reset_host
    from czregistry.testing import invariant_conv_onnx

    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime")
    reset_host()
    plugin = ModuleType("old_layers")

    def register_layers(register: Any) -> None:
        register(LayerSpec("old", "pre", lambda: None, {}, "a Keras-only layer"))

    plugin.register_layers = hookimpl(register_layers)  # type: ignore[attr-defined]
    get_host().register_plugin(plugin, "old_layers")
    src = tmp_path / "conv.onnx"
    src.write_bytes(invariant_conv_onnx(1, 2, activation="softmax"))
    res = _pack_with(src, tmp_path / "out.czann", "old")
    assert res.exit_code == 6, res.output
    assert res.output == ("Error: these layers exist only as Keras layers (no ONNX form), and no plugin that builds "
                          "Keras layers is loaded\nHint: pip install czregistry-tensorflow "
                          "(plugins/czregistry-tensorflow), or give the layer an ONNX form (docs/plugins.md)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


# --- issue 26: bioimage.io packages (import and export) ---


@pytest.fixture(scope="module")
def bioimageio_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked bioimage.io package (rdf.yaml, ONNX weights, test tensors), built in code."""
    import zipfile

    pytest.importorskip("torch")
    pytest.importorskip("bioimageio.spec")
    from .bioimageio_packages import build_package

    root = tmp_path_factory.mktemp("bioimageio-abuse")
    zipped = build_package(root / "src", weights="onnx")
    folder = root / "unpacked"
    with zipfile.ZipFile(zipped) as zf:
        zf.extractall(folder)
    return folder


def _edited_rdf(folder: Path, tmp_path: Path, old: str, new: str) -> Path:
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(folder, copy)
    rdf = copy / "rdf.yaml"
    text = rdf.read_text()
    assert old in text
    rdf.write_text(text.replace(old, new, 1))
    return rdf


def test_bioimageio_zip_slip_member_is_refused(bioimageio_folder: Path, tmp_path: Path) -> None:
    import zipfile

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.write(bioimageio_folder / "rdf.yaml", "rdf.yaml")
        zf.writestr("../escaped.txt", "x")
    out = tmp_path / "out" / "x.czann"
    r = cli("pack", str(evil), "-o", str(out))
    assert r.exit_code == 2, r.output
    assert r.output == ("Error: bioimage.io package evil.zip: member path '../escaped.txt' climbs out of the "
                        "package with '..'\nHint: never extract this archive with a generic unzip tool\n")
    assert not (tmp_path / "escaped.txt").exists() and not out.parent.exists()


def test_bioimageio_remote_weights_are_refused_without_download(bioimageio_folder: Path, tmp_path: Path) -> None:
    rdf = _edited_rdf(bioimageio_folder, tmp_path, "source: w.onnx", "source: https://example.invalid/w.onnx")
    r = cli("pack", str(rdf), "-o", str(tmp_path / "x.czann"))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: rdf.yaml: the weights file is a URL (https://example.invalid/w.onnx); "
                               "czregistry reads local packages only and downloads nothing\n")
    assert not (tmp_path / "x.czann").exists()


def test_bioimageio_op_without_equivalent_is_refused(bioimageio_folder: Path, tmp_path: Path) -> None:
    rdf = _edited_rdf(bioimageio_folder, tmp_path, "    postprocessing:\n",
                      "    postprocessing:\n      - id: clip\n        kwargs:\n          min_percentile: 1.0\n"
                      "          max_percentile: 99.0\n")
    r = cli("pack", str(rdf), "-o", str(tmp_path / "x.czann"))
    assert r.exit_code == 2, r.output
    assert r.output == ("Error: the post op 'clip' clips at percentiles, which has no CZANN equivalent\n"
                        "Hint: clip at fixed values (min/max)\n")


def test_bioimageio_invalid_description_is_refused(bioimageio_folder: Path, tmp_path: Path) -> None:
    rdf = _edited_rdf(bioimageio_folder, tmp_path, "license: MIT", "license: 3")
    r = cli("pack", str(rdf), "-o", str(tmp_path / "x.czann"))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: rdf.yaml is not a valid bioimage.io description (")
    assert "Hint: check it with: bioimageio validate rdf.yaml\n" in r.output


def test_bioimageio_export_of_a_legacy_package_is_refused(tmp_path: Path) -> None:
    from czregistry.package import write_package

    from .static_packages import fake_onnx

    legacy = tmp_path / "old.czmodel"
    xml = (b'<Model Version="3.1.0"><Id>5b3c2f8e-1d2a-4c3b-9e8f-0a1b2c3d4e5f</Id><ModelName>m</ModelName>'
           b"</Model>")
    write_package(legacy, xml, fake_onnx(), kind="czmodel")
    r = cli("export-bioimageio", str(legacy), "-o", str(tmp_path / "m.zip"))
    assert r.exit_code == 2, r.output
    assert r.output == ("Error: old.czmodel is a legacy .czmodel package; only .czann packages with an ONNX model "
                        "export to bioimage.io\nHint: repack it as .czann (czreg pack ... -o NAME.czann)\n")
    assert not (tmp_path / "m.zip").exists()


# --- issue 27: one OME-Zarr output format (read_output on foreign folders) ---


def test_read_output_refuses_what_is_not_our_ome_zarr(tmp_path: Path) -> None:
    """``read_output`` (both paths' OME-Zarr) answers a plain Zarr array (what czreg run wrote before), a
    missing folder, a folder without Zarr metadata and a group whose OME axes do not fit its array with one
    line each, and changes nothing."""
    import zarr

    from czregistry.errors import UsageError
    from czregistry.run.dask_run import read_output

    hint = "give the -o folder of czreg run (OME-Zarr 0.5); a plain Zarr array opens with zarr.open_array"
    plain = tmp_path / "old.zarr"
    zarr.open_array(str(plain), mode="w", shape=(4, 4, 1), dtype="u1")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    bad = tmp_path / "bad.zarr"
    group = zarr.open_group(str(bad), mode="w")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}]}]}
    group.create_array("0", shape=(4, 4), dtype="u1")  # 2 dims where the axes say 3
    cases = {plain: "it holds a plain Zarr array (czreg run wrote those before its output was OME-Zarr)",
             tmp_path / "none.zarr": "no such folder", empty: "it has no Zarr group metadata",
             bad: "its OME metadata or array 0 is missing or malformed: ValueError"}
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for path, why in cases.items():
        with pytest.raises(UsageError) as err:
            read_output(path)
        assert err.value.message == f"{path} is not an OME-Zarr output of czreg run ({why})"
        assert err.value.hint == hint
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


# --- the graph audit, through every command that would run a model (tests/test_untrusted.py has the rest) ---


def test_a_custom_operator_graph_is_refused_in_one_line_by_every_command_that_would_run_it(
        world: World, tmp_path: Path) -> None:
    """A package whose ONNX graph calls an operator from a custom domain: each command answers in its own
    exit code with one error line (and a hint), never a traceback, and writes nothing."""
    from czregistry.package import write_package
    from tests.models import metadata_for
    from tests.untrusted_models import onnx_model

    pkg = write_package(tmp_path / "custom.czann", metadata_for("unet", overlap=4), onnx_model("custom_domain"))
    out = tmp_path / "out"
    out.mkdir()
    refused = f"Error: refusing to run the model of {pkg.name}: org.evil::Exfiltrate comes from the custom domain"
    cases = [
        (["run", str(pkg), str(world.image), "-o", str(out / "x.tif")], 5, refused),
        (["run", str(pkg), str(world.image), "-o", str(out / "x.zarr"), "--dask", "local:1"], 5, refused),
        (["evaluate", str(pkg), "--images", str(world.eval_images), "--labels", str(world.eval_labels),
          "--report", str(out / "e.html"), "-q"], 5, refused),
    ]
    for argv, code, first in cases:
        r = cli(*argv)
        lines = r.output.splitlines()
        assert r.exit_code == code and lines[0].startswith(first), (argv, r.output)
        assert len(lines) == 2 and lines[1].startswith("Hint: see 'czreg validate --static"), r.output
    for argv in (["validate", str(pkg), "--static"], ["validate", str(pkg)], ["smoke", str(pkg)]):
        r = cli(*argv)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert next(x for x in r.output.splitlines() if "ERROR" in x).split()[1] == "model.graph.unsafe_ops:"
    assert list(out.iterdir()) == []


# --- planar OME-TIFF ---


def test_tiff_layout_with_an_ome_zarr_output_is_one_line_exit_2(world: World, tmp_path: Path) -> None:
    for extra in (["-o", str(tmp_path / "o.zarr")], ["-o", str(tmp_path / "o.zarr"), "--dask", "local:1"]):
        r = cli("run", str(world.pkg), str(world.image), *extra, "--tiff-layout", "planar", "-q")
        assert r.exit_code == 2, r.output
        _assert_one_line(r.output)
        assert "--tiff-layout applies to OME-TIFF outputs" in r.output
    r = cli("run", str(world.pkg), str(world.image), "-o", str(tmp_path / "o.ome.tiff"), "--tiff-layout", "CYX")
    assert r.exit_code == 2 and "'CYX' is not one of 'planar', 'interleaved'" in r.output, r.output
    assert _files(tmp_path) == []


def _spools(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*spool*.part"))


def test_interrupted_planar_run_leaves_no_spool_nor_part(world: World, tmp_path: Path) -> None:
    """Ctrl-C while class 1's tiles wait in their spool file: neither the spool nor the part file stays."""
    from czregistry.run.plan import RunOptions
    from czregistry.run.runner import run

    out = tmp_path / "mask.ome.tiff"
    seen: list[str] = []

    def interrupt(done: int, total: int) -> None:
        seen.extend(p.name for p in _spools(tmp_path))  # opened by the writer thread with the first tile row
        if seen:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(world.pkg, world.big_image, out, RunOptions(output_kind="uint8", tiff_layout="planar"),
            progress=interrupt)
    assert seen and all(name.startswith(".mask.ome.tiff.") for name in seen), seen
    assert _files(tmp_path) == []


def test_a_failing_planar_writer_removes_its_spools(tmp_path: Path) -> None:
    """The writer thread fails mid-file (a row block that does not fit the file: 3 classes for 2): the
    caller gets one ``RunError`` and no spool file stays, although the stored traceback keeps the failed
    tile generator (and so its ``finally``) alive."""
    import numpy as np

    from czregistry.errors import RunError
    from czregistry.run.writers import OutputSpec, TiffWriterSink

    spec = OutputSpec("", (), (1024, 512), 2, np.dtype(np.uint8), tiff_layout="planar")
    writer = TiffWriterSink(tmp_path / ".o.ome.tiff.1-ab.part", spec)
    rows = np.zeros((256, 512, 2), np.uint8)
    writer.write(0, 0, rows)
    deadline = time.monotonic() + 20
    while not _spools(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name for p in _spools(tmp_path)] == [".o.ome.tiff.1-ab-spool1.part"]
    with pytest.raises(RunError, match="writing the OME-TIFF failed"):
        writer.write(0, 256, np.zeros((256, 512, 3), np.uint8))
        for start in range(512, 1024, 256):
            writer.write(0, start, rows)
        writer.close()
    assert _spools(tmp_path) == []


def test_stale_spool_of_a_dead_planar_run_is_swept(world: World, tmp_path: Path) -> None:
    out = tmp_path / "mask.ome.tiff"
    dead = _dead_pid()
    stale = tmp_path / f".mask.ome.tiff.{dead}-0badc0de-spool1.part"
    stale.write_bytes(b"encoded tiles")
    r = cli("run", str(world.pkg), str(world.image), "-o", str(out), "-q", "--output-kind", "uint8",
            "--tiff-layout", "planar")
    assert r.exit_code == 0, r.output
    assert out.is_file() and not stale.exists() and _files(tmp_path) == ["mask.ome.tiff"]


# --- a package path that is a pipe (reading it would block or never end) ---


def test_a_fifo_as_the_package_is_refused_in_one_line_without_opening_it(world: World, tmp_path: Path) -> None:
    fifo = tmp_path / "p.czann"
    os.mkfifo(fifo)
    reg = tmp_path / "reg.db"
    assert cli("init", str(reg)).exit_code == 0
    for args in (["validate", str(fifo)], ["smoke", str(fifo)], ["inspect", str(fifo)],
                 ["publish", str(fifo), "--registry", str(reg), "--name", "x", "--version", "1.0.0"],
                 ["run", str(fifo), str(world.image), "-o", str(tmp_path / "o.ome.tiff")]):
        r = cli(*args)  # a read of the pipe would block this test forever: refused before any open
        assert r.exit_code == 2, (args, r.output)
        _assert_one_line(r.output)
        assert "is not a regular file (a pipe, socket or device)" in r.output, r.output
    from czregistry.errors import UsageError
    from czregistry.validate import validate

    with pytest.raises(UsageError, match="is not a regular file"):  # the library entry point, the same rule
        validate(fifo)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reg.db"))
    assert left == ["p.czann"], left  # no output, no part file
