"""KAWHI in TRL: ``KawhiGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss sees KAWHI's
per-token advantages. Exercised with trl 1.16.0; importing this module with a trl outside
``trl>=1.16,<1.17`` fails in one line (``KAWHI_ALLOW_UNTESTED_TRL=1``: a warning instead),
since it overrides a private TRL method (see docs/integrations.md).

The change to a TRL script is three lines::

    from kawhi_client.integrations.trl import KawhiGRPOTrainer           # 1. import
    trainer = KawhiGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...,
                               processing_class=..., kawhi="http://kawhi:8000")   # 2. was GRPOTrainer(...)
    trainer.train()                                                      # 3. unchanged

How it hooks in (trl 1.16, ``trl/trainer/grpo_trainer.py``):

* ``GRPOTrainer._generate_and_score_completions(inputs)`` generates the completions,
  scores them and computes the group advantages, returned as ``output["advantages"]`` of
  shape ``(B,)`` (B = this process's rows), next to ``completion_ids`` / ``completion_mask``
  of shape ``(B, T)``.
* ``GRPOTrainer._compute_loss`` reads ``inputs["advantages"]`` and, when it is 1-D,
  ``unsqueeze(1)``s it; every loss type (grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo,
  vespo) then multiplies it with per-token tensors of shape ``(B, T)``. A ``(B, T)``
  tensor is used as is — that is the supported extension point.

``KawhiGRPOTrainer`` overrides ``_generate_and_score_completions``: it calls TRL's own,
then sends, per row, the batch's image, the prompt (as chat messages, with the image part
where TRL puts it), the trainer's OWN completion token ids (those under
``completion_mask``) and TRL's own advantage of that row (as the group's ``advantages``:
docs/api.md's "given" estimator, so KAWHI only reweights and TRL's ``scale_rewards``,
multi-objective aggregation etc. stay in force). The service answers one advantage per
token id: ``A_i * w_{i,t}``. Those fill a ``(B, T)`` tensor at the completion-mask positions
(0 elsewhere), which replaces ``output["advantages"]``. Rows with advantage exactly 0 are
not sent (their token advantages are 0 whatever the weights).

Reference log-probs from the service (``kawhi_ref_logprobs=True``, with ``beta > 0``): the
KAWHI reference is the initial policy, which is also the KL reference TRL would keep a
second copy of. TRL then builds no reference model (``GRPOTrainer.__init__`` skips it when
``beta == 0``, so the trainer is built with ``beta`` 0 and the configured value restored
right after), runs no reference forward (``_generate_and_score_completions`` computes
``ref_per_token_logps`` only when ``beta != 0``; it runs with ``beta`` 0) and its loss
(``_compute_loss``, ``beta`` restored) reads ``ref_per_token_logps`` — which this class
fills from the service's ``ref_logprobs``, computed at TRL's own ``temperature``
(``logprob_temperature``), in the same call that returns the advantages. A missing
reference log-prob always fails the step (there is no honest fallback for a KL reference).

Failure policy: ``kawhi_on_error="raise"`` (default) fails the step with
``KawhiIntegrationError``; ``"fallback"`` keeps TRL's uniform advantages for the affected
rows, counts them (``trainer.kawhi.policy``) and warns once per event. The counters are
also logged with TRL's metrics: ``kawhi/reweighted_frac``, ``kawhi/fallback_rows``,
``kawhi/fallbacks_total``, ``kawhi/weight_mean``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import trl
from trl import GRPOTrainer

from kawhi_client.integrations.common import (
    FailurePolicy,
    KawhiIntegrationError,
    OnError,
    Reweighter,
    Rollout,
    RowResult,
    check_options,
    insert_image_placeholder,
    wire_messages,
)

__all__ = ["KawhiGRPOTrainer", "kawhi_rollouts_from_trl", "ref_logprobs_tensor", "token_advantages_tensor"]

# KawhiGRPOTrainer overrides TRL's private _generate_and_score_completions and reads the keys
# of the dict it returns: a TRL outside the range tested here may change both without notice
# (the dev extra pins the same range, so CI tests exactly these releases).
TESTED_TRL = ((1, 16), (1, 17))  # [lowest, highest) as (major, minor)
TESTED_TRL_TEXT = "trl>=1.16,<1.17"
UNTESTED_TRL_ENV = "KAWHI_ALLOW_UNTESTED_TRL"  # "1": only warn outside the range


def check_trl_version(version: str, allow_untested: bool = False) -> None:
    """ImportError (one line) when ``version`` is outside ``TESTED_TRL``; a warning instead
    when ``allow_untested``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    release = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    low, high = TESTED_TRL
    if low <= release < high:
        return
    message = (f"KawhiGRPOTrainer is tested with {TESTED_TRL_TEXT} (it overrides TRL's private "
               f"_generate_and_score_completions); trl {version} is installed: pip install '{TESTED_TRL_TEXT}'"
               f", or set {UNTESTED_TRL_ENV}=1 to try it anyway")
    if allow_untested:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(message)


