"""Image readers and writers for the tiled runner.

Readers never load a large image whole: TIFF / OME-TIFF is memory-mapped when it is stored contiguous and
uncompressed, and otherwise read chunk by chunk through tifffile's Zarr store; ``.npy`` is memory-mapped;
Zarr is chunked by nature. PNG / JPEG are decoded whole (Pillow has no region decoding; such files are
small). Every reader exposes the same ``ImageSource``: a lazily indexable array plus its axes, where
``C`` is the channel axis (TIFF samples ``S`` count as channels) and everything that is neither channel nor
spatial (T, scenes, and Z for 2D models) is iterated plane by plane.

Writers take rows (2D) or slices (3D) in order and write them incrementally: OME-TIFF as compressed tiles
fed to ``tifffile.TiffWriter.write`` from a background thread, OME-Zarr 0.5 (sharded Zarr v3, the format
``czreg run --dask`` writes too) shard row by shard row. Neither ever holds more than about one chunk row
of the output.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import RunError, UsageError, as_disk_full
from .source import ImageSource, guess_axes

__all__ = [
    "TIFF_SUFFIXES",
    "ZARR_CHUNK",
    "ZARR_SHARD_X",
    "ImageSource",
    "InputAdapter",
    "OmeZarrLayout",
    "OmeZarrShards",
    "OutputSpec",
    "TiffWriterSink",
    "Writer",
    "ZarrWriterSink",
    "create_ome_zarr",
    "guess_axes",
    "ome_array_axes",
    "ome_zarr_attrs",
    "open_image",
    "open_writer",
    "output_format",
    "read_ome_zarr",
    "scale_to_unit",
    "to_model_channels",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_UNIT_TO_UM = {"m": 1e6, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}


def _check_axes(axes: str, ndim: int, path: Path) -> str:
    axes = axes.upper().replace("S", "C")
    if len(axes) != ndim or len(set(axes)) != len(axes):
        raise UsageError(f"{path.name}: axes '{axes}' do not match the image's {ndim} dims",
                         hint="give one distinct letter per dim, e.g. --axes ZYXC")
    return axes


def _ome_pixel_size(xml: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if not xml:
        return out
    head = re.search(r"<Pixels\b[^>]*>", xml)
    if not head:
        return out
    for ax in "XYZ":
        m = re.search(rf'PhysicalSize{ax}="([0-9.eE+-]+)"', head.group(0))
        if m:
            unit = re.search(rf'PhysicalSize{ax}Unit="([^"]+)"', head.group(0))
            out[ax] = float(m.group(1)) * _UNIT_TO_UM.get(unit.group(1) if unit else "µm", 1.0)
    return out


def _inflater(kf: Any, shape: tuple[int, ...]) -> Callable[[bytes], np.ndarray] | None:
    """A decoder of deflated chunks (``shape``, native byte order) through ISA-L, which inflates in half
    the time of the zlib that tifffile falls back to (0.16 against 0.31 ms for a 256 x 256 uint8 tile),
    for the plain cases only: deflate, no predictor or horizontal differencing, whole-byte integer
    samples, normal fill order. None for anything else (tifffile decodes those). A short last strip is
    padded with zeros, as tifffile pads it (the tests compare both on every case handled here)."""
    try:
        from isal import isal_zlib

        dtype = np.dtype(kf.dtype)
        simple = (int(kf.compression) in (8, 32946) and int(kf.predictor) in (1, 2) and int(kf.fillorder) == 1
                  and dtype.kind in "ui" and int(kf.bitspersample) == dtype.itemsize * 8)
        stored = dtype.newbyteorder("<" if kf.parent.byteorder == "<" else ">")
    except Exception:  # no isal, or an attribute this tifffile lacks: tifffile decodes
        return None
    if not simple:
        return None
    size = math.prod(shape)
    predictor = int(kf.predictor) == 2

    def inflate(data: bytes) -> np.ndarray:
        flat = np.frombuffer(isal_zlib.decompress(data), stored)
        if flat.size >= size:
            values = flat[:size].astype(dtype)  # native order, and a writable copy
        else:
            values = np.zeros(size, dtype)
            values[:flat.size] = flat
        out = values.reshape(shape)
        if predictor:  # undo horizontal differencing: a running sum along x, wrapping like the encoder
            np.cumsum(out, axis=1, dtype=dtype, out=out)
        return out

    return inflate


class _TiffChunkArray:
    """A read-only, lazily indexed view of one TIFF series that decodes only the tiles/strips a region
    touches, straight through ``tifffile`` (``keyframe.decode``), with no Zarr in between.

    Reading through tifffile's Zarr store cost ~0.2 ms of Python per chunk (asyncio machinery, holding
    the GIL) against ~0.02 ms for the decode itself, and the runner's overlapping bands decoded every chunk
    row twice. Here decoded chunks are kept until a request starts below their row (the runner reads row
    by row), so each chunk is decoded once per pass; the cache is capped at ``cache_bytes``.
    The chunks one request needs are read in order and decoded by a small thread pool (zlib, LZW and
    JPEG decoders release the GIL): decoding a deflated 256 x 256 tile takes ~0.3 ms, and on one thread it
    held the runner at ~2,000 tiles/s on compressed inputs. Only plain layouts are handled (see
    ``supports``); others are read through Zarr.
    """

    def __init__(self, tif: Any, series: Any, cache_bytes: int = 256 * 1024 * 1024) -> None:
        kf = series.keyframe
        self.tif, self.kf = tif, kf
        self.pages = list(series.pages)
        self.shape = tuple(int(n) for n in series.shape)
        self.dtype = np.dtype(kf.dtype)
        self.page_ndim = len(kf.shape)
        self.lead_shape = self.shape[:len(self.shape) - self.page_ndim]
        self.chunk = (int(kf.chunks[0]), int(kf.chunks[1]))
        self.ncols = int(kf.chunked[1])
        self.decodeargs: dict[str, Any] = {"_fullsize": True}
        if getattr(kf, "jpegheader", None) is not None:
            self.decodeargs["jpegheader"] = kf.jpegheader
        self.cache: dict[tuple[int, int, int], np.ndarray] = {}
        self.cache_bytes = cache_bytes
        self.cached = 0  # bytes in ``cache``
        self.compressed = int(kf.compression) != 1
        self.workers = max(1, min(8, os.cpu_count() or 1)) if self.compressed else 1
        self._pool: Any = None
        self._inflate = _inflater(kf, (*self.chunk, *kf.shape[2:]))

    @staticmethod
    def supports(series: Any) -> bool:
        """Chunked (not contiguous) pages, one image plane each, samples interleaved, none missing."""
        try:
            kf = series.keyframe
            page_ndim = len(kf.shape)
            lead = tuple(series.shape[:len(series.shape) - page_ndim])
            return bool(
                series.dataoffset is None and page_ndim in (2, 3)
                and tuple(series.shape[len(lead):]) == tuple(kf.shape)
                and (kf.planarconfig == 1 or kf.samplesperpixel == 1)
                and getattr(kf, "imagedepth", 1) == 1 and getattr(kf, "tiledepth", 1) == 1
                and len(kf.chunks) >= 2 and math.prod(kf.chunked[2:]) == 1
                and not getattr(kf, "is_subsampled", False)
                and math.prod(lead) == len(series.pages) and all(p is not None for p in series.pages))
        except Exception:  # any surprise in an unusual file: let Zarr handle it
            return False

    def _raw(self, page_index: int, r: int, c: int) -> bytes | None:
        """The stored bytes of one chunk, None for a chunk never written."""
        page = self.pages[page_index]
        index = r * self.ncols + c
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0 or offset == 0:
            return None
        fh = self.tif.filehandle
        with fh.lock:
            fh.seek(offset)
            return bytes(fh.read(count))

    def _decode(self, page_index: int, r: int, c: int, data: bytes | None) -> np.ndarray:
        """One chunk's pixels; a chunk whose bytes do not decode is a damaged file (one line at the CLI,
        as for damage found when opening it)."""
        if data is None:  # a chunk never written: zeros, as tifffile reads it
            return np.zeros((*self.chunk, *self.kf.shape[2:]), self.dtype)
        index = r * self.ncols + c
        try:
            if self._inflate is not None:
                return self._inflate(data)
            decoded = self.kf.decode(data, index, jpegtables=getattr(self.pages[page_index], "jpegtables", None),
                                     **self.decodeargs)[0]
            if decoded is None:
                raise ValueError("no pixels came out")
            return np.asarray(decoded).reshape(*self.chunk, *self.kf.shape[2:])
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _damaged_tiff(Path(self.tif.filehandle.path),
                                f"tile/strip {index} of page {page_index} does not decode: {detail}") from exc

    def _keep(self, key: tuple[int, int, int], chunk: np.ndarray) -> None:
        self.cache[key] = chunk
        self.cached += chunk.nbytes
        while self.cached > self.cache_bytes and len(self.cache) > 1:
            self.cached -= self.cache.pop(next(iter(self.cache))).nbytes  # the oldest

    def _chunk(self, page_index: int, r: int, c: int) -> np.ndarray:
        key = (page_index, r, c)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        chunk = self._decode(page_index, r, c, self._raw(page_index, r, c))
        self._keep(key, chunk)
        return chunk

    def _prefetch(self, page_index: int, rows: range, cols: range) -> dict[tuple[int, int, int], np.ndarray]:
        """Decode the chunks of ``rows`` x ``cols`` not yet cached, in parallel; returns them (the cache may
        not hold them all). Reads stay sequential, in file order."""
        keys = [(page_index, r, c) for r in rows for c in cols if (page_index, r, c) not in self.cache]
        if self.workers < 2 or len(keys) < 2:
            return {}
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="czreg-decode")
        raws = [self._raw(*key) for key in keys]
        chunks = list(self._pool.map(lambda kr: self._decode(kr[0][0], kr[0][1], kr[0][2], kr[1]), zip(keys, raws)))
        for key, chunk in zip(keys, chunks):
            self._keep(key, chunk)
        return dict(zip(keys, chunks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getitem__(self, key: Any) -> np.ndarray:
        key = (*(key if isinstance(key, tuple) else (key,)),)
        key = key + (slice(None),) * (len(self.shape) - len(key))  # numpy: missing trailing axes are whole
        lead_key, page_key = key[:len(self.lead_shape)], key[len(self.lead_shape):]
        page_index = int(np.ravel_multi_index(tuple(int(i) for i in lead_key), self.lead_shape)) \
            if self.lead_shape else 0
        h, w = self.shape[len(self.lead_shape):][:2]
        ys, xs = (k if isinstance(k, slice) else slice(int(k), int(k) + 1) for k in page_key[:2])
        y0, y1, sy = ys.indices(h)
        x0, x1, sx = xs.indices(w)
        if sy != 1 or sx != 1:
            raise ValueError("strided reads are not supported")
        rest = page_key[2:] if len(page_key) > 2 else ()
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), *self.kf.shape[2:]), self.dtype)
        ch, cw = self.chunk
        r0 = y0 // ch
        # drop what the row-by-row reader will not ask for again: other planes, rows above this request
        for k in [k for k in self.cache if k[0] != page_index or k[1] < r0]:
            self.cached -= self.cache.pop(k).nbytes
        rows = range(r0, (y1 - 1) // ch + 1 if y1 > y0 else r0)
        cols = range(x0 // cw, (x1 - 1) // cw + 1 if x1 > x0 else 0)
        fresh = self._prefetch(page_index, rows, cols) if self.compressed else {}
        for r in rows:
            for c in cols:
                chunk = fresh.get((page_index, r, c))
                if chunk is None:
                    chunk = self._chunk(page_index, r, c)
                a, b = max(y0, r * ch), min(y1, (r + 1) * ch)
                e, f = max(x0, c * cw), min(x1, (c + 1) * cw)
                out[a - y0:b - y0, e - x0:f - x0] = chunk[a - r * ch:b - r * ch, e - c * cw:f - c * cw]
        if not isinstance(page_key[0], slice):
            out = out[0]
            if not isinstance(page_key[1], slice):
                out = out[0]
        elif not isinstance(page_key[1], slice):
            out = out[:, 0]
        return out[(..., *rest)] if rest else out


@contextlib.contextmanager
def _tifffile_log_captured() -> Iterator[list[str]]:
    """tifffile reports damage through its logger (a stray ``<tifffile.TiffPages @...> invalid offset`` line
    on stderr); collect those messages instead, for our own one-line error."""
    import logging

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("tifffile")
    handler, propagate = _Collect(level=logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _damaged_tiff(path: Path, detail: str) -> UsageError:
    return UsageError(f"cannot read TIFF {path.name}: the file is damaged or not a TIFF ({detail})",
                      hint="check that the file was copied completely; open it in Fiji or re-export it")


def _open_tiff(path: Path) -> ImageSource:
    import tifffile
    import zarr

    with _tifffile_log_captured() as log:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise _damaged_tiff(path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                                ) from None
        try:
            if not tif.series or not tif.pages:
                raise _damaged_tiff(path, log[-1].split("> ", 1)[-1] if log else "no image in it")
            series = tif.series[0]
            axes = series.axes.replace("S", "C")
            if axes.count("C") > 1:  # both channels and samples: read as is, let the user choose
                raise UsageError(f"{path.name}: has both channel and sample axes ({series.axes})",
                                 hint="convert it to one channel axis first")
            pixel_size = _ome_pixel_size(tif.ome_metadata)
            array: Any
            if series.dataoffset is not None:  # contiguous, uncompressed: the cheapest lazy read
                need = series.dataoffset + series.size * series.dtype.itemsize
                have = path.stat().st_size
                if need > have:
                    raise UsageError(f"TIFF {path.name} is truncated: its image data needs {need:,} bytes, the file "
                                     f"has {have:,}", hint="copy the file again (an interrupted transfer?)")
                array = tifffile.memmap(path, series=0, mode="r")
            elif _TiffChunkArray.supports(series):  # tiles or strips, decoded directly
                array = _TiffChunkArray(tif, series)
            else:
                array = zarr.open(series.aszarr(), mode="r")
                if not hasattr(array, "shape"):  # a pyramid: take the full-resolution level
                    array = array["0"]
        except UsageError:
            tif.close()
            raise
        except Exception as exc:
            tif.close()
            text = str(exc).strip()
            raise _damaged_tiff(path, text.splitlines()[0] if text else type(exc).__name__) from exc
    if isinstance(array, _TiffChunkArray):
        chunks = array

        def close() -> None:
            chunks.close()
            tif.close()

        return ImageSource(path, array, axes, pixel_size, close)
    return ImageSource(path, array, axes, pixel_size, tif.close)


DEFAULT_MAX_IMAGE_PIXELS = 1 << 28  # 268 M pixels (16384 x 16384): PNG/JPEG are decoded whole, in memory


def max_image_pixels() -> int:
    """The largest PNG/JPEG/BMP (pixels) ``czreg run`` decodes: ``CZREG_MAX_IMAGE_PIXELS`` or 2**28.

    Pillow decodes these formats whole (no tiles), so the limit bounds memory: 2**28 RGB pixels are
    0.8 GB as uint8 and 3.2 GB once scaled to float32 per band. Bigger images belong in a tiled TIFF or
    Zarr, which the runner reads tile by tile. Pillow's own bomb check (a warning at 89 M pixels, an error
    at 179 M) is replaced by this one deliberate limit."""
    text = os.environ.get("CZREG_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise UsageError(f"CZREG_MAX_IMAGE_PIXELS={text!r} is not a number",
                         hint="give a pixel count, e.g. 400000000") from None
    return max(value, 1)


def _open_pil(path: Path) -> ImageSource:
    from PIL import Image

    limit = max_image_pixels()
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our limit below; Pillow's would warn with a site-packages path
        with Image.open(path) as opened:
            im: Any = opened
            w, h = im.size
            if w * h > limit:
                raise UsageError(f"{path.name} is {w} x {h} = {w * h / 1e6:.0f} M pixels, over the "
                                 f"{limit / 1e6:.0f} M pixel limit for {path.suffix.lower()} images (decoded "
                                 "whole, in memory)",
                                 hint="convert it to a tiled OME-TIFF or Zarr, or raise CZREG_MAX_IMAGE_PIXELS")
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("1", "LA", "CMYK", "YCbCr"):
                im = im.convert("L" if mode in ("1", "LA") else "RGB")
            arr = np.asarray(im)
            if im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read image {path.name}: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return ImageSource(path, arr, "YXC" if arr.ndim == 3 else "YX")


def _open_zarr(path: Path) -> ImageSource:
    import zarr

    node: Any
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise UsageError(f"cannot open Zarr {path.name}: {exc}") from exc
    attrs: dict[str, Any] = dict(node.attrs)
    axes: str | None = attrs.get("axes") if isinstance(attrs.get("axes"), str) else None
    if not hasattr(node, "shape"):  # a group: OME-Zarr multiscales or the first array
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        if ms:
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])).upper() or None
            node = node[ms[0]["datasets"][0]["path"]]
        else:
            names = sorted(k for k, _ in node.arrays())
            if not names:
                raise UsageError(f"Zarr group {path.name} holds no array")
            node = node[names[0]]
            axes = axes or (dict(node.attrs).get("axes") if isinstance(dict(node.attrs).get("axes"), str)
                            else None)
    pixel_size = {k: float(v) for k, v in (attrs.get("pixel_size_um") or {}).items()}
    return ImageSource(path, node, axes or guess_axes(node.shape), pixel_size)


def open_image(path: Path | str, axes: str | None = None) -> ImageSource:
    """Open an image for lazy reading; ``axes`` overrides what the file says (or what is guessed)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image not found: {path}", hint="check the path")
    name = path.name.lower()
    if path.is_dir() or name.endswith(".zarr"):
        src = _open_zarr(path)
    elif name.endswith(TIFF_SUFFIXES):
        src = _open_tiff(path)
    elif name.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path.name}: {exc}") from exc
        src = ImageSource(path, arr, guess_axes(arr.shape))
    elif name.endswith(PIL_SUFFIXES):
        src = _open_pil(path)
    elif name.endswith(".czi"):
        from .czi import open_czi

        src = open_czi(path)
    else:
        raise UsageError(f"unsupported image type: {path.name}",
                         hint="use OME-TIFF/TIFF, CZI, PNG, JPEG, .npy or Zarr")
    if axes:
        src.axes = _check_axes(axes, len(src.shape), path)
    else:
        src.axes = _check_axes(src.axes, len(src.shape), path)
    return src


