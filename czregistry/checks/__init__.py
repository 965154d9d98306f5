"""Validation checks and the context they share.

Every check, built-in or from a plugin, is an object with ``id``, ``needs_model``, ``order`` and
``run(ctx) -> Iterable[Finding]``. Static checks only read ``ctx.package``; model checks ask
``ctx.session`` for a loaded model, which is loaded once per validation and shared, and keep expensive
predictions in ``ctx.cache`` so probing cost grows with tile area, not with the number of checks.
This module is itself a default plugin: it registers the built-in checks through the same hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..backends import Device, Session
from ..hookspecs import hookimpl
from ..metadata import ModelInfo
from ..package import Package, ReadLimits
from ..progress import step
from ..report import Finding, Report

__all__ = ["Check", "CheckContext", "SessionLoader", "ValidateOptions", "validate_check"]


@dataclass(frozen=True)
class ValidateOptions:
    static: bool = False
    strict: bool = False
    backend: str | None = None
    device: Device = "auto"
    limits: ReadLimits = field(default_factory=ReadLimits)
    #: Largest spatial size (per axis) model probes may feed the network.
    max_probe_size: int = 2048
    #: Soft limit in seconds for probing; checks stop adding probes once exceeded.
    time_budget: float = 60.0
    #: Run the model checks even when the static graph audit refuses the graph (``--trust-graph``: for your
    #: own models only). The audit's errors stay in the report: the package is still unsafe to share.
    trust_graph: bool = False


@runtime_checkable
class Check(Protocol):
    id: str
    needs_model: bool
    order: int

    def run(self, ctx: CheckContext) -> Iterable[Finding]: ...


def validate_check(obj: Any) -> str:
    if not isinstance(obj, Check) or not isinstance(obj.id, str) or not obj.id:
        raise TypeError("register_checks expects an object with id, needs_model, order and run(ctx)")
    return obj.id


#: How a context loads the package's model: ``czregistry.selection.load_session`` in ``validate``. Passed in, not
#: imported, so this interface module stays a leaf beside the plugin host.
SessionLoader = Callable[[Package, "str | None", Device], Session]


@dataclass
class CheckContext:
    package: Package
    report: Report
    options: ValidateOptions
    load_session: SessionLoader
    cache: dict[str, Any] = field(default_factory=dict)
    _session: Session | None = None

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_package(self.package)

    @property
    def session(self) -> Session:
        """The package's model, loaded on first use by the selected backend."""
        if self._session is None:
            with step("validate: loading the model"):
                self._session = self.load_session(self.package, self.options.backend, self.options.device)
            self.report.measurements.setdefault("backend", self._session.backend)
            self.report.measurements.setdefault("device", self._session.device)
        return self._session

    @property
    def loaded_session(self) -> Session | None:
        """The session if a check loaded one (``session`` loads on first use; this never does)."""
        return self._session

    def measure(self, key: str, value: Any) -> None:
        self.report.measurements[key] = value

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@dataclass(frozen=True)
class _LazyModelCheck:
    """A model check registered by name: ``czreg validate --static`` must not pay for importing NumPy and the
    probing engine just to list checks it will skip. ``tests/test_model_checks.py`` keeps these ids and
    orders equal to ``model.CHECKS``."""

    id: str
    order: int
    cls: str
    needs_model: bool = True

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        from . import model

        check: Check = getattr(model, self.cls)()
        return check.run(ctx)


MODEL_CHECKS = (
    _LazyModelCheck("model.signature", 100, "SignatureCheck"),
    _LazyModelCheck("model.output", 110, "OutputCheck"),
    _LazyModelCheck("model.invariance", 120, "InvarianceCheck"),
    _LazyModelCheck("model.receptive_field", 130, "ReceptiveFieldCheck"),
)


@hookimpl
def register_checks(register: Any) -> None:
    from . import metadata as metadata_checks
    from .compat import CompatibilityCheck
    from .graph import GraphAuditCheck

    for check in [*metadata_checks.CHECKS, CompatibilityCheck(), GraphAuditCheck(), *MODEL_CHECKS]:
        register(check)
