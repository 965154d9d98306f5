"""Tile geometry: properties of the stride geometry, and ZEN's geometry checked against cztile itself."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from czregistry.errors import UsageError
from czregistry.run.tiling import blend_weights, padded_length, plan_axis, plan_tiles, reflect_indices


@st.composite
def axis_cases(draw: st.DrawFn) -> tuple[int, int, int, int]:
    step = draw(st.sampled_from([1, 2, 4, 8, 16]))
    tile = step * draw(st.integers(2, 24))
    border = draw(st.integers(0, max(0, (tile - step) // 2)))
    length = draw(st.integers(1, 6 * tile))
    return length, tile, border, step


@settings(max_examples=300, deadline=None)
@given(axis_cases())
def test_stride_geometry_properties(case: tuple[int, int, int, int]) -> None:
    length, tile, border, step = case
    padded = padded_length(length, tile, step)
    assert padded >= max(length, tile) and padded - max(length, tile) < step
    spans = plan_axis(padded, tile, border, step)
    # exact tile size, inside the padded image, on the stride grid
    for s in spans:
        assert s.size == tile
        assert s.origin >= 0 and s.origin + tile <= padded
        assert s.origin % step == 0
        assert s.origin <= s.keep_start < s.keep_stop <= s.origin + tile
    # keep regions partition the padded axis, in order
    assert spans[0].keep_start == 0 and spans[-1].keep_stop == padded
    for a, b in itertools.pairwise(spans):
        assert a.keep_stop == b.keep_start
        assert a.origin < b.origin
        # overlap at least two borders (so at least MinOverlap when border = MinOverlap / 2)
        assert a.origin + tile - b.origin >= 2 * border
        # borders next to another tile are at least the requested border
        assert a.origin + tile - a.keep_stop >= border
        assert b.keep_start - b.origin >= border
    # no more tiles than needed: one fewer would have to advance further than the interior allows
    if len(spans) > 2:
        advance = (tile - 2 * border) // step * step
        assert (len(spans) - 2) * advance < padded - tile


def test_edge_tiles_shift_inward_instead_of_padding() -> None:
    spans = plan_axis(200, 64, 10, 4)
    assert spans[-1].origin == 200 - 64  # shifted inward, never reaching past the image
    assert spans[-1].keep_stop == 200 and spans[0].keep_start == 0


def test_small_and_off_step_images_are_padded() -> None:
    assert padded_length(40, 64, 4) == 64
    assert padded_length(201, 64, 4) == 204
    grid = plan_tiles((40, 50), (64, 64), border=8, step=4)
    assert grid.padded_shape == (64, 64) and grid.n_tiles == 1
    grid = plan_tiles((201, 130), (64, 64), border=8, step=4)
    assert grid.padded_shape == (204, 132)


def test_border_that_leaves_no_interior_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no interior"):
        plan_axis(300, 32, 16, 1)
    with pytest.raises(UsageError, match="no room"):
        plan_axis(296, 32, 13, 8)


def test_3d_grid_is_the_product_of_axes() -> None:
    grid = plan_tiles((40, 100, 90), (16, 64, 64), border=(2, 8, 8), step=2)
    assert grid.counts == tuple(len(a) for a in grid.axes)
    tiles = list(grid)
    assert len(tiles) == grid.n_tiles == np.prod(grid.counts)
    covered = np.zeros(grid.padded_shape, np.int32)
    for t in tiles:
        covered[t.keep_slices] += 1
        assert all(s.stop - s.start == n for s, n in zip(t.read_slices, (16, 64, 64)))
    assert (covered == 1).all()


def test_reflect_indices_match_numpy_pad() -> None:
    for length in (1, 2, 5, 9):
        a = np.arange(length)
        want = np.pad(a, (0, 23), mode="reflect") if length > 1 else np.zeros(length + 23, int)
        assert (reflect_indices(0, length + 23, length) == want).all()


def test_blend_weights_cover_every_pixel() -> None:
    grid = plan_tiles((150, 170), (64, 64), border=8, step=4)
    total = np.zeros(grid.padded_shape, np.float32)
    for t in grid:
        w = blend_weights(t)
        assert w.shape == (64, 64)
        total[t.read_slices] += w
    assert (total > 0).all()


def _zen_tiles_2d(width: int, height: int, tile: int, border: int) -> set[tuple[int, ...]]:
    from cztile.fixed_total_area_strategy_2d import AlmostEqualBorderFixedTotalAreaStrategy2D
    from cztile.tiling_strategy import TileInput

    strategy = AlmostEqualBorderFixedTotalAreaStrategy2D(width=TileInput(tile, border), height=TileInput(tile, border))
    return {(t.roi.y, t.roi.x, t.center.y, t.center.x, t.center.h, t.center.w)
            for t in strategy.calculate_2d_tiles((0, 0, width, height))}


@pytest.mark.parametrize(("h", "w", "tile", "border"), [(200, 264, 64, 8), (513, 300, 128, 16), (64, 64, 64, 8),
                                                        (1000, 777, 256, 32)])
def test_zen_geometry_equals_cztile_2d(h: int, w: int, tile: int, border: int) -> None:
    grid = plan_tiles((h, w), (tile, tile), border=border, geometry="zen")
    ours = {(t.spans[0].origin, t.spans[1].origin, t.spans[0].keep_start, t.spans[1].keep_start,
             t.spans[0].keep_stop - t.spans[0].keep_start, t.spans[1].keep_stop - t.spans[1].keep_start)
            for t in grid}
    assert ours == _zen_tiles_2d(w, h, tile, border)


def test_zen_geometry_equals_cztile_3d() -> None:
    from cztile.fixed_total_volume_strategy_3d import AlmostEqualBorderFixedTotalVolumeStrategy3D
    from cztile.tiling_strategy import TileInput

    d, h, w = 40, 150, 170
    strategy = AlmostEqualBorderFixedTotalVolumeStrategy3D(width=TileInput(64, 8), height=TileInput(64, 8),
                                                           depth=TileInput(16, 2))
    theirs = {(t.roi3d.z, t.roi3d.y, t.roi3d.x, t.center3d.d, t.center3d.h, t.center3d.w)
              for t in strategy.calculate_3d_tiles((0, 0, 0, w, h, d))}
    grid = plan_tiles((d, h, w), (16, 64, 64), border=(2, 8, 8), geometry="zen")
    ours = {(*t.origin, *(s.keep_stop - s.keep_start for s in t.spans)) for t in grid}
    assert ours == theirs


def test_zen_geometry_is_not_stride_aligned_but_ours_is() -> None:
    zen = plan_tiles((1000,), (64,), border=8, geometry="zen")
    ours = plan_tiles((1000,), (64,), border=8, step=4)
    assert any(s.origin % 4 for s in zen.axes[0])
    assert all(s.origin % 4 == 0 for s in ours.axes[0])
    assert ours.min_border[0] >= 8
