"""The reference models the benchmarks run, all built offline.

* ``demo``   -- the embedded demo model (``Engine.load()``): 3 layers x 64 hidden.
* ``bench``  -- a larger CPU configuration of the Qwen2.5-VL architecture with random
  weights: 8 decoder layers x 512 hidden (8 heads, 2 KV heads, MLP 1536) and a
  4-block x 256 vision tower; about 30 M parameters. Built in code from a config with a
  fixed seed, so every process gets the same weights; it reuses the demo tokenizer.
* ``qwen7b`` -- the shapes of Qwen2.5-VL-7B-Instruct (28 x 3584, 28 heads / 4 KV heads,
  MLP 18944, vocab 152064, 32-block x 1280 vision tower) with random bf16 weights, for a
  GPU. Built directly on the device; never downloaded.

Every builder returns a :class:`kawhi.models.qwen.QwenVLReference`, the same adapter the
engine and the server use. ``save_reference`` writes a model folder ``kawhi serve
--model`` can load, so the HTTP benchmarks serve exactly the weights timed in-process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

MODEL_KINDS = ("demo", "bench", "qwen7b")
SEED = 20260327

# text / vision shapes of the two built configurations
BENCH_TEXT = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12])
BENCH_VISION = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[3])
QWEN7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064)
QWEN7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                     fullatt_block_indexes=[7, 15, 23, 31])
# image processor pixel range (28 x 28 pixels = one visual token after the 2x2 merge)
BENCH_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1024}
QWEN7B_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


@functools.cache
def demo_dir() -> Path:
    from kawhi.engine.engine import DEMO_MODEL_DIR

    return Path(DEMO_MODEL_DIR)


def demo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir(), local_files_only=True)
    if tok.chat_template is None and (demo_dir() / "chat_template.jinja").is_file():
        tok.chat_template = (demo_dir() / "chat_template.jinja").read_text()
    return tok


def build_config(kind: str, tokenizer: Any) -> Any:
    """The transformers config of ``bench`` or ``qwen7b`` (token ids from the demo tokenizer)."""
    from transformers import Qwen2_5_VLConfig

    text_shape, vision_shape = {"bench": (BENCH_TEXT, BENCH_VISION), "qwen7b": (QWEN7B_TEXT, QWEN7B_VISION)}[kind]
    text_shape = dict(text_shape)
    mrope = text_shape.pop("mrope_section")
    from kawhi.models.qwen import qwen_vl_token_ids

    text_ids, vision_ids = qwen_vl_token_ids(tokenizer)
    text = dict(
        vocab_size=text_shape.pop("vocab_size", len(tokenizer)),
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **text_ids,
        **text_shape,
    )
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  out_hidden_size=text["hidden_size"], **vision_shape)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **vision_ids,
        **text_ids,
    )


def _image_processor(kind: str) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size=BENCH_PIXELS if kind == "bench" else QWEN7B_PIXELS)


def build_reference(kind: str, *, device: str = "cpu", dtype: str = "auto", attn: str = "sdpa",
                    layers: int | None = None, vision_depth: int | None = None) -> Any:
    """A QwenVLReference of ``kind`` with attention implementation ``attn`` (sdpa | eager).

    ``kind`` may also be a real shape of ``bench.real_shapes.SHAPES`` (random weights, the real
    Qwen tokenizer), cut to ``layers`` decoder layers / ``vision_depth`` vision blocks."""
    from kawhi.models.qwen import QwenVLReference, resolve_dtype

    from bench.real_shapes import SHAPES, build_model

    if kind in SHAPES:
        model, tokenizer, processor = build_model(kind, dtype=resolve_dtype(dtype, device), device=device,
                                                  layers=layers, vision_depth=vision_depth, attn=attn)
        return QwenVLReference(model, tokenizer, processor, f"kawhi-bench-{kind}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose from {MODEL_KINDS}")
    if kind == "demo":
        from kawhi.engine.engine import DEMO_MODEL_NAME

        return QwenVLReference.from_pretrained(demo_dir(), device=device, dtype="float32",
                                               attn_implementation=attn, name=DEMO_MODEL_NAME)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = demo_tokenizer()
    config = build_config(kind, tokenizer)
    torch_dtype = resolve_dtype(dtype, device) if kind == "qwen7b" else torch.float32
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                config, attn_implementation=attn, dtype=torch_dtype)
    finally:
        torch.set_default_dtype(default)
    model.lm_head = torch.nn.Identity()  # as QwenVLReference.from_pretrained does: never used
    return QwenVLReference(model.to(device).eval(), tokenizer, _image_processor(kind), f"kawhi-bench-{kind}")


def eager_twin(reference: Any) -> Any:
    """The same weights behind ``attn_implementation="eager"`` (for the naive baseline)."""
    import copy

    from kawhi.models.qwen import QwenVLReference

    model = copy.deepcopy(reference.model)
    model.set_attn_implementation("eager")
    return QwenVLReference(model, reference.tokenizer, reference.image_processor, reference.name)


def save_reference(reference: Any, path: Path) -> Path:
    """Write a model folder that ``kawhi serve --model PATH`` loads (weights, tokenizer, processor)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # lm_head is an Identity (never used): the folder has no LM head weights, and loading it
    # initialises one that QwenVLReference.from_pretrained replaces by an Identity again.
    reference.model.save_pretrained(path, safe_serialization=True)
    reference.tokenizer.save_pretrained(path)
    reference.image_processor.save_pretrained(path)
    return path


def describe(reference: Any) -> dict[str, Any]:
    """Shapes and parameter counts, recorded with every result."""
    config = reference.model.config
    text, vision = config.get_text_config(), config.vision_config
    params = sum(p.numel() for p in reference.model.parameters())
    vision_params = sum(p.numel() for p in reference.model.model.visual.parameters())
    embed = reference.model.model.get_input_embeddings().weight.numel()
    return {
        "name": reference.name,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": reference.head_dim,
        "vocab": text.vocab_size,
        "vision_depth": vision.depth,
        "vision_hidden": vision.hidden_size,
        "vision_intermediate": vision.intermediate_size,
        "params": params,
        "vision_params": vision_params,
        "decoder_params": params - vision_params - embed,
        "dtype": str(reference.dtype).replace("torch.", ""),
        "device": str(reference.device),
        "attn": reference.model.config._attn_implementation,
    }
