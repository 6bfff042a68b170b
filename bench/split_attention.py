"""Experiment: the response pass without an attention mask (a suggested engine change).

The engine's response pass (``QwenVLReference.final_layer_inputs``) runs G responses of T
tokens over a KV cache holding the P-token prefix. With q_len != kv_len transformers builds
a (G, 1, T, P+T) boolean causal mask, so SDPA

* converts it to a float mask in every layer (``aten::where``: G*T*(P+T)*4 bytes each time),
* cannot use its causal fast path (the flash kernels skip the upper triangle only with
  ``is_causal``), so it computes all T x (P+T) scores, and
* repeats K/V to every query head (transformers uses SDPA's GQA only without a mask).

The mask is pure structure: every response token sees the whole prefix and its own
predecessors. So attention splits exactly into a prefix part (no mask; GQA heads packed
along the length axis) and a self part (``is_causal=True``), merged with their
log-sum-exps. ``split_sdpa`` does that with ``aten::_scaled_dot_product_flash_attention_for_cpu``,
which returns the log-sum-exp. On CUDA the equivalent is loading the reference with
``attn_implementation="flash_attention_2"``, whose causal mask is bottom-right aligned
when q_len < kv_len, so no mask is built at all.

    python -m bench.split_attention --model bench --tokens 2048 --group 4

prints the engine's ``Engine.run`` time and peak memory with and without the split (same
process, interleaved), and the largest difference in the captured hidden states.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch


def _sees_whole_prefix(mask: torch.Tensor, prefix: int) -> bool:
    """True when no query is masked from any of the first ``prefix`` keys (bool: True = attend;
    float: 0 = attend)."""
    part = mask[..., :prefix]
    return bool(part.all()) if part.dtype == torch.bool else bool((part == 0).all())


def split_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               dropout: float = 0.0, scaling: Any = None, is_causal: Any = None, **kwargs: Any) -> Any:
    """transformers attention function: exact prefix/self split for q_len < kv_len on CPU.

    Valid where the mask is "all of the prefix + causal over the queries" (the engine's
    right-padded response pass of one group, or of groups with equal prefix lengths); a
    mask that hides part of the prefix (prefix padding) goes to transformers' own SDPA.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    B, H, T, d = query.shape
    S = key.shape[2]
    if T == 1 or S <= T or query.device.type != "cpu" or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    P = S - T
    if attention_mask is not None and not _sees_whole_prefix(attention_mask, P):
        # prefix padding (groups of different prefix lengths in one batch): keep the masked kernel
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    hkv = key.shape[1]
    n_rep = H // hkv
    # prefix: no mask, so the n_rep query heads of a KV head can share one call (GQA packed)
    out_p, lse_p = flash(query.reshape(B, hkv, n_rep * T, d), key[:, :, :P], value[:, :, :P], 0.0, False,
                         scale=scaling)
    out_p, lse_p = out_p.reshape(B, H, T, d), lse_p.reshape(B, H, T)
    out_s, lse_s = flash(query, repeat_kv(key[:, :, P:], n_rep), repeat_kv(value[:, :, P:], n_rep), 0.0, True,
                         scale=scaling)
    m = torch.maximum(lse_p, lse_s)
    w_p = (lse_p - m).exp_().unsqueeze(-1)
    w_s = (lse_s - m).exp_().unsqueeze(-1)
    out = (out_p * w_p + out_s * w_s) / (w_p + w_s)
    return out.transpose(1, 2).contiguous(), None


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

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from bench.context import Bench
    from bench.measure import REPO, compare, peak_rss_delta
    from bench.workload import GroupSpec

    bench = Bench(args.model, threads=args.threads)
    prepared = bench.prepare(bench.groups(GroupSpec(args.tokens, args.group, (448, 336), 2000)))
    ref = bench.reference
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def states() -> list[torch.Tensor]:
        out = ref.final_layer_inputs(prepared[0].prompt, [r.tokens.token_ids for r in prepared[0].responses])
        return [s.hidden for s in out.responses]

    def use(fn: Any) -> None:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = fn

    run = bench.call("kawhi", prepared)
    if args.memory:  # a fresh process per variant: the allocator holds nothing from the other one
        use(split_sdpa if args.memory == "split" else original)
        warm = bench.prepare(bench.groups(GroupSpec(8, 1, (448, 336), 1)))
        bench.call("kawhi", warm)()
        print(json.dumps(peak_rss_delta(run)))
        return 0
    use(original)
    base = states()
    use(split_sdpa)
    diff = max((a - b).abs().max().item() for a, b in zip(base, states()))

    def as_mask() -> None:
        use(original)
        run()

    def as_split() -> None:
        use(split_sdpa)
        run()

    times = compare({"mask": as_mask, "split": as_split}, args.repeats)
    use(original)
    mem = {}
    for variant in ("mask", "split"):
        cmd = [sys.executable, "-m", "bench.split_attention", "--model", args.model, "--tokens", str(args.tokens),
               "--group", str(args.group), "--memory", variant]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        mem[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    mem_mask, mem_split = mem["mask"], mem["split"]
    out = {"model": args.model, "tokens": args.tokens, "group": args.group, "threads": bench.threads,
           "max_abs_diff_hidden": diff,
           "mask_s": times["mask"]["median_s"], "split_s": times["split"]["median_s"],
           "time_ratio": times["split"]["median_s"] / times["mask"]["median_s"],
           "mask_peak_mib": mem_mask["delta_mib"], "split_peak_mib": mem_split["delta_mib"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