# --- values -----------------------------------------------------------------------------------------


def scale_to_unit(block: np.ndarray) -> np.ndarray:
    """Scale to float32 in [0, 1] as the host does: uint8 / 255, uint16 / 65535, other integers by their
    maximum, booleans as 0/1, floats as given."""
    dt = block.dtype
    if dt == np.bool_:
        return block.astype(np.float32)
    if np.issubdtype(dt, np.integer):
        out = block.astype(np.float32)
        out /= np.float32(np.iinfo(dt).max)
        return out
    if np.issubdtype(dt, np.floating):
        return block.astype(np.float32, copy=False)
    raise UsageError(f"pixel type {dt} is not supported", hint="convert the image to uint8, uint16 or float32")


def to_model_channels(block: np.ndarray, model_channels: int, *, select: Sequence[int] | None = None,
                      color_handling: str | None = None, bgr: bool = False) -> np.ndarray:
    """Map the image's channels (last axis) to the model's.

    ``select`` picks channels first. Then: equal counts pass; RGB(A) into a 1-channel model is converted to
    monochrome (the mean of R, G, B, like ZEN's ``ConvertToMonochrome``); gray into a 3-channel model is
    replicated; RGBA into a 3-channel model drops alpha. ``bgr`` reverses colour order (legacy Bgr types).
    """
    if select is not None:
        n = block.shape[-1]
        bad = [c for c in select if not 0 <= c < n]
        if bad:
            raise UsageError(f"channel {bad[0]} does not exist; the image has {n} channel(s) (0-based)")
        block = block[..., list(select)]
    n = block.shape[-1]
    if bgr and n >= 3:
        block = np.concatenate([block[..., 2::-1], block[..., 3:]], axis=-1)
    if n == model_channels:
        return block
    if model_channels == 1 and n in (3, 4) and color_handling != "SplitRgb":
        return block[..., :3].mean(axis=-1, keepdims=True, dtype=np.float32)
    if model_channels == 3 and n == 1:
        return np.repeat(block, 3, axis=-1)
    if model_channels == 3 and n == 4:
        return block[..., :3]
    raise UsageError(f"the model takes {model_channels} channel(s) but the image has {n}",
                     hint="choose channels with --channels, e.g. --channels 0")


