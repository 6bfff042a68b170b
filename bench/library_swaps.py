"""``python -m bench.library_swaps``: hand-written code against the library call that could
replace it, on the sizes the service meets, before any replacement (issue 21, item 14).

* SGUF components: ``UnionFind`` over the merge edges (below: the code ``sguf_components``
  ran until this measurement) vs ``scipy.sparse.csgraph.connected_components`` on the same
  edges, on patch grids from 8x8 to 64x64 (64 to 4096 patches; Qwen2.5-VL's 448x336
  image is 32x24 patches), with real patch statistics of a real image; labels must agree.
* Head discovery's bootstrap: ``kawhi.heads.stats.bootstrap_mean`` vs
  ``scipy.stats.bootstrap(..., method="percentile", vectorized=True)`` at the
  ``kawhi heads discover`` defaults (10 000 resamples, 48 items), three means per head.

Prints one JSON object: per case the median seconds of each (best of interleaved
repeats), and the ratio library / hand-written (< 1: the library is faster).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1 with path compression and union by size."""

    def __init__(self, n: int) -> None:
        # Plain lists: scalar access in the loops is several times faster than on arrays.
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        root_i, root_j = self.find(i), self.find(j)
        if root_i == root_j:
            return
        if self.size[root_i] < self.size[root_j]:
            root_i, root_j = root_j, root_i
        self.parent[root_j] = root_i
        self.size[root_i] += self.size[root_j]

    def roots(self) -> np.ndarray:
        """(n,) int64: the root of every element."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(rounds):  # A B A B: a burst of load from elsewhere hits both alike
        ta.append(_median_s(a, repeats))
        tb.append(_median_s(b, repeats))
    return min(ta), min(tb)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered by first occurrence: equal exactly when the partitions are."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def sguf_cases(rounds: int) -> list[dict]:
    from kawhi.engine.regions import SgufParams, _grid_edges, patch_structure_tensors
    from PIL import Image
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    picture = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "examples/images/bar_chart.png")
                         .convert("RGB"))
    params = SgufParams()
    out = []
    for rows, cols in [(8, 8), (24, 32), (32, 32), (64, 64)]:
        image = np.asarray(Image.fromarray(picture).resize((cols * 28, rows * 28)))
        stats = patch_structure_tensors(image, (rows, cols), params)
        lam_max, lam_min, mean_l = (np.asarray(x, dtype=np.float64).ravel()
                                    for x in (stats.lam_max, stats.lam_min, stats.mean_l))
        i, j = _grid_edges((rows, cols))
        distance = np.hypot(lam_max[i] - lam_max[j], lam_min[i] - lam_min[j])
        scale = np.maximum.reduce([lam_max[i], lam_max[j], lam_min[i], lam_min[j], np.full(i.shape, params.eps)])
        merge = (distance / scale < params.delta_s) & (np.abs(mean_l[i] - mean_l[j]) < params.delta_l)
        a, b, n = i[merge], j[merge], rows * cols

        def union_find(n: int = n, a: np.ndarray = a, b: np.ndarray = b) -> np.ndarray:
            sets = UnionFind(n)
            for x, y in zip(a.tolist(), b.tolist()):
                sets.union(x, y)
            return np.unique(sets.roots(), return_inverse=True)[1]

        def csgraph(n: int = n, a: np.ndarray = a, b: np.ndarray = b) -> np.ndarray:
            graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
            return connected_components(graph, directed=False)[1]

        same = np.array_equal(_canonical(union_find()), _canonical(csgraph()))
        t_hand, t_lib = _interleaved(union_find, csgraph, rounds, 50)
        out.append({"case": f"sguf {rows}x{cols} ({n} patches, {int(merge.sum())} merges)", "same": bool(same),
                    "hand_s": t_hand, "library_s": t_lib, "ratio": t_lib / t_hand})
    return out


def bootstrap_cases(rounds: int) -> list[dict]:
    from kawhi.heads.stats import bootstrap_mean
    from scipy.stats import bootstrap

    values = np.random.default_rng(0).normal(0.2, 1.0, 48)
    out = []
    for resamples in (2000, 10000):
        def hand(resamples: int = resamples) -> object:
            return bootstrap_mean(values, 0.999, resamples, np.random.default_rng(1))

        def library(resamples: int = resamples) -> object:
            return bootstrap((values,), np.mean, confidence_level=0.999, n_resamples=resamples,
                             method="percentile", vectorized=True, random_state=np.random.default_rng(1))

        t_hand, t_lib = _interleaved(hand, library, rounds, 5)
        out.append({"case": f"bootstrap mean, 48 items, {resamples} resamples", "hand_s": t_hand,
                    "library_s": t_lib, "ratio": t_lib / t_hand})
    return out


def main(argv: list[str] | None = None) -> int:
    rounds = int((argv or sys.argv[1:] or ["5"])[0])
    cases = sguf_cases(rounds) + bootstrap_cases(rounds)
    for c in cases:
        print(f"{c['case']:60s} hand {c['hand_s'] * 1e3:8.3f} ms  library {c['library_s'] * 1e3:8.3f} ms  "
              f"ratio {c['ratio']:.2f}", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(json.dumps({"cases": cases, "loadavg": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
