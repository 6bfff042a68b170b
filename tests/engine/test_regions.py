"""SGUF key regions and region strategies (docs/method.md §2), checked against planted truth.

Synthetic figures are 8x8-token images (224x224 px, 28-px patches) with strokes drawn
well inside chosen patches: the Gaussian (truncated at 4 sigma) plus Sobel reach 5 px,
so a stroke at least 9 px from a patch border leaves its neighbours exactly flat.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kawhi.engine import regions
from kawhi.engine.config import SgufParams
from kawhi.engine.regions import (
    REGION_SELECTORS,
    PatchStats,
    RegionSelection,
    key_mask_from_stats,
    patch_structure_tensors,
    register_region_selector,
    select_regions,
    sguf_components,
    sguf_key_mask,
    srgb_to_lightness,
)
from PIL import Image, ImageDraw

GRID = (8, 8)
P = 28
WHITE, BLACK = 255, 0


def blank(grid=GRID, side=P, value=WHITE) -> np.ndarray:
    return np.full((grid[0] * side, grid[1] * side, 3), value, dtype=np.uint8)


def draw(image: np.ndarray, paint) -> np.ndarray:
    canvas = Image.fromarray(image)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas).copy()


def mask_of(cells, grid=GRID) -> np.ndarray:
    mask = np.zeros(grid, dtype=bool)
    for r, c in cells:
        mask[r, c] = True
    return mask


def strokes_in(cells, side=P, grid=GRID) -> np.ndarray:
    """A short black diagonal stroke in the middle of each given patch, white elsewhere."""

    def paint(d):
        for r, c in cells:
            x0, y0 = c * side + 9, r * side + 9
            d.line([(x0, y0), (x0 + side - 19, y0 + side - 19)], fill=(0, 0, 0), width=2)

    return draw(blank(grid, side), paint)


STROKE_CELLS = [(1, 1), (1, 6), (6, 3)]
RING = [(r, c) for r in range(2, 6) for c in range(2, 6) if r in (2, 5) or c in (2, 5)]


# --------------------------------------------------------------------------- CIELab L


@pytest.mark.parametrize(
    "rgb, expected, tol",
    [
        ((255, 255, 255), 100.0, 1e-6),
        ((0, 0, 0), 0.0, 1e-9),
        ((119, 119, 119), 50.0, 0.5),
        ((255, 0, 0), 53.2408, 1e-3),  # textbook L* of the sRGB primaries
        ((0, 255, 0), 87.7347, 1e-3),
        ((0, 0, 255), 32.2970, 1e-3),
        ((10, 10, 10), 2.7418, 1e-3),  # Y < 0.008856: the linear 903.3 * Y branch
    ],
)
def test_lightness_reference_values(rgb, expected, tol):
    image = np.array([[rgb]], dtype=np.uint8)
    assert srgb_to_lightness(image)[0, 0] == pytest.approx(expected, abs=tol)


def test_lightness_is_monotone_and_in_range():
    greys = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    lightness = srgb_to_lightness(greys)[0]
    assert lightness.shape == (256,)
    assert np.all(np.diff(lightness) > 0)
    assert lightness.min() >= 0.0 and lightness.max() <= 100.0


# --------------------------------------------------------------------------- structure tensors


def test_stats_shapes_and_eigen_invariants():
    image = np.random.default_rng(0).integers(0, 256, size=(3 * 28, 5 * 28, 3), dtype=np.uint8)
    stats = patch_structure_tensors(image, (3, 5), SgufParams())
    for field in (stats.lam_max, stats.lam_min, stats.energy, stats.mean_l):
        assert field.shape == (3, 5) and field.dtype == np.float64
    assert np.all(stats.lam_max >= stats.lam_min) and np.all(stats.lam_min >= 0)
    np.testing.assert_allclose(stats.lam_max + stats.lam_min, stats.energy, rtol=1e-12)
    assert np.all(stats.lam_min > 0)  # noise has no dominant orientation


def test_flat_patch_is_zero_and_stripes_are_rank_one():
    image = blank((2, 2))
    image[:, 28 + 9 :][:, ::2] = BLACK  # vertical stripes in the right patches: vary in x only
    stats = patch_structure_tensors(image, (2, 2), SgufParams())
    np.testing.assert_array_equal(stats.energy[:, 0], 0.0)  # 9 px clear of the stripes: flat
    assert np.all(stats.lam_max[:, 1] > 1.0)
    np.testing.assert_allclose(stats.lam_min[:, 1], 0.0, atol=1e-9)  # gy == 0: stroke-like


def test_stats_are_rotation_invariant_under_transpose():
    image = strokes_in([(0, 1), (2, 0)], grid=(3, 4))
    image[10:15, 70:100] = BLACK
    stats = patch_structure_tensors(image, (3, 4), SgufParams())
    flipped = patch_structure_tensors(np.ascontiguousarray(image.transpose(1, 0, 2)), (4, 3), SgufParams())
    for a, b in [(stats.lam_max, flipped.lam_max), (stats.lam_min, flipped.lam_min), (stats.mean_l, flipped.mean_l)]:
        np.testing.assert_allclose(a.T, b, rtol=1e-9, atol=1e-9)


def test_mean_l_is_patch_mean_lightness():
    image = blank((1, 2))
    image[:, :28] = BLACK
    image[:14, 28:] = BLACK  # second patch: top half black, bottom half white
    stats = patch_structure_tensors(image, (1, 2), SgufParams())
    np.testing.assert_allclose(stats.mean_l, [[0.0, 50.0]], atol=1e-6)


# --------------------------------------------------------------------------- key regions on figures


def test_strokes_make_exactly_their_patches_key():
    key = sguf_key_mask(strokes_in(STROKE_CELLS), GRID, SgufParams())
    np.testing.assert_array_equal(key, mask_of(STROKE_CELLS))


def test_rectangle_outline_makes_its_ring_key_not_inside_or_outside():
    centre = lambda k: k * P + P // 2  # noqa: E731
    image = draw(blank(), lambda d: d.rectangle([centre(2), centre(2), centre(5), centre(5)], outline=(0, 0, 0), width=3))
    key = sguf_key_mask(image, GRID, SgufParams())
    np.testing.assert_array_equal(key, mask_of(RING))


def test_filled_block_interior_is_flat_so_only_its_border_is_key():
    centre = lambda k: k * P + P // 2  # noqa: E731
    image = draw(blank(), lambda d: d.rectangle([centre(2), centre(2), centre(5), centre(5)], fill=(0, 0, 0)))
    key = sguf_key_mask(image, GRID, SgufParams())
    np.testing.assert_array_equal(key, mask_of(RING))


def test_qwen3_patch_side_32_and_non_square_grid():
    grid = (4, 5)
    image = strokes_in([(1, 2), (3, 4)], side=32, grid=grid)
    assert image.shape == (128, 160, 3)
    np.testing.assert_array_equal(sguf_key_mask(image, grid, SgufParams()), mask_of([(1, 2), (3, 4)], grid))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_image_has_no_key_tokens(value):
    assert not sguf_key_mask(blank(value=value), GRID, SgufParams()).any()


def test_flat_image_selection_rule():
    everything = select_regions(blank(), GRID, skip_ratio=1.0, seed=0)
    assert everything.key.size == 0
    np.testing.assert_array_equal(everything.selected, np.arange(64))
    sampled = select_regions(blank(), GRID, skip_ratio=0.7, seed=0)
    assert sampled.key.size == 0 and sampled.selected.size == round(0.3 * 64)


# --------------------------------------------------------------------------- union-find by hand


def stats_of(lam_max, lam_min, mean_l, energy=None) -> PatchStats:
    lam_max, lam_min, mean_l = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (lam_max, lam_min, mean_l))
    energy = lam_max + lam_min if energy is None else np.atleast_2d(np.asarray(energy, dtype=np.float64))
    return PatchStats(lam_max=lam_max, lam_min=lam_min, energy=energy, mean_l=mean_l)


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    flat = labels.ravel()
    return {frozenset(np.flatnonzero(flat == k).tolist()) for k in np.unique(flat)}


def test_union_find_needs_both_thresholds():
    # 1x4: A-B pass both; B-C pass structure, fail luminance; C-D fail structure, pass luminance.
    stats = stats_of(lam_max=[10.0, 11.0, 11.0, 30.0], lam_min=[1.0, 1.0, 1.0, 1.0], mean_l=[50.0, 55.0, 90.0, 91.0])
    labels = sguf_components(stats, SgufParams())
    assert partition(labels) == {frozenset({0, 1}), frozenset({2}), frozenset({3})}
    np.testing.assert_array_equal(labels, [[0, 0, 1, 2]])  # numbered in row-major order


def test_union_find_thresholds_are_strict():
    # Relative distance exactly 0.5 (|1 - 0.5| / 1), luminance gap exactly 30: neither merges.
    at_structure_edge = stats_of(lam_max=[1.0, 0.5], lam_min=[0.0, 0.0], mean_l=[50.0, 50.0])
    at_luminance_edge = stats_of(lam_max=[1.0, 1.0], lam_min=[0.0, 0.0], mean_l=[20.0, 50.0])
    params = SgufParams(delta_s=0.5, delta_l=30.0)
    assert partition(sguf_components(at_structure_edge, params)) == {frozenset({0}), frozenset({1})}
    assert partition(sguf_components(at_luminance_edge, params)) == {frozenset({0}), frozenset({1})}
    looser = SgufParams(delta_s=0.5001, delta_l=30.0001)
    assert partition(sguf_components(at_structure_edge, looser)) == {frozenset({0, 1})}
    assert partition(sguf_components(at_luminance_edge, looser)) == {frozenset({0, 1})}


def test_union_find_uses_frobenius_norm_of_both_eigenvalues():
    # dmax = 0.4 and dmin = 0.3 each pass 0.5 alone, but sqrt(0.16 + 0.09) = 0.5 does not.
    stats = stats_of(lam_max=[1.0, 0.6], lam_min=[0.3, 0.0], mean_l=[50.0, 50.0])
    assert partition(sguf_components(stats, SgufParams())) == {frozenset({0}), frozenset({1})}


def test_union_find_is_transitive_and_4_connected():
    # 2x3 grid. Chain 0-1-2 merges step by step though 0 and 2 would not merge directly;
    # 3 (below 0) merges with 0 only; 4 and 5 differ in luminance from everything.
    lam_max = [[1.0, 1.4, 1.96], [1.0, 1.0, 1.0]]
    lam_min = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mean_l = [[50.0, 50.0, 50.0], [50.0, 90.0, 10.0]]
    labels = sguf_components(stats_of(lam_max, lam_min, mean_l), SgufParams())
    assert labels.shape == (2, 3)
    assert partition(labels) == {frozenset({0, 1, 2, 3}), frozenset({4}), frozenset({5})}


def test_flat_patches_merge_through_eps():
    stats = stats_of(lam_max=[[0.0, 0.0], [0.0, 0.0]], lam_min=[[0.0, 0.0], [0.0, 0.0]], mean_l=[[100.0] * 2] * 2)
    assert partition(sguf_components(stats, SgufParams())) == {frozenset({0, 1, 2, 3})}


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    data=st.data(),
)
def test_components_match_a_flood_fill_over_the_passing_edges(rows, cols, data):
    n = rows * cols
    pick = lambda values: np.array(data.draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)))  # noqa: E731
    lam_max = pick([0.0, 1.0, 1.3, 2.0, 5.0]).reshape(rows, cols)
    lam_min = np.minimum(pick([0.0, 0.2, 1.0]).reshape(rows, cols), lam_max)
    mean_l = pick([0.0, 20.0, 45.0, 100.0]).reshape(rows, cols)
    params = SgufParams()

    # Independent reference: the merge rule per edge (loops, not the vectorised code) ...
    edges = []
    for r in range(rows):
        for c in range(cols):
            for rr, cc in ((r, c + 1), (r + 1, c)):
                if rr < rows and cc < cols:
                    a, b = (r, c), (rr, cc)
                    scale = max(lam_max[a], lam_max[b], lam_min[a], lam_min[b], params.eps)
                    dist = np.hypot(lam_max[a] - lam_max[b], lam_min[a] - lam_min[b]) / scale
                    if dist < params.delta_s and abs(mean_l[a] - mean_l[b]) < params.delta_l:
                        edges.append((r * cols + c, rr * cols + cc))
    # ... and a flood fill over those edges (sguf_components uses scipy's connected components:
    # the reference must not be the same code)
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    expected, component = np.full(n, -1), 0
    for start in range(n):
        if expected[start] >= 0:
            continue
        stack = [start]
        while stack:
            node = stack.pop()
            if expected[node] < 0:
                expected[node] = component
                stack.extend(neighbours[node])
        component += 1

    labels = sguf_components(stats_of(lam_max, lam_min, mean_l), params)
    assert partition(labels) == partition(expected.reshape(rows, cols))
    assert sorted(np.unique(labels).tolist()) == list(range(len(partition(labels))))


# --------------------------------------------------------------------------- tau = beta * median


def isolated(energy) -> PatchStats:
    """1xN stats where luminance alternates by 50, so every patch is its own component."""
    n = len(energy)
    return stats_of(lam_max=[1.0] * n, lam_min=[0.0] * n, mean_l=[(k % 2) * 50.0 for k in range(n)], energy=energy)


@pytest.mark.parametrize(
    "beta, expected",
    [
        (0.1, [False, True, True, True, True]),  # tau = 0.2
        (0.5, [False, False, True, True, True]),  # tau = 1.0; E = 1 is not > 1 (strict)
        (1.0, [False, False, False, True, True]),  # tau = 2
        (6.0, [False, False, False, False, True]),  # tau = 12
        (20.0, [False] * 5),  # tau = 40
    ],
)
def test_tau_is_beta_times_median_component_energy(beta, expected):
    stats = isolated([0.0, 1.0, 2.0, 10.0, 20.0])  # median = 2
    np.testing.assert_array_equal(key_mask_from_stats(stats, SgufParams(beta=beta))[0], expected)


def test_median_is_over_components_not_patches():
    # Components: five flat patches (E = 0) merged into one, then {E = 1} and {E = 10}.
    # Median over components = 1, so with beta = 1 only E = 10 is key; over patches it would be 0.
    lam_max = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 10.0]
    mean_l = [100.0, 100.0, 100.0, 100.0, 100.0, 50.0, 0.0]
    energy = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 10.0]
    stats = stats_of(lam_max, [0.0] * 7, mean_l, energy)
    assert partition(sguf_components(stats, SgufParams())) == {frozenset(range(5)), frozenset({5}), frozenset({6})}
    np.testing.assert_array_equal(key_mask_from_stats(stats, SgufParams(beta=1.0))[0], [False] * 6 + [True])


def test_component_energy_is_mean_over_its_patches():
    # One component with energies 1 and 3 (E = 2) next to singletons with E = 1.5 and E = 2.5;
    # median 2, beta = 1: only the 2.5 singleton is strictly above tau = 2.
    stats = stats_of(
        lam_max=[1.0, 1.0, 1.0, 1.0],
        lam_min=[0.0, 0.0, 0.0, 0.0],
        mean_l=[0.0, 0.0, 50.0, 0.0],
        energy=[1.0, 3.0, 1.5, 2.5],
    )
    np.testing.assert_array_equal(key_mask_from_stats(stats, SgufParams(beta=1.0))[0], [False, False, False, True])


# --------------------------------------------------------------------------- strategies and sampling


@pytest.fixture(scope="module")
def figure() -> np.ndarray:
    return strokes_in(STROKE_CELLS)


SGUF_KEY = np.array(sorted(r * 8 + c for r, c in STROKE_CELLS))


def test_sguf_selection_keeps_key_plus_sampled_background(figure):
    selection = select_regions(figure, GRID, "sguf", skip_ratio=0.7, seed=0)
    np.testing.assert_array_equal(selection.key, SGUF_KEY)
    assert np.isin(SGUF_KEY, selection.selected).all()
    assert selection.selected.size == 3 + round(0.3 * 61)


@pytest.mark.parametrize("skip_ratio", [0.0, 0.25, 0.5, 0.7, 0.9, 1.0])
def test_background_count_follows_skip_ratio(figure, skip_ratio):
    selection = select_regions(figure, GRID, skip_ratio=skip_ratio, seed=3)
    assert selection.selected.size - selection.key.size == round((1 - skip_ratio) * 61)


def test_all_strategy_selects_everything(figure):
    selection = select_regions(figure, GRID, "all", skip_ratio=0.7, seed=0)
    np.testing.assert_array_equal(selection.key, np.arange(64))
    np.testing.assert_array_equal(selection.selected, np.arange(64))


def test_random_strategy_matches_sguf_count_and_is_seeded(figure):
    first = select_regions(figure, GRID, "random", seed=11)
    assert first.key.size == SGUF_KEY.size
    assert select_regions(figure, GRID, "random", seed=11) == first
    keys = {tuple(select_regions(figure, GRID, "random", seed=s).key) for s in range(6)}
    assert len(keys) > 1


def test_inverse_strategy_is_the_complement(figure):
    selection = select_regions(figure, GRID, "inverse", skip_ratio=0.0, seed=0)
    np.testing.assert_array_equal(selection.key, np.setdiff1d(np.arange(64), SGUF_KEY))
    np.testing.assert_array_equal(selection.selected, np.arange(64))
    skipping = select_regions(figure, GRID, "inverse", skip_ratio=0.7, seed=0)
    assert skipping.selected.size == 61 + round(0.3 * 3)


def test_same_seed_reproduces_and_different_seeds_differ(figure):
    a = select_regions(figure, GRID, seed=5)
    assert select_regions(figure, GRID, seed=5) == a
    assert select_regions(figure, GRID, seed=[5, 123]) == select_regions(figure, GRID, seed=(5, 123))
    assert not np.array_equal(select_regions(figure, GRID, seed=6).selected, a.selected)


def test_to_dict_round_trip(figure):
    selection = select_regions(figure, GRID, seed=2)
    encoded = json.loads(json.dumps(selection.to_dict()))
    assert set(encoded) == {"grid", "key", "selected"} and encoded["grid"] == [8, 8]
    assert all(type(v) is int for v in encoded["key"] + encoded["selected"])
    decoded = RegionSelection.from_dict(encoded)
    assert decoded == selection
    assert decoded.key.dtype == np.int64 and decoded.selected.dtype == np.int64
    assert decoded.grid == (8, 8)


@pytest.mark.parametrize(
    "payload",
    [
        {"grid": [2, 2], "key": [1], "selected": [0, 2]},  # key not in selected
        {"grid": [2, 2], "key": [], "selected": []},  # empty selection
        {"grid": [2, 2], "key": [], "selected": [2, 1]},  # unsorted
        {"grid": [2, 2], "key": [], "selected": [0, 4]},  # out of range
        {"grid": [2, 2], "key": []},  # missing field
    ],
)
def test_from_dict_rejects_invalid_selections(payload):
    with pytest.raises(ValueError):
        RegionSelection.from_dict(payload)


def test_registered_selector_is_used(figure, monkeypatch):
    monkeypatch.setattr(regions, "REGION_SELECTORS", dict(REGION_SELECTORS))

    def top_row(image, grid, rng, params):
        mask = np.zeros(grid, dtype=bool)
        mask[0] = True
        return mask

    register_region_selector("top_row", top_row)
    selection = select_regions(figure, GRID, "top_row", skip_ratio=1.0)
    np.testing.assert_array_equal(selection.key, np.arange(8))
    np.testing.assert_array_equal(selection.selected, np.arange(8))
    with pytest.raises(ValueError, match="already registered"):
        register_region_selector("top_row", top_row)
    register_region_selector("bad_shape", lambda image, grid, rng, params: np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="bool mask"):
        select_regions(figure, GRID, "bad_shape")


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "image, grid",
    [
        (np.zeros((225, 224, 3), np.uint8), (8, 8)),  # grid does not divide H
        (np.zeros((224, 196, 3), np.uint8), (8, 8)),  # patches would not be square
        (np.zeros((224, 224, 3), np.float32), (8, 8)),  # wrong dtype
        (np.zeros((224, 224), np.uint8), (8, 8)),  # greyscale
        (np.zeros((224, 224, 4), np.uint8), (8, 8)),  # RGBA
        (np.zeros((0, 224, 3), np.uint8), (8, 8)),  # empty
        (np.zeros((224, 224, 3), np.uint8), (0, 8)),  # non-positive grid
        (np.zeros((224, 224, 3), np.uint8), (8,)),  # not a pair
        (np.zeros((224, 224, 3), np.uint8), (8.0, 8)),  # not ints
        (np.zeros((224, 224, 3), np.uint8), (True, 8)),  # bool is not a size
        (np.zeros((4, 4, 3), np.uint8), (8, 8)),  # more tokens than pixels
        ([[[0, 0, 0]]], (1, 1)),  # not an array
    ],
)
def test_bad_images_and_grids_raise(image, grid):
    with pytest.raises(ValueError):
        patch_structure_tensors(image, grid, SgufParams())
    with pytest.raises(ValueError):
        select_regions(image, grid)


def test_unknown_strategy_lists_known_ones(figure):
    with pytest.raises(ValueError, match="unknown region strategy") as info:
        select_regions(figure, GRID, "saliency")
    for name in ("sguf", "all", "random", "inverse"):
        assert name in str(info.value)


@pytest.mark.parametrize("skip_ratio", [-0.1, 1.1, float("nan")])
def test_skip_ratio_out_of_range_raises(figure, skip_ratio):
    with pytest.raises(ValueError, match="skip_ratio"):
        select_regions(figure, GRID, skip_ratio=skip_ratio)


# --------------------------------------------------------------------------- property


def random_figure(seed: int, grid, side: int) -> np.ndarray:
    """Patches that are flat (random colour), noisy, or carry a short stroke."""
    rng = np.random.default_rng(seed)
    image = np.empty((grid[0] * side, grid[1] * side, 3), dtype=np.uint8)
    for r in range(grid[0]):
        for c in range(grid[1]):
            block = image[r * side : (r + 1) * side, c * side : (c + 1) * side]
            kind = rng.integers(3)
            block[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
            if kind == 1:
                block[:] = rng.integers(0, 256, size=block.shape, dtype=np.uint8)
            elif kind == 2:
                block[side // 2, :] = 0
    return image


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    side=st.sampled_from([4, 8]),
    image_seed=st.integers(0, 2**16),
    strategy=st.sampled_from(["sguf", "all", "random", "inverse"]),
    skip_ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_selection_invariants(rows, cols, side, image_seed, strategy, skip_ratio, seed):
    image = random_figure(image_seed, (rows, cols), side)
    selection = select_regions(image, (rows, cols), strategy, skip_ratio, seed)
    n = rows * cols
    key, selected = selection.key, selection.selected
    assert selection.grid == (rows, cols)
    assert key.dtype == np.int64 and selected.dtype == np.int64
    assert np.all(np.diff(selected) > 0) and np.all(np.diff(key) > 0)  # sorted, unique
    assert selected.size >= 1 and selected[0] >= 0 and selected[-1] < n
    assert np.isin(key, selected).all()
    n_keep = round((1 - skip_ratio) * (n - key.size))
    assert selected.size == (key.size + n_keep if key.size + n_keep else n)
    if strategy in ("sguf", "random"):
        sguf_count = int(sguf_key_mask(image, (rows, cols), SgufParams()).sum())
        assert key.size == sguf_count
    assert select_regions(image, (rows, cols), strategy, skip_ratio, seed) == selection
