"""``czreg serve`` (the registry over HTTP, with a web page) and ``czreg token`` (its API tokens).

FastAPI and uvicorn are imported only when ``serve`` runs (``pip install 'czregistry[serve]'``). Tokens are
rows in the registry database, so ``czreg token`` runs where that database is reachable (the server).
"""

from __future__ import annotations

from typing import Any

import click

from ..errors import UsageError
from ._common import echo_json, handle_errors, json_option

__all__ = ["register"]


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken now, in one line, instead of uvicorn's log and exit 1."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="choose another --port, or stop what is using it") from None


@click.command("serve", short_help="Serve the registry over HTTP (API and web pages).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put a TLS proxy in front).")
@click.option("--port", default=8700, show_default=True, type=click.IntRange(0, 65535))
@click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
              help="Registry database: a folder, sqlite:///file.db or postgresql+psycopg://... [env CZREG_REGISTRY]")
@click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE",
              help="Blob folder (needed with PostgreSQL) [env CZREG_BLOB_STORE]")
@click.option("--public-read", is_flag=True, help="Anyone may list and pull; writing still needs a token.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes (more than one: use PostgreSQL).")
@click.option("--max-upload-mb", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Largest package accepted, in MiB.")
@click.option("--upload-dir", type=click.Path(file_okay=False), help="Where uploads wait for validation "
              "(default: the system temp folder).")
@click.option("--forwarded-allow-ips", metavar="IPS",
              help="Proxies trusted for X-Forwarded-For/-Proto (comma list; default 127.0.0.1).")
@click.option("--upload-validation", default="sandbox", show_default=True, type=click.Choice(["sandbox", "static"]),
              help="sandbox: model checks and smoke tests of uploads run in a confined child process; static: "
                   "static checks only, the model is never loaded.")
@click.option("--sandbox-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1), metavar="SECONDS",
              help="Wall time one sandboxed validation may take before it is killed (the upload is refused).")
@click.option("--sandbox-memory-mb", default=8192, show_default=True, type=click.IntRange(min=0),
              help="Address space of the sandboxed validation, in MiB (0: unbounded; GPU validation needs more).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve_cmd(host: str, port: int, registry_url: str | None, blob_store: str | None, public_read: bool,
              workers: int, max_upload_mb: int, upload_dir: str | None, forwarded_allow_ips: str | None,
              upload_validation: str, sandbox_timeout: float, sandbox_memory_mb: int, log_level: str) -> None:
    """Serve the registry over HTTP: the API under /api/v1 (OpenAPI at /openapi.json) and a web page at /.

    Clients use the same commands with CZREG_REGISTRY=http://HOST:PORT and CZREG_TOKEN."""
    import os

    from ..registry.location import is_loopback, is_remote

    with handle_errors():
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError:
            raise UsageError("czreg serve needs FastAPI and uvicorn",
                             hint="pip install 'czregistry[serve]'") from None
        if is_remote(registry_url):
            raise UsageError("czreg serve serves a registry database, not another server",
                             hint="give --registry a folder, sqlite:/// or postgresql+psycopg:// URL")
        from ..registry import open_registry
        from ..server.settings import ServerSettings

        # migrate once, and fail here if it cannot; a named location must exist (a typo must not start a
        # server on a new, empty registry): create one with 'czreg init'
        with open_registry(registry_url, blob_store, create=False) as reg:
            location = reg.location
        _check_port(host, port)
        settings = ServerSettings(registry=location.url, blob_store=location.blob_store, public_read=public_read,
                                  max_upload_bytes=max_upload_mb * 1024 * 1024, upload_dir=upload_dir,
                                  upload_validation=upload_validation, sandbox_timeout_s=sandbox_timeout,
                                  sandbox_memory_mb=sandbox_memory_mb)
    if not is_loopback(host):
        click.secho(f"Warning: serving plain HTTP on {host}: tokens and packages travel unencrypted. Put a TLS "
                    "reverse proxy in front (docs/serving.md) and give clients its https:// URL.", fg="yellow",
                    err=True)
    if workers > 1 and location.is_sqlite:
        click.secho("Warning: several workers on SQLite take turns writing; use PostgreSQL for many writers.",
                    fg="yellow", err=True)
    if upload_validation == "sandbox":
        from ..server.sandbox import namespaces_available

        if not namespaces_available():
            click.secho("Warning: unprivileged user namespaces are not available here: the validation sandbox "
                        "cannot cut uploads' models off the network (docs/serving.md, threat model).",
                        fg="yellow", err=True)
    os.environ["CZREG_SERVE_SETTINGS"] = settings.to_env()
    click.echo(f"Serving {location.display()} on http://{host}:{port} "
               f"({workers} worker(s), {'public read' if public_read else 'token required'}); Ctrl+C stops",
               err=True)
    kwargs: dict[str, Any] = {}
    if forwarded_allow_ips:
        kwargs["forwarded_allow_ips"] = forwarded_allow_ips
    uvicorn.run("czregistry.server.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, proxy_headers=True, server_header=False, timeout_graceful_shutdown=10,
                **kwargs)


@click.group("token", short_help="Create, list or revoke the server's API tokens.")
def token_group() -> None:
    """API tokens of the registry server (run where the registry database is: tokens live in it)."""


def _local_registry(registry_url: str | None, blob_store: str | None) -> Any:
    from ..registry import open_registry
    from ..registry.location import is_remote

    if is_remote(registry_url):
        raise UsageError("tokens are managed on the server, in its registry database",
                         hint="run czreg token there, with --registry pointing at the database")
    from ._common import announce_lock_waits

    announce_lock_waits()  # a token write waiting for another process's lock says so
    return open_registry(registry_url, blob_store, create=False)  # a mistyped --registry is refused


_registry_option = click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
                                help="The server's registry database [env CZREG_REGISTRY]")
