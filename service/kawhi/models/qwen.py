"""Reference-model adapter for the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

What the engine needs from the frozen reference LVLM (docs/method.md §4) is, for the final
decoder layer only, the query states of response tokens and the key states of visual
tokens, after (or, for the ablation, before) the multimodal rotary embedding. This
adapter gets them without ever materialising an attention matrix:

* the forward runs with the model's own attention implementation (SDPA by default)
  and is stopped by a pre-hook on the final decoder layer, which captures the hidden
  states entering that layer and the rotary (cos, sin) tables the model computed for
  them; the final layer, the final norm and the LM head never run;
* q and k are then recomputed from those hidden states with the final layer's own
  input norm, q/k projections (and q/k norms on Qwen3-VL) and the model's own
  ``apply_rotary_pos_emb``;
* the image + prompt prefix of a group runs once (kawhi.models.prefix: cached across
  requests by content); the G responses then run as one batch continuing from it, with
  split attention over the one stored copy of its KV cache (layers 0..L-2), or over a
  per-response copy of it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from kawhi.models.byte_level import UNICODE_TO_BYTE as _UNICODE_TO_BYTE
from kawhi.models.byte_level import utf8_char_spans as _utf8_char_spans
from kawhi.models.prefix import (
    LayerInputs,
    PrefixCache,
    PrefixState,
    Row,
    SplitPlan,
    continuation_plan,
    enable_split_attention,
    pack_rows,
    padded_prefix_cache,
    shared_prefixes,
)

_pack_rows = pack_rows  # the name the tests know

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"

_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

# Qwen2.5-VL's chat format for a conversation whose turns hold text and image parts.
# The demo model ships it; a real model's own template wins (this is the fallback only
# when neither its tokenizer nor its folder carries one).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_vl_token_ids(tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Special-token ids a Qwen-VL config needs, read from its tokenizer.

    Returns (text ids: bos/eos/pad, for the text config and the top level;
    vision ids: the image/video placeholders and vision delimiters, for the top level).
    """
    ids = tokenizer.convert_tokens_to_ids
    text = {"bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")}
    vision = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
              "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    return text, vision


class _StopForward(Exception):
    """Raised by the final-layer pre-hook: everything after that point is not needed."""


