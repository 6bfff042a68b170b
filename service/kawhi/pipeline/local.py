"""In-process use, synchronously: the pipeline's steps over an engine in this process.

``LocalService(engine)`` is what the CLI (``kawhi reweight``, ``kawhi explain``), the
trainer integrations' in-process backend and notebooks call: the same parse -> admit
-> prepare -> run -> assemble as the server (kawhi.pipeline.core), so the same bad
group gets the same error kind and pointer (relative to the group here), without a
queue, an event loop or a cache of answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kawhi_client.schema import GroupResult, ImageRef, Options, Problem, RolloutGroup

from kawhi.engine.images import decode_image
from kawhi.errors import KawhiError
from kawhi.pipeline.core import Pipeline


class LocalService:
    """The pipeline over one engine, in this thread (the engine is not thread-safe)."""

    def __init__(self, engine: Any, *, region_cache: Any = None) -> None:
        self.engine = engine
        self.pipeline = Pipeline(engine, region_cache=region_cache)

    def reweight(
        self,
        groups: Sequence[RolloutGroup | Mapping[str, Any]],
        options: Options | Mapping[str, Any] | None = None,
        *,
        load_image: Callable[[ImageRef], bytes] | None = None,
        explain: bool = False,
        base_dir: Path | None = None,
    ) -> list[GroupResult]:
        """One result per group; a bad group yields a result with ``error``.

        explain: also compute each visual token's alignment per response (results are then
        ``kawhi_client.schema.ExplainedResult``); see :meth:`explain` for the pictures.
        Images come as ``data`` or a local ``path`` (relative to ``base_dir`` when given);
        load_image resolves a ``sha256`` reference. Invalid options raise OptionsError (a
        KawhiError at ``/options/<name>``).
        """
        pipeline = self.pipeline
        return pipeline.reweight(pipeline.parse_groups(groups, options), load_image=load_image,
                                 explain=explain, base_dir=base_dir).results

    def explain(
        self,
        groups: Sequence[RolloutGroup | Mapping[str, Any]],
        options: Options | Mapping[str, Any] | None = None,
        *,
        load_image: Callable[[ImageRef], bytes] | None = None,
        base_dir: Path | None = None,
        heatmap_response: int | None = None,
        max_page_height: int | None = None,
    ) -> list[Any]:
        """The explain view of each group (kawhi_client.explain.Explanation), or its failed
        GroupResult (also when it asks for a heat map of a response it lacks)."""
        from kawhi.engine.engine import load_image_bytes
        from kawhi.pipeline.explain import explanation_for

        engine = self.engine
        load_image = load_image or functools.partial(load_image_bytes, base_dir=base_dir)
        results = self.reweight(groups, options, load_image=load_image, explain=True, base_dir=base_dir)
        config = engine.resolve_options(options)
        out: list[Any] = []
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
                out.append(GroupResult(id=group.id, error=Problem(**KawhiError("validation", str(exc)).to_problem())))
        return out

    def info(self) -> dict[str, Any]:
        return self.engine.info()


__all__ = ["LocalService"]
