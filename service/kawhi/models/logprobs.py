"""Reference log-probs and entropy of response tokens, finished from the captured states.

The alignment forward (kawhi.models.qwen) stops before the final decoder layer and keeps
what enters it: the hidden states and rotary tables of the whole image + prompt prefix
and of every response. When a request asks for log-probs, this module finishes the
model on exactly the positions that predict response tokens, with the model's own
modules:

* the final layer's keys and values over the prefix but its last position come from
  the layer's own input norm, k/v projections (k norm on Qwen3-VL) and rotary
  embedding; the final decoder layer itself then runs on the last prefix position
  (whose output predicts the first response token) with those as its cache;
* the G responses of the group run through the final decoder layer as one batch over
  that (now complete) prefix cache, each on its tokens but the last (token t's output
  predicts token t + 1), with an explicit causal mask;
* the final norm, then the LM head in row chunks (memory bounded by ``chunk_elements``
  logits at a time, whatever the vocabulary), logits / temperature and the log-softmax
  in float32.

Nothing here runs unless asked; the alignment path is unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kawhi.models.qwen import GroupStates, LayerInputs, QwenVLReference

__all__ = ["TokenLogprobs", "has_lm_head", "response_logprobs", "logprobs_from_logits"]

# logits held at once by the chunked LM head: 2^25 float32 = 128 MiB (~220 rows at 151k)
DEFAULT_CHUNK_ELEMENTS = 1 << 25


@dataclass
class TokenLogprobs:
    """Per response token: log p_ref(y_t | image, prompt, y_<t) and the entropy of that
    next-token distribution, both (T,) float32 and both at ``temperature``."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


def has_lm_head(reference: QwenVLReference) -> bool:
    """Whether the loaded model kept its LM head (log-probs need it)."""
    head = getattr(reference.model, "lm_head", None)
    return isinstance(head, torch.nn.Linear)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] and the entropy of that softmax, in float32.

    logits: (N, V) any float dtype; targets: (N,) int64. Returns (N,), (N,) or None.
    """
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    chosen = scaled.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        # H = lse - sum p * logit: one pass, no (N, V) log-prob tensor kept
        entropy = lse - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)
    return chosen, entropy


class _Finisher:
    """The final layer, final norm and LM head of one reference, applied to captured states."""

    def __init__(self, reference: QwenVLReference, temperature: float, with_entropy: bool,
                 chunk_elements: int) -> None:
        self.ref = reference
        self.layer = reference._final_layer
        self.norm = reference._base.language_model.norm
        self.head = reference.model.lm_head
        self.temperature = temperature
        self.with_entropy = with_entropy
        params = inspect.signature(self.layer.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        vocab = self.head.out_features
        self.chunk_rows = max(1, chunk_elements // vocab)

    def key_values(self, states: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The final layer's (keys after RoPE, values) for ``states``: (1, H_kv, N, d) each."""
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(states.hidden[None])
        shape = (1, x.shape[1], -1, self.ref.head_dim)
        keys = attn.k_proj(x).view(shape)
        if getattr(attn, "k_norm", None) is not None:
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        keys, _ = self.ref._apply_rope(keys, keys, states.cos[None], states.sin[None])
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        return keys, values

    def run_layer(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, query_lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, Any]:
        """The final decoder layer on ``hidden`` (B, Q, D) continuing a cache of (B, H_kv, K, d).

        Query i of a row sees all K cached positions and its own row's queries <= i
        (right padding past ``query_lengths`` is never seen by a real query). Returns the
        layer's output (B, Q, D) and the cache, now holding K + Q positions.
        """
        from transformers import DynamicCache

        batch, queries = hidden.shape[:2]
        known = keys.shape[2]
        cache = DynamicCache(config=self.ref.model.config.get_text_config())
        cache.update(keys, values, self.layer.self_attn.layer_idx)
        mask = None
        if queries > 1:
            allowed = torch.ones(queries, known + queries, dtype=torch.bool, device=hidden.device)
            allowed[:, known:] = torch.ones(queries, queries, dtype=torch.bool, device=hidden.device).tril()
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
            mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
            mask = mask[None, None].expand(batch, 1, -1, -1)
        out = self.layer(hidden_states=hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True,
                         **{self.cache_kwarg: cache})
        out = out[0] if isinstance(out, tuple) else out
        return out, cache

    def score(self, hidden: torch.Tensor, targets: torch.Tensor) -> TokenLogprobs:
        """Final norm + chunked LM head: hidden (N, D) -> log-probs / entropy of targets (N,)."""
        logprobs, entropies = [], []
        for start in range(0, hidden.shape[0], self.chunk_rows):
            logits = self.head(self.norm(hidden[start : start + self.chunk_rows]))
            chosen, entropy = logprobs_from_logits(logits, targets[start : start + self.chunk_rows],
                                                   self.temperature, self.with_entropy)
            logprobs.append(chosen)
            if entropy is not None:
                entropies.append(entropy)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        lp = torch.cat(logprobs) if logprobs else empty
        ent = torch.cat(entropies) if entropies else torch.zeros_like(lp)
        return TokenLogprobs(lp, ent)


