"""The measurement engine behind the model checks: what a network does to space, measured by running it.

Every probe feeds the network a window cut from **one** seeded random image with values in [0, 1] and
caches the prediction by (origin, size). Two facts follow from that design:

* Predictions of overlapping windows are comparable pixel by pixel, so translation equivariance is
  checked **by value** (bioimage.io's validator only compares shapes).
* The checks share predictions: the window at the origin serves the output-semantics check, the stride
  search, the halo measurement and the tiled-versus-whole comparison. Probing cost grows with tile area,
  not with the number of checks.

The shift-consistency probe
---------------------------
Predict a window ``A`` at the origin and a window ``B`` shifted by ``s`` pixels along one axis. In their
overlap both predicted the same input pixels, so any difference comes from the window edges (zero
padding, pooling phase, global statistics). For each overlap pixel, its distance ``d`` from the nearest
edge of either window is ``min(p - s, W - 1 - p)``; the error profile ``E(d)`` is the largest difference
among overlap pixels at distance ``>= d``. The **halo** is the smallest ``d`` with ``E(d) <= tol`` (pixels
at least that far from a tile edge are exact, so a tiling border of ``halo`` pixels is seamless). The
**stride** is the smallest shift for which such a ``d`` exists: shifting a pooling network by less than
its total pooling factor changes the pooling phase and the whole overlap differs. Shifts of ``s``, ``2s``
and ``3s`` cover several phases; the halo is the largest of their halos. A network whose overlap never
becomes consistent at any shift has **global context** (global pooling, dense heads, per-image
normalisation): no border makes its tiling seamless. The probe needs only windows of the tile size, so it
works for fixed-size graphs too. Single-impulse probes (StarDist's method) see one pooling phase and under-
report; this probe sees every phase present in the overlap.

Tolerance: two predictions agree when they differ by at most ``TOLERANCE * max(1, output range)``
(``TOLERANCE = 1e-4``): float32 networks reproduce a pixel bit-for-bit or to ~1e-6 when only its position
in the window changes, while a real dependence on the edge shows up at 1e-3 and above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..backends import Session
    from ..metadata import ModelInfo

__all__ = [
    "TOLERANCE",
    "InvarianceResult",
    "Prober",
    "TilingResult",
    "measure_invariance",
    "measure_tiling",
]

#: Agreement tolerance, relative to ``max(1, output range)``; see the module docstring.
TOLERANCE = 1e-4
#: Seed of the probe image: every run of every backend probes the same pixels.
SEED = 20240521
#: Default tile when neither metadata nor graph fixes one (only reached by hand-made calls).
DEFAULT_TILE = 64
#: Largest shift tried when searching the stride of a fixed-size graph.
MAX_STRIDE = 32


class ProbeRejected(Exception):
    """The network refused an input size (the backend raised); carries the backend's message."""


