"""The method's settings, and the one place where every default is chosen and explained.

`MethodConfig` holds every knob of METHOD.md with the paper's value where the paper
gives one. The wire `Options` (kawhi_client.schema) carries the same names, each
optional; `MethodConfig.updated(options)` resolves a request against the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence, Union

HeadsSpec = Union[Literal["preset", "all"], tuple[int, ...]]


@dataclass(frozen=True)
class SgufParams:
    """SGUF thresholds (METHOD §2), the paper's reported settings."""

    delta_s: float = 0.5  # relative structure-tensor distance for a merge
    delta_l: float = 30.0  # mean-luminance difference (L in [0, 100]) for a merge
    beta: float = 0.1  # tau = beta * median component energy
    sigma: float = 1.0  # Gaussian smoothing of L before Sobel
    eps: float = 1e-8  # guards the relative distance on flat patches


@dataclass(frozen=True)
class MethodConfig:
    """Every option of the method, resolved. Defaults are the paper's unless noted.

    Chosen where the paper is silent (METHOD §5):

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

    estimator: Literal["grpo", "drgrpo", "rloo", "given"] = "grpo"
    std: Literal["population", "unbiased"] = "population"  # paper: population; verl: unbiased
    eps: float = 1e-6
    temperature: float = 0.1
    smoothing: float = 0.1
    w_min: float = 0.1
    w_max: float = 1.0
    normalize: Literal["none", "mean"] = "none"
    heads: HeadsSpec = "preset"
    seed: int = 0
    regions: Literal["sguf", "all", "random", "inverse"] = "sguf"
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
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {self.smoothing}")
        if not 0.0 <= self.skip_ratio <= 1.0:
            raise ValueError(f"skip_ratio must be in [0, 1], got {self.skip_ratio}")
        if not (self.logprob_temperature > 0 and math.isfinite(self.logprob_temperature)):
            raise ValueError(f"logprob_temperature must be a finite number > 0, got {self.logprob_temperature}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        if isinstance(self.heads, list):
            object.__setattr__(self, "heads", tuple(self.heads))
        if isinstance(self.heads, tuple) and (
            not self.heads or any(not isinstance(h, int) or h < 0 for h in self.heads)
        ):
            raise ValueError(f"heads must be 'preset', 'all' or non-empty non-negative ints, got {self.heads}")

    def updated(self, options: Mapping[str, Any] | None) -> "MethodConfig":
        """A copy with every non-None entry of ``options`` applied (validated again)."""
        if not options:
            return self
        known = {f.name for f in dataclasses.fields(self)} - {"sguf"}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown option(s): {sorted(unknown)}")
        changes = {k: v for k, v in options.items() if v is not None}
        if isinstance(changes.get("heads"), Sequence) and not isinstance(changes["heads"], str):
            changes["heads"] = tuple(changes["heads"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options as JSON-ready data (the response envelope's `options`)."""
        out = dataclasses.asdict(self)
        if isinstance(self.heads, tuple):
            out["heads"] = list(self.heads)
        return out
