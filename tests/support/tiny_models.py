"""Tiny random-weight reference models of each supported architecture, built offline.

They share the embedded kawhi-tiny model's tokenizer, so they load in well under a second
and exercise each architecture's real transformers code (vision tower, 3-D RoPE,
GQA, Qwen3-VL's q/k norms and deepstack).
"""

from __future__ import annotations

import functools

import torch
import transformers
from kawhi.engine.engine import TINY_MODEL_DIR
from kawhi.models.qwen import QwenVLReference, qwen_vl_token_ids
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@functools.cache
def tiny_tokenizer():
    """kawhi-tiny's byte-level tokenizer: the servers under test run kawhi-tiny, so token ids
    from these policies mean the same to them."""
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)


def _config(model_type: str, tokenizer, vocab_size: int | None = None) -> transformers.PretrainedConfig:
    text_ids, special = qwen_vl_token_ids(tokenizer)
    text = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                **text_ids,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if model_type == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    if model_type == "qwen3_vl":
        text.update(head_dim=16)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    raise ValueError(model_type)


def tiny_reference(model_type: str, seed: int = 0, name: str | None = None, *,
                   real_qwen_vocab: bool = False) -> QwenVLReference:
    """A QwenVLReference over a freshly initialised tiny model of ``model_type``.

    real_qwen_vocab: use the real Qwen2.5-VL tokenizer (151,936-row embedding) instead
    of kawhi-tiny's, so token ids are those a real Qwen trainer produces.
    """
    if real_qwen_vocab:
        from kawhi.models.qwen_tokenizer import QWEN2_VL_VOCAB_SIZE, build_qwen2_vl_tokenizer

        tokenizer = build_qwen2_vl_tokenizer()
        config = _config(model_type, tokenizer, QWEN2_VL_VOCAB_SIZE)
    else:
        tokenizer = tiny_tokenizer()
        config = _config(model_type, tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model_class = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
                   "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
                   "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[model_type]
    model = model_class(config).eval()
    patch = config.vision_config.patch_size
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2,
                                         size={"shortest_edge": 4 * (2 * patch) ** 2,
                                               "longest_edge": 64 * (2 * patch) ** 2})
    return QwenVLReference(model, tokenizer, processor, name or f"tiny-{model_type}")
