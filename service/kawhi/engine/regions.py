"""Key-region selection over the LVLM's visual-token grid (docs/method.md §2, SGUF).

SGUF (Structure-Guided Union-Find) needs only the image: it measures per-patch
structure with the 2x2 structure tensor of the luminance gradient, groups
neighbouring patches with similar structure and brightness by union-find, and keeps
the components whose mean gradient energy exceeds ``beta * median``. One patch here is
one LLM visual token (28x28 px for Qwen2/2.5-VL, 32x32 px for Qwen3-VL).

Everything is plain numpy/scipy. Token indices are flat row-major positions in the
``(rows, cols)`` grid: token ``(r, c)`` has index ``r * cols + c``.

The selector is a pluggable strategy (``REGION_SELECTORS``): the paper's ablations
("all", "random", "inverse") ship here, and a learned selector can be added with
``register_region_selector``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kawhi.engine.config import SgufParams

Grid = tuple[int, int]
Seed = int | Sequence[int] | np.random.Generator | None
# (image (H, W, 3) uint8, grid, rng, params) -> (rows, cols) bool key mask
RegionSelector = Callable[[np.ndarray, Grid, np.random.Generator, SgufParams], np.ndarray]

# sRGB (D65) -> XYZ, the Y row only: L* depends on Y alone (IEC 61966-2-1 primaries).
_SRGB_TO_Y = np.array([0.2126729, 0.7151522, 0.0721750])
_LAB_EPSILON = 0.008856  # (6/29)^3: below it L* is linear in Y
_LAB_KAPPA = 903.3  # (29/3)^3: slope of that linear branch


# --------------------------------------------------------------------------- inputs


def _check_grid(grid: Any) -> Grid:
    """``grid`` as a validated ``(rows, cols)`` tuple of positive ints."""
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (rows, cols), got {grid!r}") from None
    for value in (rows, cols):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"grid must be two positive ints, got {grid!r}")
    return int(rows), int(cols)


def _check_image(image: Any) -> np.ndarray:
    """Require a non-empty ``(H, W, 3)`` uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def patch_side(image_shape: Sequence[int], grid: Grid) -> int:
    """The side p of a square patch: H = rows * p and W = cols * p, else ValueError."""
    rows, cols = _check_grid(grid)
    height, width = int(image_shape[0]), int(image_shape[1])
    side = height // rows
    if side == 0 or height != rows * side or width != cols * side:
        raise ValueError(
            f"grid {rows}x{cols} does not tile the {height}x{width} image into square patches "
            f"(need H = rows * p and W = cols * p for one integer p)"
        )
    return side


# --------------------------------------------------------------------------- per-patch statistics


def srgb_to_lightness(image: np.ndarray) -> np.ndarray:
    """CIELab lightness L* of an sRGB image.

    image: (H, W, 3) uint8 sRGB.  Returns (H, W) float64 in [0, 100].
    sRGB -> linear RGB -> Y (XYZ, D65, Yn = 1) -> L*.
    """
    image = _check_image(image)
    srgb = image.astype(np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    y = linear @ _SRGB_TO_Y
    lightness = np.where(y > _LAB_EPSILON, 116.0 * np.cbrt(y) - 16.0, _LAB_KAPPA * y)
    # The Y row sums to 1 + 1e-7, so white would land a hair above 100.
    return np.clip(lightness, 0.0, 100.0)


@dataclass(frozen=True)
class PatchStats:
    """Per-patch structure statistics; every field is (rows, cols) float64.

    lam_max, lam_min: eigenvalues of the patch's mean structure tensor, lam_max >= lam_min >= 0.
    energy: its trace (= lam_max + lam_min up to rounding).
    mean_l: the patch's mean CIELab lightness L*, in [0, 100].
    """

    lam_max: np.ndarray
    lam_min: np.ndarray
    energy: np.ndarray
    mean_l: np.ndarray

    def __post_init__(self) -> None:
        shapes = {np.shape(getattr(self, name)) for name in ("lam_max", "lam_min", "energy", "mean_l")}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"PatchStats fields must share one (rows, cols) shape, got {sorted(shapes)}")

    @property
    def grid(self) -> Grid:
        rows, cols = np.shape(self.lam_max)
        return int(rows), int(cols)


