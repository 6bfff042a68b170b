"""Regenerate the embedded demo reference model shipped in service/kawhi/models/demo/.

A Qwen2.5-VL-architecture model with a few hundred thousand random parameters and a
small byte-level BPE tokenizer trained here, offline, on a synthetic corpus. It exists
so that `kawhi serve` and `kawhi reweight` run out of the box with no download: its
numbers are for plumbing, never for training.

    python scripts/build_demo_model.py            # writes service/kawhi/models/demo/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from kawhi.models.qwen import QWEN_CHAT_TEMPLATE, qwen_vl_token_ids
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SEED = 20260327
VOCAB_SIZE = 1024
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


def synthetic_corpus(rng: random.Random, lines: int = 4000) -> list[str]:
    """Sentences of the kind a math/chart reasoning response holds."""
    subjects = ["the triangle", "the bar chart", "angle ABC", "the circle", "the tallest bar", "the axis",
                "the line plot", "side AB", "the radius", "the area", "the legend", "point D"]
    verbs = ["shows", "equals", "is larger than", "is parallel to", "measures", "intersects", "reads"]
    objects = ["42 degrees", "the value 7", "3.5 cm", "twice the base", "the x-axis", "90°", "the answer"]
    words = ["Therefore", "First", "Next", "So", "Looking at the image,", "Step 1:", "Answer:"]
    out = []
    for _ in range(lines):
        out.append(f"{rng.choice(words)} {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.")
    out.append("".join(chr(c) for c in range(32, 127)) + " é ü ß 你好 三角形 ∠ π √ ≈ → 🙂")
    return out


def build_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(rng), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    text_ids, vision_ids = qwen_vl_token_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True,
            **text_ids,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=True,
        **vision_ids,
        **text_ids,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(__file__).resolve().parents[1] / "service" / "kawhi" / "models" / "demo"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)

    tokenizer = build_tokenizer(rng)
    config = build_config(tokenizer)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Random init gives near-identical tiny weights; widen them so that attention and
    # alignment scores vary visibly across tokens in the demo.
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5 * 4)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256})
    processor.save_pretrained(args.out)
    (args.out / "KAWHI_DEMO.json").write_text(json.dumps({
        "name": "kawhi-demo-qwen2.5-vl-tiny",
        "demo": True,
        "note": "Random weights for plumbing only. Its advantages mean nothing; never train with them.",
        "seed": SEED,
    }, indent=2) + "\n")
    total = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out}: {total:,} parameters, {size / 1e6:.2f} MB on disk")


if __name__ == "__main__":
    main()
