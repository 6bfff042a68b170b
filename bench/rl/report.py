"""Tables and the figure of the RL experiment, from the records ``bench.rl`` writes.

    python -m bench.rl.report bench/recorded/rl-quick-default.json   # print the tables again (and the PNG)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PARTS = ("generate", "kawhi", "ref", "score", "update")


def by_arm(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    arms: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        arms[r["arm"]].append(r)
    return dict(arms)


def curve(runs: Sequence[dict[str, Any]], key: str = "accuracy") -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over seeds of an eval quantity, at the steps every run evaluated."""
    steps = sorted(set.intersection(*[{e["step"] for e in r["evals"]} for r in runs])) if runs else []
    out = []
    for step in steps:
        values = [next(e[key] for e in r["evals"] if e["step"] == step) for r in runs]
        out.append((step, statistics.fmean(values), min(values), max(values)))
    return out


def step_split(runs: Sequence[dict[str, Any]], skip_first: int = 1) -> dict[str, float]:
    """Median seconds per step part over all steps of all runs (the first ``skip_first`` steps
    of each run are warm-up: lazy imports, first service call uploads the images)."""
    rows = [s for r in runs for s in r["steps"][skip_first:]] or [s for r in runs for s in r["steps"]]
    return {k: statistics.median(s[k] for s in rows) for k in ("step", *PARTS)} if rows else {}


def accuracy_table(records: Sequence[dict[str, Any]]) -> str:
    arms = by_arm(records)
    kinds = sorted({k for r in records for e in r["evals"][-1:] for k in e["by_kind"]})
    head = ["arm", "seeds", "acc. start", "acc. final (mean [min, max])", *[f"final {k}" for k in kinds],
            "paragraphs start -> final", "train reward last 5 steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in arms.items():
        c = curve(runs)
        if not c:
            continue
        start, final = c[0], c[-1]
        per_kind = [statistics.fmean(r["evals"][-1]["by_kind"].get(k, float("nan")) for r in runs) for k in kinds]
        par = curve(runs, "paragraphs")
        reward = statistics.fmean(statistics.fmean(x["reward"] for x in r["train"][-5:]) for r in runs if r["train"])
        lines.append("| " + " | ".join([
            name, str(len(runs)), f"{start[1]:.3f}", f"{final[1]:.3f} [{final[2]:.3f}, {final[3]:.3f}]",
            *[f"{v:.3f}" for v in per_kind], f"{par[0][1]:.2f} -> {par[-1][1]:.2f}", f"{reward:.3f}"]) + " |")
    return "\n".join(lines)


def time_table(records: Sequence[dict[str, Any]]) -> str:
    head = ["arm", "beta", "KL reference", "step s", *[f"{p} s" for p in PARTS], "kawhi share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in by_arm(records).items():
        split = step_split(runs)
        if not split:
            continue
        r0 = runs[0]
        ref = "-" if not r0["beta"] else ("service" if r0["ref_from_service"] else "TRL ref model")
        lines.append("| " + " | ".join([
            name, f"{r0['beta']:g}", ref, f"{split['step']:.2f}", *[f"{split[p]:.3f}" for p in PARTS],
            f"{100 * split['kawhi'] / split['step']:.1f} %"]) + " |")
    return "\n".join(lines)


def figure(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Held-out accuracy over steps, one line per arm (mean over seeds), min-max shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = {name: runs for name, runs in by_arm(records).items() if len(curve(runs)) >= 2}
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, runs in arms.items():
        c = curve(runs)
        steps = [x[0] for x in c]
        ax.plot(steps, [x[1] for x in c], marker="o", label=f"{name} (n={len(runs)})")
        ax.fill_between(steps, [x[2] for x in c], [x[3] for x in c], alpha=0.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(title or "GRPO vs GRPO + KAWHI")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(result: dict[str, Any]) -> str:
    records = result["records"]
    train = [r for r in records if r["evals"]]
    from bench.rl.probe import probe_table

    probe = probe_table(result["probe"]) if result.get("probe") else ""
    return "\n\n".join(x for x in (accuracy_table(train) if train else "", time_table(records), probe) if x)


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    for p in paths:
        result = json.loads(Path(p).read_text())
        print(render(result))
        png = figure([r for r in result["records"] if r["evals"]], Path(p).with_suffix(".png"), result.get("title", ""))
        if png:
            print(f"figure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
