"""One PNG from a results JSON: scaling curves, memory, P1-P3 against their targets, load.

    python -m bench.plot bench/recorded/cpu-bench.json [-o out.png]

Needs matplotlib (optional: ``pip install matplotlib``); panels whose suite did not run
say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"kawhi": "#1f77b4", "bare": "#2ca02c", "naive": "#d62728"}
LABELS = {"kawhi": "kawhi (Engine.run)", "bare": "bare SDPA forward", "naive": "naive eager + attention maps"}


def _empty(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _curve(ax: Any, points: list[dict[str, Any]], x: list[float], xlabel: str, title: str, log: bool) -> None:
    for method in ("kawhi", "bare", "naive"):
        xs = [xv for xv, p in zip(x, points) if method in p["time"]]
        ys = [p["time"][method]["median_s"] for p in points if method in p["time"]]
        if xs:
            ax.plot(xs, ys, "o-", color=COLORS[method], label=LABELS[method])
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds per group (median)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    model = results.get("model", {})
    meta = results.get("meta", {})
    mach = meta.get("machine", {})
    fig.suptitle(
        f"kawhi benchmarks - {model.get('name')} ({model.get('layers')}x{model.get('hidden')}, "
        f"{model.get('params', 0) / 1e6:.1f} M params, {model.get('dtype')}, {model.get('device')}) on "
        f"{mach.get('gpu') or mach.get('cpu')} x{mach.get('cpu_count')} ({mach.get('torch_threads')} threads); "
        f"load avg {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}",
        fontsize=10)
    scaling = results.get("scaling", {})

    ax = axes[0][0]
    pts = scaling.get("length")
    if pts:
        _curve(ax, pts, [p["value"] for p in pts], "response tokens (each response)",
               f"response length (group of {pts[0]['group_size']})", log=True)
    else:
        _empty(ax, "response length")

    ax = axes[0][1]
    pts = scaling.get("group")
    if pts:
        _curve(ax, pts, [p["value"] for p in pts], "responses per group",
               f"group size ({pts[0]['response_tokens']} tokens each)", log=True)
    else:
        _empty(ax, "group size")

    ax = axes[0][2]
    pts = scaling.get("image")
    if pts:
        _curve(ax, pts, [p["visual_tokens"] for p in pts], "visual tokens (image size)",
               f"image size (group of {pts[0]['group_size']} x {pts[0]['response_tokens']} tokens)", log=False)
    else:
        _empty(ax, "image size")

    ax = axes[1][0]
    pts = [p for p in (scaling.get("length") or []) if "memory" in p]
    if pts:
        for method in ("kawhi", "bare", "naive"):
            xs = [p["value"] for p in pts if method in p["memory"]]
            ys = [p["memory"][method]["delta_mib"] for p in pts if method in p["memory"]]
            if xs:
                ax.plot(xs, ys, "o-", color=COLORS[method], label=LABELS[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("response tokens (each response)")
        ax.set_ylabel("peak memory over baseline (MiB)")
        ax.set_title(f"peak memory, group of {pts[0]['group_size']} ({pts[0]['memory']['kawhi']['rss_method']})",
                     fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    elif "memory" in results.get("p2", {}):
        mem = results["p2"]["memory"]
        names = list(mem)
        ax.bar(names, [mem[n]["delta_mib"] for n in names], color=[COLORS[n] for n in names])
        ax.set_ylabel("peak memory over baseline (MiB)")
        ax.set_title(f"P2 peak memory at {results['p2']['workload']['response_tokens']} tokens", fontsize=10)
    else:
        _empty(ax, "peak memory")

    ax = axes[1][1]
    summary = results.get("summary", {})
    bars = [("P1 HTTP / bare\nthroughput", summary.get("p1_ratio"), 0.8, "min"),
            ("P2 naive / kawhi\ntime", summary.get("p2_speedup"), 3.0, "min"),
            ("P2 kawhi / naive\npeak memory", summary.get("p2_memory_ratio"), 0.3, "max"),
            ("P3 shared / 5 indep.\ncost", summary.get("p3_cost_ratio"), 0.5, "max")]
    bars = [b for b in bars if b[1] is not None]
    if bars:
        xs = range(len(bars))
        ok = [(v >= t) if kind == "min" else (v <= t) for _, v, t, kind in bars]
        ax.bar(xs, [b[1] for b in bars], color=["#2ca02c" if o else "#d62728" for o in ok], alpha=0.8)
        for i, (_, v, t, kind) in enumerate(bars):
            ax.plot([i - 0.4, i + 0.4], [t, t], "k--", lw=1)
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
            ax.text(i + 0.42, t, f"target {'>=' if kind == 'min' else '<='} {t}", fontsize=7, va="bottom", ha="right")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([b[0] for b in bars], fontsize=8)
        ax.set_yscale("log")
        ax.set_title("P1-P3 (green = target met; dashed = target)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3, which="both")
    else:
        _empty(ax, "P1-P3")

    ax = axes[1][2]
    load = results.get("load")
    if load and load["latency"]["p50_s"] is not None:
        lat = load["latency"]
        names = ["p50", "p95", "p99", "max"]
        vals = [lat["p50_s"], lat["p95_s"], lat["p99_s"], lat["max_s"]]
        ax.bar(names, vals, color="#9467bd")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}s", ha="center", va="bottom", fontsize=9)
        ax.set_ylabel("request latency (s)")
        w = load.get("workload", {})
        ax.set_title(f"load: {load['clients']} clients x {load['duration_s']:.0f} s, 1 group of "
                     f"{w.get('group_size')}x{w.get('response_tokens')} per request\n"
                     f"{load['ok_requests_per_s']:.2f} req/s, {load['sequence_tokens_per_s']:.0f} seq tok/s, "
                     f"statuses {load['statuses']}, errors (not 429) {load['errors_other_than_429']}", fontsize=8)
    else:
        _empty(ax, "load")

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(plot(results, args.out or args.results.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
