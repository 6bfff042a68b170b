"""One benchmark context: a model, its engine, its eager twin, and workload groups."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench import methods
from bench.models import build_reference, eager_twin
from bench.workload import Group, GroupSpec, make_group, prepare


def quiet() -> None:
    """Silence the engine's demo/preset warnings and transformers' chatter in benchmark output."""
    logging.getLogger("kawhi").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class Bench:
    def __init__(self, model: str = "demo", *, device: str = "cpu", dtype: str = "auto",
                 threads: int | None = None, split_attention: bool | None = None, layers: int | None = None,
                 vision_depth: int | None = None) -> None:
        import torch

        quiet()
        if threads:
            torch.set_num_threads(threads)
        from kawhi.engine.engine import Engine, EngineLimits

        self.model_kind = model
        self.device = device
        # Timings repeat calls on the same groups: no prefix kept across calls, so every call
        # pays its prefixes (bench/prefix_share.py measures the cache itself).
        limits = EngineLimits(prefix_cache_bytes=0, split_attention=split_attention)
        if model == "demo":
            self.engine = Engine.load(device=device, limits=limits)
        else:
            self.engine = Engine(build_reference(model, device=device, dtype=dtype, layers=layers,
                                                 vision_depth=vision_depth), limits=limits)
        self.reference = self.engine.model
        self.threads = torch.get_num_threads()

    @functools.cached_property
    def eager(self) -> Any:
        return eager_twin(self.reference)

    def groups(self, spec: GroupSpec, n: int = 1) -> list[Group]:
        """n groups of this shape, each with its own seed (own image and responses)."""
        return [make_group(self.reference, replace(spec, seed=spec.seed + i)) for i in range(n)]

    def prepare(self, groups: list[Group]) -> list[Any]:
        return [prepare(self.engine, g) for g in groups]

    def call(self, method: str, prepared: list[Any]) -> Callable[[], Any]:
        """A zero-argument callable running ``method`` (kawhi | bare | naive) over ``prepared``."""
        if method == "kawhi":
            return lambda: methods.kawhi(self.engine, prepared)
        if method == "bare":
            return lambda: methods.bare(self.reference, prepared)
        if method == "naive":
            eager = self.eager
            return lambda: methods.naive(eager, prepared)
        raise ValueError(f"unknown method {method!r}")
