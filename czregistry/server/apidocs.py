"""``/docs``: the API's endpoints as one plain HTML page made from the OpenAPI document, with no script and
no reference to another host, so it works on a lab network without internet (FastAPI's own ``/docs`` loads
Swagger UI from a CDN). Tools that want the full description read ``/openapi.json``.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

__all__ = ["add_docs_route", "docs_html"]

_METHODS = ("get", "put", "post", "delete", "patch", "head")
_CSS = ("body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 24px;color:#1d2330}"
        "table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid "
        "#e3e6eb;vertical-align:top}code{background:#eef1f5;padding:1px 4px;border-radius:3px}"
        ".muted{color:#6b7483;font-size:13px}")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def docs_html(spec: dict[str, Any]) -> str:
    """The page for an OpenAPI document: one row per operation (method, path, parameters, summary)."""
    info = spec.get("info", {})
    rows = []
    for path, item in spec.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            params = ", ".join(f"{_e(p.get('name'))}{'' if p.get('required') else '?'}"
                               for p in op.get("parameters", []) if isinstance(p, dict))
            body = " + body" if op.get("requestBody") else ""
            text = (op.get("description") or op.get("summary") or "").strip().split("\n\n")[0]
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{_e(path)}</code></td>"
                        f"<td class=\"muted\">{params}{body}</td><td>{_e(text)}</td></tr>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(info.get('title'))} API"
            f"</title><style>{_CSS}</style></head><body><h1>{_e(info.get('title'))} API "
            f"<span class=\"muted\">{_e(info.get('version'))}</span></h1><p>{_e(info.get('description'))}</p>"
            "<p>The full description: <a href=\"/openapi.json\">/openapi.json</a>. Back to <a href=\"/\">the "
            "models</a>.</p><table><thead><tr><th>Method</th><th>Path</th><th>Parameters</th><th>Does</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table></body></html>")


def add_docs_route(app: FastAPI) -> None:
    """Serve ``docs_html(app.openapi())`` at ``/docs`` (built once, on first request)."""
    page: list[str] = []

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if not page:
            page.append(docs_html(app.openapi()))
        return HTMLResponse(page[0])
