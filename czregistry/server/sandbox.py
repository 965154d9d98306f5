"""Run an uploaded package's model checks in a disposable child process, so a hostile graph that the static
checks let through cannot write into the server's folders, read its secrets from the environment, reach the
network (where unprivileged user namespaces work), or take the server's memory and time.

The parent (``run_sandboxed``) makes a private folder, starts ``python -P -s -m czregistry.server.sandbox``
with that folder as its working folder, ``HOME`` and ``TMPDIR``, a minimal environment (no registry URL,
token or database credentials; see ``_KEPT_ENV``), a new session (so the whole process group can be
killed), and - when ``unshare --user --net`` works here - in new user and network namespaces. It sends the job
as JSON on stdin, waits at most ``limits.wall_s`` seconds (then kills the group), reads a bounded answer
from stdout and removes the folder. The child lowers its own limits before it imports anything heavy
(``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE``), sets umask 077,
``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_PDEATHSIG`` (it dies with the server), points file descriptor 1 at
stderr (so nothing a plugin prints can garble the answer) and then calls the target:
``czregistry.admission:check_package`` for uploads.

What this does not do (docs/serving.md, "Threat model"): no seccomp filter and no mount namespace, so the
child can read whatever the server's user can read and write where that user may write (outside the
private folder too); without user namespaces it can also open network connections. A graph that gains
code execution in the child can forge its answer; the parent still stores only bytes whose SHA-256 equals
the upload's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CzregError, InvalidPackageError, RemoteError
from ..report import Report

__all__ = ["VALIDATE_TARGET", "SandboxLimits", "namespaces_available", "run_sandboxed", "sandboxed_validator"]

log = logging.getLogger("czregistry.server")

#: The target that checks an upload in the child (``check_package(path, static, smoke)``).
VALIDATE_TARGET = "czregistry.admission:check_package"
#: Environment variables the child keeps: what Python, the plugins and the numeric libraries need to start.
#: Everything else (CZREG_REGISTRY, CZREG_TOKEN, CZREG_SERVE_SETTINGS, PG*, cloud credentials) is dropped.
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
             "CZREG_PLUGINS", "CZREG_TRACE_PLUGINS", "CZREG_MAX_IMAGE_PIXELS", "CUDA_VISIBLE_DEVICES",
             "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
#: Largest answer read back from the child (a report with many findings is a few hundred KB).
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: Largest file the child may write (a SavedModel unpacked into its temp folder must fit).
MAX_FILE_BYTES = 8 * 1024**3
MAX_OPEN_FILES = 1024
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds of one sandboxed run. ``memory_mb`` bounds the address space (0: no bound; CUDA reserves
    much address space, so GPU validation needs a large value or 0); CPU time is bounded at twice the wall
    time (several threads use it faster than the clock)."""

    wall_s: float = 300.0
    memory_mb: int = 8192

    @property
    def cpu_s(self) -> int:
        return int(self.wall_s * 2) + 10


