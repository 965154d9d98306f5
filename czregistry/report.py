"""One report model for every check: static metadata checks, model checks, smoke tests.

A ``Finding`` is the unit every check produces. ``check`` is a stable dotted id (``archive.zip_bomb``,
``metadata.classes_count``, ``model.halo``) that users may filter on and that we never rename.
The JSON form (``Report.to_dict``) is a documented, stable contract (docs/report.md).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["REPORT_SCHEMA_VERSION", "Finding", "Report", "Severity", "dims", "human_size", "markdown_text",
           "measurement_lines", "printable", "render_html", "render_markdown", "render_text"]

#: Bumped only when a key of ``Report.to_dict`` changes meaning or disappears.
REPORT_SCHEMA_VERSION = "1"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    check: str
    severity: Severity
    message: str
    location: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "message": self.message,
            "location": self.location,
            "hint": self.hint,
        }

    @classmethod
    def error(cls, check: str, message: str, **kw: Any) -> Finding:
        return cls(check, Severity.ERROR, message, **kw)

    @classmethod
    def warning(cls, check: str, message: str, **kw: Any) -> Finding:
        return cls(check, Severity.WARNING, message, **kw)

    @classmethod
    def info(cls, check: str, message: str, **kw: Any) -> Finding:
        return cls(check, Severity.INFO, message, **kw)


@dataclass
class Report:
    """Everything known about one package after validation.

    ``measurements`` carries what model checks measured (tile step, halo, seam error, timings,
    backend, device) so the registry can store it next to the version.
    """

    path: str
    format: str | None = None
    schema_version: str | None = None
    sha256: str | None = None
    findings: list[Finding] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    strict: bool = False

    def add(self, *findings: Finding) -> None:
        self.findings.extend(findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def valid(self) -> bool:
        """No errors; with ``strict``, no warnings either."""
        if self.errors:
            return False
        return not (self.strict and self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_SCHEMA_VERSION,
            "path": self.path,
            "valid": self.valid,
            "strict": self.strict,
            "format": self.format,
            "schema_version": self.schema_version,
            "sha256": self.sha256,
            "findings": [f.to_dict() for f in self.findings],
            "measurements": self.measurements,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            path=data["path"],
            format=data.get("format"),
            schema_version=data.get("schema_version"),
            sha256=data.get("sha256"),
            findings=[
                Finding(f["check"], Severity(f["severity"]), f["message"], f.get("location"), f.get("hint"))
                for f in data.get("findings", [])
            ],
            measurements=dict(data.get("measurements", {})),
            strict=bool(data.get("strict", False)),
        )


# --- package text in reports ---------------------------------------------------------------------------
# Findings quote what a package says (a field name, a class name, a ModelName): foreign text. Every renderer
# passes it through ``printable`` (nothing that drives a terminal or reorders text survives), then through
# its format's escaping: ``html.escape`` (quotes too, for attributes), ``markdown_text`` / ``_code_span``.

#: C0 and C1 controls (ESC starts ANSI sequences, BEL ends OSC title sequences, CR rewrites a line), DEL,
#: the line and paragraph separators, and the bidirectional marks, embeddings, overrides and isolates
#: (U+202E turns ``gnp.exe`` around: "Trojan Source").
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` with every control, separator and bidi character written as an escape (``\\x1b``,
    ``\\u202e``, ``\\n``), so it shows as one inert line in a terminal, a Markdown cell or a web page."""
    return _UNPRINTABLE.sub(lambda m: _NAMED.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                                         else f"\\u{ord(m[0]):04x}"), str(text))


#: What makes inline Markdown inside a table cell: code, emphasis, links and images (``[``), strikethrough,
#: cell breaks, and the backslash itself. Line-start syntax (``#``, ``-``, ``1.``) cannot occur mid-line.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown: printable, ``& < >`` as entities (no raw ``<img onerror>``, no
    autolink), and the inline Markdown characters backslash-escaped (no emphasis, links, images, code or
    extra table cells). Quotes stay: with ``<`` escaped, no attribute can open."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(printable(text), quote=False))


