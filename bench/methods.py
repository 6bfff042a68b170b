"""The three computations the benchmarks compare, over identical prepared groups.

* :func:`kawhi` -- what the service does: ``Engine.run`` (prefix once, responses batched over
  the repeated KV cache, stopped before the final layer, q/k recomputed, alpha, weights).
* :func:`bare` -- the physical floor: the full model forward (vision tower + all decoder
  layers + final norm, SDPA, no capture, no KV cache) over ``[prefix + response]``, one
  sequence at a time. The LM head is excluded (it is an Identity in the adapter); a
  trainer's reference forward would also pay it, so the floor here is the stricter one.
* :func:`naive` -- the obvious way to get an attention-based alpha: the same full forward
  per sequence with ``attn_implementation="eager"`` and ``output_attentions=True``, then
  alpha_t = the last layer's attention probability from response token t to the selected
  visual tokens, averaged over the selected tokens and the chosen heads.

All three take ``PreparedGroup`` objects from ``Engine.prepare`` so pre-processing (image
decode, SGUF, tokenisation) is outside the in-process timings; the HTTP benchmarks (P1,
load) include it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def kawhi(engine: Any, prepared: Sequence[Any]) -> list[Any]:
    results = engine.run(prepared)
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"engine error: {r.error.detail}")
    return results


def _sequence(reference: Any, prompt: Any, response: Sequence[int]) -> dict[str, torch.Tensor]:
    device = reference.device
    ids = torch.cat([prompt.input_ids, torch.as_tensor(list(response), dtype=torch.long)])[None]
    return {
        "input_ids": ids.to(device),
        "pixel_values": prompt.pixel_values.to(device, reference.dtype),
        "image_grid_thw": prompt.image_grid_thw.to(device),
        "mm_token_type_ids": (ids == reference.image_token_id).int().to(device),
    }


@torch.inference_mode()
def bare(reference: Any, prepared: Sequence[Any]) -> int:
    """Full SDPA forward of every [prefix + response]; returns the number of tokens run."""
    tokens = 0
    for group in prepared:
        for response in group.responses:
            inputs = _sequence(reference, group.prompt, response.tokens.token_ids)
            out = reference.model(**inputs, use_cache=False)
            tokens += inputs["input_ids"].shape[1]
            del out
    return tokens


@torch.inference_mode()
def naive(eager_reference: Any, prepared: Sequence[Any]) -> list[list[torch.Tensor]]:
    """Eager forward with output_attentions=True per sequence; alpha from the last layer's map."""
    alphas = []
    for group in prepared:
        prompt = group.prompt
        visual = prompt.visual_positions[torch.as_tensor(group.regions.selected.tolist(), dtype=torch.long)]
        heads = torch.as_tensor(group.heads, dtype=torch.long)
        start = int(prompt.input_ids.numel())
        per_group = []
        for response in group.responses:
            n = len(response.tokens.token_ids)
            inputs = _sequence(eager_reference, prompt, response.tokens.token_ids)
            out = eager_reference.model(**inputs, use_cache=False, output_attentions=True)
            last = out.attentions[-1][0]  # (H, S, S) probabilities of the final layer
            rows = last.index_select(0, heads.to(last.device))[:, start:start + n]
            alpha = rows.index_select(2, visual.to(last.device)).mean(dim=(0, 2))  # (T,)
            per_group.append(alpha.float().cpu())
            del out, last, rows
        alphas.append(per_group)
    return alphas


METHODS = {"kawhi": kawhi, "bare": bare, "naive": naive}
