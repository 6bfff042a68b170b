"""What the explain view shows, gathered from a group, its result and its image.

Torch-free: the view needs only the wire objects (``RolloutGroup``, ``GroupResult``)
and the image. ``ExplainedResult`` is the engine's answer when it explains: a
``GroupResult`` plus each response's per-visual-token alignment (the heat map); the
wire answer of ``/v1/reweight`` never carries it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from kawhi_client.schema import GroupResult, RolloutGroup

__all__ = [
    "DEFAULT_PATCH_SIDE", "ExplainedResult", "GroupView", "ResponseView", "SegmentView", "TOKEN_CLASSES",
    "build_view",
]

# One LLM visual token covers a 28x28 px patch in Qwen2/2.5-VL (32 in Qwen3-VL; /v1/info says).
DEFAULT_PATCH_SIDE = 28
TOKEN_CLASSES = ("key", "sampled", "other")


class ExplainedResult(GroupResult):
    """A GroupResult with ``visual_alignment[r][v]``: the mean cosine of visual token v
    (flat row-major in ``grid``) with response r's tokens over the alignment heads; an
    empty list for an empty response."""

    visual_alignment: list[list[float]] = Field(default_factory=list)


@dataclass(frozen=True)
class SegmentView:
    """One paragraph (or sentence/token) of a response with its numbers."""

    index: int
    text: str
    alpha: float
    weight: float
    advantage: float  # the group advantage times the weight: what its tokens get


@dataclass(frozen=True)
class ResponseView:
    index: int
    text: str
    reward: float | None
    advantage: float
    segments: tuple[SegmentView, ...]

    @property
    def blocks(self) -> bool:
        """True when every segment but the last ends a line (paragraphs): each gets its own block."""
        return all(s.text.endswith("\n") for s in self.segments[:-1])


@dataclass
class GroupView:
    """Everything one explain picture shows. ``image`` is the model's resized input,
    exactly ``grid`` tokens of ``patch_side`` px; ``heatmap`` is (rows * cols) values."""

    id: str | None
    prompt: str
    image: Any  # PIL.Image.Image, RGB
    grid: tuple[int, int]
    patch_side: int
    key: frozenset[int]
    selected: frozenset[int]
    responses: list[ResponseView]
    heatmap: list[float] | None = None
    heatmap_response: int | None = None
    model: str | None = None
    is_demo: bool = False
    settings: Mapping[str, Any] | None = None  # the method settings that produced the weights (settings_lines)

    @property
    def advantages_all_zero(self) -> bool:
        """Every response's group advantage is 0 (equal rewards): the weights change nothing."""
        return all(r.advantage == 0 for r in self.responses)

    @property
    def paragraph_matrix(self) -> list[list[float]]:
        """weights[r][j]: segment j of response r (ragged): what the per-paragraph heat map draws."""
        return [[s.weight for s in r.segments] for r in self.responses]

    def shade(self, weight: float) -> tuple[Any, Any]:
        """(swatch, tint) of a segment: its weight's colours, or a flat grey when every
        advantage is 0 (the weights scale nothing, so they are not drawn as if they did)."""
        from kawhi_client.explain.style import ZERO_ADVANTAGE_SWATCH, ZERO_ADVANTAGE_TINT, weight_rgb, weight_tint

        if self.advantages_all_zero:
            return ZERO_ADVANTAGE_SWATCH, ZERO_ADVANTAGE_TINT
        return weight_rgb(weight, self.weight_top), weight_tint(weight, self.weight_top)

    ZERO_ADVANTAGE_NOTE = ("every group advantage is 0 (equal rewards): the weights below scale nothing in this "
                           "group, so they are drawn in grey")

    def settings_lines(self) -> list[str]:
        """The settings block: enough to get from alpha to weight (docs/method.md §5)."""
        s = self.settings
        if not s:
            return []
        sguf = s.get("sguf") or {}
        lines = [
            f"weights: softmax(alpha / T), T = {s.get('temperature')}; smoothing lambda = {s.get('smoothing')}; "
            f"w = w_min + (w_max - w_min) * w~ in [{s.get('w_min')}, {s.get('w_max')}]; "
            f"normalize: {s.get('normalize')}; per {s.get('granularity', 'paragraph')}",
            f"alignment heads: {s.get('heads')}" + (f" (source: {s['heads_source']})" if s.get("heads_source") else "")
            + f"; similarity {s.get('similarity')}, q/k {s.get('rope')} RoPE",
            f"regions: {s.get('regions')}" + (
                f" (SGUF: key = components with energy > beta * median, beta = {sguf.get('beta')}; components "
                f"merge 4-neighbours with structure distance < delta_s = {sguf.get('delta_s')} and luminance "
                f"difference < delta_l = {sguf.get('delta_l')}; sigma = {sguf.get('sigma')})"
                if s.get("regions") == "sguf" and sguf else "")
            + f"; skip ratio {s.get('skip_ratio')}; seed {s.get('seed')}",
            f"advantage estimator: {s.get('estimator')}" + (f" (std {s['std']})" if s.get("std") else ""),
        ]
        return lines

    def normalize_note(self) -> str | None:
        """With ``normalize: none`` the weights of M about equally aligned paragraphs are
        w_min + (w_max - w_min) / M each: paragraph count, not alignment, dominates."""
        s = self.settings or {}
        if s.get("normalize") != "none" or not isinstance(s.get("w_min"), (int, float)):
            return None
        w_min, w_max = float(s["w_min"]), float(s["w_max"])
        counts = sorted({len(r.segments) for r in self.responses if r.segments} | {1, 5})
        examples = ", ".join(f"{m} paragraph{'s' if m > 1 else ''}: {w_min + (w_max - w_min) / m:.2f}" for m in counts)
        return (f"normalize: none: with about equal alphas every paragraph of an M-paragraph answer gets "
                f"w_min + (w_max - w_min) / M ({examples}), so the paragraph count dominates the weight; "
                "normalize: mean rescales each response to a mean weight of 1")

    def token_class(self, index: int) -> str:
        """'key', 'sampled' (selected background) or 'other' for flat token ``index``."""
        if index in self.key:
            return "key"
        return "sampled" if index in self.selected else "other"

    @property
    def weight_top(self) -> float:
        """The weight the shading scale saturates at: 1 (the plain group advantage) or above."""
        weights = [s.weight for r in self.responses for s in r.segments]
        return max([1.0] + weights)

    @property
    def counts(self) -> dict[str, int]:
        n = self.grid[0] * self.grid[1]
        return {"key": len(self.key), "sampled": len(self.selected - self.key), "other": n - len(self.selected)}