_blob_option = click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE", help="[env CZREG_BLOB_STORE]")


@token_group.command("create")
@click.argument("name")
@click.option("--scope", required=True, type=click.Choice(["read", "publish", "admin"]),
              help="read: list/show/pull; publish: also publish, alias, tag; admin: also yank.")
@click.option("--model", "model", metavar="PATTERN", help="Only models matching this glob (e.g. 'nuclei-*').")
@click.option("--expires", "expires", type=click.FloatRange(min=0, min_open=True), metavar="DAYS",
              help="Expire after this many days (default: never).")
@json_option
@_registry_option
@_blob_option
def token_create_cmd(name: str, scope: str, model: str | None, expires: float | None, as_json: bool,
                     registry_url: str | None, blob_store: str | None) -> None:
    """Create token NAME; the token is printed once (only its hash is stored)."""
    with handle_errors():
        from ..registry.tokens import create_token

        with _local_registry(registry_url, blob_store) as reg:
            info, secret = create_token(reg, name, scope, model=model, expires_days=expires)
    if as_json:
        echo_json({"token": secret, **info})
        return
    click.echo(secret)
    click.echo(f"Created token '{info['name']}' (scope {info['scope']}, models {info['model'] or 'all'}, "
               f"expires {info['expires_at'] or 'never'}). It is shown only now: store it.", err=True)


@token_group.command("list")
@json_option
@_registry_option
@_blob_option
def token_list_cmd(as_json: bool, registry_url: str | None, blob_store: str | None) -> None:
    """The tokens (never their secrets): scope, models, state, expiry."""
    with handle_errors():
        from ..registry.tokens import list_tokens

        with _local_registry(registry_url, blob_store) as reg:
            rows = list_tokens(reg)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No tokens.")
    for t in rows:
        click.echo(f"{t['name']:<20} {t['scope']:<8} {t['model'] or '*':<20} {t['state']:<8} "
                   f"expires {t['expires_at'] or 'never'}  created {t['created_at']} by {t['created_by']}")


@token_group.command("revoke")
@click.argument("name")
@json_option
@_registry_option
@_blob_option
def token_revoke_cmd(name: str, as_json: bool, registry_url: str | None, blob_store: str | None) -> None:
    """Revoke token NAME at once (its name stays taken, so the audit trail stays unambiguous)."""
    with handle_errors():
        from ..registry.tokens import revoke_token

        with _local_registry(registry_url, blob_store) as reg:
            info = revoke_token(reg, name)
    echo_json(info) if as_json else click.echo(f"Revoked token '{info['name']}'")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    for cmd in (serve_cmd, token_group):
        group.add_command(cmd)
