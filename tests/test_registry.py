"""Registry behaviour, the same tests on SQLite and on a real PostgreSQL server.

PostgreSQL runs when ``CZREG_TEST_POSTGRES_URL`` names a server, or else when ``.ci/postgres.env`` (written
by ``bash .ci/postgres.sh``) does (``tests/postgres_env.py``); each test gets a fresh database. Packages are
small static dummies (valid under ``--static``) unless a test needs a real model.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from czregistry.errors import RegistryError, UsageError
from czregistry.package import write_package
from czregistry.registry import Registry, open_registry, resolve_location
from tests.models import metadata_for
from tests.postgres_env import skip_reason as postgres_skip_reason
from tests.static_packages import fake_onnx

PG_URL = os.environ.get("CZREG_TEST_POSTGRES_URL")
BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_URL, reason=postgres_skip_reason()),
    ]),
]


# --- fixtures shared by the registry test modules --------------------------------------------------------


def fresh_postgres_database() -> tuple[str, Callable[[], None]]:
    """A new, empty database on the test server and a function that drops it."""
    assert PG_URL is not None
    name = f"czreg_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = PG_URL.rpartition("/")

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{base}/{name}", drop


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(registry URL, blob store folder) for an empty registry on each backend."""
    blobs = str(tmp_path / "blobs")
    if request.param == "sqlite":
        (tmp_path / "reg").mkdir()  # the CLI opens only registries that exist ('czreg init' creates one)
        yield f"sqlite:///{tmp_path / 'reg' / 'registry.db'}", blobs
        return
    url, drop = fresh_postgres_database()
    try:
        yield url, blobs
    finally:
        drop()


@pytest.fixture
def reg(location: tuple[str, str]) -> Iterator[Registry]:
    with open_registry(*location) as r:
        yield r


_counter = iter(range(10**9))


def make_package(folder: Path, *, model_name: str = "Nuclei Seg", size: int = 2000, classes: int = 2,
                 kind: str = "unet", seed: int | None = None, **meta: Any) -> Path:
    """A package that passes static validation; distinct bytes every call unless ``seed`` repeats."""
    n = next(_counter) if seed is None else seed
    m = metadata_for(kind, classes=classes)
    m.update(ModelName=model_name, **meta)
    body = fake_onnx(n.to_bytes(8, "little") + bytes((n * 7 + i) % 251 for i in range(size)))
    path = folder / f"pkg-{n}-{uuid.uuid4().hex[:6]}.czann"
    write_package(path, m, body)
    return path


@pytest.fixture
def pkg(tmp_path: Path) -> Callable[..., Path]:
    folder = tmp_path / "pkgs"
    folder.mkdir()
    return lambda **kw: make_package(folder, **kw)


def raw_sql(reg: Registry, sql: str, **params: Any) -> None:
    with reg.engine.connect() as conn:
        conn.execute(text(sql), params)
        conn.commit()


# --- publish and pull ------------------------------------------------------------------------------------


