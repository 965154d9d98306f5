"""The measurement engine behind the model checks: what a network does to space, measured by running it.

Every probe feeds the network a window cut from **one** seeded random image with values in [0, 1] and
caches the prediction by (origin, size). The image is unbounded: a pixel's value is a hash of the seed and its
coordinates, so windows of any size cost only their own memory. Two facts follow from that design:

* Predictions of overlapping windows are comparable pixel by pixel, so translation equivariance is
  checked **by value** (bioimage.io's validator only compares shapes).
* The checks share predictions: the window at the origin serves the output-semantics check, the stride
  search, the halo measurement and the tiled-versus-whole comparison.

The shift-consistency probe
---------------------------
Predict a window ``A`` at the origin and a window ``B`` shifted by ``s`` pixels along one axis. In their
overlap both predicted the same input pixels, so any difference comes from the window edges (zero
padding, pooling phase, global statistics). For each overlap pixel, its distance ``d`` from the nearest
edge of either window is ``min(p - s, W - 1 - p)``; the error profile ``E(d)`` is the largest difference
among overlap pixels at distance ``>= d``. The **halo** is the smallest ``d`` with ``E(d) <= tol`` (pixels
at least that far from a tile edge are exact, so a tiling border of ``halo`` pixels is seamless). The
**stride** is the smallest shift whose overlap agrees beyond some distance: shifting a pooling network by
less than its total pooling factor changes the pooling phase and the whole overlap differs. A shift counts as
the stride only when an inner band of distances agrees (``EXACT_MARGIN``), not just the window's centre.

Receptive fields larger than the window
---------------------------------------
A ResNet encoder sees hundreds of pixels: in a 256-pixel window no pixel is out of reach of the edges, so no
``d`` is exact. That is not global context. The probe therefore grows the window along the measured axis
(other axes stay at the base window, so cost grows linearly), doubling up to ``max_probe_size``, and reads the
**decay** of the profile: on the stride grid a local network's error falls with distance
(``E(D/4) / E(3D/4) >= DECAY_RATIO``, ``D`` the largest distance), while a shift off the grid changes the
whole overlap. Once the profile reaches the tolerance the halo is exact; if the largest window still shows
decay but not the tolerance, the halo is reported as a **lower bound** (``halo_bound``). A window the graph
refuses (shapes traced at one size can cap the sizes it runs on) stops the growth; the largest window it ran on
is then read like a fixed-size graph's single window.

Global context needs evidence
-----------------------------
Global pooling, dense heads and per-image normalisation make every pixel depend on content arbitrarily far
away. The **far-content probe** blanks the last quarter of a window along the axis and measures how much the
prediction changes in the first eighth, at a distance of at least ``5W/8`` from the change. A local network's
change there falls as the window (and so the distance) grows, and vanishes beyond its receptive field; a
global statistic changes it by about the same amount however far away the change is. Global context is
reported only on that evidence: the far change exceeds the tolerance beyond an exactly measured halo, or it
does not fall (by more than ``1/FAR_FALL``) when the distance doubles; or, as before, a small shift is
consistent while a larger one is not, or a crop's prediction differs from the whole prediction beyond the
halo (window-size dependent geometry, such as ``align_corners=True`` resampling).

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
    from .backends import Session
    from .metadata import ModelInfo

__all__ = [
    "TOLERANCE",
    "InvarianceResult",
    "Prober",
    "TilingResult",
    "centred_origin",
    "measure_invariance",
    "measure_tiling",
    "probe_image",
    "seam_band",
    "seam_limit",
]

#: Agreement tolerance, relative to ``max(1, output range)``; see the module docstring.
TOLERANCE = 1e-4
#: Seed of the probe image: every run of every backend probes the same pixels.
SEED = 20240521
#: Default tile when neither metadata nor graph fixes one (only reached by hand-made calls).
DEFAULT_TILE = 64
#: Largest shift tried when searching the stride of a fixed-size graph.
MAX_STRIDE = 32
#: A shift profile "decays" when ``E(D/4) / E(3D/4)`` is at least this (a local network, receptive field
#: larger than the window); off-grid shifts and global statistics stay within a factor of ~3.
DECAY_RATIO = 8.0
#: The stride search takes a shift's profile as exact only when at least ``1/EXACT_MARGIN`` of its distances (the
#: innermost ones, at least 2) are within the tolerance (``Prober._classify``).
EXACT_MARGIN = 8
#: A crop's prediction may differ from the whole prediction beyond the halo by this many tolerances before it
#: counts as evidence: at a crop's corners two edges' sub-tolerance effects add up.
EQ_FACTOR = 10.0
#: Far-content change must fall by more than this factor when its distance doubles, or it is global.
FAR_FALL = 2.0
#: The halo probe starts from windows of at most this many pixels per axis (the halo does not depend on the
#: tile; a 1024-pixel denoiser tile need not be probed whole to find it).
BASE_WINDOW = 256
#: Largest half-width of the band compared across a cut between fixed-size tiles (``seam_band``).
SEAM_BAND = 16
#: Largest window (pixels or voxels) a growing halo probe may feed the network.
MAX_PROBE_PIXELS = 1 << 20


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
    #: Accepted sizes off the step whose output shrank or grew (not held against the model).
    offstep_sizes: list[dict[str, Any]] = field(default_factory=list)
    #: Largest window length used per axis by the halo probe.
    probe_windows: tuple[int, ...] = ()
    #: Per axis: ``E(D/4) / E(3D/4)`` of the deciding shift profile (None: exact, or not measured).
    decay: tuple[float | None, ...] = ()
    #: Per axis: ``{window: far-content change}``; see the module docstring.
    far_change: list[dict[str, float]] = field(default_factory=list)
    #: Why global context was concluded (empty when it was not).
    global_evidence: list[str] = field(default_factory=list)
    #: Where the halo could not be pinned but the error still fell with distance: it is at least this.
    halo_bound: tuple[int | None, ...] = ()
    #: Per axis: the level at which the shift error stopped falling (not exactly equivariant), and the
    #: distance from which it holds (the overlap beyond which more overlap does not help).
    residual: tuple[float | None, ...] = ()
    effective_halo: tuple[int | None, ...] = ()
    #: Largest change caused by far content, relative to the output range (global-context evidence).
    global_strength: float | None = None
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
    exact: bool | None  # seam error within tolerance (one per axis: where tiles meet at a corner, two add up)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def centred_origin(cut: int, tile: int, grid: int, anchor: int = 0) -> int:
    """Origin of a ``tile``-long window centred on pixel ``cut``, on the model's stride grid (multiples of ``grid``
    from ``anchor``, the origin of a tile already on the grid). Near its centre a fixed-size graph sees what the
    whole image would show there, so it is the reference for seams at ``cut`` (``Prober.measure_tiling`` on the
    probe image and ``czreg smoke`` on its image both use it)."""
    return anchor + (cut - tile // 2 - anchor) // max(1, grid) * max(1, grid)


def seam_limit(spatial_ndim: int, output_range: float) -> float:
    """The largest seam error that still counts as seamless: ``TOLERANCE`` per spatial axis, scaled by the output
    range (at least 1). A tile corner sums the effects of its ``nd`` edges, so a 2D tiling meets twice one edge's
    error there. ``validate`` (``Prober.measure_tiling``) and ``czreg smoke`` both judge by this one limit: with
    two limits a package between them validated clean and failed its smoke test."""
    return spatial_ndim * TOLERANCE * max(1.0, output_range)


def seam_band(border: int, tile: int) -> int:
    """Half-width of the band compared across a cut. The stitched pixels nearest their tile's edge sit at the
    cut (``border`` px in), so a narrow band catches the worst seam, while the centred reference keeps about half
    a tile of context around every compared pixel: at most ``SEAM_BAND`` px and an eighth of the tile."""
    return max(1, min(int(border), tile // 8, SEAM_BAND))


def _sizes_text(sizes: Sequence[Sequence[int]], most: int = 4) -> str:
    """A few sizes for a message: ``[127, 127], [126, 126], ... [256, 256]``."""
    shown = [str(list(s)) for s in sizes]
    return ", ".join(shown) if len(shown) <= most else ", ".join(shown[: most - 1]) + ", ... " + shown[-1]


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


def _hash_image(coords: Sequence[np.ndarray], channels: int, seed: int) -> np.ndarray:
    """Values in [0, 1) of the unbounded seeded probe image at the broadcast ``coords`` (one array per axis),
    ``channels`` last: splitmix64 of the pixel's coordinates, so any window costs only its own memory and
    every window agrees with every other on shared pixels."""
    key: np.ndarray = np.asarray(np.uint64(seed & 0xFFFFFFFF))
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for c in coords:
            key = (key * np.uint64(1_000_003)) ^ (c.astype(np.uint64) + mult)
        key = key[..., None] * np.uint64(channels) + np.arange(channels, dtype=np.uint64)
        z: np.ndarray = key + mult
        z = np.bitwise_xor(z, np.right_shift(z, np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = np.bitwise_xor(z, np.right_shift(z, np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = np.bitwise_xor(z, np.right_shift(z, np.uint64(31)))
    return np.right_shift(z, np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def probe_image(shape: Sequence[int], channels: int, seed: int = SEED) -> np.ndarray:
    """The probe image's window at the origin, ``[*shape, channels]`` float32 in [0, 1): the pixels validate's
    model checks feed, so ``czreg smoke`` (by default) measures seams on the same image."""
    grids = np.ix_(*(np.arange(n, dtype=np.int64) for n in shape))
    return _hash_image(grids, channels, seed)


@dataclass
class _Axis:
    """What the halo probe found on one axis."""

    stride: int | None = None
    halo: int | None = None
    bound: int | None = None
    window: int = 0
    decay: float | None = None
    offgrid: float | None = None
    far: dict[int, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    #: The error stopped falling at this level (not exactly equivariant) ...
    residual: float | None = None
    #: ... from about this distance on.
    effective: int | None = None
    #: Largest far-content change when it was the evidence for global context.
    strength: float | None = None


class Prober:
    """Runs cached probes of one session. Create one per model and share it (``ctx.cache``)."""

    def __init__(self, session: Session, info: ModelInfo | None = None, *, max_probe_size: int = 2048,
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
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray | ProbeRejected] = {}
        self.invariance: InvarianceResult | None = None
        self.tilings: dict[tuple[int, ...], TilingResult] = {}

    # -- running ----------------------------------------------------------------------------------------
    @property
    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.time_budget

    def crop(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The probe image's window at ``origin`` of ``size`` (``[*size, channels]`` float32)."""
        grids = np.ix_(*(np.arange(o, o + n, dtype=np.int64) for o, n in zip(origin, size)))
        return _hash_image(grids, self.channels, SEED)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One prediction of one window (batch of 1: every backend and fixed-batch graph takes it)."""
        start = time.perf_counter()
        try:
            out = np.asarray(self.session.predict(x[None]))
        finally:
            self.predictions += 1
            self.predict_seconds += time.perf_counter() - start
        return out[0] if out.ndim >= 1 and out.shape[0] == 1 else out

    def predict(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Prediction (without batch axis) of the window at ``origin`` of ``size``; cached.

        Raises ``ProbeRejected`` when the network refuses the size."""
        key = (tuple(int(v) for v in origin), tuple(int(v) for v in size))
        hit = self._cache.get(key)
        if hit is None:
            if any(o < 0 for o in key[0]):
                raise ValueError(f"probe window {key} starts before the probe image")
            try:
                hit = self._run(self.crop(*key))
            except Exception as exc:  # any refusal of a size is a measurement, not a crash
                hit = ProbeRejected(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self._cache[key] = hit
        if isinstance(hit, ProbeRejected):
            raise hit
        return hit

    def predict_uncached(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """A fresh prediction of a window (for the determinism check)."""
        return self._run(self.crop(origin, size))

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

        Sizes on a pooling network's step form a lattice (multiples of the step), so: shrink every axis
        together by d = 1, 2, 3, 4, then powers of two, then the rest, until the graph accepts with an output of
        the same size, then reduce that joint step per axis by its prime factors (``d / p`` accepted means the
        axis's step divides ``d / p``). A graph may also accept a size **off** the step and shrink it (a 63-pixel
        input pooled to 31 and upsampled to 62): such a size is simply off the lattice and says nothing against
        sizes on it, so only sizes on the step decide whether the output follows the input.
        """
        nd = len(window)
        any_accepted = False
        mismatched = False

        def sized(axis: int | None, d: int) -> tuple[int, ...]:
            return tuple(v - d if axis is None or i == axis else v for i, v in enumerate(window))

        limit = max(2, min(window) // 2)
        order = [1, 2, 3, 4] + [1 << k for k in range(3, limit.bit_length()) if (1 << k) <= limit]
        order += [d for d in range(5, limit + 1) if d not in order]
        joint: int | None = None
        for d in order:
            if d > limit:
                continue
            if self.over_budget:
                notes.append("size probing stopped at the time budget")
                break
            ok, same = self._accepts(sized(None, d), probes)
            any_accepted |= ok
            mismatched |= ok and not same
            if ok and same:
                joint = d
                break
        if joint is None:
            return [None] * nd, not mismatched, any_accepted
        steps: list[int | None] = []
        for axis in range(nd):
            step = joint
            reduced = True
            while reduced and step > 1 and not self.over_budget:
                reduced = False
                for prime in _prime_factors(step):
                    ok, same = self._accepts(sized(axis, step // prime), probes)
                    if ok and same:
                        step //= prime
                        reduced = True
                        break
            steps.append(step)
        follows = True
        if not self.over_budget and all(w - 2 * (q or 0) >= 1 for w, q in zip(window, steps)):
            # Confirm on the grid: two steps on every axis at once must work too.
            size = tuple(w - 2 * (q or 0) for w, q in zip(window, steps))
            ok, same = self._accepts(size, probes)
            if not (ok and same):
                notes.append(f"size {list(sized(None, joint))} works but {list(size)} does not")
                follows = same or not ok
        return steps, follows, any_accepted

    def _probe_multiples(self, window: tuple[int, ...], probes: list[dict[str, Any]],
                         notes: list[str]) -> tuple[list[int | None], bool, bool]:
        """A graph that refused every smaller size may still take multiples of its tile (window partitions whose
        count follows the input): one probe at twice the tile tells "multiples of the tile" (a step of the tile)
        from "this tile only" (position embeddings or reshapes traced at one size)."""
        nd = len(window)
        double = tuple(2 * w for w in window)
        if any(d > self.max_probe_size for d in double) or math.prod(double) > 4 * MAX_PROBE_PIXELS:
            notes.append(f"twice the tile {list(double)} exceeds --max-probe-size {self.max_probe_size}: not tried")
            return [None] * nd, True, False
        ok, same = self._accepts(double, probes)
        if not ok:
            return [None] * nd, True, False
        if not same:
            return [None] * nd, False, True
        notes.append(f"the graph runs only on multiples of the tile {list(window)}")
        return list(window), True, True

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
        per_d = np.zeros(int(dist.max()) + 1)
        np.maximum.at(per_d, dist, per_p)
        return np.maximum.accumulate(per_d[::-1])[::-1]  # max over distances >= d

    @staticmethod
    def halo_from_profile(profile: np.ndarray, tol: float) -> int | None:
        bad = np.nonzero(profile > tol)[0]
        if bad.size == 0:
            return 0
        h = int(bad.max()) + 1
        return h if h < profile.size else None

    @staticmethod
    def decay_of(profile: np.ndarray) -> float:
        """``E(D/4) / E(3D/4)``: how much the error falls over the middle half of the distances."""
        dmax = profile.size - 1
        far = float(profile[(3 * dmax) // 4])
        near = float(profile[dmax // 4])
        return near / far if far > 0 else math.inf

    def _classify(self, axis: int, shift: int, window: tuple[int, ...], tol: float, *, margin: bool = False
                  ) -> tuple[str, int | None, float | None]:
        """("exact", halo, None), ("decaying", None, ratio) or ("flat", None, ratio); ("none", ...) when the
        shift does not fit (at most a quarter window) or the graph refused.

        With ``margin`` (the stride search) a profile counts as exact only when it stays within the tolerance
        over at least the innermost eighth of its distances (``EXACT_MARGIN``): an off-grid shift whose error
        sits just above the tolerance can dip below it at the window's centre, where ``E(d)`` is the maximum over
        a column or two, and would otherwise pass for the stride with a halo of half the window."""
        if shift > window[axis] // 4:
            return "none", None, None
        prof = self.shift_profile(axis, shift, window)
        if prof is None or prof.size < 4:
            return "none", None, None
        halo = self.halo_from_profile(prof, tol)
        dmax = prof.size - 1
        if halo is not None and not (margin and halo > dmax - max(2, dmax // EXACT_MARGIN)):
            return "exact", halo, None
        ratio = self.decay_of(prof)
        return ("decaying" if ratio >= DECAY_RATIO else "flat"), None, ratio

    def _consistent(self, axis: int, shift: int, window: tuple[int, ...], tol: float) -> int | None:
        """Halo for this shift, or None when the overlap never agrees (or the shift does not fit)."""
        kind, halo, _ = self._classify(axis, shift, window, tol)
        return halo if kind == "exact" else None

    def _candidates(self, w: int, step: int | None) -> list[int]:
        """Shifts to try as the stride: small multiples of the size step, then its power-of-two multiples (a
        network may accept every size yet be equivariant only under shifts of 32)."""
        base = step or 1
        out = {k * base for k in (1, 2, 3, 4)} | {base << k for k in range(1, 12)}
        if not step:
            out |= set(range(1, min(MAX_STRIDE, w // 4) + 1))
        return sorted(s for s in out if s <= w // 4)

    def _deep_error(self, axis: int, shift: int, window: tuple[int, ...]) -> float:
        prof = self.shift_profile(axis, shift, window)
        return float(prof[(3 * (prof.size - 1)) // 4]) if prof is not None and prof.size else math.inf

    def _find_stride(self, axis: int, window: tuple[int, ...], step: int | None, tol: float
                     ) -> tuple[int | None, str, int | None, float | None]:
        """The smallest shift whose overlap agrees beyond some distance (exact) or whose error decays.

        A divisor replaces the shift found only if it is as good: exact when the shift was exact, and, when it
        only decayed, decaying to a deep error no more than twice as large (in a small window an off-grid
        shift's profile can fall steeply near the edge by chance; its interior error stays large).

        A fixed-size graph (no size step) has every shift up to ``MAX_STRIDE`` as a candidate, one prediction of
        its whole tile each (a ResNet U-Net at 768 px: 32 predictions, a minute, per axis). Powers of two are
        tried first: a shift is consistent only on multiples of the stride, so the smallest consistent power of
        two *is* the stride whenever the stride is a power of two (pooling and strided convolutions by 2, the
        networks people ship); only when none is do the other shifts follow in order."""
        cands = self._candidates(window[axis], step)
        if step is None:
            powers = [c for c in cands if c & (c - 1) == 0]
            cands = powers + [c for c in cands if c not in powers]
        for s in cands:
            if self.over_budget:
                break
            kind, halo, ratio = self._classify(axis, s, window, tol, margin=True)
            if kind not in ("exact", "decaying"):
                continue
            reduced = True
            while reduced and s > 1 and not self.over_budget:
                reduced = False
                for prime in _prime_factors(s):
                    k2, h2, r2 = self._classify(axis, s // prime, window, tol, margin=True)
                    as_good = k2 == "exact" if kind == "exact" else (
                        k2 == "exact" or (k2 == "decaying" and self._deep_error(axis, s // prime, window)
                                          <= 2 * self._deep_error(axis, s, window)))
                    if as_good:
                        s, kind, halo, ratio, reduced = s // prime, k2, h2, r2, True
                        break
            return s, kind, halo, ratio
        return None, "flat", None, None

    def _far_change(self, axis: int, window: tuple[int, ...]) -> float | None:
        """Largest change in the first eighth of the window when its last quarter is blanked (set to 0)."""
        pair = self._content_change(axis, window)
        return pair[0] if pair is not None else None

    def _content_change(self, axis: int, window: tuple[int, ...]) -> tuple[float, float] | None:
        """(far, near): the largest change in the window's first eighth (at least ``5W/8`` from the blanked last
        quarter) and in the eighth next to the blanked quarter."""
        w = window[axis]
        if w < 16:
            return None
        zero = (0,) * len(window)
        try:
            base = self.predict(zero, window)
        except ProbeRejected:
            return None
        x = self.crop(zero, window)
        idx: list[Any] = [slice(None)] * x.ndim
        idx[axis] = slice(w - w // 4, w)
        x[tuple(idx)] = 0.0
        try:
            changed = self._run(x)
        except Exception:
            return None
        if changed.shape != base.shape or self._spatial_out(base) != window:
            return None
        def band(lo: int, hi: int) -> float:
            diff = np.abs(np.take(changed, range(lo, hi), axis=axis).astype(np.float64)
                          - np.take(base, range(lo, hi), axis=axis).astype(np.float64))
            return float(diff.max()) if np.isfinite(diff).all() else math.inf

        e = max(1, w // 8)
        return band(0, e), band(w - w // 4 - e, w - w // 4)

    def _windows(self, base: tuple[int, ...], axis: int, grid: int, growable: bool) -> list[tuple[int, ...]]:
        """The base window, then the measured axis doubled (on the grid) up to ``max_probe_size`` and
        ``MAX_PROBE_PIXELS``."""
        out = [base]
        if not growable:
            return out
        others = math.prod(v for i, v in enumerate(base) if i != axis)
        w = base[axis]
        while True:
            w = 2 * w
            w -= w % max(1, grid)
            if w > self.max_probe_size or w * others > MAX_PROBE_PIXELS or w <= out[-1][axis]:
                return out
            out.append(tuple(w if i == axis else v for i, v in enumerate(base)))

    def _estimate_stride(self, axis: int, window: tuple[int, ...], step: int | None) -> int | None:
        """A window that cannot grow (fixed-size graph) and is narrower than the receptive field shows neither an
        exact nor a decaying profile at any shift. A pooling network still tells its stride there: shifts on its
        grid leave a much smaller interior error than off-grid shifts (which change the pooling phase). The
        smallest shift within twice the least interior error, when that is at least ``DECAY_RATIO / 2`` times
        below a one-step shift's; None when no shift stands out (then tiles need no grid)."""
        cands = self._candidates(window[axis], step)
        errs = {s: self._deep_error(axis, s, window) for s in cands if not self.over_budget}
        finite = {s: e for s, e in errs.items() if math.isfinite(e)}
        if len(finite) < 2:
            return None
        least = min(finite.values())
        first = finite[min(finite)]
        if least * DECAY_RATIO / 2 > first:
            return None
        return min(s for s, e in finite.items() if e <= 2 * least)

    def _probe_axis(self, axis: int, base: tuple[int, ...], step: int | None, growable: bool,
                    tol: float, notes: list[str]) -> _Axis:
        """Stride, halo (or its lower bound) and global-context evidence along one axis."""
        res = _Axis()
        stride: int | None = None
        last = base  # the largest window the graph ran on
        confined = not growable  # the window cannot grow: one window must tell local from global
        for window in self._windows(base, axis, step or 1, growable):
            if self.over_budget:
                notes.append(f"axis {axis}: halo probing stopped at the time budget")
                break
            w = window[axis]
            if window != base:
                try:
                    self.predict((0,) * len(window), window)
                except ProbeRejected as exc:
                    # Shapes traced at one size (attention masks, window partitions) can cap the sizes a graph
                    # runs on: the probe stops growing there, and reads the largest window as a fixed one.
                    notes.append(f"axis {axis}: the graph refused the {list(window)} probe window "
                                 f"({str(exc)[:120]}); the halo probe stops at {res.window} px")
                    confined = True
                    break
            res.window, last = w, window
            if stride is None:
                stride, kind, halo, ratio = self._find_stride(axis, window, step, tol)
            else:
                kind, halo, ratio = self._classify(axis, stride, window, tol)
            far = self._far_change(axis, window)
            if far is not None:
                res.far[w] = far
            if kind == "exact" and halo is not None and stride is not None:
                halos = {stride: halo}
                room = w - 1 - 2 * (halo + 2)
                far_shift = min(w // 4, room) // stride * stride
                for shift in sorted({k * stride for k in (2, 3) if k * stride <= far_shift}
                                    | ({far_shift} if far_shift > 0 else set())):
                    if shift in halos or self.over_budget:
                        continue
                    h = self._consistent(axis, shift, window, tol)
                    if h is None:
                        res.evidence.append(f"axis {axis}: shift {stride} is consistent but shift {shift} is not "
                                            "(a statistic of the whole window)")
                        prof = self.shift_profile(axis, shift, window)
                        res.strength = float(prof[(prof.size - 1) // 2]) if prof is not None else None
                        break
                    halos[shift] = h
                res.stride, res.decay = stride, None
                if not res.evidence:
                    res.halo = max(halos.values())
                    if far is not None and far > tol and w // 2 + w // 8 >= 2 * max(res.halo, 8):
                        res.evidence.append(f"axis {axis}: blanking content {w // 2 + w // 8} px away changes "
                                            f"the output by {far:.3g}, far beyond the halo of {res.halo} px")
                        res.strength = far
                        res.halo = None
                    elif far is not None and far > tol and len(self._windows(base, axis, step or 1, growable)) \
                            > len(res.far):
                        continue  # content beyond the halo still matters here: look further before concluding
                break
            res.decay = ratio
            if kind == "decaying" and stride is not None:
                res.stride = stride
                res.bound = w // 2 - stride  # no distance within this window was exact
            elif res.stride is not None and stride is not None:
                # It decayed in a smaller window and has stopped falling in this one: a floor that no
                # overlap removes (window-dependent resampling or a weak statistic of the window).
                prof = self.shift_profile(axis, stride, window)
                if prof is not None:
                    res.residual = float(prof[(3 * (prof.size - 1)) // 4])
                    res.effective = int(np.nonzero(prof <= 2 * res.residual)[0][0])
                    res.bound = None
            else:
                stride = None  # not settled: search again in the larger window
            fars = [res.far[k] for k in sorted(res.far)]
            if len(fars) >= 3 and min(fars[-3:]) > tol and fars[-1] * FAR_FALL >= fars[-2] \
                    and fars[-2] * FAR_FALL >= fars[-3]:
                res.evidence.append(f"axis {axis}: blanking content {w // 2 + w // 8} px away changes the output "
                                    f"by {fars[-1]:.3g} (at a quarter of that distance: {fars[-3]:.3g}): the change "
                                    "does not fall with distance")
                res.strength = max(fars[-3:])
                res.stride = res.bound = res.residual = res.effective = None
                break
            if res.residual is not None:
                break
        if confined and res.halo is None and not res.evidence and not self.over_budget:
            # A fixed-size graph gives one window only (a capped one, its largest): the change must fall between
            # the band next to the blanked quarter and the band 5/8 of the window away, or the whole window is
            # the context.
            pair = self._content_change(axis, last)
            what = "the fixed tile" if not growable else f"the largest window the graph runs on ({list(last)})"
            if pair is not None and pair[0] > tol and pair[0] * FAR_FALL >= pair[1]:
                res.evidence.append(f"axis {axis}: blanking the last quarter of {what} changes the output "
                                    f"{last[axis] // 2 + last[axis] // 8} px away by {pair[0]:.3g} (next to it: "
                                    f"{pair[1]:.3g}): the change does not fall with distance")
                res.strength, res.stride = pair[0], None
        if confined and res.stride is None and res.halo is None and not res.evidence and not self.over_budget:
            res.stride = self._estimate_stride(axis, last, step)
            if res.stride is not None:
                res.bound = max(0, (last[axis] - 1 - res.stride) // 2)
        if res.stride is not None and res.stride > 1 and not self.over_budget and not res.evidence:
            win = tuple(res.window if i == axis else v for i, v in enumerate(base))
            prof = self.shift_profile(axis, 1, win)
            res.offgrid = float(prof[-1]) if prof is not None else None
        return res

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
        window = tuple(min(t, self.max_probe_size - self.max_probe_size % 16) if t > self.max_probe_size
                       else t for t in self.tile)
        if self.graph_fixed is not None:
            fixed, steps, follows, accepts = self.graph_fixed, [None] * nd, None, False
            window = base = self.graph_fixed
            if any(v > self.max_probe_size for v in window):
                notes.append(f"fixed tile {list(window)} exceeds --max-probe-size {self.max_probe_size}: "
                             "probing skipped")
                self.invariance = InvarianceResult(
                    nd, window, False, fixed, tuple(steps), None, (None,) * nd, (None,) * nd, False, None, None,
                    None, self.output_range(), tol, probes, partial=True, notes=notes, halo_bound=(None,) * nd)
                return self.invariance
        else:
            base = tuple(min(w, BASE_WINDOW) for w in window)
            steps, follows, accepts = self._probe_sizes(base, probes, notes)
            if not accepts and not self.over_budget:
                steps, follows, accepts = self._probe_multiples(window, probes, notes)
                base = window  # the smaller base was refused: probe with the tile (and its multiples)
            base = tuple(b - b % q if q and b % q and b - b % q >= q else b for b, q in zip(base, steps))
            fixed = None if accepts or self.over_budget else window
            if fixed is not None:
                refused = [p["size"] for p in probes if p["accepted"] is False]
                notes.append(f"the graph declares free spatial dims but refused every size other than "
                             f"{list(window)} (tried {len(refused)}: {_sizes_text(refused)})")
        axes = [self._probe_axis(axis, base, steps[axis], accepts and steps[axis] is not None, tol, notes)
                for axis in range(nd)]
        evidence = [e for a in axes for e in a.evidence]
        for axis, a in enumerate(axes):
            if a.halo is None and not a.evidence and not self.over_budget and fixed is not None:
                # nothing to raise: the graph runs on one size, so the probe window cannot grow
                notes.append(f"axis {axis}: the halo is at least {a.bound if a.bound is not None else a.window // 4} "
                             f"px: wider than the fixed {a.window}-pixel tile lets the probe see")
            elif a.halo is None and not a.evidence and not self.over_budget:
                if a.bound is not None:
                    notes.append(f"axis {axis}: the halo is at least {a.bound} px: the error still falls with "
                                 f"distance at the largest probe window ({a.window} px; raise --max-probe-size "
                                 "to pin it)")
                else:
                    notes.append(f"axis {axis}: the halo is wider than half of a {a.window}-pixel window and no "
                                 "decay was seen: raise --max-probe-size to measure it")
        strides = [a.stride for a in axes]
        halos = [a.halo for a in axes]
        global_context = bool(evidence)
        eq_abs, eq_rel = self._equivariance(base, steps, strides, halos if not evidence else [None] * nd,
                                            accepts, tol, centre_only=bool(evidence))
        if eq_abs is not None and eq_abs > EQ_FACTOR * tol and not global_context and all(h is not None for h in halos):
            evidence.append(f"a crop's prediction differs from the whole prediction by {eq_abs:.3g} beyond the "
                            "halo: the output depends on the window's size or content as a whole")
            global_context = True
            axes[0].strength = eq_abs
        if global_context:
            halos = [None] * nd
        offgrid = [a.offgrid for a in axes if a.offgrid is not None]
        strengths = [a.strength for a in axes if a.strength is not None]
        self.invariance = InvarianceResult(
            spatial_ndim=nd, window=window, accepts_other_sizes=accepts, fixed_size=fixed, step=tuple(steps),
            output_follows_input=follows, stride=tuple(None if global_context else s for s in strides),
            halo=tuple(halos), global_context=global_context, equivariance_error=eq_abs,
            equivariance_error_rel=eq_rel, offgrid_shift_error=max(offgrid) if offgrid else None,
            output_range=self.output_range(), tolerance=tol,
            size_probes=[p for p in probes if p["accepted"] is False or p["output"] == p["size"]],
            offstep_sizes=[p for p in probes if p["accepted"] and p["output"] != p["size"]],
            partial=self.over_budget, notes=notes + evidence, predictions=self.predictions - n0,
            seconds=round(time.perf_counter() - start, 4), probe_windows=tuple(a.window for a in axes),
            decay=tuple(a.decay for a in axes), far_change=[{str(k): v for k, v in a.far.items()} for a in axes],
            global_evidence=evidence,
            halo_bound=tuple(None if global_context or a.halo is not None else a.bound for a in axes),
            residual=tuple(None if global_context else a.residual for a in axes),
            effective_halo=tuple(None if global_context else a.effective for a in axes),
            global_strength=(max(strengths) / max(self.output_range(), 1e-12) if strengths else None))
        return self.invariance

    def _equivariance(self, window: tuple[int, ...], steps: list[int | None], strides: list[int | None],
                      halos: list[int | None], accepts: bool, tol: float, *, centre_only: bool = False
                      ) -> tuple[float | None, float | None]:
        """Crop-versus-whole by value (free graphs), or shifted tile windows (fixed graphs). Beyond the halo; for
        a model already found to have global context, at the crop's centre (a measurement, not evidence)."""
        nd = len(window)
        if self.over_budget:
            return None, None
        rng = max(self.output_range(), 1e-12)
        grid = [math.lcm(s or 1, q or 1) for s, q in zip(strides, steps)]
        if accepts and all(q is not None for q in steps):
            if centre_only:
                halos = [w // 2 - 1 for w in window]
            elif any(h is None or 2 * h >= w for h, w in zip(halos, window)):
                return None, None  # no pixel of the window is known to be beyond the halo
            big = tuple(min(2 * w, max(w, self.max_probe_size)) for w in window)
            big = tuple(b - b % g for b, g in zip(big, grid))
            offs = tuple(((b - w) // 2) // g * g for b, w, g in zip(big, window, grid))
            if all(b >= w for b, w in zip(big, window)) and math.prod(big) <= 4 * MAX_PROBE_PIXELS:
                try:
                    whole = self.predict((0,) * nd, big)
                    crop = self.predict(offs, window)
                except ProbeRejected:
                    return None, None
                ref = whole[tuple(slice(o, o + w) for o, w in zip(offs, window))]
                if ref.shape != crop.shape:
                    return None, None
                inner = tuple(slice(h, w - h) for h, w in zip(halos, window) if h is not None)
                diff = np.abs(crop[inner].astype(np.float64) - ref[inner].astype(np.float64))
                err = float(np.nanmax(diff)) if diff.size else 0.0
                return err, err / rng
            return None, None
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
        """Fixed-size graphs: stitch two tiles (at 0 and ``pos``) along one axis, as ZEN does, and compare a band
        across the cut with a third tile centred on the cut (``centred_origin``/``seam_band``, the geometry
        ``czreg smoke`` uses on its image): the best reference a graph that runs only on this tile allows."""
        nd = len(window)
        w = window[axis]
        cut = pos + used // 2
        centre = centred_origin(cut, w, grid)
        half = seam_band(used // 2, w)
        zero = (0,) * nd
        try:
            first = self.predict(zero, window)
            second = self.predict(tuple(pos if i == axis else 0 for i in range(nd)), window)
            ref = self.predict(tuple(centre if i == axis else 0 for i in range(nd)), window)
        except ProbeRejected:
            return None
        band = np.arange(max(pos, cut - half), min(w, cut + half))  # image coordinates across the cut
        if band.size == 0 or self._spatial_out(first) != window:
            return None
        stitched = np.concatenate([np.take(first, band[band < cut], axis=axis),
                                   np.take(second, band[band >= cut] - pos, axis=axis)], axis=axis)
        reference = np.take(ref, band - centre, axis=axis)
        if stitched.shape != reference.shape:
            return None
        diff = np.abs(stitched.astype(np.float64) - reference.astype(np.float64))
        return float(diff.max()) if np.isfinite(diff).all() else math.inf

    def measure_tiling(self, overlap: Sequence[int]) -> TilingResult | None:
        """Tile a two-tiles-per-axis image at ``overlap`` and compare with predicting it whole.

        Tiles sit on the stride grid (the overlap is rounded up to it) and are stitched at the middle of
        each overlap, like the host does. Fixed-size graphs cannot predict the whole image, so their stitched
        overlap is compared with a third tile centred on it (``_seam_against_centre``).
        Returns None when the geometry does not fit or the budget is spent.

        With two tiles per axis every tile's outer edge is the image's own edge, so the seam error depends on the
        overlap and the halo, not on the tile size: free-size graphs are tiled with windows of at most
        ``max(BASE_WINDOW, overlap + 2 grid steps)`` per axis (a 1024-pixel denoiser tile need not be predicted
        as a 2000-pixel whole).
        """
        inv = self.measure_invariance()
        nd = self.spatial_ndim
        window = inv.window
        overlap = tuple(int(v) for v in overlap)
        if len(overlap) != nd:
            return None
        grid = [math.lcm(s or 1, q or 1) for s, q in zip(inv.stride, inv.step)]
        if inv.accepts_other_sizes and all(q is not None for q in inv.step):
            window = tuple(min(w, max(BASE_WINDOW, -(-(o + 2 * g) // g) * g)) for w, o, g in zip(window, overlap, grid))
        pos = [(w - o) // g * g for w, o, g in zip(window, overlap, grid)]
        if any(p <= 0 for p in pos):
            return None
        used = tuple(w - p for w, p in zip(window, pos))
        key = used
        if key in self.tilings:
            return self.tilings[key]
        rng = max(inv.output_range, 1e-12)
        if inv.accepts_other_sizes and all(q is not None for q in inv.step):
            full = tuple(w + p for w, p in zip(window, pos))
            if math.prod(full) > 4 * MAX_PROBE_PIXELS:
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
            result = TilingResult(used, err, err / rng, "tiled-vs-whole", err <= seam_limit(nd, rng))
        else:
            errs = []
            for axis in range(nd):
                err_axis = self._seam_against_centre(axis, pos[axis], used[axis], window, grid[axis])
                if err_axis is not None:
                    errs.append(err_axis)
            if not errs:
                return None
            err = max(errs)
            result = TilingResult(used, err, err / rng, "tiles-vs-centre-window", err <= seam_limit(nd, rng))
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
