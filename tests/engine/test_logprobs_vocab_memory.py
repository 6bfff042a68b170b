"""The log-prob path at Qwen's real 151,936-token vocabulary never holds [tokens x vocab] logits.

A tiny model with the real Qwen vocabulary (embedding and LM head of 151,936 rows) scores
2 responses x 1,024 tokens: all their logits at once would be 2,048 x 151,936 x 4 B =
1.16 GiB. The process's resident-set high-water mark (``/proc/self/clear_refs`` reset,
``VmHWM`` read) over ``response_logprobs`` must stay under a bound derived from the chunk
size; a control arm that does materialise the logits must exceed it, so the measurement
can fail. The memory model (kawhi.engine.memory) counts the same chunk.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from kawhi.engine.memory import LOGITS_LIVE_COPIES, return_freed_memory_to_os
from kawhi.models.logprobs import logprobs_from_logits, response_logprobs
from tiny_models import tiny_reference

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self (Linux)")

TOKENS, GROUP = 1024, 2
CHUNK = 1 << 22  # 4 Mi logits per chunk = 16 MiB float32 (~27 rows at 151,936)


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_over_baseline(fn) -> tuple[object, int]:
    """(fn(), the resident-set high-water mark over the resident set before the call)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


@pytest.fixture(scope="module")
def scored_group():
    # as Engine does on CPU: without it glibc keeps freed chunks resident (see that function)
    return_freed_memory_to_os()
    reference = tiny_reference("qwen2_5_vl", real_qwen_vocab=True)
    assert reference.vocab_size == 151936
    hidden = reference._final_layer.input_layernorm.weight.numel()
    torch.manual_seed(0)
    reference.model.lm_head = torch.nn.Linear(hidden, reference.vocab_size, bias=False).eval()
    from PIL import Image

    image = Image.new("RGB", (112, 112), (200, 30, 30))
    resized, _ = reference.resize_image(image)
    prompt = reference.encode_prompt(resized, prompt="Describe the figure.")
    generator = torch.Generator().manual_seed(1)
    responses = [torch.randint(0, 151643, (TOKENS,), generator=generator).tolist() for _ in range(GROUP)]
    states = reference.final_layer_inputs(prompt, responses)
    return reference, states, responses


def test_logprob_path_peak_is_bounded_by_the_chunk_not_the_vocabulary(scored_group):
    reference, states, responses = scored_group
    materialised = GROUP * TOKENS * reference.vocab_size * 4
    # the chunk's live float32 copies, the final layer over the batch, the outputs: generous slack
    bound = LOGITS_LIVE_COPIES * CHUNK * 4 + 96 * 2**20
    assert bound < materialised / 4

    with torch.inference_mode():
        out, peak = peak_over_baseline(lambda: response_logprobs(reference, states, responses, chunk_elements=CHUNK))
        again = peak_over_baseline(lambda: response_logprobs(reference, states, responses, chunk_elements=CHUNK))[1]
    assert [len(r.logprobs) for r in out] == [TOKENS] * GROUP
    assert all(torch.isfinite(r.logprobs).all() and torch.isfinite(r.entropy).all() for r in out)
    peak = max(peak, again)  # the first and a repeated call alike (a heap that keeps growing shows here)
    assert peak <= bound, f"log-prob path peaked at {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"

    # control arm: logits of as many rows materialised at once, which the measurement must see
    # (chunked == one pass numerically: test_ref_logprobs.py::test_chunked_lm_head_equals_one_pass)
    head, norm = reference.model.lm_head, reference._base.language_model.norm
    rows = states.prefix.hidden[-1:].repeat(GROUP * TOKENS, 1)
    targets = torch.as_tensor([t for r in responses for t in r], dtype=torch.long)
    with torch.inference_mode():
        (whole, _), control_peak = peak_over_baseline(lambda: logprobs_from_logits(head(norm(rows)), targets))
    assert whole.shape == (GROUP * TOKENS,)
    assert control_peak > materialised * 0.9, "the measurement cannot see a materialised [tokens x vocab]"