def _code_span(text: object) -> str:
    """``text`` as a Markdown code span: fenced by more backticks than any run inside it (CommonMark), with
    ``|`` escaped (GFM tables split cells on it even inside code spans). Inside a code span nothing else is
    interpreted, HTML included."""
    body = printable(text).replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall("`+", body)), default=0) + 1)
    return f"{fence} {body} {fence}" if body.startswith("`") or body.endswith("`") else f"{fence}{body}{fence}"


_MARK = {Severity.ERROR: "ERROR  ", Severity.WARNING: "WARNING", Severity.INFO: "info   "}


def _verdict(report: Report) -> str:
    if report.valid:
        return "VALID"
    return "INVALID (warnings count as errors with --strict)" if not report.errors else "INVALID"


def render_text(report: Report, *, verbose: bool = True) -> str:
    """Terminal rendering: verdict first, then one line per finding, hints indented beneath."""
    p = printable  # findings quote package text: no escape sequence reaches the terminal
    head = f"{p(report.path)}: {_verdict(report)}"
    details = [x for x in (report.format, report.schema_version and f"schema {report.schema_version}") if x]
    if details:
        head += f"  [{p(', '.join(details))}]"
    lines = [head]
    for f in report.findings:
        if f.severity is Severity.INFO and not verbose:
            continue
        loc = f" ({p(f.location)})" if f.location else ""
        lines.append(f"  {_MARK[f.severity]} {p(f.check)}: {p(f.message)}{loc}")
        if f.hint:
            lines.append(f"           hint: {p(f.hint)}")
    n_err, n_warn = len(report.errors), len(report.warnings)
    lines.append(f"  {n_err} error(s), {n_warn} warning(s)")
    return "\n".join(lines)


def _measurement_rows(report: Report) -> list[tuple[str, str]]:
    return [(k, json.dumps(v, default=str)) for k, v in sorted(report.measurements.items())]


def render_markdown(report: Report) -> str:
    """A shareable report (attach it to the e-mail that sends the package)."""
    md = markdown_text
    out = [
        f"# Validation report: {_code_span(report.path)}",
        "",
        f"- **Verdict:** {_verdict(report)}",
        f"- **Format:** {md(report.format or 'unknown')}",
        f"- **Schema version:** {md(report.schema_version or 'unknown')}",
        f"- **SHA-256:** {_code_span(report.sha256 or 'n/a')}",
        "",
        "| severity | check | message | location | hint |",
        "|---|---|---|---|---|",
    ]
    for f in report.findings:
        out.append(f"| {f.severity.value} | {_code_span(f.check)} | {md(f.message)} | {md(f.location or '')} | "
                   f"{md(f.hint or '')} |")
    if report.measurements:
        out += ["", "## Measurements", "", "| quantity | value |", "|---|---|"]
        out += [f"| {md(k)} | {_code_span(v)} |" for k, v in _measurement_rows(report)]
    return "\n".join(out) + "\n"


def render_html(report: Report) -> str:
    def e(text: str) -> str:  # quote=True: also safe inside attribute values
        return html.escape(printable(text), quote=True)

    rows = "".join(
        f"<tr class='{f.severity.value}'><td>{e(f.severity.value)}</td><td><code>{e(f.check)}</code></td>"
        f"<td>{e(f.message)}</td><td>{e(f.location or '')}</td><td>{e(f.hint or '')}</td></tr>"
        for f in report.findings
    )
    meas = "".join(f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>" for k, v in _measurement_rows(report))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>czregistry report: {e(report.path)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}.error{background:#fdd}.warning{background:#ffd}"
        "</style></head><body>"
        f"<h1>Validation report</h1><p><b>Package:</b> {e(report.path)}<br>"
        f"<b>Verdict:</b> {e(_verdict(report))}<br><b>Format:</b> {e(report.format or 'unknown')}<br>"
        f"<b>Schema version:</b> {e(report.schema_version or 'unknown')}<br>"
        f"<b>SHA-256:</b> <code>{e(report.sha256 or 'n/a')}</code></p>"
        "<table><tr><th>severity</th><th>check</th><th>message</th><th>location</th><th>hint</th></tr>"
        f"{rows}</table>"
        + (f"<h2>Measurements</h2><table>{meas}</table>" if meas else "")
        + "</body></html>\n"
    )


