"""The method's settings, and the one place where every default is chosen and explained.

`MethodConfig` holds every knob of docs/method.md with the paper's value where the paper
gives one. The wire `Options` (kawhi_client.schema) carries the same names, each
optional; `MethodConfig.updated(options)` resolves a request against the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kawhi_client.options import OPTIONS, SGUF_BY_NAME, SGUF_OPTIONS, check_combination, check_option

HeadsSpec = Literal["preset", "all"] | tuple[int, ...]


@dataclass(frozen=True)
class SgufParams:
    """SGUF thresholds (docs/method.md §2), the paper's reported settings."""

    delta_s: float = 0.5  # relative structure-tensor distance for a merge
    delta_l: float = 30.0  # mean-luminance difference (L in [0, 100]) for a merge
    beta: float = 0.1  # tau = beta * median component energy
    sigma: float = 1.0  # Gaussian smoothing of L before Sobel
    eps: float = 1e-8  # guards the relative distance on flat patches

    def __post_init__(self) -> None:
        for spec in SGUF_OPTIONS:
            try:
                object.__setattr__(self, spec.name, check_option(spec, getattr(self, spec.name)))
            except ValueError as exc:
                raise ValueError(f"sguf/{spec.name}: {exc}") from None


@dataclass(frozen=True)
class MethodConfig:
    """Every option of the method, resolved. Defaults are the paper's unless noted.

    Chosen where the paper is silent (docs/method.md §5):

    * ``temperature = 0.1``. alpha is a mean cosine; across the paragraphs of one
      response its spread is a few hundredths. At T = 1 the softmax is nearly uniform
      and the reweighting would erase the signal it measures; at T = 0.1 a paragraph
      0.05 above another gets exp(0.5) ~ 1.65x its softmax mass.
    * ``smoothing = 0.1``. Mixing 10 % of the uniform distribution keeps every
      paragraph's share at least lam/M, so a single paragraph never takes all the
      mass even at small T; w_min already floors the weight itself.
    * ``eps = 1e-6``, as verl's GRPO.
    * Background sampling is seeded with ``(seed, first 8 bytes of the image sha256)``
      so a request is reproducible and different images get different samples.
    """

    estimator: str = "grpo"  # a name in kawhi.engine.estimators.ADVANTAGE_ESTIMATORS
    std: Literal["population", "unbiased"] = "population"  # paper: population; verl: unbiased
    eps: float = 1e-6
    temperature: float = 0.1
    smoothing: float = 0.1
    w_min: float = 0.1
    w_max: float = 1.0
    normalize: Literal["none", "mean"] = "none"
    heads: HeadsSpec = "preset"
    seed: int = 0
    regions: str = "sguf"  # a name in kawhi.engine.regions.REGION_SELECTORS
    similarity: Literal["query_key", "key_key"] = "query_key"
    granularity: Literal["paragraph", "sentence", "token"] = "paragraph"
    rope: Literal["after", "before"] = "after"
    skip_ratio: float = 0.7
    # Outputs beside the weights (docs/ref-logprobs.md): the reference model's per-token
    # log-probs / entropy of the responses, at logits / logprob_temperature (a trainer's
    # rollout temperature, so the numbers match its own).
    return_ref_logprobs: bool = False
    return_entropy: bool = False
    logprob_temperature: float = 1.0
    sguf: SgufParams = field(default_factory=SgufParams)

    def __post_init__(self) -> None:
        """Every value checked against the one definition (kawhi_client.options);
        ValueError("<field>: <why>") names the field."""
        for spec in OPTIONS:
            try:
                value = check_option(spec, getattr(self, spec.name), _registered(spec.registry))
            except ValueError as exc:
                raise ValueError(f"{spec.name}: {exc}") from None
            object.__setattr__(self, spec.name, value)
        if isinstance(self.sguf, Mapping):
            object.__setattr__(self, "sguf", SgufParams(**self.sguf))
        check_combination({spec.name: getattr(self, spec.name) for spec in OPTIONS})

    def updated(self, options: Mapping[str, Any] | None) -> MethodConfig:
        """A copy with every non-None entry of ``options`` applied (validated again);
        ``options["sguf"]`` may hold some SGUF thresholds."""
        if not options:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"options: unknown option(s): {sorted(unknown)}")
        changes = {k: v for k, v in options.items() if v is not None}
        if "sguf" in changes:
            sguf = changes["sguf"]
            if isinstance(sguf, SgufParams):
                pass
            elif isinstance(sguf, Mapping):
                unknown = set(sguf) - set(SGUF_BY_NAME)
                if unknown:
                    raise ValueError(f"sguf: unknown SGUF setting(s): {sorted(unknown)}")
                changes["sguf"] = dataclasses.replace(self.sguf, **{k: v for k, v in sguf.items() if v is not None})
            else:
                raise ValueError("sguf: must be an object of SGUF thresholds")
        if isinstance(changes.get("heads"), list):
            changes["heads"] = tuple(changes["heads"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options as JSON-ready data (the response envelope's `options`)."""
        out = dataclasses.asdict(self)
        if isinstance(self.heads, tuple):
            out["heads"] = list(self.heads)
        return out


def _registered(registry: str | None) -> tuple[str, ...] | None:
    """The names a registry option accepts now (registries can grow at run time)."""
    if registry == "estimators":
        from kawhi.engine.estimators import ADVANTAGE_ESTIMATORS

        return tuple(ADVANTAGE_ESTIMATORS)
    if registry == "regions":
        from kawhi.engine.regions import REGION_SELECTORS

        return tuple(REGION_SELECTORS)
    return None
