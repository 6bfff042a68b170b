"""What the causal head test measures: the gold answer's log-likelihood, teacher-forced.

For a labelled visual question (image, question, answer) the model sees the chat
prompt with the image and the question, followed by the answer's tokens; the score
is the mean log-probability of those answer tokens (nats per token), read at the
rows that predict them. No generation, one forward per score; a head mask
(:mod:`kawhi.discovery.masking`) changes nothing else.

The optional screen reads, in the same kind of forward, each head's share of
attention from those answer rows to the image tokens. It recomputes q and k of each
layer from that layer's own input (a pre-hook), for the answer rows only: an
(H, A, S) matrix per layer with A the answer length, never (H, S, S).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kawhi.discovery.masking import decoder_layers, masked_heads_per_row
from kawhi.models.qwen import PromptInputs


@dataclass
class EncodedItem:
    """One question ready for the model. inputs: prompt + answer ids (S,), with the image's
    pixel values and grid; rows: the A rows whose logits predict ``answer_ids`` (A,)."""

    inputs: PromptInputs
    positions: torch.Tensor  # (3, 1, S)
    rows: slice
    answer_ids: torch.Tensor


class AnswerScorer:
    """Teacher-forced answer scoring over a QwenVLReference that kept its LM head."""

    def __init__(self, reference: Any) -> None:
        if isinstance(reference.model.lm_head, torch.nn.Identity):
            raise ValueError("head discovery scores answers with the LM head, and this model has none")
        self.reference = reference

    def encode(self, image: Image.Image, question: str, answer: str) -> EncodedItem:
        ref = self.reference
        resized, _ = ref.resize_image(image)
        prompt = ref.encode_prompt(resized, prompt=question)
        answer_ids = ref.tokenize(answer).token_ids
        if not answer_ids:
            raise ValueError("the answer is empty")
        ids = torch.cat([prompt.input_ids, torch.tensor(answer_ids, dtype=torch.long)])
        inputs = PromptInputs(ids, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
        p = int(prompt.input_ids.numel())
        return EncodedItem(inputs, ref.prompt_positions(inputs), slice(p - 1, p - 1 + len(answer_ids)),
                           torch.tensor(answer_ids, dtype=torch.long))

    def _forward(self, item: EncodedItem, copies: int = 1) -> torch.Tensor:
        """(copies, S, D) final hidden states (after the final norm) of ``copies`` identical rows."""
        ref = self.reference
        device = ref.device
        ids = item.inputs.input_ids[None].to(device).expand(copies, -1)
        out = ref.model.model(
            input_ids=ids,
            pixel_values=item.inputs.pixel_values.to(device, ref.dtype).repeat(copies, 1),
            image_grid_thw=item.inputs.image_grid_thw.to(device).repeat(copies, 1),
            mm_token_type_ids=(ids == ref.image_token_id).int(),
            position_ids=item.positions.to(device).expand(-1, copies, -1),
            use_cache=False,
        )
        return out.last_hidden_state

    @torch.inference_mode()
    def log_likelihood(self, item: EncodedItem, masked: Sequence[int] = ()) -> float:
        """Mean log p(answer token) in nats, with query heads ``masked`` zeroed in every layer."""
        return self.log_likelihoods(item, [masked])[0]

    @torch.inference_mode()
    def log_likelihoods(self, item: EncodedItem, masks: Sequence[Sequence[int]]) -> list[float]:
        """:meth:`log_likelihood` under each of ``masks``, as one batched forward."""
        with masked_heads_per_row(self.reference, masks):
            hidden = self._forward(item, len(masks))
        logits = self.reference.model.lm_head(hidden[:, item.rows]).float()  # (B, A, V)
        logp = torch.log_softmax(logits, dim=-1)
        answer = item.answer_ids.to(logp.device)
        picked = logp[:, torch.arange(answer.numel(), device=logp.device), answer]  # (B, A)
        return [float(v) for v in picked.mean(-1)]

    @torch.inference_mode()
    def attention_share(self, item: EncodedItem) -> np.ndarray:
        """(H,) each query head's mean attention mass from the answer rows to the image
        tokens, averaged over layers and rows."""
        ref = self.reference
        rows = item.rows
        visual = item.inputs.visual_positions.to(ref.device)
        shares: list[torch.Tensor] = []

        def hook(attn: Any, args: tuple, kwargs: dict) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            d = attn.head_dim
            q = attn.q_proj(x[:, rows]).view(1, rows.stop - rows.start, -1, d)
            k = attn.k_proj(x).view(1, x.shape[1], -1, d)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q, _ = ref._apply_rope(q, q, cos[:, rows], sin[:, rows])
            _, k = ref._apply_rope(k, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # (1, H, A, S)
            query_pos = torch.arange(rows.start, rows.stop, device=x.device)[:, None]
            key_pos = torch.arange(x.shape[1], device=x.device)[None]
            scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            shares.append(probs[0][..., visual].sum(-1).mean(-1))  # (H,)

        handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
                   for layer in decoder_layers(ref)]
        try:
            self._forward(item)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(shares).mean(0).cpu().double().numpy()


def blank_like(image: Image.Image, value: int = 128) -> Image.Image:
    """The blank-image control: a flat grey image of the same size."""
    return Image.new("RGB", image.size, (value, value, value))