check_trl_version(trl.__version__, allow_untested=os.environ.get(UNTESTED_TRL_ENV) == "1")

# ref_per_token_logps outside completion_mask: very negative, so TRL's per-token KL there,
# exp(ref - logp) - (ref - logp) - 1, stays finite (exp never overflows) before the mask zeroes it
_MASKED_REF_LOGP = -1.0e4


class KawhiGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with KAWHI per-paragraph token advantages.

    All of ``GRPOTrainer``'s arguments, plus (keyword only):

    Args:
        kawhi: the KAWHI backend: a URL (``"http://kawhi:8000"``), a
            ``kawhi_client.Client``, a ``kawhi.engine.engine.Engine`` (in-process: no HTTP),
            ``HttpBackend(...)`` / ``InProcessBackend(...)``, or a ready ``Reweighter``.
        kawhi_options: API options for every call (``{"temperature": 0.1, "normalize": "mean"}``);
            validated at construction.
        kawhi_on_error: ``"raise"`` (default) or ``"fallback"`` (see module doc).
        kawhi_policy: a ``FailurePolicy`` to share its counters (overrides ``kawhi_on_error``).
        kawhi_ref_logprobs: take the KL reference log-probs from the service instead of a
            reference model (needs ``beta > 0``; see module doc). The service must serve the
            policy's initial weights.

    ``self.kawhi`` is the ``Reweighter``; ``self.kawhi.policy`` holds the counters;
    ``self.kawhi_last`` the ``RowResult`` list of the latest batch.

    The dataset must be conversational with one image per prompt (an ``image`` column, or
    an ``images`` column holding one image), as TRL's VLM GRPO expects anyway.
    """

    def __init__(
        self,
        *args: Any,
        kawhi: Any,
        kawhi_options: Mapping[str, Any] | None = None,
        kawhi_on_error: OnError = "raise",
        kawhi_policy: FailurePolicy | None = None,
        kawhi_ref_logprobs: bool = False,
        **kwargs: Any,
    ) -> None:
        # Validate the KAWHI side before TRL builds anything heavy.
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if isinstance(kawhi, Reweighter):
            if kawhi_options is not None or kawhi_policy is not None:
                raise TypeError("pass options/policy to the Reweighter itself, not next to it")
            if kawhi_ref_logprobs:
                kawhi.options = _with_ref_options(kawhi.options, config)
            reweighter = kawhi
        else:
            if kawhi_ref_logprobs:
                kawhi_options = _with_ref_options(check_options(kawhi_options), config)
            reweighter = Reweighter(kawhi, options=kawhi_options, on_error=kawhi_on_error, policy=kawhi_policy)
        self.kawhi_ref_logprobs = kawhi_ref_logprobs
        if kawhi_ref_logprobs:
            _check_left_padding(kwargs.get("processing_class"))
            beta, config.beta = config.beta, 0.0  # TRL builds a reference model only when beta != 0
            try:
                super().__init__(*args, **kwargs)
            finally:
                config.beta = beta
            self.beta = beta
        else:
            super().__init__(*args, **kwargs)
        self.kawhi = reweighter
        self.kawhi_last: list[RowResult] = []
        self.kawhi_tokenizer_ok: bool | None = None  # checked against the service at the first batch
        self._kawhi_checked = False

    # ------------------------------------------------------------------ the hook
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kawhi_ref_logprobs:
            beta, self.beta = self.beta, 0.0  # TRL's reference forward runs only when beta != 0
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self.beta = beta
        else:
            output = super()._generate_and_score_completions(inputs)
        advantages = output["advantages"]
        if advantages.dim() != 1:  # another subclass already made them per token
            raise KawhiIntegrationError(
                f"KawhiGRPOTrainer expects TRL's (B,) advantages, got shape {tuple(advantages.shape)}")
        if not self._kawhi_checked:
            self._kawhi_checked = True
            self.kawhi_tokenizer_ok = self.kawhi.check_tokenizer(self.processing_class)
        rollouts = kawhi_rollouts_from_trl(inputs, output, self.processing_class)
        rows = self.kawhi.reweight(rollouts)
        self.kawhi_last = rows
        output["advantages"] = token_advantages_tensor(rows, output["completion_mask"], advantages)
        if self.kawhi_ref_logprobs:
            output["ref_per_token_logps"] = ref_logprobs_tensor(rows, output["completion_mask"])
        self._log_kawhi(rows, output["completion_mask"])
        return output

    def _log_kawhi(self, rows: Sequence[RowResult], mask: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        sent = [r for r in rows if r.reweighted or (r.reason or "").startswith("fallback")]
        metrics = self._metrics[mode]
        n_fallback = sum(1 for r in rows if (r.reason or "").startswith("fallback"))
        metrics["kawhi/fallback_rows"].append(float(n_fallback))
        metrics["kawhi/reweighted_frac"].append(
            float(sum(r.reweighted for r in rows)) / len(sent) if sent else 1.0)
        metrics["kawhi/fallbacks_total"].append(float(self.kawhi.policy.fallbacks))
        weights = [w for r in rows if r.reweighted for w in r.token_weights]
        if weights:
            metrics["kawhi/weight_mean"].append(sum(weights) / len(weights))


def _row_image(row: Mapping[str, Any], index: int) -> Any:
    if row.get("images") is not None:
        images = row["images"]
        if len(images) != 1:
            raise ValueError(f"row {index} holds {len(images)} images; KAWHI needs exactly one per prompt")
        return images[0]
    return row.get("image")


def kawhi_rollouts_from_trl(inputs: Sequence[Mapping[str, Any]], output: Mapping[str, Any],
                            processing_class: Any = None) -> list[Rollout]:
    """TRL's batch (``inputs``: the dataset rows; ``output``: what
    ``_generate_and_score_completions`` returned) -> one ``Rollout`` per row.

    Token ids are the row's ``completion_ids`` where ``completion_mask`` is set (what the
    loss covers); the advantage is TRL's own ``output["advantages"][i]``.
    """
    completion_ids = output["completion_ids"].detach().cpu()
    mask = output["completion_mask"].detach().cpu().bool()
    advantages = output["advantages"].detach().cpu().tolist()
    if len(inputs) != completion_ids.size(0):
        raise KawhiIntegrationError(f"{len(inputs)} dataset rows for {completion_ids.size(0)} completions")
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    rollouts = []
    for i, row in enumerate(inputs):
        ids = completion_ids[i][mask[i]].tolist()
        image, messages, prompt, error = None, None, None, None
        raw = row.get("prompt")
        try:
            image = _row_image(row, i)
            if isinstance(raw, str):
                prompt = raw  # TRL itself refuses images with non-conversational prompts
            elif raw is not None:
                messages, found = wire_messages(raw)
                if not found:
                    messages = insert_image_placeholder(messages)
                elif len(found) > 1:
                    raise ValueError(f"row {i}: the prompt holds {len(found)} images; KAWHI needs exactly one")
                elif image is None:
                    image = found[0]
        except ValueError as exc:
            error = str(exc)  # the Reweighter reports the row under the failure policy
        text = ""
        if tokenizer is not None and ids and hasattr(tokenizer, "decode"):
            text = tokenizer.decode(ids, skip_special_tokens=False)
        rollouts.append(Rollout(token_ids=ids, image=image, prompt=prompt, messages=messages,
                                advantage=float(advantages[i]), text=text, error=error))
    return rollouts


def token_advantages_tensor(rows: Sequence[RowResult], completion_mask: torch.Tensor,
                            advantages: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` advantages: row i's token advantages at the positions where its mask is set,
    0 elsewhere. A row that was not reweighted gets TRL's own ``advantages[i]`` there (its
    ``RowResult`` holds exactly that), so the loss is the one TRL would compute."""
    mask = completion_mask.bool()
    out = torch.zeros(mask.shape, dtype=advantages.dtype, device=advantages.device)
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        if len(row.token_advantages) != n:
            raise KawhiIntegrationError(f"row {i}: {len(row.token_advantages)} token advantages for {n} masked tokens")
        if n:
            out[i, mask[i]] = torch.tensor(row.token_advantages, dtype=advantages.dtype, device=advantages.device)
    return out


