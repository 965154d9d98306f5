"""The records that cross the registry's boundary, and the contract both registries keep.

``Registry`` (a SQLite or PostgreSQL database, ``api``) and ``RemoteRegistry`` (a ``czreg serve`` server over
HTTP, ``remote``) implement ``RegistryClient``; the CLI, ``evaluate.gate`` and ``admission`` are written
against it, and ``tests/test_registry_contract.py`` runs one suite over every back end. A leaf module (no
SQLAlchemy, no HTTP): both implementations import it, it imports neither.

Versions, events and listings stay JSON-shaped (they are what ``--json`` prints and what the server
sends), typed here as ``TypedDict``; the results of operations are dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

    from ..package import PackageSnapshot
    from ..report import Report
    from ..sharing.signing import SignedPackage
    from .versions import Bump

__all__ = ["EvaluationRecord", "Evidence", "Identity", "PublishResult", "PullResult", "RecordedEvaluation",
           "RegistryClient", "Resolved", "SignatureRecord", "StoredSignature", "Transactional", "VersionRecord",
           "signature_for"]


class VersionRecord(TypedDict, total=False):
    """One version as ``resolve``/``show``/``publish`` describe it (``show`` of one version adds
    ``report``, ``smoke``, ``evaluations``, ``signatures``, ``yanked_at``, ``yanked_by``)."""

    name: str
    canonical_name: str
    version: str
    digest: str  # "sha256:<hex>"
    size: int
    kind: str
    type: str | None
    classes: list[str] | None
    valid: bool
    allow_invalid: bool
    yanked: bool
    yanked_reason: str | None
    created_at: str | None
    created_by: str | None
    host: str | None
    source: str | None
    czregistry_version: str | None
    note: str | None
    tags: dict[str, str]
    aliases: list[str]
    signed_by: list[str]  # key ids (SHA-256 of the public key PEM), oldest first
    signatures: list[SignatureRecord]
    evaluations: list[dict[str, Any]]
    report: dict[str, Any]
    smoke: dict[str, Any] | None


class SignatureRecord(TypedDict):
    """A stored signature as ``show`` lists it: which key, and whether its bundles are about these bytes
    (``bound``: the signed digest and the attestation's subject are the version's digest, the key hint is
    ``key_id``; a cryptographic check needs the public key: ``pull --key``)."""

    key_id: str
    created_at: str | None
    created_by: str | None
    bound: bool


class StoredSignature(TypedDict):
    """A stored signature with both bundles (text), as ``signatures()`` returns and ``pull --key`` checks."""

    key_id: str
    created_at: str | None
    created_by: str | None
    signature: str
    attestation: str


class EvaluationRecord(TypedDict, total=False):
    """An evaluation as ``czreg evaluate --json`` writes it (the parts the registry keys it by)."""

    package: dict[str, Any]  # {"sha256": ...}
    dataset: dict[str, Any]  # {"digest": ..., "images": ...}
    definition: str
    task: str
    metrics: dict[str, Any]


class RecordedEvaluation(TypedDict):
    """What recording an evaluation did: ``recorded`` or ``exists``, its id, the versions it belongs to."""

    status: str
    id: int
    versions: list[str]


@dataclass(frozen=True)
class Identity:
    """What a package is filed under: display and canonical name, kind, model type and classes."""

    display: str
    canonical: str
    kind: str
    model_type: str | None
    classes: list[str] | None


@dataclass(frozen=True)
class Evidence:
    """Everything admission (``czregistry.admission.admit``) found out about one package's bytes
    (``sha256``), ready for ``publish`` to store."""

    path: Path
    sha256: str
    identity: Identity
    report: Report
    smoke: Report | None
    signed: SignedPackage | None
    evaluation: dict[str, Any] | None
    forced: bool  # admitted only because of --allow-invalid
    #: The bytes admitted, while the caller that read them keeps them open: ``publish`` stores these (no
    #: second read or hash of the file); ``None`` when ``admit`` read the path itself and let go of them.
    snapshot: PackageSnapshot | None = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.report.valid and (self.smoke is None or self.smoke.valid)


@dataclass
class Resolved:
    version: VersionRecord
    warnings: list[str] = field(default_factory=list)


@dataclass
class PublishResult:
    status: str  # "published" | "exists"
    version: VersionRecord
    report: Report
    smoke: Report | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, **self.version, "verdict": "valid" if self.report.valid else "invalid"}


@dataclass
class PullResult:
    version: VersionRecord
    path: Path
    warnings: list[str]
    verified: dict[str, Any] | None = None  # pull --key: what the signature proved

    def to_dict(self) -> dict[str, Any]:
        out = {**self.version, "path": str(self.path), "warnings": self.warnings}
        if self.verified is not None:
            out["verified"] = self.verified
        return out


T = TypeVar("T")


class _Location(Protocol):
    def display(self) -> str: ...


@runtime_checkable
class RegistryClient(Protocol):
    """What every registry does, local or remote. Methods a back end cannot do raise a ``CzregError``
    that says why in the user's terms (never ``AttributeError``)."""

    @property
    def location(self) -> _Location: ...

    def close(self) -> None: ...

    def publish(self, path: Path | str, *, name: str | None = None, version: str | None = None,
                bump_part: Bump | None = None, static: bool = False, allow_invalid: bool = False,
                note: str | None = None, tags: dict[str, str] | None = None, smoke: bool = False,
                sign_key: Path | str | None = None, evidence: Evidence | None = None) -> PublishResult: ...

    def resolve(self, requirement: str, *, prereleases: bool | None = None) -> Resolved: ...

    def pull(self, requirement: str, dest: Path | str | None = None, *, prereleases: bool | None = None,
             key: Path | str | None = None, force: bool = True) -> PullResult: ...

    def show(self, requirement: str, *, prereleases: bool | None = None) -> dict[str, Any]: ...

    def search(self, *, name: str | None = None, model_type: str | None = None, class_name: str | None = None,
               tag: str | None = None, alias: str | None = None, all_versions: bool = False,
               include_yanked: bool = False, limit: int | None = None) -> list[dict[str, Any]]: ...

    def history(self, name: str | None = None, *, limit: int | None = None) -> list[dict[str, Any]]: ...

    def alias_set(self, name: str, alias: str, version: str) -> dict[str, Any]: ...

    def alias_remove(self, name: str, alias: str) -> dict[str, Any]: ...

    def aliases(self, name: str) -> dict[str, str]: ...

    def tag(self, requirement: str, set_tags: dict[str, str], remove: list[str] | None = None) -> dict[str, str]: ...

    def yank(self, name: str, version: str, reason: str) -> dict[str, Any]: ...

    def unyank(self, name: str, version: str) -> dict[str, Any]: ...

    def signatures(self, requirement: str, *, prereleases: bool | None = None) -> list[StoredSignature]: ...

    def record_evaluation(self, data: dict[str, Any]) -> RecordedEvaluation: ...

    def find_evaluations(self, package_digest: str, dataset_digest: str | None = None,
                         definition: str | None = None) -> list[dict[str, Any]]: ...

    def setting(self, name: str) -> Any: ...

    def settings(self) -> dict[str, Any]: ...

    def set_setting(self, name: str, value: str) -> dict[str, Any]: ...

    def verify(self) -> dict[str, Any]: ...

    def gc(self, *, dry_run: bool = False, temp_grace_s: float = 3600.0) -> dict[str, Any]: ...

    def purge(self, name: str, version: str, *, reason: str | None = None) -> dict[str, Any]: ...


