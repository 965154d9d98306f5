"""The registry server (``czreg serve``): the registry's library API over HTTP, with tokens and a web page.

``app`` holds the ASGI application (FastAPI, imported only here: ``czreg --help`` never loads it),
``web`` the server-rendered HTML pages, ``settings`` what a worker process needs to start. The client side
is ``czregistry.registry.remote``, which needs only the standard library.
"""

from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings"]
