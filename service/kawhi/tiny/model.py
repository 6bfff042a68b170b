"""kawhi-tiny's model side: its tokenizer and architecture, batches through the real adapter
path, and held-out answer accuracy.

The model is a Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) of a few million
parameters with a byte-level BPE tokenizer trained on the task's own text. Inputs are
built exactly as the service builds them (:class:`kawhi.models.qwen.QwenVLReference`:
its resize rule, chat template, image processor and multimodal rotary positions), so
what the model learns is what the service later reads.

Accuracy is closed-set: for each held-out item every answer of the kind's answer set
is scored teacher-forced as the response ``Answer: X`` (sum of its token log-probs,
end-of-turn included) and the best one is the model's answer. Chance is one over the
answer set (:func:`kawhi.tiny.task.chance`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kawhi.models.qwen import PromptInputs, QwenVLReference
from kawhi.tiny.responses import DESCRIBE_PROMPT, description, make_response, restating_paragraph
from kawhi.tiny.task import KINDS, TinyItem, make_item

MODEL_NAME = "kawhi-tiny-qwen2.5-vl"
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


@dataclass(frozen=True)
class Architecture:
    """Widths of the text decoder and the vision tower (head_dim = hidden / heads)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 96
    vision_depth: int = 2
    vision_heads: int = 2
    vocab: int = 768
    # Qwen's 1e6, as the shipped model was trained. On a 4 x 4 grid at head dim 32 it turns
    # the width section's rotary angle by < 1e-3 rad across the image, so the decoder cannot
    # tell left from right (nor can the vision tower: rotary only, uniform background);
    # docs/tiny.md's third round trained with 10
    rope_theta: float = 1_000_000.0


def task_corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Questions and response paragraphs of the task (train split), for the tokenizer."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    out = ["You are a helpful assistant.", "".join(chr(c) for c in range(32, 127))]
    for i in range(lines):
        item = make_item(kinds[i % len(kinds)], i, seed=10_000 + seed)
        out += [item.question, make_response(item, rng, correct=rng.random() < 0.7).text, restating_paragraph(item)]
    return out


def build_tokenizer(arch: Architecture = Architecture()) -> Any:
    """A byte-level BPE (every string encodes; Qwen's special tokens) trained on :func:`task_corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kawhi.models.qwen import QWEN_CHAT_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=arch.vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(task_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_model(tokenizer: Any, arch: Architecture = Architecture(), size: int = 112) -> Any:
    """A freshly initialised Qwen2.5-VL of ``arch`` whose vision windows cover a ``size`` px image."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kawhi.models.qwen import qwen_vl_token_ids

    text_ids, vision_ids = qwen_vl_token_ids(tokenizer)
    half = arch.hidden // arch.heads // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": arch.hidden, "intermediate_size": arch.intermediate,
            "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": section},
            "tie_word_embeddings": True, **text_ids,
        },
        vision_config={
            "depth": arch.vision_depth, "hidden_size": arch.vision_hidden, "intermediate_size": 2 * arch.vision_hidden,
            "num_heads": arch.vision_heads, "out_hidden_size": arch.hidden, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": size,
            "fullatt_block_indexes": [arch.vision_depth - 1],
        },
        tie_word_embeddings=True, **vision_ids, **text_ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256})


# ------------------------------------------------------------------ batches


@dataclass
class Row:
    """One image + question + response, tokenised as the service does; ``targets``: the
    response's token ids (end-of-turn included), which follow the prompt."""

    prompt: PromptInputs
    targets: list[int]


def encode_row(reference: QwenVLReference, item: TinyItem, response: str, question: str | None = None) -> Row:
    """``item``'s image and question (or ``question`` instead) followed by ``response``."""
    resized, _ = reference.resize_image(item.image)
    prompt = reference.encode_prompt(resized, prompt=question or item.question)
    end = reference.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return Row(prompt, reference.tokenize(response).token_ids + [end])