def human_size(n: int) -> str:
    """Bytes in decimal units (``700 B``, ``53.0 MB``), as the CLI and the registry's web page show sizes."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def dims(values: Any, unknown: str = "?") -> str:
    """``64x64`` for a shape or per-axis list; an axis not known (``None``) reads ``unknown``, never ``None``."""
    if values is None:
        return "n/a"
    if not isinstance(values, list | tuple):
        return str(values)
    return "x".join(unknown if v is None else str(v) for v in values)


def _number(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:.3g}"
    return str(v)


def measurement_lines(measurements: dict[str, Any]) -> list[tuple[str, str]]:
    """The measurements worth reading, as ``(label, value)`` rows in plain words: what ``czreg show``, the
    web page and ``validate``'s text use, so no caller prints a Python dict, ``None`` or ``NonexNone``.
    The full record stays in ``--json`` and the report's JSON; keys absent from ``measurements`` give no row."""
    m = measurements
    rows: list[tuple[str, str]] = []
    if "backend" in m:
        load = f", loaded in {_number(m['model_load_s'])} s" if m.get("model_load_s") is not None else ""
        rows.append(("model", f"{m['backend']} on {m.get('device', 'n/a')}{load}"))
    compat = m.get("compatibility")
    if isinstance(compat, dict) and compat.get("format"):
        opset = f", ONNX opset {compat['onnx_opset']}" if compat.get("onnx_opset") is not None else ""
        rows.append(("format", f"{compat['format']}{opset}"))
        if compat.get("min_host"):
            rows.append(("needs", str(compat["min_host"])))
    audit = m.get("graph_audit")
    if isinstance(audit, dict):
        if audit.get("problem"):
            rows.append(("graph audit", f"could not audit: {audit['problem']}"))
        else:
            verdict = "clean" if audit.get("clean") else f"{len(audit.get('unsafe') or [])} refused operation(s)"
            rows.append(("graph audit", f"{verdict}, {audit.get('operations', 'n/a')} operations"))
    if "tile" in m:
        if m.get("accepts_other_sizes") is False:
            sizes = "fixed size"
        elif m.get("accepts_other_sizes"):
            sizes = f"other sizes on a step of {dims(m.get('step'), '1')}"
        else:
            sizes = "other sizes not measured"
        rows.append(("tile", f"{dims(m['tile'])} ({sizes})"))
    if "halo" in m or "stride" in m:
        halo = m.get("halo")
        halo_text = f"{dims(halo)} px" if isinstance(halo, list) and all(h is not None for h in halo) else (
            f"at least {dims(m.get('halo_bound'))} px" if isinstance(m.get("halo_bound"), list)
            and any(h is not None for h in m["halo_bound"]) else "not measured")
        rows.append(("stride, halo", f"{dims(m.get('stride'))}, {halo_text}"))
    if "global_context" in m:
        rows.append(("global context", _number(m["global_context"])))
    if "equivariance_error" in m:
        rows.append(("equivariance error", _number(m["equivariance_error"])))
    if "min_overlap_exact" in m:
        rows.append(("exact tiling needs", f"MinOverlap >= {dims(m['min_overlap_exact'])}"))
    if "seam_error" in m:
        where = f" at overlap {dims(m['seam_overlap'])}" if m.get("seam_overlap") is not None else ""
        rows.append(("seam error", f"{_number(m['seam_error'])}{where}"))
    out = m.get("output")
    if isinstance(out, dict) and out.get("shape") is not None:
        rows.append(("output", f"{dims(out['shape'])}, values {_number(out.get('min'))} .. "
                               f"{_number(out.get('max'))}"))
    if m.get("pack_parity_max_abs_diff") is not None:
        rows.append(("pack parity", f"max |packaged - source| = {_number(m['pack_parity_max_abs_diff'])}"))
    timings = m.get("timings_s")
    if isinstance(timings, dict) and timings:
        rows.append(("model checks took", f"{_number(sum(float(t) for t in timings.values()))} s"))
    return rows
