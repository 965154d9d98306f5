"""Versioned JSON schemas (shipped in the wheel) and schema selection for package metadata.

PLACEHOLDER API, to be completed: see issue 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .report import Finding

if TYPE_CHECKING:
    from .package import Package
    from .report import Report


def validate_package_metadata(package: Package, report: Report) -> list[Finding]:
    return []
