"""The explain view of a reweighted group: the engine's answer with each visual token's
alignment, drawn by kawhi_client.explain (one renderer for every front end)."""

from __future__ import annotations

from typing import Any

from kawhi_client.explain import Explanation, explain
from kawhi_client.schema import GroupResult, RolloutGroup

__all__ = ["explanation_for"]


def explanation_for(engine: Any, group: RolloutGroup, result: GroupResult, image: Any, *,
                    heatmap_response: int | None = None, max_page_height: int | None = None) -> Explanation:
    """The view of one reweighted group; ``image`` is its decoded PIL image (original size).
    Raises ValueError when the result is an error or ``heatmap_response`` does not exist."""
    resized, _ = engine.model.resize_image(image)
    if any(r.token_ids is not None for r in group.responses):
        # paragraph spans index the text the ids decode to, which may differ from the given text
        responses = [r if r.token_ids is None else r.model_copy(update={"text": engine.model.decode(r.token_ids).text})
                     for r in group.responses]
        group = group.model_copy(update={"responses": responses})
    return explain(group, result, resized, patch_side=engine.model.patch_side, heatmap_response=heatmap_response,
                   model=engine.model_name, is_demo=engine.is_demo, max_page_height=max_page_height)
