"""Achieved FLOP rate of the service's forward over this machine's dense matmul rate.

The forward (``Engine.run`` of one group: vision tower + L-1 layers over the prefix once,
L-1 layers over the G responses continuing it, the final layer's q/k projections, alpha
and weights) executes ``bench.flops.kawhi_flops`` FLOPs. The machine's dense matmul rate is
measured in the same process, same dtype, same threads, interleaved with the forward:
a square n x n matmul (the machine's best case) and one of the forward's own shapes
(G*T tokens x hidden -> MLP width). Reported: GFLOP/s of each and the ratios. Split
attention on and off are both timed (the switch's default is whichever is faster here).

    python -m bench.mfu --model bench --group 4 --tokens 512 --repeats 3
    python -m bench.mfu --model qwen7b --device cuda --dtype bfloat16 --tokens 1024   # GPU profile

Goal (issue 13): forward / dense matmul >= 0.5 on the bench model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mfu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench.real_shapes import SHAPES

    parser.add_argument("--model", default="bench", choices=("demo", "bench", "qwen7b", *SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="real shapes: decoder layers kept")
    parser.add_argument("--vision-depth", type=int, default=None, help="real shapes: vision blocks kept")
    parser.add_argument("--profile", action="store_true", help="also profile one forward: time per op class")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the square matmul")
    args = parser.parse_args(argv)

    from kawhi.engine.engine import Engine, EngineLimits

    from bench.context import Bench
    from bench.flops import kawhi_flops
    from bench.measure import compare
    from bench.workload import GroupSpec

    bench = Bench(args.model, device=args.device, dtype=args.dtype, threads=args.threads, layers=args.layers,
                  vision_depth=args.vision_depth)
    ref = bench.reference
    prepared = bench.prepare(bench.groups(GroupSpec(args.tokens, args.group, (448, 336), 3)))
    engines = {split: Engine(ref, limits=EngineLimits(prefix_cache_bytes=0, split_attention=split))
               for split in (True, False)}
    config = ref.model.config
    text = config.get_text_config()
    dtype, device = ref.dtype, ref.device
    n = args.matmul
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    rows = args.group * args.tokens
    x = torch.randn(rows, text.hidden_size, dtype=dtype, device=device)
    w = torch.randn(text.hidden_size, text.intermediate_size, dtype=dtype, device=device)

    def square() -> Any:
        return a @ b

    def shaped() -> Any:
        return x @ w

    fns = {"forward_split": lambda: engines[True].run(prepared), "forward_copy": lambda: engines[False].run(prepared),
           "matmul_square": square, "matmul_shaped": shaped}
    load_start = os.getloadavg()[0]
    with torch.inference_mode():
        times = compare(fns, args.repeats, device=str(device))
    p = prepared[0]
    flops = kawhi_flops(config, int(p.prompt.input_ids.numel()), int(p.prompt.visual_positions.numel()),
                        [len(r.tokens.token_ids) for r in p.responses])
    rate = {"forward_split": flops, "forward_copy": flops, "matmul_square": 2.0 * n ** 3,
            "matmul_shaped": 2.0 * rows * text.hidden_size * text.intermediate_size}
    gflops = {k: rate[k] / times[k]["median_s"] / 1e9 for k in fns}
    best = "forward_split" if times["forward_split"]["median_s"] <= times["forward_copy"]["median_s"] else "forward_copy"
    out = {
        "model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "group": args.group, "tokens": args.tokens,
        "prefix_tokens": int(p.prompt.input_ids.numel()), "forward_gflop": round(flops / 1e9, 3),
        "median_s": {k: round(v["median_s"], 5) for k, v in times.items()},
        "gflops": {k: round(v, 2) for k, v in gflops.items()},
        "forward_over_matmul_square": round(gflops[best] / gflops["matmul_square"], 3),
        "forward_over_matmul_shaped": round(gflops[best] / gflops["matmul_shaped"], 3),
        "split_over_copy_time": round(times["forward_split"]["median_s"] / times["forward_copy"]["median_s"], 3),
        "min_s": {k: round(v["min_s"], 5) for k, v in times.items()},
        "forward_over_matmul_square_min": round((rate[best] / times[best]["min_s"])
                                                / (rate["matmul_square"] / times["matmul_square"]["min_s"]), 3),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "command": "python -m bench.mfu " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.profile:
        with torch.inference_mode():
            out["profile"] = profile_forward(lambda: engines[best == "forward_split"].run(prepared))
    print(json.dumps(out))
    return 0


# op classes of the forward's profile: what runs at matmul speed and what does not
OP_CLASSES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_efficient_attention",
                  "aten::_flash_attention"),
}


def profile_forward(fn: Any) -> dict[str, Any]:
    """Self CPU time of one call by op class (matmul, attention, everything else) and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    classes = {name: 0.0 for name in (*OP_CLASSES, "other")}
    for e in events:
        kind = next((c for c, prefixes in OP_CLASSES.items() if e.key.startswith(prefixes)), "other")
        classes[kind] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"self_cpu_s": round(total / 1e6, 3),
            "fraction": {k: round(v / total, 3) for k, v in classes.items()},
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count,
                         "fraction": round(e.self_cpu_time_total / total, 3)} for e in top]}


if __name__ == "__main__":
    sys.exit(main())
