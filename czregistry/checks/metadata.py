"""Static metadata checks: the schema, then what the schema cannot express."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..report import Finding

if TYPE_CHECKING:
    from . import CheckContext


@dataclass(frozen=True)
class SchemaCheck:
    id: str = "metadata.schema"
    needs_model: bool = False
    order: int = 10

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        from ..schemas import validate_package_metadata

        return validate_package_metadata(ctx.package, ctx.report)


CHECKS: list[object] = [SchemaCheck()]
