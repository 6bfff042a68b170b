"""GRPO against GRPO + KAWHI, through a live ``kawhi serve``, with TRL's real GRPOTrainer, on CPU.

    python -m bench.rl --quick       # 3 arms x 1 seed x 12 steps, 6-13 min on 2 shared cores: prints the tables
    python -m bench.rl               # the recorded protocol (docs/experiments.md): all arms, 3 seeds, KL part

Every run writes one JSON (``--out``, default ``bench/results/rl-<mode>-<time>.json``) with every
record, the protocol, the machine, the command and the load average, a PNG next to it, and
prints the accuracy table and the step-time table. The protocol is docs/experiments.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.measure import REPO
from bench.rl.probe import probe_table, weight_probe
from bench.rl.report import figure, render
from bench.rl.trainer import Arm, Hyper, run_arm

# the arms of docs/experiments.md; the KL arms time the KL setting (see there)
ARMS = {
    "grpo": Arm("grpo"),
    "kawhi": Arm("kawhi", {}),
    "kawhi_random": Arm("kawhi_random", {"regions": "random"}),
    "kawhi_mean": Arm("kawhi_mean", {"normalize": "mean"}),
    "kawhi_rope_before": Arm("kawhi_rope_before", {"rope": "before"}),
    "grpo_kl_trl": Arm("grpo_kl_trl", beta=0.04),
    "kawhi_kl_service": Arm("kawhi_kl_service", {}, beta=0.04, ref_from_service=True),
}
MODES: dict[str, dict[str, Any]] = {
    "quick": {"arms": ["grpo", "kawhi", "kawhi_random"], "seeds": [0], "kl_arms": [], "train_per_kind": 100,
              "heldout_per_kind": 8, "hyper": Hyper(steps=12, eval_every=6)},
    "full": {"arms": ["grpo", "kawhi", "kawhi_random", "kawhi_mean", "kawhi_rope_before"], "seeds": [0, 1, 2],
             "kl_arms": ["grpo", "grpo_kl_trl", "kawhi_kl_service"], "kl_steps": 6, "train_per_kind": 200,
             "heldout_per_kind": 16, "hyper": Hyper(steps=30, eval_every=10)},
}


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The service's own counters over one run: forward and prepare seconds, process CPU."""
    return {k: round(after[k] - before.get(k, 0.0), 4) for k in after}


def shown(path: Path | None) -> str | None:
    """A path as the results show it: relative to the repository when inside it."""
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def log(msg: str) -> None:
    print(f"[bench.rl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 arms x 1 seed, short (about 10 min on 2 cores)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="override the mode's training arms")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the mode's seeds")
    parser.add_argument("--steps", type=int, help="override the mode's GRPO steps")
    parser.add_argument("--no-kl", action="store_true", help="skip the KL timing part")
    parser.add_argument("--policy", type=Path,
                        help="policy checkpoint (default: kawhi-tiny after 600 steps, trained once into bench/results/)")
    parser.add_argument("--reference", type=Path,
                        help="reference model folder for kawhi serve (default: its embedded model)")
    parser.add_argument("--only-kl", action="store_true", help="run only the KL timing part")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/rl-<mode>-<time>.json)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)

    from bench.rl.task import heldout_items, policy_checkpoint, train_items
    from bench.run import loadavg, machine
    from bench.server import Server, metrics_snapshot

    mode = "quick" if args.quick else "full"
    spec = MODES[mode]
    hyper: Hyper = spec["hyper"]
    if args.steps:
        hyper.steps = args.steps
    arms = [] if args.only_kl else args.arms or spec["arms"]
    seeds = args.seeds or spec["seeds"]
    kl_arms = [] if args.no_kl else MODES["full"]["kl_arms"] if args.only_kl else spec["kl_arms"]
    out = args.out or REPO / "bench" / "results" / f"rl-{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    policy = args.policy or policy_checkpoint(REPO / "bench" / "results", log)
    reference = args.reference  # None: the embedded model of `kawhi serve`
    train = train_items(spec["train_per_kind"])
    heldout = heldout_items(spec["heldout_per_kind"])
    work = out.with_suffix("")
    result: dict[str, Any] = {
        "title": args.title, "mode": mode, "command": "python -m bench.rl " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "loadavg_start": loadavg(), "policy": shown(policy), "reference": shown(reference),
        "hyper": asdict(hyper), "arms": arms, "seeds": seeds, "kl_arms": kl_arms,
        "split": {"train": f"kawhi-tiny train split, {len(train)} items", "heldout": f"test split, {len(heldout)} items"},
        "records": []}

    def save() -> None:
        result["loadavg_end"] = loadavg()
        out.write_text(json.dumps(result, indent=1, default=str))

    threads = {"torch_threads": hyper.threads, "prepare_threads": 1}
    with contextlib.ExitStack() as stack:
        if arms:
            srv = stack.enter_context(Server(reference, flags=threads, threads=hyper.threads))
            result["service"] = {"url": srv.url, "info": srv.info, "startup_s": srv.startup_s}
            if srv.info.get("is_demo"):
                raise SystemExit("kawhi serve's embedded model is the random demo model (its weights and its "
                                 "tokenizer are not kawhi-tiny's): pass --reference <a trained kawhi-tiny folder>")
            log(f"kawhi serve ready at {srv.url} ({reference or 'embedded model'}); policy {policy}")
            result["probe"] = weight_probe(srv.url)
            log("weights on planted responses:\n" + probe_table(result["probe"]))
        for seed in seeds:  # seed-major: an interrupted run still has every arm of the first seeds
            for name in arms:
                log(f"arm {name}, seed {seed}: {hyper.steps} steps")
                before = metrics_snapshot(srv.url)
                record = run_arm(ARMS[name], seed, hyper, policy, train, heldout, srv.url, work / f"{name}-{seed}", log)
                record["service_metrics"] = metrics_delta(before, metrics_snapshot(srv.url))
                result["records"].append(record)
                save()
        if kl_arms:
            # the KL reference is the initial policy: service log-probs need the service to serve it
            kl_srv = stack.enter_context(Server(policy, flags=threads, threads=hyper.threads))
            result["kl_service"] = {"info": kl_srv.info, "startup_s": kl_srv.startup_s}
            kl_hyper = Hyper(**{**asdict(hyper), "steps": MODES["full"]["kl_steps"], "eval_every": 10**6})
            for name in kl_arms:
                arm = ARMS[name]
                arm = Arm(f"{name} (KL part)", arm.kawhi_options, arm.beta, arm.ref_from_service)
                log(f"KL part: {arm.name}, {kl_hyper.steps} steps")
                before = metrics_snapshot(kl_srv.url)
                record = run_arm(arm, seeds[0], kl_hyper, policy, train, [], kl_srv.url, work / f"kl-{name}", log)
                record["service_metrics"] = metrics_delta(before, metrics_snapshot(kl_srv.url))
                result["records"].append(record)
                save()
    save()
    print(render(result))
    png = figure([r for r in result["records"] if r["evals"]], out.with_suffix(".png"), args.title)
    print(json.dumps({"results": str(out), "figure": str(png) if png else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
