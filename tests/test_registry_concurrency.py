"""Real parallel processes (spawned, never forked with live connections) against one registry, on SQLite
and PostgreSQL: concurrent first-time creation, concurrent ``--bump`` publishing, publishers killed with
SIGKILL at random points."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from czregistry.registry import open_registry
from tests.test_registry import location, make_package  # noqa: F401  (fixture)
from tests.test_registry_workers import open_and_report, publish_forever, publish_many

pytestmark = pytest.mark.slow

CTX = multiprocessing.get_context("spawn")


def test_concurrent_first_open_migrates_once(location: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    from czregistry.registry.migrations import HEAD

    go = CTX.Event()
    outs = [tmp_path / f"rev{i}.json" for i in range(4)]
    procs = [CTX.Process(target=open_and_report, args=(*location, go, str(o))) for o in outs]
    for p in procs:
        p.start()
    time.sleep(0.5)
    go.set()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 4
    assert {json.loads(o.read_text()) for o in outs} == {HEAD}


def test_parallel_bump_publishers_lose_nothing_and_never_duplicate(
        location: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """8 processes x 10 publishes with --bump patch into a fresh registry: 80 distinct versions."""
    workers, each = 8, 10
    folder = tmp_path / "pkgs"
    folder.mkdir()
    slices = [[str(make_package(folder, size=4000)) for _ in range(each)] for _ in range(workers)]
    go = CTX.Event()
    outs = [tmp_path / f"out{i}.json" for i in range(workers)]
    procs = [CTX.Process(target=publish_many, args=(*location, s, go, str(o))) for s, o in zip(slices, outs)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    go.set()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * workers
    claimed = [tuple(r) for o in outs for r in json.loads(o.read_text())]
    assert {c[0] for c in claimed} == {"published"}
    versions = [c[1] for c in claimed]
    assert len(set(versions)) == workers * each, "two publishers got the same version"
    with open_registry(*location) as reg:
        stored = {v["version"]: v["digest"] for v in reg.show("race")["versions"]}
        assert stored == {c[1]: c[2] for c in claimed}, "a publish was lost or overwritten"
        assert sorted(stored, key=lambda v: int(v.split(".")[2])) == [f"0.0.{i}" for i in range(1, 81)]
        assert reg.verify()["ok"]
        assert len(list(reg.store.iter_blobs())) == workers * each


def test_publishers_killed_at_random_points_leave_no_dangling_rows(
        location: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """SIGKILL publishers at random moments (while hashing, writing, fsyncing, inside the transaction);
    afterwards every row's blob exists and hashes right, gc only finds orphans, publishing goes on."""
    rng = random.Random(1234)
    folder = tmp_path / "pkgs"
    folder.mkdir()
    pool = [str(make_package(folder, size=rng.choice([50_000, 400_000]))) for _ in range(150)]
    kills, workers, cursor, target_kills = 0, 3, 0, 12

    def spawn() -> tuple[Any, Any]:
        nonlocal cursor
        ready = CTX.Event()
        p = CTX.Process(target=publish_forever, args=(*location, pool[cursor:cursor + 6], ready))
        cursor += 6
        p.start()
        return p, ready

    procs = [spawn() for _ in range(workers)]
    while kills < target_kills and cursor + 6 <= len(pool):
        i = rng.randrange(workers)
        proc, ready = procs[i]
        assert ready.wait(120), "publisher did not start"
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere in its 6 publishes: hashing, writing, committing
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join(30)
        procs[i] = spawn()
    for proc, _ in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join(30)

    with open_registry(*location) as reg:
        shown = reg.show("crash")
        versions = [v["version"] for v in shown["versions"]]
        assert len(versions) == len(set(versions)) > 0
        report = reg.verify()
        assert report["ok"], report["problems"]  # no row points at a missing or wrong blob
        referenced = {v["digest"][7:] for v in shown["versions"]}
        orphans = reg.gc(dry_run=True)["blobs"]
        assert not referenced & {d[7:] for d in orphans}
        removed = reg.gc(temp_grace_s=0)
        assert reg.verify()["ok"] and len(list(reg.store.iter_blobs())) == len(referenced)
        after = reg.publish(make_package(folder), name="crash", bump_part="patch", static=True)
        assert after.status == "published" and after.version["version"] not in versions
    print(f"\ncrash test ({location[0].split(':')[0]}): {kills} SIGKILLs, {len(versions)} versions committed, "
          f"{len(removed['blobs'])} orphan blob(s) and {removed['temp_files']} temp file(s) collected, "
          f"0 dangling rows")