@dataclass(frozen=True)
class InputAdapter:
    """The one way pixels become model input: scale to [0, 1] as the host does, pick channels, reverse colour
    for legacy BGR types, convert or split RGB per ``ColorHandling``. Built from ``ModelInfo`` by
    ``for_model``; ``czreg run`` (one process and Dask), ``smoke`` and ``evaluate`` all feed pixels through it,
    so a package is checked on the input it will be run on."""

    channels: int
    bgr: bool = False
    color_handling: str | None = None
    select: tuple[int, ...] | None = None

    @classmethod
    def for_model(cls, info: Any, channels: int, select: Sequence[int] | None = None) -> InputAdapter:
        return cls(int(channels), bool(getattr(info, "bgr", False)), getattr(info, "color_handling", None),
                   tuple(int(c) for c in select) if select is not None else None)

    def passes_raw(self, dtype: Any, image_channels: int) -> bool:
        """Whether the pixels need only scaling (8/16-bit, same channels, no colour reversal): callers may then
        hand them on raw and let the predictor scale as it fills the batch (the same float32 division)."""
        return (np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16)) and self.select is None
                and image_channels == self.channels and not (self.bgr and self.channels >= 3))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` (channels last, any supported dtype) as float32 model input."""
        return np.asarray(to_model_channels(scale_to_unit(raw), self.channels, select=self.select,
                                            color_handling=self.color_handling, bgr=self.bgr), dtype=np.float32)


# --- writers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSpec:
    """What will be written: ``lead_shape`` planes of ``(*spatial, channels)`` pixels."""

    lead_axes: str
    lead_shape: tuple[int, ...]
    spatial: tuple[int, ...]
    channels: int
    dtype: np.dtype[Any]
    pixel_size: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    chunk: int = 256
    #: OME-TIFF tile compression: "zlib" (deflate, level 1) or "none". Zarr uses its default codec.
    compression: str = "zlib"

    @property
    def n_planes(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def unit(self) -> int:
        """Rows per write along the first spatial axis: a tile row (2D) or one slice (3D)."""
        return self.chunk if len(self.spatial) == 2 else 1


class Writer(Protocol):
    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        """``block`` covers rows ``start..`` of the first spatial axis, all of the others, all channels.
        Rows arrive in order, planes in order. The writer may keep ``block`` (not a copy) until ``close``:
        callers hand each block over and do not change it afterwards (the runner's ``_Packer`` allocates a
        new one per call)."""

    def close(self) -> None:
        """Finish the file; raise if writing failed."""

    def abort(self) -> None:
        """Stop without finishing (the caller deletes the temp output)."""


class _RowBuffer:
    """Collects rows in order and releases them in aligned ``unit``-row blocks (the last may be short)."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.parts: list[np.ndarray] = []
        self.start = 0
        self.rows = 0

    def push(self, start: int, block: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if start != self.start + self.rows:
            raise RunError(f"internal error: rows arrive out of order ({start} after {self.start + self.rows})")
        self.parts.append(block)
        self.rows += block.shape[0]
        unit = self.spec.unit
        if self.rows >= unit:
            data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            n = self.rows // unit * unit
            for i in range(0, n, unit):
                yield self.start + i, data[i:i + unit]
            rest = data[n:]
            self.parts = [rest] if len(rest) else []
            self.start += n
            self.rows -= n

    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.rows:
            data = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            yield self.start, data
        self.parts, self.start, self.rows = [], 0, 0


def _ome_axes(spec: OutputSpec) -> tuple[str, tuple[int, ...]]:
    lead = spec.lead_axes if spec.lead_axes and set(spec.lead_axes) <= set("TZ") and len(
        set(spec.lead_axes)) == len(spec.lead_axes) else ("T" if spec.lead_shape else "")
    lead_shape = spec.lead_shape if lead == spec.lead_axes else ((spec.n_planes,) if spec.lead_shape else ())
    sp = "ZYX" if len(spec.spatial) == 3 else "YX"
    axes = lead + sp + ("S" if spec.channels > 1 else "")
    return axes, (*lead_shape, *spec.spatial, *((spec.channels,) if spec.channels > 1 else ()))


def _deflate() -> Callable[[Any], bytes]:
    """zlib (deflate) compression at level 1: ISA-L's (``isal``) when installed, else the standard library's.

    Both write standard zlib streams that every TIFF reader decodes to the same pixels; ISA-L is ~10x
    faster on noisy data (0.5 ms against 6 ms for a 256x256x2 uint8 tile here), which made uint8
    probability output the slowest configuration of the runner. Level 1 of ISA-L compresses about as
    well as zlib's level 1 (better on label images)."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency; platforms without a wheel fall back
        import zlib

        return lambda data: zlib.compress(data, 1)
    return lambda data: bytes(isal_zlib.compress(data, 1))


class TiffWriterSink:
    """OME-TIFF, 256x256 tiles, written by a background thread as rows arrive.

    ``spec.compression`` "zlib" compresses tiles (deflate level 1, exactly what ``tifffile`` would write)
    in a small thread pool, pipelined with the file writes: zlib releases the GIL, and one core manages
    only ~40 MB/s on float32 probabilities. "none" writes tiles as they are (fastest; float32 output
    barely compresses anyway).
    """

    _DONE = object()

    def __init__(self, path: Path, spec: OutputSpec) -> None:
        import tifffile

        if spec.compression not in ("zlib", "none"):
            raise UsageError(f"unknown OME-TIFF compression '{spec.compression}'", hint="use zlib or none")
        self.spec = spec
        self.buffer = _RowBuffer(spec)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.aborted = threading.Event()
        #: seconds the writer thread was busy (encoding, waiting for its encoders, writing), not waiting for rows
        self.busy_seconds = 0.0
        self.workers = max(1, min(8, os.cpu_count() or 1)) if spec.compression == "zlib" else 0
        axes, shape = _ome_axes(spec)
        metadata: dict[str, Any] = {"axes": axes}
        for ax in "XYZ":
            if ax in spec.pixel_size:
                metadata[f"PhysicalSize{ax}"] = spec.pixel_size[ax]
                metadata[f"PhysicalSize{ax}Unit"] = "µm"
        if spec.attrs.get("name"):
            metadata["Name"] = str(spec.attrs["name"])
        self.path = path
        self._tw = tifffile.TiffWriter(path, bigtiff=True, ome=True)
        # with zlib the tiles arrive as encoded bytes: tifffile only writes them and sets the tag
        self._kwargs: dict[str, Any] = {"shape": shape, "dtype": spec.dtype, "tile": (spec.chunk, spec.chunk),
                                        "compression": "zlib" if self.workers else None,
                                        "photometric": "minisblack", "metadata": metadata, "maxworkers": 1}
        if spec.channels > 1:
            self._kwargs["planarconfig"] = "contig"
            self._kwargs["extrasamples"] = ["unspecified"] * (spec.channels - 1)
        self._thread = threading.Thread(target=self._run, name="czreg-tiff-writer", daemon=True)
        self._thread.start()

    def _blocks(self) -> Iterator[np.ndarray]:
        """Row blocks from the queue; the time spent waiting for them is not counted as busy."""
        clock = time.perf_counter
        while True:
            t0 = clock()
            item = self.queue.get()
            self.busy_seconds -= clock() - t0
            if item is self._DONE:
                return
            if self.aborted.is_set():
                raise RunError("aborted")
            yield item

    def _raw_tiles(self) -> Iterator[np.ndarray]:
        t = self.spec.chunk
        for item in self._blocks():
            block = item if self.spec.channels > 1 else item[..., 0]
            pages = block if len(self.spec.spatial) == 3 else block[None]
            for page in pages:
                for y in range(0, page.shape[0], t):
                    for x in range(0, page.shape[1], t):
                        yield page[y:y + t, x:x + t]

    def _tiles(self) -> Iterator[np.ndarray] | Iterator[bytes]:
        if not self.workers:
            return self._raw_tiles()
        return self._encoded_tiles()

    def _encoded_tiles(self) -> Iterator[bytes]:
        """zlib-compressed full-size tiles, in order, encoded ahead by ``workers`` threads.

        Each row block is cut into ``workers`` runs of consecutive tiles, one task each: a task per tile
        cost a thread hand-over (a futex wake-up and a GIL switch) per tile, as much CPU as deflating a
        confident segmentation tile. At most two row blocks are in flight (the one being encoded and the
        next), so the writer holds at most about one more row block than before. Blocks are the caller's
        (``_Packer`` hands each over once and never touches it again), so tiles are not copied up front."""
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        t = self.spec.chunk
        shape = (t, t, self.spec.channels) if self.spec.channels > 1 else (t, t)
        dtype = self.spec.dtype
        deflate = _deflate()

        def encode(tiles: list[np.ndarray]) -> list[bytes]:
            out = []
            for tile in tiles:
                if tile.shape != shape:  # edge tiles are padded with zeros, as tifffile does
                    full = np.zeros(shape, dtype)
                    full[tuple(slice(0, n) for n in tile.shape)] = tile
                    tile = full
                out.append(deflate(np.ascontiguousarray(tile, dtype).data))
            return out

        def runs(item: np.ndarray) -> Iterator[list[np.ndarray]]:
            block = item if self.spec.channels > 1 else item[..., 0]
            pages = block if len(self.spec.spatial) == 3 else block[None]
            for page in pages:
                tiles = [page[y:y + t, x:x + t] for y in range(0, page.shape[0], t)
                         for x in range(0, page.shape[1], t)]
                size = -(-len(tiles) // self.workers)
                for i in range(0, len(tiles), size):
                    yield tiles[i:i + size]

        pending: deque[Future[list[bytes]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="czreg-zlib") as pool:
            try:
                for item in self._blocks():
                    for group in runs(item):
                        pending.append(pool.submit(encode, group))
                    while len(pending) > self.workers or (pending and pending[0].done()):
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._tw.write(data=self._tiles(), **self._kwargs)
        except BaseException as exc:
            self.error = exc
            # drain so producers never block on a dead consumer
            while True:
                try:
                    if self.queue.get(timeout=0.1) is self._DONE:
                        break
                except queue.Empty:
                    if self.aborted.is_set():
                        break
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def _put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self._failure()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        for _, chunk in self.buffer.push(start, block):
            self._put(chunk)
        if start + block.shape[0] == self.spec.spatial[0]:
            for _, chunk in self.buffer.flush():
                self._put(chunk)

    def close(self) -> None:
        self._put(self._DONE)
        self._thread.join()
        self._tw.close()
        if self.error is not None:
            raise self._failure()

    def _failure(self) -> BaseException:
        """The writer thread's error: a full disk as ``ENOSPC`` naming the folder (one line at the CLI),
        anything else as a ``RunError``."""
        assert self.error is not None
        return as_disk_full(self.error, str(self.path.parent)) or RunError(
            f"writing the OME-TIFF failed: {self.error}")

    def abort(self) -> None:
        self.aborted.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(self._DONE)
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._tw.close()


# --- OME-Zarr 0.5 output (both the single-process and the Dask run) ------------------------------------

#: Output chunk edge (pixels per Y/X), as the OME-TIFF tiles.
ZARR_CHUNK = 256
#: Shard width along X: one shard holds a row of up to 8 chunks (2048 px), so a 256-row block of an
#: 8192 px wide image is 4 files instead of 32 (and 32 directories).
ZARR_SHARD_X = 2048


def ome_array_axes(lead_axes: str, nd: int) -> str:
    """OME-Zarr axis order: time, other (custom) lead axes, channel, then space (lead Z, then spatial)."""
    lead = list(lead_axes)
    spatial = "ZYX"[-nd:]
    if len(set(lead)) != len(lead) or set(lead) & {*spatial, "C"}:
        raise UsageError(f"image axes '{lead_axes}' + '{spatial}' repeat a letter; OME-Zarr needs distinct axes",
                         hint="pass --axes with distinct letters, e.g. TZYX")
    return "".join([a for a in lead if a == "T"] + [a for a in lead if a not in "TZ"] + ["C"]
                   + [a for a in lead if a == "Z"] + list(spatial))


def ome_zarr_attrs(axes: str, pixel_size: dict[str, float], name: str) -> dict[str, Any]:
    """The group attributes of OME-Zarr 0.5: one multiscale with one dataset ``0``, pixel sizes as scale."""
    types = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
    ome_axes: list[dict[str, str]] = []
    scale: list[float] = []
    for a in axes:
        entry = {"name": a.lower()}
        if a in types:
            entry["type"] = types[a]
        if types.get(a) == "space" and a in pixel_size:
            entry["unit"] = "micrometer"
        ome_axes.append(entry)
        scale.append(float(pixel_size.get(a, 1.0)) if types.get(a) == "space" else 1.0)
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": name, "axes": ome_axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}}


@dataclass(frozen=True)
class OmeZarrLayout:
    """Shape, chunks and shards of the output array ``0`` in OME-Zarr axis order (``axes``).

    Chunks are 256 x 256 (x 1 slice in 3D) with all classes in one chunk; a shard is one chunk high and up
    to ``ZARR_SHARD_X`` wide, narrowed so that it divides ``block`` (the Dask block edge: no two blocks
    share a shard file). The single-process run and the Dask run with its default block get the same layout.
    """

    axes: str
    lead_axes: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...]

    @classmethod
    def plan(cls, lead_axes: str, lead_shape: Sequence[int], spatial: Sequence[int], channels: int,
             block: int | None = None) -> OmeZarrLayout:
        nd = len(spatial)
        axes = ome_array_axes(lead_axes, nd)
        c = ZARR_CHUNK if block is None else min(ZARR_CHUNK, block)
        per = ZARR_SHARD_X // c
        if block is not None:  # the shard must divide the block: the largest count of chunks that does
            k = max(1, block // c)
            per = max(d for d in range(1, min(per, k) + 1) if k % d == 0)
        per = max(1, min(per, -(-int(spatial[-1]) // c)))  # no wider than the image needs
        sizes = dict(zip(lead_axes, lead_shape))
        sp_shape, sp_chunk = iter(spatial), iter((c, c) if nd == 2 else (1, c, c))
        shape = tuple(int(channels) if a == "C" else int(sizes[a]) if a in sizes else int(next(sp_shape))
                      for a in axes)
        chunks = tuple(int(channels) if a == "C" else 1 if a in sizes else next(sp_chunk) for a in axes)
        shards = (*chunks[:-1], chunks[-1] * per)
        return cls(axes, lead_axes, shape, chunks, shards)

    def to_array(self, data: np.ndarray) -> np.ndarray:
        """One plane's ``(*spatial, C)`` data as a view in array axis order (lead axes of length 1)."""
        view = np.moveaxis(data, -1, 0)
        for i, a in enumerate(self.axes):
            if a in self.lead_axes:
                view = np.expand_dims(view, i)
        return view

    def origin(self, lead: Sequence[int], starts: Sequence[int]) -> tuple[int, ...]:
        """The array index of a plane's ``(*starts)`` corner (channel 0)."""
        pos = dict(zip(self.lead_axes, lead))
        sp = iter(starts)
        return tuple(0 if a == "C" else int(pos[a]) if a in pos else int(next(sp)) for a in self.axes)


def create_ome_zarr(root: Path, layout: OmeZarrLayout, dtype: np.dtype[Any], attrs: dict[str, Any]) -> Any:
    """Create the OME-Zarr group at ``root`` (existing files in it are kept) with the sharded array ``0``
    (zstd inner chunks, Zarr's defaults); returns the array."""
    import zarr

    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    group.attrs.update(attrs)
    return group.create_array("0", shape=layout.shape, chunks=layout.chunks, shards=layout.shards, dtype=dtype,
                              fill_value=0)


class OmeZarrShards:
    """Writes shard-aligned regions of the output array, one shard file per task.

    Through ``array[key] = block`` every chunk went through Zarr's event loop one at a time (1-3 ms per
    256 x 256 chunk, most of it overhead, on one core), and without sharding every chunk was its own file
    in its own directory (1-2 ms of ``mkdir`` + ``open`` on ext4). Here a shard's chunks are encoded with
    the array's own codec (numcodecs' zstd, what Zarr calls) and written as one file: the chunks in
    Zarr's (Morton) order, then the index (offset, length per chunk, ``2**64-1`` for a chunk holding only
    the fill value, little-endian uint64, then its CRC32C), exactly Zarr's sharding format; a shard whose
    chunks are all empty is not written. Files are written under a temporary name and renamed. Only the
    layout ``create_ome_zarr`` makes on a local store is handled; ``direct`` is False for anything else and
    shards then go through Zarr's own writes.
    """

    def __init__(self, array: Any, layout: OmeZarrLayout) -> None:
        self.array, self.layout = array, layout
        self.dtype = np.dtype(array.dtype)
        self.shards = layout.shards
        self.chunks = layout.chunks
        self.per = tuple(s // c for s, c in zip(self.shards, self.chunks))
        self.fill = 0
        self.compress: Callable[[Any], bytes] | None = None
        self.root: Path | None = None
        self.order: list[tuple[int, ...]] = list(itertools.product(*(range(n) for n in self.per)))
        self._made: set[Path] = set()
        self.direct = self._direct()

    def _direct(self) -> bool:
        import sys

        try:
            import google_crc32c
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
            from zarr.storage import LocalStore

            meta = self.array.metadata
            store = self.array.store
            if meta.zarr_format != 3 or not isinstance(store, LocalStore) or sys.byteorder != "little":
                return False
            codecs = tuple(meta.codecs)
            if len(codecs) != 1 or type(codecs[0]) is not ShardingCodec:
                return False
            sharding = codecs[0]
            inner, index = tuple(sharding.codecs), tuple(sharding.index_codecs)
            if getattr(sharding.index_location, "value", sharding.index_location) != "end":
                return False
            if not inner or type(inner[0]) is not BytesCodec or len(inner) > 2:
                return False
            if len(index) != 2 or type(index[0]) is not BytesCodec or type(index[1]) is not Crc32cCodec:
                return False
            for codec in (inner[0], index[0]):
                if getattr(codec.endian, "value", codec.endian) not in (None, "little"):
                    return False
            if len(inner) == 2:
                if type(inner[1]) is not ZstdCodec:
                    return False
                from numcodecs import Zstd

                self.compress = Zstd(level=inner[1].level, checksum=inner[1].checksum).encode
            if meta.chunk_key_encoding.encode_chunk_key((0,) * len(self.shards)) != "/".join(
                    ["c", *("0" * len(self.shards))]):
                return False
            if bool(self.array.config.write_empty_chunks) or meta.fill_value != 0:
                return False
            try:
                from zarr.core.indexing import morton_order_iter

                self.order = list(morton_order_iter(self.per))
            except ImportError:  # an older layout of Zarr's internals: C order reads the same
                pass
            self._crc = google_crc32c.value
            self.root = Path(store.root) / self.array.path if self.array.path else Path(store.root)
        except Exception:  # an unexpected Zarr version or layout: use Zarr's own writes
            return False
        return True

    def split(self, origin: Sequence[int], data: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """Cut ``data`` (array axis order, placed at ``origin``, which lies on the shard grid; it covers
        whole shards or reaches the array's end) into ``(shard coordinates, view)`` pairs."""
        for o, s in zip(origin, self.shards):
            if o % s:
                raise RunError(f"internal error: a region at {tuple(origin)} is not on the shard grid {self.shards}")
        parts = []
        for offs in itertools.product(*(range(0, n, s) for n, s in zip(data.shape, self.shards))):
            view = data[tuple(slice(o, o + s) for o, s in zip(offs, self.shards))]
            parts.append((tuple((o + d) // s for o, d, s in zip(origin, offs, self.shards)), view))
        return parts

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> None:
        """Write one shard (``data`` may be short at the array's far edges)."""
        if not self.direct:
            key = tuple(slice(c * s, c * s + n) for c, s, n in zip(coords, self.shards, data.shape))
            self.array[key] = data
            return
        assert self.root is not None
        index = np.full((*self.per, 2), np.uint64(2**64 - 1), np.dtype("<u8"))
        payloads: list[Any] = []
        pos = 0
        for inner in self.order:
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(inner, self.chunks))
            part = data[region]
            if part.size == 0:
                continue
            if part.shape != self.chunks:  # edge chunks are stored whole, padded with the fill value
                full = np.zeros(self.chunks, self.dtype)
                full[tuple(slice(0, k) for k in part.shape)] = part
                chunk = full
            else:  # one contiguous copy, made first: the emptiness test reads contiguous memory
                chunk = np.ascontiguousarray(part, self.dtype)
            if not chunk.any():
                continue
            raw = chunk.data.cast("B")
            payload = self.compress(raw) if self.compress is not None else bytes(raw)
            payloads.append(payload)
            index[inner] = (pos, len(payload))
            pos += len(payload)
        path = self.root.joinpath("c", *(str(c) for c in coords))
        if not payloads:  # all fill value: no file (an earlier, interrupted run's one goes)
            path.unlink(missing_ok=True)
            return
        index_bytes = index.tobytes()
        if path.parent not in self._made:  # one mkdir per folder, not per shard
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            with tmp.open("wb") as fh:
                for payload in payloads:
                    fh.write(payload)
                fh.write(index_bytes)
                fh.write(np.uint32(self._crc(index_bytes)).astype("<u4").tobytes())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class ZarrWriterSink:
    """OME-Zarr 0.5 (Zarr v3): a group with ``multiscales`` metadata and one sharded array ``0`` in OME axis
    order (``TCYX``, ``CZYX``, ...), the layout ``czreg run --dask`` writes (``OmeZarrLayout``).

    Shards are encoded and written by a small thread pool (zstd and file writes release the GIL), so the
    caller only hands rows over; see ``OmeZarrShards``. Each row block is cut into ``workers`` runs of
    consecutive shards, one task each. What is in flight is bounded by bytes, not by count: a run costs
    the part of the row block it keeps alive plus two shards (the contiguous copies and the encoded bytes
    of the shard being written), and all in flight together may cost one row block of the output (``unit``
    rows, full width) plus those copies (one run always goes). So the writer adds at most about one row
    block to the runner's memory, while every thread of the pool has work.
    """

    def __init__(self, path: Path, spec: OutputSpec) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.spec, self.path = spec, path
        self.buffer = _RowBuffer(spec)
        self.layout = OmeZarrLayout.plan(spec.lead_axes, spec.lead_shape, spec.spatial, spec.channels)
        self.chunks = self.layout.chunks
        path.mkdir(parents=True, exist_ok=False)
        attrs = {**ome_zarr_attrs(self.layout.axes, spec.pixel_size, str(spec.attrs.get("name", ""))),
                 "pixel_size_um": spec.pixel_size, "czregistry": {**spec.attrs, "axes": self.layout.axes,
                                                                "lead_axes": spec.lead_axes}}
        self.array = create_ome_zarr(path, self.layout, spec.dtype, attrs)
        self.shards = OmeZarrShards(self.array, self.layout)
        self.workers = max(1, min(8, os.cpu_count() or 1)) if self.shards.direct else 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="czreg-zarr")
        self._pending: collections.deque[tuple[Any, int]] = collections.deque()  # (future, bytes)
        self._pending_bytes = 0
        itemsize = np.dtype(spec.dtype).itemsize
        #: bytes of one shard; a shard being written costs about twice that (its chunks' contiguous
        #: copies and the encoded bytes)
        self.shard_bytes = math.prod(self.layout.shards) * itemsize
        #: the most that runs queued or being written may cost together (one run always goes)
        self.max_pending_bytes = (spec.unit * math.prod(spec.spatial[1:]) * spec.channels * itemsize
                                  + 2 * self.workers * self.shard_bytes)
        self._lock = threading.Lock()
        #: seconds the pool's threads were busy encoding and writing, summed over threads
        self.busy_seconds = 0.0

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - t0

    def _retire(self) -> None:
        future, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        future.result()  # raises what a worker raised

    def _submit(self, cost: int, fn: Callable[..., None], *args: Any) -> None:
        while self._pending and (self._pending[0][0].done()
                                 or self._pending_bytes + cost > self.max_pending_bytes):
            self._retire()
        self._pending.append((self._pool.submit(self._timed, fn, *args), cost))
        self._pending_bytes += cost

    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        lead = tuple(int(i) for i in np.unravel_index(plane, self.spec.lead_shape)) if self.spec.lead_shape else ()
        chunks = list(self.buffer.push(start, block))
        if start + block.shape[0] == self.spec.spatial[0]:
            chunks += list(self.buffer.flush())
        for s, rows in chunks:
            # rows start on a chunk row (the buffer releases whole units), which is the shard grid
            origin = self.layout.origin(lead, (s, *(0,) * (len(self.spec.spatial) - 1)))
            parts = self.shards.split(origin, self.layout.to_array(rows))
            size = -(-len(parts) // self.workers)
            for i in range(0, len(parts), size):
                run = parts[i:i + size]
                cost = sum(part.nbytes for _, part in run) + 2 * self.shard_bytes
                self._submit(cost, self._write_shards, run)

    def _write_shards(self, parts: list[tuple[tuple[int, ...], np.ndarray]]) -> None:
        for coords, data in parts:
            self.shards.write(coords, data)

    def close(self) -> None:
        try:
            while self._pending:
                self._retire()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, RunError):
                raise
            raise as_disk_full(exc, str(self.path.parent)) or RunError(
                f"writing the Zarr output failed: {exc}") from exc
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        for f, _ in self._pending:
            f.cancel()
        self._pending.clear()
        self._pending_bytes = 0
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_ome_zarr(path: Path | str) -> np.ndarray:
    """An OME-Zarr output of ``czreg run`` (either path) as ``(*planes, *spatial, C)``: lead axes in the
    input's order, then space, then classes (the class axis moved last, as the OME-TIFF's samples).

    Anything else is a ``UsageError`` saying what was found (one line at the CLI)."""
    import zarr

    root = Path(path)
    hint = "give the -o folder of czreg run (OME-Zarr 0.5); a plain Zarr array opens with zarr.open_array"
    if not root.is_dir():
        raise UsageError(f"{root} is not an OME-Zarr output of czreg run (no such folder)", hint=hint)
    try:
        group = zarr.open_group(str(root), mode="r")
    except Exception as exc:
        what = ("it holds a plain Zarr array (czreg run wrote those before its output was OME-Zarr)"
                if type(exc).__name__ == "ContainsArrayError" else "it has no Zarr group metadata")
        raise UsageError(f"{root} is not an OME-Zarr output of czreg run ({what})", hint=hint) from None
    try:
        attrs: dict[str, Any] = dict(group.attrs)
        ours: dict[str, Any] = attrs.get("czregistry") or {}
        axes = str(ours.get("axes") or "".join(a["name"].upper() for a in
                                                attrs["ome"]["multiscales"][0]["axes"]))
        lead = str(ours.get("lead_axes", ""))
        array: Any = group["0"]
        nd = len(axes) - len(lead) - 1
        want = [*lead, *"ZYX"[-nd:], "C"]
        order = [axes.index(a) for a in want]
        if nd not in (2, 3) or len(axes) != len(array.shape) or sorted(order) != list(range(len(axes))):
            raise ValueError(f"axes {axes} do not fit an array of shape {tuple(array.shape)}")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{root} is not an OME-Zarr output of czreg run (its OME metadata or array 0 is "
                         f"missing or malformed: {type(exc).__name__})", hint=hint) from None
    return np.transpose(np.asarray(array[...]), order)


def output_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    raise UsageError(f"cannot write '{path.name}': the output must end in .ome.tiff, .tif(f) or .zarr",
                     hint="e.g. -o mask.ome.tiff or -o mask.zarr")


def open_writer(path: Path, spec: OutputSpec, fmt: str) -> Writer:
    """Open a ``fmt`` ("tiff" or "zarr") writer at ``path`` (the runner's temp path, renamed when done)."""
    if fmt == "zarr":
        return ZarrWriterSink(path, spec)
    return TiffWriterSink(path, spec)