def _check_left_padding(processing_class: Any) -> None:
    """trl 1.16 left-pads prompt_ids itself but takes mm_token_type_ids as the processor padded
    them: with a right-padding processor, a shorter prompt's image positions slip and the
    policy's own log-probs are computed at wrong rotary positions (TRL's default processor,
    AutoProcessor(..., padding_side="left"), is fine). The service's reference would then
    disagree with the policy for exactly those rows."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if getattr(tokenizer, "padding_side", "left") != "left":
        raise ValueError("kawhi_ref_logprobs=True needs a processing_class that pads on the left "
                         "(processing_class.tokenizer.padding_side = 'left', as TRL's own default): with right "
                         "padding TRL misaligns mm_token_type_ids of shorter prompts")


def _with_ref_options(options: Mapping[str, Any] | None, config: Any) -> dict[str, Any]:
    """The API options for service reference log-probs at TRL's own temperature; checks the config."""
    if config is None or not getattr(config, "beta", 0.0):
        raise ValueError("kawhi_ref_logprobs=True needs a GRPOConfig with beta > 0 (the KL term's weight); "
                         "with beta = 0 TRL uses no reference log-probs")
    if getattr(config, "sync_ref_model", False):
        raise ValueError("kawhi_ref_logprobs=True cannot follow sync_ref_model=True: the service's reference "
                         "is the frozen initial policy")
    options = dict(options or {})
    temperature = float(config.temperature)
    if options.get("logprob_temperature", temperature) != temperature:
        raise ValueError(f"kawhi_options logprob_temperature={options['logprob_temperature']} differs from "
                         f"GRPOConfig.temperature={temperature}, which TRL divides its logits by")
    options.update(return_ref_logprobs=True, logprob_temperature=temperature)
    return options


def ref_logprobs_tensor(rows: Sequence[RowResult], completion_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float32 ``ref_per_token_logps``: row i's service log-probs at the positions where
    its mask is set, a very negative constant elsewhere (masked out by TRL's loss). Every row
    must have them: a row without (the service failed for it) fails the step."""
    mask = completion_mask.bool()
    out = torch.full(mask.shape, _MASKED_REF_LOGP, dtype=torch.float32, device=completion_mask.device)
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        if row.ref_logprobs is None:
            raise KawhiIntegrationError(f"row {i}: no reference log-probs from the service ({row.reason}); "
                                        "the KL term has no reference to fall back to")
        if len(row.ref_logprobs) != n:
            raise KawhiIntegrationError(f"row {i}: {len(row.ref_logprobs)} reference log-probs for {n} masked tokens")
        if n:
            out[i, mask[i]] = torch.tensor(row.ref_logprobs, dtype=torch.float32, device=completion_mask.device)
    return out