def _patch_means(values: np.ndarray, grid: Grid, side: int) -> np.ndarray:
    """(rows*p, cols*p) -> (rows, cols): the mean over each p x p patch."""
    rows, cols = grid
    return values.reshape(rows, side, cols, side).mean(axis=(1, 3))


def patch_structure_tensors(image: np.ndarray, grid: Grid, params: SgufParams = SgufParams()) -> PatchStats:
    """Per-patch structure tensor eigenvalues, energy and mean lightness (docs/method.md §2 steps 1-3).

    image: (H, W, 3) uint8 RGB with H = rows * p, W = cols * p (p = patch side in px).
    grid: (rows, cols) of the visual-token grid.
    Returns PatchStats with (rows, cols) float64 fields.
    """
    image = _check_image(image)
    grid = _check_grid(grid)
    side = patch_side(image.shape, grid)

    lightness = srgb_to_lightness(image)
    smoothed = ndimage.gaussian_filter(lightness, sigma=params.sigma)
    gx = ndimage.sobel(smoothed, axis=1)  # d/dx: along columns
    gy = ndimage.sobel(smoothed, axis=0)  # d/dy: along rows

    # S = sum over the patch / area, i.e. the patch mean of each tensor entry.
    sxx = _patch_means(gx * gx, grid, side)
    sxy = _patch_means(gx * gy, grid, side)
    syy = _patch_means(gy * gy, grid, side)

    # Closed-form eigenvalues of [[sxx, sxy], [sxy, syy]].
    half_trace = 0.5 * (sxx + syy)
    radius = np.sqrt((0.5 * (sxx - syy)) ** 2 + sxy**2)
    lam_max = half_trace + radius
    lam_min = np.maximum(half_trace - radius, 0.0)  # rounding can dip just below 0

    return PatchStats(
        lam_max=lam_max,
        lam_min=lam_min,
        energy=sxx + syy,
        mean_l=_patch_means(lightness, grid, side),
    )


# --------------------------------------------------------------------------- components


