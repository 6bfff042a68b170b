"""The limits and the engine that the server settings describe: built in this one place
(the request limits admission checks, and the engine's own limits derived from them)."""

from __future__ import annotations

from typing import Any

from kawhi.pipeline.admit import Limits


def limits_of_settings(settings: Any, max_positions: int | None = None) -> Limits:
    """The request limits the settings describe: the one place they are built (the engine's
    own limits are derived from these, :func:`engine_limits`)."""
    from kawhi.engine.images import ImageLimits

    s = settings
    group_tokens = s.batch_tokens if max_positions is None else min(s.batch_tokens, max_positions)
    return Limits(max_groups=s.max_groups, max_responses=s.max_responses_per_group,
                  max_response_tokens=s.max_tokens_per_response, max_group_tokens=group_tokens,
                  max_request_tokens=s.max_request_tokens,
                  image=ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                                    min_side=s.min_image_side))


def engine_limits(settings: Any) -> Any:
    """The engine's limits (kawhi.engine.engine.EngineLimits): the request limits plus the forward's."""
    from kawhi.engine.engine import EngineLimits

    s, limits = settings, limits_of_settings(settings)
    return EngineLimits(max_responses=limits.max_responses, max_response_tokens=limits.max_response_tokens,
                        max_group_tokens=limits.max_group_tokens, max_forward_tokens=s.batch_tokens,
                        split_attention=s.split_attention, prefix_cache_bytes=s.cache_prefix_bytes,
                        image=limits.image)


def load_engine(settings: Any) -> Any:
    """The engine the settings describe (model, device, dtype, limits, method defaults).

    Imports torch and loads weights: call it off the event loop.
    """
    from kawhi.engine.engine import Engine

    s = settings
    threads = s.resolved_torch_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    return Engine.load(s.model, device=s.device, dtype=s.dtype, defaults=s.method_config(),
                       limits=engine_limits(s), heads_file=s.heads_file)
