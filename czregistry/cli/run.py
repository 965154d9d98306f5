"""``czreg run`` (tiled inference on large images) and ``czreg smoke`` (does a package tile cleanly here?).

Only click at import time: the runner, numpy-heavy readers and the backends load inside the commands.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import RunError, UsageError
from ._common import (
    echo_json,
    force_option,
    handle_errors,
    json_option,
    refuse_existing_output,
    require_package_file,
    sigterm_as_interrupt,
    trust_graph_option,
    warn_plugin_failures,
)

__all__ = ["register", "run_cmd", "smoke_cmd"]


class _Progress:
    """A click progress bar that knows its total and shows tiles/s; ETA comes from click."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, total: int) -> None:
        if self.quiet:
            return
        self.t0 = time.perf_counter()
        self.bar = click.progressbar(length=total, label="tiles", show_eta=True, show_pos=True, file=sys.stderr,
                                     item_show_func=lambda _: self._rate())
        self.bar.__enter__()

    def _rate(self) -> str:
        dt = time.perf_counter() - self.t0
        return f"{self.done / dt:.1f} tiles/s" if dt > 0 and self.done else ""

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command("run", short_help="Run a package tiled over images.")
@click.argument("package", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output file: .ome.tiff / .tif (tiled OME-TIFF) or .zarr. With --dask: NAME.zarr (one image) "
                   "or a folder (one NAME.ome.zarr per image).")
@click.option("--output-kind", type=click.Choice(["probabilities", "uint8", "labels"]), default="probabilities",
              show_default=True, help="float32 probabilities (or values), uint8-quantised, or argmax labels.")
@click.option("--compression", type=click.Choice(["auto", "zlib", "none"]), default="auto", show_default=True,
              help="OME-TIFF tiles: auto = zlib for uint8/labels, none for float32 (zlib barely shrinks "
                   "float probabilities and was the slowest step).")
@click.option("--tiff-layout", type=click.Choice(["planar", "interleaved"]), default=None,
              help="OME-TIFF outputs with several classes: interleaved = all classes in each pixel (YXS; "
                   "default, the faster), planar = a page per class (OME's CYX, one named channel per class). "
                   "Labels: no difference.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per model call (default: 4; on a GPU whose backend can measure it, the largest power "
                   "of two up to 32 that fits in half the free device memory).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--backend", default=None, help="Inference backend (see 'czreg plugins').")
@click.option("--tile", type=int, nargs=2, default=None, metavar="H W",
              help="Tile size for spatially invariant models (default: the package's InputShape).")
@click.option("--tile-3d", "tile3", type=int, nargs=3, default=None, metavar="Z H W", help="Tile size, 3D models.")
@click.option("--geometry", type=click.Choice(["stride", "zen"]), default="stride", show_default=True,
              help="stride: seamless (origins on the model's stride grid); zen: ZEN's own tiling (cztile).")
@click.option("--border", type=click.IntRange(min=0), default=None,
              help="Border dropped per tile side (default: max(MinOverlap/2, measured halo)).")
@click.option("--blend", is_flag=True, help="Blend overlapping tiles instead of cutting at the middle.")
@click.option("--channels", default=None, metavar="I,J,...", help="Image channels to feed the model (0-based).")
@click.option("--axes", default=None, help="Image axes when the file does not say, e.g. ZYXC or TYX.")
@click.option("--no-probe", is_flag=True, help="Do not measure stride/halo; trust the metadata.")
@trust_graph_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@force_option
@click.option("--dask", "dask_scheduler", default=None, metavar="SCHEDULER",
              help="Run blocks on Dask: local:N (N worker processes here; local:1 is one worker thread in this "
                   "process) or tcp://host:8786 (a running scheduler). Writes OME-Zarr, resumable.")
@click.option("--resume", is_flag=True, help="With --dask: skip the blocks an interrupted run finished.")
@click.option("--block-size", type=click.IntRange(min=16), default=None, metavar="PX",
              help="With --dask: block edge in pixels, a multiple of 256 (default in 2D: the largest that fits "
                   "256 MiB and leaves 2 blocks per worker, one block for local:1; 256 in 3D).")
