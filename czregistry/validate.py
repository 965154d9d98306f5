"""Validation: read the package safely (once: a ``PackageSnapshot``), then run every registered check in order into one
report."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from .audit import GRAPH_AUDIT_CHECK
from .backends import Session
from .checks import CheckContext, ValidateOptions
from .errors import CzregError, PackageError, UsageError
from .package import MiB, PackageSnapshot, require_package_file
from .progress import step
from .report import Finding, Report, Severity
from .selection import load_session, registered_checks

__all__ = ["ValidateOptions", "validate", "validate_snapshot"]


def validate(path: Path | str | PackageSnapshot, options: ValidateOptions | None = None) -> Report:
    """Validate one package. Raises only ``UsageError`` (no such file); everything found inside the file,
    however hostile, comes back as findings.

    A path is read once (``PackageSnapshot``): the report's ``sha256`` is of the very bytes the checks read."""
    if isinstance(path, PackageSnapshot):
        return validate_snapshot(path, options)[0]
    path = Path(path)
    require_package_file(path)  # missing, a folder, a pipe or a device: one UsageError, nothing opened
    limits = (options or ValidateOptions()).limits
    if path.stat().st_size > limits.max_total_bytes + MiB:  # hostile input is a finding, never read whole
        report = Report(path=str(path), strict=(options or ValidateOptions()).strict)
        report.add(Finding.error("archive.zip_bomb", f"the file is {path.stat().st_size:,} bytes, over the "
                                 f"{limits.max_total_bytes:,}-byte limit of a whole package",
                                 hint="raise the limit only for a package from a trusted source"))
        return report
    try:
        with step("validate: reading and hashing the package"):
            snapshot = PackageSnapshot.read(path, limits)
    except PackageError as exc:  # unreadable (permissions, vanished): the user's to fix, not a finding
        raise UsageError(exc.message, hint="check the path and its permissions") from exc
    with snapshot:
        return validate_snapshot(snapshot, options)[0]


def validate_snapshot(snapshot: PackageSnapshot, options: ValidateOptions | None = None, *,
                      keep_session: bool = False) -> tuple[Report, Session | None]:
    """``validate`` of a snapshot's bytes. With ``keep_session`` the model session the model checks loaded
    (``None`` when none was loaded) is handed to the caller, who closes it: the smoke test of
    ``publish --smoke`` runs on it instead of loading the model a second time. A session exists only if
    ``load_session`` let the graph through the static audit, so reusing it keeps that guarantee."""
    options = options or ValidateOptions()
    report = Report(path=str(snapshot.path), strict=options.strict)
    report.sha256 = snapshot.sha256
    try:
        with step("validate: reading the package"):
            package, findings = snapshot.inspect(options.limits)
    except PackageError as exc:
        raise UsageError(exc.message, hint="check the path and its permissions") from exc
    report.add(*findings)
    if package is None:
        return report, None
    report.format = package.kind
    ctx = CheckContext(package=package, report=report, options=options,
                       load_session=functools.partial(load_session, trust_graph=options.trust_graph))
    timings: dict[str, float] = {}
    checks = registered_checks()
    handed_over = False
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
        session = ctx.loaded_session if keep_session else None
        handed_over = session is not None
    finally:
        if not handed_over:
            ctx.close()
    if timings:
        report.measurements["timings_s"] = timings
    return report, session
