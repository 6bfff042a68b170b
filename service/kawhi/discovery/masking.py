"""Switch attention heads off for a forward, without touching the attention kernel.

A head's contribution to a decoder layer is its slice of the attention output before
the output projection (``o_proj``): zeroing that slice removes the head and nothing
else. A forward pre-hook on every layer's ``o_proj`` does it, so the attention itself
keeps running on the model's own implementation (SDPA) and no attention matrix is
ever built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def decoder_layers(reference: Any) -> Sequence[Any]:
    """The language model's decoder layers of a QwenVLReference."""
    return reference.model.model.language_model.layers


@contextmanager
def masked_heads(reference: Any, heads: Sequence[int]) -> Iterator[None]:
    """Within the block, query heads ``heads`` output zero in every decoder layer."""
    with masked_heads_per_row(reference, [heads]):
        yield


@contextmanager
def masked_heads_per_row(reference: Any, rows: Sequence[Sequence[int]]) -> Iterator[None]:
    """Within the block, batch row b has query heads ``rows[b]`` zeroed in every decoder layer
    (one forward scores several masks). A single row applies to any batch size."""
    if not any(len(heads) for heads in rows):
        yield
        return
    for heads in rows:
        bad = [h for h in heads if not 0 <= int(h) < reference.num_heads]
        if bad:
            raise ValueError(f"heads {bad} out of range: the model has {reference.num_heads} heads")
    handles = []
    try:
        for layer in decoder_layers(reference):
            o_proj = layer.self_attn.o_proj
            width = o_proj.in_features
            head_dim = width // reference.num_heads
            keep = torch.ones(len(rows), 1, width, dtype=o_proj.weight.dtype, device=o_proj.weight.device)
            for b, heads in enumerate(rows):
                for h in heads:
                    keep[b, :, int(h) * head_dim : (int(h) + 1) * head_dim] = 0

            def zero_heads(_module: Any, args: tuple, _keep: torch.Tensor = keep) -> tuple:
                return (args[0] * _keep, *args[1:])

            handles.append(o_proj.register_forward_pre_hook(zero_heads))
        yield
    finally:
        for handle in handles:
            handle.remove()
