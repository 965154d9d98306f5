"""What a server worker needs to start, passed through one environment variable.

uvicorn starts each worker process by importing an application factory, so the settings of ``czreg serve``
travel as JSON in ``CZREG_SERVE_SETTINGS`` rather than as Python objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

__all__ = ["COOKIE", "ENV_VAR", "ServerSettings"]

ENV_VAR = "CZREG_SERVE_SETTINGS"
#: The browser cookie that carries a signed-in token (set by the web page, read by every route).
COOKIE = "czreg_token"
DEFAULT_MAX_UPLOAD_MB = 2048


@dataclass(frozen=True)
class ServerSettings:
    registry: str | None = None  # registry URL or folder (default: the per-user one)
    blob_store: str | None = None
    public_read: bool = False  # anonymous reads; writes still need a token
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    upload_dir: str | None = None  # where uploads are streamed before validation (default: system temp)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServerSettings:
        text = os.environ.get(ENV_VAR)
        return cls(**json.loads(text)) if text else cls()

