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

__all__ = ["ZARR_CHUNK", "ZARR_SHARD", "OmeZarrLayout", "OmeZarrShards", "ZarrWriterSink", "create_ome_zarr",
           "ome_array_axes", "ome_zarr_attrs", "read_ome_zarr"]


#: Output chunk edge (pixels per Y/X), as the OME-TIFF tiles.
ZARR_CHUNK = 256
#: Shard edge along Y and X: a shard holds up to 8 x 8 chunks (2048 x 2048 px), so an 8192 x 8192 output
#: is 16 files instead of 1024 chunk files (every file created costs ~0.4 ms on ext4).
ZARR_SHARD = 2048


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

    Chunks are 256 x 256 (x 1 slice in 3D) with all classes in one chunk; a shard is up to ``ZARR_SHARD``
    high and wide (one slice deep in 3D), narrowed so that it divides ``block`` (the Dask block edge: no
    two blocks share a shard file) and to what the image needs. Shards this tall need no row buffering:
    ``OmeZarrShards.write_rows`` appends each chunk row to the open shard file. The single-process run and
    the Dask run with its default block get the same layout.
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
        most = ZARR_SHARD // c
        if block is not None:  # the shard must divide the block: the largest count of chunks that does
            k = max(1, block // c)
            most = max(d for d in range(1, min(most, k) + 1) if k % d == 0)
        per_y, per_x = (max(1, min(most, -(-int(n) // c))) for n in spatial[-2:])  # no larger than needed
        sizes = dict(zip(lead_axes, lead_shape))
        sp_shape, sp_chunk = iter(spatial), iter((c, c) if nd == 2 else (1, c, c))
        shape = tuple(int(channels) if a == "C" else int(sizes[a]) if a in sizes else int(next(sp_shape))
                      for a in axes)
        chunks = tuple(int(channels) if a == "C" else 1 if a in sizes else next(sp_chunk) for a in axes)
        shards = (*chunks[:-2], chunks[-2] * per_y, chunks[-1] * per_x)
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


def _write_all(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` in order with one ``writev``, without joining them first (a join is one more copy of a
    whole chunk layer, ~0.8 MB for a 384 px wide float32 two-class row, alive beside the encoded chunks), and
    finish a short write the way ``write`` would (a signal, a full disk's last bytes)."""
    done = os.writev(fd, parts) if parts else 0
    for part in parts:
        view = memoryview(part).cast("B")
        if done >= len(view):
            done -= len(view)
            continue
        view, done = view[done:], 0
        while view:
            view = view[os.write(fd, view):]


class _OpenShard:
    """A shard file being written layer by layer: its temporary file (made at the first non-empty chunk),
    the bytes written so far and its index (offset, length per chunk; ``2**64-1`` = only the fill value)."""

    __slots__ = ("fh", "index", "layers", "path", "pos", "tmp")

    def __init__(self, path: Path, per: tuple[int, ...]) -> None:
        self.path = path
        self.tmp: Path | None = None
        self.fh: Any = None
        self.index = np.full((*per, 2), np.uint64(2**64 - 1), np.dtype("<u8"))
        self.pos = 0
        self.layers = 0  # chunk layers along the first spatial axis written so far

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class OmeZarrShards:
    """Writes the output array's shards directly in Zarr's sharding format, layer by layer.

    Through ``array[key] = block`` every chunk went through Zarr's event loop one at a time (1-3 ms per
    256 x 256 chunk, most of it overhead, on one core), and every file created costs ~0.4 ms on ext4, so
    shards are large (up to 8 x 8 chunks in 2D) and written here. Zarr v3 allows a shard's chunks in any
    order with the index at the end, so a shard need not be buffered whole: ``write_rows`` appends each
    chunk layer (one chunk row in 2D, one slice in 3D) to the shard's open file as it arrives, and the last
    layer adds the index (offset, length per chunk, ``2**64-1`` for a chunk holding only the fill value,
    little-endian uint64) and its CRC32C. Memory stays one layer; open files are the shards across one
    layer. Chunks are encoded with the array's own codec (numcodecs' zstd, what Zarr calls), so each
    chunk's bytes are Zarr's; they lie in C order (Zarr's own writer uses Morton order, the same for shards
    one chunk high), which every reader follows through the index. Empty chunks are left out and a shard
    whose chunks are all empty is not written, as Zarr does. Files are written under a temporary name and
    renamed when complete. Only the layout ``create_ome_zarr`` makes on a local store is handled;
    ``direct`` is False for anything else and layers then go through Zarr's own writes.

    Callers keep each shard's layers in order and in one thread at a time (the single-process sink gives
    a shard column to one lane; a Dask block owns its shards); different shards may be written at once.
    """

    def __init__(self, array: Any, layout: OmeZarrLayout) -> None:
        self.array, self.layout = array, layout
        self.dtype = np.dtype(array.dtype)
        self.shards = layout.shards
        self.chunks = layout.chunks
        self.per = tuple(s // c for s, c in zip(self.shards, self.chunks))
        #: the array axis along which layers arrive (the first spatial axis)
        self.axis = len(layout.axes) - (len(layout.shape) - len(layout.lead_axes) - 1)
        self.compress: Callable[[Any], bytes] | None = None
        self.root: Path | None = None
        self._open: dict[tuple[int, ...], _OpenShard] = {}
        self._lock = threading.Lock()
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
        """Write one whole shard (``data`` may be short at the array's far edges)."""
        self.write_rows(tuple(c * s for c, s in zip(coords, self.shards)), data)

    def write_rows(self, origin: Sequence[int], data: np.ndarray) -> None:
        """Append whole chunk layers of one shard: ``data`` (array axis order) lies at ``origin``, which is on
        the shard grid except along the layer axis, where it is on the chunk grid and continues the shard's
        previous layers. The shard is finished when its last layer (or the array's last) is written."""
        a = self.axis
        coords = tuple(o // s for o, s in zip(origin, self.shards))
        first = origin[a] % self.shards[a] // self.chunks[a]  # the shard's layer that data starts with
        if any(o % s for i, (o, s) in enumerate(zip(origin, self.shards)) if i != a) or origin[a] % self.chunks[a]:
            raise RunError(f"internal error: rows at {tuple(origin)} are not on the shard grid {self.shards}")
        if not self.direct:
            key = tuple(slice(o, o + n) for o, n in zip(origin, data.shape))
            self.array[key] = data
            return
        with self._lock:
            shard = self._open.get(coords)
            if shard is None:
                if first:
                    raise RunError(f"internal error: shard {coords} starts at its layer {first}")
                assert self.root is not None
                shard = self._open[coords] = _OpenShard(self.root.joinpath("c", *map(str, coords)), self.per)
        if shard.layers != first:
            raise RunError(f"internal error: shard {coords} got layer {first} after {shard.layers} layers")
        try:
            self._append(shard, first, data)
            end = min(origin[a] - origin[a] % self.shards[a] + self.shards[a], self.layout.shape[a])
            if origin[a] + data.shape[a] >= end:
                self._finish(shard)
                with self._lock:
                    del self._open[coords]
        except BaseException:
            shard.discard()
            with self._lock:
                self._open.pop(coords, None)
            raise

    def _append(self, shard: _OpenShard, first: int, data: np.ndarray) -> None:
        """Encode ``data``'s chunks in C order (Zarr's chunk order within the layer), each copied to contiguous
        memory on its own, and append the non-empty ones with one ``writev``. A chunk at a time, not the whole
        layer in chunk order: that copy sat beside the layer and its encoded bytes (~0.8 MB more at a peak,
        for a 384 px wide float32 two-class row; ``tests/test_runner.py`` bounds the runner's peak)."""
        n = tuple(-(-k // c) for k, c in zip(data.shape, self.chunks))
        padded = tuple(m * c for m, c in zip(n, self.chunks))
        if padded != data.shape:  # edge chunks are stored whole, padded with the fill value
            full = np.zeros(padded, self.dtype)
            full[tuple(slice(0, k) for k in data.shape)] = data
            data = full
        nd = len(n)
        split = data.reshape([x for m, c in zip(n, self.chunks) for x in (m, c)])
        shard.layers += n[self.axis]
        payloads: list[Any] = []
        index = shard.index
        pos = shard.pos
        base = [0] * nd
        base[self.axis] = first
        whole = (slice(None),)
        for inner in np.ndindex(*n):
            chunk = np.ascontiguousarray(split[tuple(x for i in inner for x in (i, *whole))], self.dtype)
            if not chunk.any():  # only the fill value: not stored
                continue
            raw = chunk.data.cast("B")
            payload = self.compress(raw) if self.compress is not None else bytes(raw)
            index[tuple(b + int(j) for b, j in zip(base, inner))] = (pos, len(payload))
            pos += len(payload)
            payloads.append(payload)
        if not payloads:
            return
        if shard.fh is None:
            parent = shard.path.parent
            if parent not in self._made:  # one mkdir per folder, not per shard
                parent.mkdir(parents=True, exist_ok=True)
                self._made.add(parent)
            shard.tmp = shard.path.with_name(f".{shard.path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            shard.fh = shard.tmp.open("wb", buffering=0)
        _write_all(shard.fh.fileno(), payloads)
        shard.pos = pos

    def _finish(self, shard: _OpenShard) -> None:
        if shard.fh is None:  # all fill value: no file (an earlier, interrupted run's one goes)
            shard.path.unlink(missing_ok=True)
            return
        index_bytes = shard.index.tobytes()
        shard.fh.write(index_bytes + int(self._crc(index_bytes)).to_bytes(4, "little"))
        shard.fh.close()
        shard.fh = None
        assert shard.tmp is not None
        shard.tmp.replace(shard.path)
        shard.tmp = None

    @property
    def unfinished(self) -> int:
        """How many shards are open (some of their layers written, not the last)."""
        return len(self._open)

    def discard(self) -> None:
        """Close and remove the shards still being written (an aborted run)."""
        with self._lock:
            shards, self._open = list(self._open.values()), {}
        for shard in shards:
            shard.discard()


class ZarrWriterSink:
    """OME-Zarr 0.5 (Zarr v3): a group with ``multiscales`` metadata and one sharded array ``0`` in OME axis
    order (``TCYX``, ``CZYX``, ...), the layout ``czreg run --dask`` writes (``OmeZarrLayout``).

    Each chunk row (a slice in 3D) the ``RowBuffer`` releases is appended to the open shard files across
    it by a few single-thread lanes (zstd and file writes release the GIL), so the caller only hands rows
    over; see ``OmeZarrShards``. The shards across a row are cut into ``workers`` runs of consecutive
    shards, and a run always goes to the same lane: a shard's rows are appended in order by one thread.
    What is in flight is bounded by bytes, not by count: a task costs the part of the row it keeps alive
    plus one copy of it (the chunks in chunk order) and its encoded bytes, and all in flight together may
    cost one chunk row of the output (``unit`` rows, full width) plus those copies (one task always goes).
    So the writer adds about one chunk row to the runner's memory, while every lane has work.
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
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"czreg-zarr{i}") for i in range(self.workers)]
        self._pending: collections.deque[tuple[Any, int]] = collections.deque()  # (future, bytes)
        self._pending_bytes = 0
        itemsize = np.dtype(spec.dtype).itemsize
        #: the most that tasks queued or being written may cost together (one task always goes)
        self.max_pending_bytes = 2 * spec.unit * math.prod(spec.spatial[1:]) * spec.channels * itemsize
        self._lock = threading.Lock()
        #: seconds the lanes were busy encoding and writing, summed over lanes
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

    def _submit(self, lane: int, cost: int, fn: Callable[..., None], *args: Any) -> None:
        while self._pending and (self._pending[0][0].done()
                                 or self._pending_bytes + cost > self.max_pending_bytes):
            self._retire()
        self._pending.append((self._lanes[lane].submit(self._timed, fn, *args), cost))
        self._pending_bytes += cost

    def write(self, plane: int, start: int, block: np.ndarray) -> None:
        lead = tuple(int(i) for i in np.unravel_index(plane, self.spec.lead_shape)) if self.spec.lead_shape else ()
        chunks = list(self.buffer.push(start, block))
        if start + block.shape[0] == self.spec.spatial[0]:
            chunks += list(self.buffer.flush())
        widths = self.layout.shards[self.shards.axis + 1:]
        for s, rows in chunks:
            # rows start on a chunk row (the buffer releases whole units) and cover the full width
            origin = self.layout.origin(lead, (s, *(0,) * (len(self.spec.spatial) - 1)))
            data = self.layout.to_array(rows)
            grid = list(itertools.product(*(range(0, n, w) for n, w in zip(data.shape[self.shards.axis + 1:],
                                                                           widths))))
            size = -(-len(grid) // self.workers)
            for lane, i in enumerate(range(0, len(grid), size)):
                run = grid[i:i + size]
                parts = []
                for offs in run:
                    key: tuple[Any, ...] = (..., *(slice(o, o + w) for o, w in zip(offs, widths)))
                    parts.append(((*origin[:self.shards.axis + 1], *offs), data[key]))
                cost = 2 * sum(part.nbytes for _, part in parts)
                self._submit(lane, cost, self._write_rows, parts)

    def _write_rows(self, parts: list[tuple[tuple[int, ...], np.ndarray]]) -> None:
        for origin, data in parts:
            self.shards.write_rows(origin, data)

    def close(self) -> None:
        try:
            while self._pending:
                self._retire()
            if self.shards.unfinished:
                raise RunError(f"internal error: {self.shards.unfinished} shard(s) were left unfinished")
        except BaseException as exc:
            self.abort()
            if isinstance(exc, RunError):
                raise
            raise as_disk_full(exc, str(self.path.parent)) or RunError(
                f"writing the Zarr output failed: {exc}") from exc
        for lane in self._lanes:
            lane.shutdown(wait=True)

    def abort(self) -> None:
        for f, _ in self._pending:
            f.cancel()
        self._pending.clear()
        self._pending_bytes = 0
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        self.shards.discard()


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
