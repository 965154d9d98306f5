"""Validation: read the package safely, then run every registered check in order into one report."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from .audit import GRAPH_AUDIT_CHECK
from .checks import CheckContext, ValidateOptions
from .errors import CzregError, PackageError, UsageError
from .package import inspect_package, sha256_file
from .progress import step
from .report import Finding, Report, Severity
from .selection import load_session, registered_checks

__all__ = ["ValidateOptions", "validate"]


def validate(path: Path | str, options: ValidateOptions | None = None) -> Report:
    """Validate one package. Raises only ``UsageError`` (no such file); everything found inside the file,
    however hostile, comes back as findings."""
    options = options or ValidateOptions()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such package file: {path}", hint="check the path")
    report = Report(path=str(path), strict=options.strict)
    try:
        with step("validate: hashing the package"):
            report.sha256 = sha256_file(path)
        with step("validate: reading the package"):
            package, findings = inspect_package(path, options.limits)
    except (OSError, PackageError) as exc:  # unreadable (permissions, vanished): the user's to fix, not a finding
        message = exc.message if isinstance(exc, PackageError) else f"cannot read {path}: {exc.strerror or exc}"
        raise UsageError(message, hint="check the path and its permissions") from exc
    report.add(*findings)
    if package is None:
        return report
    report.format = package.kind
    ctx = CheckContext(package=package, report=report, options=options,
                       load_session=functools.partial(load_session, trust_graph=options.trust_graph))
    timings: dict[str, float] = {}
    checks = registered_checks()
    try:
        for plugin, check in checks:
            if check.needs_model:
                if options.static:
                    continue
                blocking = [f for f in report.errors
                            if not (options.trust_graph and f.check == GRAPH_AUDIT_CHECK)]
                if blocking:
                    report.add(Finding.info(
                        "model.skipped", f"model check '{check.id}' skipped: fix the errors above first"))
                    continue
            start = time.perf_counter()
            try:
                with step(f"validate: {check.id}"):
                    report.add(*check.run(ctx))
            except CzregError as exc:
                report.add(Finding(check.id, Severity.ERROR, exc.message, hint=exc.hint))
            except Exception as exc:  # a crashing (plugin) check is a finding, never a traceback
                report.add(Finding.error(
                    "plugin.check_crashed",
                    f"check '{check.id}' from plugin '{plugin}' crashed: {type(exc).__name__}: {exc}",
                    hint=f"report this to the author of plugin '{plugin}'"))
            if check.needs_model:
                timings[check.id] = round(time.perf_counter() - start, 4)
    finally:
        ctx.close()
    if timings:
        report.measurements["timings_s"] = timings
    return report
