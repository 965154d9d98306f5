"""The ASGI application of ``czreg serve``: the registry's library API under ``/api/v1/``, documented by
OpenAPI at ``/openapi.json``, plus the web pages of ``web``.

Every promise of the local registry holds over the network because the server *is* the local registry:
each request calls the same ``Registry`` methods the CLI calls (in a worker thread; they are synchronous),
inside ``acting_as`` so the audit trail names the token and the client's address.

Uploads stream to a temp file (hashed on the way, refused past ``max_upload_bytes``), are checked against
the digest the client announced, and are then published, which validates them before anything is stored;
a refused package comes back as HTTP 422 with its findings. Downloads are verified before the first byte
is sent (unless this process already verified the same unchanged file) and hashed again while they stream;
the last chunk is held back until that hash matches, so a blob that changes on disk is never delivered
whole: the connection is cut, and the client (which verifies too) keeps nothing.
"""

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..admission import Validator, check_package
from ..errors import (
    AuthError,
    CzregError,
    InvalidPackageError,
    RegistryError,
    RemoteError,
    SignatureError,
    UsageError,
)
from ..registry.api import Registry, acting_as, package_model_name
from ..registry.location import resolve_location
from ..registry.store import CHUNK
from ..registry.tokens import TokenInfo
from ..registry.versions import canonical_name, parse_requirement, parse_version
from ..report import Finding, Report
from .auth import Auth, TokenForbidden
from .sandbox import SandboxLimits, sandboxed_validator
from .settings import COOKIE, ServerSettings

if TYPE_CHECKING:
    from ..sharing.signing import SignedPackage

__all__ = ["COOKIE", "MAX_LIMIT", "Auth", "app_from_env", "create_app", "error_body", "http_status",
           "upload_validator"]

log = logging.getLogger("czregistry.server")

API = "/api/v1"
#: Largest ``limit`` a listing accepts (SQLite's integers end at 2**63; nobody pages a million rows).
MAX_LIMIT = 1_000_000


def http_status(exc: CzregError, method: str = "GET") -> int:
    """The HTTP status for a library error (the body carries its type and exit code for the CLI)."""
    explicit = getattr(exc, "http_status", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(exc, TokenForbidden):
        return 403
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, InvalidPackageError):
        return 422
    if isinstance(exc, RegistryError):
        return 404 if method in ("GET", "HEAD") else 409
    return 400


def error_body(exc: CzregError, location: str | None = None) -> dict[str, Any]:
    """The JSON of an error; ``location`` (the database URL, which clients need not see) is left out."""
    message = exc.message.replace(f"registry {location}", "the server's registry") if location else exc.message
    body: dict[str, Any] = {"type": "AuthError" if isinstance(exc, AuthError) else type(exc).__name__,
                            "message": message, "hint": exc.hint, "exit_code": exc.exit_code}
    if isinstance(exc, InvalidPackageError) and exc.report is not None:
        body["report"] = exc.report
    return body


def _validation_message(exc: RequestValidationError) -> str:
    """One line for a request FastAPI could not read: where (query parameter, body field) and what is wrong.
    The input itself is not echoed (it may be megabytes)."""
    errors = exc.errors()
    if not errors:
        return "the request is malformed"
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error")
        return "the request body is not valid JSON" + (f" ({why})" if why else "")
    where, field = (loc[0], ".".join(loc[1:])) if loc else ("request", "")
    place = {"query": f"query parameter '{field}'", "path": f"path parameter '{field}'",
             "header": f"header '{field}'", "cookie": f"cookie '{field}'"}.get(where)
    if place is None:
        place = "the request body" + (f" field '{field}'" if field and field != "0" else "")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{place}: {str(first.get('msg', 'invalid'))[:300]}{more}"


