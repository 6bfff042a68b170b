"""``Reweighter``: a trainer's rollouts in, per-token advantages out, under a failure policy.

It turns rollouts (image, prompt, the trainer's own response token ids, the trainer's own
advantage) into one ``RowResult`` per rollout: the per-token advantages, aligned
one-to-one with the token ids sent. Rollouts that share an image and prompt travel as one
group (the service runs their prefix once). The trainer's advantages are sent as the
group's ``advantages`` (docs/api.md: the service then only reweights), so the trainer
keeps its own estimator (TRL's ``scale_rewards``, verl's ``norm_adv_by_std_in_grpo`` ...)
and KAWHI contributes the per-paragraph weights.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kawhi_client.arrays import token_weights_from_paragraphs
from kawhi_client.integrations.backends import as_backend
from kawhi_client.integrations.inputs import image_bytes, image_key, tokenizer_fingerprints
from kawhi_client.integrations.policy import FailurePolicy, KawhiTokenizerWarning, OnError
from kawhi_client.schema import GroupResult, Options

log = logging.getLogger("kawhi_client.integrations")

@dataclass
class Rollout:
    """One response of a trainer, as KAWHI needs it.

    ``token_ids``: the trainer's own response tokens (the service scores exactly these and
    returns one advantage per id). ``image``: any form ``image_bytes`` accepts. ``prompt``
    (a string; the image goes first) or ``messages`` (chat messages with exactly one image
    part). ``advantage``: the trainer's own advantage of this response (sent as the group's
    ``advantages``: KAWHI only reweights it). ``text``: the decoded response, for logs.
    """

    token_ids: Sequence[int]
    image: Any = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    advantage: float = 1.0
    text: str = ""
    group_id: str | None = None
    error: str | None = None  # set by an adapter that could not build the rollout (reported under the policy)


@dataclass
class RowResult:
    """Per-token advantages of one rollout, one per token id sent.

    ``reweighted``: True when they are KAWHI's; False when they are the uniform ones
    (``[advantage] * T``, weights 1): ``reason`` says why ("fallback: ...", "zero advantage",
    "empty response").
    """

    token_advantages: list[float]
    token_weights: list[float]
    reweighted: bool
    reason: str | None = None
    paragraphs: list[Any] = field(default_factory=list)
    # the reference model's per-token log-probs / entropy, when the options asked for them
    # (None when not asked, or when this row fell back)
    ref_logprobs: list[float] | None = None
    entropy: list[float] | None = None

    @classmethod
    def uniform(cls, advantage: float, n: int, reason: str) -> RowResult:
        return cls([float(advantage)] * n, [1.0] * n, False, reason)


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """API options as a plain dict, validated now (a typo fails at construction, not mid-run)."""
    if options is None:
        return {}
    if isinstance(options, Options):
        return options.model_dump(exclude_none=True)
    return Options.model_validate(dict(options)).model_dump(exclude_none=True)


class Reweighter:
    """Rollouts in, per-token advantages out, under a failure policy.

    Args:
        backend: anything ``as_backend`` accepts (URL, Client, Engine, backend).
        options: API options for every call (``{"temperature": 0.1, "normalize": "mean"}``).
        on_error: ``"raise"`` or ``"fallback"`` (see ``FailurePolicy``); ignored when
            ``policy`` is given.
        policy: a ``FailurePolicy`` to share (e.g. across trainers).
        skip_zero_advantage: responses whose advantage is exactly 0 are not sent: their
            token advantages are 0 whatever the weights (this is exact, not a fallback).
            Ignored when the options ask for reference log-probs or entropy (every row needs them).
        max_group_size: rollouts sharing an image and prompt are sent as groups of at
            most this many responses (the service's default limit is 64).
    """

    def __init__(
        self,
        backend: Any,
        *,
        options: Mapping[str, Any] | None = None,
        on_error: OnError = "raise",
        policy: FailurePolicy | None = None,
        skip_zero_advantage: bool = True,
        max_group_size: int = 32,
    ) -> None:
        self.backend = as_backend(backend)
        self.options = check_options(options)
        self.policy = policy if policy is not None else FailurePolicy(on_error)
        self.skip_zero_advantage = skip_zero_advantage
        if max_group_size < 1:
            raise ValueError("max_group_size must be >= 1")
        self.max_group_size = max_group_size

    @property
    def on_error(self) -> OnError:
        return self.policy.on_error

    @property
    def wants_ref_logprobs(self) -> bool:
        """Whether the options ask the service for reference log-probs or entropy."""
        return bool(self.options.get("return_ref_logprobs") or self.options.get("return_entropy"))

    def check_tokenizer(self, tokenizer: Any) -> bool | None:
        """Compare the trainer's tokenizer with the service's (``tokenizer_fingerprint`` of
        ``info()``). Returns True (same), False (different: logged and warned with
        ``KawhiTokenizerWarning``, since different serialisations may still agree on the
        ids actually used) or None (not known: no ``info``, or the service unreachable)."""
        info = getattr(self.backend, "info", None)
        local = tokenizer_fingerprints(tokenizer)
        if not callable(info) or not local:
            return None
        try:
            remote = info().get("tokenizer_fingerprint")
        except Exception as exc:
            log.debug("KAWHI tokenizer check skipped: %s", exc)
            return None
        if not remote:
            return None
        if remote not in local:
            text = (f"KAWHI: the service's tokenizer (fingerprint {remote}) differs from the trainer's "
                    f"({', '.join(sorted(local))}); "
                    "the service reads the trainer's token ids with its own vocabulary, so paragraph boundaries "
                    "may be wrong. Serve the policy's initial model (or one with the same tokenizer).")
            log.warning(text)
            warnings.warn(text, KawhiTokenizerWarning, stacklevel=2)
            return False
        return True

    def reweight(self, rollouts: Sequence[Rollout]) -> list[RowResult]:
        """One RowResult per rollout, in order; applies the failure policy to every failure."""
        results: list[RowResult | None] = [None] * len(rollouts)
        buckets: dict[tuple[str, str], list[int]] = {}
        payloads: dict[str, Any] = {}
        for i, r in enumerate(rollouts):
            n = len(r.token_ids)
            if n == 0:
                results[i] = RowResult([], [], False, "empty response",
                                       ref_logprobs=[] if self.options.get("return_ref_logprobs") else None,
                                       entropy=[] if self.options.get("return_entropy") else None)
                continue
            if not math.isfinite(float(r.advantage)):
                self.policy.failed("bad rollout", f"rollout {i}: advantage {r.advantage!r} is not finite", rows=1)
                results[i] = RowResult.uniform(r.advantage, n, "fallback: bad rollout")
                continue
            if self.skip_zero_advantage and not self.wants_ref_logprobs and float(r.advantage) == 0.0:
                results[i] = RowResult.uniform(0.0, n, "zero advantage")
                continue
            try:
                if r.error is not None:
                    raise ValueError(r.error)
                if r.image is None:
                    raise ValueError("no image")
                data = image_bytes(r.image)
                if (r.prompt is None) == (r.messages is None):
                    raise ValueError("a rollout needs exactly one of prompt or messages")
                prompt_key = r.prompt if r.messages is None else json.dumps(r.messages, sort_keys=True, default=str)
            except (TypeError, ValueError, OSError) as exc:
                self.policy.failed("bad rollout", f"rollout {i}: {exc}", rows=1, error=exc)
                results[i] = RowResult.uniform(r.advantage, n, f"fallback: bad rollout ({exc})")
                continue
            key = image_key(data)
            payloads[key] = data
            buckets.setdefault((key, prompt_key), []).append(i)

        groups: list[dict[str, Any]] = []
        members: list[list[int]] = []
        for (key, _), rows in buckets.items():
            for start in range(0, len(rows), self.max_group_size):
                chunk = rows[start:start + self.max_group_size]
                first = rollouts[chunk[0]]
                group: dict[str, Any] = {
                    "image": payloads[key],
                    "responses": [{"text": rollouts[i].text or "", "token_ids": [int(t) for t in rollouts[i].token_ids]}
                                  for i in chunk],
                    "advantages": [float(rollouts[i].advantage) for i in chunk],
                }
                if first.group_id is not None:
                    group["id"] = str(first.group_id)
                if first.messages is not None:
                    group["messages"] = first.messages
                else:
                    group["prompt"] = first.prompt
                groups.append(group)
                members.append(chunk)

        if groups:
            self._call(groups, members, rollouts, results)
        return [r for r in results]  # type: ignore[misc]

    def _call(self, groups: list[dict[str, Any]], members: list[list[int]], rollouts: Sequence[Rollout],
              results: list[RowResult | None]) -> None:
        all_rows = [i for chunk in members for i in chunk]
        try:
            answers = self.backend.reweight(groups, dict(self.options))
            answers = [a if isinstance(a, GroupResult) else GroupResult.model_validate(a) for a in answers]
            if len(answers) != len(groups):
                raise ValueError(f"{len(answers)} results for {len(groups)} groups")
        except Exception as exc:  # the service failed: the policy decides
            ids = [g.get("id") for g in groups]
            self.policy.failed("service call failed", f"{type(exc).__name__}: {exc}", rows=len(all_rows),
                               group_ids=ids, error=exc)
            for i in all_rows:
                results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                               f"fallback: {type(exc).__name__}")
            return
        ok = 0
        for group, chunk, answer in zip(groups, members, answers):
            if answer.error is not None:
                p = answer.error
                where = f" at {p.pointer}" if p.pointer else ""
                self.policy.failed("group refused", f"{p.status} {p.title}{where}: {p.detail}", rows=len(chunk),
                                   group_ids=[group.get("id")])
                for i in chunk:
                    results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                                   f"fallback: {p.status} {p.title}")
                continue
            if len(answer.responses) != len(chunk):
                self.policy.failed("result mismatch", f"{len(answer.responses)} responses for {len(chunk)} sent",
                                   rows=len(chunk), group_ids=[group.get("id")])
                for i in chunk:
                    results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                                   "fallback: result mismatch")
                continue
            for i, response in zip(chunk, answer.responses):
                n = len(rollouts[i].token_ids)
                if response.token_weights is None:  # token_arrays=false: the paragraphs carry the weights
                    w = token_weights_from_paragraphs(response, n)
                    adv = [response.advantage * x for x in w]
                else:
                    adv, w = list(response.token_advantages), list(response.token_weights)
                problem = None
                if len(adv) != n or len(w) != n:
                    problem = (f"{len(adv)} token advantages / {len(w)} weights for {n} token ids sent "
                               "(the service scored a different tokenisation)")
                elif not all(math.isfinite(v) for v in adv) or not all(math.isfinite(v) for v in w):
                    problem = "non-finite token advantages"
                else:
                    problem = self._ref_problem(response, n)
                if problem is not None:
                    self.policy.failed("result mismatch", f"rollout {i}: {problem}", rows=1,
                                       group_ids=[group.get("id")])
                    results[i] = RowResult.uniform(rollouts[i].advantage, n, "fallback: result mismatch")
                    continue
                results[i] = RowResult(adv, w, True, None, list(response.paragraphs),
                                       _floats(response.ref_logprobs), _floats(response.entropy))
                ok += 1
        self.policy.succeeded(ok)

    def _ref_problem(self, response: Any, n: int) -> str | None:
        """What is wrong with the reference log-probs / entropy the options asked for, if anything."""
        for key in ("return_ref_logprobs", "return_entropy"):
            if not self.options.get(key):
                continue
            name = "ref_logprobs" if key == "return_ref_logprobs" else "entropy"
            values = getattr(response, name, None)
            if values is None or len(values) != n:
                return f"{0 if values is None else len(values)} {name} for {n} token ids sent"
            if not all(math.isfinite(v) for v in values):
                return f"non-finite {name}"
        return None

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]
