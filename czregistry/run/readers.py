"""Image readers for the tiled runner: every reader returns the same ``source.ImageSource``.

Readers never load a large image whole: TIFF / OME-TIFF is memory-mapped when it is stored contiguous and
uncompressed, and otherwise read chunk by chunk through tifffile's Zarr store; ``.npy`` is memory-mapped;
Zarr is chunked by nature. PNG / JPEG are decoded whole (Pillow has no region decoding; such files are
small). Every reader exposes the same ``ImageSource``: a lazily indexable array plus its axes, where
``C`` is the channel axis (TIFF samples ``S`` count as channels) and everything that is neither channel nor
spatial (T, scenes, and Z for 2D models) is iterated plane by plane.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .source import ImageSource, guess_axes

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "PIL_SUFFIXES", "TIFF_SUFFIXES", "TiffChunkArray", "max_image_pixels",
           "open_image"]

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


class TiffChunkArray:
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
        if any(isinstance(k, slice) for k in lead_key):
            # a range of pages, e.g. all classes of a planar (CYX) file: one page at a time, stacked
            ranges = [range(*k.indices(n)) if isinstance(k, slice) else range(int(k), int(k) + 1)
                      for k, n in zip(lead_key, self.lead_shape)]
            indices = list(itertools.product(*ranges))
            pages = {int(np.ravel_multi_index(i, self.lead_shape)) for i in indices}
            parts = [self._page(int(np.ravel_multi_index(i, self.lead_shape)), page_key, pages) for i in indices]
            kept = [len(r) for k, r in zip(lead_key, ranges) if isinstance(k, slice)]
            if not parts:
                raise ValueError("empty reads are not supported")
            return np.stack(parts).reshape(*kept, *parts[0].shape)
        page_index = int(np.ravel_multi_index(tuple(int(i) for i in lead_key), self.lead_shape)) \
            if self.lead_shape else 0
        return self._page(page_index, page_key, {page_index})

    def _page(self, page_index: int, page_key: tuple[Any, ...], keep_pages: set[int]) -> np.ndarray:
        """``page_key`` of one page; cached chunks of ``keep_pages`` (the request's pages) stay."""
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
        for k in [k for k in self.cache if k[0] not in keep_pages or k[1] < r0]:
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
            elif TiffChunkArray.supports(series):  # tiles or strips, decoded directly
                array = TiffChunkArray(tif, series)
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
    if isinstance(array, TiffChunkArray):
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
