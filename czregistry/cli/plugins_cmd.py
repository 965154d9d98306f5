"""``czreg plugins``: what is installed, what each plugin registers, and what went wrong loading it."""

from __future__ import annotations

import sys

import click

from ._common import echo_json, handle_errors, json_option

__all__ = ["register"]


def _layer_usage(spec: object) -> str:
    from ..layers import LayerSpec

    assert isinstance(spec, LayerSpec)
    params = ",".join(f"{k}=<{p.type}>" if p.required else f"[{k}={p.default}]" for k, p in spec.params.items())
    return f"{spec.name}:{params}" if params else spec.name


@click.command(short_help="List loaded plugins and what each provides.")
@json_option
def plugins(as_json: bool) -> None:
    """List loaded plugins, their versions, what each registers, and any load errors (exit 4 if a plugin
    failed to load or misbehaved).

    CZREG_PLUGINS=none loads no plugin, CZREG_PLUGINS=a,b only those; CZREG_TRACE_PLUGINS=1 traces hooks.
    """
    from .. import selection

    with handle_errors():
        infos = selection.plugin_infos()
        layers = list(selection.available_layers().values())
        backends = list(selection.available_backends().values())
        problems = selection.problems()
    if as_json:
        echo_json({
            "plugins": [i.to_dict() for i in infos],
            "backends": [{"name": cls.name, "plugin": plugin, "formats": sorted(cls.formats),
                          "priority": cls.priority} for plugin, cls in backends],
            "layers": [{**spec.to_dict(), "plugin": plugin, "usage": _layer_usage(spec)} for plugin, spec in layers],
            "problems": problems,
        })
        sys.exit(4 if any(not line.startswith("CZREG_PLUGINS") for line in problems) else 0)
    for info in infos:
        label = f"{info.name} {info.version or ''}".strip() + (" (built-in)" if info.builtin else "")
        click.echo(label)
        for hook, names in sorted(info.registered.items()):
            click.echo(f"  {hook}: {', '.join(names)}")
        for err in info.errors:
            click.echo(f"  ERROR: {err}")
    if layers:
        click.echo("\nLayers (written NAME:key=value,... when packing):")
        for _, spec in layers:
            note = "" if spec.local else " [whole-image statistics: not tile-exact]"
            if spec.onnx is None:  # packs only where the Keras layer can be built and composed
                note += " [Keras only: needs czregistry-tensorflow]"
            click.echo(f"  {_layer_usage(spec)}  ({spec.kind}) {spec.description}{note}")
    for line in problems:
        if line.startswith("CZREG_PLUGINS"):  # plugin errors were printed under their plugin above
            click.echo(f"WARNING: {line}", err=True)
    sys.exit(4 if any(not line.startswith("CZREG_PLUGINS") for line in problems) else 0)


def register(group: click.Group) -> None:
    group.add_command(plugins)