ImageLike = bytes | str | Path | Any


def load_pil(image: ImageLike) -> Any:
    """bytes, a path or a PIL image -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, Path)):
        pil = Image.open(image)
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise TypeError("image must be bytes, a path or a PIL image")
    pil.load()
    return pil.convert("RGB")


def build_view(
    group: RolloutGroup | Mapping[str, Any],
    result: GroupResult | Mapping[str, Any],
    image: ImageLike,
    *,
    patch_side: int = DEFAULT_PATCH_SIDE,
    heatmap_response: int | None = None,
    visual_alignment: Sequence[Sequence[float]] | None = None,
    model: str | None = None,
    is_demo: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> GroupView:
    """The view of one reweighted group.

    settings: the method settings that produced the result (``MethodConfig.to_dict()``,
    plus ``heads_source``); shown as the view's settings block.

    image: the group's image, original or already resized; it is resized (bicubic, as
    the model's processor does) to ``grid`` tokens of ``patch_side`` px.
    heatmap_response: index of the response whose per-visual-token alignment is drawn;
    needs ``visual_alignment`` or an ``ExplainedResult``. Raises ValueError when the
    result is an error or does not belong to the group.
    """
    from PIL import Image

    if not isinstance(group, RolloutGroup):
        group = RolloutGroup.model_validate(group)
    if isinstance(result, Mapping):
        result = (ExplainedResult if "visual_alignment" in result else GroupResult).model_validate(result)
    if result.error is not None:
        raise ValueError(f"the group failed and has nothing to explain: {result.error.detail or result.error.title}")
    if len(result.grid) != 2 or min(result.grid) <= 0:
        raise ValueError(f"the result's grid must be (rows, cols), got {result.grid}")
    if len(result.responses) != len(group.responses):
        raise ValueError(f"the result holds {len(result.responses)} responses but the group "
                         f"{len(group.responses)}: they do not belong together")
    rows, cols = result.grid
    n_tokens = rows * cols
    key, selected = frozenset(result.key_tokens), frozenset(result.selected_tokens)
    if any(not 0 <= t < n_tokens for t in selected | key) or not key <= selected:
        raise ValueError("key_tokens must be a subset of selected_tokens, all inside the grid")

    pil = load_pil(image)
    size = (cols * patch_side, rows * patch_side)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)

    responses = []
    for i, (response_in, response_out) in enumerate(zip(group.responses, result.responses)):
        text = response_in.text
        segments = tuple(
            SegmentView(j, text[p.char_start : p.char_end], p.alpha, p.weight, response_out.advantage * p.weight)
            for j, p in enumerate(response_out.paragraphs)
        )
        responses.append(ResponseView(i, text, response_in.reward, response_out.advantage, segments))

    maps = visual_alignment
    if maps is None and isinstance(result, ExplainedResult):
        maps = result.visual_alignment
    heatmap = None
    if heatmap_response is not None:
        if not 0 <= heatmap_response < len(responses):
            raise ValueError(f"heat-map response {heatmap_response} does not exist: the group has "
                             f"{len(responses)} responses (0-based)")
        if maps is None:
            raise ValueError("a heat map needs each visual token's alignment, which only the engine's "
                             "explain computes (kawhi explain, Engine.explain or POST /v1/explain)")
        heatmap = [float(v) for v in maps[heatmap_response]]
        if not heatmap:
            raise ValueError(f"response {heatmap_response} is empty: it has no alignment map")
        if len(heatmap) != n_tokens:
            raise ValueError(f"the alignment map holds {len(heatmap)} values for {n_tokens} visual tokens")
    prompt = group.prompt if group.prompt is not None else _messages_text(group.messages or [])
    return GroupView(group.id, prompt, pil, (rows, cols), patch_side, key, selected, responses, heatmap,
                     heatmap_response if heatmap is not None else None, model, is_demo,
                     dict(settings) if settings else None)


def _messages_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text parts of the chat messages, for the caption."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(c.get("text", "")) for c in content if isinstance(c, Mapping) and c.get("type") == "text")
    return "\n".join(p for p in parts if p)
