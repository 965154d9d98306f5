"""The registry: publish, resolve, pull, list, show, history, aliases, tags, yank, verify, gc, purge.

Every write is one transaction, retried a bounded number of times when another process holds the lock or
wins a unique-constraint race. Publishing writes the blob first (temp file, fsync, rename) and commits the
row last, after checking under the blob lock that the blob is still there, so no row ever points at a
missing blob; ``gc`` removes unreferenced blobs under the exclusive form of the same lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from packaging.specifiers import SpecifierSet
from packaging.version import Version as PV
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from .. import __version__
from ..errors import RegistryError, UsageError
from ..progress import step
from . import db
from . import signatures as sigs
from .audit import _ACTING, acting_as, acting_host, acting_user, iso_time, utc_now
from .location import RegistryLocation, private_files, require_existing, resolve_location
from .models import Alias, Event, Model, Signature, Tag, Tombstone, Version
from .names import like_pattern
from .records import (
    PublishResult,
    PullResult,
    RecordedEvaluation,
    Resolved,
    StoredSignature,
    VersionRecord,
    signature_for,
)
from .store import CHUNK, BlobStore, open_blob_store

if TYPE_CHECKING:
    from ..admission import Evidence, Validator
    from ..sharing.signing import SignedPackage
from .versions import (
    Bump,
    Requirement,
    bump,
    canonical_name,
    parse_requirement,
    parse_version,
    select_versions,
    sort_bounds,
    sort_key,
    version_key,
)

__all__ = ["PublishResult", "PullResult", "Registry", "Resolved", "acting_as", "check_tags", "open_registry",
           "package_model_name", "search_statement"]

T = TypeVar("T")

RESERVED_ALIASES = frozenset({"latest"})
MAX_ATTEMPTS = 12
_GC_LOCK_KEY = 0x637A7267  # advisory lock: publishers take it shared, gc/purge exclusive (PostgreSQL)


def pull_target(v: VersionRecord, dest: Path | str | None) -> tuple[str, Path, str]:
    """(hex digest, output path, label) of a pull: ``dest`` is a folder (existing, or written with a trailing
    slash) that gets ``NAME-VERSION.KIND``, or the file itself; none means the current folder. Shared by the
    local registry and the server client so both name pulled files alike."""
    filename = f"{v['canonical_name']}-{v['version']}.{v['kind']}"
    if dest is None:
        out = Path.cwd() / filename
    else:
        as_dir = str(dest).endswith(("/", "\\")) or Path(dest).is_dir()
        out = Path(dest) / filename if as_dir else Path(dest)
    return v["digest"].removeprefix("sha256:"), out, f"{v['name']} {v['version']}"


def open_registry(registry: str | None = None, blob_store: str | None = None, *, create: bool = True) -> Registry:
    """Open (creating and migrating when needed) the registry at ``registry`` or the default location.

    ``create=False`` (the CLI): a SQLite registry named by ``registry`` or ``CZREG_REGISTRY`` must already
    exist (its folder, at least); only the per-user default is created on first use."""
    location = resolve_location(registry, blob_store)
    given = registry or os.environ.get("CZREG_REGISTRY")
    if not create and given:
        require_existing(location, given)
    return Registry(location)


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """Tags as ``publish --tag``/``czreg tag`` accept them, for every caller (the CLI, the server's API): a
    key is not empty and holds no '='; keys and values lose surrounding blanks."""
    out: dict[str, str] = {}
    for key, value in tags.items():
        k = str(key).strip()
        if not k or "=" in k:
            raise UsageError(f"invalid tag '{key}={value}'", hint="write --tag key=value (a key is not empty)")
        out[k] = str(value).strip()
    return out


class _BlobGone(Exception):
    """The blob vanished between put and commit (a concurrent gc): put it again and retry."""


class Registry:
    """A registry database plus its blob store. Cheap to open; safe to use from many processes at once."""

    def __init__(self, location: RegistryLocation, store: BlobStore | None = None) -> None:
        self.location = location
        self.store = store or open_blob_store(location.blob_store, private=location.is_sqlite and private_files())
        self.engine: Engine = db.create_registry_engine(location.url)
        self._writer = self.engine.execution_options(czreg_write=True)
        try:
            db.upgrade(self.engine)
        except DBAPIError as exc:
            raise RegistryError(f"cannot open registry {location.display()}: {_short(exc)}",
                                hint="check the URL, the server and your permissions") from None

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """One read transaction (a database error becomes ``RegistryError``)."""
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except DBAPIError as exc:
            raise RegistryError(f"registry {self.location.display()}: {_short(exc)}") from None

    def transaction(self, fn: Callable[[Session], T], *, on_blob_gone: Callable[[], object] | None = None) -> T:
        """The public transaction helper (``evaluations``, ``tokens`` and the methods here use it): run
        ``fn`` in one write transaction; retry lock timeouts, serialisation failures and unique races with
        jittered back-off. Trigger refusals (``czreg-...``) are never retried."""
        delay = 0.02
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with Session(self._writer, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except _BlobGone:
                if on_blob_gone is None or attempt == MAX_ATTEMPTS:
                    raise RegistryError("a blob vanished while publishing (concurrent gc?)",
                                        hint="publish again") from None
                on_blob_gone()
            except (OperationalError, IntegrityError, DBAPIError) as exc:
                msg = str(exc.orig) if exc.orig is not None else str(exc)
                if "czreg-" in msg:
                    raise RegistryError(_trigger_message(msg)) from None
                retryable = isinstance(exc, OperationalError | IntegrityError) or getattr(
                    exc.orig, "sqlstate", None) in ("40001", "40P01", "55P03")
                if not retryable or attempt == MAX_ATTEMPTS:
                    raise RegistryError(f"registry {self.location.display()} is busy or refused the change: "
                                        f"{_short(exc)}", hint="try again") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def _model_for_update(self, s: Session, name: str, display: str | None = None) -> Model | None:
        """The model row, locked (PostgreSQL ``FOR UPDATE``; SQLite already holds the write lock);
        created first when ``display`` is given."""
        if display is not None:
            ins = (_insert(s)(Model).values(name=name, display_name=display, created_at=utc_now())
                   .on_conflict_do_nothing(index_elements=["name"]))
            s.execute(ins)
        return s.scalars(select(Model).where(Model.name == name).with_for_update()).first()

    def record_event(self, s: Session, action: str, model: str, *, version: str | None = None,
                     alias: str | None = None, from_version: str | None = None, to_version: str | None = None,
                     **detail: Any) -> None:
        """Add an audit-trail event (who: ``acting_as``, else the OS user) inside transaction ``s``."""
        acting = _ACTING.get()
        if acting is not None:
            detail = {**acting[2], **detail}
        s.add(Event(at=utc_now(), actor=acting_user(), host=acting_host(), action=action, model_name=model,
                    version=version, alias=alias, from_version=from_version, to_version=to_version,
                    detail=json.dumps(detail, default=str) if detail else None))

    # --- publish -------------------------------------------------------------------------------------

    def publish(self, path: Path | str, *, name: str | None = None, version: str | None = None,
                bump_part: Bump | None = None, static: bool = False, allow_invalid: bool = False,
                note: str | None = None, tags: dict[str, str] | None = None, smoke: bool = False,
                sign_key: Path | str | None = None, validator: Validator | None = None,
                evidence: Evidence | None = None, signed: SignedPackage | None = None,
                signer_public_key: Path | None = None) -> PublishResult:
        """Admit the package (``admission.admit``: validate with ``validator``, smoke, sign with
        ``sign_key`` or check ``signed``), unless ``evidence`` from an earlier ``admit`` is given; then store
        the blob and record the version with its evidence (the rows are committed last).

        The file is read once (a ``PackageSnapshot``, or the one ``evidence`` holds): admission and the blob
        store see the same bytes, stored without being read or hashed again, so the evidence describes exactly
        the bytes stored. Evidence without a snapshot is stored from ``path`` only if those bytes hash to its
        ``sha256``."""
        with contextlib.ExitStack() as stack:
            return self._publish(stack, Path(path), name, version, bump_part, static, allow_invalid, note, tags,
                                 smoke, sign_key, validator, evidence, signed, signer_public_key)

    def _publish(self, stack: contextlib.ExitStack, path: Path, name: str | None, version: str | None,
                 bump_part: Bump | None, static: bool, allow_invalid: bool, note: str | None,
                 tags: dict[str, str] | None, smoke: bool, sign_key: Path | str | None, validator: Validator | None,
                 evidence: Evidence | None, signed: SignedPackage | None,
                 signer_public_key: Path | None) -> PublishResult:
        from ..admission import PackageSnapshot, admit
        from ..package import require_package_file

        tags = check_tags(tags or {})
        if name is not None:
            canonical_name(name)  # an empty or overlong --name is refused before any work
        if (version is None) == (bump_part is None):
            raise UsageError("give exactly one of --version and --bump", hint="e.g. --version 1.2.0 or --bump minor")
        unsigned = sign_key is None and signed is None and (evidence is None or evidence.signed is None)
        if unsigned and self.setting("require_signatures"):
            raise RegistryError(f"registry {self.location.display()} requires signed packages; {path.name} not "
                                "published", hint="publish with --sign PRIVATE.pem (czreg keygen makes a key pair)")
        new_version = parse_version(version) if version is not None else None
        if evidence is None:
            require_package_file(path)
            snapshot = stack.enter_context(PackageSnapshot.read(path))
            evidence = admit(snapshot, name=name, static=static, smoke=smoke, allow_invalid=allow_invalid,
                             sign_key=sign_key, signed=signed, signer_public_key=signer_public_key,
                             validator=validator)
        ident = evidence.identity
        display, cname, kind, model_type, classes = (ident.display, ident.canonical, ident.kind, ident.model_type,
                                                     ident.classes)
        report, smoke_report, forced, signed = evidence.report, evidence.smoke, evidence.forced, evidence.signed
        held = evidence.snapshot if evidence.snapshot is not None and not evidence.snapshot.closed else None

        def put() -> tuple[str, int]:
            if held is not None and held.sha256 == report.sha256:
                return self.store.put(held.stream(), expected=held.sha256, verified=True)
            with path.open("rb") as fh:
                return self.store.put(fh, expected=report.sha256)

        with step("publish: storing the package"):
            digest, size = put()
        source, who, host = path.name, acting_user(), acting_host()

        def txn(s: Session) -> tuple[str, Version]:
            model = self._model_for_update(s, cname, name or display)
            assert model is not None
            db.advisory_lock(s.connection(), _GC_LOCK_KEY, shared=True)
            if not self.store.exists(digest):
                raise _BlobGone
            if new_version is None:
                assert bump_part is not None
                # the same bytes under the next number is a normal re-release (with its own note and tags)
                top = s.scalars(select(Version.version).where(Version.model_id == model.id)
                                .order_by(Version.sort_key.desc()).limit(1)).first()
                used = [*([top] if top else []),
                        *s.scalars(select(Tombstone.version).where(Tombstone.model_id == model.id))]
                target = bump(max((PV(v) for v in used), default=None), bump_part)
            else:
                target = new_version
            key = version_key(target)
            row = s.scalars(select(Version).where(Version.model_id == model.id, Version.version_key == key)).first()
            if row is not None:
                if row.digest == digest:
                    return "exists", row
                raise RegistryError(
                    f"{model.display_name} {row.version} is already published with other bytes "
                    f"(sha256:{row.digest[:12]}); published versions are immutable",
                    hint="publish under a new version (--bump patch)")
            if (tomb := s.get(Tombstone, (model.id, key))) is not None:
                raise RegistryError(f"{model.display_name} {tomb.version} was purged; version numbers are never reused",
                                    hint="publish under a new version (--bump patch)")
            row = Version(
                model_id=model.id, version=str(target), version_key=key, sort_key=sort_key(target),
                is_pre=target.is_prerelease, digest=digest, size=size, kind=kind,
                model_type=model_type, classes=json.dumps(classes) if classes is not None else None,
                valid=report.valid, allow_invalid=forced,
                report=report.to_json(indent=None), smoke=smoke_report.to_json(indent=None) if smoke_report else None,
                created_at=utc_now(), created_by=who, host=host, source_name=source, czreg_version=__version__,
                note=note, yanked=False)
            s.add(row)
            s.flush()
            for k, v in (tags or {}).items():
                s.add(Tag(version_id=row.id, key=k, value=v))
            self.record_event(s, "publish", cname, version=str(target), digest=digest, source=source,
                        valid=report.valid, allow_invalid=forced, note=note)
            return "published", row

        def txn_signed(s: Session) -> tuple[str, Version]:
            status, row = txn(s)
            if signed is not None and sigs.attach(s, row.id, signed, who):
                self.record_event(s, "sign", cname, version=row.version, key_id=signed.key_id)
            return status, row

        status, row = self.transaction(txn_signed, on_blob_gone=put)
        return PublishResult(status, self._describe(row), report, smoke_report)

    # --- reading -------------------------------------------------------------------------------------

    def _describe(self, row: Version, *, full: bool = False) -> VersionRecord:
        with self.reading() as s:
            model = s.get(Model, row.model_id)
            tags = {t.key: t.value for t in s.scalars(select(Tag).where(Tag.version_id == row.id))}
            aliases = sorted(s.scalars(select(Alias.name).where(Alias.version_id == row.id)))
            stored = sigs.signatures_of(s, row.id)
        signed_by = [x.key_id for x in stored]
        assert model is not None
        out: dict[str, Any] = {
            "name": model.display_name, "canonical_name": model.name, "version": row.version,
            "digest": f"sha256:{row.digest}", "size": row.size, "kind": row.kind, "type": row.model_type,
            "classes": json.loads(row.classes) if row.classes else None, "valid": row.valid,
            "allow_invalid": row.allow_invalid, "yanked": row.yanked, "yanked_reason": row.yanked_reason,
            "created_at": iso_time(row.created_at), "created_by": row.created_by, "host": row.host,
            "source": row.source_name, "czregistry_version": row.czreg_version, "note": row.note,
            "tags": tags, "aliases": aliases, "signed_by": signed_by,
        }
        if full:
            from .evaluations import list_evaluations

            out["evaluations"] = list_evaluations(self, row.digest)
            out["report"] = json.loads(row.report)
            out["smoke"] = json.loads(row.smoke) if row.smoke else None
            out["yanked_at"], out["yanked_by"] = iso_time(row.yanked_at), row.yanked_by
            out["signatures"] = [{"key_id": x.key_id, "created_at": iso_time(x.created_at),
                                  "created_by": x.created_by, "bound": sigs.bound_to(x, row.digest)} for x in stored]
        return cast(VersionRecord, out)

    def _model(self, s: Session, name: str) -> Model:
        model = s.scalars(select(Model).where(Model.name == canonical_name(name))).first()
        if model is None:
            raise RegistryError(f"no model named '{name}' in registry {self.location.display()}",
                                hint="czreg list shows what is there")
        return model

    def _find(self, s: Session, req: Requirement, prereleases: bool | None) -> tuple[Version, list[str]]:
        if req.digest is not None:
            q = select(Version).where(Version.digest.startswith(req.digest))
            if req.name:
                q = q.where(Version.model_id == self._model(s, req.name).id)
            # several versions may share the bytes: prefer one that is not yanked, then the newest
            rows = sorted(s.scalars(q), key=lambda r: (r.yanked, -r.id))
            if not rows:
                raise RegistryError(f"no version with digest sha256:{req.digest} in the registry")
            if len({r.digest for r in rows}) > 1:
                raise RegistryError(f"digest prefix sha256:{req.digest} is ambiguous",
                                    hint="give more hex digits")
            best = rows[0]
            return best, [f"{self._display(s, best)} {best.version} is yanked: {best.yanked_reason}"] \
                if best.yanked else []
        assert req.name is not None
        model = self._model(s, req.name)
        if req.alias is not None and req.alias not in RESERVED_ALIASES:
            alias = s.get(Alias, (model.id, req.alias))
            if alias is None:
                raise RegistryError(f"{model.display_name} has no alias '@{req.alias}'",
                                    hint=f"czreg alias list {model.display_name} shows its aliases")
            row = s.get(Version, alias.version_id)
            assert row is not None
            if row.yanked:  # the README's rule: a yanked version only by an exact pin, never through an alias
                name = model.display_name
                raise RegistryError(f"{name}@{req.alias} points at {row.version}, which is yanked: "
                                    f"{row.yanked_reason}",
                                    hint=f"pin it exactly ({name}=={row.version}) to use it anyway, or move the "
                                         f"alias: czreg alias set {name} {req.alias} VERSION")
            return row, []
        exact = req.exact
        if exact is not None:
            row = s.scalars(select(Version).where(Version.model_id == model.id,
                                                  Version.version_key == version_key(exact))).first()
            if row is None:
                raise RegistryError(f"{model.display_name} has no version {exact}",
                                    hint=f"czreg show {model.display_name} lists its versions")
            warn = [f"{model.display_name} {row.version} is yanked: {row.yanked_reason}"] if row.yanked else []
            return row, warn
        if req.specifier is None:  # newest: an index walk, no parsing
            order = (Version.sort_key.desc(),) if prereleases else (Version.is_pre.asc(), Version.sort_key.desc())
            row = s.scalars(select(Version).where(Version.model_id == model.id, Version.yanked.is_(False))
                            .order_by(*order).limit(1)).first()
            if row is None:
                yanked = self._yanked_matches(s, model, None, True)
                if yanked:
                    raise RegistryError(f"no version of {model.display_name} is available: {yanked}",
                                        hint=self._pin_hint(model, s))
                raise RegistryError(f"no version of {model.display_name} is available",
                                    hint=f"czreg show {model.display_name} lists its versions")
            return row, []
        cand = select(Version.version, Version.id).where(Version.model_id == model.id, Version.yanked.is_(False))
        low, high = sort_bounds(req.specifier)  # index range first, exact PEP 440 matching below
        if low is not None:
            cand = cand.where(Version.sort_key >= low)
        if high is not None:
            cand = cand.where(Version.sort_key <= high)
        pairs = s.execute(cand).all()
        by_version = {PV(v): i for v, i in pairs}
        matches = select_versions(by_version, req.specifier, prereleases)
        if not matches:
            yanked = self._yanked_matches(s, model, req.specifier, prereleases)
            raise RegistryError(f"no version of {model.display_name} matches '{req.specifier}'"
                                + (f" ({yanked})" if yanked else ""),
                                hint=self._pin_hint(model, s, req.specifier, prereleases) if yanked
                                else f"czreg show {model.display_name} lists its versions")
        row = s.get(Version, by_version[matches[0]])
        assert row is not None
        return row, []

    @staticmethod
    def _yanked_versions(s: Session, model: Model, specifier: SpecifierSet | None,
                         prereleases: bool | None) -> list[Version]:
        """The yanked versions a specifier would have matched (all of them for None), newest first."""
        rows = {PV(r.version): r for r in s.scalars(select(Version).where(Version.model_id == model.id,
                                                                           Version.yanked.is_(True)))}
        return [rows[v] for v in select_versions(rows, specifier, prereleases)] if specifier is not None \
            else [rows[v] for v in sorted(rows, reverse=True)]

    def _yanked_matches(self, s: Session, model: Model, specifier: SpecifierSet | None,
                        prereleases: bool | None) -> str:
        """``"1.0.0 is yanked: REASON"`` for the (newest three) yanked versions that would have matched, so
        "no version matches" never hides that the version the user wants exists but was withdrawn."""
        rows = self._yanked_versions(s, model, specifier, prereleases)
        said = "; ".join(f"{r.version} is yanked: {r.yanked_reason}" for r in rows[:3])
        return said + (f"; and {len(rows) - 3} more yanked" if len(rows) > 3 else "")

    def _pin_hint(self, model: Model, s: Session, specifier: SpecifierSet | None = None,
                  prereleases: bool | None = None) -> str:
        rows = self._yanked_versions(s, model, specifier, prereleases if specifier is not None else True)
        return (f"a yanked version is pulled only by an exact pin ({model.display_name}=={rows[0].version}); "
                f"czreg show {model.display_name} lists its versions")

    def resolve(self, requirement: str | Requirement, *, prereleases: bool | None = None) -> Resolved:
        req = parse_requirement(requirement) if isinstance(requirement, str) else requirement
        with self.reading() as s:
            row, warnings = self._find(s, req, prereleases)
            if not row.valid:
                warnings = [*warnings, f"{self._display(s, row)} {row.version} failed validation and was published "
                                       "with --allow-invalid ('czreg show' lists its findings)"]
            s.expunge(row)
        return Resolved(self._describe(row), warnings)

    @staticmethod
    def _display(s: Session, row: Version) -> str:
        model = s.get(Model, row.model_id)
        return model.display_name if model is not None else "?"

    def show(self, requirement: str, *, prereleases: bool | None = None) -> dict[str, Any]:
        """One version in full (report, provenance), or a model with its versions when only a name is given."""
        req = parse_requirement(requirement)
        if req.name and req.specifier is None and req.alias is None and req.digest is None:
            with self.reading() as s:
                model = self._model(s, req.name)
                rows = s.execute(select(Version.version, Version.digest, Version.size, Version.created_at,
                                        Version.yanked, Version.valid, Version.is_pre)
                                 .where(Version.model_id == model.id).order_by(Version.sort_key.desc())).all()
                aliases = s.execute(select(Alias.name, Version.version).join(Version, Alias.version_id == Version.id)
                                    .where(Alias.model_id == model.id)).all()
                purged = list(s.scalars(select(Tombstone.version).where(Tombstone.model_id == model.id)))
            versions = sorted(rows, key=lambda r: PV(r.version), reverse=True)  # PEP 440: 1.0.0+local > 1
            latest = next((r.version for r in versions if not r.yanked and not r.is_pre),
                          next((r.version for r in versions if not r.yanked), None))
            return {
                "name": model.display_name, "canonical_name": model.name, "latest": latest,
                "aliases": dict(sorted(aliases)),
                "versions": [{"version": r.version, "digest": f"sha256:{r.digest}", "size": r.size,
                              "created_at": iso_time(r.created_at), "yanked": r.yanked, "valid": r.valid}
                             for r in versions],
                "purged": sorted(purged, key=PV),
            }
        with self.reading() as s:
            row, _ = self._find(s, req, prereleases)
            s.expunge(row)
        return dict(self._describe(row, full=True))

    def search(self, *, name: str | None = None, model_type: str | None = None, class_name: str | None = None,
               tag: str | None = None, alias: str | None = None, all_versions: bool = False,
               include_yanked: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        """Versions matching every filter; by default only the newest matching version of each model."""
        q = search_statement(name_pattern=like_pattern(name) if name else None, model_type=model_type,
                             class_name=class_name, tag=tag, alias=alias, all_versions=all_versions,
                             include_yanked=include_yanked, limit=limit)
        with self.reading() as s:
            rows = s.execute(q).all()
        return [{"name": r.display_name, "version": r.version, "digest": f"sha256:{r.digest}", "size": r.size,
                 "type": r.model_type, "classes": json.loads(r.classes) if r.classes else None,
                 "created_at": iso_time(r.created_at), "yanked": r.yanked, "valid": r.valid,
                 **({} if all_versions else {"versions": r.n})} for r in rows]

    def history(self, name: str | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
        q = select(Event).order_by(Event.id.desc())
        if name:
            q = q.where(Event.model_name == canonical_name(name))
        if limit:
            q = q.limit(limit)
        with self.reading() as s:
            events = list(s.scalars(q))
        return [{"id": e.id, "at": iso_time(e.at), "actor": e.actor, "host": e.host, "action": e.action,
                 "model": e.model_name, "version": e.version, "alias": e.alias, "from": e.from_version,
                 "to": e.to_version, "detail": json.loads(e.detail) if e.detail else None} for e in events]

    # --- pull ----------------------------------------------------------------------------------------

    def pull(self, requirement: str, dest: Path | str | None = None, *,
             prereleases: bool | None = None, key: Path | str | None = None, force: bool = True) -> PullResult:
        """Resolve, then stream the blob to ``dest`` while hashing; the file appears only if the digest
        matches (a corrupt or missing blob raises ``RegistryError`` naming the version). With ``key`` it
        appears only if a stored signature by that key verifies (``SignatureError`` otherwise), and the
        ``.sig`` / ``.att`` bundles are written beside it."""
        from ..package import atomic_output, check_overwrite

        resolved = self.resolve(requirement, prereleases=prereleases)
        v = resolved.version
        digest, out, label = pull_target(v, dest)
        check_overwrite(out, force=force, sha256=digest)  # identical bytes are not an overwrite
        try:
            src = self.store.open(digest)
        except FileNotFoundError:
            raise RegistryError(f"the blob of {label} (sha256:{digest[:12]}) is missing from the blob store "
                                f"{self.store.location}", hint="run czreg verify; restore the blob or purge the version"
                                ) from None
        stored = signature_for(self, v, key, label) if key is not None else None
        h = hashlib.sha256()
        verified = None
        with src, atomic_output(out) as tmp:
            with tmp.open("wb") as fh:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    fh.write(chunk)
            if h.hexdigest() != digest:
                raise RegistryError(f"the blob of {label} is corrupt: sha256 {h.hexdigest()[:12]}... != "
                                    f"{digest[:12]}...; nothing written", hint="run czreg verify; restore the blob")
            if stored is not None and key is not None:
                from ..sharing.signing import attestation_path, signature_path, verify_package

                sig, att = stored
                checked = verify_package(tmp, key, signature=sig, attestation=att, name=out.name).to_dict()
                verified = {k: val for k, val in checked.items() if k not in ("report", "smoke")} | {
                    "package": str(out)}
                for data, target in ((sig, signature_path(out)), (att, attestation_path(out))):
                    with atomic_output(target) as t:
                        t.write_bytes(data)
        return PullResult(v, out, resolved.warnings, verified)

    def signatures(self, requirement: str, *, prereleases: bool | None = None) -> list[StoredSignature]:
        """The stored signatures of one version: key id, who stored it when, and both bundles (text)."""
        req = parse_requirement(requirement)
        with self.reading() as s:
            row, _ = self._find(s, req, prereleases)
            stored = sigs.signatures_of(s, row.id)
        return [{"key_id": x.key_id, "created_at": iso_time(x.created_at), "created_by": x.created_by,
                 "signature": x.signature, "attestation": x.attestation} for x in stored]

    # --- evaluations ---------------------------------------------------------------------------------

    def record_evaluation(self, data: dict[str, Any]) -> RecordedEvaluation:
        """Store an evaluation (``czreg evaluate --json``) with every version of its package's bytes."""
        from .evaluations import record_evaluation

        return record_evaluation(self, data)

    def find_evaluations(self, package_digest: str, dataset_digest: str | None = None,
                         definition: str | None = None) -> list[dict[str, Any]]:
        """Full evaluation JSONs of a package (optionally on one dataset / definition), oldest first."""
        from .evaluations import find_evaluation

        return find_evaluation(self, package_digest, dataset_digest, definition)

    # --- settings ------------------------------------------------------------------------------------

    def setting(self, name: str) -> Any:
        with self.reading() as s:
            return sigs.get_setting(s, name)

    def settings(self) -> dict[str, Any]:
        with self.reading() as s:
            return {k: sigs.get_setting(s, k) for k in sigs.SETTINGS}

    def set_setting(self, name: str, value: str) -> dict[str, Any]:
        """Change a registry-wide setting (audited as a ``setting`` event)."""
        key, parsed = sigs.parse_setting(name, value)

        def txn(s: Session) -> dict[str, Any]:
            old, new = sigs.set_setting(s, key, parsed, acting_user())
            self.record_event(s, "setting", "(registry)", setting=key, old=old, new=new)
            return {"setting": key, "from": old, "to": new}

        return self.transaction(txn)

    # --- lifecycle -----------------------------------------------------------------------------------

    def alias_set(self, name: str, alias: str, version: str) -> dict[str, Any]:
        alias = _check_alias(alias)
        key = version_key(parse_version(version))

        def txn(s: Session) -> dict[str, Any]:
            model = self._model(s, name)
            self._model_for_update(s, model.name)
            row = s.scalars(select(Version).where(Version.model_id == model.id, Version.version_key == key)).first()
            if row is None:
                raise RegistryError(f"{model.display_name} has no version {version}")
            if row.yanked:
                raise RegistryError(f"{model.display_name} {row.version} is yanked ({row.yanked_reason}); "
                                    f"@{alias} would not resolve", hint=f"point @{alias} at another version, or "
                                    f"unyank it first: czreg unyank {model.display_name} {row.version}")
            current = s.get(Alias, (model.id, alias))
            old = s.get(Version, current.version_id).version if current else None  # type: ignore[union-attr]
            if current is None:
                s.add(Alias(model_id=model.id, name=alias, version_id=row.id, updated_at=utc_now(),
                            updated_by=acting_user()))
            elif current.version_id != row.id:
                current.version_id, current.updated_at, current.updated_by = row.id, utc_now(), acting_user()
            else:
                return {"name": model.display_name, "alias": alias, "from": old, "to": row.version, "changed": False}
            self.record_event(s, "alias_set" if old is None else "alias_move", model.name, alias=alias,
                        from_version=old, to_version=row.version)
            return {"name": model.display_name, "alias": alias, "from": old, "to": row.version, "changed": True}

        return self.transaction(txn)

    def alias_remove(self, name: str, alias: str) -> dict[str, Any]:
        alias = _check_alias(alias)

        def txn(s: Session) -> dict[str, Any]:
            model = self._model(s, name)
            self._model_for_update(s, model.name)
            current = s.get(Alias, (model.id, alias))
            if current is None:
                raise RegistryError(f"{model.display_name} has no alias '@{alias}'")
            old = s.get(Version, current.version_id)
            s.delete(current)
            self.record_event(s, "alias_remove", model.name, alias=alias, from_version=old.version if old else None)
            return {"name": model.display_name, "alias": alias, "from": old.version if old else None, "to": None}

        return self.transaction(txn)

    def aliases(self, name: str) -> dict[str, str]:
        with self.reading() as s:
            model = self._model(s, name)
            rows = s.execute(select(Alias.name, Version.version).join(Version, Alias.version_id == Version.id)
                             .where(Alias.model_id == model.id)).all()
        return dict(sorted((a, v) for a, v in rows))

    def tag(self, requirement: str, set_tags: dict[str, str], remove: list[str] | None = None) -> dict[str, str]:
        """Tags are labels on a version (mutable, audited); the version itself stays immutable."""
        req = parse_requirement(requirement)
        set_tags = check_tags(set_tags)

        def txn(s: Session) -> dict[str, str]:
            row, _ = self._find(s, req, None)
            model = s.get(Model, row.model_id)
            assert model is not None
            for k, v in set_tags.items():
                existing = s.get(Tag, (row.id, k))
                if existing is None:
                    s.add(Tag(version_id=row.id, key=k, value=v))
                else:
                    existing.value = v
            for k in remove or []:
                s.execute(delete(Tag).where(Tag.version_id == row.id, Tag.key == k))
            self.record_event(s, "tag", model.name, version=row.version, set=set_tags, removed=remove or [])
            s.flush()
            return {t.key: t.value for t in s.scalars(select(Tag).where(Tag.version_id == row.id))}

        return self.transaction(txn)

    def _exact(self, s: Session, name: str, version: str) -> tuple[Model, Version]:
        model = self._model(s, name)
        row = s.scalars(select(Version).where(Version.model_id == model.id,
                                              Version.version_key == version_key(parse_version(version)))).first()
        if row is None:
            raise RegistryError(f"{model.display_name} has no version {version}")
        return model, row

    def yank(self, name: str, version: str, reason: str) -> dict[str, Any]:
        """Hide a version from specifiers and the newest release; aliases that point at it are refused when
        resolved (``aliases`` in the answer names them); exact pins still get it, with a warning."""
        if not reason.strip():
            raise UsageError("a yank needs a reason", hint="--reason 'wrong normalisation'")

        def txn(s: Session) -> dict[str, Any]:
            model, row = self._exact(s, name, version)
            row.yanked, row.yanked_reason, row.yanked_at, row.yanked_by = True, reason, utc_now(), acting_user()
            self.record_event(s, "yank", model.name, version=row.version, reason=reason)
            # aliases keep pointing here (an alias is the team's decision), but resolving them is refused
            # from now on: say which, so nobody learns it from a failed pull
            aliases = sorted(s.scalars(select(Alias.name).where(Alias.version_id == row.id)))
            return {"name": model.display_name, "version": row.version, "yanked": True, "reason": reason,
                    "aliases": aliases}

        return self.transaction(txn)

    def unyank(self, name: str, version: str) -> dict[str, Any]:
        def txn(s: Session) -> dict[str, Any]:
            model, row = self._exact(s, name, version)
            row.yanked, row.yanked_reason, row.yanked_at, row.yanked_by = False, None, None, None
            self.record_event(s, "unyank", model.name, version=row.version)
            return {"name": model.display_name, "version": row.version, "yanked": False}

        return self.transaction(txn)

    def purge(self, name: str, version: str, *, reason: str | None = None) -> dict[str, Any]:
        """Delete a version for good (tombstone first: the number stays taken); its blob goes too unless
        another version shares it."""

        def txn(s: Session) -> tuple[dict[str, Any], str]:
            model, row = self._exact(s, name, version)
            self._model_for_update(s, model.name)
            s.add(Tombstone(model_id=model.id, version_key=row.version_key, version=row.version, digest=row.digest,
                            purged_at=utc_now(), purged_by=acting_user(), reason=reason))
            s.flush()
            for a in s.scalars(select(Alias).where(Alias.version_id == row.id)):
                self.record_event(s, "alias_remove", model.name, alias=a.name, from_version=row.version, cause="purge")
                s.delete(a)
            s.execute(delete(Tag).where(Tag.version_id == row.id))
            s.execute(delete(Signature).where(Signature.version_id == row.id))
            s.flush()
            s.delete(row)
            self.record_event(s, "purge", model.name, version=row.version, digest=row.digest, reason=reason)
            return {"name": model.display_name, "version": row.version, "digest": f"sha256:{row.digest}"}, row.digest

        out, digest = self.transaction(txn)
        removed = self._collect([digest])
        out["blob_removed"] = bool(removed)
        return out

    def _collect(self, candidates: list[str] | None) -> list[tuple[str, int]]:
        """Delete unreferenced blobs (all, or only ``candidates``) under the exclusive blob lock."""

        def txn(s: Session) -> list[tuple[str, int]]:
            db.advisory_lock(s.connection(), _GC_LOCK_KEY)
            referenced = set(s.scalars(select(Version.digest).distinct()))
            if candidates is None:
                pool = [(b.digest, b.size) for b in self.store.iter_blobs()]
            else:
                pool = [(d, 0) for d in candidates]
            removed = [(d, n) for d, n in pool if d not in referenced and self.store.exists(d)]
            for d, _ in removed:
                self.store.delete(d)
            return removed

        return self.transaction(txn)

    def gc(self, *, dry_run: bool = False, temp_grace_s: float = 3600.0) -> dict[str, Any]:
        """Remove blobs no version references, and temp files of writers killed more than
        ``temp_grace_s`` ago (a live writer's temp file is younger)."""
        if dry_run:
            with self.reading() as s:
                referenced = set(s.scalars(select(Version.digest).distinct()))
            orphans = [(b.digest, b.size) for b in self.store.iter_blobs() if b.digest not in referenced]
            return {"dry_run": True, "blobs": [f"sha256:{d}" for d, _ in orphans],
                    "bytes": sum(n for _, n in orphans), "temp_files": 0}
        removed = self._collect(None)
        temp = self.store.sweep_temp(temp_grace_s)
        return {"dry_run": False, "blobs": [f"sha256:{d}" for d, _ in removed], "bytes": sum(n for _, n in removed),
                "temp_files": temp}

    def verify(self) -> dict[str, Any]:
        """Re-hash every referenced blob; report missing or changed bytes with the versions they break."""
        with self.reading() as s:
            rows = s.execute(select(Model.display_name, Version.version, Version.digest, Version.size)
                             .join(Model, Version.model_id == Model.id)).all()
        by_digest: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for r in rows:
            by_digest.setdefault(r.digest, []).append(f"{r.display_name} {r.version}")
            sizes[r.digest] = r.size
        problems: list[dict[str, Any]] = []
        checked_bytes = 0
        for digest, versions in sorted(by_digest.items()):
            try:
                h = hashlib.sha256()
                with self.store.open(digest) as fh:
                    while chunk := fh.read(CHUNK):
                        h.update(chunk)
                        checked_bytes += len(chunk)
            except FileNotFoundError:
                problems.append({"digest": f"sha256:{digest}", "problem": "missing", "versions": versions})
                continue
            if h.hexdigest() != digest:
                problems.append({"digest": f"sha256:{digest}", "problem": f"corrupt (now sha256:{h.hexdigest()})",
                                 "versions": versions})
        return {"blobs": len(by_digest), "versions": len(rows), "bytes": checked_bytes, "ok": not problems,
                "problems": problems}


def package_model_name(path: Path | str, name: str | None = None) -> str:
    """The canonical model name ``publish`` would file ``path`` under (``name``, else the package's
    ModelName, else the file name); a server checks a token's model pattern with it before storing."""
    from ..admission import identify

    return identify(Path(path), name).canonical


def search_statement(*, name_pattern: str | None = None, model_type: str | None = None,
                     class_name: str | None = None, tag: str | None = None, alias: str | None = None,
                     all_versions: bool = False, include_yanked: bool = False, limit: int | None = None) -> Any:
    """The ``search`` query (``name_pattern``: a canonical LIKE pattern, see ``like_pattern``). Module-level
    so ``quicklist`` can compile the SQL of its common shapes from this one definition."""
    q: Any = (select(Model.display_name, Model.name, Version.id, Version.version, Version.digest, Version.size,
                     Version.model_type, Version.classes, Version.created_at, Version.yanked, Version.valid)
              .join(Model, Version.model_id == Model.id))
    if name_pattern is not None:
        q = q.where(Model.name.like(name_pattern))
    if model_type:
        q = q.where(func.lower(Version.model_type) == model_type.lower())
    if class_name:
        q = q.where(Version.classes.like(f"%{json.dumps(class_name)}%"))
    if tag:
        k, _, v = tag.partition("=")
        sub = select(Tag.version_id).where(Tag.key == k)
        if v:
            sub = sub.where(Tag.value == v)
        q = q.where(Version.id.in_(sub))
    if alias:
        q = q.where(Version.id.in_(select(Alias.version_id).where(Alias.name == alias.lower())))
    if not include_yanked:
        q = q.where(Version.yanked.is_(False))
    if all_versions:
        q = q.order_by(Model.name, Version.sort_key.desc())
    else:  # newest matching version per model (finals before pre-releases), counted, in one query
        order = (Version.is_pre.asc(), Version.sort_key.desc())
        ranked = q.add_columns(
            func.row_number().over(partition_by=Version.model_id, order_by=order).label("rn"),
            func.count().over(partition_by=Version.model_id).label("n")).subquery()
        q = select(ranked).where(ranked.c.rn == 1).order_by(ranked.c.name)
    if limit:
        q = q.limit(limit)
    return q




def _check_alias(alias: str) -> str:
    import re

    alias = alias.lstrip("@").lower()
    if alias in RESERVED_ALIASES:
        raise UsageError(f"'@{alias}' is reserved: it always means the newest release",
                         hint="choose another alias name, e.g. production or staging")
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?", alias) or alias.startswith("sha256"):
        raise UsageError(f"invalid alias '{alias}'", hint="use letters, digits, '.', '_' and '-'")
    return alias


def _insert(s: Session) -> Any:
    """The dialect's INSERT (both have ``on_conflict_do_nothing``)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def _trigger_message(msg: str) -> str:
    """The database's own refusal, without driver noise."""
    start = msg.find("czreg-")
    line = msg[start:].splitlines()[0]
    return "the registry database refused the change: " + line.split(": ", 1)[-1]


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
