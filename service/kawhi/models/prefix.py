"""The image + prompt prefix of a group: its states, a cache of them across requests,
the packing of response rows into forwards, and split attention over a shared prefix.

A group's prefix (vision tower + prompt through layers 0..L-2) is the same for all
its responses, and for every request that carries the same image and prompt. So:

* :class:`PrefixState` holds what the responses need from it: the keys and values of
  layers 0..L-2, the states entering the final layer at the visual tokens, the rotary
  position the responses start at, and its length;
* :class:`PrefixCache` keeps them by content (:func:`prefix_key`: model, image sha256,
  prefix token ids) in a byte-bounded LRU on the model's device; a caller asking for a
  prefix another thread is computing waits for it instead of computing it again;
* :func:`split_attention` is the attention the responses run with when they continue a
  prefix: attention over the whole prefix (no mask; the query heads of a KV head and all
  rows of that prefix packed into one call against the ONE stored copy of its keys) plus
  causal attention over the responses' own tokens, merged exactly by their log-sum-exps.
  The prefix's keys are never repeated per response, and no mask is built.
"""

from __future__ import annotations

import contextvars
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# the name under which split attention is registered with transformers (LM layers only)
SPLIT_ATTENTION = "kawhi_split_sdpa"


@dataclass
class LayerInputs:
    """Hidden states entering the final decoder layer, with their rotary tables.

    hidden: (N, D); cos, sin: (N, head_dim), in the model's dtype.
    """

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class PrefixState:
    """A group's prefix after its forward. Never mutated once built (the cache shares it).

    keys, values: one (1, H_kv, P, head_dim) tensor per layer 0..L-2. visual: the final
    layer's inputs at the N visual tokens. next_position: the rotary position of the
    first response token. length: P. states: the final layer's inputs at all P
    positions, for a caller that finishes the final layer (reference log-probs).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    visual: LayerInputs
    next_position: int
    length: int
    states: LayerInputs | None = None

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.visual.hidden, self.visual.cos, self.visual.sin]
        if self.states is not None:
            tensors += [self.states.hidden, self.states.cos, self.states.sin]
        return sum(t.numel() * t.element_size() for t in tensors)


def prefix_key(model: str, image_sha256: str, input_ids: torch.Tensor) -> str:
    """Content key of a prefix: the model, the image's sha256 and the prefix token ids
    (which also fix the image's token grid)."""
    ids = input_ids.to(torch.int64).cpu().numpy().tobytes()
    return f"prefix:v1:{model}:{image_sha256}:{hashlib.sha256(ids).hexdigest()}"


class _Flight:
    """One computation in progress; waiters take its state when ``done`` is set (None if it failed)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.state: PrefixState | None = None


class PrefixCache:
    """Byte-bounded LRU of PrefixStates with coalesced computation. Thread-safe.

    ``max_bytes`` = 0 keeps nothing across calls; callers that ask for a key while it is
    being computed still share that one computation. A state larger than ``max_bytes``
    is returned but not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixState] = OrderedDict()
        self._computing: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.coalesced = 0

    def get_or_compute(self, key: str, compute: Callable[[], PrefixState]) -> PrefixState:
        """The state under ``key``: kept, being computed by another thread (waits for it),
        or computed now by ``compute()`` and kept if it fits."""
        while True:
            with self._lock:
                state = self._entries.get(key)
                if state is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return state
                flight = self._computing.get(key)
                if flight is None:
                    self.misses += 1
                    flight = self._computing[key] = _Flight()
                    break
                self.coalesced += 1
            flight.done.wait()
            if flight.state is not None:
                return flight.state
            # that computation failed: try again (maybe computing it ourselves)
        try:
            flight.state = compute()
            self._put(key, flight.state)
            return flight.state
        finally:
            with self._lock:
                self._computing.pop(key, None)
            flight.done.set()

    def _put(self, key: str, state: PrefixState) -> None:
        size = state.nbytes
        with self._lock:
            if size > self.max_bytes:
                return
            while self._entries and self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = state
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "coalesced": self.coalesced, "bytes": self.bytes, "entries": len(self._entries),
                    "max_bytes": self.max_bytes}


