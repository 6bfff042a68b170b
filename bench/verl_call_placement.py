"""Where verl's v1 trainer should call KAWHI: in the agent loop as each GRPO group settles, or
in the trainer step once every group is in. Both send one request per group; what differs is
how much of the calls' time lands on the step's critical path.

* ``trainer_step`` -- the step's G group requests sent together once the rollout is done
  (the trainer's ``_compute_advantage``): the step waits for all of them.
* ``agent_loop``   -- each group's request sent when that group settles, the groups settling
  ``--gap`` seconds apart (a rollout's groups finish at different times); the step waits only
  for what is left after the LAST group settles.

Reported: the median time added to the step (after the last group settles) per placement,
and their ratio, against a live ``kawhi serve`` through the adapter's own ``Reweighter``.

    python -m bench.verl_call_placement --model demo --groups 8 --group 5 --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verl_call_placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", choices=("demo", "bench"))
    parser.add_argument("--groups", type=int, default=8, help="GRPO groups per step (prompts)")
    parser.add_argument("--group", type=int, default=5, help="responses per group (rollout.n)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per response")
    parser.add_argument("--gap", type=float, default=None,
                        help="seconds between two groups settling (default: one group's measured latency)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from kawhi_client import Client
    from kawhi_client.integrations.common import Reweighter, Rollout

    from bench.context import Bench
    from bench.models import save_reference
    from bench.server import Server
    from bench.workload import GroupSpec, make_group

    bench = Bench(args.model)
    ref = bench.reference
    spec = GroupSpec(args.tokens, args.group, (448, 336), 0)
    responses = make_group(ref, spec).responses
    seed = iter(range(20_000, 1_000_000))

    def group() -> list[Rollout]:  # a new image each time: no cache answers across groups
        g = make_group(ref, GroupSpec(1, 1, spec.image, next(seed)))
        return [Rollout(token_ids=ids, image=g.png, prompt=g.prompt, advantage=1.0) for ids in responses]

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kawhi-bench-model-") as tmp:
        model_dir = save_reference(ref, Path(tmp) / "model") if args.model != "demo" else None
        with Server(model_dir, flags={"batch_wait_ms": 20}) as srv, \
                Client(srv.url, wait_ready=False, encoding_format="base64", timeout=600) as client:
            reweighter = Reweighter(client, on_error="raise", skip_zero_advantage=False)

            def call(rollouts: list[Rollout]) -> None:
                assert all(r.reweighted for r in reweighter.reweight(rollouts))

            call(group())  # warm-up
            one = []
            for _ in range(args.repeats):
                g = group()
                t0 = time.perf_counter()
                call(g)
                one.append(time.perf_counter() - t0)
            gap = args.gap if args.gap is not None else statistics.median(one)

            def trainer_step() -> float:
                groups = [group() for _ in range(args.groups)]
                t0 = time.perf_counter()  # the last group has settled: the step starts waiting
                with ThreadPoolExecutor(args.groups) as pool:
                    list(pool.map(call, groups))
                return time.perf_counter() - t0

            def agent_loop() -> float:
                groups = [group() for _ in range(args.groups)]
                done: list[float] = []
                lock = threading.Lock()

                def settle_and_call(k: int) -> None:
                    time.sleep(k * gap)  # group k settles k gaps into the rollout
                    call(groups[k])
                    with lock:
                        done.append(time.perf_counter())

                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.groups) as pool:
                    list(pool.map(settle_and_call, range(args.groups)))
                last_settled = t0 + (args.groups - 1) * gap
                return max(0.0, max(done) - last_settled)

            samples: dict[str, list[float]] = {"trainer_step": [], "agent_loop": []}
            for _ in range(args.repeats):  # interleaved
                samples["trainer_step"].append(trainer_step())
                samples["agent_loop"].append(agent_loop())
            server_cmd = " ".join(srv.command())
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(json.dumps({
        "model": args.model, "groups": args.groups, "group": args.group, "tokens": args.tokens,
        "gap_s": round(gap, 4), "one_group_s": round(statistics.median(one), 4),
        "added_to_step_median_s": {k: round(v, 4) for k, v in med.items()},
        "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "trainer_step_over_agent_loop": round(med["trainer_step"] / max(med["agent_loop"], 1e-9), 2),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "server": server_cmd,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
