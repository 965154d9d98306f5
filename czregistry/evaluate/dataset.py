"""Labelled datasets: images and labels paired by file stem, and the digest that names the pairing.

The digest is ``sha256`` over the sorted list of ``(sha256(image bytes), sha256(label bytes))`` pairs
(a Zarr folder hashes as its files' relative paths and bytes). File names are not part of it: renaming a
dataset keeps its digest, while changing one pixel, adding an image or pairing an image with another label
changes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError

__all__ = ["IMAGE_SUFFIXES", "Pair", "content_sha256", "dataset_digest", "pair_dataset", "stem_of", "with_digests"]

#: Longest first, so ``a.ome.tiff`` has stem ``a``.
IMAGE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".btf", ".tf8", ".png", ".jpg", ".jpeg",
                  ".bmp", ".npy", ".zarr", ".czi")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Pair:
    """An image and its label; the content digests are ``""`` until computed (``with_digests``)."""

    stem: str
    image: Path
    label: Path
    image_sha256: str
    label_sha256: str

    @property
    def hashed(self) -> bool:
        return bool(self.image_sha256 and self.label_sha256)


def stem_of(path: Path) -> str | None:
    """The name without its image suffix, or ``None`` when it is not an image we read."""
    low = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(low) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _listing(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UsageError(f"{what} folder not found: {folder}", hint=f"give a folder of {what} with --{what}")
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        stem = stem_of(entry)
        if stem is None:
            continue
        if stem in found:
            raise UsageError(f"two {what} share the stem '{stem}': {found[stem].name} and {entry.name}",
                             hint="keep one file per stem")
        found[stem] = entry
    if not found:
        raise UsageError(f"no {what} in {folder}",
                         hint="TIFF/OME-TIFF, PNG, JPEG, .npy, Zarr or CZI files, paired with labels by stem")
    return found


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's (Zarr) files: relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel)
            h.update(f.stat().st_size.to_bytes(8, "big"))
            with f.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
        return h.hexdigest()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pair_dataset(images: Path | str, labels: Path | str, *, digests: bool = True) -> list[Pair]:
    """Pairs sorted by stem; a missing or extra partner is a ``UsageError`` naming the files.

    ``digests=False`` leaves the content hashes for later (``with_digests``): ``evaluate`` computes them on a
    worker thread while the tiled inference runs, instead of reading every file once more up front."""
    imgs = _listing(Path(images), "images")
    labs = _listing(Path(labels), "labels")
    no_label = sorted(set(imgs) - set(labs))
    no_image = sorted(set(labs) - set(imgs))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} image(s) without a label ({', '.join(imgs[s].name for s in no_label[:3])}"
                         f"{', ...' if len(no_label) > 3 else ''})")
        if no_image:
            parts.append(f"{len(no_image)} label(s) without an image ({', '.join(labs[s].name for s in no_image[:3])}"
                         f"{', ...' if len(no_image) > 3 else ''})")
        raise UsageError("images and labels do not pair up: " + "; ".join(parts),
                         hint="each image needs a label with the same file stem (a.tif <-> a.png)")
    pairs = [Pair(s, imgs[s], labs[s], "", "") for s in sorted(imgs)]
    return [with_digests(p) for p in pairs] if digests else pairs


def with_digests(pair: Pair) -> Pair:
    """The pair with the content digests of its two files (as it is when already computed)."""
    if pair.hashed:
        return pair
    return replace(pair, image_sha256=content_sha256(pair.image), label_sha256=content_sha256(pair.label))


def dataset_digest(pairs: list[Pair]) -> str:
    if not all(p.hashed for p in pairs):
        raise ValueError("dataset_digest needs the pairs' content digests (with_digests)")
    manifest = sorted([p.image_sha256, p.label_sha256] for p in pairs)
    return "sha256:" + hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()
