"""Signatures stored with versions, and registry-wide settings (schema ``r0004``).

Kept apart from ``api`` so the publish and pull paths only call in here: signing happens before the
publish transaction (it needs the validation report), the row is written inside it; ``pull --key`` verifies
the stored bundles against the pulled bytes before the file appears.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import UsageError
from .models import Setting, Signature

if TYPE_CHECKING:
    from ..sharing.signing import SignedPackage

__all__ = ["SETTINGS", "attach", "bound_to", "get_setting", "parse_setting", "set_setting", "signatures_of"]


@dataclass(frozen=True)
class SettingSpec:
    default: Any
    help: str


SETTINGS: dict[str, SettingSpec] = {
    "require_signatures": SettingSpec(False, "publish refuses a package unless it is signed (publish --sign KEY)"),
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _spec(name: str) -> tuple[str, SettingSpec]:
    key = name.replace("-", "_").lower()
    if key not in SETTINGS:
        raise UsageError(f"unknown registry setting '{name}'",
                         hint="known: " + ", ".join(k.replace("_", "-") for k in SETTINGS))
    return key, SETTINGS[key]


def parse_setting(name: str, text: str) -> tuple[str, Any]:
    key, spec = _spec(name)
    if isinstance(spec.default, bool):
        low = text.strip().lower()
        if low not in _TRUE | _FALSE:
            raise UsageError(f"{name} takes on or off, not '{text}'", hint=f"czreg setting {name} on")
        return key, low in _TRUE
    return key, text


def get_setting(s: Session, name: str) -> Any:
    key, spec = _spec(name)
    row = s.get(Setting, key)
    return spec.default if row is None else json.loads(row.value)


def set_setting(s: Session, name: str, value: Any, who: str) -> tuple[Any, Any]:
    """Set ``name``; returns (old, new)."""
    key, _ = _spec(name)
    old = get_setting(s, key)
    row = s.get(Setting, key)
    now = datetime.now(UTC)
    if row is None:
        s.add(Setting(name=key, value=json.dumps(value), updated_at=now, updated_by=who))
    else:
        row.value, row.updated_at, row.updated_by = json.dumps(value), now, who
    return old, value


def attach(s: Session, version_id: int, signed: SignedPackage, who: str) -> bool:
    """Store ``signed`` with the version unless this key already signed it (returns whether it was added)."""
    exists = s.scalars(select(Signature.id).where(Signature.version_id == version_id,
                                                  Signature.key_id == signed.key_id)).first()
    if exists is not None:
        return False
    s.add(Signature(version_id=version_id, key_id=signed.key_id, signature=signed.signature.decode(),
                    attestation=signed.attestation.decode(), created_at=datetime.now(UTC), created_by=who))
    return True


def signatures_of(s: Session, version_id: int) -> list[Signature]:
    return list(s.scalars(select(Signature).where(Signature.version_id == version_id).order_by(Signature.id)))


def bound_to(row: Signature, digest: str) -> bool:
    """Whether stored signature ``row`` is about the bytes ``digest`` (see ``signing.bundles_bind``)."""
    from ..sharing.signing import bundles_bind

    return bundles_bind(row.signature.encode(), row.attestation.encode(), digest, row.key_id)
