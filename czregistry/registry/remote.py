"""The registry over HTTP: ``RemoteRegistry`` implements ``records.RegistryClient`` like the local
``Registry``, so every ``czreg`` command that takes ``--registry`` prints the same output and exits with the
same codes against a server (``czreg serve``) as against a local database (``tests/test_registry_contract.py``).
Signatures travel with the version: ``publish --sign`` signs here and sends the bundles and the public key
after the package bytes; ``pull --key`` fetches the stored bundles and verifies them against the downloaded
bytes before the file appears.

Standard library only (``http.client``): a partner needs no extra package to pull. Uploads stream from the
file (hashed first, the digest sent along and checked by the server); downloads stream to a temp file
beside the destination while being hashed and are renamed into place only when the SHA-256 matches, so a
corrupt or truncated response leaves no file. Errors come back as JSON naming the library error, which is
raised again here (same message, hint and exit code); 401/403 become ``AuthError`` (exit 9), an unreachable
server or an unusable answer ``RemoteError`` (exit 11).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from .. import __version__, errors
from ..errors import AuthError, CzregError, InvalidPackageError, RegistryError, RemoteError, UsageError
from .location import is_loopback, is_remote

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .api import Registry
    from .records import (
        Evidence,
        PublishResult,
        PullResult,
        RecordedEvaluation,
        Resolved,
        StoredSignature,
    )
    from .versions import Bump

__all__ = ["RemoteLocation", "RemoteRegistry", "connect"]

CHUNK = 1 << 20
TOKEN_ENV = "CZREG_TOKEN"


def connect(registry: str | None = None, blob_store: str | None = None, *,
            token: str | None = None, create: bool = True) -> Registry | RemoteRegistry:
    """The registry at ``registry`` (or ``CZREG_REGISTRY``, or the per-user default): a ``RemoteRegistry``
    for an ``http(s)://`` URL, else the local ``Registry`` (``open_registry``)."""
    text = registry or os.environ.get("CZREG_REGISTRY")
    if is_remote(text):
        assert text is not None
        return RemoteRegistry(text, token=token)
    from .api import open_registry

    return open_registry(registry, blob_store, create=create)


@dataclass(frozen=True)
class RemoteLocation:
    url: str

    def display(self) -> str:
        return self.url


