"""Split attention on vs off: time, peak memory and exactness of ``Engine.run``.

The response pass continues a prefix of P tokens with G responses of T tokens. With the
switch off (``EngineLimits.split_attention=False``) every response gets its own copy of the
prefix's KV cache and, with q_len != kv_len, transformers builds a (G, 1, T, P+T) mask, so
SDPA converts it to a float mask in every layer, cannot use its causal fast path and
repeats K/V to every query head. With it on (``kawhi.models.prefix.split_attention``)
attention splits exactly into "all of the prefix" (no mask; the query heads of a KV head
and all G responses packed into one call against the one stored copy of the prefix) and
"causal over the response", merged by their log-sum-exps.

    python -m bench.split_attention --model bench --tokens 2048 --group 4

prints the engine's ``Engine.run`` time and peak memory with the switch on and off (same
process, interleaved; memory in a fresh process each), and the largest difference in the
captured hidden states.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch


def attention_only(ref: Any, prefix: int, group: int, tokens: int, repeats: int) -> dict[str, float]:
    """One LM layer's attention at the model's shapes, masked SDPA over a per-response copy
    of the prefix vs split attention; min and median of interleaved calls (robust to load)."""
    import time

    from kawhi.models.prefix import LayerInputs, PrefixState, SplitPlan, continuation_plan, split_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = ref._base.language_model.layers[0].self_attn
    H, Hkv, d = ref.num_heads, ref.num_kv_heads, ref.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(group, H, tokens, d, generator=gen, dtype=ref.dtype)
    k, v = (torch.randn(group, Hkv, tokens, d, generator=gen, dtype=ref.dtype) for _ in range(2))
    pk, pv = (torch.randn(1, Hkv, prefix, d, generator=gen, dtype=ref.dtype) for _ in range(2))
    state = PrefixState([pk] * (module.layer_idx + 1), [pv] * (module.layer_idx + 1),
                        LayerInputs(pk[:0], pk[:0], pk[:0]), prefix, prefix)
    mask = torch.ones(group, 1, tokens, prefix + tokens, dtype=torch.bool)
    mask[..., prefix:] = torch.ones(tokens, tokens, dtype=torch.bool).tril()

    def masked() -> Any:
        keys = torch.cat([pk.expand(group, -1, -1, -1), k], 2)
        values = torch.cat([pv.expand(group, -1, -1, -1), v], 2)
        return sdpa_attention_forward(module, q, keys, values, mask, scaling=d ** -0.5)[0]

    def split() -> Any:
        with continuation_plan(SplitPlan([(0, group, state)])):
            return split_attention(module, q, k, v, None, scaling=d ** -0.5)[0]

    times: dict[str, list[float]] = {"mask": [], "split": []}
    with torch.inference_mode():
        diff = (masked() - split()).abs().max().item()
        for _ in range(repeats):
            for name, fn in (("mask", masked), ("split", split)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {f"{n}_min_s": min(t) for n, t in times.items()}
    out.update({f"{n}_median_s": sorted(t)[len(t) // 2] for n, t in times.items()})
    out["min_ratio"] = out["split_min_s"] / out["mask_min_s"]
    out["max_abs_diff"] = diff
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", choices=("demo", "bench"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", choices=("mask", "split"), default=None,
                        help="internal: only measure this variant's peak memory (run in a fresh process)")
    args = parser.parse_args(argv)

    from kawhi.engine.engine import Engine, EngineLimits

    from bench.context import Bench
    from bench.measure import REPO, compare, peak_rss_delta
    from bench.workload import GroupSpec

    bench = Bench(args.model, threads=args.threads)
    ref = bench.reference
    prepared = bench.prepare(bench.groups(GroupSpec(args.tokens, args.group, (448, 336), 2000)))
    engines = {name: Engine(ref, limits=EngineLimits(prefix_cache_bytes=0, split_attention=name == "split"))
               for name in ("mask", "split")}

    if args.memory:  # a fresh process per variant: the allocator holds nothing from the other one
        engine = engines[args.memory]
        engine.run(bench.prepare(bench.groups(GroupSpec(8, 1, (448, 336), 1))))  # warm the kernels
        print(json.dumps(peak_rss_delta(lambda: engine.run(prepared))))
        return 0

    def states(split: bool) -> list[torch.Tensor]:
        p = prepared[0]
        out = ref.final_layer_inputs_many([(p.prompt, [r.tokens.token_ids for r in p.responses])],
                                          split_attention=split)[0]
        return [s.hidden for s in out.responses]

    diff = max((a - b).abs().max().item() for a, b in zip(states(False), states(True)))
    prefix = int(prepared[0].prompt.input_ids.numel())
    layer = attention_only(ref, prefix, args.group, args.tokens, max(5, 3 * args.repeats))
    times = compare({name: (lambda e=e: e.run(prepared)) for name, e in engines.items()}, args.repeats)
    mem = {}
    for variant in ("mask", "split"):
        cmd = [sys.executable, "-m", "bench.split_attention", "--model", args.model, "--tokens", str(args.tokens),
               "--group", str(args.group), "--memory", variant]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, env=env)
        mem[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {
        "model": args.model, "tokens": args.tokens, "group": args.group, "threads": bench.threads,
        "max_abs_diff_hidden": diff,
        "mask_s": times["mask"]["median_s"], "split_s": times["split"]["median_s"],
        "time_ratio": times["split"]["median_s"] / times["mask"]["median_s"],
        "min_time_ratio": times["split"]["min_s"] / times["mask"]["min_s"],
        "one_layer_attention": layer,
        "mask_peak_mib": mem["mask"]["delta_mib"], "split_peak_mib": mem["split"]["delta_mib"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
