"""Forward FLOPs of the three methods, for achieved FLOP/s and MFU.

Counting convention: a multiply-add is 2 FLOPs; matmuls only (norms, activations, RoPE
and softmax are ignored, < 1 % here). Per decoder layer and token with c keys in view:

    projections  2 * D * (H*hd + 2*Hkv*hd) + 2 * H*hd * D
    attention    2 * 2 * H*hd * c            (QK^T and AV; causal: c = position + 1)
    MLP          2 * 3 * D * I               (gated: gate, up, down)

Vision tower (per patch): patch embedding, then per block qkv + proj (2*4*Dv^2), gated
MLP (2*3*Dv*Iv) and attention over its window (64 patches) or the whole image (full
blocks); then the 2x2 merger MLP per visual token. The LM head is excluded everywhere.

* bare  = per sequence: vision + L layers over P + T tokens.
* kawhi = per group: vision + (L-1) layers over the P prefix tokens, then G responses of T
  tokens through (L-1) layers with the prefix in view, plus the final layer's q
  projection of the responses and k projection of the visual tokens. These are the
  FLOPs the service actually executes; "bare-equivalent" FLOP/s divides the bare FLOPs
  by kawhi's time (the useful work per second).
* naive = bare (same forward, eager attention).

MFU = FLOPs / seconds / peak. The peak is known for the GPUs in ``PEAK_TFLOPS`` (dense
bf16, no sparsity) or passed with ``--peak-tflops``; on CPU only FLOP/s are reported.
"""

from __future__ import annotations

from typing import Any

# dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets
PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
}


def gpu_peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key]
    return None


def _text_shape(config: Any) -> dict[str, int]:
    t = config.get_text_config()
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return {"D": t.hidden_size, "I": t.intermediate_size, "L": t.num_hidden_layers, "H": t.num_attention_heads,
            "Hkv": t.num_key_value_heads, "hd": hd}


def layer_flops(config: Any, tokens: int, offset: int = 0) -> float:
    """One decoder layer over ``tokens`` tokens that see ``offset`` earlier keys plus themselves (causal)."""
    s = _text_shape(config)
    D, I, H, Hkv, hd = s["D"], s["I"], s["H"], s["Hkv"], s["hd"]  # noqa: E741  (the papers' names for the shapes)
    proj = 2 * D * (H * hd + 2 * Hkv * hd) + 2 * H * hd * D
    mlp = 2 * 3 * D * I
    keys = tokens * offset + tokens * (tokens + 1) / 2  # sum over tokens of keys in view
    return tokens * (proj + mlp) + 2 * 2 * H * hd * keys


def vision_flops(config: Any, visual_tokens: int) -> float:
    v = config.vision_config
    merge = v.spatial_merge_size ** 2
    patches = visual_tokens * merge
    Dv, Iv = v.hidden_size, v.intermediate_size
    embed = 2 * (v.in_channels * v.temporal_patch_size * v.patch_size ** 2) * Dv * patches
    window = max(1, (getattr(v, "window_size", 112) // v.patch_size) ** 2)
    full = set(getattr(v, "fullatt_block_indexes", []) or [])
    blocks = 0.0
    for b in range(v.depth):
        keys = patches if b in full else min(window, patches)
        blocks += patches * (2 * 4 * Dv * Dv + 2 * 3 * Dv * Iv + 2 * 2 * Dv * keys)
    merger = visual_tokens * (2 * (merge * Dv) ** 2 + 2 * merge * Dv * v.out_hidden_size)
    return embed + blocks + merger


def bare_flops(config: Any, prefix: int, visual: int, responses: list[int]) -> float:
    L = _text_shape(config)["L"]
    return sum(vision_flops(config, visual) + L * layer_flops(config, prefix + t) for t in responses)


def kawhi_flops(config: Any, prefix: int, visual: int, responses: list[int]) -> float:
    s = _text_shape(config)
    L, D, H, Hkv, hd = s["L"], s["D"], s["H"], s["Hkv"], s["hd"]
    longest = max(responses, default=0)
    total = vision_flops(config, visual) + (L - 1) * layer_flops(config, prefix)
    # the response batch is padded to the longest response
    total += len(responses) * (L - 1) * layer_flops(config, longest, offset=prefix)
    total += sum(responses) * 2 * D * H * hd + visual * 2 * D * Hkv * hd
    return total


def group_flops(config: Any, method: str, prefix: int, visual: int, responses: list[int]) -> float:
    if method == "kawhi":
        return kawhi_flops(config, prefix, visual, responses)
    return bare_flops(config, prefix, visual, responses)


def estimate(model: str, prefix: int, visual: int, group: int, tokens: int, tflops: float, mfu: float) -> dict:
    """FLOPs of one group under each method, and the seconds it would take at ``mfu`` of ``tflops``."""
    from bench.models import build_config, demo_tokenizer

    config = build_config(model, demo_tokenizer())
    responses = [tokens] * group
    out: dict[str, Any] = {"model": model, "prefix": prefix, "visual": visual, "group": group, "tokens": tokens,
                           "peak_tflops": tflops, "assumed_mfu": mfu}
    for method in ("kawhi", "bare"):
        flops = group_flops(config, method, prefix, visual, responses)
        seconds = flops / (tflops * 1e12 * mfu)
        out[method] = {"gflop": flops / 1e9, "seconds": seconds,
                       "sequence_tokens_per_s": group * (prefix + tokens) / seconds}
    out["kawhi_over_bare_flops"] = out["kawhi"]["gflop"] / out["bare"]["gflop"]
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.flops",
                                     description="FLOP model of one group (no weights are built).")
    parser.add_argument("--model", default="qwen7b", choices=("bench", "qwen7b"))
    parser.add_argument("--prefix", type=int, default=299, help="image + prompt tokens (448x336 image: 299)")
    parser.add_argument("--visual", type=int, default=192)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--tflops", type=float, default=PEAK_TFLOPS["H100 SXM"])
    parser.add_argument("--mfu", type=float, default=0.4)
    a = parser.parse_args()
    print(json.dumps(estimate(a.model, a.prefix, a.visual, a.group, a.tokens, a.tflops, a.mfu), indent=1))