def shared_prefixes(prompts: Sequence[Any], compute: Callable[[Any], PrefixState],
                    cache: PrefixCache | None = None) -> list[PrefixState]:
    """One state per prompt (``compute(prompt)``); prompts with equal ``cache_key`` share one,
    from ``cache`` when given; a prompt without a key gets its own."""
    shared: dict[str, PrefixState] = {}
    out = []
    for prompt in prompts:
        key = prompt.cache_key
        if key is None:
            out.append(compute(prompt))
            continue
        if key not in shared:
            shared[key] = cache.get_or_compute(key, lambda prompt=prompt: compute(prompt)) if cache is not None else compute(prompt)
        out.append(shared[key])
    return out


# ---------------------------------------------------------------------- row packing

Row = tuple[int, int, list[int]]  # (group index, response index, token ids)


def pack_rows(groups: Sequence[tuple[Any, Sequence[Sequence[int]]]], max_tokens: int, merge_groups: bool,
              max_padding: float, prefix_of: Sequence[Any] | None = None) -> list[list[Row]]:
    """Response rows packed into forward batches, longest first within a group.

    Groups that continue the same prefix (equal ``prefix_of[g]``, e.g. one group sent as
    several requests) are packed as one group. Other groups share a batch only with
    ``merge_groups``, while it holds at most ``max_tokens`` padded tokens and at most
    ``max_padding`` times its real tokens; a group larger than ``max_tokens`` is split.
    """

    def padded(rows: list[Row]) -> int:
        return len(rows) * max(len(tokens) for _, _, tokens in rows)

    def real(rows: list[Row]) -> int:
        return sum(len(tokens) for _, _, tokens in rows)

    clusters: dict[Any, list[Row]] = {}
    for g, (_, responses) in enumerate(groups):
        rows = clusters.setdefault(prefix_of[g] if prefix_of is not None else ("group", g), [])
        rows.extend((g, r, list(ids)) for r, ids in enumerate(responses) if len(ids))
    batches: list[list[Row]] = []
    current: list[Row] = []
    for rows in clusters.values():
        rows = sorted(rows, key=lambda row: -len(row[2]))
        if not rows:
            continue
        joined = current + rows
        if current and not (merge_groups and padded(joined) <= max_tokens and padded(joined) <= max_padding * real(joined)):
            batches.append(current)
            current = []
        for row in rows:
            if current and padded(current + [row]) > max_tokens:
                batches.append(current)
                current = []
            current.append(row)
    if current:
        batches.append(current)
    return batches