def _grid_edges(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The 4-connected edges of a (rows, cols) grid as two (n_edges,) flat-index arrays."""
    rows, cols = grid
    index = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    first = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])  # right, down
    second = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    return first, second


def sguf_components(stats: PatchStats, params: SgufParams = SgufParams()) -> np.ndarray:
    """Connected components of the patch graph (union-find in docs/method.md §2 step 4).

    stats: PatchStats on a (rows, cols) grid.
    Returns (rows, cols) int64 labels 0..K-1, numbered in row-major order of each
    component's first patch. 4-neighbours i, j are merged when both
        ||Lam_i - Lam_j||_F / max(lam_max_i, lam_max_j, lam_min_i, lam_min_j, eps) < delta_s
        |Lbar_i - Lbar_j| < delta_l
    hold (strict), with Lam = diag(lam_max, lam_min).
    """
    grid = stats.grid
    lam_max = np.asarray(stats.lam_max, dtype=np.float64).ravel()
    lam_min = np.asarray(stats.lam_min, dtype=np.float64).ravel()
    mean_l = np.asarray(stats.mean_l, dtype=np.float64).ravel()

    i, j = _grid_edges(grid)
    structure_distance = np.hypot(lam_max[i] - lam_max[j], lam_min[i] - lam_min[j])
    scale = np.maximum.reduce([lam_max[i], lam_max[j], lam_min[i], lam_min[j], np.full(i.shape, params.eps)])
    merge = (structure_distance / scale < params.delta_s) & (np.abs(mean_l[i] - mean_l[j]) < params.delta_l)

    n = grid[0] * grid[1]
    # Union-find over the merge edges is exactly the connected components of this graph;
    # scipy's is 1.7-30x faster from 768 patches up (bench/library_swaps.py, bench/README.md).
    graph = coo_matrix((np.ones(int(merge.sum()), dtype=np.int8), (i[merge], j[merge])), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    _, first_patch, labels = np.unique(components, return_index=True, return_inverse=True)
    # renumber by first patch in row-major order: stable output whatever the library's numbering
    order = np.argsort(np.argsort(first_patch))
    return order[labels].astype(np.int64).reshape(grid)


def key_mask_from_stats(stats: PatchStats, params: SgufParams = SgufParams()) -> np.ndarray:
    """SGUF key mask from precomputed stats (docs/method.md §2 steps 4-6).

    Returns (rows, cols) bool: patches whose component's energy E(C) (mean trace over
    its patches) is strictly above tau = beta * median over components of E(C).
    """
    labels = sguf_components(stats, params).ravel()
    energy = np.asarray(stats.energy, dtype=np.float64).ravel()
    n_components = int(labels.max()) + 1
    component_energy = np.bincount(labels, weights=energy, minlength=n_components) / np.bincount(
        labels, minlength=n_components
    )
    tau = params.beta * np.median(component_energy)  # median over components, not patches
    return (component_energy > tau)[labels].reshape(stats.grid)


def sguf_key_mask(image: np.ndarray, grid: Grid, params: SgufParams = SgufParams()) -> np.ndarray:
    """SGUF key regions of an image: (H, W, 3) uint8 -> (rows, cols) bool mask."""
    return key_mask_from_stats(patch_structure_tensors(image, grid, params), params)


# --------------------------------------------------------------------------- strategies


def _select_sguf(image: np.ndarray, grid: Grid, rng: np.random.Generator, params: SgufParams) -> np.ndarray:
    return sguf_key_mask(image, grid, params)


def _select_all(image: np.ndarray, grid: Grid, rng: np.random.Generator, params: SgufParams) -> np.ndarray:
    return np.ones(grid, dtype=bool)


def _select_random(image: np.ndarray, grid: Grid, rng: np.random.Generator, params: SgufParams) -> np.ndarray:
    """As many tokens as SGUF would pick, drawn uniformly ("random regions" ablation)."""
    n_key = int(sguf_key_mask(image, grid, params).sum())
    mask = np.zeros(grid[0] * grid[1], dtype=bool)
    mask[rng.choice(mask.size, size=n_key, replace=False)] = True
    return mask.reshape(grid)


def _select_inverse(image: np.ndarray, grid: Grid, rng: np.random.Generator, params: SgufParams) -> np.ndarray:
    """The complement of SGUF's key set ("inverse regions" ablation)."""
    return ~sguf_key_mask(image, grid, params)


REGION_SELECTORS: dict[str, RegionSelector] = {
    "sguf": _select_sguf,
    "all": _select_all,
    "random": _select_random,
    "inverse": _select_inverse,
}


