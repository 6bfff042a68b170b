"""A tiny Qwen2.5-VL whose vision-critical heads are known by construction.

The language model is written by hand so that information reaches the answer
through known heads only (the vision tower is random; the LM reads its output):

* residual dims: 0 a large constant (keeps every RMSNorm close to a fixed scale),
  1-15 token content, 16-31 image features (the vision merger writes only there),
  32-47 the image evidence, 48 the answer-format signal, 49 the decoy's output;
* head 0 (text head): uniform attention; reads the constant of text tokens and
  writes dim 48, which raises every answer token above the rest of the vocabulary.
  Masking it costs a lot, with or without the image: not a vision head;
* heads 1 and 3 (vision heads, the planted set): uniform attention; their values
  read dims 16-31 (image positions hold nothing else) and write dims 32-47, head 3
  at 0.7 of head 1's strength. The LM head reads dims 32-47 through class centroids
  fitted on the model's own features, so the image decides which answer wins;
* head 2 (decoy): attends almost only to image tokens (its keys there are a large
  constant, a bias; elsewhere ~0) but its values are a constant: it tops the
  attention-share screen and carries nothing;
* layer 1 and every MLP write nothing.

``image_blind=True`` zeroes the vision heads' values: the image reaches the LM but no
head reads it, so the answer cannot depend on it.

The task: the image is a flat colour (one of four, jittered); the answer is the
colour's digit "1".."4".
"""

from __future__ import annotations

import random

import torch
import transformers
from kawhi.discovery.discover import VQAItem
from kawhi.discovery.scoring import AnswerScorer
from kawhi.models.qwen import QwenVLReference, qwen_vl_token_ids
from PIL import Image
from tiny_models import tiny_tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PLANTED = (1, 3)
TEXT_HEAD, DECOY_HEAD = 0, 2
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40)]
ANSWERS = ["1", "2", "3", "4"]
QUESTION = "Which colour is the image? Answer with its number."
CONST = 40.0


def colour_items(n: int, seed: int, size: int = 112) -> list[VQAItem]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = i % len(COLOURS)
        colour = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[k])
        items.append(VQAItem(Image.new("RGB", (size, size), colour), QUESTION, ANSWERS[k]))
    return items


def _config(tokenizer) -> transformers.Qwen2_5_VLConfig:
    text_ids, special = qwen_vl_token_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, **text_ids,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                         **special)


def planted_reference(*, image_blind: bool = False, seed: int = 0) -> QwenVLReference:
    tokenizer = tiny_tokenizer()
    config = _config(tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2,
                                         size={"shortest_edge": 4 * 28 ** 2, "longest_edge": 64 * 28 ** 2})
    reference = QwenVLReference(model, tokenizer, processor, "planted-heads")
    lm = model.model.language_model
    d = 16
    with torch.no_grad():
        for p in list(lm.parameters()) + [model.lm_head.weight]:
            p.zero_()
        for norm in [lm.norm] + [m for layer in lm.layers for m in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        generator = torch.Generator().manual_seed(seed)
        lm.embed_tokens.weight[:, 0] = CONST
        lm.embed_tokens.weight[:, 1:16] = 0.3 * torch.randn(len(tokenizer), 15, generator=generator)
        last = model.model.visual.merger.mlp[2]
        outside = torch.ones(64, dtype=torch.bool)
        outside[16:32] = False
        last.weight[outside] = 0
        last.bias[outside] = 0

        attn = lm.layers[0].self_attn
        # head 0: text head
        attn.v_proj.weight[TEXT_HEAD * d + 0, 0] = 1.0
        attn.o_proj.weight[48, TEXT_HEAD * d + 0] = 0.5
        # heads 1 and 3: vision heads
        for head, strength in ((PLANTED[0], 1.0), (PLANTED[1], 0.7)):
            if not image_blind:
                attn.v_proj.weight[head * d : head * d + 16, 16:32] = torch.eye(16)
            attn.o_proj.weight[32:48, head * d : head * d + 16] = strength * torch.eye(16)
        # head 2: decoy, attends to image tokens, carries a constant
        lowest = 7  # the rotary pair with the lowest frequency: positions barely rotate it
        attn.q_proj.bias[DECOY_HEAD * d + lowest] = 7.0
        attn.k_proj.bias[DECOY_HEAD * d + lowest] = 7.0
        attn.k_proj.weight[DECOY_HEAD * d + lowest, 0] = -7.0 / 8.0  # cancels the bias on text tokens
        attn.v_proj.bias[DECOY_HEAD * d + 0] = 1.0
        attn.o_proj.weight[49, DECOY_HEAD * d + 0] = 1.0

    answer_ids = [tokenizer.convert_tokens_to_ids(a) for a in ANSWERS]
    _fit_readout(reference, answer_ids, image_blind)
    return reference


def _fit_readout(reference: QwenVLReference, answer_ids: list[int], image_blind: bool) -> None:
    """LM-head rows of the answer tokens: the format boost (dim 48) plus, for each colour,
    the centred centroid of the model's own image evidence (dims 32-47) for that colour."""
    model = reference.model
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[answer_ids, 48] = 12.0
    scorer = AnswerScorer(reference)
    features, labels = [], []
    for item in colour_items(32, seed=12345):
        encoded = scorer.encode(item.image, item.question, item.answer)
        with torch.inference_mode():
            features.append(scorer._forward(encoded)[0, encoded.rows][0].clone())
        labels.append(ANSWERS.index(item.answer))
    features_t = torch.stack(features)
    const = float(features_t[:, 0].mean())
    evidence = features_t[:, 32:48]
    centroids = torch.stack([evidence[torch.tensor(labels) == k].mean(0) for k in range(len(ANSWERS))])
    centre = centroids.mean(0)
    spread = (centroids - centre).norm(dim=1).mean()
    with torch.no_grad():
        for k, token in enumerate(answer_ids):
            direction = (centroids[k] - centre) / spread ** 2 * 3.0 if not image_blind else torch.zeros(16)
            model.lm_head.weight[token, 32:48] = direction
            model.lm_head.weight[token, 0] = -float(direction @ centre) / const