@functools.cache
def namespaces_available() -> bool:
    """Whether ``unshare --user --net`` starts a process here (unprivileged user namespaces); probed once."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        done = subprocess.run([unshare, "--user", "--net", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _child_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    env.update(HOME=str(work), TMPDIR=str(work), TMP=str(work), TEMP=str(work), PYTHONDONTWRITEBYTECODE="1",
               PYTHONUNBUFFERED="1")
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_sandboxed(target: str, args: list[Any], limits: SandboxLimits, *, label: str = "the package",
                  parent_dir: str | None = None, isolate_network: bool | None = None) -> Any:
    """Call ``target`` (``"module:function"``) with ``args`` (JSON) in a sandboxed child and return what it
    returned (JSON). A ``CzregError`` raised there is raised here again (same type, message and hint). A
    child that runs past ``limits.wall_s``, runs out of memory or CPU time, or dies, raises
    ``InvalidPackageError`` (HTTP 422: the package is refused; nothing is stored); a child that cannot be
    started raises ``RemoteError`` (HTTP 500)."""
    root = Path(tempfile.mkdtemp(prefix="czreg-sandbox-", dir=parent_dir))
    try:
        work = root / "work"
        work.mkdir(mode=0o700)
        answer_path, errors_path = root / "answer.json", root / "stderr.log"
        job = {"target": target, "args": args, "limits": {**asdict(limits), "cpu_s": limits.cpu_s}}
        cmd = [sys.executable, "-P", "-s", "-m", "czregistry.server.sandbox"]
        if isolate_network is None:
            isolate_network = namespaces_available()
        if isolate_network:
            unshare = shutil.which("unshare")
            if unshare:
                cmd = [unshare, "--user", "--net", *cmd]
        started = time.monotonic()
        with answer_path.open("wb") as answer, errors_path.open("wb") as errors:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=answer, stderr=errors, cwd=work,
                                        env=_child_env(work), start_new_session=True, close_fds=True)
            except OSError as exc:
                raise RemoteError(f"cannot start the validation sandbox: {exc.strerror or exc}",
                                  hint="see the server's log") from None
            try:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(json.dumps(job).encode())
                    proc.stdin.close()
                proc.wait(limits.wall_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                log.warning("sandboxed validation of %s stopped after %.0f s (wall-time limit)", label, limits.wall_s)
                raise InvalidPackageError(
                    f"validation of {label} did not finish within the server's limit of {limits.wall_s:g} s; "
                    "it was stopped and nothing was stored",
                    hint="publish a model that runs faster, or ask the administrator to raise --sandbox-timeout"
                ) from None
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # anything the child left running in its group
        elapsed = time.monotonic() - started
        stderr_tail = _tail(errors_path)
        raw = b""
        with contextlib.suppress(OSError), answer_path.open("rb") as fh:
            raw = fh.read(MAX_ANSWER_BYTES + 1)
        if proc.returncode != 0 or not raw or len(raw) > MAX_ANSWER_BYTES:
            raise _died(proc.returncode, stderr_tail, limits, label, elapsed)
        try:
            answer_obj = json.loads(raw)
        except ValueError:
            raise _died(proc.returncode, stderr_tail, limits, label, elapsed) from None
        if not isinstance(answer_obj, dict):
            raise _died(proc.returncode, stderr_tail, limits, label, elapsed)
        if "error" in answer_obj:
            raise _error_from(answer_obj["error"], limits, label)
        return answer_obj.get("result")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _died(code: int | None, stderr_tail: str, limits: SandboxLimits, label: str, elapsed: float) -> CzregError:
    """The error for a child that gave no usable answer, naming the limit it most likely hit."""
    memory = f"{limits.memory_mb} MiB" if limits.memory_mb else "no memory limit"
    if code is not None and code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and elapsed >= limits.cpu_s / 2):
            why = f"used up its CPU-time limit of {limits.cpu_s} s"
        else:
            why = f"was killed by {name} (memory limit: {memory})"
    elif "MemoryError" in stderr_tail or "bad_alloc" in stderr_tail or "Failed to allocate" in stderr_tail:
        why = f"ran out of memory (limit: {memory})"
    else:
        why = f"stopped with exit code {code}" + (f": {_last_line(stderr_tail)}" if stderr_tail else "")
    log.warning("sandboxed validation of %s %s; log tail: %s", label, why, stderr_tail[-500:].replace("\n", " | "))
    return InvalidPackageError(f"validation of {label} {why}; nothing was stored",
                               hint="publish a model that needs less, or ask the administrator to raise "
                                    "--sandbox-memory-mb / --sandbox-timeout")


def _error_from(data: Any, limits: SandboxLimits, label: str) -> CzregError:
    """The child's ``CzregError`` again (its type must be one of ``czregistry.errors``), or a memory error."""
    from .. import errors

    if not isinstance(data, dict):
        return RemoteError("the validation sandbox gave an unusable answer", hint="see the server's log")
    kind, message, hint = str(data.get("type")), str(data.get("message"))[:2000], data.get("hint")
    if kind == "MemoryError":
        memory = f"{limits.memory_mb} MiB" if limits.memory_mb else "no memory limit"
        return InvalidPackageError(f"validation of {label} ran out of memory (limit: {memory}); nothing was stored",
                                   hint="publish a model that needs less memory, or ask the administrator to "
                                        "raise --sandbox-memory-mb")
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, CzregError)):
        cls = InvalidPackageError
    return cls(message, hint=str(hint)[:1000] if hint else None)


def sandboxed_validator(limits: SandboxLimits, *, parent_dir: str | None = None) -> Any:
    """A ``czregistry.admission.Validator`` that runs ``check_package`` in the sandbox."""

    def validator(path: Path, static: bool, smoke: bool) -> tuple[Report, Report | None]:
        out = run_sandboxed(VALIDATE_TARGET, [str(path), static, smoke], limits, label=path.name,
                            parent_dir=parent_dir)
        try:
            report = Report.from_dict(out["report"])
            smoke_report = Report.from_dict(out["smoke"]) if out.get("smoke") is not None else None
        except (KeyError, TypeError, ValueError):
            raise RemoteError("the validation sandbox gave an unusable answer", hint="see the server's log") from None
        return report, smoke_report

    return validator


# --- the child ------------------------------------------------------------------------------------------


def _confine(limits: dict[str, Any], parent: int) -> None:
    """Lower this process's limits (they bind everything it starts too) before any foreign bytes are read."""
    import resource

    def lower(what: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        _, current = resource.getrlimit(what)
        if current != resource.RLIM_INFINITY:
            hard = min(hard, current)
        resource.setrlimit(what, (min(soft, hard), hard))

    memory = int(limits.get("memory_mb") or 0)
    if memory > 0:
        lower(resource.RLIMIT_AS, memory * 1024 * 1024)
    cpu = int(limits.get("cpu_s") or 610)
    lower(resource.RLIMIT_CPU, cpu, cpu + 5)  # SIGXCPU at the soft limit, SIGKILL 5 s later
    lower(resource.RLIMIT_FSIZE, MAX_FILE_BYTES)
    lower(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    lower(resource.RLIMIT_CORE, 0)
    os.umask(0o077)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        # die with the server thread that waits for us (a server stopped mid-validation leaves no orphan)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the server went away before the line above


def _child() -> int:
    parent = os.getppid()
    answer = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the model or a plugin prints goes to the log, never into the answer
    sys.stdout = sys.stderr
    job = json.loads(sys.stdin.read(1024 * 1024))
    _confine(job.get("limits", {}), parent)
    module_name, _, func_name = str(job["target"]).partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(*job.get("args", []))
        if isinstance(result, tuple) and len(result) == 2 and all(r is None or isinstance(r, Report) for r in result):
            result = {"report": result[0].to_dict() if result[0] else None,
                      "smoke": result[1].to_dict() if result[1] else None}
        out: dict[str, Any] = {"result": result}
    except CzregError as exc:
        out = {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
    except MemoryError:
        out = {"error": {"type": "MemoryError", "message": "out of memory", "hint": None}}
    answer.write(json.dumps(out, default=str))
    answer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
