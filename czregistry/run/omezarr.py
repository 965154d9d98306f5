"""OME-Zarr 0.5 output (sharded Zarr v3): the layout, the shard writer and the reader, shared by the
single-process run and the Dask run.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunError, UsageError, as_disk_full
from .writers import OutputSpec, RowBuffer

__all__ = ["ZARR_CHUNK", "ZARR_SHARD_X", "OmeZarrLayout", "OmeZarrShards", "ZarrWriterSink", "create_ome_zarr",
           "ome_array_axes", "ome_zarr_attrs", "read_ome_zarr"]


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
        self.buffer = RowBuffer(spec)
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
