"""The explain view of a reweighted group: the engine's answer with each visual token's
alignment, drawn by kawhi_client.explain (one renderer for every front end)."""

from __future__ import annotations

import json
from typing import Any

from kawhi_client.explain import Explanation, explain
from kawhi_client.schema import GroupResult, RolloutGroup

__all__ = ["explain_settings", "explanation_for", "most_pages"]


def explain_settings(engine: Any, config: Any = None) -> dict[str, Any]:
    """The settings block of a view: the resolved method config (the engine's defaults when
    None) and where the preset heads came from."""
    settings = (config if config is not None else engine.defaults).to_dict()
    settings["heads_source"] = engine.head_set.source if settings.get("heads") == "preset" else "the request"
    return settings


def explanation_for(engine: Any, group: RolloutGroup, result: GroupResult, image: Any, *,
                    heatmap_response: int | None = None, max_page_height: int | None = None,
                    config: Any = None) -> Explanation:
    """The view of one reweighted group; ``image`` is its decoded PIL image (original size);
    ``config`` the resolved method config that produced ``result`` (None: the engine's defaults).
    Raises ValueError when the result is an error or ``heatmap_response`` does not exist."""
    resized, _ = engine.model.resize_image(image)
    if any(r.token_ids is not None for r in group.responses):
        # paragraph spans index the text the ids decode to, which may differ from the given text
        responses = [r if r.token_ids is None else r.model_copy(update={"text": engine.model.decode(r.token_ids).text})
                     for r in group.responses]
        group = group.model_copy(update={"responses": responses})
    return explain(group, result, resized, patch_side=engine.model.patch_side, heatmap_response=heatmap_response,
                   model=engine.model_name, is_demo=engine.is_demo, max_page_height=max_page_height,
                   settings=explain_settings(engine, config))


def most_pages(engine: Any, group: RolloutGroup, config: Any = None) -> int:
    """An upper bound on the PNG pages of ``group``'s view, known before the forward (the exact
    count depends on the weights, which set the segment labels and so the layout).

    The renderer (kawhi_client.explain.png.render_pages) starts a page only at a row of its
    right column, so pages <= 1 + rows. Rows of a response of ``c`` characters: a header,
    per segment (at most c + 1) a label and a spacer, and its wrapped lines (a line holds a
    character at least, or ends at a newline): at most 5c + 6. The settings block above the
    responses wraps into at most two rows per character of its text."""
    settings_chars = len(json.dumps(explain_settings(engine, config), default=str)) + 1024  # + the fixed wording
    rows = 2 * settings_chars + 16
    for response in group.responses:
        text = response.text if response.token_ids is None else engine.model.decode(response.token_ids).text
        rows += 5 * len(text) + 6
    return 1 + rows
