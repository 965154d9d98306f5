"""Start ``czreg serve`` in a child process on a free loopback port and wait until it answers: for tests,
benchmarks and scripts that need a real server (standard library only).

    with ServerProcess.start("sqlite:////tmp/r/registry.db", "/tmp/r/blobs", public_read=True) as srv:
        RemoteRegistry(srv.url).search()

The wait is bounded; a server that exits or stays silent raises ``RuntimeError`` with the end of its log.
Stopping sends SIGTERM (uvicorn shuts its workers down), then SIGKILL to the process group after a grace.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, registry: str, blob_store: str | None = None, *, public_read: bool = False, workers: int = 1,
              extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, log_path: Path | None = None,
              startup_timeout: float = 90.0) -> ServerProcess:
        port = free_port()
        args = [sys.executable, "-m", "czregistry", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--registry", registry, "--workers", str(workers), "--log-level", "warning", *extra_args]
        if blob_store:
            args += ["--blob-store", blob_store]
        if public_read:
            args.append("--public-read")
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="czreg-serve-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        full_env = {**os.environ, **(env or {})}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)
        srv = cls(f"http://127.0.0.1:{port}", port, proc, log_path)
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"czreg serve exited with {proc.returncode}:\n{srv.log_tail()}")
            if srv._healthy():
                return srv
            if time.monotonic() > deadline:
                srv.stop()
                raise RuntimeError(f"czreg serve did not answer within {startup_timeout:.0f} s:\n{srv.log_tail()}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/api/v1/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # our child's own session: its workers too
                self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