def padded_prefix_cache(rows: list[Row], prefixes: list[PrefixState], longest: int, text_config: Any,
                        device: Any) -> tuple[Any, torch.Tensor | None]:
    """The copying alternative to split attention: a KV cache with one copy of its prefix
    per row, right-padded to the longest prefix P, and the (rows, P + longest) mask hiding
    that padding (None when all prefixes are as long)."""
    from transformers import DynamicCache

    prefix_len = max(prefixes[g].length for g, _, _ in rows)
    cache = DynamicCache(config=text_config)
    for layer in range(len(prefixes[rows[0][0]].keys)):
        keys, values = [], []
        for g, _, _ in rows:
            pad = prefix_len - prefixes[g].length
            keys.append(torch.nn.functional.pad(prefixes[g].keys[layer][0], (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(prefixes[g].values[layer][0], (0, 0, 0, pad)))
        cache.update(torch.stack(keys), torch.stack(values), layer)
    mask = None
    if any(prefixes[g].length != prefix_len for g, _, _ in rows):
        mask = torch.ones((len(rows), prefix_len + longest), dtype=torch.long, device=device)
        for i, (g, _, _) in enumerate(rows):
            mask[i, prefixes[g].length : prefix_len] = 0
    return cache, mask


# ---------------------------------------------------------------------- split attention


@dataclass
class SplitPlan:
    """Which rows of the forward continue which prefix: (first row, end row, state),
    contiguous and covering the batch."""

    segments: list[tuple[int, int, PrefixState]]

    @classmethod
    def of(cls, rows: Sequence[Row], prefixes: Sequence[PrefixState]) -> SplitPlan:
        """Runs of consecutive rows continuing the same prefix (rows: (group, response, ids))."""
        segments: list[list[Any]] = []
        for i, (g, _, _) in enumerate(rows):
            if segments and segments[-1][2] is prefixes[g]:
                segments[-1][1] = i + 1
            else:
                segments.append([i, i + 1, prefixes[g]])
        return cls([(a, b, p) for a, b, p in segments])


_PLAN: contextvars.ContextVar[SplitPlan | None] = contextvars.ContextVar("kawhi_split_plan", default=None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp. q: (B, H, T, d); k, v: (B, H, S, d) ->
    out (B, H, T, d) in q's dtype, lse (B, H, T) float32. causal: top-left aligned."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    if q.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                              scale=scale)
        return out, lse[..., : q.shape[2]].float()
    return reference_attention_with_lse(q, k, v, causal, scale)


def reference_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse in plain float32 matmuls (other devices; the tests' reference)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def split_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function of the LM layers (registered as SPLIT_ATTENTION).

    Outside a continuation forward it IS transformers' SDPA attention. Inside one
    (:func:`continuation_plan` active), ``key``/``value`` are the response tokens' own
    (B, H_kv, T, d) (no cache is passed), and each row also attends to the whole of its
    prefix, read from the plan: exactly the causal attention over [prefix + response].
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = _PLAN.get()
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    B, H, T, d = query.shape
    hkv = key.shape[1]
    n_rep = H // hkv
    scale = scaling if scaling is not None else d ** -0.5
    out_s, lse_s = attention_with_lse(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), True, scale)
    out_p = torch.empty_like(out_s)
    lse_p = torch.empty_like(lse_s)
    layer = module.layer_idx
    for start, end, state in plan.segments:
        n = end - start
        # (n, H, T, d) -> (1, H_kv, n_rep * n * T, d): every query of this prefix in one call
        q = query[start:end].reshape(n, hkv, n_rep, T, d).permute(1, 2, 0, 3, 4).reshape(1, hkv, n_rep * n * T, d)
        out, lse = attention_with_lse(q, state.keys[layer], state.values[layer], False, scale)
        out_p[start:end] = out.reshape(hkv, n_rep, n, T, d).permute(2, 0, 1, 3, 4).reshape(n, H, T, d)
        lse_p[start:end] = lse.reshape(hkv, n_rep, n, T).permute(2, 0, 1, 3).reshape(n, H, T)
    m = torch.maximum(lse_p, lse_s)
    w_p = (lse_p - m).exp_().unsqueeze(-1)
    w_s = (lse_s - m).exp_().unsqueeze(-1)
    out = (out_p.float() * w_p + out_s.float() * w_s) / (w_p + w_s)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


class continuation_plan:
    """Context manager: the LM layers' attention continues the plan's prefixes."""

    def __init__(self, plan: SplitPlan) -> None:
        self.plan = plan

    def __enter__(self) -> SplitPlan:
        self._token = _PLAN.set(self.plan)
        return self.plan

    def __exit__(self, *exc: Any) -> None:
        _PLAN.reset(self._token)


_REGISTERED = False


def enable_split_attention(model: Any) -> bool:
    """Make split attention the LM layers' attention of a transformers Qwen-VL model whose LM
    runs SDPA (it is plain SDPA outside a continuation). False when the LM runs something
    else (eager, flash-attention): the copying path is used then."""
    text_config = model.config.get_text_config()
    if text_config._attn_implementation == SPLIT_ATTENTION:
        return True
    if text_config._attn_implementation != "sdpa":
        return False
    register_split_attention()
    model.set_attn_implementation({"text_config": SPLIT_ATTENTION})
    return True


def register_split_attention() -> None:
    """Make SPLIT_ATTENTION a transformers attention implementation (SDPA's masks). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(SPLIT_ATTENTION, split_attention)
    AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)
    _REGISTERED = True
