"""The Dask run's outputs on disk: where each image's output goes, its part folder with the manifest and the
block markers, the content hashes the manifest records, and the ``--resume`` decision.

An output is built in ``.NAME.dask.part`` beside NAME with a manifest (``.czreg/run.json``: the package's
SHA-256, the image's path and content SHA-256, grid, options) and renamed into place when complete. Each
finished block leaves a marker (``.czreg/blocks/<block>.done``, written by rename), so a run killed at any
point leaves only valid markers; ``--resume`` checks the manifest against the new plan and skips marked
blocks. Nothing here writes before ``check_output`` has decided where to write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OutputTarget", "check_output", "content_sha256", "create_output", "discard_unfinished",
           "finish_output", "image_identity", "markers_folder", "occupied", "output_paths", "planned_block",
           "refuse_existing", "remove_path", "start_part", "write_marker"]

_META = ".czreg"
_MANIFEST = "run.json"
_MARKERS = "blocks"


def output_paths(images: Sequence[Path], output: Path) -> list[Path]:
    """One image and ``OUT.zarr``: that; otherwise ``OUT`` is a folder of ``<image stem>.ome.zarr``."""
    if len(images) == 1 and output.name.lower().endswith(".zarr"):
        return [output]
    if output.name.lower().endswith((".tif", ".tiff", ".btf", ".tf8")):
        raise UsageError(f"--dask writes OME-Zarr, not {output.name}",
                         hint="use -o NAME.zarr (one image) or a folder (several images)")
    if output.name.lower().endswith(".zarr"):
        raise UsageError(f"{len(images)} images cannot all go to one Zarr ({output.name})",
                         hint="give a folder with -o; each image gets <name>.ome.zarr in it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder", hint="give a folder or a .zarr path with -o")
    paths: list[Path] = []
    seen: dict[str, Path] = {}
    for img in images:
        stem = img.name
        for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".npy", ".czi", ".png",
                       ".jpg", ".jpeg", ".bmp", ".btf", ".tf8"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if stem in seen:
            raise UsageError(f"{seen[stem]} and {img} would both be written to {stem}.ome.zarr",
                             hint="rename one of the images or run them separately")
        seen[stem] = img
        paths.append(output / f"{stem}.ome.zarr")
    return paths


def create_output(root: Path, layout: Any, dtype: np.dtype[Any], attrs: dict[str, Any],
                  manifest: dict[str, Any]) -> None:
    """Create the OME-Zarr group in the empty folder ``root`` (``omezarr.create_ome_zarr``, the layout the
    single-process run writes). The manifest comes first, so a part folder without one was not started by
    us (we never delete it without ``--force``), and a part with one but no block markers holds nothing to
    resume (it is started afresh)."""
    from .omezarr import create_ome_zarr

    meta = root / _META
    (meta / _MARKERS).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(meta / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    create_ome_zarr(root, layout, dtype, attrs)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / _META / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree, whatever is at ``path`` (outputs are folders for Zarr, files for
    TIFF); never follows a link into a folder. Shared by the single-process runner and the Dask run."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def occupied(path: Path) -> bool:
    """Something is at ``path``, a broken symbolic link included."""
    return path.exists() or path.is_symlink()


def _markers(root: Path) -> set[str]:
    return {p.name[:-5] for p in markers_folder(root).glob("*.done")}


def markers_folder(root: Path) -> Path:
    """The folder of the block markers in the output (or part folder) ``root``."""
    return root / _META / _MARKERS


def write_marker(folder: Path | str, key: str, record: dict[str, Any]) -> None:
    """Mark block ``key`` finished (after its chunks are written), by rename: a run killed at any point leaves
    only complete markers."""
    _atomic_write_text(Path(folder) / f"{key}.done", json.dumps(record))


_HASH_CHUNK = 1 << 20


def content_sha256(path: Path | str) -> str:
    """SHA-256 of what a run reads from ``path``: a file's bytes; for a folder (a Zarr store), every regular
    file under it in sorted order of its relative path, each entered as ``path NUL sha256``.

    Streamed in 1 MiB reads (bounded memory whatever the size). ``--resume`` compares it, not size and mtime:
    ``cp`` + ``touch -r`` or ``rsync -t`` give other content the old size and mtime. Folders are walked
    following symbolic links (the reader follows them too), each folder once, so a link loop ends.
    """
    path = Path(path)
    if not path.is_dir():
        return _file_sha256(path)
    h = hashlib.sha256()
    for rel, full in _tree_files(path):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + _file_sha256(full).encode() + b"\n")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UsageError(f"{path} is not a regular file", hint="give an image file or a Zarr folder")
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """Regular files under ``root`` as (relative POSIX path, path), sorted; devices, FIFOs and broken links
    are left out (no reader opens them)."""
    files: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        st = Path(folder).stat()
        if (st.st_dev, st.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in names:
            full = Path(folder, name)
            try:
                if stat.S_ISREG(full.stat().st_mode):
                    files.append((full.relative_to(root).as_posix(), full))
            except OSError:
                continue
    return sorted(files)


def image_identity(path: Path) -> dict[str, Any]:
    """The input image as the manifest records it: its resolved path and ``content_sha256``."""
    return {"path": str(path.resolve()), "sha256": content_sha256(path)}


@dataclass
class OutputTarget:
    """Where one image's output is written, decided before anything is written."""

    final: Path
    part: Path
    root: Path  # where the blocks go: the part folder, or a finished output found by --resume
    done: set[str]  # blocks an earlier run finished
    fresh: bool  # the part folder is (re)created once the cluster is up


