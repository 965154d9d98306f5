"""Worker functions for the spawned processes of ``test_registry_concurrency``: a module that imports only
the registry, so each child starts in a fraction of a second (no pytest, hypothesis or click.testing)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from czregistry.registry import open_registry

__all__ = ["open_and_report", "publish_forever", "publish_many"]


def open_and_report(url: str, blobs: str, go: Any, out: str) -> None:
    from czregistry.registry import db

    go.wait(120)
    with open_registry(url, blobs) as reg, reg.engine.connect() as conn:
        Path(out).write_text(json.dumps(db.current_revision(conn)))


def publish_many(url: str, blobs: str, paths: list[str], go: Any, out: str) -> None:
    go.wait(120)
    results = []
    with open_registry(url, blobs) as reg:  # opened after "go": every worker races the first migration
        for p in paths:
            r = reg.publish(p, name="race", bump_part="patch", static=True)
            results.append([r.status, r.version["version"], r.version["digest"]])
    Path(out).write_text(json.dumps(results))


def publish_forever(url: str, blobs: str, paths: list[str], ready: Any) -> None:
    from czregistry.plugins import get_host

    get_host()  # load the checks now, so kills land in publishing rather than in start-up
    with open_registry(url, blobs) as reg:
        ready.set()
        for p in paths:
            reg.publish(p, name="crash", bump_part="patch", static=True)
        time.sleep(3600)  # out of packages: wait to be killed
