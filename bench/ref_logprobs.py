"""``python -m bench.ref_logprobs``: what reference log-probs beside the weights cost.

Three computations over the same prepared groups (``bench/workload.py``), interleaved:

* **weights** -- ``Engine.run`` as every request runs it (forward stopped before the final layer);
* **weights+ref** -- ``Engine.run`` with ``return_ref_logprobs`` (+ ``return_entropy`` with
  ``--entropy``): the same forward, then the final layer, final norm and chunked LM head
  on the response positions (``kawhi.models.logprobs``);
* **plain-ref** -- what a trainer's separate reference model does: a full forward of the G
  ``[image + prompt + response]`` sequences of each group as one batch, LM head on the
  response positions only (TRL's ``logits_to_keep``), float32 log-softmax, gather.

Reported: ``weights+ref / weights`` (goal <= 1.15) and ``weights+ref / (weights + plain-ref)``
(goal <= 0.6: one service call instead of the service plus a reference forward), from the
median process CPU seconds of interleaved calls (``cpu_*``: robust on a shared machine)
and from wall-clock medians and minima.

The bench models carry no LM head weights (``bench/models.py`` drops it); a seeded random
``hidden x vocab`` head is attached, ``--vocab`` rows (default: the model's vocabulary; use
151936 for Qwen's, which on the 512-wide bench model makes the head ~26 decoder layers'
worth of FLOPs, far more than on a 7B model where it is ~2.3 layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from typing import Any

import torch

from bench.context import Bench
from bench.measure import compare
from bench.workload import GroupSpec


def attach_lm_head(reference: Any, vocab: int | None, seed: int = 20260327) -> int:
    """Give the reference a random LM head (hidden -> vocab rows); returns the vocabulary size."""
    hidden = reference._final_layer.input_layernorm.weight.numel()
    vocab = vocab or reference.vocab_size
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=generator) * 0.02)
    reference.model.lm_head = head.to(reference.device, reference.dtype).eval()
    return vocab


@torch.inference_mode()
def plain_reference(reference: Any, prepared: list[Any], temperature: float = 1.0) -> list[torch.Tensor]:
    """A trainer's reference forward: per group, the G full sequences as one batch (equal
    lengths in this workload, so no padding), logits of the response positions only."""
    out = []
    device = reference.device
    for group in prepared:
        prompt = group.prompt
        responses = [r.tokens.token_ids for r in group.responses]
        T = len(responses[0])
        ids = torch.stack([torch.cat([prompt.input_ids, torch.as_tensor(r, dtype=torch.long)]) for r in responses])
        G = ids.shape[0]
        logits = reference.model(
            input_ids=ids.to(device), pixel_values=prompt.pixel_values.repeat(G, 1).to(device, reference.dtype),
            image_grid_thw=prompt.image_grid_thw.repeat(G, 1).to(device),
            mm_token_type_ids=(ids == reference.image_token_id).int().to(device), use_cache=False,
            logits_to_keep=T + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        out.append(logp.gather(-1, ids[:, -T:, None].to(device)).squeeze(-1).cpu())
    return out


def cpu_seconds(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median process CPU seconds (all threads) per call, interleaved after one warm-up each.

    On a machine shared with other work, wall time mostly measures the others; the CPU
    time this process spends is what the computation itself costs."""
    import statistics

    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            samples[name].append(time.process_time() - start)
    return {name: round(statistics.median(v), 4) for name, v in samples.items()}


def _load() -> float | None:
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ref_logprobs", description=__doc__.split("\n\n")[0])
    from bench.real_shapes import SHAPES

    parser.add_argument("--model", default="bench", choices=["demo", "bench", "qwen7b", *SHAPES])
    parser.add_argument("--layers", type=int, default=None, help="real shapes: decoder layers kept")
    parser.add_argument("--vision-depth", type=int, default=None, help="real shapes: vision blocks kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="LM head rows (default: the model's vocabulary)")
    parser.add_argument("--entropy", action="store_true", help="also return the entropy")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args(argv)

    bench = Bench(args.model, device=args.device, threads=args.threads, layers=args.layers,
                  vision_depth=args.vision_depth)
    vocab = attach_lm_head(bench.reference, args.vocab)
    spec = GroupSpec(response_tokens=args.response_tokens, group_size=args.group_size)
    groups = bench.groups(spec, args.groups)
    prepared = bench.prepare(groups)
    asked = {"return_ref_logprobs": True, "return_entropy": args.entropy}
    with_ref = [dataclasses.replace(p, config=bench.engine.resolve_options(asked)) for p in prepared]

    # the numbers agree with the plain reference before anything is timed
    service = [[torch.tensor(r.ref_logprobs) for r in g.responses] for g in bench.engine.run(with_ref)]
    plain = plain_reference(bench.reference, prepared)
    worst = max(float((s - p[i]).abs().max()) for g, p in zip(service, plain) for i, s in enumerate(g))

    started = time.time()
    fns = {
        "weights": lambda: bench.engine.run(prepared),
        "weights+ref": lambda: bench.engine.run(with_ref),
        "plain-ref": lambda: plain_reference(bench.reference, prepared),
    }
    cpu = cpu_seconds(fns, args.repeats) if args.device == "cpu" else None
    timings = compare(fns, args.repeats, device=args.device)
    t = {name: s["median_s"] for name, s in timings.items()}
    fastest = {name: s["min_s"] for name, s in timings.items()}  # least disturbed by other load
    result = {
        "model": args.model, "vocab": vocab, "device": args.device, "threads": bench.threads,
        "workload": {**spec.to_dict(), "groups": args.groups,
                     "prefix_tokens": int(prepared[0].prompt.input_ids.numel())},
        "entropy": args.entropy, "repeats": args.repeats, "max_abs_diff_vs_plain": worst,
        "median_s": t,
        "ref_over_weights": round(t["weights+ref"] / t["weights"], 4),
        "ref_over_weights_plus_plain_ref": round(t["weights+ref"] / (t["weights"] + t["plain-ref"]), 4),
        "cpu_median_s": cpu,
        "cpu_ref_over_weights": None if cpu is None else round(cpu["weights+ref"] / cpu["weights"], 4),
        "cpu_ref_over_weights_plus_plain_ref": None if cpu is None else round(
            cpu["weights+ref"] / (cpu["weights"] + cpu["plain-ref"]), 4),
        "min_s": fastest,
        "min_ref_over_weights": round(fastest["weights+ref"] / fastest["weights"], 4),
        "min_ref_over_weights_plus_plain_ref": round(
            fastest["weights+ref"] / (fastest["weights"] + fastest["plain-ref"]), 4),
        "goals": {"ref_over_weights": 1.15, "ref_over_weights_plus_plain_ref": 0.6},
        "load_average_start": _load(),
        "seconds": round(time.time() - started, 1),
        "load_average_end": _load(),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "command": "python -m bench.ref_logprobs " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timings": timings,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    summary = {k: v for k, v in result.items() if k != "timings"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
