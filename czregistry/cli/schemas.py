"""``czreg schemas``: list and print the bundled JSON schemas, so other tools can validate with them."""

from __future__ import annotations

import click

from ._common import echo_json, handle_errors, json_option


@click.group(invoke_without_command=True, short_help="List or print the bundled JSON schemas.")
@json_option
@click.pass_context
def schemas(ctx: click.Context, as_json: bool) -> None:
    """List the bundled JSON schemas (metadata versions and conversion specs)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..schemas import list_schemas

    with handle_errors():
        infos = list_schemas()
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    width = max(len(i.name) for i in infos)
    for info in infos:
        click.echo(f"{info.name:<{width}}  {info.title}")


@schemas.command()
@click.argument("name")
def show(name: str) -> None:
    """Print schema NAME (as listed by 'czreg schemas') exactly as shipped."""
    from ..errors import UsageError
    from ..schemas import schema_names, schema_text

    if name.removesuffix(".json") not in schema_names():
        with handle_errors():
            raise UsageError(f"unknown schema '{name}'",
                             hint=f"run 'czreg schemas' to list them: {', '.join(schema_names())}")
    with handle_errors():
        click.echo(schema_text(name), nl=False)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(schemas)