@dataclass
class InvarianceResult:
    """What probing found out about a model's spatial behaviour.

    All per-axis tuples are in spatial order (``[h, w]`` or ``[z, h, w]``). ``None`` means "not
    measured" (time budget, fixed graph) or "does not exist" (halo of a global-context model).
    """

    spatial_ndim: int
    #: Window size the shift probes used (the tile, capped by ``max_probe_size``).
    window: tuple[int, ...]
    #: Whether the graph runs on spatial sizes other than the tile.
    accepts_other_sizes: bool
    #: The only size the graph runs on, when it has one (fixed dims in the graph, or every probe refused).
    fixed_size: tuple[int, ...] | None
    #: Smallest size change per axis the graph accepts with an output of the same size (None if fixed).
    step: tuple[int | None, ...]
    #: Whether every accepted size gave an output of that same spatial size.
    output_follows_input: bool | None
    #: Smallest shift per axis under which predictions are consistent (translation-equivariance period).
    stride: tuple[int | None, ...]
    #: Pixels from a window edge beyond which predictions are exact, per axis.
    halo: tuple[int | None, ...]
    #: The output depends on the whole window: no border makes tiling seamless.
    global_context: bool
    #: Largest difference between a crop's prediction and the same crop of a larger prediction, at least a
    #: halo away from the crop's edge (fixed graphs: between two tile-size windows shifted by the stride).
    equivariance_error: float | None
    equivariance_error_rel: float | None
    #: Interior error for a one-pixel shift when the stride is larger (what an off-grid tiling costs).
    offgrid_shift_error: float | None
    output_range: float
    tolerance: float
    #: Every size tried: ``{"size": [...], "accepted": bool, "output": [...] | None}``.
    size_probes: list[dict[str, Any]] = field(default_factory=list)
    #: Stopped early at the time budget; unmeasured fields are None.
    partial: bool = False
    notes: list[str] = field(default_factory=list)
    predictions: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TilingResult:
    """A tiled-versus-whole comparison at one overlap."""

    overlap: tuple[int, ...]  # the overlap actually used per axis (declared, rounded up to the stride grid)
    seam_error: float | None  # max |tiled - whole|
    seam_error_rel: float | None  # relative to the output range
    method: str  # "tiled-vs-whole", or "tiles-vs-centre-window" (fixed-size graphs: no whole prediction exists)
    exact: bool | None  # seam error within tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prime_factors(n: int) -> list[int]:
    """Distinct prime factors of ``n``, ascending."""
    out, p = [], 2
    while p * p <= n:
        if n % p == 0:
            out.append(p)
            while n % p == 0:
                n //= p
        p += 1
    return [*out, n] if n > 1 else out