@torch.inference_mode()
def response_logprobs(
    reference: QwenVLReference,
    states: GroupStates,
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    max_batch_tokens: int = 16384,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[TokenLogprobs]:
    """Reference log-probs (and entropy) of each response's tokens, from one group's states.

    states: :meth:`QwenVLReference.final_layer_inputs` output (it must hold the prefix's
    states: ``states.prefix``). responses: the G token-id lists those states were run
    on. temperature: logits are divided by it before the softmax (as trainers do with
    their sampling temperature). max_batch_tokens bounds the padded response tokens per
    final-layer batch. Returns, per response, (T_g,) float32 tensors on the CPU.
    """
    if states.prefix is None:
        raise ValueError("these states were captured without the prefix's final-layer inputs")
    if not has_lm_head(reference):
        raise ValueError("the reference model was loaded without its LM head")
    finisher = _Finisher(reference, temperature, with_entropy, chunk_elements)
    prefix = states.prefix
    device = prefix.hidden.device
    # the prefix: cache of all positions but the last, then the layer on the last one
    head = LayerInputs(prefix.hidden[:-1], prefix.cos[:-1], prefix.sin[:-1])
    keys, values = finisher.key_values(head)
    last, cache = finisher.run_layer(prefix.hidden[None, -1:], prefix.cos[None, -1:], prefix.sin[None, -1:], keys,
                                     values)
    layer_idx = finisher.layer.self_attn.layer_idx
    prefix_keys, prefix_values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    first_hidden = last[0, -1]  # (D,): predicts every response's first token

    # the responses, batched: inputs are tokens 0..T-2 (token T-1 predicts nothing asked for)
    rows = sorted((r for r, ids in enumerate(responses) if len(ids) > 1), key=lambda r: -len(responses[r]))
    finals: dict[int, torch.Tensor] = {}
    batch: list[int] = []

    def flush() -> None:
        longest = len(responses[batch[0]]) - 1
        hidden = prefix.hidden.new_zeros(len(batch), longest, prefix.hidden.shape[-1])
        cos = prefix.cos.new_zeros(len(batch), longest, prefix.cos.shape[-1])
        sin = prefix.sin.new_zeros(len(batch), longest, prefix.sin.shape[-1])
        for i, r in enumerate(batch):
            n = len(responses[r]) - 1
            s = states.responses[r]
            hidden[i, :n], cos[i, :n], sin[i, :n] = s.hidden[:n], s.cos[:n], s.sin[:n]
        expand = (len(batch), -1, -1, -1)
        out, _ = finisher.run_layer(hidden, cos, sin, prefix_keys.expand(expand), prefix_values.expand(expand))
        for i, r in enumerate(batch):
            finals[r] = out[i, : len(responses[r]) - 1]
        batch.clear()

    for r in rows:
        if batch and (len(batch) + 1) * (len(responses[batch[0]]) - 1) > max_batch_tokens:
            flush()
        batch.append(r)
    if batch:
        flush()

    # every predicting position of the group through the LM head together (in row chunks)
    pieces = []
    for r, ids in enumerate(responses):
        if len(ids):
            pieces.append(first_hidden[None] if r not in finals else torch.cat([first_hidden[None], finals.pop(r)]))
    lengths = [len(ids) for ids in responses]
    targets = torch.as_tensor([t for ids in responses for t in ids], dtype=torch.long, device=device)
    if pieces:
        scored = finisher.score(torch.cat(pieces), targets)
        logprobs, entropy = scored.logprobs.cpu(), scored.entropy.cpu()
    else:
        logprobs = entropy = torch.zeros(0, dtype=torch.float32)
    return [TokenLogprobs(lp, ent) for lp, ent in zip(logprobs.split(lengths), entropy.split(lengths))]