def rows_forward(reference: QwenVLReference, rows: Sequence[Row], **kwargs: Any) -> Any:
    """The decoder's output (``model.model``) for ``rows`` (each its prompt then its targets)
    in one batched forward; ``kwargs`` go to the model (``output_attentions=True``, ...).

    Rows are right-padded (the causal mask keeps real tokens from seeing pads); each row
    gets its own multimodal rotary positions from the model's rule.
    """
    seqs = [torch.cat([r.prompt.input_ids, torch.tensor(r.targets, dtype=torch.long)]) for r in rows]
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(rows), longest), reference.pad_token_id, dtype=torch.long)
    positions = torch.zeros(3, len(rows), longest, dtype=torch.long)
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        ids[i, : len(seq)] = seq
        full = PromptInputs(seq, row.prompt.pixel_values, row.prompt.image_grid_thw, row.prompt.visual_positions,
                            row.prompt.grid)
        own = reference.prompt_positions(full)[:, 0].cpu()
        positions[:, i, : len(seq)] = own
        positions[:, i, len(seq):] = own[:, -1:] + torch.arange(1, longest - len(seq) + 1)
    device = reference.device
    return reference.model.model(
        input_ids=ids.to(device),
        pixel_values=torch.cat([r.prompt.pixel_values for r in rows]).to(device, reference.dtype),
        image_grid_thw=torch.cat([r.prompt.image_grid_thw for r in rows]).to(device),
        mm_token_type_ids=(ids == reference.image_token_id).int().to(device),
        position_ids=positions.to(device),
        use_cache=False,
        **kwargs,
    )


def row_logprobs(reference: QwenVLReference, rows: Sequence[Row]) -> list[torch.Tensor]:
    """Each row's per-token log-probs of its targets, (T_i,), from one batched forward
    (:func:`rows_forward`)."""
    model, device = reference.model, reference.device
    hidden = rows_forward(reference, rows).last_hidden_state
    out = []
    for i, row in enumerate(rows):
        p, t = len(row.prompt.input_ids), len(row.targets)
        logits = model.lm_head(hidden[i, p - 1 : p - 1 + t]).float()
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(row.targets, device=device)[:, None])[:, 0])
    return out


def training_row(reference: QwenVLReference, item: TinyItem, rng: random.Random, short_share: float,
                 describe_share: float = 0.0) -> Row:
    """One training row: ``describe_share`` of the time the image described object by object
    (:func:`kawhi.tiny.responses.description`), else the item's question and a
    :func:`training_response`."""
    if describe_share and rng.random() < describe_share:
        return encode_row(reference, item, description(item), DESCRIBE_PROMPT)
    return encode_row(reference, item, training_response(item, rng, short_share))


def training_response(item: TinyItem, rng: random.Random, short_share: float) -> str:
    """What the model is trained to say: ``Answer: X`` alone (``short_share`` of the time) or a
    right 2-4 paragraph response. Wrong responses are for RL groups, never trained on."""
    if rng.random() < short_share:
        return f"Answer: {item.answer}"
    return make_response(item, rng, correct=True).text


# ------------------------------------------------------------------ accuracy


@torch.inference_mode()
def answer_scores(reference: QwenVLReference, item: TinyItem, batch: int = 16) -> dict[str, float]:
    """Teacher-forced log-prob of ``Answer: X`` for each X of the item's answer set."""
    rows = [encode_row(reference, item, f"Answer: {c}") for c in item.candidates]
    scores: list[float] = []
    for start in range(0, len(rows), batch):
        scores += [float(lp.sum()) for lp in row_logprobs(reference, rows[start : start + batch])]
    return dict(zip(item.candidates, scores))


def predict(reference: QwenVLReference, item: TinyItem) -> str:
    scores = answer_scores(reference, item)
    return max(scores, key=scores.get)


def accuracy_by_kind(reference: QwenVLReference, items: Sequence[TinyItem]) -> dict[str, float]:
    """Closed-set accuracy per question kind over ``items``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        hits[item.kind].append(predict(reference, item) == item.answer)
    return {kind: sum(h) / len(h) for kind, h in hits.items()}
