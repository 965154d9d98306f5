"""``czreg plugins``."""

from __future__ import annotations

import click

from ._common import echo_json, json_option


@click.command()
@json_option
def plugins(as_json: bool) -> None:
    """List loaded plugins, their versions, what each registers, and any load errors."""
    from ..plugins import get_host

    infos = get_host().plugin_infos()
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    for info in infos:
        label = f"{info.name} {info.version or ''}".strip() + (" (built-in)" if info.builtin else "")
        click.echo(label)
        for hook, names in sorted(info.registered.items()):
            click.echo(f"  {hook}: {', '.join(names)}")
        for err in info.errors:
            click.echo(f"  ERROR: {err}")


def register(group: click.Group) -> None:
    group.add_command(plugins)