@json_option
def run_cmd(package: Path, images: tuple[Path, ...], output: Path, output_kind: str, compression: str,
            tiff_layout: str | None, batch_size: int | None, device: str,
            backend: str | None, tile: tuple[int, ...] | None, tile3: tuple[int, ...] | None, geometry: str,
            border: int | None, blend: bool, channels: str | None, axes: str | None, no_probe: bool,
            trust_graph: bool, quiet: bool, force: bool, dask_scheduler: str | None, resume: bool,
            block_size: int | None, as_json: bool) -> None:
    """Run PACKAGE tiled over IMAGE (TIFF/OME-TIFF, PNG, JPEG, .npy, Zarr) and write OUTPUT.

    Memory stays bounded whatever the image size; nothing is left under OUTPUT if the run fails or is
    interrupted. With --dask, blocks of tiles run on a Dask cluster (output identical to the single-process
    run), several images are allowed, and --resume continues a killed run.
    """
    from ..run.plan import RunOptions
    from ..run.runner import run as run_tiled

    with handle_errors():
        require_package_file(package)
        if dask_scheduler is None:
            if len(images) > 1:
                raise UsageError(f"{len(images)} images given; the single-process runner takes one",
                                 hint="use --dask local:N to run several, or one command per image")
            if resume or block_size is not None:
                raise UsageError(f"{'--resume' if resume else '--block-size'} needs --dask",
                                 hint="e.g. --dask local:2")
            refuse_existing_output(output, force)
        if tiff_layout is not None and (dask_scheduler is not None or output.name.lower().endswith(".zarr")):
            raise UsageError("--tiff-layout applies to OME-TIFF outputs; this run writes OME-Zarr",
                             hint="drop --tiff-layout, or write -o NAME.ome.tiff without --dask")
        warn_plugin_failures()
    try:
        chans = tuple(int(c) for c in channels.split(",")) if channels else None
    except ValueError:
        raise click.BadParameter("give channel numbers separated by commas, e.g. 0,2", param_hint="--channels")\
            from None
    options = RunOptions(batch_size=batch_size or 4, auto_batch=batch_size is None,
                         device=device, backend=backend,  # type: ignore[arg-type]
                         tile=tuple(tile3 or tile or ()) or None, geometry=geometry,  # type: ignore[arg-type]
                         output_kind=output_kind, border=border, blend=blend,  # type: ignore[arg-type]
                         compression=compression,  # type: ignore[arg-type]
                         tiff_layout=tiff_layout or RunOptions.tiff_layout,  # type: ignore[arg-type]
                         channels=chans, axes=axes, probe=not no_probe, trust_graph=trust_graph)
    # the progress bar only on a terminal: a log file would get one stray "tiles" line
    progress = _Progress(quiet or as_json or not sys.stderr.isatty())
    if dask_scheduler is not None:  # its own .part folder, rename and --resume semantics (czregistry.run.dask_run)
        _run_dask(package, images, output, options, dask_scheduler, resume, block_size, progress, as_json,
                  force)
        return
    with _running(progress):
        result = run_tiled(package, images[0], output, options, progress=progress, on_plan=progress.start)
    _report(result, as_json, [
        f"wrote {result.output} ({result.output_kind}, {'x'.join(map(str, result.shape))} {result.dtype}) "
        f"from {result.tiles} tiles on {result.device} via {result.backend}",
        f"  {secs(result.seconds)} wall (with loading and measuring the model); tile pipeline "
        f"{secs(result.pipeline_seconds)} ({rate(result.tiles, result.pipeline_seconds)}); model predict "
        f"{secs(result.predict_seconds)} ({rate(result.tiles, result.predict_seconds)})"])


def secs(x: float) -> str:
    """Seconds with enough digits that ``tiles / seconds`` recomputes the printed rate (0.043 s, 4.31 s, 59.0 s)."""
    return f"{x:.3f} s" if x < 1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def rate(tiles: int, seconds: float) -> str:
    """``tiles / seconds`` as printed beside that time: every rate in a summary names the time it divides by."""
    return f"{tiles / seconds:.1f} tiles/s" if seconds > 0 else "n/a tiles/s"