def _why_not_resumable(found: dict[str, Any], manifest: dict[str, Any], image: Path) -> str | None:
    """What differs between an earlier run's manifest and this run's plan, in words (None: nothing)."""
    old, new = found.get("plan"), manifest["plan"]
    if old == new:
        return None
    if found.get("format") != manifest["format"] or not isinstance(old, dict):
        return "it was written by another version of czreg run --dask"
    if old.get("package_sha256") != new["package_sha256"]:
        return "the package changed since that run (its SHA-256 differs)"
    was_image = old.get("image")
    was: dict[str, Any] = was_image if isinstance(was_image, dict) else {}
    if was.get("path") != new["image"]["path"]:
        return f"that run read another image ({was.get('path')})"
    if was.get("sha256") != new["image"]["sha256"]:
        return f"the input image {image.name} changed since that run (its content's SHA-256 differs)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"the options differ ({', '.join(keys)})"


def refuse_existing(final: Path) -> UsageError:
    """The single-process run's answer (``cli._common.refuse_existing_output``), word for word."""
    return UsageError(f"{final} already exists", hint="pass --force to replace it, or choose another -o path")


def check_output(final: Path, manifest: dict[str, Any], image: Path, resume: bool, force: bool,
                 notes: list[str]) -> OutputTarget:
    """Decide where to write without writing anything: an existing output is refused without ``--force``
    (as the single-process run does); ``--resume`` continues a part folder or finished output whose manifest
    matches this plan and refuses any other, saying what changed. A folder we did not write (no manifest)
    is never chosen for deletion without ``--force``."""
    part = final.parent / f".{final.name}.dask.part"
    fresh = OutputTarget(final, part, part, set(), True)
    found_part = False
    if resume:
        for cand in (part, final):
            if not occupied(cand):
                continue
            found = _read_manifest(cand)
            why = ("it was not written by czreg run --dask" if found is None
                   else _why_not_resumable(found, manifest, image))
            if why is not None:
                if force:
                    notes.append(f"{final.name}: not resumed ({why}); --force: starting afresh")
                    return fresh
                hint = ("remove it, or pass --force to replace it" if found is None
                        else "run without --resume to start afresh, or pass --force" if cand == part
                        else "pass --force to replace it with a fresh run, or choose another -o path")
                raise UsageError(f"cannot resume {cand}: {why}", hint=hint)
            done = _markers(cand)
            if cand == final:
                return OutputTarget(final, part, final, done, False)
            found_part = True
            if done:
                if occupied(final) and not force:
                    raise refuse_existing(final)
                return OutputTarget(final, part, part, done, False)
            break  # our part folder with no finished block: nothing to keep, start it afresh
        if not found_part:
            notes.append(f"{final.name}: nothing to resume, starting afresh")
    elif _read_manifest(part) is not None and (finished := len(_markers(part))):
        notes.append(f"{final.name}: starting afresh; the {finished} block(s) an interrupted run finished are "
                     "discarded (--resume keeps them)")
    if not force:
        if occupied(final):
            raise refuse_existing(final)
        if occupied(part) and _read_manifest(part) is None:
            raise UsageError(f"{part} exists but was not written by czreg run --dask",
                             hint="remove it, or pass --force to replace it")
    return fresh


def start_part(target: OutputTarget, create: Callable[[Path], None]) -> None:
    """(Re)create the part folder: ours (it has a manifest) or replaced under ``--force``."""
    if occupied(target.part):
        remove_path(target.part)
    target.part.mkdir(parents=True)
    create(target.part)


def finish_output(root: Path, final: Path, force: bool) -> None:
    """Rename the complete output ``root`` (its part folder) to ``final``; nothing to do where ``--resume``
    finished an output in place. A ``final`` that appeared meanwhile is refused without ``force``."""
    if root == final:
        return
    if occupied(final):
        if not force:  # appeared during the run: keep both, the result stays resumable in the part folder
            raise refuse_existing(final)
        remove_path(final)
    root.replace(final)


def discard_unfinished(part: Path) -> None:
    """Remove the part folder ``part`` when it holds no finished block: it has nothing for ``--resume``. One
    with markers is kept (interrupt, a block failing twice)."""
    if occupied(part) and not _markers(part):
        remove_path(part)


def planned_block(outs: Sequence[Path]) -> int | None:
    """The block edge an earlier run of these outputs was planned with (its manifest), for ``--resume``
    without ``--block-size``: the default edge depends on the worker count, and resuming on another
    cluster must not be refused for that alone."""
    for final in outs:
        for cand in (final.parent / f".{final.name}.dask.part", final):
            found = _read_manifest(cand)
            plan = found.get("plan") if found else None
            edge = plan.get("block") if isinstance(plan, dict) else None
            if isinstance(edge, int) and not isinstance(edge, bool) and edge >= 16:
                return edge
    return None
