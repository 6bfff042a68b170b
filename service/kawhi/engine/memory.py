"""The service's memory model: bytes = weights + per-token activations + per-token outputs + caches.

What one reweight forward holds at its peak, for a reference model of a given shape:

* **weights** -- every parameter once (tied embeddings once), in the model's dtype;
* **activations** -- one decoder layer's working set over the padded response tokens of a
  batch (``max_forward_tokens`` at most): ``ACTIVATION_WIDTHS`` x (D + I) elements of the
  model dtype per token (hidden, q/k/v, gate/up/act of the MLP; layers run one after
  another, so this does not grow with the depth; the coefficient is fitted to peaks
  measured by ``python -m bench.shapes``, docs/memory.md);
* **outputs** -- per response token, what is kept until the group is scored: the final
  layer's inputs (hidden + rotary cos/sin: D + 2 hd elements), the final layer's float32
  query (H x hd), and with reference log-probs the final layer's output (D) and two
  float32 numbers;
* **caches** -- the group's prefix: keys and values of layers 0..L-2 over its P tokens
  (2 x H_kv x hd each) plus the final layer's inputs at all P positions, the float32
  keys of its N visual tokens; the prefix cache's byte budget kept across requests; and
  with log-probs the LM head's logits chunk (``chunk_elements`` float32 values, about 3
  live copies in the log-softmax) whatever the vocabulary size;
* **runtime** -- a fitted constant (the interpreter and libraries on a CPU; the CUDA context
  and allocator slack on a GPU is taken as ``GPU_RUNTIME_BYTES``).

``batch_token_budget`` inverts it: the most padded response tokens one forward may hold on
a device of a given memory. ``Engine.info`` shows both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# fitted by `python -m bench.memory_fit` to bench/recorded/shapes-quick.json (docs/memory.md):
# elements of (D + I) per padded response token, and the CPU server process's own bytes
ACTIVATION_WIDTHS = 2.8
CPU_RUNTIME_BYTES = 870 * 2**20
# CUDA context + allocator fragmentation allowance on a GPU (not measured here: no GPU)
GPU_RUNTIME_BYTES = 3 * 2**30
LOGITS_LIVE_COPIES = 3
GIB = 2**30
# devices the budget is shown for (bytes of device memory, as the vendors state them)
KNOWN_DEVICES = {"H100 80GB": 80 * 10**9, "H200 141GB": 141 * 10**9, "L4 24GB": 24 * 10**9}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a reference model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weights_bytes: int
    dtype_bytes: int

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        """From a transformers Qwen-VL model (parameters counted once each)."""
        text = model.config.get_text_config()
        params = {id(p): p for p in model.parameters()}.values()
        first = next(iter(params))
        return cls(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                   heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                   vocab=text.vocab_size, weights_bytes=sum(p.numel() * p.element_size() for p in params),
                   dtype_bytes=first.element_size())


def estimate(shape: ModelShape, *, prefix_tokens: int, visual_tokens: int, response_tokens: list[int],
             logprobs: bool = False, max_forward_tokens: int = 16384, prefix_cache_bytes: int = 0,
             chunk_elements: int = 1 << 25, runtime_bytes: int = CPU_RUNTIME_BYTES,
             activation_widths: float = ACTIVATION_WIDTHS) -> dict[str, int]:
    """Peak bytes of one group's reweight forward, by part, and their ``total``.

    response_tokens: the G response lengths. The responses run in batches of at most
    ``max_forward_tokens`` padded tokens (the longest response x the rows of a batch).
    """
    s, b = shape, shape.dtype_bytes
    longest = max(response_tokens, default=0)
    rows_per_batch = max(1, max_forward_tokens // max(1, longest))
    batch_tokens = min(len(response_tokens), rows_per_batch) * longest
    total_tokens = sum(response_tokens)
    activations = int(activation_widths * (s.hidden + s.intermediate) * b * max(batch_tokens, prefix_tokens))
    per_output = (s.hidden + 2 * s.head_dim) * b + s.heads * s.head_dim * 4
    if logprobs:
        per_output += s.hidden * b + 8
    outputs = total_tokens * per_output
    prefix = (s.layers - 1) * prefix_tokens * 2 * s.kv_heads * s.head_dim * b
    prefix += prefix_tokens * (s.hidden + 2 * s.head_dim) * b + visual_tokens * s.kv_heads * s.head_dim * 4
    logits = LOGITS_LIVE_COPIES * min(chunk_elements, max(1, total_tokens) * s.vocab) * 4 if logprobs else 0
    parts = {"weights": s.weights_bytes, "activations": activations, "outputs": outputs,
             "caches": prefix + prefix_cache_bytes + logits, "runtime": int(runtime_bytes)}
    parts["total"] = sum(parts.values())
    return parts


def batch_token_budget(shape: ModelShape, device_bytes: int, *, prefix_tokens: int = 1024,
                       visual_tokens: int = 1024, response_tokens: int = 1024, logprobs: bool = True,
                       prefix_cache_bytes: int = 0, runtime_bytes: int = GPU_RUNTIME_BYTES,
                       headroom: float = 0.1) -> int:
    """The most padded response tokens one forward may hold so that a group of responses of
    ``response_tokens`` tokens, its prefix and the kept outputs fit in ``(1 - headroom)``
    of ``device_bytes``. 0 when the weights alone do not fit."""
    usable = int(device_bytes * (1 - headroom))

    def fits(tokens: int) -> bool:
        group = max(1, tokens // response_tokens)
        return estimate(shape, prefix_tokens=prefix_tokens, visual_tokens=visual_tokens,
                        response_tokens=[response_tokens] * group, logprobs=logprobs, max_forward_tokens=tokens,
                        prefix_cache_bytes=prefix_cache_bytes, runtime_bytes=runtime_bytes)["total"] <= usable

    if not fits(response_tokens):
        return 0
    low, high = response_tokens, response_tokens
    while fits(high * 2) and high < 1 << 24:
        high *= 2
    high *= 2
    while high - low > response_tokens:  # bisect in whole responses
        mid = (low + high) // 2 // response_tokens * response_tokens
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def summary(shape: ModelShape, *, prefix_cache_bytes: int = 0, max_forward_tokens: int = 16384) -> dict[str, Any]:
    """What ``kawhi info`` shows: the shape, the per-token costs and the budget per known GPU
    (for the model in bfloat16, what ``--dtype auto`` loads on those GPUs)."""
    b = shape.dtype_bytes
    on_gpu = replace(shape, weights_bytes=shape.weights_bytes * 2 // b, dtype_bytes=2)
    return {
        "shape": asdict(shape),
        "per_token_bytes": {
            "activations": int(ACTIVATION_WIDTHS * (shape.hidden + shape.intermediate) * b),
            "outputs": (shape.hidden + 2 * shape.head_dim) * b + shape.heads * shape.head_dim * 4,
            "outputs_with_logprobs": (2 * shape.hidden + 2 * shape.head_dim) * b + shape.heads * shape.head_dim * 4 + 8,
            "prefix_cache": (shape.layers - 1) * 2 * shape.kv_heads * shape.head_dim * b
            + (shape.hidden + 2 * shape.head_dim) * b,
        },
        "max_forward_tokens": max_forward_tokens,
        "batch_token_budget": {name: batch_token_budget(on_gpu, size, prefix_cache_bytes=prefix_cache_bytes)
                               for name, size in KNOWN_DEVICES.items()},
        "weights_bytes_bf16": on_gpu.weights_bytes,
        "budget_assumes": "bfloat16 weights, groups of 1,024-token responses, a 1,024-token prefix, reference log-probs, "
                          f"{GPU_RUNTIME_BYTES // GIB} GiB CUDA runtime, 10 % headroom (docs/memory.md)",
    }


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """glibc only: allocations >= ``threshold`` bytes get their own mapping, unmapped on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which the
    chunked LM head's 16-128 MiB logits chunks come from the heap, and a small live object
    above them keeps the freed chunks resident: on CPU the log-prob path's resident set then
    grows by about one chunk per chunk, back to the [tokens x vocab] size the chunking avoids
    (measured: 1.1 GiB instead of 50 MiB, tests/engine/test_logprobs_vocab_memory.py). A fixed
    threshold turns that dynamic adjustment off. Returns whether it was set.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
