"""``czreg evaluate`` (measured quality on labelled images) and ``czreg compare`` (two packages, with a
bootstrap interval). Thin over ``czregistry.evaluate``; numpy, the runner and SQLAlchemy load inside."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from ._common import (
    echo_json,
    handle_errors,
    json_option,
    refuse_existing_output,
    refuse_nonempty_folder,
    trust_graph_option,
)

if TYPE_CHECKING:
    from ..registry import RegistryClient

__all__ = ["register"]


class _LazyRegistry:
    """Opens the registry only when a reference or ``--record`` needs it."""

    def __init__(self, url: str | None, blob_store: str | None) -> None:
        self.url, self.blob_store = url, blob_store
        self.reg: RegistryClient | None = None

    def get(self) -> RegistryClient:
        """The registry (a database, or a server: ``connect``), opened on first use; its warnings said."""
        if self.reg is None:
            from ..registry.remote import connect

            self.reg = connect(self.url, self.blob_store, create=False)
            for line in getattr(self.reg, "warnings", []):
                click.secho(f"Warning: {line}", fg="yellow", err=True)
        return self.reg

    def close(self) -> None:
        if self.reg is not None:
            self.reg.close()


@contextlib.contextmanager
def _registry(url: str | None, blob_store: str | None) -> Iterator[_LazyRegistry]:
    lazy = _LazyRegistry(url, blob_store)
    try:
        yield lazy
    finally:
        lazy.close()


def _registry_opts(fn: Any) -> Any:
    fn = click.option("--blob-store", metavar="PATH", envvar="CZREG_BLOB_STORE",
                      help="Blob folder shared by the team (needed with PostgreSQL) [env CZREG_BLOB_STORE]")(fn)
    return click.option("--registry", "registry_url", metavar="URL", envvar="CZREG_REGISTRY",
                        help="Registry for NAME==VERSION references and --record [env CZREG_REGISTRY]")(fn)


def _inference_opts(fn: Any) -> Any:
    for opt in reversed([
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Tiles per model call."),
        click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True),
        click.option("--backend", default=None, help="Inference backend (see 'czreg plugins')."),
        click.option("--tile", type=int, nargs=2, default=None, metavar="H W", help="Tile size (as czreg run)."),
        click.option("--channels", default=None, metavar="I,J,...", help="Image channels to feed the model."),
        click.option("--axes", default=None, help="Image axes when the files do not say, e.g. ZYXC."),
        click.option("--no-probe", is_flag=True, help="Do not measure stride/halo; trust the metadata."),
        trust_graph_option,
    ]):
        fn = opt(fn)
    return fn


def run_options(batch_size: int, device: str, backend: str | None, tile: tuple[int, ...] | None,
                channels: str | None, axes: str | None, no_probe: bool, trust_graph: bool = False) -> Any:
    from ..run.plan import RunOptions

    try:
        chans = tuple(int(c) for c in channels.split(",")) if channels else None
    except ValueError:
        raise UsageError("give channel numbers separated by commas, e.g. 0,2") from None
    return RunOptions(batch_size=batch_size, device=device, backend=backend,  # type: ignore[arg-type]
                      tile=tuple(tile) if tile else None, channels=chans, axes=axes, probe=not no_probe,
                      trust_graph=trust_graph)


def _progress(quiet: bool) -> Any:
    if quiet:
        return None

    def show(k: int, n: int, stem: str) -> None:
        click.echo(f"\r[{k + 1}/{n}] {stem[:60]:<60}", nl=False, err=True)
        if k + 1 == n:
            click.echo("", err=True)

    return show


def _summary_lines(data: dict[str, Any]) -> list[str]:
    m = data["metrics"]
    head = (f"{data['package'].get('name') or data['package']['file']} (sha256:{data['package']['sha256'][:12]}...) "
            f"on {data['dataset']['images']} image(s), dataset {data['dataset']['digest'][:19]}..., "
            f"definition {data['definition']}")
    lines = [head]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    if data["task"] == "regression":
        lines.append("  " + "  ".join(f"{k} {f(m[k])}" for k in ("psnr", "ssim", "mae", "rmse")))
        return lines
    lines.append(f"  mean IoU {f(m['mean_iou'])}  mean Dice {f(m['mean_dice'])}  "
                 f"pixel accuracy {f(m['pixel_accuracy'])}")
    for c in data["package"]["classes"]:
        lines.append(f"  {c:<20} IoU {f(m['iou'][c])}  Dice {f(m['dice'][c])}")
    for c, rows in m["objects"]["classes"].items():
        r5 = rows[0] if rows else None
        if r5 is not None:
            lines.append(f"  objects {c}: {r5['n_true']} true, {r5['n_pred']} predicted; at IoU {r5['thresh']:g}: "
                         f"precision {f(r5['precision'])} recall {f(r5['recall'])} F1 {f(r5['f1'])} "
                         f"accuracy {f(r5['accuracy'])}; mean accuracy 0.5..0.95 {f(m['objects']['mean_accuracy'][c])}")
    return lines


@click.command("evaluate", short_help="Measure a package on labelled images.")
@click.argument("package")
@click.option("--images", type=click.Path(path_type=Path), required=True, help="Folder of input images.")
@click.option("--labels", type=click.Path(path_type=Path), required=True,
              help="Folder of labels (class index per pixel) or regression targets, paired by file stem.")
@click.option("--report", "report", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a self-contained HTML report here.")
@click.option("--overlays", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write one PNG per image here: input | label | prediction.")
@click.option("--worst", type=click.IntRange(min=0, max=50), default=6, show_default=True,
              help="Worst images pictured in the report.")
@click.option("--record", is_flag=True, help="Store the result in the registry with the package's version(s).")
@_inference_opts
@_registry_opts
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@click.option("--force", is_flag=True, help="Replace an existing --report file; write into a non-empty --overlays "
                                           "folder.")
@json_option
def evaluate_cmd(package: str, images: Path, labels: Path, report: Path | None, overlays: Path | None, worst: int,
                 record: bool, batch_size: int, device: str, backend: str | None, tile: tuple[int, ...] | None,
                 channels: str | None, axes: str | None, no_probe: bool, trust_graph: bool, registry_url: str | None,
                 blob_store: str | None, quiet: bool, force: bool, as_json: bool) -> None:
    """Measure PACKAGE (a file, NAME==VERSION or NAME@ALIAS) on labelled images, through the tiled runner.

    Segmentation: IoU/Dice per class, mean IoU, pixel accuracy, confusion matrix, and object precision /
    recall / F1 / accuracy at IoU 0.5..0.95 (StarDist's matching). Regression: MAE, RMSE, PSNR, SSIM.
    """
    from ..evaluate import EvalOptions, evaluate
    from ..evaluate.sources import package_file

    with handle_errors():
        if report is not None:
            refuse_existing_output(report, force, "--report")
        if overlays is not None:
            refuse_nonempty_folder(overlays, force, "--overlays")
        opts = EvalOptions(run=run_options(batch_size, device, backend, tile, channels, axes, no_probe, trust_graph),
                           keep_worst=worst if report is not None else 0, overlays=overlays)
        with _registry(registry_url, blob_store) as lazy:
            from ..evaluate.sources import looks_like_file

            reg = None if looks_like_file(package) and not record else lazy.get()
            with package_file(package, reg) as (path, version):
                ev = evaluate(path, images, labels, opts, progress=_progress(quiet or as_json))
            if version is not None:
                ev.data["package"]["registry"] = {"name": version["name"], "version": version["version"]}
            recorded = None
            if record:
                recorded = lazy.get().record_evaluation(ev.data)
        if report is not None:
            from ..evaluate.report_html import write_report

            write_report(report, ev)
    if as_json:
        echo_json({**ev.data, **({"recorded": recorded} if recorded else {})})
        return
    click.echo("\n".join(_summary_lines(ev.data)))
    if recorded:
        verb = "Recorded" if recorded["status"] == "recorded" else "Already recorded"
        click.echo(f"{verb} with {', '.join(recorded['versions'])} (evaluation #{recorded['id']})")
    if report is not None:
        click.echo(f"report: {report}")
    if overlays is not None:
        click.echo(f"overlays: {overlays}/")


def _recorded_pair(reg: RegistryClient, a: str, b: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Recorded evaluations of A and B on one dataset and definition (the newest common one)."""
    from ..evaluate.sources import looks_like_file
    digests = []
    for ref in (a, b):
        if looks_like_file(ref):
            raise UsageError(f"'{ref}' is a file: recorded results are looked up by registry reference",
                             hint="give --images/--labels to evaluate files, or NAME==VERSION references")
        digests.append(reg.resolve(ref).version["digest"].removeprefix("sha256:"))
    ea, eb = reg.find_evaluations(digests[0]), reg.find_evaluations(digests[1])
    keys_b = {(e["dataset"]["digest"], e["definition"]): e for e in eb}
    common = [(e, keys_b[(e["dataset"]["digest"], e["definition"])]) for e in reversed(ea)
              if (e["dataset"]["digest"], e["definition"]) in keys_b]
    if not common:
        raise UsageError(f"{a} and {b} have no recorded evaluations on the same dataset",
                         hint="give --images and --labels, or record both with czreg evaluate --record")
    return common[0]


@click.command("compare", short_help="Compare two packages' metrics (95% intervals).")
@click.argument("a")
@click.argument("b")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of input images.")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="Folder of labels, by stem.")
@click.option("--metric", "metric_names", multiple=True, help="Only these metrics (repeatable).")
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@_inference_opts
@_registry_opts
@json_option
def compare_cmd(a: str, b: str, images: Path | None, labels: Path | None, metric_names: tuple[str, ...],
                resamples: int, seed: int, batch_size: int, device: str, backend: str | None,
                tile: tuple[int, ...] | None, channels: str | None, axes: str | None, no_probe: bool,
                trust_graph: bool, registry_url: str | None, blob_store: str | None, as_json: bool) -> None:
    """Compare A and B (files or registry references): B - A per metric with a 95% bootstrap interval.

    With --images/--labels both are evaluated now; without, their recorded evaluations on a common dataset
    are used. 'better' names the side the interval favours, 'neither' when it includes zero.
    """
    from ..evaluate import EvalOptions, compare_evaluations, evaluate
    from ..evaluate.sources import looks_like_file, package_file

    with handle_errors():
        if (images is None) != (labels is None):
            raise UsageError("give both --images and --labels, or neither (to use recorded evaluations)")
        with _registry(registry_url, blob_store) as lazy:
            if images is None or labels is None:
                ea, eb = _recorded_pair(lazy.get(), a, b)
            else:
                opts = EvalOptions(run=run_options(batch_size, device, backend, tile, channels, axes, no_probe,
                                                   trust_graph))
                from ..evaluate.dataset import pair_dataset

                pairs = pair_dataset(images, labels)
                found = []
                for ref in (a, b):
                    reg = None if looks_like_file(ref) else lazy.get()
                    with package_file(ref, reg) as (path, version):
                        ev = evaluate(path, images, labels, opts, pairs=pairs)
                    if version is not None:
                        ev.data["package"]["registry"] = {"name": version["name"], "version": version["version"]}
                    found.append(ev.data)
                ea, eb = found
            out = compare_evaluations(ea, eb, n_boot=resamples, seed=seed, metrics=list(metric_names) or None)
    if as_json:
        echo_json(out)
        return

    def label(p: dict[str, Any]) -> str:
        r = p.get("registry")
        return f"{r['name']} {r['version']}" if r else f"{p['file']} (sha256:{p['sha256'][:12]}...)"

    click.echo(f"A = {label(out['a'])}\nB = {label(out['b'])}\n{out['images']} image(s), dataset "
               f"{out['dataset'][:19]}..., {resamples} paired bootstrap resamples (seed {seed})")
    width = max((len(r["metric"]) for r in out["metrics"]), default=10)
    click.echo(f"{'metric':<{width}}  {'A':>8} {'B':>8} {'B - A':>9}  {'95% CI':<21} better")
    for r in out["metrics"]:
        def f(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        ci = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r["ci95"] else "n/a"
        diff = "n/a" if r["difference"] is None else f"{r['difference']:+.4f}"
        click.echo(f"{r['metric']:<{width}}  {f(r['a']):>8} {f(r['b']):>8} {diff:>9}  {ci:<21} {r['better'] or '-'}")
    sys.stdout.flush()


def register(group: click.Group) -> None:
    group.add_command(evaluate_cmd)
    group.add_command(compare_cmd)
