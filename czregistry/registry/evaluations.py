"""Recorded evaluations: append-only rows keyed by (package digest, dataset digest, definition).

An evaluation belongs to package *bytes*, so every version with those bytes lists it and a purge does not
erase the measurement. Recording the same key again changes nothing and says so (``status: exists``).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import __version__
from ..errors import RegistryError, UsageError
from .audit import acting_user, iso_time, utc_now
from .models import Evaluation, Model, Version
from .records import RecordedEvaluation, Transactional

__all__ = ["evaluation_summary", "find_evaluation", "list_evaluations", "record_evaluation"]


def _headline(data: dict[str, Any]) -> dict[str, Any]:
    m = data.get("metrics", {})
    if data.get("task") == "regression":
        return {k: m.get(k) for k in ("mae", "rmse", "psnr", "ssim")}
    out = {k: m.get(k) for k in ("mean_iou", "mean_dice", "pixel_accuracy")}
    out["iou"] = m.get("iou")
    objects = m.get("objects", {}).get("classes", {})
    out["f1@0.5"] = {c: rows[0]["f1"] for c, rows in objects.items() if rows}
    return out


def evaluation_summary(row: Evaluation) -> dict[str, Any]:
    data = json.loads(row.result)
    return {"id": row.id, "dataset": {"digest": row.dataset_digest, "images": row.images,
                                      "images_dir": data.get("dataset", {}).get("images_dir")},
            "definition": row.definition, "task": row.task, "metrics": _headline(data),
            "recorded_at": iso_time(row.created_at), "recorded_by": row.created_by, "host": row.host,
            "inference": data.get("inference")}


def record_evaluation(reg: Transactional, data: dict[str, Any]) -> RecordedEvaluation:
    """Store ``data`` (an evaluation JSON) if its package is published; ``status`` is recorded or exists."""
    try:
        digest = str(data["package"]["sha256"])
        key = (digest, str(data["dataset"]["digest"]), str(data["definition"]))
        task, images = str(data["task"]), int(data["dataset"]["images"])
    except (KeyError, TypeError, ValueError):
        raise UsageError("this is not an evaluation (czreg evaluate --json writes one); nothing recorded",
                         hint="record the output of czreg evaluate, unchanged") from None

    def txn(s: Session) -> RecordedEvaluation:
        versions = s.execute(select(Model.name, Model.display_name, Version.version)
                             .join(Model, Version.model_id == Model.id)
                             .where(Version.digest == digest).order_by(Version.id)).all()
        if not versions:
            raise RegistryError(f"package sha256:{digest[:12]}... is not in registry {reg.location.display()}; "
                                "an evaluation is recorded with a published version",
                                hint="publish it first, or evaluate NAME==VERSION from the registry")
        existing = s.scalars(select(Evaluation).where(Evaluation.package_digest == key[0],
                                                      Evaluation.dataset_digest == key[1],
                                                      Evaluation.definition == key[2])).first()
        names = [f"{v.display_name} {v.version}" for v in versions]
        if existing is not None:
            return {"status": "exists", "id": existing.id, "versions": names}
        row = Evaluation(package_digest=key[0], dataset_digest=key[1], definition=key[2], task=task,
                         images=images, result=json.dumps(data, separators=(",", ":")),
                         created_at=utc_now(), created_by=acting_user(), host=socket.gethostname(),
                         czreg_version=__version__)
        s.add(row)
        s.flush()
        for v in versions:
            reg.record_event(s, "evaluate", v.name, version=v.version, dataset=key[1], definition=key[2],
                       evaluation=row.id)
        return {"status": "recorded", "id": row.id, "versions": names}

    return reg.transaction(txn)


def list_evaluations(reg: Transactional, package_digest: str) -> list[dict[str, Any]]:
    with reg.reading() as s:
        rows = list(s.scalars(select(Evaluation).where(Evaluation.package_digest == package_digest)
                              .order_by(Evaluation.id)))
    return [evaluation_summary(r) for r in rows]


def find_evaluation(reg: Transactional, package_digest: str, dataset_digest: str | None = None,
                    definition: str | None = None) -> list[dict[str, Any]]:
    """Full evaluation JSONs of a package (optionally on one dataset / definition), oldest first."""
    q = select(Evaluation.result).where(Evaluation.package_digest == package_digest)
    if dataset_digest is not None:
        q = q.where(Evaluation.dataset_digest == dataset_digest)
    if definition is not None:
        q = q.where(Evaluation.definition == definition)
    with reg.reading() as s:
        return [json.loads(r) for r in s.scalars(q.order_by(Evaluation.id))]