def register_region_selector(name: str, fn: RegionSelector, *, replace: bool = False) -> None:
    """Add a key-region strategy ``fn(image, grid, rng, params) -> (rows, cols) bool``.

    Re-registering an existing name raises ValueError unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"selector name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"selector {name!r} must be callable, got {type(fn).__name__}")
    if name in REGION_SELECTORS and not replace:
        raise ValueError(f"region selector {name!r} is already registered (pass replace=True)")
    REGION_SELECTORS[name] = fn


# --------------------------------------------------------------------------- selection


def _sorted_indices(values: Any, name: str) -> np.ndarray:
    """A read-only, sorted, unique 1-D int64 copy of ``values``."""
    array = np.asarray(values)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got dtype {array.dtype} shape {array.shape}")
    array = array.astype(np.int64)
    if array.size > 1 and not np.all(np.diff(array) > 0):
        raise ValueError(f"{name} must be sorted and unique")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class RegionSelection:
    """Visual tokens chosen for the alignment score.

    grid: (rows, cols) of the LLM visual-token grid.
    key: (n_key,) int64, sorted flat row-major indices of key-region tokens.
    selected: (n_selected,) int64, sorted, key ∪ sampled background; never empty.
    """

    grid: Grid
    key: np.ndarray
    selected: np.ndarray

    def __post_init__(self) -> None:
        grid = _check_grid(self.grid)
        key = _sorted_indices(self.key, "key")
        selected = _sorted_indices(self.selected, "selected")
        n_tokens = grid[0] * grid[1]
        if selected.size == 0:
            raise ValueError("selected must not be empty")
        if selected[0] < 0 or selected[-1] >= n_tokens or (key.size and (key[0] < 0 or key[-1] >= n_tokens)):
            raise ValueError(f"token indices must lie in [0, {n_tokens})")
        if not np.isin(key, selected).all():
            raise ValueError("key must be a subset of selected")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "selected", selected)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionSelection):
            return NotImplemented
        return (
            self.grid == other.grid
            and np.array_equal(self.key, other.key)
            and np.array_equal(self.selected, other.selected)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: equal-by-value, not hashable

    def key_mask(self) -> np.ndarray:
        """(rows, cols) bool mask of the key tokens."""
        mask = np.zeros(self.grid[0] * self.grid[1], dtype=bool)
        mask[self.key] = True
        return mask.reshape(self.grid)

    def to_dict(self) -> dict[str, list[int]]:
        """JSON-ready: {"grid": [r, c], "key": [...], "selected": [...]} with plain ints."""
        return {"grid": list(self.grid), "key": self.key.tolist(), "selected": self.selected.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegionSelection:
        """Inverse of ``to_dict`` (validates the same invariants as the constructor)."""
        try:
            return cls(grid=tuple(d["grid"]), key=d["key"], selected=d["selected"])
        except KeyError as missing:
            raise ValueError(f"region selection is missing {missing}") from None


def select_regions(
    image: np.ndarray,
    grid: Grid,
    strategy: str = "sguf",
    skip_ratio: float = 0.7,
    seed: Seed = 0,
    params: SgufParams = SgufParams(),
) -> RegionSelection:
    """Key tokens plus a seeded sample of the background (docs/method.md §2 step 7).

    image: (H, W, 3) uint8 RGB, H = rows * p, W = cols * p.
    grid: (rows, cols) of the visual-token grid.
    strategy: a name in REGION_SELECTORS ("sguf", "all", "random", "inverse", or registered).
    skip_ratio: fraction of background (non-key) tokens dropped, in [0, 1]; the
        remaining round((1 - skip_ratio) * n_background) are sampled without
        replacement (Python's round: halves go to the even count).
    seed: anything ``np.random.default_rng`` takes (int or sequence of ints); one
        generator drives both the strategy (e.g. "random") and background sampling,
        so the same seed gives the same selection.

    Empty rule: if there are no key tokens and no background token is kept (e.g. a
    flat image with skip_ratio = 1), every token is selected — the alignment score
    needs at least one visual token, and with no structure to prefer, all of them
    is the neutral choice. ``key`` stays empty in that case.
    """
    image = _check_image(image)
    grid = _check_grid(grid)
    patch_side(image.shape, grid)
    if strategy not in REGION_SELECTORS:
        raise ValueError(f"unknown region strategy {strategy!r}; known: {sorted(REGION_SELECTORS)}")
    if not 0.0 <= skip_ratio <= 1.0:
        raise ValueError(f"skip_ratio must be in [0, 1], got {skip_ratio}")

    rng = np.random.default_rng(seed)
    key_mask = np.asarray(REGION_SELECTORS[strategy](image, grid, rng, params))
    if key_mask.shape != grid or key_mask.dtype != bool:
        raise ValueError(
            f"selector {strategy!r} must return a {grid} bool mask, got {key_mask.dtype} {key_mask.shape}"
        )

    flat = key_mask.ravel()
    key = np.flatnonzero(flat)
    background = np.flatnonzero(~flat)
    n_keep = round((1.0 - skip_ratio) * background.size)
    kept = rng.choice(background, size=n_keep, replace=False) if n_keep else background[:0]
    selected = np.union1d(key, kept)
    if selected.size == 0:
        selected = np.arange(flat.size)
    return RegionSelection(grid=grid, key=key, selected=selected)
