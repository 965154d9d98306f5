"""Targets the sandbox tests run inside ``czregistry.server.sandbox``'s child: they report what the child sees
(standard library only, so the child starts fast)."""

from __future__ import annotations

import os
import resource
import socket
import tempfile
from pathlib import Path
from typing import Any


def facts(port: int) -> dict[str, Any]:
    """The child's folder, environment, limits and reach: what a hostile model would find."""
    Path("left-behind.txt").write_text("written by the sandboxed child")
    status = Path("/proc/self/status").read_text()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        network = "reached"
    except OSError as exc:
        network = f"refused: {exc}"
    return {"cwd": str(Path.cwd()), "home": os.environ.get("HOME"), "tmpdir": tempfile.gettempdir(),
            "env": sorted(os.environ), "umask": os.umask(0o077),
            "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
            "rlimit_core": resource.getrlimit(resource.RLIMIT_CORE)[0],
            "rlimit_cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "rlimit_fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
            "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "no_new_privs": "NoNewPrivs:\t1" in status, "network": network,
            "fds": sorted(int(p.name) for p in Path("/proc/self/fd").iterdir())}