@contextlib.contextmanager
def _running(progress: _Progress) -> Iterator[None]:
    """What both run paths need around the work: errors in one line (a tile size the model refuses while it
    is measured too), SIGTERM treated as Ctrl-C so temp files go, and the progress bar closed."""
    with handle_errors(), sigterm_as_interrupt(), _probe_errors():
        try:
            yield
        finally:
            progress.close()


def _report(result: Any, as_json: bool, lines: list[str]) -> None:
    """The result as JSON, or its notes on stderr and ``lines`` on stdout."""
    if as_json:
        echo_json(result.to_dict())
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for line in lines:
        click.echo(line)


def _run_dask(package: Path, images: tuple[Path, ...], output: Path, options: Any, scheduler: str, resume: bool,
              block_size: int | None, progress: _Progress, as_json: bool, force: bool) -> None:
    from ..run.dask_run import run_dask

    def dashboard(link: str) -> None:
        if not as_json:
            click.echo(f"Dask dashboard: {link}", err=True)

    with _running(progress):
        result = run_dask(package, images, output, options, scheduler=scheduler, resume=resume,
                          block=block_size, progress=progress, on_plan=progress.start, on_dashboard=dashboard,
                          force=force)
    _report(result, as_json, [
        *(f"wrote {out['output']} ({out['dtype']}, axes {out['axes']}, {'x'.join(map(str, out['shape']))})"
          for out in result.outputs),
        f"{result.tiles_run} tiles run, {result.tiles_skipped} skipped (finished earlier), "
        f"{result.blocks_run}/{result.blocks} blocks on {result.workers} worker(s) on {result.device} via "
        f"{result.backend}",
        f"  {secs(result.seconds)} wall (with starting the workers and loading the model): "
        f"{rate(result.tiles_run, result.seconds)} run"])


@click.command("smoke", short_help="Smoke-test a package on the best device here.")
@click.argument("package", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="Test on this image (default: a synthetic one covering several tiles per axis).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--backend", default=None, help="Inference backend (see 'czreg plugins').")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@trust_graph_option
@json_option
def smoke_cmd(package: Path, image: Path | None, device: str, backend: str | None, batch_size: int,
              trust_graph: bool, as_json: bool) -> None:
    """Run PACKAGE tiled on the best device here; check output and seams. Exit 0 pass, 1 fail."""
    from ..report import render_text
    from ..run.smoke import smoke_test

    with handle_errors():
        require_package_file(package)
        warn_plugin_failures()
    with handle_errors(), sigterm_as_interrupt(), _probe_errors():
        report = smoke_test(package, image=image, backend=backend, device=device,  # type: ignore[arg-type]
                            batch_size=batch_size, trust_graph=trust_graph)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(render_text(report).replace(": VALID", ": PASS").replace(": INVALID", ": FAIL", 1))
        m = report.measurements
        if "smoke.tiles_per_second" in m:
            click.echo(f"  {m.get('smoke.tiles')} tiles, {m.get('smoke.tiles_per_second')} tiles/s on "
                       f"{m.get('smoke.device')} ({m.get('smoke.backend')}); seam error "
                       f"{m.get('smoke.seam_error', 'n/a')}"
                       + (f" (between {m['smoke.seam_method']})" if "smoke.seam_method" in m else ""))
    sys.exit(0 if report.valid else 1)


@contextlib.contextmanager
def _probe_errors() -> Iterator[None]:
    """The backend refused an input size while the runner measured the model (for example a declared tile
    of 40000 x 40000): a run error in one line, as ``validate`` reports it, not a traceback."""
    from ..probing import ProbeRejected

    try:
        yield
    except ProbeRejected as exc:
        raise RunError(f"the model refused its tile size while being measured: {exc}",
                       hint="pass a smaller --tile H W, or --no-probe; 'czreg validate' shows the declared "
                            "InputShape") from None


def register(group: click.Group) -> None:
    """Add ``run`` and ``smoke`` to ``group``."""
    group.add_command(run_cmd)
    group.add_command(smoke_cmd)
