"""The server's web pages: server-rendered HTML, no JavaScript, one small stylesheet inline.

``/`` lists models (newest version, type, classes) with a search box; ``/models/<name>`` shows a model's
versions, aliases, tags, the validation report of one version, the audit trail and download links. The
pages read through the same ``Registry`` calls and the same token rules as the API; a browser presents
its token through ``/login`` (an HttpOnly cookie honoured for reads only).
"""

import html
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from .. import __version__
from ..errors import CzregError, UsageError
from ..registry.tokens import authenticate, model_key
from ..report import human_size, measurement_lines
from .settings import COOKIE

if TYPE_CHECKING:
    from ..registry.api import Registry
    from .auth import Auth

__all__ = ["add_web_routes", "error_page"]

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:14px 28px;display:flex;align-items:center;gap:24px}
header a{color:#fff;text-decoration:none;font-weight:600;font-size:20px}
header form{margin-left:auto}
input[type=search],input[type=password]{padding:7px 10px;border:1px solid #9aa5b5;border-radius:4px;width:280px;
font-size:14px}
button{padding:7px 14px;border:0;border-radius:4px;background:#3d7cc9;color:#fff;font-size:14px;cursor:pointer}
main{max-width:1120px;margin:24px auto;padding:0 28px}
h1{font-size:24px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid #e3e6eb;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:13px;color:#45505f}
td.num{text-align:right;white-space:nowrap}
a{color:#1f5fae}code{font-size:13px;background:#eef1f5;padding:1px 4px;border-radius:3px}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#dff3e4;color:#1c6b33}.bad{background:#fbe1e1;color:#9b1c1c}.warn{background:#fff1cc;color:#7a5300}
.muted{color:#6b7483;font-size:13px}.pill{background:#e6eefa;color:#1f3a5f}
footer{max-width:1120px;margin:30px auto;padding:0 28px;color:#8a93a1;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))




def _page(title: str, body: str, *, query: str = "", status: int = 200) -> HTMLResponse:
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body><header><a href="/">czregistry</a><span class="muted" style="color:#c9d6e8">model registry</span>
<form action="/" method="get" role="search"><input type="search" name="q" value="{_e(query)}"
 placeholder="Search models, types, classes" aria-label="Search models">
<button type="submit">Search</button></form></header>
<main>{body}</main>
<footer>czregistry {_e(__version__)} &middot; API: <a href="/docs">/docs</a>, <a href="/openapi.json">/openapi.json</a>
</footer></body></html>"""
    return HTMLResponse(doc, status_code=status)


def _valid_badge(valid: bool, yanked: bool = False) -> str:
    out = '<span class="badge ok">valid</span>' if valid else '<span class="badge bad">invalid</span>'
    return out + (' <span class="badge warn">yanked</span>' if yanked else "")


def error_page(exc: CzregError, status: int, public_read: bool) -> HTMLResponse:
    """An error as a page; a 401 offers the token form."""
    body = f"<h1>{'Sign in' if status == 401 else 'Error'}</h1><p>{_e(exc.message)}</p>"
    if exc.hint:
        body += f'<p class="muted">{_e(exc.hint)}</p>'
    if status == 401:
        body += _login_form()
    return _page("czregistry: error", body, status=status)


def _login_form() -> str:
    return ('<form action="/login" method="post"><p><label>Token <input type="password" name="token" '
            'autocomplete="off" required></label> <button type="submit">Sign in</button></p></form>'
            '<p class="muted">The token is kept in a cookie for this site and used for reading only.</p>')


def _models_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">No models found.</p>'
    out = ['<table><thead><tr><th>Model</th><th>Newest version</th><th>Type</th><th>Classes</th>'
           '<th>Versions</th><th>Size</th><th>Published</th><th>Validation</th></tr></thead><tbody>']
    for r in rows:
        link = f"/models/{quote(model_key(r['name']))}"
        out.append(
            f'<tr><td><a href="{link}">{_e(r["name"])}</a></td><td>{_e(r["version"])}</td>'
            f'<td>{_e(r["type"] or "-")}</td><td>{_e(", ".join(r["classes"] or []) or "-")}</td>'
            f'<td class="num">{_e(r.get("versions", ""))}</td><td class="num">{human_size(r["size"])}</td>'
            f'<td class="muted">{_e(r["created_at"])}</td><td>{_valid_badge(r["valid"], r["yanked"])}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _metric(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{_e(k)} {_metric(v)}" for k, v in value.items()) or "-"
    return f"{value:.3f}" if isinstance(value, float) else _e(value if value is not None else "-")


def _evaluations_html(evaluations: list[dict[str, Any]]) -> str:
    """Recorded evaluations (``czreg evaluate --record``): the dataset they were measured on (by digest, so a
    partner can recompute them), the metric definitions and the headline numbers."""
    rows = []
    for ev in evaluations:
        metrics = "; ".join(f"{_e(k)}: {_metric(v)}" for k, v in ev["metrics"].items())
        rows.append(f'<tr><td><code>{_e(str(ev["dataset"]["digest"])[:19])}&hellip;</code> '
                    f'({_e(ev["dataset"]["images"])} images)</td><td>{_e(ev["definition"])}</td><td>{metrics}</td>'
                    f'<td class="muted">{_e(ev["recorded_at"])} by {_e(ev["recorded_by"])}</td></tr>')
    return ("<table><thead><tr><th>Dataset</th><th>Definition</th><th>Metrics</th><th>Recorded</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _signatures_html(signatures: list[dict[str, Any]]) -> str:
    """Who signed a version (the key's fingerprint: SHA-256 of its public key PEM, as ``czreg keygen`` prints
    it) and whether the stored bundles are about these bytes. Trusting the key is the reader's decision:
    ``czreg pull --key THEIR.pub`` checks the signature cryptographically."""
    if not signatures:
        return '<p class="muted">Not signed.</p>'
    rows = "".join(
        f'<tr><td><code>{_e(x["key_id"])}</code></td><td>{_e(x.get("created_by") or "")}</td>'
        f'<td class="muted">{_e(x.get("created_at") or "")}</td><td>'
        + ('<span class="badge ok">bound to these bytes</span>' if x.get("bound")
           else '<span class="badge bad">DOES NOT MATCH these bytes</span>') + "</td></tr>" for x in signatures)
    return ("<table><thead><tr><th>Key fingerprint</th><th>Stored by</th><th>When</th><th>Signature</th></tr>"
            f"</thead><tbody>{rows}</tbody></table><p class=\"muted\">Verify with the signer's public key: "
            "<code>czreg pull NAME==VERSION --key THEIR.pub</code>.</p>")


def _report_html(info: dict[str, Any]) -> str:
    rep = info["report"]
    findings = [f for f in rep.get("findings", []) if f.get("severity") in ("error", "warning")]
    errors = sum(f["severity"] == "error" for f in findings)
    warnings = len(findings) - errors
    head = (f'<p>{_valid_badge(info["valid"])} {errors} error(s), {warnings} warning(s)'
            + (" &middot; published with <code>--allow-invalid</code>" if info["allow_invalid"] else "")
            + (f' &middot; format {_e(rep.get("format"))} schema {_e(rep.get("schema_version"))}'
               if rep.get("format") else "") + "</p>")
    if info.get("smoke"):
        head += f'<p>Smoke test: {_valid_badge(bool(info["smoke"].get("valid")))}</p>'
    measured = measurement_lines(rep.get("measurements") or {})
    if measured:
        body = "".join(f"<tr><td>{_e(label)}</td><td>{_e(value)}</td></tr>" for label, value in measured)
        head += ('<table class="measured"><thead><tr><th colspan="2">Measured</th></tr></thead>'
                 f"<tbody>{body}</tbody></table>")
    if not findings:
        return head
    rows = "".join(f'<tr><td><span class="badge {"bad" if f["severity"] == "error" else "warn"}">'
                   f'{_e(f["severity"])}</span></td><td><code>{_e(f["check"])}</code></td>'
                   f'<td>{_e(f["message"])}</td></tr>' for f in findings)
    return head + f"<table><thead><tr><th></th><th>Check</th><th>Finding</th></tr></thead><tbody>{rows}</tbody></table>"


def add_web_routes(app: FastAPI, reg: "Registry", auth: "Auth") -> None:
    """Add ``/``, ``/models/<name>``, ``/login`` and ``/logout`` to ``app``."""

    @app.get("/", include_in_schema=False)
    def index(request: Request, q: str = "") -> Response:
        token = auth.require(request, "read")
        query = q.strip()
        if query:
            seen: dict[str, dict[str, Any]] = {}
            for kw in ({"name": query}, {"model_type": query}, {"class_name": query}):
                for r in reg.search(**kw):  # type: ignore[arg-type]
                    seen.setdefault(r["name"], r)
            rows = sorted(seen.values(), key=lambda r: r["name"].lower())
        else:
            rows = reg.search()
        rows = [r for r in rows if token is None or token.allows("read", r["name"])]
        title = f'Models matching "{_e(query)}"' if query else "Models"
        body = (f'<h1>{title}</h1><p class="muted">{len(rows)} model(s), newest version of each.</p>'
                + _models_table(rows))
        return _page("czregistry", body, query=query)

    @app.get("/models/{name}", include_in_schema=False)
    def model_page(request: Request, name: str, version: str | None = None) -> Response:
        auth.require(request, "read", name)
        model = reg.show(name)
        cname = model["canonical_name"]
        versions = model["versions"][:100]
        shown_version = version or model["latest"] or (versions[0]["version"] if versions else None)
        details = {v["version"]: reg.show(f"{cname}=={v['version']}") for v in versions[:50]}
        parts = [f'<h1>{_e(model["name"])}</h1><p class="muted">latest: <b>{_e(model["latest"] or "-")}</b>'
                 f' &middot; {len(model["versions"])} version(s) &middot; <code>czreg pull {_e(cname)}</code></p>']
        top = details.get(shown_version or "")
        if top is not None:
            parts.append(f'<p>Type: <b>{_e(top["type"] or "-")}</b> &middot; Classes: '
                         + (" ".join(f'<span class="badge pill">{_e(c)}</span>' for c in top["classes"] or [])
                            or "-") + "</p>")
        if model["aliases"]:
            parts.append("<h2>Aliases</h2><p>" + " ".join(
                f'<span class="badge pill">@{_e(a)}</span> &rarr; {_e(v)}&nbsp;&nbsp;'
                for a, v in model["aliases"].items()) + "</p>")
        rows = []
        for v in versions:
            d = details.get(v["version"])
            tags = ", ".join(f"{k}={val}" for k, val in (d["tags"] if d else {}).items())
            dl = f"/api/v1/models/{quote(cname)}/versions/{quote(v['version'])}/download"
            rows.append(
                f'<tr><td><a href="/models/{quote(cname)}?version={quote(v["version"])}">{_e(v["version"])}</a></td>'
                f'<td><code>{_e(v["digest"][:19])}&hellip;</code></td><td class="num">{human_size(v["size"])}</td>'
                f'<td class="muted">{_e(v["created_at"])}</td><td>{_e(d["created_by"] if d else "")}</td>'
                f'<td>{_e(tags) or "-"}</td><td>{_valid_badge(v["valid"], v["yanked"])}</td>'
                f'<td><a href="{dl}" download>download</a></td></tr>')
        parts.append("<h2>Versions</h2><table><thead><tr><th>Version</th><th>Digest</th><th>Size</th>"
                     "<th>Published</th><th>By</th><th>Tags</th><th>Validation</th><th></th></tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table>")
        if model["purged"]:
            parts.append(f'<p class="muted">Purged (numbers never reused): {_e(", ".join(model["purged"]))}</p>')
        if shown_version:
            info = details.get(shown_version) or reg.show(f"{cname}=={shown_version}")
            parts.append(f"<h2>Validation report of {_e(shown_version)}</h2>" + _report_html(info))
            parts.append(f"<h2>Signatures of {_e(shown_version)}</h2>" + _signatures_html(info.get("signatures") or []))
            if info.get("evaluations"):
                parts.append(f"<h2>Evaluations of {_e(shown_version)}</h2>" + _evaluations_html(info["evaluations"]))
            if info.get("yanked"):
                parts.append(f'<p><span class="badge warn">yanked</span> {_e(info["yanked_reason"])}</p>')
            if info.get("note"):
                parts.append(f'<p>Note: {_e(info["note"])}</p>')
        events = reg.history(cname, limit=100)
        ev_rows = "".join(
            f'<tr><td class="muted">{_e(e["at"])}</td><td>{_e(e["action"])}</td><td>{_e(e["version"] or "")}'
            + (f' @{_e(e["alias"])}: {_e(e["from"] or "-")} &rarr; {_e(e["to"] or "-")}' if e["alias"] else "")
            + f'</td><td>{_e(e["actor"])}</td><td class="muted">{_e(e["host"])}</td></tr>' for e in events)
        parts.append("<h2>Audit trail</h2><table><thead><tr><th>When</th><th>Action</th><th>What</th><th>Who</th>"
                     f"<th>From</th></tr></thead><tbody>{ev_rows}</tbody></table>")
        return _page(f"{model['name']} - czregistry", "".join(parts))

    @app.get("/login", include_in_schema=False)
    def login_form() -> Response:
        return _page("Sign in - czregistry", "<h1>Sign in</h1>" + _login_form())

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        secret = (form.get("token") or [""])[0].strip()
        if not secret:
            raise UsageError("no token given", hint="paste the token you were given")
        await run_in_threadpool(authenticate, reg, secret)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, secret, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=30 * 86400)
        return response

    @app.get("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response
