"""The registry server over real HTTP: ``czreg serve`` in a child process on a loopback port (SQLite with one
worker, PostgreSQL with two), the CLI and ``RemoteRegistry`` as clients, and headless Chromium for the page.

Servers are module-scoped (starting one takes a few seconds); tests use their own model names.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from czregistry.cli import main
from czregistry.errors import InvalidPackageError, RegistryError, RemoteError
from czregistry.package import write_package
from czregistry.registry import open_registry
from czregistry.registry.remote import RemoteRegistry
from czregistry.registry.tokens import create_token, hash_token, revoke_token
from czregistry.server.process import ServerProcess, free_port
from tests.models import metadata_for
from tests.postgres_env import skip_reason as postgres_skip_reason
from tests.static_packages import fake_onnx
from tests.test_registry import PG_URL, fresh_postgres_database, make_package

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Srv:
    url: str
    registry: str
    blobs: str
    tokens: dict[str, str]  # name -> secret
    proc: ServerProcess
    workers: int

    def http(self, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=60)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()


def _start(tmp: Path, backend: str, *, public_read: bool = False, workers: int = 1,
           extra: tuple[str, ...] = ()) -> Iterator[Srv]:
    blobs = str(tmp / "blobs")
    drop: Callable[[], None] | None = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'reg' / 'registry.db'}"
    else:
        url, drop = fresh_postgres_database()
    try:
        tokens: dict[str, str] = {}
        with open_registry(url, blobs) as reg:
            for name, scope, model in [("reader", "read", None), ("publisher", "publish", None),
                                       ("admin", "admin", None), ("nuclei-only", "publish", "nuclei-*")]:
                tokens[name] = create_token(reg, name, scope, model=model)[1]
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "CZREG_HOME": str(tmp / "home")}
        with ServerProcess.start(url, blobs, public_read=public_read, workers=workers, extra_args=extra, env=env,
                                 log_path=tmp / "server.log") as proc:
            yield Srv(proc.url, url, blobs, tokens, proc, workers)
    finally:
        if drop is not None:
            drop()


BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_URL, reason=postgres_skip_reason()),
    ]),
]


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    """Token required; SQLite with one worker, PostgreSQL with two."""
    backend = request.param
    yield from _start(tmp_path_factory.mktemp(f"srv-{backend}"), backend, workers=1 if backend == "sqlite" else 2)


@pytest.fixture(scope="module")
def public_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    """``--public-read`` and a 1 MiB upload limit, on SQLite."""
    yield from _start(tmp_path_factory.mktemp("srv-public"), "sqlite", public_read=True,
                      extra=("--max-upload-mb", "1"))


@pytest.fixture
def pkgs(tmp_path: Path) -> Callable[..., Path]:
    folder = tmp_path / "pkgs"
    folder.mkdir()
    return lambda **kw: make_package(folder, **kw)


def cli(*args: str, registry: str, token: str | None = None) -> Result:
    env = {"CZREG_REGISTRY": registry, "CZREG_TOKEN": token or ""}
    return CliRunner().invoke(main, list(args), env=env)


# --- tokens ------------------------------------------------------------------------------------------------


def test_token_commands_store_only_a_hash(tmp_path: Path) -> None:
    reg_url = f"sqlite:///{tmp_path / 'r' / 'registry.db'}"
    assert CliRunner().invoke(main, ["init", reg_url]).exit_code == 0  # a named registry must exist (issue 12)
    made = cli("token", "create", "ci-bot", "--scope", "publish", "--model", "Nuclei_*", "--expires", "30",
               "--json", registry=reg_url)
    assert made.exit_code == 0, made.output
    info = json.loads(made.stdout)
    secret = info["token"]
    assert secret.startswith("czr_") and len(secret) > 40
    assert (info["scope"], info["model"], info["state"]) == ("publish", "nuclei-*", "active")
    assert info["expires_at"] is not None

    listed = cli("token", "list", "--json", registry=reg_url)
    assert secret not in listed.output and json.loads(listed.stdout)[0]["name"] == "ci-bot"
    with open_registry(reg_url) as reg, reg.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM tokens")).scalars().all()
    assert stored == [hashlib.sha256(secret.encode()).hexdigest()] == [hash_token(secret)]
    assert secret.encode() not in (tmp_path / "r" / "registry.db").read_bytes()

    plain = cli("token", "create", "reader", "--scope", "read", registry=reg_url)
    assert plain.exit_code == 0 and plain.stdout.strip().startswith("czr_") and "shown only now" in plain.output
    again = cli("token", "create", "ci-bot", "--scope", "read", registry=reg_url)
    assert again.exit_code == 7 and "already exists" in again.output
    bad = cli("token", "create", "x", "--scope", "root", registry=reg_url)
    assert bad.exit_code == 2
    revoked = cli("token", "revoke", "ci-bot", registry=reg_url)
    assert revoked.exit_code == 0 and "Revoked token 'ci-bot'" in revoked.stdout
    states = {t["name"]: t["state"] for t in json.loads(cli("token", "list", "--json", registry=reg_url).stdout)}
    assert states == {"ci-bot": "revoked", "reader": "active"}
    remote = cli("token", "list", registry="http://127.0.0.1:9")
    assert remote.exit_code == 2 and "managed on the server" in remote.output


def test_token_gated_publish_scopes_and_audit(srv: Srv, pkgs: Callable[..., Path], tmp_path: Path) -> None:
    p = pkgs(model_name="Gated")
    nobody = cli("publish", str(p), "--version", "1.0.0", "--static", registry=srv.url)
    assert nobody.exit_code == 9 and "needs a token" in nobody.output and "Traceback" not in nobody.output
    wrong = cli("publish", str(p), "--version", "1.0.0", "--static", registry=srv.url, token="czr_not-a-token")
    assert wrong.exit_code == 9 and "does not know this token" in wrong.output
    reader = cli("publish", str(p), "--version", "1.0.0", "--static", registry=srv.url, token=srv.tokens["reader"])
    assert reader.exit_code == 9 and "this needs 'publish'" in reader.output
    limited = cli("publish", str(p), "--version", "1.0.0", "--static", registry=srv.url,
                  token=srv.tokens["nuclei-only"])
    assert limited.exit_code == 9 and "limited to models 'nuclei-*'" in limited.output
    status, body, headers = srv.http("GET", "/api/v1/models")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["exit_code"] == 9
    assert srv.http("POST", "/api/v1/publish?version=1.0.0", token=srv.tokens["reader"], body=b"x")[0] == 403

    ok = cli("publish", str(p), "--version", "1.0.0", "--static", registry=srv.url, token=srv.tokens["publisher"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("Published Gated 1.0.0 (sha256:")
    assert cli("list", "gated", registry=srv.url).exit_code == 9  # reads need a token too (no --public-read)
    assert "Gated" in cli("list", "gated", registry=srv.url, token=srv.tokens["reader"]).stdout

    moved = cli("alias", "set", "gated", "production", "1.0.0", registry=srv.url, token=srv.tokens["publisher"])
    assert moved.exit_code == 0 and moved.stdout.strip() == "Gated@production: - -> 1.0.0"
    no_yank = cli("yank", "gated", "1.0.0", "--reason", "bad", registry=srv.url, token=srv.tokens["publisher"])
    assert no_yank.exit_code == 9 and "this needs 'admin'" in no_yank.output
    yanked = cli("yank", "gated", "1.0.0", "--reason", "bad norm", registry=srv.url, token=srv.tokens["admin"])
    assert yanked.exit_code == 0 and yanked.stdout.strip() == "Yanked Gated 1.0.0: bad norm"

    with open_registry(srv.registry, srv.blobs) as reg:
        events = reg.history("gated")
        expired = create_token(reg, f"expired-{srv.proc.port}", "read", expires_at=datetime(2001, 1, 1, tzinfo=UTC))[1]
        revoked = create_token(reg, f"revoked-{srv.proc.port}", "admin")[1]
        revoke_token(reg, f"revoked-{srv.proc.port}")
    assert [(e["action"], e["actor"], e["host"], e["detail"]["token"]) for e in events] == [
        ("yank", "token:admin", "127.0.0.1", "admin"),
        ("alias_set", "token:publisher", "127.0.0.1", "publisher"),
        ("publish", "token:publisher", "127.0.0.1", "publisher"),
    ]
    hist = cli("history", "gated", registry=srv.url, token=srv.tokens["reader"])
    assert "token:admin@127.0.0.1  yank" in hist.stdout
    shown = cli("show", "gated==1.0.0", registry=srv.url, token=srv.tokens["reader"]).stdout
    assert "by token:publisher on 127.0.0.1" in shown
    exp = cli("list", registry=srv.url, token=expired)
    assert exp.exit_code == 9 and "expired" in exp.output
    rev = cli("list", registry=srv.url, token=revoked)
    assert rev.exit_code == 9 and "was revoked" in rev.output


# --- the same CLI, locally and remotely ---------------------------------------------------------------------

_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


def _norm(text: str) -> str:
    text = _STAMP.sub("<time>", text)
    text = re.sub(r"by \S+ on \S+ from pkg-\d+-\w+\.czann", "by <who> from <file>", text)
    text = re.sub(r"  \S+@\S+  ", "  <who>  ", text)  # history's actor@host
    text = re.sub(r"'(\S+)' in (registry \S+|the server's registry)", r"'\1' in <registry>", text)
    return re.sub(r"-> \S+/(\S+\.czann)", r"-> <dir>/\1", text)


def test_same_output_and_exit_codes_locally_and_remotely(srv: Srv, pkgs: Callable[..., Path],
                                                         tmp_path: Path) -> None:
    a, b, c = pkgs(model_name="Twin"), pkgs(model_name="Twin"), pkgs(model_name="Twin")
    (tmp_path / "local").mkdir()  # a registry named explicitly must exist (czreg init); the server's does
    local = f"sqlite:///{tmp_path / 'local' / 'registry.db'}"
    tok = srv.tokens["admin"]
    steps: list[tuple[str, ...]] = [
        ("publish", str(a), "--version", "1.0.0", "--static", "--tag", "stain=dapi", "--note", "first"),
        ("publish", str(a), "--version", "1.0", "--static"),  # the same bytes again: "Already published"
        ("publish", str(b), "--version", "1.0.0", "--static"),  # other bytes: refused, exit 7
        ("publish", str(c), "--bump", "minor", "--static"),
        ("publish", str(c), "--static"),  # neither --version nor --bump: exit 2
        ("list", "twin"), ("list", "twin", "--all-versions"), ("show", "twin"), ("show", "twin==1.0.0"),
        ("alias", "set", "twin", "production", "1.0.0"), ("alias", "set", "twin", "production", "1.0.0"),
        ("alias", "list", "twin"), ("alias", "set", "twin", "latest", "1.0.0"),
        ("tag", "twin==1.1.0", "reviewed=yes"), ("alias", "set", "twin", "qa", "1.1.0"),
        ("yank", "twin", "1.1.0", "--reason", "wrong normalisation"),  # names @qa, which now points at it
        ("pull", "twin", "-o", "OUT/"), ("pull", "twin==1.1.0", "-o", "OUT/"), ("pull", "twin>=5", "-o", "OUT/"),
        ("pull", "twin@qa", "-o", "OUT/"), ("show", "twin@qa"), ("pull", "twin>=1.1", "-o", "OUT/"),
        ("alias", "set", "twin", "staging", "1.1.0"),
        ("pull", "nosuchmodel", "-o", "OUT/"), ("show", "twin@staging"), ("history", "twin"),
        ("alias", "rm", "twin", "production"), ("unyank", "twin", "1.1.0"), ("list", "twin", "--json"),
    ]
    seen: dict[tuple[str, ...], tuple[int, str, str]] = {}
    for step in steps:
        outs = []
        for where, url in (("local", local), ("remote", srv.url)):
            args = [s.replace("OUT", str(tmp_path / where)) for s in step]
            r = cli(*args, registry=url, token=tok)
            outs.append((r.exit_code, _norm(r.stdout), _norm(r.output)))
        assert outs[0] == outs[1], f"czreg {' '.join(step)}: local {outs[0]} != remote {outs[1]}"
        seen[step] = outs[1]
    assert outs[0][0] == 0
    # the server answers the yanked-alias rule word for word (issue 25)
    assert seen[("yank", "twin", "1.1.0", "--reason", "wrong normalisation")][2].splitlines() == [
        "Yanked Twin 1.1.0: wrong normalisation",
        "Warning: Twin@qa points at 1.1.0: resolving it is refused until you move it (czreg alias set Twin qa "
        "VERSION) or unyank 1.1.0"]
    for step in (("pull", "twin@qa", "-o", "OUT/"), ("show", "twin@qa")):
        assert seen[step][0] == 7 and seen[step][2].splitlines() == [
            "Error: Twin@qa points at 1.1.0, which is yanked: wrong normalisation",
            "Hint: pin it exactly (Twin==1.1.0) to use it anyway, or move the alias: czreg alias set Twin qa VERSION"]
    assert seen[("pull", "twin>=1.1", "-o", "OUT/")][2].splitlines() == [
        "Error: no version of Twin matches '>=1.1' (1.1.0 is yanked: wrong normalisation)",
        "Hint: a yanked version is pulled only by an exact pin (Twin==1.1.0); czreg show Twin lists its versions"]
    assert seen[("alias", "set", "twin", "staging", "1.1.0")][2].splitlines()[0] == (
        "Error: Twin 1.1.0 is yanked (wrong normalisation); @staging would not resolve")
    for f in ("twin-1.1.0.czann",):
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "remote" / f).read_bytes() == c.read_bytes()


# --- concurrency over HTTP -----------------------------------------------------------------------------------


def _parallel(fns: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait(30)
        try:
            results[i] = fns[i]()
        except Exception as exc:  # collected and asserted on below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return results


def test_parallel_publishes_all_stored_and_one_version_has_one_winner(srv: Srv, pkgs: Callable[..., Path]) -> None:
    client = RemoteRegistry(srv.url, token=srv.tokens["publisher"])
    paths = [pkgs(model_name="Parallel") for _ in range(8)]
    results = _parallel([lambda i=i, p=p: client.publish(p, name="parallel", version=f"1.{i}.0", static=True)
                         for i, p in enumerate(paths)])
    assert [r.status for r in results] == ["published"] * 8, results
    shown = client.show("parallel")
    assert sorted(v["version"] for v in shown["versions"]) == sorted(f"1.{i}.0" for i in range(8))
    digests = {v["version"]: v["digest"] for v in shown["versions"]}
    for i, p in enumerate(paths):
        assert digests[f"1.{i}.0"] == "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()

    racers = [pkgs(model_name="Race") for _ in range(4)]
    results = _parallel([lambda p=p: client.publish(p, name="race", version="2.0.0", static=True) for p in racers])
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(winners) == 1 and winners[0].status == "published", results
    assert len(losers) == 3 and all(isinstance(e, RegistryError) and "already published with other bytes"
                                    in e.message and e.exit_code == 7 for e in losers), losers
    winner_digest = winners[0].version["digest"]
    assert [v["digest"] for v in client.show("race")["versions"]] == [winner_digest]
    assert [e["action"] for e in client.history("race")] == ["publish"]


# --- integrity -------------------------------------------------------------------------------------------------


def _blob_path(srv: Srv, digest: str) -> Path:
    d = digest.removeprefix("sha256:")
    return Path(srv.blobs) / "sha256" / d[:2] / d[2:]


def test_tampered_blob_is_never_delivered(srv: Srv, pkgs: Callable[..., Path], tmp_path: Path) -> None:
    client = RemoteRegistry(srv.url, token=srv.tokens["publisher"])
    p = tmp_path / "big.czann"  # incompressible (a zip-bomb check refuses repetitive bodies), several 1 MiB chunks
    write_package(p, {**metadata_for("unet"), "ModelName": "Tamper"}, fake_onnx(os.urandom(3_000_000)))
    digest = client.publish(p, name="tamper", version="1.0.0", static=True).version["digest"]
    first = client.pull("tamper", tmp_path / "ok.czann")  # the server now holds it as verified
    assert first.path.read_bytes() == p.read_bytes()

    blob = _blob_path(srv, digest)
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the streaming hash can tell
    out = tmp_path / "out"
    out.mkdir()
    # One worker: it verified the file before, so it streams and cuts the connection before the last chunk.
    # Several: the request may reach a worker that has not seen the file yet and refuses it up front.
    with pytest.raises(RemoteError if srv.workers == 1 else (RemoteError, RegistryError),
                       match="broke off" if srv.workers == 1 else "broke off|corrupt"):
        client.pull("tamper", out)
    assert list(out.iterdir()) == []

    os.utime(blob)  # a new mtime: the server re-hashes before sending anything
    r = cli("pull", "tamper==1.0.0", "-o", f"{out}/", registry=srv.url, token=srv.tokens["reader"])
    assert r.exit_code == 7 and "is corrupt on the server" in r.output and "nothing written" in r.output
    assert list(out.iterdir()) == []
    for path in (f"/api/v1/blobs/{digest}", "/api/v1/models/tamper/versions/1.0.0/download"):
        status, body, _ = srv.http("GET", path, token=srv.tokens["reader"])
        assert status == 500 and json.loads(body)["error"]["type"] == "RegistryError"
        assert bytes(data[:1000]) not in body

    blob.write_bytes(p.read_bytes())  # restored: served again
    assert client.pull("tamper", out).path.read_bytes() == p.read_bytes()


def test_client_verifies_what_it_receives(tmp_path: Path) -> None:
    """A server (or proxy) that sends other bytes than the digest it announced: the client keeps nothing."""
    real = b"the real package" * 1000
    digest = hashlib.sha256(real).hexdigest()
    version = {"name": "M", "canonical_name": "m", "version": "1.0.0", "kind": "czann", "digest": f"sha256:{digest}",
               "size": len(real)}

    class Liar(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/api/v1/resolve"):
                body = json.dumps({"version": version, "warnings": []}).encode()
            else:
                body = real[:-1] + b"X"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Liar)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = cli("pull", "m", "-o", f"{tmp_path}/", registry=url)
        assert r.exit_code == 7 and "is corrupt" in r.output and "nothing written" in r.output
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()


def test_invalid_package_is_refused_with_its_findings(srv: Srv, tmp_path: Path) -> None:
    bad = tmp_path / "broken.czann"
    bad.write_bytes(b"this is not a zip archive" * 10)
    status, body, _ = srv.http("POST", "/api/v1/publish?name=broken&version=1.0.0&static=true",
                               token=srv.tokens["publisher"], body=bad.read_bytes(),
                               headers={"X-Czreg-Filename": "broken.czann"})
    err = json.loads(body)["error"]
    assert status == 422 and err["type"] == "InvalidPackageError" and err["exit_code"] == 7
    assert err["report"]["valid"] is False
    checks = [f["check"] for f in err["report"]["findings"] if f["severity"] == "error"]
    assert checks and all(isinstance(c, str) and c for c in checks)

    with pytest.raises(InvalidPackageError) as info:
        RemoteRegistry(srv.url, token=srv.tokens["publisher"]).publish(bad, name="broken", version="1.0.0",
                                                                       static=True)
    assert info.value.report is not None and info.value.report["findings"] == err["report"]["findings"]
    r = cli("publish", str(bad), "--name", "broken", "--version", "1.0.0", "--static", registry=srv.url,
            token=srv.tokens["publisher"])
    assert r.exit_code == 7 and "broken.czann is invalid" in r.output and f"first: {checks[0]}" in r.output
    assert cli("show", "broken", registry=srv.url, token=srv.tokens["reader"]).exit_code == 7
    with open_registry(srv.registry, srv.blobs) as reg:
        stored = {b.digest for b in reg.store.iter_blobs()}
    assert hashlib.sha256(bad.read_bytes()).hexdigest() not in stored


# --- public read, limits, API description -----------------------------------------------------------------------


def test_public_read_allows_anonymous_pull_but_not_writes(public_srv: Srv, pkgs: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    p = pkgs(model_name="Open Model")
    assert cli("publish", str(p), "--version", "1.0.0", "--static", registry=public_srv.url).exit_code == 9
    pub = cli("publish", str(p), "--version", "1.0.0", "--static", registry=public_srv.url,
              token=public_srv.tokens["publisher"])
    assert pub.exit_code == 0, pub.output
    pulled = cli("pull", "open-model>=1", "-o", f"{tmp_path}/", registry=public_srv.url)
    assert pulled.exit_code == 0 and "sha256 verified" in pulled.stdout
    assert (tmp_path / "open-model-1.0.0.czann").read_bytes() == p.read_bytes()
    assert "Open Model" in cli("list", registry=public_srv.url).stdout
    assert cli("alias", "set", "open-model", "x", "1.0.0", registry=public_srv.url).exit_code == 9
    status, body, headers = public_srv.http("GET", "/api/v1/models/open-model/versions/1.0.0/download")
    assert status == 200 and body == p.read_bytes()
    assert headers["content-disposition"] == 'attachment; filename="open-model-1.0.0.czann"'
    assert public_srv.http("GET", "/api/v1/whoami")[1] == b'{"token":null,"scope":"read","model":null}'
    assert public_srv.http("GET", "/api/v1/whoami", token="czr_wrong")[0] == 401  # a wrong token is not anonymous


def test_upload_over_the_size_limit_is_refused(public_srv: Srv, tmp_path: Path) -> None:
    big = tmp_path / "big.czann"
    write_package(big, {**metadata_for("unet"), "ModelName": "Too Big"}, fake_onnx(os.urandom(1_500_000)))
    r = cli("publish", str(big), "--version", "1.0.0", "--static", registry=public_srv.url,
            token=public_srv.tokens["publisher"])
    assert r.exit_code == 11 and "over this server's upload limit" in r.output
    assert "Too Big" not in cli("list", registry=public_srv.url).stdout
    # Without a Content-Length (chunked), the server counts while streaming and stops at the limit.
    conn = http.client.HTTPConnection("127.0.0.1", public_srv.proc.port, timeout=60)
    try:
        conn.request("POST", "/api/v1/publish?version=1.0.0&name=chunked", body=iter([b"\0" * 65536] * 40),
                     headers={"Authorization": f"Bearer {public_srv.tokens['publisher']}"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["exit_code"] == 11
    finally:
        conn.close()


def test_serve_refuses_a_busy_port_and_a_server_url(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert CliRunner().invoke(main, ["init", str(tmp_path / "r")]).exit_code == 0
        r = CliRunner().invoke(main, ["serve", "--port", str(port), "--registry", str(tmp_path / "r")])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output
    r = CliRunner().invoke(main, ["serve", "--registry", "http://127.0.0.1:8700"])
    assert r.exit_code == 2 and "not another server" in r.output


def test_openapi_describes_the_versioned_api(public_srv: Srv) -> None:
    status, body, _ = public_srv.http("GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and spec["info"]["title"] == "czregistry"
    paths = set(spec["paths"])
    assert {"/api/v1/publish", "/api/v1/models", "/api/v1/resolve", "/api/v1/show", "/api/v1/history",
            "/api/v1/blobs/sha256:{digest}", "/api/v1/models/{name}/versions/{version}/yank"} <= paths
    assert all(p.startswith("/api/v1/") for p in paths)


def test_unreachable_server_and_plain_http_warning(tmp_path: Path) -> None:
    r = cli("list", registry=f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 11 and "cannot reach the registry server" in r.output and "Traceback" not in r.output
    assert RemoteRegistry("http://10.20.30.40:8700").warnings  # another machine, in the clear
    assert not RemoteRegistry("http://localhost:8700").warnings
    assert not RemoteRegistry("https://models.example.org").warnings
    far = cli("list", registry=f"http://0.0.0.0:{free_port()}/")  # not loopback by name: warned, then refused
    assert far.exit_code == 11 and "Warning: plain HTTP to 0.0.0.0" in far.output


# --- web page ---------------------------------------------------------------------------------------------


def test_web_pages_list_models_and_show_a_model(public_srv: Srv, pkgs: Callable[..., Path]) -> None:
    client = RemoteRegistry(public_srv.url, token=public_srv.tokens["admin"])
    client.publish(pkgs(model_name="Web Model"), version="1.0.0", static=True, tags={"stain": "dapi"})
    client.publish(pkgs(model_name="Web Model"), version="1.1.0", static=True, note="retrained")
    client.alias_set("web-model", "production", "1.0.0")
    status, body, headers = public_srv.http("GET", "/", headers={"Accept": "text/html"})
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html") and "<script" not in page
    assert '<a href="/models/web-model">Web Model</a>' in page and "SingleClassSemanticSegmentation" in page
    assert '<input type="search" name="q"' in page
    _, body, _ = public_srv.http("GET", "/?q=zzz-nothing")
    assert "No models found" in body.decode()
    status, body, _ = public_srv.http("GET", "/models/web-model")
    page = body.decode()
    assert status == 200
    for expected in ("1.1.0", "1.0.0", "@production", "stain=dapi", "Validation report of 1.1.0", "Audit trail",
                     "token:admin", "/api/v1/models/web-model/versions/1.0.0/download", "class0", "retrained"):
        assert expected in page, expected
    status, body, _ = public_srv.http("GET", "/models/no-such-model", headers={"Accept": "text/html"})
    assert status == 404 and "no model named" in body.decode()


def test_model_page_shows_recorded_evaluations(public_srv: Srv, pkgs: Callable[..., Path]) -> None:
    """An evaluation recorded with a version (czreg evaluate --record) appears on that version's page: the
    dataset digest a partner recomputes it on, the metric definitions and the headline numbers."""
    from czregistry.registry import open_registry
    from czregistry.registry.evaluations import record_evaluation

    client = RemoteRegistry(public_srv.url, token=public_srv.tokens["admin"])
    published = client.publish(pkgs(model_name="Judged Model"), version="1.0.0", static=True)
    digest = published.version["digest"].removeprefix("sha256:")
    with open_registry(public_srv.registry, public_srv.blobs) as reg:
        record_evaluation(reg, {"package": {"sha256": digest}, "dataset": {"digest": "sha256:" + "ab" * 32,
                                                                           "images": 3},
                                "definition": "czreg-metrics/1", "task": "segmentation",
                                "metrics": {"mean_iou": 0.8771, "mean_dice": 0.9, "pixel_accuracy": 0.95,
                                            "iou": {"background": 0.9, "nucleus": 0.853}}})
    _, body, _ = public_srv.http("GET", "/models/judged-model?version=1.0.0")
    page = body.decode()
    for expected in ("Evaluations of 1.0.0", "sha256:abababab", "(3 images)", "czreg-metrics/1", "mean_iou: 0.877",
                     "nucleus 0.853"):
        assert expected in page, expected


def test_web_page_needs_a_token_without_public_read(srv: Srv) -> None:
    status, body, _ = srv.http("GET", "/", headers={"Accept": "text/html"})
    assert status == 401 and 'action="/login"' in body.decode()
    status, _, headers = srv.http("POST", "/login", body=f"token={srv.tokens['reader']}".encode(),
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    cookie = headers["set-cookie"]
    assert status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, body, _ = srv.http("GET", "/", headers={"Cookie": cookie.split(";")[0], "Accept": "text/html"})
    assert status == 200 and "<h1>Models</h1>" in body.decode()
    # The cookie never authorises a write.
    status, _, _ = srv.http("POST", "/api/v1/models/x/versions/1.0.0/yank", body=b'{"reason":"x"}',
                            headers={"Cookie": cookie.split(";")[0], "Content-Type": "application/json"})
    assert status == 401


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_headless_chromium_loads_the_page_and_takes_a_screenshot(public_srv: Srv, pkgs: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    assert CHROMIUM is not None
    client = RemoteRegistry(public_srv.url, token=public_srv.tokens["publisher"])
    client.publish(pkgs(model_name="Browser Nuclei", classes=3), version="2.0.0", static=True)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", f"{public_srv.url}/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Browser Nuclei" in dom.stdout and "2.0.0" in dom.stdout and "<h1>Models</h1>" in dom.stdout
    shot = tmp_path / "page.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars",
                          f"{public_srv.url}/models/browser-nuclei"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert struct.unpack(">II", data[16:24]) == (1200, 900)  # IHDR: the window size asked for
    keep = os.environ.get("CZREG_TEST_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "serve-model-page.png")
