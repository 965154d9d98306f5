"""Who a request is, and what it may do: the server's token check. A leaf of ``server``, so the API
(``app``) and the web pages (``web``) both use it without importing each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from ..errors import AuthError
from ..registry.tokens import SCOPES, TokenInfo, authenticate
from .settings import COOKIE, ServerSettings

if TYPE_CHECKING:
    from ..registry.api import Registry

__all__ = ["Auth", "TokenForbidden"]


class TokenForbidden(AuthError):
    """The token is valid but may not do this (scope or model pattern): HTTP 403."""


class Auth:
    """Who a request is. A bearer token in ``Authorization``; for GET and HEAD (the web page, download
    links) also the ``czreg_token`` cookie set by the login form. Writes never accept the cookie, so a
    page elsewhere cannot make a logged-in browser publish or yank (no CSRF)."""

    def __init__(self, reg: Registry, settings: ServerSettings) -> None:
        self.reg = reg
        self.settings = settings

    def identify(self, request: Request) -> TokenInfo | None:
        header = request.headers.get("authorization")
        secret: str | None = None
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("the Authorization header is not 'Bearer <token>'", hint="set CZREG_TOKEN")
            secret = value.strip()
        elif request.method in ("GET", "HEAD"):
            secret = request.cookies.get(COOKIE)
        return authenticate(self.reg, secret) if secret else None

    def require(self, request: Request, scope: str, model: str | None = None) -> TokenInfo | None:
        """The token, checked for ``scope`` (and ``model`` when given); ``None`` for an anonymous reader
        of a ``--public-read`` server. Raises ``AuthError`` (401) or ``TokenForbidden`` (403)."""
        assert scope in SCOPES
        token = self.identify(request)
        if token is None:
            if scope == "read" and self.settings.public_read:
                return None
            raise AuthError("this registry server needs a token" + (" to write" if self.settings.public_read else ""),
                            hint="set CZREG_TOKEN to a token from the registry's administrator (czreg token create)")
        if not token.allows(scope, model):
            try:
                token.require(scope, model)
            except AuthError as exc:
                raise TokenForbidden(exc.message, hint=exc.hint) from None
        return token

    @staticmethod
    def check_model(token: TokenInfo | None, model: str) -> None:
        """For reads resolved first (a digest, a search row): 403 unless the token covers ``model``."""
        if token is not None and not token.allows("read", model):
            raise TokenForbidden(f"token '{token.name}' is limited to models '{token.model_pattern}'",
                                 hint="use a token for this model")
