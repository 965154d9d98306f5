"""Where a registry lives, without importing SQLAlchemy (the CLI calls this at start-up).

Order: the ``--registry`` option, then ``CZREG_REGISTRY``, then ``<data dir>/registry`` where the data dir
is ``CZREG_HOME`` or the per-user data folder (platformdirs). A location is a database URL
(``sqlite:///...``, ``postgresql+psycopg://...``) or a folder (holding ``registry.db`` and ``blobs/``).
A SQLite registry keeps its blobs beside the database; a PostgreSQL registry needs a shared blob store
from ``--blob-store`` or ``CZREG_BLOB_STORE``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistryError

__all__ = ["RegistryLocation", "data_dir", "is_loopback", "is_remote", "private_files", "require_existing",
           "resolve_location"]

DB_NAME = "registry.db"


def data_dir() -> Path:
    """``CZREG_HOME`` when set (tests, portable installs), else the per-user data folder."""
    home = os.environ.get("CZREG_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("czregistry", appauthor=False))


@dataclass(frozen=True)
class RegistryLocation:
    url: str  # SQLAlchemy URL
    blob_store: str  # folder path or file:// URL

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def display(self) -> str:
        """The URL without a password, for messages."""
        if "://" in self.url and "@" in self.url:
            scheme, _, rest = self.url.partition("://")
            cred, _, host = rest.rpartition("@")
            user = cred.split(":", 1)[0]
            return f"{scheme}://{user}@{host}"
        return self.url


def is_remote(text: str | None) -> bool:
    """An ``http://`` or ``https://`` URL: a registry server (``czreg serve``), reached by
    ``czregistry.registry.remote``."""
    return bool(text) and str(text).lower().startswith(("http://", "https://"))


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: the only hosts plain HTTP is fine for."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_location(registry: str | None = None, blob_store: str | None = None) -> RegistryLocation:
    text = registry or os.environ.get("CZREG_REGISTRY") or str(data_dir() / "registry")
    if is_remote(text):
        raise RegistryError(f"{text} is a registry server; this works on a registry database",
                            hint="run it where the database is, with --registry pointing at it (a folder, "
                                 "sqlite:/// or postgresql+psycopg:// URL)")
    blobs = blob_store or os.environ.get("CZREG_BLOB_STORE") or None
    if "://" not in text:
        path = Path(text).expanduser().absolute()
        db = path if path.suffix in (".db", ".sqlite", ".sqlite3") else path / DB_NAME
        return RegistryLocation(f"sqlite:///{db}", blobs or str(db.parent / "blobs"))
    if text.startswith("sqlite"):
        db_part = text.split("://", 1)[1].lstrip("/")
        if not db_part or db_part.startswith(":memory:"):
            raise RegistryError("an in-memory SQLite registry cannot hold blobs",
                                hint="give a file: sqlite:////path/registry.db")
        db = Path(text.split(":///", 1)[1]).expanduser().absolute() if ":///" in text else Path(db_part)
        return RegistryLocation(f"sqlite:///{db}", blobs or str(db.parent / "blobs"))
    if text.startswith("postgres"):
        scheme, _, rest = text.partition("://")
        if scheme in ("postgres", "postgresql"):  # psycopg 3 is the driver we ship
            text = f"postgresql+psycopg://{rest}"
        if blobs is None:
            raise RegistryError("a PostgreSQL registry needs a shared blob store",
                                hint="set CZREG_BLOB_STORE (or --blob-store) to a folder every machine can reach")
        return RegistryLocation(text, blobs)
    raise RegistryError(f"unsupported registry URL '{text}'",
                        hint="use a folder, sqlite:////path/registry.db or postgresql+psycopg://user@host/db")


def require_existing(location: RegistryLocation, given: str) -> None:
    """Refuse a SQLite registry the user named (``--registry`` / ``CZREG_REGISTRY``) whose folder does not
    exist: a typo (``"not a url at all"``, ``sqlite:///missing-dir/x.db``) must not quietly create an empty
    registry in the current folder and answer "No models found". ``czreg init`` creates one on purpose; the
    per-user default location is created on first use."""
    if not location.is_sqlite:
        return
    db = Path(location.url.split(":///", 1)[1])
    if db.exists() or db.parent.is_dir():
        return
    raise RegistryError(f"no registry at '{given}' ({db.parent} does not exist)",
                        hint="check --registry / CZREG_REGISTRY (a folder, sqlite:////path/registry.db or "
                             "postgresql+psycopg://...), or create a registry there with 'czreg init LOCATION'")


def private_files() -> bool:
    """Whether a SQLite registry's folder, database and blobs are created for this user only (0700/0600).
    ``CZREG_SHARED_REGISTRY=1`` (a team folder) keeps the process umask instead, so a group can share it."""
    return os.environ.get("CZREG_SHARED_REGISTRY", "").strip().lower() not in ("1", "true", "yes", "on")
