"""API tokens of the registry server: created and revoked by an administrator with ``czreg token`` on the
server's registry database, presented by clients as ``Authorization: Bearer <token>``.

A token is 32 random bytes (``secrets``), so a plain SHA-256 of it is a safe thing to store: there is no
dictionary to attack, and the server finds the row by hashing what the client sent. The secret itself is
shown once, at creation. Scopes are ordered: ``read`` (list, show, history, pull) < ``publish`` (also
publish, alias, tag) < ``admin`` (also yank, unyank). An optional glob (``nuclei-*``) limits a token to
the models whose canonical names match it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import AuthError, RegistryError, UsageError
from .audit import acting_user, iso_time, utc_now
from .models import Token
from .names import canonical_like, slug
from .records import Transactional

__all__ = ["SCOPES", "TokenInfo", "authenticate", "create_token", "hash_token", "list_tokens", "model_key",
           "revoke_token"]

SCOPES = ("read", "publish", "admin")
PREFIX = "czr_"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def model_key(name: str) -> str:
    """What a model pattern is matched against: the canonical name, also for a display name with spaces
    (``Web Model`` -> ``web-model``, the name ``publish`` files it under)."""
    return canonical_like(slug(name))


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """Who a request is: a token's name, scope and model pattern (``None``: every model)."""

    name: str
    scope: str
    model_pattern: str | None

    def allows(self, scope: str, model: str | None = None) -> bool:
        if SCOPES.index(self.scope) < SCOPES.index(scope):
            return False
        if model is None or self.model_pattern is None:
            return True
        return fnmatch.fnmatchcase(model_key(model), self.model_pattern)

    def require(self, scope: str, model: str | None = None) -> None:
        """Raise ``AuthError`` (HTTP 403) unless this token may do ``scope`` on ``model``."""
        if SCOPES.index(self.scope) < SCOPES.index(scope):
            raise AuthError(f"token '{self.name}' has scope '{self.scope}'; this needs '{scope}'",
                            hint=f"ask the registry's administrator for a token with --scope {scope}")
        if not self.allows(scope, model):
            raise AuthError(f"token '{self.name}' is limited to models '{self.model_pattern}'; "
                            f"'{model}' is not one of them", hint="use a token for this model")


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"invalid token name '{name}'", hint="use letters, digits, '.', '_' and '-' (up to 100)")
    return name


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value


def _describe(t: Token) -> dict[str, Any]:
    expires = _aware(t.expires_at)
    state = "revoked" if t.revoked_at else "expired" if expires is not None and expires <= utc_now() else "active"
    return {"name": t.name, "scope": t.scope, "model": t.model_pattern, "created_at": iso_time(t.created_at),
            "created_by": t.created_by, "expires_at": iso_time(t.expires_at), "revoked_at": iso_time(t.revoked_at),
            "state": state}


def create_token(reg: Transactional, name: str, scope: str, *, model: str | None = None,
                 expires_days: float | None = None, expires_at: datetime | None = None) -> tuple[dict[str, Any], str]:
    """Create a token; return (its description, the secret). The secret is not stored and cannot be shown
    again. ``expires_at`` (tests, scripts) wins over ``expires_days``."""
    _check_name(name)
    if scope not in SCOPES:
        raise UsageError(f"unknown scope '{scope}'", hint="use read, publish or admin")
    if expires_days is not None and expires_days <= 0:
        raise UsageError("--expires must be a positive number of days", hint="e.g. --expires 90")
    pattern = canonical_like(model) if model else None
    if expires_at is None and expires_days is not None:
        expires_at = utc_now() + timedelta(days=expires_days)
    secret = PREFIX + secrets.token_urlsafe(32)

    def txn(s: Session) -> dict[str, Any]:
        existing = s.scalars(select(Token).where(Token.name == name)).first()
        if existing is not None:
            state = "revoked" if existing.revoked_at else "exists"
            raise RegistryError(f"a token named '{name}' already exists ({state}); names are never reused, "
                                "so the audit trail stays unambiguous", hint="choose another name")
        row = Token(name=name, secret_hash=hash_token(secret), scope=scope, model_pattern=pattern,
                    created_at=utc_now(), created_by=acting_user(), expires_at=expires_at)
        s.add(row)
        s.flush()
        return _describe(row)

    return reg.transaction(txn), secret


def list_tokens(reg: Transactional) -> list[dict[str, Any]]:
    with reg.reading() as s:
        return [_describe(t) for t in s.scalars(select(Token).order_by(Token.name))]


def revoke_token(reg: Transactional, name: str) -> dict[str, Any]:
    def txn(s: Session) -> dict[str, Any]:
        row = s.scalars(select(Token).where(Token.name == name)).first()
        if row is None:
            raise RegistryError(f"no token named '{name}'", hint="czreg token list shows the tokens")
        if row.revoked_at is None:
            row.revoked_at, row.revoked_by = utc_now(), acting_user()
        s.flush()
        return _describe(row)

    return reg.transaction(txn)


def authenticate(reg: Transactional, secret: str) -> TokenInfo:
    """The token ``secret`` stands for; ``AuthError`` (HTTP 401) when it is unknown, revoked or expired."""
    with reg.reading() as s:
        row = s.scalars(select(Token).where(Token.secret_hash == hash_token(secret.strip()))).first()
        if row is not None:
            s.expunge(row)
    if row is None:
        raise AuthError("the registry server does not know this token",
                        hint="check CZREG_TOKEN; czreg token list on the server shows the valid ones")
    if row.revoked_at is not None:
        raise AuthError(f"token '{row.name}' was revoked", hint="ask the registry's administrator for a new one")
    expires = _aware(row.expires_at)
    if expires is not None and expires <= utc_now():
        raise AuthError(f"token '{row.name}' expired at {iso_time(expires)}",
                        hint="ask the registry's administrator for a new one")
    return TokenInfo(row.name, row.scope, row.model_pattern)
