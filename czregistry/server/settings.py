"""What a server worker needs to start, passed through one environment variable.

uvicorn starts each worker process by importing an application factory, so the settings of ``czreg serve``
travel as JSON in ``CZREG_SERVE_SETTINGS`` rather than as Python objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

__all__ = ["COOKIE", "ENV_VAR", "UPLOAD_VALIDATION", "ServerSettings"]

ENV_VAR = "CZREG_SERVE_SETTINGS"
#: The browser cookie that carries a signed-in token (set by the web page, read by every route).
COOKIE = "czreg_token"
DEFAULT_MAX_UPLOAD_MB = 2048
#: How uploads are checked: "sandbox" runs the model checks (and smoke tests) in a confined child process
#: (``czregistry.server.sandbox``); "static" runs only the static checks and never loads the model.
UPLOAD_VALIDATION = ("sandbox", "static")


@dataclass(frozen=True)
class ServerSettings:
    registry: str | None = None  # registry URL or folder (default: the per-user one)
    blob_store: str | None = None
    public_read: bool = False  # anonymous reads; writes still need a token
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    upload_dir: str | None = None  # where uploads are streamed before validation (default: system temp)
    upload_validation: str = "sandbox"  # one of UPLOAD_VALIDATION
    sandbox_timeout_s: float = 300.0  # wall time of one sandboxed validation
    sandbox_memory_mb: int = 8192  # address space of the sandboxed child (0: unbounded)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServerSettings:
        text = os.environ.get(ENV_VAR)
        return cls(**json.loads(text)) if text else cls()

