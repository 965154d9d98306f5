"""``model.graph.unsafe_ops``: the static graph audit as a check, so every report (``--static`` too) says what
the model would execute before any model check runs it. The audit itself is ``czregistry.audit``."""

from __future__ import annotations

from dataclasses import dataclass

from ..audit import GRAPH_AUDIT_CHECK, MAX_LISTED, audit_package
from ..report import Finding
from . import CheckContext

__all__ = ["GRAPH_AUDIT_CHECK", "GraphAuditCheck"]


@dataclass(frozen=True)
class GraphAuditCheck:
    """One error per refused operation (the first ``MAX_LISTED``); the audit itself goes to the measurements."""

    id: str = GRAPH_AUDIT_CHECK
    needs_model: bool = False
    order: int = 50

    def run(self, ctx: CheckContext) -> list[Finding]:
        audit = audit_package(ctx.package)
        ctx.measure("graph_audit", audit.to_dict())
        hint = ("the package's model would do this wherever it runs (validation, ZEN, a partner's machine); "
                "re-export it without these operations")
        if audit.problem is not None:
            return [Finding.error(self.id, audit.summary(), location=ctx.package.model_member,
                                  hint="re-export the model; nothing runs a graph that cannot be audited")]
        if not audit.unsafe:  # a fact, not a finding: a clean package keeps a clean report (JSON has the audit)
            return []
        out = [Finding.error(self.id, f"the graph calls {u.op}, which {u.reason}", location=u.where + (
            f", node '{u.node}'" if u.node else ""), hint=hint) for u in audit.unsafe[:MAX_LISTED]]
        if len(audit.unsafe) > MAX_LISTED:
            out.append(Finding.error(self.id, f"... and {len(audit.unsafe) - MAX_LISTED} more refused operations",
                                     hint="'czreg validate --json' lists them all under measurements.graph_audit"))
        return out
