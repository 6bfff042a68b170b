"""One GRPO group sent three ways to `kawhi serve`: what the prefix cache buys.

* ``group``    -- one request holding the group's G responses;
* ``split``    -- G concurrent requests of one response each, same image + prompt (verl's
  reward loop without batching: one call per sample);
* ``distinct`` -- G concurrent one-response requests with G different images (nothing to share).

and, through the verl integration's own code (``Reweighter`` over the HTTP ``Client``):

* ``verl_batched``    -- the G samples through ``SampleBatcher`` (one call, one group);
* ``verl_per_sample`` -- G concurrent ``Reweighter.reweight([sample])`` calls (the cache carries it).

Every pass uses new images (fresh seeds), so nothing is shared across passes: only what
one group's requests share with each other. Modes are interleaved; medians of wall time
per pass are reported with the server's prefix-cache counters per mode.

    python -m bench.prefix_share --model bench --group 5 --tokens 128 --repeats 3

Goals (issue 13): split / group <= 1.2 and split / distinct <= 0.5 on the bench model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODES = ("group", "split", "distinct", "verl_batched", "verl_per_sample")


def _body(groups: list[dict[str, Any]], encoding: str = "base64") -> bytes:
    return json.dumps({"groups": groups, "encoding_format": encoding}).encode()


def _one(group: Any, image_group: Any, responses: list[list[int]], gid: str) -> dict[str, Any]:
    api = image_group.api(gid)
    api["responses"] = [{"text": "", "token_ids": ids} for ids in responses]
    api["advantages"] = [1.0] * len(responses)
    return api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", choices=("demo", "bench"))
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per response")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: its auto)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from kawhi_client import Client
    from kawhi_client.integrations.common import Reweighter, Rollout
    from kawhi_client.integrations.verl import SampleBatcher

    from bench.context import Bench
    from bench.models import save_reference
    from bench.server import Server, metrics_delta, metrics_snapshot, post_all
    from bench.workload import GroupSpec, make_group

    bench = Bench(args.model)
    ref = bench.reference
    spec = GroupSpec(args.tokens, args.group, (448, 336), 0)
    responses = make_group(ref, spec).responses
    seed = iter(range(10_000, 1_000_000))

    def image_group() -> Any:
        return make_group(ref, GroupSpec(1, 1, spec.image, next(seed)))

    load_start = os.getloadavg()[0]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    counters: dict[str, dict[str, float]] = {m: {} for m in modes}
    with tempfile.TemporaryDirectory(prefix="kawhi-bench-model-") as tmp:
        model_dir = save_reference(ref, Path(tmp) / "model") if args.model != "demo" else None
        flags = {"batch_wait_ms": 20}
        with Server(model_dir, flags=flags, threads=args.threads) as srv, \
                Client(srv.url, wait_ready=False, encoding_format="base64", timeout=600) as client:
            reweighter = Reweighter(client, on_error="raise", skip_zero_advantage=False)

            def rollouts() -> list[Rollout]:
                g = image_group()
                return [Rollout(token_ids=ids, image=g.png, prompt=g.prompt, advantage=1.0) for ids in responses]

            def run(mode: str, tag: str) -> None:
                if mode == "group":
                    post_all(srv.url, [_body([_one(None, image_group(), responses, tag)])], concurrency=1)
                elif mode == "split":
                    g = image_group()
                    post_all(srv.url, [_body([_one(None, g, [ids], f"{tag}-{i}")]) for i, ids in enumerate(responses)],
                             concurrency=len(responses))
                elif mode == "distinct":
                    post_all(srv.url, [_body([_one(None, image_group(), [ids], f"{tag}-{i}")])
                                       for i, ids in enumerate(responses)], concurrency=len(responses))
                elif mode == "verl_batched":
                    batcher = SampleBatcher(reweighter.reweight, max_wait_s=0.002)

                    async def score(batch: list[Rollout]) -> list[Any]:
                        return await asyncio.gather(*[asyncio.create_task(batcher.submit(r)) for r in batch])

                    rows = asyncio.run(score(rollouts()))
                    assert all(r.reweighted for r in rows) and batcher.calls == 1
                elif mode == "verl_per_sample":
                    batch = rollouts()
                    with ThreadPoolExecutor(len(batch)) as pool:
                        rows = list(pool.map(lambda r: reweighter.reweight([r])[0], batch))
                    assert all(r.reweighted for r in rows)
                else:
                    raise ValueError(mode)

            for mode in modes:  # warm-up
                run(mode, f"warm-{mode}")
            for k in range(args.repeats):
                for mode in modes:
                    before = metrics_snapshot(srv.url)
                    t0 = time.perf_counter()
                    run(mode, f"p{k}-{mode}")
                    samples[mode].append(time.perf_counter() - t0)
                    delta = metrics_delta(before, metrics_snapshot(srv.url))
                    for name in ("prefix_hits", "prefix_misses", "prefix_coalesced", "forward_s", "forwards"):
                        counters[mode][name] = counters[mode].get(name, 0.0) + delta.get(name, 0.0)
            server_cmd = " ".join(srv.command())
    med = {m: statistics.median(v) for m, v in samples.items()}
    out: dict[str, Any] = {
        "model": args.model, "group": args.group, "tokens": args.tokens, "repeats": args.repeats,
        "prefix_tokens": int(bench.prepare([make_group(ref, spec)])[0].prompt.input_ids.numel()),
        "median_s": {m: round(v, 4) for m, v in med.items()},
        "samples_s": {m: [round(x, 4) for x in v] for m, v in samples.items()},
        "server_per_mode": {m: {k: round(v, 4) for k, v in c.items()} for m, c in counters.items()},
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "server": server_cmd, "command": "python -m bench.prefix_share " + " ".join(argv or sys.argv[1:]),
    }
    if "split" in med and "group" in med:
        out["split_over_group"] = round(med["split"] / med["group"], 3)
    if "split" in med and "distinct" in med:
        out["split_over_distinct"] = round(med["split"] / med["distinct"], 3)
    if "verl_per_sample" in med and "verl_batched" in med:
        out["verl_per_sample_over_batched"] = round(med["verl_per_sample"] / med["verl_batched"], 3)
    line = json.dumps(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
