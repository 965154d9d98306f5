"""The registry's tables (SQLAlchemy 2.x ORM). The schema itself is created by the Alembic migrations in
``migrations/``; a test checks that these classes and the migrated database agree.

``versions`` rows are immutable once written except for the yank fields; the database enforces that with
triggers (see ``migrations/versions/r0002_immutability.py``). A purge first writes a ``tombstones`` row;
the database refuses to delete a version without one and refuses to insert a version whose key has one,
so version numbers are never reused.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Alias", "Base", "Evaluation", "Event", "Model", "Setting", "Signature", "Tag", "Token", "Tombstone",
           "Version"]


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # canonical (PEP 503)
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version_key", name="uq_versions_model_key"),
        Index("ix_versions_digest", "digest"),
        Index("ix_versions_model_type", "model_type"),
        Index("ix_versions_model_sort", "model_id", "sort_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[str] = mapped_column(String(100))
    version_key: Mapped[str] = mapped_column(String(100))
    #: Byte order = PEP 440 order (``versions.sort_key``); with ``is_pre`` lets SQL find the newest (schema 3).
    sort_key: Mapped[str] = mapped_column(String(255), nullable=True)
    is_pre: Mapped[bool] = mapped_column(Boolean, nullable=True)
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(20))
    model_type: Mapped[str | None] = mapped_column(String(100))
    classes: Mapped[str | None] = mapped_column(Text)  # JSON list
    valid: Mapped[bool] = mapped_column(Boolean)
    allow_invalid: Mapped[bool] = mapped_column(Boolean)
    report: Mapped[str] = mapped_column(Text)  # Report.to_json()
    smoke: Mapped[str | None] = mapped_column(Text)  # smoke-test Report JSON (schema 2)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    source_name: Mapped[str] = mapped_column(String(500))
    czreg_version: Mapped[str] = mapped_column(String(50))
    note: Mapped[str | None] = mapped_column(Text)
    yanked: Mapped[bool] = mapped_column(Boolean, default=False)
    yanked_reason: Mapped[str | None] = mapped_column(Text)
    yanked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    yanked_by: Mapped[str | None] = mapped_column(String(200))


class Alias(Base):
    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(200))


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (Index("ix_tags_key_value", "key", "value"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Event(Base):
    """Append-only audit (triggers forbid UPDATE and DELETE): publishes, alias moves, yanks, purges."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_model", "model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    model_name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str | None] = mapped_column(String(100))
    alias: Mapped[str | None] = mapped_column(String(100))
    from_version: Mapped[str | None] = mapped_column(String(100))
    to_version: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[str | None] = mapped_column(Text)  # JSON


class Tombstone(Base):
    """A purged version: its number stays taken for ever (schema 2)."""

    __tablename__ = "tombstones"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    version_key: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64))
    purged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    purged_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)


class Signature(Base):
    """A version's signature by one key (schema 4): the ``.sig`` and ``.att`` bundles exactly as signed.
    Never updated (trigger); deleted only with its version (purge)."""

    __tablename__ = "signatures"
    __table_args__ = (UniqueConstraint("version_id", "key_id", name="uq_signatures_version_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    key_id: Mapped[str] = mapped_column(String(64))  # SHA-256 of the signer's public key PEM
    signature: Mapped[str] = mapped_column(Text)  # model-signing bundle (JSON)
    attestation: Mapped[str] = mapped_column(Text)  # in-toto attestation bundle (JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))


class Setting(Base):
    """A registry-wide setting (schema 4), e.g. ``require_signatures``; changes are audited as events."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)  # JSON
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(200))


class Token(Base):
    """An API token of the registry server (schema 5): only the SHA-256 of the secret is stored."""

    __tablename__ = "tokens"
    __table_args__ = (
        UniqueConstraint("name", name="uq_tokens_name"),
        UniqueConstraint("secret_hash", name="uq_tokens_secret_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(20))  # read | publish | admin
    model_pattern: Mapped[str | None] = mapped_column(String(200))  # glob on canonical model names
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_by: Mapped[str | None] = mapped_column(String(200))


class Evaluation(Base):
    """A measured evaluation (``czreg evaluate --record``), append-only (triggers forbid UPDATE and DELETE).

    Keyed by what makes the numbers reproducible: the package bytes, the dataset bytes and pairing, and the
    metric definitions. Not tied to a version row: every version with these bytes shows it, and a purge
    leaves the measurement (schema r0006)."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("package_digest", "dataset_digest", "definition", name="uq_evaluations_key"),
        Index("ix_evaluations_package", "package_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package_digest: Mapped[str] = mapped_column(String(64))  # hex sha256, like versions.digest
    dataset_digest: Mapped[str] = mapped_column(String(80))  # "sha256:..."
    definition: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(20))
    images: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(Text)  # the evaluation JSON (docs/evaluate.md)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    czreg_version: Mapped[str] = mapped_column(String(50))
