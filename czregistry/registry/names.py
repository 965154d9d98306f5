"""Name patterns as the registry matches them: canonical LIKE patterns shared by the ORM queries (``api``,
``tokens``) and the SQLAlchemy-free ``czreg list`` path (``quicklist``). A leaf, so all three can import it.
"""

from __future__ import annotations

import re

__all__ = ["canonical_like", "like_pattern", "slug"]


def canonical_like(pattern: str) -> str:
    """Canonicalise a LIKE pattern the way names are (lower-case, runs of ``-_.`` become ``-``)."""
    return re.sub(r"[-_.]+", "-", pattern).lower()


def like_pattern(name: str) -> str:
    """``list NAME``'s LIKE pattern: a glob (``nuclei*``) or a substring."""
    return canonical_like(name.replace("*", "%") if "*" in name else f"%{name}%")


def slug(text: str) -> str:
    """``text`` reduced to letters, digits and ``._-`` (runs of anything else become ``-``); ``model`` if
    nothing is left. Token model patterns match display names through it."""
    slugged = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return slugged or "model"
