"""KAWHI in TRL: ``KawhiGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss sees KAWHI's
per-token advantages. Exercised with trl 1.16.0 (see docs/integrations.md).

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

Failure policy: ``kawhi_on_error="raise"`` (default) fails the step with
``KawhiIntegrationError``; ``"fallback"`` keeps TRL's uniform advantages for the affected
rows, counts them (``trainer.kawhi.policy``) and warns once per event. The counters are
also logged with TRL's metrics: ``kawhi/reweighted_frac``, ``kawhi/fallback_rows``,
``kawhi/fallbacks_total``, ``kawhi/weight_mean``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from trl import GRPOTrainer

from kawhi_client.integrations.common import (
    FailurePolicy,
    KawhiIntegrationError,
    OnError,
    Reweighter,
    Rollout,
    RowResult,
    insert_image_placeholder,
    wire_messages,
)

__all__ = ["KawhiGRPOTrainer", "kawhi_rollouts_from_trl", "token_advantages_tensor"]


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

    ``self.kawhi`` is the ``Reweighter``; ``self.kawhi.policy`` holds the counters;
    ``self.kawhi_last`` the ``RowResult`` list of the latest batch.

    The dataset must be conversational with one image per prompt (an ``image`` column, or
    an ``images`` column holding one image), as TRL's VLM GRPO expects anyway.
    """

    def __init__(
        self,
        *args: Any,
        kawhi: Any,
        kawhi_options: Optional[Mapping[str, Any]] = None,
        kawhi_on_error: OnError = "raise",
        kawhi_policy: Optional[FailurePolicy] = None,
        **kwargs: Any,
    ) -> None:
        # Validate the KAWHI side before TRL builds anything heavy.
        if isinstance(kawhi, Reweighter):
            if kawhi_options is not None or kawhi_policy is not None:
                raise TypeError("pass options/policy to the Reweighter itself, not next to it")
            reweighter = kawhi
        else:
            reweighter = Reweighter(kawhi, options=kawhi_options, on_error=kawhi_on_error, policy=kawhi_policy)
        super().__init__(*args, **kwargs)
        self.kawhi = reweighter
        self.kawhi_last: list[RowResult] = []
        self.kawhi_tokenizer_ok: Optional[bool] = None  # checked against the service at the first batch
        self._kawhi_checked = False

    # ------------------------------------------------------------------ the hook
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
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