def upload_validator(settings: ServerSettings, static: bool, smoke: bool) -> Validator:
    """How an upload is checked under ``settings.upload_validation``. ``static``: static checks here, and
    never the model (a client's request for model checks gets an info finding saying so; one for a smoke
    test is refused). ``sandbox``: a request for static checks only runs here too (the model is not
    loaded); model checks and smoke tests run in ``czregistry.server.sandbox``."""
    if settings.upload_validation == "static":
        if smoke:
            raise UsageError("this server checks uploads statically and runs no smoke tests "
                             "(czreg serve --upload-validation static)", hint="publish without --smoke")

        def static_only(path: Path, _static: bool, _smoke: bool) -> tuple[Report, Report | None]:
            report, _ = check_package(path, True, False)
            if not _static:
                report.add(Finding.info("server.static_only", "the server ran the static checks only; the model "
                                        "was not loaded (czreg serve --upload-validation static)",
                                        hint="run 'czreg validate' on the package for the model checks"))
            return report, None

        return static_only
    if static and not smoke:
        return check_package
    return sandboxed_validator(SandboxLimits(wall_s=settings.sandbox_timeout_s, memory_mb=settings.sandbox_memory_mb),
                               parent_dir=settings.upload_dir)


def _with_status(exc: CzregError, status: int) -> CzregError:
    exc.http_status = status  # type: ignore[attr-defined]
    return exc


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _acting(token: TokenInfo | None, request: Request) -> Any:
    name = token.name if token else "anonymous"
    return acting_as(f"token:{name}", _client(request), token=name)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_filename(name: str | None) -> str:
    """The client's file name (it becomes the version's ``source``), reduced to a harmless base name."""
    base = _SAFE_NAME.sub("-", (name or "").replace("\\", "/").rsplit("/", 1)[-1]).strip("-.")
    return base[:200] or "package.czann"


class _VerifiedCache:
    """Blobs this process hashed and found intact, keyed by (inode, size, mtime): re-hashing a large model
    on every download would double its cost. A file changed in place gets a new mtime (and is re-hashed);
    one whose mtime was forged back is still caught by the hash taken while it streams."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def ok(self, digest: str, st: os.stat_result) -> bool:
        with self._lock:
            return self._seen.get(digest) == (st.st_ino, st.st_size, st.st_mtime_ns)

    def add(self, digest: str, st: os.stat_result) -> None:
        with self._lock:
            if len(self._seen) > 100_000:
                self._seen.clear()
            self._seen[digest] = (st.st_ino, st.st_size, st.st_mtime_ns)


class AliasBody(BaseModel):
    version: str


class TagBody(BaseModel):
    set: dict[str, str] = {}
    remove: list[str] = []


class YankBody(BaseModel):
    reason: str


class SettingBody(BaseModel):
    value: str


#: headers of a signed upload: the body is the package, then the signature, attestation and public key
_FRAMING = ("x-czreg-package-length", "x-czreg-signature-length", "x-czreg-attestation-length",
            "x-czreg-public-key-length")


def _signed_framing(request: Request) -> tuple[int, int, int, int] | None:
    """The lengths of a signed upload's parts, bounded (bundles and key are a few KB), or None."""
    from ..sharing.signing import MAX_BUNDLE_BYTES, MAX_KEY_BYTES

    values = [request.headers.get(h) for h in _FRAMING]
    if all(v is None for v in values):
        return None
    if not all(v is not None and v.isdigit() and len(v) < 19 for v in values):
        raise UsageError("a signed upload needs all four X-Czreg-*-Length headers (decimal)",
                         hint="publish with czreg publish --sign")
    n = tuple(int(v) for v in values if v is not None)
    if n[1] > MAX_BUNDLE_BYTES or n[2] > MAX_BUNDLE_BYTES or n[3] > MAX_KEY_BYTES:
        raise SignatureError("the signature, attestation or public key of the upload is too large; nothing stored",
                             hint="a bundle is a few KB; sign the package with czreg publish --sign")
    return n[0], n[1], n[2], n[3]


