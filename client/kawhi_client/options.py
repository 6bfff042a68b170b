"""The one definition of the method's options: name, type, default, range, help.

Everything else derives from ``OPTIONS`` and ``SGUF_OPTIONS``:

* the wire model ``kawhi_client.schema.Options`` (and its nested ``SgufOptions``),
* the server-side validation (``kawhi.engine.config.MethodConfig`` checks every value
  with :func:`check_option`), so a value outside its range fails at the boundary with
  the pointer ``/options/<name>`` (``/options/sguf/<name>``),
* the CLI flags ``--<name>`` / ``--sguf-<name>`` and the server settings
  ``KAWHI_<NAME>`` / ``KAWHI_SGUF_<NAME>``.

``estimator`` and ``regions`` are registry names: the service accepts whatever is
registered there (``register_advantage_estimator``, ``register_region_selector``);
``choices`` lists the built-in ones. The defaults are the paper's; where the paper is
silent the choice is explained in ``kawhi/engine/config.py``. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: str  # "float" | "int" | "choice" | "heads" | "bool"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()  # for "choice": the built-in values
    registry: str | None = None  # "estimators" | "regions": any registered name is accepted

    def range_text(self) -> str:
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{'(' if self.exclusive_minimum else '['}{lo}, {hi}]"


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("estimator", "choice", "grpo", "group advantage estimator (a registered name)",
               choices=("grpo", "drgrpo", "rloo", "given"), registry="estimators"),
    OptionSpec("std", "choice", "population", "std of grpo: population (paper) or unbiased (verl)",
               choices=("population", "unbiased")),
    OptionSpec("eps", "float", 1e-6, "added to the std of grpo", minimum=0.0, maximum=1.0),
    OptionSpec("temperature", "float", 0.1, "softmax temperature of the segment weights",
               minimum=1e-4, maximum=1e4),
    OptionSpec("smoothing", "float", 0.1, "share of the uniform distribution mixed into the weights",
               minimum=0.0, maximum=1.0),
    OptionSpec("w_min", "float", 0.1, "smallest segment weight (0 <= w_min <= w_max)", minimum=0.0, maximum=1e6),
    OptionSpec("w_max", "float", 1.0, "largest segment weight", minimum=0.0, maximum=1e6),
    OptionSpec("normalize", "choice", "none", "rescale weights to a token-weighted mean of 1 ('mean')",
               choices=("none", "mean")),
    OptionSpec("heads", "heads", "preset", "'preset', 'all' or a list of query-head indices"),
    OptionSpec("seed", "int", 0, "seed of the random/background region sampling", minimum=0, maximum=SEED_MAX),
    OptionSpec("regions", "choice", "sguf", "key-region selector (a registered name)",
               choices=("sguf", "all", "random", "inverse"), registry="regions"),
    OptionSpec("similarity", "choice", "query_key", "alignment probes: query-key (paper) or key-key",
               choices=("query_key", "key_key")),
    OptionSpec("granularity", "choice", "paragraph", "segments that get one weight each",
               choices=("paragraph", "sentence", "token")),
    OptionSpec("rope", "choice", "after", "q/k taken after (paper) or before RoPE", choices=("after", "before")),
    OptionSpec("skip_ratio", "float", 0.7, "share of non-key visual tokens skipped", minimum=0.0, maximum=1.0),
    # outputs beside the weights, from the same forward (docs/ref-logprobs.md)
    OptionSpec("return_ref_logprobs", "bool", False,
               "also return each response's reference log-probs, one per token (ref_logprobs)"),
    OptionSpec("return_entropy", "bool", False,
               "also return the entropy of the reference's next-token distribution, one per token (entropy)"),
    OptionSpec("logprob_temperature", "float", 1.0,
               "logits / it before those log-probs (the trainer's sampling temperature)",
               minimum=0.0, maximum=1e4, exclusive_minimum=True),
)

SGUF_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("delta_s", "float", 0.5, "relative structure-tensor distance for a merge", minimum=0.0, maximum=1e3),
    OptionSpec("delta_l", "float", 30.0, "mean-luminance difference (L in [0, 100]) for a merge",
               minimum=0.0, maximum=100.0),
    OptionSpec("beta", "float", 0.1, "tau = beta * median component energy", minimum=0.0, maximum=1e3),
    OptionSpec("sigma", "float", 1.0, "Gaussian smoothing of L before Sobel", minimum=0.0, maximum=100.0),
    OptionSpec("eps", "float", 1e-8, "guards the relative distance on flat patches", minimum=0.0, maximum=1.0,
               exclusive_minimum=True),
)

BY_NAME: dict[str, OptionSpec] = {o.name: o for o in OPTIONS}
SGUF_BY_NAME: dict[str, OptionSpec] = {o.name: o for o in SGUF_OPTIONS}
MAX_HEADS = 4096


def check_option(spec: OptionSpec, value: Any, registered: Any | None = None) -> Any:
    """``value`` checked against ``spec`` (ValueError with a caller-facing message), normalised.

    registered: the names a registry option accepts (default: the built-in choices).
    """
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{spec.name} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{spec.name} must be finite")
        too_low = spec.minimum is not None and (value <= spec.minimum if spec.exclusive_minimum
                                                else value < spec.minimum)
        if too_low or (spec.maximum is not None and value > spec.maximum):
            raise ValueError(f"{spec.name} must lie in {spec.range_text()}, got {value:g}")
        return value
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{spec.name} must be an integer")
        if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
            raise ValueError(f"{spec.name} must be an integer in [{spec.minimum:.0f}, {spec.maximum:.0f}]")
        return value
    if spec.kind == "choice":
        names = tuple(registered) if registered is not None else spec.choices
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"{spec.name} must be one of {sorted(names)}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{spec.name} must be true or false")
        return value
    if spec.kind == "heads":
        if value in ("preset", "all"):
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError("heads must be 'preset', 'all' or a list of head indices")
        if not value or len(value) > MAX_HEADS:
            raise ValueError(f"heads must list between 1 and {MAX_HEADS} head indices")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in value):
            raise ValueError("heads must be non-negative integers")
        return tuple(value)
    raise AssertionError(spec.kind)


def check_combination(values: dict[str, Any]) -> None:
    """Rules across options (ValueError naming the field first: ``"w_min: ..."``)."""
    if values["w_min"] > values["w_max"]:
        raise ValueError(f"w_min: w_min ({values['w_min']:g}) must be <= w_max ({values['w_max']:g})")
    if values["normalize"] == "mean" and not values["w_max"] > 0:
        raise ValueError("w_max: normalize 'mean' needs w_max > 0 (weights that are all 0 cannot be rescaled)")