class Prober:
    """Runs cached probes of one session. Create one per model and share it (``ctx.cache``)."""

    def __init__(self, session: Session, info: ModelInfo | None = None, *, max_probe_size: int = 512,
                 time_budget: float = 60.0) -> None:
        self.session = session
        self.max_probe_size = max(8, int(max_probe_size))
        self.time_budget = float(time_budget)
        self.t0 = time.perf_counter()
        self.predictions = 0
        self.predict_seconds = 0.0
        sig = session.signature
        if len(sig.inputs) != 1:
            raise ValueError("probing needs a model with exactly one input")
        shape = sig.inputs[0].shape
        self.spatial_ndim = max(1, len(shape) - 2)
        graph_spatial = tuple(shape[1:-1])
        self.graph_fixed: tuple[int, ...] | None = (
            tuple(int(d) for d in graph_spatial if d is not None) if all(d is not None for d in graph_spatial)
            else None)
        self.partially_fixed = any(d is not None for d in graph_spatial) and self.graph_fixed is None
        channels = shape[-1] if shape and shape[-1] is not None else (info.input_channels if info else None)
        self.channels = int(channels or 1)
        tile: tuple[int, ...] | None = None
        if info is not None and info.tile is not None and len(info.tile) == self.spatial_ndim:
            tile = tuple(int(v) for v in info.tile)
        elif self.graph_fixed is not None:
            tile = self.graph_fixed
        else:
            tile = tuple(int(d) if d is not None else DEFAULT_TILE for d in graph_spatial)
        self.tile: tuple[int, ...] = tile
        # One seeded image big enough for every window: two tiles per axis plus room for shifts.
        ext = tuple(2 * min(t, self.max_probe_size) + min(t, self.max_probe_size) // 2 + 8 for t in tile)
        ext = tuple(max(e, t) for e, t in zip(ext, tile))
        rng = np.random.default_rng(SEED)
        self.image = rng.random((*ext, self.channels), dtype=np.float32)
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray | ProbeRejected] = {}
        self.invariance: InvarianceResult | None = None
        self.tilings: dict[tuple[int, ...], TilingResult] = {}

    # -- running ----------------------------------------------------------------------------------------
    @property
    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.time_budget

    def crop(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        idx = tuple(slice(o, o + n) for o, n in zip(origin, size))
        return self.image[idx]

    def predict(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Prediction (without batch axis) of the window at ``origin`` of ``size``; cached.

        Raises ``ProbeRejected`` when the network refuses the size."""
        key = (tuple(int(v) for v in origin), tuple(int(v) for v in size))
        hit = self._cache.get(key)
        if hit is None:
            if any(o < 0 or o + n > e for o, n, e in zip(key[0], key[1], self.image.shape)):
                raise ValueError(f"probe window {key} outside the probe image {self.image.shape[:-1]}")
            batch = self.crop(*key)[None]
            start = time.perf_counter()
            try:
                out = np.asarray(self.session.predict(batch))
                hit = out[0] if out.ndim >= 1 and out.shape[0] == 1 else out
            except Exception as exc:  # any refusal of a size is a measurement, not a crash
                hit = ProbeRejected(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            finally:
                self.predictions += 1
                self.predict_seconds += time.perf_counter() - start
            self._cache[key] = hit
        if isinstance(hit, ProbeRejected):
            raise hit
        return hit

    def predict_uncached(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """A fresh prediction of a window (for the determinism check)."""
        out = np.asarray(self.session.predict(self.crop(origin, size)[None]))
        self.predictions += 1
        return out[0] if out.ndim >= 1 and out.shape[0] == 1 else out

    def tile_prediction(self) -> np.ndarray:
        return self.predict((0,) * self.spatial_ndim, self.tile)

    def _spatial_out(self, out: np.ndarray) -> tuple[int, ...]:
        return tuple(out.shape[: self.spatial_ndim]) if out.ndim == self.spatial_ndim + 1 else tuple(out.shape)

    def output_range(self) -> float:
        out = self.tile_prediction()
        finite = out[np.isfinite(out)]
        return float(finite.max() - finite.min()) if finite.size else 0.0

    def tol(self) -> float:
        return TOLERANCE * max(1.0, self.output_range())

    # -- sizes --------------------------------------------------------------------------------------------
    def _accepts(self, size: tuple[int, ...], probes: list[dict[str, Any]]) -> tuple[bool, bool]:
        """(accepted, output spatial size equals input size)."""
        try:
            out = self.predict((0,) * self.spatial_ndim, size)
        except ProbeRejected as exc:
            probes.append({"size": list(size), "accepted": False, "output": None, "error": str(exc)[:200]})
            return False, False
        spatial = self._spatial_out(out)
        probes.append({"size": list(size), "accepted": True, "output": list(spatial)})
        return True, spatial == size

    def _probe_sizes(self, window: tuple[int, ...], probes: list[dict[str, Any]],
                     notes: list[str]) -> tuple[list[int | None], bool, bool]:
        """Per axis, the smallest size change the graph accepts with a matching output.

        Accepted sizes of a pooling network form a lattice (multiples of its step), so: shrink every axis
        together by d = 1, 2, ... until the graph accepts (off-grid sizes are refused on the way), then
        reduce that joint step per axis by its prime factors (``d / p`` accepted means the axis's step
        divides ``d / p``). Shrinking keeps probes cheap; sizes never go below half the window.
        """
        nd = len(window)
        follows = True
        any_accepted = False

        def sized(axis: int | None, d: int) -> tuple[int, ...]:
            return tuple(v - d if axis is None or i == axis else v for i, v in enumerate(window))

        joint: int | None = None
        for d in range(1, max(2, min(window) // 2) + 1):
            if self.over_budget:
                notes.append("size probing stopped at the time budget")
                break
            ok, same = self._accepts(sized(None, d), probes)
            any_accepted |= ok
            follows &= same or not ok
            if ok and same:
                joint = d
                break
        if joint is None:
            return [None] * nd, follows if any_accepted else True, any_accepted
        steps: list[int | None] = []
        for axis in range(nd):
            step = joint
            reduced = True
            while reduced and step > 1 and not self.over_budget:
                reduced = False
                for prime in _prime_factors(step):
                    ok, same = self._accepts(sized(axis, step // prime), probes)
                    follows &= same or not ok
                    if ok and same:
                        step //= prime
                        reduced = True
                        break
            steps.append(step)
        if not self.over_budget and all(w - 2 * (q or 0) >= 1 for w, q in zip(window, steps)):
            # Confirm on the grid: two steps on every axis at once must work too.
            size = tuple(w - 2 * (q or 0) for w, q in zip(window, steps))
            ok, same = self._accepts(size, probes)
            if not (ok and same):
                notes.append(f"size {list(sized(None, joint))} works but {list(size)} does not")
                follows &= same or not ok
        return steps, follows, any_accepted

    # -- shift consistency --------------------------------------------------------------------------------
    def shift_profile(self, axis: int, shift: int, window: tuple[int, ...]) -> np.ndarray | None:
        """``err[d]`` = max difference at distance >= d from both windows' edges (None if refused)."""
        w = window[axis]
        if shift <= 0 or shift >= w:
            return None
        zero = (0,) * len(window)
        origin = tuple(shift if i == axis else 0 for i in range(len(window)))
        try:
            a = self.predict(zero, window)
            b = self.predict(origin, window)
        except ProbeRejected:
            return None
        if a.shape != b.shape or self._spatial_out(a) != window:
            return None
        a_ov = np.take(a, range(shift, w), axis=axis)
        b_ov = np.take(b, range(0, w - shift), axis=axis)
        diff = np.abs(a_ov.astype(np.float64) - b_ov.astype(np.float64))
        diff = np.where(np.isfinite(diff), diff, np.inf)
        other = tuple(i for i in range(diff.ndim) if i != axis)
        per_p = diff.max(axis=other) if other else diff  # indexed by p - shift
        p = np.arange(shift, w)
        dist = np.minimum(p - shift, w - 1 - p)
        dmax = int(dist.max())
        profile = np.zeros(dmax + 1)
        for d in range(dmax + 1):
            profile[d] = per_p[dist >= d].max()
        return profile

    @staticmethod
    def halo_from_profile(profile: np.ndarray, tol: float) -> int | None:
        bad = np.nonzero(profile > tol)[0]
        if bad.size == 0:
            return 0
        h = int(bad.max()) + 1
        return h if h < profile.size else None

    def _consistent(self, axis: int, shift: int, window: tuple[int, ...], tol: float) -> int | None:
        """Halo for this shift, or None when the overlap never agrees (or the shift does not fit)."""
        if shift > window[axis] // 4:
            return None
        prof = self.shift_profile(axis, shift, window)
        return self.halo_from_profile(prof, tol) if prof is not None else None

    def _stride_and_halo(self, axis: int, window: tuple[int, ...], step: int | None,
                         tol: float, notes: list[str]) -> tuple[int | None, int | None, float | None]:
        """(stride, halo, off-grid interior error) along one axis.

        Consistent shifts are the multiples of the stride. Start from the first consistent shift among
        ``q, 2q, 3q, 4q`` (``q`` the size step; fixed graphs: 1, 2, 3, ...), then divide it by its prime
        factors while the quotient stays consistent: the result is the smallest consistent shift. The
        halo is the largest over the phases ``s, 2s, 3s`` and a far shift of about a quarter window (a
        global statistic moves little for a small shift, much for a large one). A stride whose other
        phases never agree gives ``(s, None)``: the output depends on more than the window can show.
        """
        w = window[axis]
        candidates = [k * step for k in (1, 2, 3, 4)] if step else list(range(1, min(MAX_STRIDE, w // 4) + 1))
        stride: int | None = None
        halos: dict[int, int] = {}
        for s in candidates:
            if s > w // 4 or self.over_budget:
                break
            h = self._consistent(axis, s, window, tol)
            if h is not None:
                stride, halos[s] = s, h
                break
        if stride is None:
            return None, None, None
        reduced = True
        while reduced and stride > 1 and not self.over_budget:
            reduced = False
            for prime in _prime_factors(stride):
                h = self._consistent(axis, stride // prime, window, tol)
                if h is not None:
                    stride //= prime
                    halos[stride] = h
                    reduced = True
                    break
        # Every further shift must leave an overlap wide enough to show the halo already found, so that
        # disagreement there means the interior moved, not that the overlap got too narrow.
        room = w - 1 - 2 * (max(halos.values()) + 2)
        far = min(w // 4, room) // stride * stride
        for shift in sorted({k * stride for k in (1, 2, 3) if k * stride <= far} | ({far} if far > 0 else set())):
            if shift in halos or self.over_budget:
                continue
            h = self._consistent(axis, shift, window, tol)
            if h is None:
                notes.append(f"axis {axis}: shift {stride} is consistent but shift {shift} is not")
                return stride, None, None
            halos[shift] = h
        offgrid: float | None = None
        if stride > 1 and not self.over_budget:
            prof = self.shift_profile(axis, 1, window)
            offgrid = float(prof[-1]) if prof is not None else None
        return stride, max(halos.values()), offgrid

    # -- the measurements ---------------------------------------------------------------------------------
    def measure_invariance(self) -> InvarianceResult:
        if self.invariance is not None:
            return self.invariance
        start = time.perf_counter()
        n0 = self.predictions
        notes: list[str] = []
        probes: list[dict[str, Any]] = []
        nd = self.spatial_ndim
        tol = self.tol()
        fixed: tuple[int, ...] | None
        steps: list[int | None]
        follows: bool | None
        if self.graph_fixed is not None:
            fixed, steps, follows, accepts = self.graph_fixed, [None] * nd, None, False
            window = self.graph_fixed
            if any(v > self.max_probe_size for v in window):
                notes.append(f"fixed tile {list(window)} exceeds --max-probe-size {self.max_probe_size}: "
                             "probing skipped")
                self.invariance = InvarianceResult(nd, window, False, fixed, tuple(steps), None, (None,) * nd,
                                                   (None,) * nd, False, None, None, None, self.output_range(),
                                                   tol, probes, True, notes, 0, 0.0)
                return self.invariance
        else:
            window = tuple(min(t, self.max_probe_size - self.max_probe_size % 16) if t > self.max_probe_size
                           else t for t in self.tile)
            steps, follows, accepts = self._probe_sizes(window, probes, notes)
            fixed = None if accepts or self.over_budget else window
            if fixed is not None:
                notes.append(f"the graph declares free spatial dims but refused every size other than "
                             f"{list(window)}")
        strides: list[int | None] = []
        halos: list[int | None] = []
        offgrid_errors: list[float] = []
        global_context = False
        unmeasured = False
        for axis in range(nd):
            q = steps[axis]
            stride, halo, off = self._stride_and_halo(axis, window, q, tol, notes)
            bigger = window
            if halo is None and accepts and not self.over_budget:
                bigger = tuple(min(2 * v, max(v, self.max_probe_size)) if i == axis else v
                               for i, v in enumerate(window))
                if q:
                    bigger = tuple(v - v % q if i == axis else v for i, v in enumerate(bigger))
                if bigger[axis] > window[axis]:
                    notes.append(f"axis {axis}: no consistent halo in a {window[axis]}-pixel window; "
                                 f"retried with {bigger[axis]}")
                    stride, halo, off = self._stride_and_halo(axis, bigger, q, tol, notes)
            tried = max(window[axis], bigger[axis]) if halo is None and accepts else window[axis]
            if halo is None and not self.over_budget:
                # Consistent at a small shift but not at a larger one (with room for the halo): a global
                # statistic. Never consistent within a window as large as the tile: the receptive field
                # covers the tile. Either way the output depends on the whole tile.
                definite = stride is not None
                stride = None
                if definite or tried >= self.tile[axis]:
                    global_context = True
                else:
                    unmeasured = True
                    notes.append(f"axis {axis}: the halo is wider than half of a {tried}-pixel window; the tile "
                                 f"is {self.tile[axis]}: raise --max-probe-size to measure it")
            strides.append(stride)
            halos.append(halo)
            if off is not None and stride is not None and stride > 1:
                offgrid_errors.append(off)
        eq_abs, eq_rel = self._equivariance(window, steps, strides, halos, accepts, global_context, tol)
        if eq_abs is not None and eq_abs > tol and not global_context and not unmeasured:
            global_context = True
            notes.append(f"a crop's prediction differs from the whole prediction by {eq_abs:.3g} beyond the "
                         "halo: the output depends on the window's size or content as a whole")
        rng = self.output_range()
        self.invariance = InvarianceResult(
            spatial_ndim=nd, window=window, accepts_other_sizes=accepts, fixed_size=fixed, step=tuple(steps),
            output_follows_input=follows, stride=tuple(strides), halo=tuple(halos),
            global_context=global_context, equivariance_error=eq_abs, equivariance_error_rel=eq_rel,
            offgrid_shift_error=max(offgrid_errors) if offgrid_errors else None, output_range=rng,
            tolerance=tol, size_probes=probes, partial=self.over_budget, notes=notes,
            predictions=self.predictions - n0, seconds=round(time.perf_counter() - start, 4))
        return self.invariance

    def _equivariance(self, window: tuple[int, ...], steps: list[int | None], strides: list[int | None],
                      halos: list[int | None], accepts: bool, global_context: bool,
                      tol: float) -> tuple[float | None, float | None]:
        """Crop-versus-whole by value (free graphs), or shifted tile windows (fixed graphs)."""
        nd = len(window)
        if self.over_budget:
            return None, None
        rng = max(self.output_range(), 1e-12)
        grid = [math.lcm(s or 1, q or 1) for s, q in zip(strides, steps)]
        margins = [h if h is not None else None for h in halos]
        if accepts and all(q is not None for q in steps) and not self.over_budget:
            big = tuple(min(2 * w, max(w, self.max_probe_size)) for w in window)
            big = tuple(b - b % g for b, g in zip(big, grid))
            offs = tuple(((b - w) // 2) // g * g for b, w, g in zip(big, window, grid))
            if all(b >= w for b, w in zip(big, window)):
                try:
                    whole = self.predict((0,) * nd, big)
                    crop = self.predict(offs, window)
                except ProbeRejected:
                    return None, None
                ref = whole[tuple(slice(o, o + w) for o, w in zip(offs, window))]
                if ref.shape != crop.shape:
                    return None, None
                inner = []
                for m, w in zip(margins, window):
                    m = m if m is not None else w // 2 - 1  # global context: the centre only
                    m = min(m, (w - 1) // 2)
                    inner.append(slice(m, w - m))
                diff = np.abs(crop[tuple(inner)].astype(np.float64) - ref[tuple(inner)].astype(np.float64))
                err = float(np.nanmax(diff)) if diff.size else 0.0
                return err, err / rng
        # Fixed graphs: the worst interior error of tile-size windows shifted by the stride (or 1).
        errs = []
        for axis in range(nd):
            s = strides[axis] or 1
            prof = self.shift_profile(axis, s, window)
            if prof is None:
                continue
            h = halos[axis]
            errs.append(float(prof[min(h, prof.size - 1)] if h is not None else prof[-1]))
        if not errs:
            return None, None
        return max(errs), max(errs) / rng

    def _seam_against_centre(self, axis: int, pos: int, used: int, window: tuple[int, ...],
                             grid: int) -> float | None:
        """Fixed-size graphs: stitch two tiles (at 0 and ``pos``) along one axis and compare their overlap
        with a third window centred on it, whose pixels there lie about ``pos / 2`` from its edges (exact
        whenever ``pos / 2`` >= halo): the seam error a whole prediction would show."""
        nd = len(window)
        centre = (pos // 2) // grid * grid
        zero = (0,) * nd
        try:
            first = self.predict(zero, window)
            second = self.predict(tuple(pos if i == axis else 0 for i in range(nd)), window)
            ref = self.predict(tuple(centre if i == axis else 0 for i in range(nd)), window)
        except ProbeRejected:
            return None
        w = window[axis]
        cut = pos + used // 2
        xs = np.arange(pos, w)  # image coordinates of the overlap
        if xs.size == 0:  # tiles only abut (no overlap): nothing to compare in this probe
            return None
        stitched = np.concatenate([np.take(first, xs[xs < cut], axis=axis),
                                   np.take(second, xs[xs >= cut] - pos, axis=axis)], axis=axis)
        reference = np.take(ref, xs - centre, axis=axis)
        if stitched.shape != reference.shape:
            return None
        return float(np.abs(stitched.astype(np.float64) - reference.astype(np.float64)).max())

    def measure_tiling(self, overlap: Sequence[int]) -> TilingResult | None:
        """Tile a two-tiles-per-axis image at ``overlap`` and compare with predicting it whole.

        Tiles sit on the stride grid (the overlap is rounded up to it) and are stitched at the middle of
        each overlap, like the host does. Fixed-size graphs cannot predict the whole image, so their stitched
        overlap is compared with a third tile centred on it (``_seam_against_centre``).
        Returns None when the geometry does not fit or the budget is spent.
        """
        inv = self.measure_invariance()
        nd = self.spatial_ndim
        window = inv.window
        overlap = tuple(int(v) for v in overlap)
        if len(overlap) != nd:
            return None
        grid = [math.lcm(s or 1, q or 1) for s, q in zip(inv.stride, inv.step)]
        pos = [(w - o) // g * g for w, o, g in zip(window, overlap, grid)]
        if any(p <= 0 for p in pos):
            return None
        used = tuple(w - p for w, p in zip(window, pos))
        key = used
        if key in self.tilings:
            return self.tilings[key]
        rng = max(inv.output_range, 1e-12)
        tol = inv.tolerance
        if inv.accepts_other_sizes and all(q is not None for q in inv.step):
            full = tuple(w + p for w, p in zip(window, pos))
            if any(f > e for f, e in zip(full, self.image.shape)):
                return None
            try:
                whole = self.predict((0,) * nd, full)
                tiles = {}
                for corner in np.ndindex(*(2,) * nd):
                    origin = tuple(c * p for c, p in zip(corner, pos))
                    tiles[corner] = (origin, self.predict(origin, window))
            except ProbeRejected:
                return None
            stitched = np.empty_like(whole)
            cuts = [p + u // 2 for p, u in zip(pos, used)]
            for corner, (origin, pred) in tiles.items():
                region = tuple(slice(0, c) if k == 0 else slice(c, f) for k, c, f in zip(corner, cuts, full))
                local = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, origin))
                stitched[region] = pred[local]
            diff = np.abs(stitched.astype(np.float64) - whole.astype(np.float64))
            err = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
            result = TilingResult(used, err, err / rng, "tiled-vs-whole", err <= tol)
        else:
            errs = []
            for axis in range(nd):
                err_axis = self._seam_against_centre(axis, pos[axis], used[axis], window, grid[axis])
                if err_axis is not None:
                    errs.append(err_axis)
            if not errs:
                return None
            err = max(errs)
            result = TilingResult(used, err, err / rng, "tiles-vs-centre-window", err <= tol)
        self.tilings[key] = result
        return result


def measure_invariance(session: Session, info: ModelInfo | None = None, *, max_probe_size: int = 512,
                       time_budget: float = 60.0) -> InvarianceResult:
    """Measure a model's spatial behaviour: accepted sizes and size step, stride, halo, global context and
    translation-equivariance error. See the module docstring for the method.

    Packing uses ``accepts_other_sizes``/``global_context`` to refuse resetting the tile of a model that is
    not spatially invariant; tiling uses ``step`` (tile sizes) and ``halo`` (borders).
    """
    return Prober(session, info, max_probe_size=max_probe_size, time_budget=time_budget).measure_invariance()


def measure_tiling(session: Session, info: ModelInfo | None, overlap: Sequence[int], *,
                   max_probe_size: int = 512, time_budget: float = 60.0) -> TilingResult | None:
    """Tiled-versus-whole comparison at ``overlap`` (see ``Prober.measure_tiling``)."""
    prober = Prober(session, info, max_probe_size=max_probe_size, time_budget=time_budget)
    return prober.measure_tiling(overlap)