def test_publish_pull_roundtrip_keeps_report_and_provenance(reg: Registry, pkg: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    p = pkg()
    res = reg.publish(p, name="Nuclei_Seg", version="1.2.0", static=True, note="first cut",
                      tags={"stain": "dapi"})
    assert res.status == "published"
    v = res.version
    assert (v["name"], v["canonical_name"], v["version"]) == ("Nuclei_Seg", "nuclei-seg", "1.2.0")
    assert v["source"] == p.name and v["note"] == "first cut" and v["tags"] == {"stain": "dapi"}
    assert v["created_by"] and v["host"] and v["czregistry_version"]
    assert v["type"] == "SingleClassSemanticSegmentation" and v["classes"] == ["class0", "class1"]

    shown = reg.show("nuclei-seg==1.2")
    assert shown["report"]["valid"] is True and shown["report"]["sha256"] == v["digest"].removeprefix("sha256:")
    assert shown["allow_invalid"] is False

    out = reg.pull("NUCLEI.seg>=1.0,<2", f"{tmp_path}/out/")
    assert out.path == tmp_path / "out" / "nuclei-seg-1.2.0.czann"
    assert out.path.read_bytes() == p.read_bytes()
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["nuclei-seg-1.2.0.czann"]


def test_version_key_is_normalised_and_versions_are_immutable(reg: Registry, pkg: Callable[..., Path]) -> None:
    a, b = pkg(), pkg()
    assert reg.publish(a, name="m", version="1.0", static=True).status == "published"
    again = reg.publish(a, name="m", version="1.0.0", static=True)
    assert again.status == "exists" and again.version["version"] == "1.0"
    with pytest.raises(RegistryError, match=r"m 1.0 is already published with other bytes"):
        reg.publish(b, name="m", version="1.0.0", static=True)
    assert [x["version"] for x in reg.show("m")["versions"]] == ["1.0"]


def test_database_itself_refuses_changes_to_published_versions(reg: Registry, pkg: Callable[..., Path]) -> None:
    """Immutability lives in the database (triggers), not only in Python: raw SQL is refused too."""
    reg.publish(pkg(), name="m", version="1.0.0", static=True)
    refused = [
        "UPDATE versions SET digest = 'ab' || substr(digest, 3)",
        "UPDATE versions SET version = '9.9.9', version_key = '9.9.9'",
        "UPDATE versions SET report = '{}'",
        "DELETE FROM versions",
        "UPDATE events SET actor = 'mallory'",
        "DELETE FROM events",
    ]
    for sql in refused:
        with pytest.raises(Exception, match=r"czreg-(immutable|append-only)"):
            raw_sql(reg, sql)
    raw_sql(reg, "UPDATE versions SET yanked = :t, yanked_reason = 'ok'", t=True)  # the lifecycle fields may change
    assert reg.show("m==1.0.0")["yanked"] is True
    assert reg.verify()["ok"]


def test_purge_keeps_a_tombstone_so_numbers_are_never_reused(reg: Registry, pkg: Callable[..., Path],
                                                             tmp_path: Path) -> None:
    a = pkg()
    reg.publish(a, name="m", version="1.0.0", static=True)
    reg.publish(pkg(), name="m", version="1.1.0", static=True)
    reg.alias_set("m", "production", "1.1.0")
    out = reg.purge("m", "1.1", reason="leaked patient data")
    assert out["version"] == "1.1.0" and out["blob_removed"] is True
    with pytest.raises(RegistryError, match=r"m 1.1.0 was purged; version numbers are never reused"):
        reg.publish(pkg(), name="m", version="1.1", static=True)
    # The database refuses it as well, whatever the client does.
    with pytest.raises(Exception, match="czreg-purged"):
        raw_sql(reg, "INSERT INTO versions (model_id, version, version_key, digest, size, kind, valid, "
                     "allow_invalid, report, created_at, created_by, host, source_name, czreg_version, yanked) "
                     "SELECT model_id, '1.1.0', '1.1', digest, size, kind, valid, allow_invalid, report, created_at, "
                     "created_by, host, source_name, czreg_version, yanked FROM versions")
    assert reg.publish(pkg(), name="m", bump_part="minor", static=True).version["version"] == "1.2.0"
    assert reg.show("m")["purged"] == ["1.1.0"]
    assert reg.aliases("m") == {}
    actions = [e["action"] for e in reg.history("m")]
    assert actions[:3] == ["publish", "purge", "alias_remove"]
    with pytest.raises(RegistryError, match=r"m has no version 1\.1\.0"):
        reg.pull("m==1.1.0", tmp_path)


def test_bump_from_the_highest_number_ever_used(reg: Registry, pkg: Callable[..., Path]) -> None:
    assert reg.publish(pkg(), name="m", bump_part="patch", static=True).version["version"] == "0.0.1"
    assert reg.publish(pkg(), name="m", bump_part="minor", static=True).version["version"] == "0.1.0"
    assert reg.publish(pkg(), name="m", bump_part="major", static=True).version["version"] == "1.0.0"
    reg.publish(pkg(), name="m", version="1.4.2rc1", static=True)
    assert reg.publish(pkg(), name="m", bump_part="patch", static=True).version["version"] == "1.4.3"
    same = pkg(seed=4242)
    first = reg.publish(same, name="m", bump_part="patch", static=True)
    again = reg.publish(same, name="m", bump_part="patch", static=True, note="re-release", tags={"k": "v"})
    assert (again.status, again.version["version"]) == ("published", "1.4.5")  # a re-release, never dropped
    assert (again.version["note"], again.version["tags"]) == ("re-release", {"k": "v"})
    assert first.version["digest"] == again.version["digest"]
    with pytest.raises(UsageError, match="exactly one of --version and --bump"):
        reg.publish(pkg(), name="m", static=True)


def test_resolve_specifiers_prereleases_aliases_digests(reg: Registry, pkg: Callable[..., Path]) -> None:
    digests = {}
    for ver in ("1.0.0", "1.2.0", "1.10.0", "2.0.0rc1"):
        digests[ver] = reg.publish(pkg(), name="m", version=ver, static=True).version["digest"]

    def res(spec: str, **kw: Any) -> str:
        return str(reg.resolve(spec, **kw).version["version"])

    assert res("m") == "1.10.0"  # numeric, not lexical, order; the pre-release is skipped
    assert res("m@latest") == "1.10.0"
    assert res("m>=1.2,<1.10") == "1.2.0"
    assert res("m>=1.5") == "1.10.0"
    assert res("m>=1.5", prereleases=True) == "2.0.0rc1"
    assert res("m>=2.0.0rc1") == "2.0.0rc1"  # naming a pre-release allows it, as in pip
    assert res("m>=1.11") == "2.0.0rc1"  # nothing final matches: pip falls back to pre-releases
    assert res("m 1.2") == "1.2.0"
    assert res(digests["1.2.0"]) == "1.2.0"
    assert res("sha256:" + digests["1.0.0"][7:19]) == "1.0.0"
    assert res("m@" + digests["1.0.0"]) == "1.0.0"
    reg.alias_set("m", "Production", "1.2")
    assert res("m@production") == "1.2.0"
    with pytest.raises(RegistryError, match="no version of m matches '>=3'"):
        reg.resolve("m>=3")
    with pytest.raises(RegistryError, match="no model named 'nope'"):
        reg.resolve("nope")
    with pytest.raises(RegistryError, match="m has no alias '@staging'"):
        reg.resolve("m@staging")
    with pytest.raises(UsageError, match="invalid version specifier"):
        reg.resolve("m>>1")


def test_yanked_versions_only_by_exact_pin_with_a_warning(reg: Registry, pkg: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    reg.publish(pkg(), name="m", version="1.0.0", static=True)
    reg.publish(pkg(), name="m", version="1.1.0", static=True)
    reg.yank("m", "1.1.0", "wrong normalisation")
    assert reg.resolve("m").version["version"] == "1.0.0"
    with pytest.raises(RegistryError, match=r"no version of m matches '>=1\.1'"):
        reg.resolve("m>=1.1")
    pinned = reg.pull("m==1.1.0", tmp_path)
    assert pinned.warnings == ["m 1.1.0 is yanked: wrong normalisation"]
    assert pinned.path.exists()
    assert [r["version"] for r in reg.search(name="m", all_versions=True)] == ["1.0.0"]
    assert len(reg.search(name="m", all_versions=True, include_yanked=True)) == 2
    reg.unyank("m", "1.1.0")
    assert reg.resolve("m").version["version"] == "1.1.0"
    with pytest.raises(UsageError, match="a yank needs a reason"):
        reg.yank("m", "1.1.0", " ")


def test_an_alias_to_a_yanked_version_is_refused_and_every_path_says_so(reg: Registry, pkg: Callable[..., Path],
                                                                         tmp_path: Path) -> None:
    """The README's rule: a yanked version is pulled only by an exact pin. An alias that points at one is
    refused (naming alias, version, reason, and the two ways out); yank names the aliases it strands; "no
    version matches" names the yanked versions that would have matched."""
    reg.publish(pkg(), name="m", version="1.0.0", static=True)
    reg.publish(pkg(), name="m", version="1.1.0", static=True)
    reg.alias_set("m", "production", "1.0.0")
    out = reg.yank("m", "1.0.0", "wrong normalisation")
    assert out["aliases"] == ["production"]
    refused = ("m@production points at 1.0.0, which is yanked: wrong normalisation",
               "pin it exactly (m==1.0.0) to use it anyway, or move the alias: czreg alias set m production VERSION")
    for call in (lambda: reg.resolve("m@production"), lambda: reg.show("m@production"),
                 lambda: reg.pull("m@production", tmp_path / "x.czann")):
        with pytest.raises(RegistryError) as info:
            call()
        assert (info.value.message, info.value.hint) == refused
    assert not (tmp_path / "x.czann").exists()
    with pytest.raises(RegistryError) as info:
        reg.resolve("m<1.1")
    assert (info.value.message, info.value.hint) == (
        "no version of m matches '<1.1' (1.0.0 is yanked: wrong normalisation)",
        "a yanked version is pulled only by an exact pin (m==1.0.0); czreg show m lists its versions")
    with pytest.raises(RegistryError) as info:
        reg.resolve("m>=2")
    assert info.value.message == "no version of m matches '>=2'"  # nothing yanked matches: nothing to add
    pinned = reg.resolve("m==1.0.0")
    assert pinned.version["version"] == "1.0.0" and pinned.warnings == ["m 1.0.0 is yanked: wrong normalisation"]
    with pytest.raises(RegistryError) as info:
        reg.alias_set("m", "staging", "1.0.0")
    assert (info.value.message, info.value.hint) == (
        "m 1.0.0 is yanked (wrong normalisation); @staging would not resolve",
        "point @staging at another version, or unyank it first: czreg unyank m 1.0.0")
    reg.alias_set("m", "production", "1.1.0")  # moving the alias is the way out
    assert reg.resolve("m@production").version["version"] == "1.1.0"
    assert reg.yank("m", "1.1.0", "worse")["aliases"] == ["production"]
    with pytest.raises(RegistryError) as info:
        reg.resolve("m")
    assert info.value.message == ("no version of m is available: 1.1.0 is yanked: worse; 1.0.0 is yanked: "
                                  "wrong normalisation")
    reg.unyank("m", "1.1.0")
    assert reg.resolve("m@production").version["version"] == "1.1.0"
    assert reg.yank("m", "1.1.0", "again")["aliases"] == ["production"]
    reg.alias_remove("m", "production")
    assert reg.yank("m", "1.1.0", "again")["aliases"] == []


def test_aliases_move_and_every_move_is_audited(reg: Registry, pkg: Callable[..., Path]) -> None:
    reg.publish(pkg(), name="m", version="1.0.0", static=True)
    reg.publish(pkg(), name="m", version="2.0.0", static=True)
    assert reg.alias_set("m", "production", "1.0.0")["changed"] is True
    assert reg.alias_set("m", "production", "1.0")["changed"] is False
    moved = reg.alias_set("m", "production", "2.0.0")
    assert (moved["from"], moved["to"]) == ("1.0.0", "2.0.0")
    reg.alias_remove("m", "production")
    with pytest.raises(UsageError, match="'@latest' is reserved"):
        reg.alias_set("m", "latest", "1.0.0")
    with pytest.raises(RegistryError, match="m has no version 3"):
        reg.alias_set("m", "staging", "3")
    events = [(e["action"], e["alias"], e["from"], e["to"]) for e in reg.history("m") if e["alias"]]
    assert events == [("alias_remove", "production", "2.0.0", None),
                      ("alias_move", "production", "1.0.0", "2.0.0"),
                      ("alias_set", "production", None, "1.0.0")]
    assert all(e["actor"] and e["at"] and e["host"] for e in reg.history("m"))


def test_tags_and_search_filters(reg: Registry, pkg: Callable[..., Path]) -> None:
    reg.publish(pkg(), name="nuclei-seg", version="1.0.0", static=True, tags={"stain": "dapi"})
    reg.publish(pkg(), name="nuclei-seg", version="1.1.0", static=True)
    reg.publish(pkg(classes=3), name="cells", version="0.1.0", static=True)
    reg.tag("nuclei-seg==1.1.0", {"stain": "hoechst", "lab": "b"})
    assert reg.tag("nuclei-seg==1.1.0", {}, ["lab"]) == {"stain": "hoechst"}
    reg.alias_set("cells", "production", "0.1.0")

    def names(**kw: Any) -> list[tuple[str, str]]:
        return [(r["name"], r["version"]) for r in reg.search(**kw)]

    assert names() == [("cells", "0.1.0"), ("nuclei-seg", "1.1.0")]
    assert names(name="nuclei") == [("nuclei-seg", "1.1.0")]
    assert names(name="NUCLEI_*") == [("nuclei-seg", "1.1.0")]
    assert names(model_type="multiclasssemanticsegmentation") == [("cells", "0.1.0")]
    assert names(class_name="class2") == [("cells", "0.1.0")]
    assert names(tag="stain=dapi") == [("nuclei-seg", "1.0.0")]
    assert names(tag="stain", all_versions=True) == [("nuclei-seg", "1.1.0"), ("nuclei-seg", "1.0.0")]
    assert names(alias="production") == [("cells", "0.1.0")]
    assert reg.search(name="nuclei")[0]["versions"] == 2


def test_invalid_packages_are_refused_unless_allowed(reg: Registry, pkg: Callable[..., Path]) -> None:
    bad = pkg(InputShape="not a shape")
    with pytest.raises(RegistryError, match=r"is invalid \(\d+ error\(s\); first: .*not published"):
        reg.publish(bad, name="m", version="1.0.0", static=True)
    assert reg.search() == []
    res = reg.publish(bad, name="m", version="1.0.0", static=True, allow_invalid=True)
    shown = reg.show("m==1.0.0")
    assert res.report.valid is False and shown["valid"] is False and shown["allow_invalid"] is True
    assert shown["report"]["findings"] and any(f["severity"] == "error" for f in shown["report"]["findings"])
    assert reg.history("m")[0]["detail"]["allow_invalid"] is True


def test_identical_bytes_are_stored_once(reg: Registry, pkg: Callable[..., Path]) -> None:
    p = pkg()
    reg.publish(p, name="a", version="1.0.0", static=True)
    reg.publish(p, name="b", version="1.0.0", static=True)
    assert len(list(reg.store.iter_blobs())) == 1
    both = reg.resolve("a@sha256:" + next(reg.store.iter_blobs()).digest)
    assert both.version["name"] == "a"
    assert reg.verify() == {"blobs": 1, "versions": 2, "bytes": p.stat().st_size, "ok": True, "problems": []}


def test_corrupt_or_missing_blob_is_an_error_naming_the_version_and_leaves_no_file(
        reg: Registry, pkg: Callable[..., Path], tmp_path: Path) -> None:
    p = pkg()
    digest = reg.publish(p, name="nuclei-seg", version="1.2.0", static=True).version["digest"][7:]
    blob = Path(reg.store.location) / "sha256" / digest[:2] / digest[2:]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RegistryError, match=r"the blob of nuclei-seg 1.2.0 is corrupt.*nothing written"):
        reg.pull("nuclei-seg==1.2.0", out)
    assert list(out.iterdir()) == []
    target = out / "model.czann"
    target.write_bytes(b"the user's old file")
    with pytest.raises(RegistryError):
        reg.pull("nuclei-seg", target)
    assert target.read_bytes() == b"the user's old file" and len(list(out.iterdir())) == 1
    report = reg.verify()
    assert not report["ok"] and report["problems"][0]["versions"] == ["nuclei-seg 1.2.0"]
    assert report["problems"][0]["problem"].startswith("corrupt")
    blob.unlink()
    with pytest.raises(RegistryError, match=r"the blob of nuclei-seg 1.2.0 \(sha256:\w{12}\) is missing"):
        reg.pull("nuclei-seg", out)
    assert reg.verify()["problems"][0]["problem"] == "missing"
    assert list(out.iterdir()) == [target]


def test_gc_removes_only_unreferenced_blobs_and_stale_temp_files(reg: Registry, pkg: Callable[..., Path]) -> None:
    keep = reg.publish(pkg(), name="m", version="1.0.0", static=True).version["digest"][7:]
    with pkg().open("rb") as fh:  # a blob whose publisher died before committing its row
        orphan, size = reg.store.put(fh)
    tmp = Path(reg.store.location) / "tmp"
    (tmp / "dead.part").write_bytes(b"x" * 10)
    os.utime(tmp / "dead.part", (0, 0))
    (tmp / "live.part").write_bytes(b"y")
    dry = reg.gc(dry_run=True)
    assert dry["blobs"] == [f"sha256:{orphan}"] and reg.store.exists(orphan)
    out = reg.gc()
    assert out == {"dry_run": False, "blobs": [f"sha256:{orphan}"], "bytes": size, "temp_files": 1}
    assert reg.store.exists(keep) and not reg.store.exists(orphan)
    assert sorted(p.name for p in tmp.iterdir()) == ["live.part"]
    assert reg.verify()["ok"]


def test_smoke_report_is_stored_with_the_version(reg: Registry, model_cache: Callable[..., Path]) -> None:
    """A real ONNX package, full validation (model checks) and the smoke test; both reports are stored."""
    p = model_cache("unet", fmt="onnx", tile=32, overlap=20)  # an overlap that covers the halo: smoke passes
    res = reg.publish(p, name="unet", version="1.0.0", smoke=True)
    assert res.status == "published" and res.smoke is not None
    shown = reg.show("unet==1.0.0")
    assert shown["smoke"] is not None and shown["smoke"]["valid"] == res.smoke.valid
    assert shown["report"]["measurements"], "full validation stores what the model checks measured"


def test_cli_publish_refuses_a_failed_smoke_test_unless_allowed(location: tuple[str, str], tmp_path: Path,
                                                                model_cache: Callable[..., Path]) -> None:
    """The global-pooling model's metadata is valid (``--static`` passes) but its tiles never join: the smoke
    test fails on its seams. Publishing refuses it (exit 7, one line naming the failed check, nothing stored);
    ``--allow-invalid`` stores it with the failed smoke report and the override recorded."""
    import shutil

    p = tmp_path / "global-pool.czann"
    shutil.copyfile(model_cache("global_pool", fmt="onnx", tile=32), p)
    r = _cli(location, "publish", str(p), "--name", "gp", "--version", "1.0.0", "--static", "--smoke")
    assert r.exit_code == 7, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("Error: global-pool.czann failed its smoke test (smoke.seams: tiled output differs "
                               "from whole-image output by up to ")
    assert lines[0].endswith("); not published")
    assert lines[1:] == ["Hint: fix the model, or pass --allow-invalid"]
    assert "Traceback" not in r.output
    assert json.loads(_cli(location, "list", "--json").output) == []

    r = _cli(location, "publish", str(p), "--name", "gp", "--version", "1.0.0", "--static", "--smoke",
             "--allow-invalid", "--json")
    assert r.exit_code == 0, r.output
    published = json.loads(r.output)
    assert published["status"] == "published" and published["smoke"]["valid"] is False
    shown = json.loads(_cli(location, "show", "gp==1.0.0", "--json").output)
    assert shown["allow_invalid"] is True and shown["valid"] is True  # the static validation itself passed
    assert shown["smoke"]["valid"] is False
    assert [f["check"] for f in shown["smoke"]["findings"] if f["severity"] == "error"] == ["smoke.seams"]
    assert shown["smoke"]["measurements"]["smoke.seam_error"] > 1e-3
    assert "smoke test: FAILED" in _cli(location, "show", "gp==1.0.0").output
    events = json.loads(_cli(location, "history", "gp", "--json").output)
    assert [(e["action"], e["detail"]["allow_invalid"]) for e in events] == [("publish", True)]


# --- locations -------------------------------------------------------------------------------------------


def test_default_location_honours_czreg_home_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path(os.environ["CZREG_HOME"])
    loc = resolve_location()
    assert loc.url == f"sqlite:///{home / 'registry' / 'registry.db'}"
    assert loc.blob_store == str(home / "registry" / "blobs")
    monkeypatch.setenv("CZREG_REGISTRY", str(tmp_path / "team"))
    assert resolve_location().url == f"sqlite:///{tmp_path / 'team' / 'registry.db'}"
    assert resolve_location(f"sqlite:///{tmp_path}/x.db").blob_store == str(tmp_path / "blobs")
    with pytest.raises(RegistryError, match="a PostgreSQL registry needs a shared blob store"):
        resolve_location("postgresql://u@h/db")
    pg = resolve_location("postgres://u:secret@h/db", "/mnt/blobs")
    assert pg.url == "postgresql+psycopg://u:secret@h/db" and "secret" not in pg.display()
    with pytest.raises(RegistryError, match="unsupported registry URL"):
        resolve_location("mysql://h/db")


# --- CLI -------------------------------------------------------------------------------------------------


def _cli(location: tuple[str, str], *args: str) -> Any:
    from czregistry.cli import main

    return CliRunner().invoke(main, [*args, "--registry", location[0], "--blob-store", location[1]])


def test_cli_end_to_end(location: tuple[str, str], pkg: Callable[..., Path], tmp_path: Path) -> None:
    p1, p2 = pkg(), pkg()
    r = _cli(location, "publish", str(p1), "--name", "nuclei-seg", "--version", "1.2.0", "--static",
             "--tag", "stain=dapi", "--note", "hello")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Published nuclei-seg 1.2.0 (sha256:")
    r = _cli(location, "publish", str(p2), "--name", "nuclei-seg", "--bump", "minor", "--static", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["version"] == "1.3.0"
    r = _cli(location, "publish", str(p2), "--name", "nuclei-seg", "--version", "1.2", "--static")
    assert r.exit_code == 7
    assert r.output.splitlines()[0].startswith("Error: nuclei-seg 1.2.0 is already published with other bytes")

    r = _cli(location, "pull", "nuclei-seg>=1.2,<1.3", "-o", f"{tmp_path}/models/", "--json")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.output)
    assert pulled["version"] == "1.2.0" and Path(pulled["path"]).read_bytes() == p1.read_bytes()

    assert _cli(location, "alias", "set", "nuclei-seg", "production", "1.3.0").output == \
        "nuclei-seg@production: - -> 1.3.0\n"
    r = _cli(location, "pull", "nuclei-seg@production", "-o", str(tmp_path / "prod.czann"))
    assert r.exit_code == 0 and (tmp_path / "prod.czann").read_bytes() == p2.read_bytes()
    r = _cli(location, "alias", "set", "nuclei-seg", "latest", "1.2.0")
    assert (r.exit_code, r.output.splitlines()[0]) == (2, "Error: '@latest' is reserved: it always means the newest "
                                                          "release")

    listing = json.loads(_cli(location, "list", "--json").output)
    assert [(x["name"], x["version"], x["versions"]) for x in listing] == [("nuclei-seg", "1.3.0", 2)]
    assert "nuclei-seg  1.3.0" in _cli(location, "list").output
    shown = _cli(location, "show", "nuclei-seg==1.2.0").output
    assert "validation: valid" in shown and "tags:       stain=dapi" in shown and "note:       hello" in shown
    assert "@production -> 1.3.0" in _cli(location, "show", "nuclei-seg").output

    r = _cli(location, "yank", "nuclei-seg", "1.3.0", "--reason", "bad normalisation")
    assert r.exit_code == 0
    r = _cli(location, "pull", "nuclei-seg==1.3.0", "-o", f"{tmp_path}/y/")
    assert r.exit_code == 0 and "Warning: nuclei-seg 1.3.0 is yanked: bad normalisation" in r.output
    assert _cli(location, "unyank", "nuclei-seg", "1.3.0").exit_code == 0

    r = _cli(location, "tag", "nuclei-seg==1.3.0", "lab=a", "--json")
    assert json.loads(r.output) == {"lab": "a"}
    history = json.loads(_cli(location, "history", "nuclei-seg", "--json").output)
    assert [e["action"] for e in history] == ["tag", "unyank", "yank", "alias_set", "publish", "publish"]

    r = _cli(location, "purge", "nuclei-seg", "1.2.0")
    assert (r.exit_code, r.output.splitlines()[0]) == (2, "Error: refusing to delete nuclei-seg 1.2.0 without --purge")
    r = _cli(location, "purge", "nuclei-seg", "1.2.0", "--purge", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["blob_removed"] is True
    r = _cli(location, "verify", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    r = _cli(location, "gc", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["blobs"] == []
    r = _cli(location, "pull", "nosuch")
    assert r.exit_code == 7 and r.output.startswith("Error: no model named 'nosuch' in registry")
    assert "Traceback" not in r.output


def test_cli_verify_exits_7_on_drift(location: tuple[str, str], pkg: Callable[..., Path]) -> None:
    r = _cli(location, "publish", str(pkg()), "--name", "m", "--version", "1", "--static", "--json")
    digest = json.loads(r.output)["digest"][7:]
    (Path(location[1]) / "sha256" / digest[:2] / digest[2:]).unlink()
    r = _cli(location, "verify")
    assert r.exit_code == 7
    assert f"sha256:{digest[:12]}... missing: m 1" in r.output
    assert "Error: 1 blob(s) missing or corrupt" in r.output


def test_cli_default_registry_lives_under_czreg_home(pkg: Callable[..., Path]) -> None:
    from czregistry.cli import main

    r = CliRunner().invoke(main, ["publish", str(pkg()), "--name", "m", "--version", "1.0", "--static"])
    assert r.exit_code == 0, r.output
    assert (Path(os.environ["CZREG_HOME"]) / "registry" / "registry.db").is_file()
    assert CliRunner().invoke(main, ["list", "--json"]).output.count('"name": "m"') == 1


def test_cli_does_not_import_sqlalchemy_at_startup() -> None:
    import subprocess
    import sys

    code = "import sys, czregistry.cli; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- version keys ----------------------------------------------------------------------------------------

_version_text = st.builds(
    lambda epoch, release, pre, post, dev: (
        (f"{epoch}!" if epoch else "") + ".".join(map(str, release))
        + (f"{pre[0]}{pre[1]}" if pre else "") + (f".post{post}" if post is not None else "")
        + (f".dev{dev}" if dev is not None else "")),
    st.sampled_from([0, 0, 0, 1]),
    st.lists(st.integers(0, 12), min_size=1, max_size=4),
    st.one_of(st.none(), st.tuples(st.sampled_from(["a", "b", "rc"]), st.integers(0, 3))),
    st.one_of(st.none(), st.integers(0, 3)),
    st.one_of(st.none(), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_version_text, min_size=2, max_size=12))
def test_sort_key_orders_like_pep440(texts: list[str]) -> None:
    from packaging.version import Version

    from czregistry.registry.versions import sort_key, version_key

    versions = [Version(t) for t in texts]
    for a in versions:
        for b in versions:
            assert (a < b) == (sort_key(a) < sort_key(b)), (a, b)
            assert (a == b) == (version_key(a) == version_key(b)) == (sort_key(a) == sort_key(b)), (a, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(_version_text, min_size=1, max_size=10),
       st.sampled_from([">=", ">", "<=", "<", "==", "~=", "!="]), _version_text)
def test_sort_bounds_never_exclude_a_match(texts: list[str], op: str, bound: str) -> None:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    from czregistry.registry.versions import sort_bounds, sort_key

    try:
        spec = SpecifierSet(f"{op}{bound}")
    except InvalidSpecifier:  # e.g. ~= needs two release components
        assume(False)
    low, high = sort_bounds(spec)
    for v in (Version(t) for t in texts):
        if spec.contains(v, prereleases=True):
            assert (low is None or sort_key(v) >= low) and (high is None or sort_key(v) <= high), (v, spec)
