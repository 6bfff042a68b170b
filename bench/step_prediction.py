"""``python -m bench.step_prediction``: a paper-scale reweight step on a GPU, predicted (no GPU run).

One RL step of the paper's scale: 512 prompts x 5 responses, a 1,024-token image + prompt
prefix and 1,024-token responses. Per shape and GPU:

* **FLOPs** of the service's forward (``bench.flops.kawhi_flops``: vision tower + L-1 layers over
  each prefix once, L-1 layers over the responses, final q/k) and with reference log-probs
  (+ the final layer and the LM head over every response token);
* **time** = FLOPs / (dense bf16 peak x matmul efficiency x forward fraction), where the
  forward fraction is the forward's FLOP rate over a same-shape matmul measured on this CPU
  (``python -m bench.mfu --profile``) and the matmul efficiency is what a large bf16 GEMM
  reaches of the data-sheet peak (``--matmul-efficiency``, 0.7 by default: an assumption to
  be replaced by the first GPU run's ``bench.mfu`` numbers);
* **memory**: weights, the batch token budget (``kawhi.engine.memory.batch_token_budget``)
  and the forwards a step needs at that budget.

    python -m bench.step_prediction --forward-fraction 0.8
"""

from __future__ import annotations

import argparse
import json
import math
import sys

GPUS = {"H100 80GB": (989.4, 80 * 10**9), "H200 141GB": (989.4, 141 * 10**9), "L4 24GB": (121.0, 24 * 10**9)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_prediction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--visual", type=int, default=1024 - 64)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--forward-fraction", type=float, required=True,
                        help="forward FLOP rate / same-shape matmul rate (bench.mfu on this machine)")
    parser.add_argument("--matmul-efficiency", type=float, default=0.7)
    args = parser.parse_args(argv)

    from kawhi.engine.memory import ModelShape, batch_token_budget
    from kawhi.models.qwen_tokenizer import build_qwen2_vl_tokenizer

    from bench.flops import kawhi_flops
    from bench.real_shapes import SHAPES, build_config, parameter_count

    tokenizer = build_qwen2_vl_tokenizer()
    rows = []
    for shape in SHAPES:
        config = build_config(shape, tokenizer)
        text = config.get_text_config()
        params = parameter_count(shape)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        model_shape = ModelShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                                 text.num_attention_heads, text.num_key_value_heads, head_dim, text.vocab_size,
                                 params["total"] * 2, 2)
        per_group = kawhi_flops(config, args.prefix, args.visual, [args.tokens] * args.group)
        layer = (2 * text.hidden_size * (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
                 + 2 * text.num_attention_heads * head_dim * text.hidden_size + 6 * text.hidden_size
                 * text.intermediate_size)
        ref_extra = args.group * args.tokens * (layer + 2 * text.hidden_size * text.vocab_size)
        for gpu, (tflops, memory) in GPUS.items():
            rate = tflops * 1e12 * args.matmul_efficiency * args.forward_fraction
            budget = batch_token_budget(model_shape, memory, prefix_tokens=args.prefix, visual_tokens=args.visual,
                                        response_tokens=args.tokens)
            responses = args.prompts * args.group
            rows.append({
                "shape": shape, "gpu": gpu, "weights_gib": round(params["total"] * 2 / 2**30, 2),
                "step_tflop": round(args.prompts * per_group / 1e12, 1),
                "step_tflop_with_ref": round(args.prompts * (per_group + ref_extra) / 1e12, 1),
                "predicted_s": round(args.prompts * per_group / rate, 1),
                "predicted_s_with_ref": round(args.prompts * (per_group + ref_extra) / rate, 1),
                "batch_token_budget": budget,
                "forwards_per_step": math.ceil(responses * args.tokens / budget) if budget else None,
            })
    print(json.dumps({"assumptions": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
