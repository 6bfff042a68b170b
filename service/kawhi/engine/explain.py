"""In-process explain: reweight groups with each visual token's alignment, then build
their explain views (kawhi_client.explain draws them; one renderer for every front end)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kawhi_client.explain import Explanation, explain
from kawhi_client.schema import GroupResult, ImageRef, Options, Problem, RolloutGroup

from kawhi.engine.images import decode_image

__all__ = ["explain_groups", "explain_settings", "explanation_for"]


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


def explain_groups(
    engine: Any,
    groups: Sequence[RolloutGroup | Mapping[str, Any]],
    options: Options | Mapping[str, Any] | None = None,
    *,
    load_image: Callable[[ImageRef], bytes] | None = None,
    base_dir: Path | None = None,
    heatmap_response: int | None = None,
    max_page_height: int | None = None,
) -> list[Explanation | GroupResult]:
    """Engine.reweight(..., explain=True), then one Explanation per group that succeeded;
    a group that failed (or asks for a heat map of a response it lacks) stays a
    GroupResult with ``error``. load_image and base_dir as in Engine.reweight."""
    from kawhi.engine.engine import load_image_bytes

    load_image = load_image or functools.partial(load_image_bytes, base_dir=base_dir)
    results = engine.reweight(groups, options, load_image=load_image, explain=True, base_dir=base_dir)
    config = engine.resolve_options(options)
    out: list[Explanation | GroupResult] = []
    for raw, result in zip(groups, results):
        if result.error is not None:
            out.append(result)
            continue
        group = raw if isinstance(raw, RolloutGroup) else RolloutGroup.model_validate(raw)
        image = decode_image(load_image(group.image), engine.limits.image)
        try:
            out.append(explanation_for(engine, group, result, image, heatmap_response=heatmap_response,
                                       max_page_height=max_page_height, config=config))
        except ValueError as exc:
            out.append(GroupResult(id=group.id, error=Problem(title="Cannot explain this group", status=422,
                                                              detail=str(exc), pointer="")))
    return out