def _upload_signature(tail: bytes, framing: tuple[int, int, int, int], digest: str,
                      folder: Path) -> "tuple[SignedPackage, Path]":
    """The signature that came with an upload, and its public key as a file (``admit`` verifies both)."""
    from ..sharing.signing import SignedPackage

    s_len, a_len = framing[1], framing[2]
    sig, att, pem = tail[:s_len], tail[s_len:s_len + a_len], tail[s_len + a_len:]
    key_file = folder / "signer.pub"
    key_file.write_bytes(pem)
    return SignedPackage(digest, hashlib.sha256(pem).hexdigest(), sig, att, pem), key_file


async def _bounded_json(request: Request, limit: int) -> Any:
    """A JSON request body of at most ``limit`` bytes."""
    import json

    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _with_status(RemoteError(f"the request body is over {limit} bytes", hint="send less"), 413)
    try:
        return json.loads(raw)
    except ValueError:
        raise UsageError("the request body is not valid JSON") from None


def create_app(settings: ServerSettings | None = None, reg: Registry | None = None) -> FastAPI:
    """The application over ``reg`` (opened from ``settings`` when not given)."""
    settings = settings or ServerSettings()
    if reg is None:
        reg = Registry(resolve_location(settings.registry, settings.blob_store))
    registry = reg
    auth = Auth(registry, settings)
    verified = _VerifiedCache()

    app = FastAPI(
        title="czregistry", version=__version__, docs_url=None, redoc_url=None,  # /docs: our page, no CDN
        description="A registry of CZANN/CZMODEL model packages: publish, pull, aliases, yanks, audit trail. "
                    "Send `Authorization: Bearer <token>` (tokens: `czreg token create` on the server). "
                    "Errors are JSON: `{\"error\": {\"type\", \"message\", \"hint\", \"exit_code\"}}`.")
    app.state.registry = registry
    app.state.settings = settings

    @app.exception_handler(CzregError)
    async def _czreg_error(request: Request, exc: CzregError) -> Response:
        return _error_response(request, exc, http_status(exc, request.method))

    def _error_response(request: Request, exc: CzregError, status: int) -> Response:
        headers = {"WWW-Authenticate": 'Bearer realm="czregistry"'} if status == 401 else None
        if request.url.path.startswith(API) or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"error": error_body(exc, registry.location.display())}, status_code=status,
                                headers=headers)
        from .web import error_page

        return error_page(exc, status, settings.public_read)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(request, UsageError(_validation_message(exc), hint="see /openapi.json (or /docs) "
                                                   "for what this endpoint takes"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path[:200]
        if exc.status_code == 404:
            message, hint = f"no such page or endpoint: {path}", "see /docs for the endpoints of this server"
        elif exc.status_code == 405:
            message, hint = f"{request.method[:10]} is not allowed on {path}", "see /docs for the methods it takes"
        else:
            message, hint = f"{path}: {str(exc.detail)[:300]}", "see /docs"
        response = _error_response(request, RemoteError(message, hint=hint), exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # uvicorn logs the traceback once (the exception goes on to it); here only the line that names the request
        log.error("unexpected error in %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse({"error": {"type": "ServerError", "message": f"internal server error: {type(exc).__name__}",
                                       "hint": "see the server's log", "exit_code": RemoteError.exit_code}},
                            status_code=500)

    # --- reading ---------------------------------------------------------------------------------------

    @app.get(f"{API}/health", tags=["server"])
    def health() -> dict[str, Any]:
        """No token needed: for load balancers and start-up checks."""
        return {"ok": True, "czregistry_version": __version__, "public_read": settings.public_read}

    @app.get(f"{API}/whoami", tags=["server"])
    def whoami(request: Request) -> dict[str, Any]:
        token = auth.require(request, "read")
        if token is None:
            return {"token": None, "scope": "read", "model": None}
        return {"token": token.name, "scope": token.scope, "model": token.model_pattern}

    @app.get(f"{API}/models", tags=["read"])
    def list_models(request: Request, name: str | None = None, type: str | None = None,
                    class_name: str | None = Query(None, alias="class"), tag: str | None = None,
                    alias: str | None = None, all_versions: bool = False, yanked: bool = False,
                    limit: int | None = Query(None, ge=1, le=MAX_LIMIT)) -> list[dict[str, Any]]:
        """Like ``czreg list``: the newest version of each model (or every version), filtered."""
        token = auth.require(request, "read")
        rows = registry.search(name=name, model_type=type, class_name=class_name, tag=tag, alias=alias,
                               all_versions=all_versions, include_yanked=yanked, limit=limit)
        return [r for r in rows if token is None or token.allows("read", r["name"])]

    @app.get(f"{API}/show", tags=["read"])
    def show(request: Request, requirement: str) -> dict[str, Any]:
        """Like ``czreg show``: a model with its versions, or one version in full (with its report)."""
        token = auth.require(request, "read", parse_requirement(requirement).name)
        info = registry.show(requirement)
        auth.check_model(token, info["canonical_name"])
        return info

    @app.get(f"{API}/resolve", tags=["read"])
    def resolve(request: Request, requirement: str, pre: bool | None = None) -> dict[str, Any]:
        """The version a requirement (``name>=1,<2``, ``name@alias``, ``sha256:...``) stands for."""
        token = auth.require(request, "read", parse_requirement(requirement).name)
        resolved = registry.resolve(requirement, prereleases=pre)
        auth.check_model(token, resolved.version["canonical_name"])
        return {"version": resolved.version, "warnings": resolved.warnings}

    @app.get(f"{API}/history", tags=["read"])
    def history(request: Request, name: str | None = None, limit: int | None = Query(None, ge=1, le=MAX_LIMIT)
                ) -> list[dict[str, Any]]:
        """The audit trail, newest first."""
        token = auth.require(request, "read", name)
        events = registry.history(name, limit=limit)
        return [e for e in events if token is None or token.allows("read", e["model"])]

    @app.get(f"{API}/models/{{name}}/aliases", tags=["read"])
    def aliases(request: Request, name: str) -> dict[str, str]:
        auth.require(request, "read", name)
        return registry.aliases(name)

    def _blob_response(digest: str, label: str, filename: str | None) -> Response:
        try:
            fh = registry.store.open(digest)
        except FileNotFoundError:
            raise _with_status(RegistryError(
                f"the blob of {label} (sha256:{digest[:12]}) is missing from the server's blob store",
                hint="tell the registry's administrator (czreg verify on the server)"), 500) from None
        st = os.fstat(fh.fileno())
        if not verified.ok(digest, st):
            h = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
            if h.hexdigest() != digest:
                fh.close()
                log.error("refusing to serve %s: blob sha256:%s is corrupt", label, digest)
                raise _with_status(RegistryError(
                    f"the blob of {label} is corrupt on the server (sha256 {h.hexdigest()[:12]}... != "
                    f"{digest[:12]}...); nothing written", hint="tell the registry's administrator "
                    "(czreg verify on the server)"), 500)
            verified.add(digest, st)
            fh.seek(0)

        def stream() -> Iterator[bytes]:
            h = hashlib.sha256()
            with fh:
                held = fh.read(CHUNK)
                while held:
                    h.update(held)
                    nxt = fh.read(CHUNK)
                    if not nxt:
                        break
                    yield held
                    held = nxt
                if h.hexdigest() != digest:  # changed while streaming: cut the connection before the end
                    log.error("blob sha256:%s of %s changed while streaming; response aborted", digest, label)
                    raise RuntimeError(f"blob sha256:{digest} changed while streaming")
                if held:
                    yield held

        headers = {"Content-Length": str(st.st_size), "X-Czreg-Sha256": digest, "Cache-Control": "no-transform"}
        if filename:
            headers["Content-Disposition"] = f'attachment; filename="{_safe_filename(filename)}"'
        return StreamingResponse(stream(), media_type="application/octet-stream", headers=headers)

    @app.get(f"{API}/blobs/sha256:{{digest}}", tags=["read"], response_class=StreamingResponse)
    def blob(request: Request, digest: str) -> Response:
        """The bytes of a version by digest (verified before and while they stream)."""
        token = auth.require(request, "read")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise UsageError("a blob is named by its full sha256 (64 hex digits)")
        v = registry.resolve(f"sha256:{digest}").version
        auth.check_model(token, v["canonical_name"])
        return _blob_response(digest, f"{v['name']} {v['version']}", None)

    @app.get(f"{API}/models/{{name}}/versions/{{version}}/download", tags=["read"],
             response_class=StreamingResponse)
    def download(request: Request, name: str, version: str) -> Response:
        """A version as a file download (the web page's links)."""
        auth.require(request, "read", name)
        v = registry.resolve(f"{name}=={version}").version
        digest = v["digest"].removeprefix("sha256:")
        return _blob_response(digest, f"{v['name']} {v['version']}",
                              f"{v['canonical_name']}-{v['version']}.{v['kind']}")

    # --- writing ---------------------------------------------------------------------------------------

    @app.post(f"{API}/publish", tags=["write"], status_code=200)
    async def publish(request: Request, name: str | None = None, version: str | None = None,
                      bump: str | None = Query(None, pattern="^(major|minor|patch)$"), static: bool = False,
                      allow_invalid: bool = False, smoke: bool = False, note: str | None = None,
                      tag: list[str] = Query([])) -> dict[str, Any]:  # noqa: B008
        """Like ``czreg publish``; the body is the package's bytes (streamed). Headers:
        ``X-Czreg-Filename`` (recorded as the source) and ``X-Czreg-Sha256`` (checked after the upload).
        A package that fails validation is refused with HTTP 422 and its findings."""
        token = await run_in_threadpool(auth.require, request, "publish")
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _with_status(RemoteError(f"the package ({int(declared)} bytes) is over this server's upload "
                                           f"limit of {limit} bytes", hint="ask the administrator to raise "
                                           "--max-upload-mb"), 413)
        tags: dict[str, str] = {}
        for item in tag:
            k, sep, v = item.partition("=")
            if not sep or not k.strip():
                raise UsageError(f"invalid tag '{item}'", hint="write --tag key=value")
            tags[k.strip()] = v.strip()
        if version is not None:
            parse_version(version)  # refused before the upload, not after
        if name is not None:
            canonical_name(name)
        validator = upload_validator(settings, static, smoke)
        tmpdir = Path(tempfile.mkdtemp(prefix="czreg-upload-", dir=settings.upload_dir))
        try:
            path = tmpdir / _safe_filename(request.headers.get("x-czreg-filename"))
            framing = _signed_framing(request)  # (package, signature, attestation, public key) lengths, or None
            package_len = framing[0] if framing else None
            h, size, tail = hashlib.sha256(), 0, bytearray()
            try:
                with path.open("xb") as out:
                    async for chunk in request.stream():
                        if package_len is not None and size + len(chunk) > package_len:
                            keep = max(package_len - size, 0)
                            tail += chunk[keep:]
                            if len(tail) > sum(framing[1:]):  # type: ignore[index]
                                raise UsageError("the upload is longer than its headers say; nothing stored",
                                                 hint="publish again with czreg publish")
                            chunk = chunk[:keep]
                        size += len(chunk)
                        if size > limit:
                            raise _with_status(RemoteError(f"the package is over this server's upload limit of "
                                                           f"{limit} bytes", hint="ask the administrator to raise "
                                                           "--max-upload-mb"), 413)
                        h.update(chunk)
                        out.write(chunk)
            except ClientDisconnect:
                log.warning("upload from %s cut off by the client after %d bytes; nothing stored",
                            _client(request), size)
                raise UsageError("the client disconnected during the upload; nothing stored",  # nobody reads it
                                 hint="publish again") from None
            expected = request.headers.get("x-czreg-sha256")
            if expected and expected.lower() != h.hexdigest():
                raise _with_status(RemoteError(f"the upload arrived damaged (sha256 {h.hexdigest()[:12]}... != "
                                               f"{expected[:12]}...); nothing stored", hint="publish again"), 400)
            if size == 0:
                raise UsageError("the upload is empty", hint="send the package's bytes as the request body")

            digest = h.hexdigest()
            signed, public_key = None, None
            if framing is not None:
                if size != framing[0] or len(tail) != sum(framing[1:]):
                    raise UsageError("the upload is shorter than its headers say; nothing stored",
                                     hint="publish again")
                signed, public_key = _upload_signature(bytes(tail), framing, digest, tmpdir)

            def checked(p: Path, st: bool, sm: bool) -> tuple[Report, Report | None]:
                # stored bytes must be the uploaded ones: a report (from the sandbox) about other bytes is refused,
                # and the blob store checks the bytes it stores against the report's digest
                report, smoke_report = validator(p, st, sm)
                if report.sha256 != digest:
                    raise _with_status(RemoteError(f"the validation report of {p.name} does not describe the uploaded "
                                                   "bytes; nothing stored", hint="see the server's log"), 500)
                return report, smoke_report

            def work() -> dict[str, Any]:
                if token is not None:
                    auth.require(request, "publish", package_model_name(path, name))
                with _acting(token, request):
                    result = registry.publish(path, name=name, version=version, bump_part=bump,  # type: ignore[arg-type]
                                              static=static, allow_invalid=allow_invalid, note=note, tags=tags,
                                              smoke=smoke, validator=checked, signed=signed,
                                              signer_public_key=public_key)
                return {"status": result.status, "version": result.version, "report": result.report.to_dict(),
                        "smoke": result.smoke.to_dict() if result.smoke else None}

            return await run_in_threadpool(work)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    @app.put(f"{API}/models/{{name}}/aliases/{{alias}}", tags=["write"])
    def alias_set(request: Request, name: str, alias: str, body: AliasBody) -> dict[str, Any]:
        token = auth.require(request, "publish", name)
        with _acting(token, request):
            return registry.alias_set(name, alias, body.version)

    @app.delete(f"{API}/models/{{name}}/aliases/{{alias}}", tags=["write"])
    def alias_remove(request: Request, name: str, alias: str) -> dict[str, Any]:
        token = auth.require(request, "publish", name)
        with _acting(token, request):
            return registry.alias_remove(name, alias)

    @app.post(f"{API}/tags", tags=["write"])
    def tag_version(request: Request, requirement: str, body: TagBody) -> dict[str, str]:
        token = auth.require(request, "publish", parse_requirement(requirement).name)
        if token is not None and token.model_pattern is not None:
            auth.check_model(token, registry.resolve(requirement).version["canonical_name"])
        with _acting(token, request):
            return registry.tag(requirement, body.set, body.remove)

    @app.post(f"{API}/models/{{name}}/versions/{{version}}/yank", tags=["write"])
    def yank(request: Request, name: str, version: str, body: YankBody) -> dict[str, Any]:
        token = auth.require(request, "admin", name)
        with _acting(token, request):
            return registry.yank(name, version, body.reason)

    @app.post(f"{API}/models/{{name}}/versions/{{version}}/unyank", tags=["write"])
    def unyank(request: Request, name: str, version: str) -> dict[str, Any]:
        token = auth.require(request, "admin", name)
        with _acting(token, request):
            return registry.unyank(name, version)

    @app.get(f"{API}/signatures", tags=["read"])
    def signatures(request: Request, requirement: str, pre: bool | None = None) -> list[dict[str, Any]]:
        """The stored signatures of one version, with both bundles: what ``czreg pull --key`` verifies."""
        token = auth.require(request, "read", parse_requirement(requirement).name)
        v = registry.resolve(requirement, prereleases=pre).version
        auth.check_model(token, v["canonical_name"])
        return [dict(x) for x in registry.signatures(f"{v['canonical_name']}=={v['version']}")]

    @app.get(f"{API}/evaluations", tags=["read"])
    def evaluations(request: Request, package: str, dataset: str | None = None,
                    definition: str | None = None) -> list[dict[str, Any]]:
        """Recorded evaluations of a package's bytes (``package``: its sha256), oldest first."""
        token = auth.require(request, "read")
        if not re.fullmatch(r"[0-9a-f]{64}", package):
            raise UsageError("a package is named by its full sha256 (64 hex digits)")
        if token is not None and token.model_pattern is not None:
            auth.check_model(token, registry.resolve(f"sha256:{package}").version["canonical_name"])
        return registry.find_evaluations(package, dataset, definition)

    @app.post(f"{API}/evaluations", tags=["write"])
    async def record_evaluation(request: Request) -> dict[str, Any]:
        """Record an evaluation (``czreg evaluate --json``'s output) with its package's versions."""
        token = await run_in_threadpool(auth.require, request, "publish")
        body = await _bounded_json(request, 16 << 20)

        def work() -> dict[str, Any]:
            package = body.get("package") if isinstance(body, dict) else None
            digest = str(package.get("sha256", "")) if isinstance(package, dict) else ""
            if token is not None and token.model_pattern is not None and re.fullmatch(r"[0-9a-f]{64}", digest):
                auth.require(request, "publish", registry.resolve(f"sha256:{digest}").version["canonical_name"])
            with _acting(token, request):
                return dict(registry.record_evaluation(body if isinstance(body, dict) else {}))

        return await run_in_threadpool(work)

    @app.get(f"{API}/settings", tags=["read"])
    def settings_all(request: Request) -> dict[str, Any]:
        auth.require(request, "read")
        return registry.settings()

    @app.get(f"{API}/settings/{{name}}", tags=["read"])
    def setting_one(request: Request, name: str) -> dict[str, Any]:
        auth.require(request, "read")
        return {"name": name, "value": registry.setting(name)}

    @app.put(f"{API}/settings/{{name}}", tags=["admin"])
    def setting_set(request: Request, name: str, body: SettingBody) -> dict[str, Any]:
        """Change a registry-wide setting (``czreg setting NAME VALUE``): an admin token for every model."""
        token = auth.require(request, "admin")
        if token is not None and token.model_pattern is not None:
            raise TokenForbidden(f"token '{token.name}' is limited to models '{token.model_pattern}'; a setting "
                                 "applies to every model", hint="use an admin token for all models")
        with _acting(token, request):
            return registry.set_setting(name, body.value)

    def _whole_registry_admin(request: Request) -> TokenInfo | None:
        token = auth.require(request, "admin")
        if token is not None and token.model_pattern is not None:
            raise TokenForbidden(f"token '{token.name}' is limited to models '{token.model_pattern}'; this "
                                 "concerns the whole registry", hint="use an admin token for all models")
        return token

    @app.post(f"{API}/admin/verify", tags=["admin"])
    def admin_verify(request: Request) -> dict[str, Any]:
        """``czreg verify``: re-hash every blob (an admin token for all models)."""
        _whole_registry_admin(request)
        return registry.verify()

    @app.post(f"{API}/admin/gc", tags=["admin"])
    def admin_gc(request: Request, dry_run: bool = False) -> dict[str, Any]:
        """``czreg gc``: remove unreferenced blobs (an admin token for all models)."""
        _whole_registry_admin(request)
        return registry.gc(dry_run=dry_run)

    @app.delete(f"{API}/models/{{name}}/versions/{{version}}", tags=["admin"])
    def purge(request: Request, name: str, version: str, reason: str | None = None) -> dict[str, Any]:
        """``czreg purge``: delete a version for good (an admin token for this model)."""
        token = auth.require(request, "admin", name)
        with _acting(token, request):
            return registry.purge(name, version, reason=reason)

    from .apidocs import add_docs_route
    from .web import add_web_routes

    add_docs_route(app)

    add_web_routes(app, registry, auth)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory for each worker process: settings from ``CZREG_SERVE_SETTINGS``."""
    return create_app(ServerSettings.from_env())