class _Response:
    """An open response and its connection (closed together)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn, self.resp = conn, resp

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


class RemoteRegistry:
    """A registry server at ``url`` (``http://host:8700`` or ``https://host/prefix``); the token comes
    from ``token`` or ``CZREG_TOKEN``. One connection per call, so an instance is safe to share between
    threads. ``warnings`` holds what a caller should tell the user (plain HTTP to another machine)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"invalid registry server URL '{url}'", hint="e.g. https://models.example.org")
        self.url = url.rstrip("/")
        self.location = RemoteLocation(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.timeout = timeout
        self.warnings: list[str] = []
        if not self._https and not is_loopback(self._host):
            self.warnings.append(
                f"plain HTTP to {self._host}: the token and the packages travel unencrypted and can be altered "
                "on the way (pulls are still verified); put the server behind a TLS proxy and use https://")

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP --------------------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=ssl.create_default_context(), blocksize=CHUNK)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout, blocksize=CHUNK)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"User-Agent": f"czregistry/{__version__}", "Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return {**h, **(extra or {})}

    def _open(self, method: str, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None, *,
              body: Any = None, headers: dict[str, str] | None = None) -> _Response:
        """Send a request; return the response if it is 2xx, else raise the error it carries."""
        items = params.items() if isinstance(params, dict) else (params or [])
        query = urlencode([(k, str(v).lower() if isinstance(v, bool) else v) for k, v in items if v is not None])
        target = f"{self._prefix}/api/v1{path}" + (f"?{query}" if query else "")
        conn = self._connection()
        try:
            # The server may answer before reading the whole body (over its size limit): read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, target, body=body, headers=self._headers(headers))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RemoteError(f"cannot reach the registry server {self.url}: {_reason(exc)}",
                              hint="check the URL, your network, and that 'czreg serve' is running there") from None
        if 200 <= resp.status < 300:
            return _Response(conn, resp)
        try:
            raw = resp.read(1 << 20)
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            resp.close()
            conn.close()
        raise self._error(resp.status, raw)

    def _error(self, status: int, raw: bytes) -> CzregError:
        try:
            body = json.loads(raw)["error"]
            message, hint = str(body["message"]), body.get("hint")
        except (ValueError, KeyError, TypeError):
            first = raw.decode("utf-8", "replace").strip().splitlines()[:1]
            return RemoteError(f"the registry server {self.url} answered HTTP {status}"
                               + (f": {first[0][:200]}" if first else ""),
                               hint="is this URL a czreg serve server? (a proxy in between may have answered)")
        if status in (401, 403):
            return AuthError(message, hint=hint)
        if body.get("type") == "InvalidPackageError":
            return InvalidPackageError(message, hint=hint, report=body.get("report"))
        cls = getattr(errors, str(body.get("type")), None)
        if isinstance(cls, type) and issubclass(cls, CzregError) and cls not in (InvalidPackageError,):
            return cls(message, hint=hint)
        err = CzregError(message, hint=hint)
        if isinstance(body.get("exit_code"), int):
            err.exit_code = body["exit_code"]
        return err

    def _json(self, method: str, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None,
              payload: Any = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        r = self._open(method, path, params, body=body, headers=headers)
        try:
            raw = r.resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteError(f"the registry server {self.url} broke off its answer: {_reason(exc)}",
                              hint="try again") from None
        finally:
            r.close()
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteError(f"the registry server {self.url} sent something that is not JSON",
                              hint="is this URL a czreg serve server?") from None

    # --- the Registry methods the CLI uses ---------------------------------------------------------------

    def publish(self, path: Path | str, *, name: str | None = None, version: str | None = None,
                bump_part: Bump | None = None, static: bool = False, allow_invalid: bool = False,
                note: str | None = None, tags: dict[str, str] | None = None, smoke: bool = False,
                sign_key: Path | str | None = None, evidence: Evidence | None = None) -> PublishResult:
        """Upload ``path``; the server admits it (validates, smoke-tests, checks the signature) and publishes
        (or refuses with the findings). With ``sign_key`` the package is admitted and signed here first, and
        the signature, attestation and public key travel after the package bytes in the same request."""
        from ..report import Report
        from .records import PublishResult

        path = Path(path)
        if (version is None) == (bump_part is None):
            raise UsageError("give exactly one of --version and --bump", hint="e.g. --version 1.2.0 or --bump minor")
        with contextlib.ExitStack() as stack:
            if sign_key is not None and (evidence is None or evidence.signed is None):
                from ..admission import PackageSnapshot, admit
                from ..package import require_package_file

                require_package_file(path)
                snapshot = stack.enter_context(PackageSnapshot.read(path))  # signed and uploaded: the same bytes
                evidence = admit(snapshot, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid,
                                 sign_key=sign_key)
            held = evidence.snapshot if evidence is not None and evidence.snapshot is not None else None
            signed = evidence.signed if evidence is not None else None
            tail = [signed.signature, signed.attestation, signed.public_key] if signed is not None else []
            try:
                if held is not None and not held.closed:
                    digest, size = held.sha256, held.size
                else:
                    h, size = hashlib.sha256(), 0
                    with path.open("rb") as fh:
                        while chunk := fh.read(CHUNK):
                            h.update(chunk)
                            size += len(chunk)
                    digest = h.hexdigest()
                if signed is not None and signed.sha256 != digest:
                    raise UsageError(f"{path.name} changed after it was signed; not published", hint="publish again")
                params: list[tuple[str, Any]] = [("name", name), ("version", version), ("bump", bump_part),
                                                 ("static", static), ("allow_invalid", allow_invalid),
                                                 ("smoke", smoke), ("note", note)]
                params += [("tag", f"{k}={v}") for k, v in (tags or {}).items()]
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Length": str(size + sum(map(len, tail))),
                           "X-Czreg-Filename": path.name, "X-Czreg-Sha256": digest}
                if signed is not None:
                    headers.update({"X-Czreg-Package-Length": str(size),
                                    "X-Czreg-Signature-Length": str(len(tail[0])),
                                    "X-Czreg-Attestation-Length": str(len(tail[1])),
                                    "X-Czreg-Public-Key-Length": str(len(tail[2]))})
                with contextlib.ExitStack() as reading:
                    body: IO[bytes] = held.stream() if held is not None and not held.closed else \
                        reading.enter_context(path.open("rb"))
                    r = self._open("POST", "/publish", params, body=_body(body, size, tail), headers=headers)
            except OSError as exc:
                raise UsageError(f"cannot read package {path}: {exc.strerror or exc}", hint="check the path") from None
        try:
            out = json.loads(r.resp.read())
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise RemoteError(f"the registry server {self.url} broke off its answer to the upload: {_reason(exc)}",
                              hint="czreg show the model to see whether it was published") from None
        finally:
            r.close()
        return PublishResult(out["status"], out["version"], Report.from_dict(out["report"]),
                             Report.from_dict(out["smoke"]) if out.get("smoke") else None)

    def resolve(self, requirement: str, *, prereleases: bool | None = None) -> Resolved:
        from .records import Resolved

        out = self._json("GET", "/resolve", {"requirement": requirement, "pre": prereleases})
        return Resolved(out["version"], out["warnings"])

    def pull(self, requirement: str, dest: Path | str | None = None, *,
             prereleases: bool | None = None, key: Path | str | None = None, force: bool = True) -> PullResult:
        """Resolve on the server, then stream the blob to a temp file beside ``dest`` while hashing; the
        file gets its name only if the SHA-256 is the version's digest."""
        from ..package import atomic_output, check_overwrite
        from .api import pull_target
        from .records import PullResult, signature_for

        resolved = self.resolve(requirement, prereleases=prereleases)
        v = resolved.version
        digest, out, label = pull_target(v, dest)
        check_overwrite(out, force=force, sha256=digest)  # identical bytes are not an overwrite
        stored = signature_for(self, v, key, label) if key is not None else None
        verified = None
        r = self._open("GET", f"/blobs/sha256:{digest}", headers={"Accept": "application/octet-stream"})
        h, got = hashlib.sha256(), 0
        declared = r.resp.getheader("Content-Length")
        expected = int(declared) if declared and declared.isdigit() else None
        try:
            with atomic_output(out) as tmp, tmp.open("wb") as fh:
                try:
                    while chunk := r.resp.read(CHUNK):
                        h.update(chunk)
                        fh.write(chunk)
                        got += len(chunk)
                    # read(n) reports a connection closed early as a plain end of data: count the bytes.
                    if expected is not None and got != expected:
                        raise http.client.IncompleteRead(b"", expected - got)
                except (OSError, http.client.HTTPException) as exc:
                    raise RemoteError(f"the download of {label} broke off after {got} bytes: {_reason(exc)}; "
                                      "nothing written", hint="try again; if it persists, tell the registry's "
                                      "administrator (czreg verify on the server)") from None
                fh.flush()
                if h.hexdigest() != digest:
                    raise RegistryError(f"the blob of {label} is corrupt: sha256 {h.hexdigest()[:12]}... != "
                                        f"{digest[:12]}...; nothing written",
                                        hint="try again; if it persists, tell the registry's administrator")
                fh.close()
                if stored is not None and key is not None:
                    verified = _verify_pulled(tmp, out, key, stored)
        finally:
            r.close()
        return PullResult(v, out, resolved.warnings, verified)

    def signatures(self, requirement: str, *, prereleases: bool | None = None) -> list[StoredSignature]:
        """The stored signatures of one version, with both bundles (``GET /signatures``)."""
        out: list[StoredSignature] = self._json("GET", "/signatures", {"requirement": requirement,
                                                                        "pre": prereleases})
        return out

    # --- evaluations and settings --------------------------------------------------------------------------

    def record_evaluation(self, data: dict[str, Any]) -> RecordedEvaluation:
        out: RecordedEvaluation = self._json("POST", "/evaluations", None, data)
        return out

    def find_evaluations(self, package_digest: str, dataset_digest: str | None = None,
                         definition: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._json("GET", "/evaluations", {
            "package": package_digest, "dataset": dataset_digest, "definition": definition})
        return out

    def setting(self, name: str) -> Any:
        return self._json("GET", f"/settings/{_q(name)}")["value"]

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/settings")
        return out

    def set_setting(self, name: str, value: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("PUT", f"/settings/{_q(name)}", None, {"value": value})
        return out

    def show(self, requirement: str, *, prereleases: bool | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/show", {"requirement": requirement})
        return out

    def search(self, *, name: str | None = None, model_type: str | None = None, class_name: str | None = None,
               tag: str | None = None, alias: str | None = None, all_versions: bool = False,
               include_yanked: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._json("GET", "/models", {
            "name": name, "type": model_type, "class": class_name, "tag": tag, "alias": alias,
            "all_versions": all_versions, "yanked": include_yanked, "limit": limit})
        return out

    def history(self, name: str | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._json("GET", "/history", {"name": name, "limit": limit})
        return out

    def alias_set(self, name: str, alias: str, version: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("PUT", f"/models/{_q(name)}/aliases/{_q(alias)}", None,
                                         {"version": version})
        return out

    def alias_remove(self, name: str, alias: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("DELETE", f"/models/{_q(name)}/aliases/{_q(alias)}")
        return out

    def aliases(self, name: str) -> dict[str, str]:
        out: dict[str, str] = self._json("GET", f"/models/{_q(name)}/aliases")
        return out

    def tag(self, requirement: str, set_tags: dict[str, str], remove: list[str] | None = None) -> dict[str, str]:
        out: dict[str, str] = self._json("POST", "/tags", {"requirement": requirement},
                                         {"set": set_tags, "remove": remove or []})
        return out

    def yank(self, name: str, version: str, reason: str) -> dict[str, Any]:
        if not reason.strip():
            raise UsageError("a yank needs a reason", hint="--reason 'wrong normalisation'")
        out: dict[str, Any] = self._json("POST", f"/models/{_q(name)}/versions/{_q(version)}/yank", None,
                                         {"reason": reason})
        return out

    def unyank(self, name: str, version: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("POST", f"/models/{_q(name)}/versions/{_q(version)}/unyank")
        return out

    def whoami(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/whoami")
        return out

    # --- administration (an admin token) ------------------------------------------------------------------

    def verify(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("POST", "/admin/verify")
        return out

    def gc(self, *, dry_run: bool = False, temp_grace_s: float = 3600.0) -> dict[str, Any]:
        out: dict[str, Any] = self._json("POST", "/admin/gc", {"dry_run": dry_run})
        return out

    def purge(self, name: str, version: str, *, reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self._json("DELETE", f"/models/{_q(name)}/versions/{_q(version)}", {"reason": reason})
        return out


def _body(fh: Any, size: int, tail: list[bytes]) -> Any:
    """The upload: the package (streamed from ``fh``), then the signature bundles and public key."""
    if not tail:
        return fh

    def chunks() -> Iterator[bytes]:
        left = size
        while left > 0 and (chunk := fh.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk
        yield from tail

    return chunks()


def _verify_pulled(tmp: Path, out: Path, key: Path | str, stored: tuple[bytes, bytes]) -> dict[str, Any]:
    """Verify the downloaded bytes against the stored signature (``SignatureError``, exit 10, writes
    nothing) and write the bundles beside the package."""
    from ..package import atomic_output
    from ..sharing.signing import attestation_path, signature_path, verify_package

    sig, att = stored
    checked = verify_package(tmp, key, signature=sig, attestation=att, name=out.name).to_dict()
    for data, target in ((sig, signature_path(out)), (att, attestation_path(out))):
        with atomic_output(target) as t:
            t.write_bytes(data)
    return {k: val for k, val in checked.items() if k not in ("report", "smoke")} | {"package": str(out)}


def _q(part: str) -> str:
    return quote(part, safe="")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"incomplete response ({exc.expected} more bytes expected)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


if TYPE_CHECKING:
    from .records import RegistryClient

    def _both_implement(local: Registry, remote: RemoteRegistry) -> tuple[RegistryClient, RegistryClient]:
        """mypy checks here that both registries keep the contract (``records.RegistryClient``)."""
        return local, remote
