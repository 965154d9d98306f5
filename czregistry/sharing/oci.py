"""Packages as OCI artifacts: push to and pull from any OCI registry (Harbor, GitLab, GitHub, Azure, the CNCF
distribution registry), with the signature, the attestation and the validation report attached as referrers.

Layout (documented in docs/sharing.md):

* the package manifest has ``artifactType`` ``application/vnd.czregistry.package.v1``, the OCI empty config,
  and one layer: the package bytes as they are (digest = the package's SHA-256), media type
  ``application/vnd.czregistry.czann.v1+zip`` (or ``.czmodel.``), titled with the file name;
* each attachment is a manifest whose ``subject`` is the package manifest: the validation report
  (``application/vnd.czregistry.validation-report.v1+json``), the model-signing bundle and the attestation
  bundle (both ``application/vnd.dev.sigstore.bundle.v0.3+json``, told apart by the
  ``dev.sigstore.bundle.predicateType`` annotation, as cosign does).

Every manifest is serialised canonically (sorted keys, no spaces, no timestamps), so the same package pushed
twice gets the same digest. Attachments are found through the OCI 1.1 referrers API, or, on registries
without it (distribution 2.x), through the referrers tag schema: an image index tagged ``sha256-<hex>``.

HTTP goes through oras-py's registry client (repository URLs, Docker config and credential helpers, token
and basic auth backends, its request path and upload-location handling). We add what oras-py 0.2 lacks or
gets in the way of: bounded timeouts instead of its retry loop (which sleeps up to ~2 minutes silently on a
dead host), answering Basic challenges (htpasswd registries) up front, one streamed PUT per blob (its
monolithic upload reads the whole file into memory), canonical manifests, and the referrers logic.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OciError, UsageError, first_line
from .signing import BUNDLE_MEDIA_TYPE, MAX_BUNDLE_BYTES, MODEL_SIGNING_PREDICATE, REPORT_PREDICATE

__all__ = [
    "ARTIFACT_TYPE",
    "LAYER_MEDIA_TYPES",
    "REPORT_MEDIA_TYPE",
    "OciRef",
    "PullResult",
    "PushResult",
    "parse_reference",
    "pull",
    "push",
]

ARTIFACT_TYPE = "application/vnd.czregistry.package.v1"
LAYER_MEDIA_TYPES = {"czann": "application/vnd.czregistry.czann.v1+zip",
                     "czmodel": "application/vnd.czregistry.czmodel.v1+zip"}
REPORT_MEDIA_TYPE = "application/vnd.czregistry.validation-report.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
TITLE = "org.opencontainers.image.title"
PREDICATE_ANNOTATION = "dev.sigstore.bundle.predicateType"
ROLE_ANNOTATION = "czregistry.role"
#: Reports, signature bundles and manifests: the same bound as a bundle read from a file (4 MiB, the manifest
#: size the OCI distribution spec asks registries to accept). The package layer itself is streamed, bounded
#: by its declared size, which must be at most the package reader's ``ReadLimits().max_total_bytes``.
MAX_SMALL_BLOB = MAX_BUNDLE_BYTES
MAX_ERROR_BODY = 64 << 10  # an error document is a line or two of JSON
CHUNK = 1 << 16  # small enough that one chunk, even inflated by a Content-Encoding, stays modest
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
TIMEOUT = (10.0, 300.0)  # connect, read (seconds): a dead registry is an error, never a silent wait

_REF = re.compile(r"^oci://(?P<host>[A-Za-z0-9.-]+(?::\d+)?|\[[0-9a-fA-F:]+\](?::\d+)?)/"
                  r"(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
                  r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


@dataclass(frozen=True)
class OciRef:
    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


def parse_reference(text: str, *, need_tag: bool = False) -> OciRef:
    """``oci://HOST[:PORT]/REPO:TAG`` or ``oci://HOST[:PORT]/REPO@sha256:...`` (repository names are
    lower-case, as the distribution spec requires)."""
    m = _REF.match(text.strip())
    if not m:
        raise UsageError(f"not an OCI reference: {text}",
                         hint="write oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:DIGEST "
                              "(repository names are lower-case)")
    ref = OciRef(m["host"], m["repo"], m["tag"], m["digest"])
    if need_tag and (ref.tag is None or ref.digest is not None):
        raise UsageError(f"push needs a tag: {text}", hint="write oci://HOST/REPO:TAG (the digest is printed)")
    if ref.tag is None and ref.digest is None:
        ref = OciRef(ref.host, ref.repo, "latest")
    return ref


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data), **extra}


EMPTY_CONFIG = _descriptor(EMPTY_MEDIA_TYPE, EMPTY_BLOB)


# --- client ----------------------------------------------------------------------------------------------


def _docker_configs() -> list[str]:
    """Docker's credential files: ``$DOCKER_CONFIG/config.json`` first (Docker honours it), then
    ``~/.docker/config.json`` (oras-py adds that one itself)."""
    folder = os.environ.get("DOCKER_CONFIG")
    return [str(Path(folder) / "config.json")] if folder and (Path(folder) / "config.json").is_file() else []


class _Client:
    """One registry and repository, authenticated once; every failure becomes an ``OciError`` (exit 12)."""

    def __init__(self, ref: OciRef, *, plain_http: bool = False, username: str | None = None,
                 password: str | None = None) -> None:
        from .signing import require_extra

        require_extra("oras")
        import oras.auth
        import oras.container
        import oras.provider
        import requests

        class _Session(requests.Session):
            def request(self, *args: Any, **kwargs: Any) -> Any:
                kwargs.setdefault("timeout", TIMEOUT)
                return super().request(*args, **kwargs)

        class _Registry(oras.provider.Registry):
            def do_request(self, *args: Any, **kwargs: Any) -> Any:
                # oras-py wraps this in a retry loop that sleeps up to ~2 minutes on connection errors; we
                # call the undecorated method once and report failures at once.
                return oras.provider.Registry.do_request.__wrapped__(self, *args, **kwargs)

        self.ref = ref
        self.scheme = "http" if plain_http else "https"
        self.container = oras.container.Container(f"{ref.host}/{ref.repo}:{ref.tag or 'latest'}")
        self.reg = _Registry(hostname=ref.host, insecure=plain_http)
        session = _Session()
        session.cookies.set_policy(self.reg.session.cookies.get_policy())
        self.reg.session = session
        self.reg.auth.session = session
        self.referrers_api: bool | None = None
        self._authenticate(username, password, oras.auth)

    # -- plumbing

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.host}/v2/{path}"

    def request(self, method: str, url: str, *, what: str, ok: tuple[int, ...] = (200, 201, 202),
                allow: tuple[int, ...] = (), **kwargs: Any) -> Any:
        try:
            with self._transport(f" ({what})"):
                resp = self.reg.do_request(url, method, **kwargs)
        except ValueError as exc:  # oras-py: an auth challenge it cannot answer
            raise OciError(f"{self.ref.host} refused {what}: {first_line(exc)}",
                           hint="log in with docker login, or pass --username and --password-stdin") from None
        if resp.status_code in ok or resp.status_code in allow:
            return resp
        raise self._error(resp, what)

    @contextlib.contextmanager
    def _transport(self, label: str) -> Iterator[None]:
        """TLS and connection failures as one ``OciError`` line each (``label``: what was being done)."""
        import requests

        try:
            yield
        except requests.exceptions.SSLError:
            raise OciError(f"TLS failed talking to {self.ref.host}{label}",
                           hint="for a registry without TLS (e.g. on localhost) pass --plain-http") from None
        except requests.exceptions.RequestException as exc:
            raise OciError(f"cannot reach the registry {self.ref.host}{label}: {_reason(exc)}",
                           hint="check the host and port, and --plain-http for a registry without TLS") from None

    def _error(self, resp: Any, what: str) -> OciError:
        message = ""
        with contextlib.suppress(Exception):  # read no more than an error document can sensibly be
            errors = json.loads(_read_body(resp, MAX_ERROR_BODY, "an error", truncate=True)).get("errors") or []
            message = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
        detail = f": {message}" if message else ""
        if resp.status_code in (401, 403):
            return OciError(f"{self.ref.host} refused {what} (HTTP {resp.status_code}, not authorised){detail}",
                            hint="check the credentials (docker login, or --username and --password-stdin)")
        if resp.status_code == 404:
            return OciError(f"not found on {self.ref.host}: {what}{detail}",
                            hint="check the repository and the tag or digest")
        return OciError(f"{self.ref.host} failed {what} (HTTP {resp.status_code}){detail}")

    def _authenticate(self, username: str | None, password: str | None, auth_mod: Any) -> None:
        """Ping ``/v2/``; answer a Basic challenge (htpasswd registries) with credentials sent on every request,
        and leave Bearer challenges (token servers) to oras-py's token flow."""
        with self._transport(""):  # straight through the session: oras-py would try to answer the challenge itself
            resp = self.reg.session.get(self._url(""))
        if resp.status_code not in (200, 401):
            raise self._error(resp, "the API check (is this an OCI registry?)")
        challenge = resp.headers.get("WWW-Authenticate", "") if resp.status_code == 401 else ""
        if resp.status_code == 200:
            return
        if challenge.lower().startswith("basic"):
            self.reg.auth = auth_mod.get_auth_backend("basic", self.reg.session, self.scheme == "http",
                                                      tls_verify=True)
        if username is not None:
            self.reg.auth.set_basic_auth(username, password or "")
        else:
            self.reg.auth.load_configs(self.container, configs=_docker_configs())
        if not getattr(self.reg.auth, "_basic_auth", None):
            if challenge.lower().startswith("basic"):
                raise OciError(f"{self.ref.host} needs a user name and password",
                               hint="run docker login, or pass --username and --password-stdin")
            return  # Bearer: oras-py may still get an anonymous token
        if challenge.lower().startswith("basic"):
            self.reg.session.headers["Authorization"] = "Basic " + self.reg.auth._basic_auth
            self.request("GET", self._url(""), what="logging in")

    # -- blobs and manifests

    def blob_exists(self, digest: str) -> bool:
        resp = self.request("HEAD", self._url(f"{self.ref.repo}/blobs/{digest}"), what=f"checking blob {digest[:19]}",
                            allow=(404,))
        return bool(resp.status_code == 200)

    def put_blob(self, path: Path | None, data: bytes | None, digest: str, size: int) -> bool:
        """Upload unless the registry has it already (returns whether bytes were sent)."""
        if self.blob_exists(digest):
            return False
        what = f"uploading blob {digest[:19]}"
        import oras.utils

        start = self.request("POST", self._url(f"{self.ref.repo}/blobs/uploads/"), what=what,
                             headers={"Content-Length": "0"})
        location = self.reg._get_location(start, self.container)
        if not location:
            raise OciError(f"{self.ref.host} gave no upload location ({what})")
        url = oras.utils.append_url_params(location, {"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if path is not None:  # one streamed PUT: constant memory (oras-py's put_upload reads the whole file)
            with Path(path).open("rb") as fh:
                resp = self.request("PUT", url, what=what, data=fh, headers=headers)
        else:
            resp = self.request("PUT", url, what=what, data=data, headers=headers)
        if resp.status_code not in (200, 201, 202):
            raise self._error(resp, what)
        return True

    def open_blob(self, digest: str) -> Any:
        return self.request("GET", self._url(f"{self.ref.repo}/blobs/{digest}"), what=f"downloading {digest[:19]}",
                            stream=True)

    def small_blob(self, desc: dict[str, Any]) -> bytes:
        """A referrer's blob (report or bundle): its declared size checked first (at most ``MAX_SMALL_BLOB``),
        read no further than that size, and checked against its digest."""
        digest = _descriptor_digest(desc, "attachment")
        size = _declared_size(desc, MAX_SMALL_BLOB, f"attachment {digest[:19]}...")
        with self.open_blob(digest) as resp:
            data = _read_body(resp, size, f"attachment {digest[:19]}... from {self.ref.host}",
                              declared=True)
        if len(data) != size or _digest(data) != digest:
            raise OciError(f"blob {digest[:19]}... from {self.ref.host} does not match its digest")
        return data

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> tuple[str, Any]:
        resp = self.request("PUT", self._url(f"{self.ref.repo}/manifests/{reference}"),
                            what=f"storing manifest {reference}", data=body, headers={"Content-Type": media_type})
        digest = _digest(body)
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise OciError(f"{self.ref.host} stored manifest {reference} under {said}, not {digest}")
        return digest, resp

    def get_manifest(self, reference: str, *, media_types: tuple[str, ...] = (MANIFEST_MEDIA_TYPE,),
                     missing_ok: bool = False) -> tuple[bytes, str] | None:
        resp = self.request("GET", self._url(f"{self.ref.repo}/manifests/{reference}"),
                            what=f"{self.ref.repo}:{reference}" if not reference.startswith("sha256:")
                            else f"{self.ref.repo}@{reference}",
                            headers={"Accept": ", ".join(media_types)}, allow=(404,) if missing_ok else (),
                            stream=True)
        with resp:
            if resp.status_code == 404:
                return None
            body = _read_body(resp, MAX_SMALL_BLOB, f"manifest {reference} from {self.ref.host}")
        if reference.startswith("sha256:") and _digest(body) != reference:
            raise OciError(f"{self.ref.host} answered {reference[:19]}... with other bytes; refused")
        return body, _digest(body)

    # -- referrers

    def referrers(self, subject: str) -> tuple[list[dict[str, Any]], str]:
        """Descriptors of the manifests whose subject is ``subject``, and how they were found: ``"api"``
        (OCI 1.1 referrers API) or ``"tag"`` (the ``sha256-<hex>`` index of the tag schema)."""
        resp = self.request("GET", self._url(f"{self.ref.repo}/referrers/{subject}"), what="listing referrers",
                            headers={"Accept": INDEX_MEDIA_TYPE}, allow=(404, 400, 405), stream=True)
        with resp:
            if resp.status_code == 200 and resp.headers.get("Content-Type", "").startswith(INDEX_MEDIA_TYPE):
                self.referrers_api = True
                body = _read_body(resp, MAX_SMALL_BLOB, f"the referrers of {subject[:19]}... from {self.ref.host}")
                return _manifest_list(body, "the referrers list"), "api"
        self.referrers_api = False
        got = self.get_manifest(fallback_tag(subject), media_types=(INDEX_MEDIA_TYPE,), missing_ok=True)
        if got is None:
            return [], "tag"
        return _manifest_list(got[0], "the referrers index"), "tag"

    def add_referrers_by_tag(self, subject: str, descriptors: list[dict[str, Any]]) -> bool:
        """Merge ``descriptors`` into the tag-schema index of ``subject`` (unchanged when all are there)."""
        got = self.get_manifest(fallback_tag(subject), media_types=(INDEX_MEDIA_TYPE,), missing_ok=True)
        index: dict[str, Any] = (json.loads(got[0]) if got
                                 else {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []})
        known = {d.get("digest") for d in index.get("manifests", [])}
        new = [d for d in descriptors if d["digest"] not in known]
        if not new:
            return False
        index["manifests"] = [*index.get("manifests", []), *new]
        self.put_manifest(fallback_tag(subject), canonical_json(index), INDEX_MEDIA_TYPE)
        return True


def _reason(exc: BaseException) -> str:
    text = first_line(exc)
    m = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    if m:
        return m.group(1)
    return "timed out" if "timed out" in text.lower() else text[:160]


def _read_body(resp: Any, limit: int, what: str, *, declared: bool = False, truncate: bool = False) -> bytes:
    """At most ``limit`` bytes of a streamed response: reading stops as soon as more arrive (a hostile or
    broken registry cannot fill memory). ``declared``: ``limit`` is the size a descriptor declared.
    ``truncate``: return the first ``limit`` bytes instead of refusing."""
    parts: list[bytes] = []
    n = 0
    for chunk in resp.iter_content(CHUNK):
        n += len(chunk)
        if n > limit:
            if truncate:
                parts.append(chunk[:len(chunk) - (n - limit)])
                break
            said = f"the {limit} bytes its descriptor declares" if declared else f"{_human(limit)}"
            raise OciError(f"{what} is larger than {said}; refused after reading {n} bytes",
                           hint="the registry sent more than it should; do not trust it")
        parts.append(chunk)
    return b"".join(parts)


def _human(n: int) -> str:
    from ._smallfile import human_limit

    return human_limit(n)


def _shown(value: Any, limit: int) -> str:
    """A foreign JSON value quoted for a message, cut to ``limit`` characters with "..." (cutting a repr
    instead left a stray opening quote); JSON's spelling, so never a Python repr such as ``None``."""
    text = json.dumps(value, default=str, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _declared_size(desc: dict[str, Any], limit: int, what: str) -> int:
    """A descriptor's ``size``: an integer from 0 to ``limit``, refused before any byte is fetched
    (a size of 10**18, -5 or "big" is a broken or hostile manifest, not a digest mismatch to find later)."""
    size = desc.get("size")
    if type(size) is not int or not 0 <= size <= limit:
        raise OciError(f"{what} declares a size of {_shown(size, 40)}; it must be a whole number of bytes from 0 to "
                       f"{_human(limit)}; nothing downloaded", hint="the manifest is broken or hostile; do not use it")
    return size


def _descriptor_digest(desc: Any, what: str) -> str:
    """A descriptor's digest, only in the one shape we fetch (``sha256:`` and 64 hex digits): it goes into
    a URL path, so nothing else (``../``, a query string) may pass."""
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise OciError(f"{what} has an invalid digest {_shown(digest, 80)}; nothing downloaded",
                       hint="the manifest is broken or hostile; do not use it")
    return digest


def _manifest_list(body: bytes, what: str) -> list[dict[str, Any]]:
    try:
        items = json.loads(body).get("manifests") or []
        assert isinstance(items, list)
    except Exception:
        raise OciError(f"{what} is not an OCI image index", hint="the registry answered something else") from None
    return [d for d in items if isinstance(d, dict)]


def fallback_tag(digest: str) -> str:
    """The referrers tag schema: ``sha256:abc...`` -> ``sha256-abc...``."""
    return digest.replace(":", "-")


# --- push ------------------------------------------------------------------------------------------------


@dataclass
class Attachment:
    """One referrer: its role, artifact type, bytes and file name."""

    role: str  # "report" | "signature" | "attestation"
    artifact_type: str
    data: bytes
    title: str
    annotations: dict[str, str] = field(default_factory=dict)

    def manifest(self, subject: dict[str, Any]) -> bytes:
        layer = _descriptor(self.artifact_type, self.data, annotations={TITLE: self.title})
        return canonical_json({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": self.artifact_type,
            "config": EMPTY_CONFIG, "layers": [layer], "subject": subject,
            "annotations": {ROLE_ANNOTATION: self.role, **self.annotations},
        })


def attachments(name: str, *, report: dict[str, Any] | None, signature: bytes | None,
                attestation: bytes | None) -> list[Attachment]:
    out: list[Attachment] = []
    if report is not None:
        out.append(Attachment("report", REPORT_MEDIA_TYPE, canonical_json(report), f"{name}.report.json"))
    if signature is not None:
        out.append(Attachment("signature", BUNDLE_MEDIA_TYPE, signature, f"{name}.sig",
                              {PREDICATE_ANNOTATION: MODEL_SIGNING_PREDICATE}))
    if attestation is not None:
        out.append(Attachment("attestation", BUNDLE_MEDIA_TYPE, attestation, f"{name}.att",
                              {PREDICATE_ANNOTATION: REPORT_PREDICATE}))
    return out


@dataclass
class PushResult:
    reference: str
    digest: str
    package_sha256: str
    size: int
    referrers: list[dict[str, Any]]
    referrers_via: str
    uploaded_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "package_sha256": self.package_sha256,
                "size": self.size, "referrers": self.referrers, "referrers_via": self.referrers_via,
                "uploaded_bytes": self.uploaded_bytes}


def package_manifest(name: str, kind: str, sha256: str, size: int) -> bytes:
    layer = {"mediaType": LAYER_MEDIA_TYPES[kind], "digest": f"sha256:{sha256}", "size": size,
             "annotations": {TITLE: name}}
    return canonical_json({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                           "config": EMPTY_CONFIG, "layers": [layer]})


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def push(package: Path | str, target: str, *, plain_http: bool = False, username: str | None = None,
         password: str | None = None, report: dict[str, Any] | None = None, signature: bytes | None = None,
         attestation: bytes | None = None, name: str | None = None) -> PushResult:
    """Push ``package`` as ``target`` (``oci://HOST/REPO:TAG``) with its attachments; returns the digest.

    Blobs the registry already has are not sent again; manifests are canonical, so pushing the same bytes
    (same file name, same attachments) twice yields the same digest.
    """
    package = Path(package)
    ref = parse_reference(target, need_tag=True)
    if not package.is_file():
        raise UsageError(f"no such package file: {package}", hint="check the path")
    title = name or package.name
    kind = "czmodel" if title.lower().endswith(".czmodel") else "czann"
    sha256, size = _sha256_file(package)
    client = _Client(ref, plain_http=plain_http, username=username, password=password)
    sent = 0
    if client.put_blob(package, None, f"sha256:{sha256}", size):
        sent += size
    if client.put_blob(None, EMPTY_BLOB, EMPTY_CONFIG["digest"], 2):
        sent += 2
    body = package_manifest(title, kind, sha256, size)
    digest, _ = client.put_manifest(ref.tag or "latest", body, MANIFEST_MEDIA_TYPE)
    subject = {"mediaType": MANIFEST_MEDIA_TYPE, "digest": digest, "size": len(body)}
    pushed: list[dict[str, Any]] = []
    api = False
    for att in attachments(title, report=report, signature=signature, attestation=attestation):
        if client.put_blob(None, att.data, _digest(att.data), len(att.data)):
            sent += len(att.data)
        manifest = att.manifest(subject)
        ref_digest, resp = client.put_manifest(_digest(manifest), manifest, MANIFEST_MEDIA_TYPE)
        api = api or resp.headers.get("OCI-Subject") == digest
        pushed.append({"mediaType": MANIFEST_MEDIA_TYPE, "digest": ref_digest, "size": len(manifest),
                       "artifactType": att.artifact_type, "annotations": json.loads(manifest)["annotations"]})
    via = "api" if api else "tag"
    if pushed and not api:
        client.add_referrers_by_tag(digest, pushed)
    return PushResult(str(ref), digest, sha256, size,
                      [{"role": p["annotations"][ROLE_ANNOTATION], "digest": p["digest"]} for p in pushed],
                      via, sent)


# --- pull ------------------------------------------------------------------------------------------------


@dataclass
class PullResult:
    reference: str
    digest: str
    path: Path
    sha256: str
    size: int
    signature_path: Path | None
    attestation_path: Path | None
    report: dict[str, Any] | None
    verified: dict[str, Any] | None
    referrers_via: str

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "path": str(self.path), "sha256": self.sha256,
                "size": self.size, "signature": str(self.signature_path) if self.signature_path else None,
                "attestation": str(self.attestation_path) if self.attestation_path else None,
                "report_valid": None if self.report is None else self.report.get("valid"),
                "verified": self.verified, "referrers_via": self.referrers_via}


def _safe_name(title: Any, sha256: str, kind: str) -> str:
    """The file name to write: the manifest's title only if it is a plain package file name (untrusted)."""
    if isinstance(title, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.(czann|czmodel)", title):
        return title
    return f"package-{sha256[:12]}.{kind}"


def _by_role(client: _Client, descriptors: list[dict[str, Any]]) -> Iterator[tuple[str, bytes]]:
    for desc in descriptors:
        role = (desc.get("annotations") or {}).get(ROLE_ANNOTATION)
        if role not in ("report", "signature", "attestation") or desc.get("mediaType") != MANIFEST_MEDIA_TYPE:
            continue
        got = client.get_manifest(_descriptor_digest(desc, f"the {role} attachment"))
        assert got is not None
        try:
            layers = json.loads(got[0]).get("layers") or []
        except Exception:
            raise OciError(f"the {role} attachment is not an OCI manifest", hint="do not trust this registry") from None
        if isinstance(layers, list) and len(layers) == 1:
            yield role, client.small_blob(layers[0])


def _bundle_key_id(data: bytes) -> str | None:
    with contextlib.suppress(Exception):
        return str(json.loads(data)["verificationMaterial"]["publicKey"]["hint"])
    return None


def pull(source: str, out_dir: Path | str, *, key: Path | str | None = None, plain_http: bool = False,
         username: str | None = None, password: str | None = None, force: bool = False) -> PullResult:
    """Fetch ``source`` into ``out_dir``: the package (streamed, SHA-256 checked), and its signature and
    attestation beside it when attached. With ``key``, the package appears only if a signature made with that
    key verifies (model-signing) together with its attestation; otherwise nothing is left."""
    from ..package import atomic_output
    from .signing import attestation_path, key_id, signature_path, verify_package

    ref = parse_reference(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder", hint="-o takes the folder to write into")
    wanted_key = key_id(key) if key is not None else None  # a bad key file is refused before any transfer
    client = _Client(ref, plain_http=plain_http, username=username, password=password)
    got = client.get_manifest(ref.reference, media_types=(MANIFEST_MEDIA_TYPE, INDEX_MEDIA_TYPE))
    assert got is not None
    body, digest = got
    try:
        manifest = json.loads(body)
        layers = manifest["layers"]
        (layer,) = layers
        kind = next(k for k, mt in LAYER_MEDIA_TYPES.items() if mt == layer["mediaType"])
        sha256 = layer["digest"].removeprefix("sha256:")
        assert re.fullmatch(r"[0-9a-f]{64}", sha256)
    except Exception:
        raise OciError(f"{ref} is not a czregistry package (artifact type {ARTIFACT_TYPE})",
                       hint="push packages with czreg push") from None
    from ..package import ReadLimits

    size = _declared_size(layer, ReadLimits().max_total_bytes, f"the package layer of {ref}")
    name = _safe_name((layer.get("annotations") or {}).get(TITLE), sha256, kind)
    out = out_dir / name
    if out.exists() and not force and (not out.is_file() or _sha256_file(out)[0] != sha256):
        raise UsageError(f"{out} already exists with other content; not overwritten",
                         hint="pass --force to replace it, or choose another -o folder")

    descriptors, via = client.referrers(digest)
    found: dict[str, list[bytes]] = {"report": [], "signature": [], "attestation": []}
    for role, data in _by_role(client, descriptors):
        found[role].append(data)

    def pick(role: str) -> bytes | None:
        items = found[role]
        if wanted_key is not None:
            items = [d for d in items if _bundle_key_id(d) == wanted_key] or items
        return items[0] if items else None

    signature, attestation = pick("signature"), pick("attestation")
    report = json.loads(found["report"][0]) if found["report"] else None
    verified: dict[str, Any] | None = None
    sig_out = att_out = None
    with atomic_output(out) as tmp:
        h = hashlib.sha256()
        n = 0
        with client.open_blob(layer["digest"]) as resp, tmp.open("wb") as fh:
            for chunk in resp.iter_content(CHUNK):
                n += len(chunk)
                if n > size:  # stop at once: never store (or hash) more than the manifest promised
                    raise OciError(f"the package from {ref} is larger than the {size} bytes its manifest declares;"
                                   f" stopped after {n} bytes, nothing written",
                                   hint="the registry sent more than it should; do not trust it")
                h.update(chunk)
                fh.write(chunk)
        if n != size:
            raise OciError(f"the package from {ref} is shorter ({n} bytes) than the {size} bytes its manifest "
                           "declares; nothing written", hint="the transfer was cut off (retry), or the manifest lies")
        if h.hexdigest() != sha256:
            raise OciError(f"the package from {ref} does not match its digest (got sha256 {h.hexdigest()[:12]}..., "
                           f"{n} bytes); nothing written", hint="the registry or the network corrupted it; retry")
        if key is not None:
            if signature is None or attestation is None:
                from ..errors import SignatureError

                missing = "signature" if signature is None else "attestation"
                raise SignatureError(f"{ref} has no {missing} attached; nothing written",
                                     hint="ask the publisher to push it signed (czreg sign, then czreg push)")
            verified = verify_package(tmp, key, signature=signature, attestation=attestation, name=name).to_dict()
            verified.pop("report", None)
            verified.pop("smoke", None)
            verified["package"] = str(out)
        for blob, target in ((signature, signature_path(out)), (attestation, attestation_path(out))):
            if blob is not None:
                with atomic_output(target) as t:
                    t.write_bytes(blob)
        sig_out = signature_path(out) if signature is not None else None
        att_out = attestation_path(out) if attestation is not None else None
    return PullResult(str(ref), digest, out, sha256, size, sig_out, att_out, report, verified, via)


def basic_auth_entry(username: str, password: str) -> str:
    """The ``auth`` value of a Docker config entry (for tests and docs)."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()