@dataclass
class PromptInputs:
    """The image + prompt prefix of one group, ready for the model.

    input_ids: (P,) int64. pixel_values: (n_patches, C * temporal * patch * patch).
    image_grid_thw: (1, 3). visual_positions: (N,) indices into input_ids of the visual
    tokens, in row-major order of the (rows, cols) LLM grid; N = rows * cols.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    visual_positions: torch.Tensor
    grid: tuple[int, int]
    cache_key: str | None = None  # content key of the prefix (kawhi.models.prefix.prefix_key); None = not cached


@dataclass
class TokenizedText:
    """A response as the model sees it: ids, the text they decode to, char offsets (T, 2)."""

    token_ids: list[int]
    text: str
    offsets: list[tuple[int, int]]


@dataclass
class GroupStates:
    """Final-layer inputs of one group: its visual tokens, each response's tokens and
    (for reference log-probs) every prefix position."""

    visual: LayerInputs
    responses: list[LayerInputs]
    prefix: LayerInputs | None = None  # every prefix position (for finishing the final layer)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule: both sides multiples of ``factor``, area within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {max(height, width) / min(height, width):.0f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


class QwenVLReference:
    """A frozen Qwen-VL model wrapped for KAWHI's alignment score.

    Build it with :meth:`from_pretrained` (a local folder; nothing is downloaded), or
    directly from a transformers model, tokenizer and image processor (tests do that
    with tiny random configurations).
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, name: str) -> None:
        model_type = model.config.model_type
        if model_type not in _MODEL_CLASSES:
            raise ValueError(f"unsupported model type {model_type!r}; supported: {sorted(_MODEL_CLASSES)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.model_type = model_type
        text_config = model.config.get_text_config()
        self.num_heads: int = text_config.num_attention_heads
        self.num_kv_heads: int = text_config.num_key_value_heads
        self.head_dim: int = getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads
        self.vocab_size: int = self._base.get_input_embeddings().num_embeddings
        self.max_positions: int = getattr(text_config, "max_position_embeddings", 32768)
        self.image_token_id: int = model.config.image_token_id
        self.placeholder_ids = frozenset(
            t for t in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if t is not None
        )
        vision = model.config.vision_config
        self.patch_side: int = vision.patch_size * vision.spatial_merge_size
        self._final_layer = self._base.language_model.layers[-1]
        self._apply_rope = sys.modules[type(self._final_layer.self_attn).__module__].apply_rotary_pos_emb
        forward_params = inspect.signature(self._base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self.source_dir: Path | None = None  # the model folder, when loaded from one (kawhi.heads)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._byte_level = self._detect_byte_level()
        self.split_capable = enable_split_attention(model)
        # on by default where it measured faster (bench/README.md): CPU
        self.split_attention: bool = self.split_capable and self.device.type == "cpu"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        name: str | None = None,
    ) -> QwenVLReference:
        """Load a local checkpoint folder offline (config, weights, tokenizer, preprocessor)."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in _MODEL_CLASSES:
            raise ValueError(f"unsupported model type {config.model_type!r} in {path}; supported: {sorted(_MODEL_CLASSES)}")
        model_class = getattr(transformers, _MODEL_CLASSES[config.model_type])
        transformers.utils.logging.disable_progress_bar()
        torch_dtype = resolve_dtype(dtype, device)
        model = model_class.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        # the LM head stays: the alignment forward never reaches it; reference log-probs and head discovery use it
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.chat_template is None:
            for template_file in ("chat_template.jinja", "chat_template.json"):
                if (path / template_file).is_file():
                    raw = (path / template_file).read_text()
                    tokenizer.chat_template = json.loads(raw)["chat_template"] if template_file.endswith(".json") else raw
                    break
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        reference = cls(model, tokenizer, image_processor, name or path.name)
        reference.source_dir = path
        return reference

    @property
    def _base(self) -> Any:
        """The multimodal base model (vision tower + language model), without LM head."""
        return self.model.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenizer_fingerprint(self) -> str:
        """sha256 (first 16 hex) of the tokenizer's full serialisation: equal ids mean equal fingerprints."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        blob = backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ inputs
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes an image to; multiples of patch_side."""
        size = self.image_processor.size
        min_pixels = size.get("shortest_edge", size.get("min_pixels"))
        max_pixels = size.get("longest_edge", size.get("max_pixels"))
        h, w = smart_resize(height, width, self.patch_side, min_pixels, max_pixels)
        return w, h

    def resize_image(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
        """Resize as the model's processor does; returns the image and its (rows, cols) token grid."""
        w, h = self.resized_size(*image.size)
        resized = image.convert("RGB")
        if (w, h) != resized.size:
            resized = resized.resize((w, h), Image.Resampling.BICUBIC)
        return resized, (h // self.patch_side, w // self.patch_side)

    def encode_prompt(
        self,
        resized_image: Image.Image,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> PromptInputs:
        """Chat input with the image first (or as placed in ``messages``), expanded and tokenised.

        ``resized_image`` must come from :meth:`resize_image` so the processor does not
        resize again and the grid matches the one regions were selected on.
        """
        if messages is None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or ""}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(IMAGE_PAD) != 1:
            raise ValueError(f"the chat must hold exactly one image, found {text.count(IMAGE_PAD)}")
        processed = self.image_processor(images=[resized_image], return_tensors="pt")
        grid_thw = processed["image_grid_thw"]
        merge = self.patch_side // self.model.config.vision_config.patch_size
        rows, cols = int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge
        text = text.replace(IMAGE_PAD, IMAGE_PAD * (rows * cols))
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        visual_positions = (ids == self.image_token_id).nonzero().flatten()
        if visual_positions.numel() != rows * cols:
            raise ValueError("the prompt text itself contains image placeholder tokens")
        return PromptInputs(ids, processed["pixel_values"], grid_thw, visual_positions, (rows, cols))

    def tokenize(self, text: str) -> TokenizedText:
        """Tokenise a response as the policy would have produced it (no special tokens added)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return TokenizedText(list(enc["input_ids"]), text, [tuple(o) for o in enc["offset_mapping"]])

    def decode(self, token_ids: Sequence[int]) -> TokenizedText:
        """The text ``token_ids`` decode to, with each token's char span in it.

        For byte-level BPE (all Qwen tokenizers) the spans are exact: a token that ends
        inside a multi-byte character shares that character with the next token.
        """
        ids = [int(t) for t in token_ids]
        if not self._byte_level:
            return self._decode_incrementally(ids)
        special = {t.content for t in self.tokenizer.added_tokens_decoder.values()}
        pieces = []
        for token in self.tokenizer.convert_ids_to_tokens(ids):
            if token in special:
                pieces.append(token.encode("utf-8"))
            else:
                pieces.append(bytes(_UNICODE_TO_BYTE[c] for c in token))
        text, byte_to_char = _utf8_char_spans(b"".join(pieces))
        offsets, pos = [], 0
        for piece in pieces:
            # the span runs to the character holding the token's last byte, so a token
            # that ends inside a multi-byte character still covers it
            start = byte_to_char[pos]
            end = byte_to_char[pos + len(piece) - 1] + 1 if piece else start
            offsets.append((start, end))
            pos += len(piece)
        return TokenizedText(ids, text, offsets)

    def _decode_incrementally(self, ids: list[int]) -> TokenizedText:
        offsets, previous = [], ""
        for i in range(len(ids)):
            current = self.tokenizer.decode(ids[: i + 1])
            offsets.append((len(previous), len(current)))
            previous = current
        return TokenizedText(ids, previous, offsets)

    def _detect_byte_level(self) -> bool:
        sample = "é ü"
        tokens = self.tokenizer.convert_ids_to_tokens(self.tokenizer(sample, add_special_tokens=False)["input_ids"])
        return all(c in _UNICODE_TO_BYTE for t in tokens for c in t)

    # ------------------------------------------------------------------ forward
    def _run_until_final_layer(self, **forward_kwargs: Any) -> LayerInputs:
        """Run the base model and capture what enters the final decoder layer, then stop."""
        captured: dict[str, Any] = {}

        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["cos"], captured["sin"] = kwargs["position_embeddings"]
            raise _StopForward

        handle = self._final_layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self._base(**forward_kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "hidden" not in captured:
            raise RuntimeError("the forward finished without reaching the final decoder layer")
        return LayerInputs(captured["hidden"], captured["cos"], captured["sin"])

    def prompt_positions(self, prompt: PromptInputs) -> torch.Tensor:
        """(3, 1, P) multimodal rotary positions of the prefix, from the model's own rule."""
        ids = prompt.input_ids[None].to(self.device)
        token_types = (ids == self.image_token_id).int()
        positions, _ = self._base.get_rope_index(
            ids, mm_token_type_ids=token_types, image_grid_thw=prompt.image_grid_thw.to(self.device)
        )
        return positions

    def final_layer_inputs(self, prompt: PromptInputs, responses: Sequence[Sequence[int]]) -> GroupStates:
        """One group's forward: see :meth:`final_layer_inputs_many`."""
        return self.final_layer_inputs_many([(prompt, responses)])[0]

    @torch.inference_mode()
    def final_layer_inputs_many(
        self,
        groups: Sequence[tuple[PromptInputs, Sequence[Sequence[int]]]],
        max_batch_tokens: int = 16384,
        *,
        merge_groups: bool = True,
        max_padding: float = 1.25,
        split_attention: bool | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> list[GroupStates]:
        """Final-layer inputs of several groups, with each prefix run once.

        Each distinct image + prompt prefix runs on its own (the vision tower sees one
        image), or comes from ``prefix_cache`` (by ``PromptInputs.cache_key``; groups with
        equal keys share one prefix even without a cache). Responses then run as batches
        continuing their prefix; groups of one prefix pack as one group. With
        ``merge_groups``, other groups share a batch while it holds at most
        ``max_batch_tokens`` padded response tokens and at most ``max_padding`` times its
        real tokens; a group larger than the budget is split by rows.

        split_attention: continue with split attention (kawhi.models.prefix), else over a
        per-row copy of the prefix's KV cache; None = :attr:`split_attention`.

        groups: (prompt, G token-id lists) pairs; a response may be empty. Returns, per
        group, its visual tokens' states (N = rows * cols) and each response's (T_g).
        """
        prefixes = self.prefixes([prompt for prompt, _ in groups], prefix_cache)
        split = (self.split_attention if split_attention is None else split_attention) and self.split_capable
        states: dict[tuple[int, int], LayerInputs] = {}
        for batch in pack_rows(groups, max_batch_tokens, merge_groups, max_padding, [id(p) for p in prefixes]):
            self._continue_prefixes(batch, prefixes, states, split)
        results = []
        for g, (_, responses) in enumerate(groups):
            visual = prefixes[g].visual
            empty = LayerInputs(visual.hidden[:0], visual.cos[:0], visual.sin[:0])
            results.append(GroupStates(visual, [states.get((g, r), empty) for r in range(len(responses))],
                                       prefixes[g].states))
        return results

    def prefixes(self, prompts: Sequence[PromptInputs], cache: PrefixCache | None = None) -> list[PrefixState]:
        """One PrefixState per prompt; prompts with equal ``cache_key`` share one (from ``cache``
        when given, computed once otherwise)."""
        return shared_prefixes(prompts, self._prefix, cache)

    def _prefix(self, prompt: PromptInputs) -> PrefixState:
        """Run one image + prompt; keep its KV cache (layers 0..L-2) and visual states."""
        from transformers import DynamicCache

        device = self.device
        cache = DynamicCache(config=self.model.config.get_text_config())
        positions = self.prompt_positions(prompt)
        captured = self._run_until_final_layer(
            input_ids=prompt.input_ids[None].to(device),
            pixel_values=prompt.pixel_values.to(device, self.dtype),
            image_grid_thw=prompt.image_grid_thw.to(device),
            mm_token_type_ids=(prompt.input_ids[None] == self.image_token_id).int().to(device),
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        vis = prompt.visual_positions.to(device)
        visual = LayerInputs(captured.hidden[0, vis], captured.cos[0, vis], captured.sin[0, vis])
        filled = [layer for layer in cache.layers if layer.keys is not None]  # the final layer never ran
        whole = LayerInputs(captured.hidden[0], captured.cos[0], captured.sin[0])
        return PrefixState([layer.keys for layer in filled], [layer.values for layer in filled], visual,
                           int(positions.max()) + 1, int(prompt.input_ids.numel()), whole)

    def _continue_prefixes(self, rows: list[Row], prefixes: list[PrefixState],
                           states: dict[tuple[int, int], LayerInputs], split: bool = False) -> None:
        """One batched forward of response rows, each continuing its own group's prefix.

        Responses are right-padded: under the causal mask no real token attends to a
        later pad. With ``split`` the prefix keys are read where they are stored (no
        copy, no mask). Otherwise row i's cache holds its prefix right-padded to the
        longest prefix P in the batch and its tokens follow at P; only prefix padding
        needs a mask, so the common one-prefix batch keeps the unmasked kernel.
        """
        device = self.device
        longest = max(len(tokens) for _, _, tokens in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        for i, (_, _, tokens) in enumerate(rows):
            ids[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        starts = torch.tensor([prefixes[g].next_position for g, _, _ in rows], device=device)
        positions = (starts[:, None] + torch.arange(longest, device=device)[None]).expand(3, -1, -1)
        if split:
            with continuation_plan(SplitPlan.of(rows, prefixes)):
                out = self._run_until_final_layer(input_ids=ids.to(device), position_ids=positions, use_cache=False)
        else:
            cache, mask = self._padded_prefix_cache(rows, prefixes, longest)
            out = self._run_until_final_layer(
                input_ids=ids.to(device), position_ids=positions, attention_mask=mask, use_cache=True,
                **{self._cache_kwarg: cache},
            )
        for i, (g, r, tokens) in enumerate(rows):
            n = len(tokens)
            states[(g, r)] = LayerInputs(out.hidden[i, :n], out.cos[i, :n], out.sin[i, :n])

    def _padded_prefix_cache(self, rows: list[Row], prefixes: list[PrefixState],
                             longest: int) -> tuple[Any, torch.Tensor | None]:
        return padded_prefix_cache(rows, prefixes, longest, self.model.config.get_text_config(), self.device)

    @torch.inference_mode()
    def project(self, states: LayerInputs, which: Literal["query", "key"], rope: bool = True) -> torch.Tensor:
        """The final layer's query or key states for ``states``: (H or H_kv, N, head_dim), float32.

        Exactly the computation the final layer's attention performs before its
        attention kernel: input norm, projection, per-head norm (Qwen3-VL), and the
        rotary embedding when ``rope`` (docs/method.md §4; rope=False is the ablation).
        """
        attn = self._final_layer.self_attn
        x = self._final_layer.input_layernorm(states.hidden[None])
        projection = attn.q_proj if which == "query" else attn.k_proj
        out = projection(x).view(1, x.shape[1], -1, self.head_dim)
        head_norm = getattr(attn, "q_norm" if which == "query" else "k_norm", None)
        if head_norm is not None:
            out = head_norm(out)
        out = out.transpose(1, 2)
        if rope:
            out, _ = self._apply_rope(out, out, states.cos[None], states.sin[None])
        return out[0].float()
