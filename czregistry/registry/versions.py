"""Version numbers and requirement strings, the way pip reads them.

Versions are PEP 440 (``packaging``). ``1.0`` and ``1.0.0`` are the same version to ``packaging``, so the
registry stores a normalised key (trailing zeros stripped, lower-case, canonical spelling) and makes that
key unique: two spellings can never hold two different packages. Requirement strings:

``name`` (latest), ``name==1.2.0``, ``name>=1.2,<2``, ``name@production`` (alias), ``sha256:<hex>`` or
``name@sha256:<hex>`` (digest).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name, canonicalize_version
from packaging.version import InvalidVersion, Version

from ..errors import UsageError

__all__ = ["MAX_VERSION_LENGTH", "Bump", "Requirement", "bump", "canonical_name", "derived_name", "parse_requirement",
           "parse_version", "select_versions", "shown_name", "sort_bounds", "sort_key", "version_key"]

Bump = Literal["major", "minor", "patch"]

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_DIGEST_RE = re.compile(r"^sha256:([0-9a-fA-F]{8,64})$")


#: Longest model name: fits a file name (``NAME-VERSION.czann``), a terminal column and an OCI repository.
MAX_NAME_LENGTH = 100
#: Longest version string: far above any real one (``2024.12.31.post3.dev1+lab.gpu``), and short enough that
#: no number in it reaches Python's 4,300-digit limit for int() (a ValueError deep inside ``packaging``).
MAX_VERSION_LENGTH = 100
#: Longest version specifier in a requirement (several clauses of ``MAX_VERSION_LENGTH`` each).
MAX_SPECIFIER_LENGTH = 500


def canonical_name(name: str) -> str:
    """PEP 503 name: ``Nuclei_Seg`` and ``nuclei-seg`` are one model."""
    if not name.strip():
        raise UsageError("the model name is empty", hint="give a name: --name nuclei-seg")
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(f"the model name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed",
                         hint="choose a shorter --name")
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"invalid model name {shown_name(name)}",
                         hint="use letters, digits, '.', '_' and '-', starting and ending with a letter or digit")
    return canonicalize_name(name)


def shown_name(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message: control characters, NUL and bidirectional overrides (U+202E)
    escaped (``'\\u202e'``), so a hostile name can neither break the line nor reorder the terminal's text."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def derived_name(text: str, source: str) -> str:
    """The canonical name of a model named by its package (``source``: "the package's ModelName" or "the
    file name") rather than by ``--name``.

    The name passes the very rules ``--name`` does (``canonical_name``); the only leniency is that a
    ModelName is a display name, so a plain space stands for '-' (``Web Model`` is filed as ``web-model``
    and shown as ``Web Model``). Anything else the rules refuse (a NUL, U+202E, ``<script>``, a name of
    only punctuation such as ``<<<>>>`` or ``..``) is refused, never silently rewritten: two such names
    could otherwise both become one registry name.
    """
    try:
        return canonical_name(text.replace(" ", "-"))
    except UsageError as exc:
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:MAX_NAME_LENGTH].strip("-._")
        try:
            canonical_name(suggestion)
            hint = f"pass --name, e.g. --name {suggestion}"
        except UsageError:
            hint = "pass --name NAME (letters, digits, '.', '_' and '-')"
        why = exc.message.removeprefix("the model name ")
        if why == exc.message:  # the character rule
            why = "a name has letters, digits, '.', '_', '-' and spaces, and starts and ends with a letter or digit"
        raise UsageError(f"{source} {shown_name(text)} is not a valid registry name ({why}); not published",
                         hint=hint) from None


def parse_version(text: str) -> Version:
    if len(text) > MAX_VERSION_LENGTH:
        raise UsageError(f"the version is {len(text)} characters long; at most {MAX_VERSION_LENGTH} are allowed",
                         hint="use a PEP 440 version such as 1.2.0")
    try:
        return Version(text)
    except (InvalidVersion, ValueError):
        raise UsageError(f"invalid version '{text}'", hint="use a PEP 440 version such as 1.2.0") from None


def version_key(version: Version | str) -> str:
    """The unique key: ``1.0``, ``1.0.0`` and ``1.00`` all give ``1``."""
    return canonicalize_version(str(version), strip_trailing_zero=True)


def sort_key(version: Version | str) -> str:
    """A string whose byte order is PEP 440 order, so the database can sort and index versions.

    Mirrors ``packaging``'s comparison key: epoch; release without trailing zeros (each component 12
    digits, ``!`` ends the release so ``1.2`` sorts before ``1.2.1``); then pre-release (a dev release of a
    final sorts before its pre-releases, a final after them), post and dev. Local labels are ignored (ties).
    The encoding is stored (migration r0003): changing it needs a migration that rewrites the column.
    """
    v = version if isinstance(version, Version) else Version(version)
    release = list(v.release)
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    out = f"{min(v.epoch, 999_999):06d}" + "".join(f".{min(c, 10**12 - 1):012d}" for c in release[:12]) + "!"
    if v.pre is None:
        out += "0" if v.post is None and v.dev is not None else "2"
    else:
        out += "1" + {"a": "a", "b": "b", "rc": "c"}[v.pre[0]] + f"{min(v.pre[1], 10**12 - 1):012d}"
    out += "0" if v.post is None else f"1{min(v.post, 10**12 - 1):012d}"
    out += "1" if v.dev is None else f"0{min(v.dev, 10**12 - 1):012d}"
    return out


def sort_bounds(specifier: SpecifierSet) -> tuple[str | None, str | None]:
    """(low, high) ``sort_key`` bounds that every version matching ``specifier`` lies within (inclusive):
    a superset, so the database can narrow the candidates with the index and ``packaging`` decides."""
    low: str | None = None
    high: str | None = None
    for spec in specifier:
        op, text = spec.operator, spec.version
        if text.endswith(".*") or op in ("!=", "==="):
            continue
        try:
            key = sort_key(Version(text))
        except InvalidVersion:
            continue
        if op in (">=", ">", "~=", "=="):
            low = key if low is None else max(low, key)
        if op in ("<=", "<", "=="):
            high = key if high is None else min(high, key)
    return low, high


def bump(latest: Version | None, part: Bump) -> Version:
    """Next release after ``latest`` (SemVer habit: three components). No latest: ``1.0.0`` for major,
    ``0.1.0`` for minor, ``0.0.1`` for patch. ``latest`` is the highest number ever used, pre-releases and
    purged versions included, so a bump never lands on a taken number."""
    if latest is None:
        return Version({"major": "1.0.0", "minor": "0.1.0", "patch": "0.0.1"}[part])
    major, minor, patch = ([*latest.release, 0, 0][:3])
    if part == "major":
        return Version(f"{latest.epoch}!{major + 1}.0.0" if latest.epoch else f"{major + 1}.0.0")
    new = f"{major}.{minor + 1}.0" if part == "minor" else f"{major}.{minor}.{patch + 1}"
    return Version(f"{latest.epoch}!{new}" if latest.epoch else new)


@dataclass(frozen=True)
class Requirement:
    """What a user asked for. Exactly one of ``specifier``, ``alias``, ``digest`` may be set; none means
    the latest release."""

    name: str | None  # canonical
    specifier: SpecifierSet | None = None
    alias: str | None = None
    digest: str | None = None  # lower-case hex, possibly a prefix (>= 8 chars)

    @property
    def exact(self) -> Version | None:
        """The pinned version for ``==X`` / ``===X`` without wildcards: the only way to get a yanked one."""
        if self.specifier is None:
            return None
        specs = list(self.specifier)
        if len(specs) == 1 and specs[0].operator in ("==", "===") and not specs[0].version.endswith(".*"):
            try:
                return Version(specs[0].version)
            except InvalidVersion:
                return None
        return None

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@sha256:{self.digest}" if self.name else f"sha256:{self.digest}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}{self.specifier or ''}"


def _bad_digest(text: str) -> UsageError:
    return UsageError(f"cannot read digest '{text}': give 8 to 64 hex digits after 'sha256:' (a prefix of at "
                      "least 8 digits picks the version when it is unambiguous)",
                      hint="czreg show NAME lists the digests")


def parse_requirement(text: str) -> Requirement:
    """Parse ``name``, ``name<spec>``, ``name@alias``, ``[name@]sha256:hex``."""
    text = text.strip()
    if m := _DIGEST_RE.match(text):
        return Requirement(None, digest=m.group(1).lower())
    if text.lower().startswith("sha256:"):
        raise _bad_digest(text)
    m = _NAME_RE.match(text)
    if not m:
        raise UsageError(f"cannot read requirement '{text}'",
                         hint="write NAME, NAME==1.2.0, 'NAME>=1.2,<2', NAME@ALIAS or sha256:DIGEST")
    name, rest = canonical_name(m.group(0)), text[m.end():].strip()
    if not rest:
        return Requirement(name)
    if rest.startswith("@"):
        target = rest[1:].strip()
        if d := _DIGEST_RE.match(target):
            return Requirement(name, digest=d.group(1).lower())
        if target.lower().startswith("sha256:"):
            raise _bad_digest(target)
        if not _NAME_RE.fullmatch(target):
            raise UsageError(f"invalid alias in '{text}'", hint="aliases use letters, digits, '.', '_' and '-'")
        return Requirement(name, alias=target.lower())
    if rest[0].isdigit():  # "name 1.2.0" or "name1.2"? only the spaced form is unambiguous
        rest = f"=={rest}"
    if len(rest) > MAX_SPECIFIER_LENGTH:
        raise UsageError(f"the version specifier in the requirement is {len(rest)} characters long; at most "
                         f"{MAX_SPECIFIER_LENGTH} are allowed", hint="use a PEP 440 specifier such as '>=1.2,<2'")
    try:
        return Requirement(name, specifier=SpecifierSet(rest))
    except (InvalidSpecifier, ValueError):
        raise UsageError(f"invalid version specifier '{rest}' in '{text}'",
                         hint="use a PEP 440 specifier such as '>=1.2,<2' or '==1.2.0'") from None


def select_versions(versions: Iterable[Version], specifier: SpecifierSet | None,
                    prereleases: bool | None = None) -> list[Version]:
    """Matching versions, newest first. Pre-releases only when asked, or when the specifier names one, or
    when nothing else matches (pip's rule, which ``SpecifierSet.filter`` implements)."""
    spec = specifier if specifier is not None else SpecifierSet()
    return sorted(spec.filter(versions, prereleases=prereleases), reverse=True)
