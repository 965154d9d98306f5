"""One registry contract, four back ends: the same CLI commands, the same output lines and exit codes
against a SQLite registry, a PostgreSQL one, and a live ``czreg serve`` with each behind it
(``czregistry.registry.records.RegistryClient``; issue 24).

Each back end is module-scoped (a server takes seconds to start); tests use their own model names. The
settings test switches ``require-signatures`` back off before it ends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from czregistry.cli import main
from czregistry.package import write_package
from czregistry.registry import open_registry
from tests.models import metadata_for
from tests.postgres_env import skip_reason as postgres_skip_reason
from tests.static_packages import conv_onnx
from tests.test_registry import PG_URL, fresh_postgres_database, make_package
from tests.test_serve import _start

_PG = [pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason=postgres_skip_reason())]
BACKENDS = ["sqlite", pytest.param("postgres", marks=_PG), "serve-sqlite",
            pytest.param("serve-postgres", marks=_PG)]


@dataclass
class Backend:
    kind: str
    registry: str  # what --registry gets
    database: str  # the database itself (tampering, checks)
    blobs: str
    tokens: dict[str, str]

    @property
    def remote(self) -> bool:
        return self.kind.startswith("serve")

    def cli(self, *argv: str, token: str = "admin") -> Result:
        env = {"CZREG_REGISTRY": self.registry, "CZREG_BLOB_STORE": self.blobs, "CZREG_PROGRESS": "off",
               "CZREG_TOKEN": self.tokens.get(token, "")}
        return CliRunner().invoke(main, list(argv), env=env)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    kind: str = request.param
    tmp = tmp_path_factory.mktemp(kind)
    if kind.startswith("serve"):
        for srv in _start(tmp, kind.removeprefix("serve-")):
            yield Backend(kind, srv.url, srv.registry, srv.blobs, srv.tokens)
        return
    if kind == "sqlite":
        url, drop = f"sqlite:///{tmp / 'registry.db'}", None
    else:
        url, drop = fresh_postgres_database()
    open_registry(url, str(tmp / "blobs")).close()
    try:
        yield Backend(kind, url, url, str(tmp / "blobs"), {})
    finally:
        if drop is not None:
            drop()


def _ok(r: Result) -> str:
    assert r.exit_code == 0, r.output
    return r.output


def _err(r: Result, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_publish_bump_pull_alias_yank_show_history(backend: Backend, tmp_path: Path) -> None:
    name = f"c-{uuid.uuid4().hex[:6]}"
    one, two = make_package(tmp_path, model_name=name), make_package(tmp_path, model_name=name)
    assert _ok(backend.cli("publish", str(one), "--static", "--version", "1.0.0")).startswith(f"Published {name} 1.0.0")
    assert _ok(backend.cli("publish", str(two), "--static", "--bump", "minor")).startswith(f"Published {name} 1.1.0")
    assert _ok(backend.cli("publish", str(two), "--static", "--version", "1.1.0")).startswith(
        f"Already published: {name} 1.1.0 has these exact bytes")
    assert _err(backend.cli("publish", str(one), "--static", "--version", "1.1.0"), 7).startswith(
        f"Error: {name} 1.1.0 is already published with other bytes")
    out = tmp_path / "out"
    out.mkdir()
    assert f"Pulled {name} 1.0.0 -> {out / f'{name}-1.0.0.czann'}" in _ok(
        backend.cli("pull", f"{name}>=1,<1.1", "-o", f"{out}/"))
    assert (out / f"{name}-1.0.0.czann").read_bytes() == one.read_bytes()
    assert _ok(backend.cli("alias", "set", name, "production", "1.0.0")).strip() == f"{name}@production: - -> 1.0.0"
    assert f"Pulled {name} 1.0.0" in _ok(backend.cli("pull", f"{name}@production", "-o", f"{out}/"))
    assert _ok(backend.cli("yank", name, "1.0.0", "--reason", "bad")).startswith(f"Yanked {name} 1.0.0: bad")
    assert _err(backend.cli("pull", f"{name}<1.1", "-o", f"{out}/"), 7) == (
        f"Error: no version of {name} matches '<1.1' (1.0.0 is yanked: bad)")
    shown = json.loads(_ok(backend.cli("show", name, "--json")))
    assert [(v["version"], v["yanked"]) for v in shown["versions"]] == [("1.1.0", False), ("1.0.0", True)]
    assert shown["aliases"] == {"production": "1.0.0"}
    events = json.loads(_ok(backend.cli("history", name, "--json")))
    assert [e["action"] for e in events] == ["yank", "alias_set", "publish", "publish"]
    assert _err(backend.cli("show", "no-such-model-xyz"), 7).startswith("Error: no model named 'no-such-model-xyz'")


def test_signatures_and_the_require_signatures_setting(backend: Backend, tmp_path: Path) -> None:
    name = f"s-{uuid.uuid4().hex[:6]}"
    _ok(backend.cli("keygen", "-o", str(tmp_path / "alice")))
    _ok(backend.cli("keygen", "-o", str(tmp_path / "mallory")))
    assert _ok(backend.cli("setting", "require-signatures", "on")).strip() == "require-signatures: off -> on"
    try:
        assert _ok(backend.cli("setting", "require-signatures")).startswith("require-signatures: on")
        pkg = make_package(tmp_path, model_name=name)
        assert "requires signed packages" in _err(backend.cli("publish", str(pkg), "--static", "--version", "1.0.0"), 7)
        published = _ok(backend.cli("publish", str(pkg), "--static", "--version", "1.0.0",
                                    "--sign", str(tmp_path / "alice.pem")))
        assert published.startswith(f"Published {name} 1.0.0") and ", signed by " in published
    finally:
        assert _ok(backend.cli("setting", "require-signatures", "off")).strip() == "require-signatures: on -> off"
    out = tmp_path / "got"
    out.mkdir()
    pulled = _ok(backend.cli("pull", f"{name}==1.0.0", "-o", f"{out}/", "--key", str(tmp_path / "alice.pub")))
    assert pulled.strip().endswith("sha256 verified, signature verified)")
    assert sorted(p.name for p in out.iterdir()) == [f"{name}-1.0.0.czann", f"{name}-1.0.0.czann.att",
                                                      f"{name}-1.0.0.czann.sig"]
    _ok(backend.cli("verify-signature", str(out / f"{name}-1.0.0.czann"), "--key", str(tmp_path / "alice.pub")))
    other = tmp_path / "other"
    other.mkdir()
    assert "is signed, but not with this key" in _err(
        backend.cli("pull", f"{name}==1.0.0", "-o", f"{other}/", "--key", str(tmp_path / "mallory.pub")), 10)
    shown = json.loads(_ok(backend.cli("show", f"{name}==1.0.0", "--json")))
    assert [s["bound"] for s in shown["signatures"]] == [True]
    # tamper with the stored attestation (in the database behind the registry or the server: an intruder
    # who can write there can drop the trigger that keeps stored signatures immutable too)
    engine = create_engine(backend.database)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER signatures_no_update" + ("" if engine.dialect.name == "sqlite"
                                                                   else " ON signatures")))
        conn.execute(text("UPDATE signatures SET attestation = replace(attestation, '{', '{ ')"))
    engine.dispose()
    assert "has been altered" in _err(
        backend.cli("pull", f"{name}==1.0.0", "-o", f"{other}/", "--key", str(tmp_path / "alice.pub")), 10)
    assert list(other.iterdir()) == []
    shown = json.loads(_ok(backend.cli("show", f"{name}==1.0.0", "--json")))
    assert [s["bound"] for s in shown["signatures"]] == [False]


@pytest.fixture(scope="module")
def runnable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A runnable package and a two-image labelled dataset."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("runnable")
    meta = metadata_for("unet", tile=64)
    meta["ModelName"] = "gated"
    pkg = tmp / "gated.czann"
    write_package(pkg, meta, conv_onnx())
    images, labels = tmp / "images", tmp / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        img = (rng.random((64, 64)) * 255).astype(np.uint8)
        Image.fromarray(img).save(images / f"im{i}.png")
        Image.fromarray((img > 128).astype(np.uint8)).save(labels / f"im{i}.png")
    return pkg, images, labels


def test_gated_publish_and_recorded_evaluations(backend: Backend, runnable: tuple[Path, Path, Path]) -> None:
    pkg, images, labels = runnable
    name = f"g-{uuid.uuid4().hex[:6]}"
    data = ["--images", str(images), "--labels", str(labels)]
    assert _err(backend.cli("publish", str(pkg), "--name", name, "--version", "1.0.0", *data,
                            "--gate", "mean_iou>=1.5"), 7).startswith("Error: gated.czann failed its gate: mean_iou = ")
    assert _err(backend.cli("show", name), 7).startswith(f"Error: no model named '{name}'")
    out = json.loads(_ok(backend.cli("publish", str(pkg), "--name", name, "--version", "1.0.0", *data,
                                     "--gate", "mean_iou>=0", "--json")))
    assert out["status"] == "published" and out["evaluation"]["dataset"]["images"] == 2
    shown = json.loads(_ok(backend.cli("show", f"{name}==1.0.0", "--json")))
    assert len(shown["evaluations"]) == 1
    again = _ok(backend.cli("evaluate", f"{name}==1.0.0", *data, "--record"))
    assert f"Already recorded with {name} 1.0.0 (evaluation #{shown['evaluations'][0]['id']})" in again


def test_administration(backend: Backend, tmp_path: Path) -> None:
    name = f"a-{uuid.uuid4().hex[:6]}"
    _ok(backend.cli("publish", str(make_package(tmp_path, model_name=name)), "--static", "--version", "1.0.0"))
    checked = _ok(backend.cli("verify", "--json"))
    assert json.loads(checked)["ok"] is True
    assert _ok(backend.cli("purge", name, "1.0.0", "--purge", "--reason", "test")).startswith(f"Purged {name} 1.0.0")
    assert json.loads(_ok(backend.cli("gc", "--json")))["dry_run"] is False
    if backend.remote:  # what a token may do holds for every command
        line = _err(backend.cli("verify", token="publisher"), 9)
        assert line == "Error: token 'publisher' has scope 'publish'; this needs 'admin'"
        assert _err(backend.cli("setting", "require-signatures", "on", token="reader"), 9).startswith(
            "Error: token 'reader' has scope 'read'")