class Transactional(Protocol):
    """The database side of a local registry, for the modules that keep their own tables (``evaluations``,
    ``tokens``): one read transaction, one retried write transaction, an audit event inside one."""

    @property
    def location(self) -> _Location: ...

    def reading(self) -> AbstractContextManager[Session]: ...

    def transaction(self, fn: Callable[[Session], T], *, on_blob_gone: Callable[[], object] | None = None) -> T: ...

    def record_event(self, s: Session, action: str, model: str, *, version: str | None = None,
                     alias: str | None = None, from_version: str | None = None, to_version: str | None = None,
                     **detail: Any) -> None: ...


def signature_for(client: RegistryClient, v: VersionRecord, key: Path | str, label: str) -> tuple[bytes, bytes]:
    """The stored (signature, attestation) of version ``v`` made with ``key``, asked of either registry through
    the contract (``client.signatures``): one rule for what ``pull --key`` accepts, locally and remotely.
    ``SignatureError`` (exit 10) when the version is unsigned or signed only with other keys."""
    from ..errors import SignatureError
    from ..sharing.signing import key_id

    wanted = key_id(key)
    stored = client.signatures(f"{v['canonical_name']}=={v['version']}")
    if not stored:
        raise SignatureError(f"{label} is not signed; nothing written",
                             hint="ask the publisher to publish it with --sign, or pull without --key")
    match = next((x for x in stored if x["key_id"] == wanted), None)
    if match is None:
        raise SignatureError(f"{label} is signed, but not with this key (key id {wanted[:16]}...; signed by "
                             f"{', '.join(x['key_id'][:16] + '...' for x in stored)}); nothing written",
                             hint="use the publisher's public key")
    return match["signature"].encode(), match["attestation"].encode()
