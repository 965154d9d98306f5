"""Schema migrations: from empty, from the first schema (with data in it), and ORM == migrated schema."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from packaging.version import Version
from sqlalchemy import inspect, text

from czregistry.errors import RegistryError
from czregistry.registry import db, open_registry
from czregistry.registry.migrations import HEAD
from czregistry.registry.models import Base
from czregistry.registry.store import LocalBlobStore
from czregistry.registry.versions import sort_key
from tests.test_registry import location, make_package  # noqa: F401  (fixture)


def test_head_constant_is_the_newest_script() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    assert script.get_heads() == [HEAD]
    assert [r.revision for r in script.walk_revisions()] == ["r0006", "r0005", "r0004", "r0003", "r0002", "r0001"]


def _triggers(conn: object) -> set[str]:
    c = conn  # type: ignore[assignment]
    if c.dialect.name == "sqlite":  # type: ignore[attr-defined]
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    else:
        sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
    return set(c.execute(text(sql)).scalars())  # type: ignore[attr-defined]


def test_migrate_from_empty(location: tuple[str, str]) -> None:  # noqa: F811
    with open_registry(*location) as reg, reg.engine.connect() as conn:
        assert db.current_revision(conn) == HEAD
        assert {"versions_immutable", "versions_guard"} & _triggers(conn)
        if conn.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_orm_models_match_the_migrated_schema(location: tuple[str, str]) -> None:  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with open_registry(*location) as reg, reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_from_the_first_schema_keeps_data_and_adds_guards(location: tuple[str, str],  # noqa: F811
                                                                   tmp_path: Path) -> None:
    url, blobs = location
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = db.create_registry_engine(url)
    db.upgrade(engine, "r0001")
    pkg = make_package(tmp_path)
    data = pkg.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with pkg.open("rb") as fh:
        LocalBlobStore(blobs).put(fh)
    with engine.connect() as conn:
        assert db.current_revision(conn) == "r0001"
        assert not _triggers(conn)
        conn.execute(text("INSERT INTO models (id, name, display_name, created_at) "
                          "VALUES (1, 'old-model', 'Old_Model', CURRENT_TIMESTAMP)"))
        conn.execute(text(
            "INSERT INTO versions (model_id, version, version_key, digest, size, kind, model_type, classes, valid, "
            "allow_invalid, report, created_at, created_by, host, source_name, czreg_version, yanked) VALUES "
            "(1, '0.9.0', '0.9', :d, :n, 'czann', NULL, NULL, :t, :f, '{\"findings\": []}', CURRENT_TIMESTAMP, "
            "'alice', 'lab-pc', 'old.czann', '0.0.1', :f)"), {"d": digest, "n": len(data), "t": True, "f": False})
        conn.commit()
    engine.dispose()

    with open_registry(url, blobs) as reg:  # opening migrates r0001 -> head
        with reg.engine.connect() as conn:
            assert db.current_revision(conn) == HEAD
            backfilled = conn.execute(text("SELECT sort_key, is_pre FROM versions")).one()
            assert backfilled == ("000000.000000000000.000000000009!201", False)
        v = reg.show("old-model==0.9")
        assert (v["name"], v["version"], v["created_by"], v["smoke"]) == ("Old_Model", "0.9.0", "alice", None)
        assert reg.pull("old-model", tmp_path / "back.czann").path.read_bytes() == data
        assert reg.publish(make_package(tmp_path), name="old-model", bump_part="minor",
                           static=True).version["version"] == "0.10.0"
        reg.purge("old-model", "0.9.0")
        try:
            reg.publish(pkg, name="old-model", version="0.9", static=True)
        except RegistryError as exc:
            assert "never reused" in exc.message
        else:
            raise AssertionError("a purged number was reused after migration")


def _columns(conn: object, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}  # type: ignore[arg-type]


def test_downgrade_to_base_and_back_up_keeps_data_where_the_schema_can(location: tuple[str, str],  # noqa: F811
                                                                        tmp_path: Path) -> None:
    """Roll back one revision at a time with a version, a tag, an alias and a purge tombstone present, then up.

    Each step down must succeed with rows that other tables reference (SQLite's table rebuild used to fail
    on the tag's and the alias's foreign keys, and dropped the immutability triggers with the old table);
    the older schema keeps every row it has columns for and the guards of its own revision. Up again, the
    registry works on the same rows, with the guards of the head schema.
    """
    url, blobs = location
    kept = make_package(tmp_path)
    with open_registry(url, blobs) as reg:
        reg.publish(kept, name="Kept_Model", version="1.0.0", static=True, tags={"stain": "dapi"}, note="n")
        reg.alias_set("kept-model", "production", "1.0.0")
        reg.publish(make_package(tmp_path), name="Kept_Model", version="1.1.0", static=True)
        reg.purge("kept-model", "1.1.0")
        engine = reg.engine
        head_guards = _triggers_of(engine)
        assert "signatures_no_update" in head_guards
        evaluation_guards = head_guards & {"evaluations_no_update", "evaluations_no_delete", "evaluations_append_only"}
        assert evaluation_guards

        db.downgrade(engine, "r0005")  # r0006: the evaluations table and its guards go, nothing else
        with engine.connect() as conn:
            assert "evaluations" not in inspect(conn).get_table_names()
            assert _triggers(conn) == head_guards - evaluation_guards

        db.downgrade(engine, "r0004")
        with engine.connect() as conn:
            assert "tokens" not in inspect(conn).get_table_names()
            assert _triggers(conn) == head_guards - evaluation_guards

        db.downgrade(engine, "r0003")
        with engine.connect() as conn:
            assert db.current_revision(conn) == "r0003"
            assert not {"signatures", "settings"} & set(inspect(conn).get_table_names())
            guards = _triggers(conn)
        assert guards == head_guards - evaluation_guards - {"signatures_no_update"}

        db.downgrade(engine, "r0002")
        with engine.connect() as conn:
            assert db.current_revision(conn) == "r0002"
            assert not {"sort_key", "is_pre"} & _columns(conn, "versions")
            assert _triggers(conn) == guards - evaluation_guards  # the r0002 guards survive the column drop
            assert conn.execute(text("SELECT version, note FROM versions")).all() == [("1.0.0", "n")]
            assert conn.execute(text("SELECT version FROM tombstones")).scalars().all() == ["1.1.0"]
        with engine.connect() as conn, pytest.raises(Exception, match="czreg-immutable"):
            conn.execute(text("UPDATE versions SET digest = 'x'"))

        db.downgrade(engine, "r0001")
        with engine.connect() as conn:
            assert db.current_revision(conn) == "r0001"
            assert "smoke" not in _columns(conn, "versions") and not _triggers(conn)
            assert conn.execute(text("SELECT key, value FROM tags")).all() == [("stain", "dapi")]
            assert conn.execute(text("SELECT name FROM aliases")).scalars().all() == ["production"]
            assert len(conn.execute(text("SELECT id FROM events")).all()) == 4

        db.downgrade(engine, "base")
        with engine.connect() as conn:
            assert db.current_revision(conn) is None
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}

        db.upgrade(engine, "r0001")  # the first schema again, with a row, then the registry migrates on open
        with engine.connect() as conn:
            conn.execute(text("INSERT INTO models (id, name, display_name, created_at) "
                              "VALUES (1, 'kept-model', 'Kept_Model', CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO versions (model_id, version, version_key, digest, size, kind, valid, allow_invalid, "
                "report, created_at, created_by, host, source_name, czreg_version, yanked) VALUES (1, '1.0.0', "
                "'1', :d, :n, 'czann', :t, :f, '{}', CURRENT_TIMESTAMP, 'bob', 'pc', 'k.czann', '0', :f)"),
                {"d": hashlib.sha256(kept.read_bytes()).hexdigest(), "n": kept.stat().st_size, "t": True, "f": False})
            conn.commit()
    with open_registry(url, blobs) as reg:
        with reg.engine.connect() as conn:
            assert db.current_revision(conn) == HEAD
            assert _triggers(conn) == head_guards
            assert conn.execute(text("SELECT sort_key FROM versions")).scalar() == sort_key(Version("1.0.0"))
        assert reg.pull("kept-model==1.0", tmp_path / "back.czann").path.read_bytes() == kept.read_bytes()
        assert reg.publish(make_package(tmp_path), name="kept-model", bump_part="patch",
                           static=True).version["version"] == "1.0.1"


def _triggers_of(engine: object) -> set[str]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return _triggers(conn)
