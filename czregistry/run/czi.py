"""CZI input for the tiled runner, through ZEISS's own reader ``pylibCZIrw`` (the ``czi`` extra).

A CZI is a collection of sub-blocks, not an array, so ``CziArray`` adapts it to the lazily indexable
array that ``source.ImageSource`` expects: every read becomes one ``CziReader.read`` of a region of
interest per CZI channel, so a slide of many gigabytes is never loaded whole. T and Z planes become
leading (iterated) axes; the CZI channels, with RGB pixel types expanded to three samples and turned from
the file's BGR into RGB, become the ``C`` axis. Scenes are read as their joint mosaic (the total bounding
rectangle), filled with zero between scenes, the way ZEN shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .source import ImageSource

__all__ = ["CziArray", "open_czi"]

#: CZI pixel type -> (numpy dtype, samples per pixel)
_PIXEL_TYPES = {
    "Gray8": ("uint8", 1), "Gray16": ("uint16", 1), "Gray32Float": ("float32", 1),
    "Bgr24": ("uint8", 3), "Bgr48": ("uint16", 3), "Bgr96Float": ("float32", 3), "Bgra32": ("uint8", 4),
}


class CziArray:
    """``array[key]`` over axes like ``TZYXC``: ints for T/Z, slices for Y/X/C, as ``ImageSource.read`` asks."""

    def __init__(self, reader: Any, axes: str, shape: tuple[int, ...], dtype: np.dtype[Any],
                 origin: tuple[int, int], starts: dict[str, int], channels: list[tuple[int, int]]) -> None:
        self._reader = reader
        self.axes = axes
        self.shape = shape
        self.dtype = dtype
        self._origin = origin  # (x, y) of the total bounding rectangle
        self._starts = starts  # first index of T and Z in the file
        self._channels = channels  # (CZI channel index, samples)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != len(self.axes):
            raise IndexError(f"CZI array takes {len(self.axes)} indices ({self.axes}), got {len(key)}")
        idx = dict(zip(self.axes, key))
        sizes = dict(zip(self.axes, self.shape))
        plane = {a: self._starts.get(a, 0) for a in "TZ"}
        for a in "TZ":
            if a in idx:
                if not isinstance(idx[a], int | np.integer):
                    raise IndexError(f"CZI axis {a} must be indexed by an integer")
                plane[a] += int(idx[a])
        y0, y1, ys = idx["Y"].indices(sizes["Y"])
        x0, x1, xs = idx["X"].indices(sizes["X"])
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        roi = (self._origin[0] + x0, self._origin[1] + y0, w, h)
        parts = []
        for c, samples in self._channels:
            block = np.asarray(self._reader.read(roi=roi, plane={"C": c, **plane}))
            block = block.reshape(h, w, -1)[..., :samples]
            if samples >= 3:  # CZI stores BGR(A); the runner works in RGB(A)
                block = block[..., [2, 1, 0, *range(3, samples)]]
            parts.append(block)
        out = np.concatenate(parts, axis=-1).astype(self.dtype, copy=False)
        out = out[::ys, ::xs]
        return out[..., idx["C"]] if "C" in idx else out


def open_czi(path: Path) -> ImageSource:
    """An ``ImageSource`` over a CZI file."""
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError as exc:
        raise UsageError(f"{path.name}: reading CZI needs ZEISS's pylibCZIrw",
                         hint="pip install 'czregistry[czi]', or export OME-TIFF from ZEN") from exc
    context = pyczi.open_czi(str(path))
    try:
        reader = context.__enter__()
        box = reader.total_bounding_box
        rect = reader.total_bounding_rectangle
        types = reader.pixel_types
        channels = []
        dtypes = set()
        for c in range(*box.get("C", (0, 1))):
            ptype = types.get(c, "Gray8")
            if ptype not in _PIXEL_TYPES:
                raise UsageError(f"{path.name}: CZI channel {c} has pixel type {ptype}, which czreg cannot feed "
                                 "a model", hint="convert the image to 8/16-bit or float in ZEN")
            dtype, samples = _PIXEL_TYPES[ptype]
            dtypes.add(dtype)
            channels.append((c, samples))
        if len(dtypes) > 1:
            raise UsageError(f"{path.name}: CZI channels mix pixel types {sorted(dtypes)}",
                             hint="select channels of one pixel type in ZEN and export them")
        lead = [a for a in "TZ" if box.get(a, (0, 1))[1] - box.get(a, (0, 1))[0] > 1]
        axes = "".join(lead) + "YXC"
        shape = (*(box[a][1] - box[a][0] for a in lead), rect.h, rect.w, sum(s for _, s in channels))
        starts = {a: box.get(a, (0, 1))[0] for a in "TZ"}
        array = CziArray(reader, axes, shape, np.dtype(dtypes.pop()), (rect.x, rect.y), starts, channels)
        pixel_size = _pixel_size_um(reader)
    except BaseException:
        context.__exit__(None, None, None)
        raise
    return ImageSource(path, array, axes, pixel_size, closer=lambda: context.__exit__(None, None, None))


def _pixel_size_um(reader: Any) -> dict[str, float]:
    try:
        items = reader.metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
    except (KeyError, TypeError):
        return {}
    items = items if isinstance(items, list) else [items]
    out = {}
    for item in items:
        try:
            value = float(item["Value"])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0 and item.get("@Id") in ("X", "Y", "Z"):
            out[item["@Id"]] = value * 1e6  # metres -> micrometres
    return out
