"""A real CNCF distribution registry (Debian's ``docker-registry``) on loopback, for tests and benchmarks.

``.ci/run`` installs the package; without the binary the OCI tests are skipped with a reason.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BINARY", "free_port", "run_registry"]

BINARY = shutil.which("docker-registry") or shutil.which("registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_registry(folder: Path, *, users: dict[str, str] | None = None, start_timeout: float = 20.0) -> Iterator[str]:
    """Start a registry storing into ``folder`` (htpasswd auth when ``users`` is given); yields
    ``127.0.0.1:PORT`` and stops it (terminate, then kill after 5 s) on exit."""
    assert BINARY is not None, "docker-registry is not installed (apt-get install docker-registry)"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if users:
        import bcrypt

        htpasswd = folder / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                                    for u, p in users.items()))
        auth = f"auth:\n  htpasswd:\n    realm: czreg-test\n    path: {htpasswd}\n"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth)
    log = (folder / "registry.log").open("wb")
    proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
                break
            except urllib.error.HTTPError as exc:  # 401: up, and asking for credentials
                if exc.code == 401:
                    break
                raise
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = (folder / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {why}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
