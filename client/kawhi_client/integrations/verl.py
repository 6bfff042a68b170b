"""KAWHI in verl: a reward-stage component and the ``grpo_kawhi`` advantage estimator.
Exercised with verl 0.9.1 on CPU (see docs/integrations.md for exactly what ran).

Why two pieces. verl's custom advantage estimators (``register_adv_est``) are called with
the token-level rewards, the response mask and the group uid only — no image, prompt or
token ids — and the advantage stage runs after the images are gone. So:

1. **Reward stage** — ``KawhiRewardManager``, a verl reward-loop reward manager. It wraps
   the reward manager you would use anyway (``naive`` by default; your
   ``custom_reward_function`` still computes the score) and, per sample, sends KAWHI the
   sample's image and chat prompt (``raw_prompt``, the image part as RLHFDataset builds
   it) and the policy's OWN response token ids, asking for the token weights only (the
   group advantage is not known yet). The samples verl scores together (one task each,
   started at once) go in one call (``SampleBatcher``), so a GRPO group's responses are
   one group there; what still arrives apart shares the service's prefix cache. The weights travel with the sample as
   ``reward_extra_info["kawhi_token_weights"]`` — a compact string (run-length JSON),
   because verl stacks each extra-info key with ``np.array`` and ragged lists would not
   stack — plus a numeric ``kawhi_fallback`` flag (0/1) that verl's metrics can average.
   verl puts both into ``batch.non_tensor_batch``, where they follow every reorder
   (``balance_batch``) and concat of the batch.

2. **Advantage stage** — ``compute_grpo_kawhi_advantage``, registered as ``grpo_kawhi``:
   verl's own ``compute_grpo_outcome_advantage`` (same grouping by uid, same
   ``norm_adv_by_std_in_grpo``) multiplied, token by token, by the stored weights.
   Because verl does not pass extra batch fields to estimators, ``install()`` wraps
   ``verl.trainer.ppo.ray_trainer.compute_advantage`` so that, for ``grpo_kawhi`` only,
   the batch's ``kawhi_token_weights`` are handed to the estimator (a context variable
   set for the duration of the call). Every other estimator is untouched.

Importing this module calls ``install()`` (as verl's own modules register their
estimators on import). verl imports it in every process that needs it when the config
names it as the reward manager::

    reward.reward_manager.source=importlib
    reward.reward_manager.name=KawhiRewardManager
    reward.reward_manager.module.path=pkg://kawhi_client.integrations.verl
    algorithm.adv_estimator=grpo_kawhi
    trainer.use_v1=false
    +reward.kawhi.url=http://kawhi:8000          # or: in-process
    +reward.kawhi.on_error=raise                 # or: fallback

Scope: verl 0.9.1's legacy trainer (``trainer.use_v1=false``, ``RayPPOTrainer``). Its v1
trainer reads only fixed fields from its TransferQueue in the advantage stage, so the
weights never reach an estimator there; ``grpo_kawhi`` then raises (it never silently
trains plain GRPO under its name).

Reference log-probs from the service (``+reward.kawhi.ref_logprobs=true``): the same
reward-stage call also returns the reference model's per-token log-probs (at
``actor_rollout_ref.rollout.temperature``, which verl divides its logits by), stored as
``reward_extra_info["kawhi_ref_logprobs"]`` (base64 float32). In the trainer process,
``install()`` replaces verl's reference log-prob step, ``RayPPOTrainer._compute_ref_log_prob``,
by one that decodes them into ``ref_log_prob`` — which verl itself unions into the batch
(nothing is added before). verl 0.9.1 builds its reference model because its role mapping
(``main_ppo_v0.BaseTaskRunner.add_actor_rollout_worker``) picks ``Role.ActorRolloutRef``
whenever ``need_reference_policy(config)`` (KL loss or KL reward); with the switch on,
``install()`` makes it pick ``Role.ActorRollout`` (no reference model) and lets
``init_workers`` run with the trainer's ``use_reference_policy`` kept on, so the KL loss /
KL reward and the reference step still run. That mapping is built in verl's TaskRunner
actor before any reward manager is loaded, so the module must be imported there first:
``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=kawhi_client.integrations.verl.install``.
A missing reference log-prob always fails (no honest fallback for a KL reference).

Failure policy (``reward.kawhi.on_error``): ``raise`` (default) fails the reward stage;
``fallback`` stores a fallback marker for the sample (its advantage stays verl's GRPO
advantage, weight 1), warns in the reward worker, and the advantage stage counts and
warns again in the trainer process (``driver_policy()``), so the event shows up where the
training logs are.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kawhi_client.integrations.common import (
    FailurePolicy,
    KawhiIntegrationError,
    Reweighter,
    Rollout,
    RowResult,
    as_backend,
    wire_messages,
)

__all__ = [
    "ESTIMATOR_NAME",
    "FALLBACK_KEY",
    "REWARD_MANAGER_NAME",
    "WEIGHTS_KEY",
    "KawhiRewardManager",
    "SampleBatcher",
    "compute_grpo_kawhi_advantage",
    "decode_weights",
    "driver_policy",
    "encode_fallback",
    "REF_KEY",
    "decode_ref_logprobs",
    "encode_ref_logprobs",
    "encode_weights",
    "ref_log_prob_tensor",
    "service_ref_log_prob",
    "install",
    "kawhi_extra_info",
    "reweighter_from_config",
    "rollout_from_sample",
    "weights_tensor",
]

log = logging.getLogger("kawhi_client.integrations")

ESTIMATOR_NAME = "grpo_kawhi"
REWARD_MANAGER_NAME = "kawhi"
WEIGHTS_KEY = "kawhi_token_weights"
FALLBACK_KEY = "kawhi_fallback"
REF_KEY = "kawhi_ref_logprobs"
_REF_PREFIX = "kawhi-lp1:"
_WEIGHTS_PREFIX = "kawhi-w1:"
_FALLBACK_PREFIX = "kawhi-fallback:"

# ============================================================================ the stored weights


def encode_weights(weights: Sequence[float], on_error: str = "raise") -> str:
    """Token weights -> a compact string (run-length JSON; exact float round trip).

    ``on_error`` travels along so the advantage stage applies the reward stage's policy."""
    runs: list[list[Any]] = []
    for w in weights:
        w = float(w)
        if runs and runs[-1][1] == w:
            runs[-1][0] += 1
        else:
            runs.append([1, w])
    return _WEIGHTS_PREFIX + json.dumps({"n": len(weights), "runs": runs, "on_error": on_error},
                                        separators=(",", ":"))


def encode_fallback(reason: str) -> str:
    """The marker of a sample whose weights could not be had (``on_error="fallback"``)."""
    return _FALLBACK_PREFIX + reason


def decode_weights(value: Any) -> tuple[list[float] | None, str | None, str]:
    """A stored value -> (weights or None, fallback reason or None, on_error)."""
    if not isinstance(value, str):
        raise KawhiIntegrationError(f"{WEIGHTS_KEY} holds a {type(value).__name__}, not a KAWHI weights string")
    if value.startswith(_FALLBACK_PREFIX):
        return None, value[len(_FALLBACK_PREFIX):] or "unknown", "fallback"
    if not value.startswith(_WEIGHTS_PREFIX):
        raise KawhiIntegrationError(f"{WEIGHTS_KEY} holds {value[:40]!r}, not a KAWHI weights string")
    payload = json.loads(value[len(_WEIGHTS_PREFIX):])
    weights = [float(w) for count, w in payload["runs"] for _ in range(int(count))]
    if len(weights) != int(payload["n"]):
        raise KawhiIntegrationError(f"corrupt {WEIGHTS_KEY}: {len(weights)} weights for n={payload['n']}")
    return weights, None, payload.get("on_error", "raise")


# ============================================================================ configuration


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:
            return default
    return getattr(cfg, key, default)


def kawhi_settings(config: Any) -> dict[str, Any]:
    """The KAWHI settings of a verl config: ``reward.kawhi`` (``+reward.kawhi.url=...`` on
    the command line), else the environment (``KAWHI_URL``, ``KAWHI_ON_ERROR``,
    ``KAWHI_OPTIONS`` as JSON, ``KAWHI_INNER_REWARD_MANAGER``, ``KAWHI_MODEL``, ``KAWHI_DEVICE``).

    Keys: ``url`` (an http(s) URL, or ``in-process``), ``on_error``, ``options`` (API
    options), ``inner`` (the wrapped reward manager, default ``naive``), ``model`` and
    ``device`` (for ``in-process``), ``client`` (keyword arguments of
    ``kawhi_client.Client``: ``timeout``, ``retries``, ``wait_ready``, ``api_key``,
    ``encoding_format`` (default here ``base64``) ...), ``batch_wait_s`` (how long the
    ``SampleBatcher`` waits for stragglers after the batch's tasks, default 0.002),
    ``ref_logprobs`` (``KAWHI_REF_LOGPROBS``: the KL reference from the service) and
    ``temperature`` (verl's ``actor_rollout_ref.rollout.temperature``)."""
    section = _cfg_get(_cfg_get(config, "reward"), "kawhi")
    if section is not None and hasattr(section, "items") and not isinstance(section, Mapping):
        try:
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        except Exception:
            section = dict(section.items())
    section = dict(section or {})
    env_options = os.environ.get("KAWHI_OPTIONS")
    return {
        "url": section.get("url") or os.environ.get("KAWHI_URL"),
        "on_error": section.get("on_error") or os.environ.get("KAWHI_ON_ERROR") or "raise",
        "options": dict(section.get("options") or (json.loads(env_options) if env_options else {})),
        "inner": section.get("inner") or os.environ.get("KAWHI_INNER_REWARD_MANAGER") or "naive",
        "model": section.get("model") or os.environ.get("KAWHI_MODEL"),
        "device": section.get("device") or os.environ.get("KAWHI_DEVICE") or "cpu",
        "client": dict(section.get("client") or {}),
        "batch_wait_s": section.get("batch_wait_s", os.environ.get("KAWHI_BATCH_WAIT_S", 0.002)),
        "ref_logprobs": _truthy(section.get("ref_logprobs", os.environ.get("KAWHI_REF_LOGPROBS", False))),
        "temperature": float(_cfg_get(_cfg_get(_cfg_get(config, "actor_rollout_ref"), "rollout"), "temperature", 1.0)
                             or 1.0),
    }


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def reweighter_from_config(config: Any) -> Reweighter:
    """The Reweighter a reward worker uses, built from ``kawhi_settings(config)``."""
    s = kawhi_settings(config)
    url = s["url"]
    if url is None:
        raise KawhiIntegrationError("KAWHI is not configured: set +reward.kawhi.url=http://host:port "
                                    "(or in-process), or the KAWHI_URL environment variable")
    if url in ("in-process", "inprocess", "in_process"):
        from kawhi_client.integrations.common import InProcessBackend

        backend: Any = InProcessBackend(model=s["model"], device=s["device"])
    else:
        from kawhi_client.client import Client

        # weights come back as float32 base64 (verl multiplies them into float32 tensors anyway)
        backend = as_backend(Client(url, **{"encoding_format": "base64", **s["client"]}))
    options = dict(s["options"])
    if s["ref_logprobs"]:  # the KL reference from the same call, at verl's own temperature
        options.update(return_ref_logprobs=True, logprob_temperature=s["temperature"])
    # advantage 1.0 is sent ("given"): token_advantages == token_weights; nothing is skipped
    return Reweighter(backend, options=options, on_error=s["on_error"], skip_zero_advantage=False)


# ============================================================================ reward stage


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value)


def rollout_from_sample(data: Any, tokenizer: Any = None) -> Rollout:
    """One verl sample (a length-1 DataProto as the reward loop hands it, or a DataProtoItem)
    -> a ``Rollout`` with advantage 1.0 (so the service returns the weights as advantages).

    Token ids: ``responses[:valid_length]`` with the valid length from ``attention_mask``
    (exactly what verl's reward managers score). Prompt: ``raw_prompt`` (chat messages; its
    image part holds the image). Image: that part, else ``multi_modal_data`` (``image`` /
    ``images``)."""
    item = data if _is_item(data) else data[0]
    batch, non_tensor = item.batch, item.non_tensor_batch
    responses = batch["responses"]
    length = responses.shape[-1]
    valid = int(batch["attention_mask"][-length:].sum())
    ids = [int(t) for t in responses[:valid].tolist()]
    error, messages, image = None, None, None
    try:
        raw = non_tensor.get("raw_prompt")
        if raw is None:
            raise ValueError("the sample has no raw_prompt (verl's RLHFDataset sets it)")
        messages, found = wire_messages([dict(m) for m in _as_list(raw)])
        mm = non_tensor.get("multi_modal_data")
        mm_images = []
        if isinstance(mm, Mapping):
            mm_images = _as_list(mm.get("image") if mm.get("image") is not None else mm.get("images"))
        if len(found) > 1 or len(mm_images) > 1:
            raise ValueError(f"the prompt holds {max(len(found), len(mm_images))} images; KAWHI needs exactly one")
        if not found:
            raise ValueError("the prompt has no image part")
        image = found[0] if found[0] is not None else (mm_images[0] if mm_images else None)
    except ValueError as exc:
        error = str(exc)
    text = ""
    if tokenizer is not None and ids:
        try:
            text = tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:
            text = ""
    uid = non_tensor.get("uid")
    return Rollout(token_ids=ids, image=image, messages=messages, advantage=1.0, text=text,
                   group_id=None if uid is None else str(uid), error=error)


def _is_item(data: Any) -> bool:
    return type(data).__name__ == "DataProtoItem"


def kawhi_extra_info(reweighter: Reweighter, data: Any, tokenizer: Any = None) -> dict[str, Any]:
    """The reward-extra-info entries for one sample: ``{WEIGHTS_KEY: str, FALLBACK_KEY: 0.0|1.0}``.

    Applies the reweighter's policy: under ``raise`` a failure raises here (the reward
    stage fails); under ``fallback`` the sample gets the fallback marker."""
    rollout = rollout_from_sample(data, tokenizer)
    (row,) = reweighter.reweight([rollout])
    return row_extra_info(row, reweighter.on_error, ref_logprobs=bool(reweighter.options.get("return_ref_logprobs")))


def row_extra_info(row: RowResult, on_error: str, ref_logprobs: bool = False) -> dict[str, Any]:
    if row.reweighted or row.reason == "empty response":
        info = {WEIGHTS_KEY: encode_weights(row.token_weights, on_error), FALLBACK_KEY: 0.0}
    else:
        info = {WEIGHTS_KEY: encode_fallback(row.reason or "fallback"), FALLBACK_KEY: 1.0}
    if ref_logprobs:
        info[REF_KEY] = encode_fallback(row.reason or "fallback") if row.ref_logprobs is None else \
            encode_ref_logprobs(row.ref_logprobs)
    return info


def encode_ref_logprobs(values: Sequence[float]) -> str:
    """Reference log-probs -> ``kawhi-lp1:`` + base64 of little-endian float32 (exact for the
    service's float32 values; verl stacks extra info with ``np.array``, so one string per sample)."""
    import struct

    return _REF_PREFIX + base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def decode_ref_logprobs(value: Any) -> tuple[list[float] | None, str | None]:
    """A stored value -> (log-probs, None) or (None, the fallback reason)."""
    import struct

    if isinstance(value, str) and value.startswith(_FALLBACK_PREFIX):
        return None, value[len(_FALLBACK_PREFIX):] or "unknown"
    if not isinstance(value, str) or not value.startswith(_REF_PREFIX):
        raise KawhiIntegrationError(f"{REF_KEY} holds {str(value)[:40]!r}, not KAWHI reference log-probs")
    raw = base64.b64decode(value[len(_REF_PREFIX):])
    return list(struct.unpack(f"<{len(raw) // 4}f", raw)), None


def _reward_manager_base() -> type:
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    return RewardManagerBase


class _LazyBase:
    """Placeholder base when verl is absent, so this module imports (for its pure helpers)."""


try:  # verl present: the real base class (verl's registry checks nothing else)
    _Base: type = _reward_manager_base()
except ImportError:  # pragma: no cover - exercised where verl is not installed
    _Base = _LazyBase


class KawhiRewardManager(_Base):  # type: ignore[misc, valid-type]
    """A verl reward-loop reward manager: the inner manager's reward, plus KAWHI token weights.

    Built by verl as ``cls(config=..., tokenizer=..., compute_score=..., **reward_kwargs)``.
    The inner manager (``reward.kawhi.inner``, default ``naive``) is built with the same
    arguments and computes the score exactly as it would alone; its ``reward_extra_info``
    is kept and ``kawhi_token_weights`` / ``kawhi_fallback`` are added.
    """

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any, **kwargs: Any) -> None:
        if _Base is _LazyBase:
            raise KawhiIntegrationError("KawhiRewardManager needs verl (pip install verl)")
        super().__init__(config, tokenizer, compute_score)
        from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

        settings = kawhi_settings(config)
        inner_cls = get_reward_manager_cls(settings["inner"])
        if inner_cls is KawhiRewardManager:
            raise KawhiIntegrationError("reward.kawhi.inner cannot be the KAWHI reward manager itself")
        self.inner = inner_cls(config, tokenizer, compute_score, **kwargs)
        self.reweighter = reweighter_from_config(config)
        self.tokenizer_ok: bool | None = None
        self._checked = False
        self.samples = SampleBatcher(self._reweight_rows, max_wait_s=float(kawhi_settings(config)["batch_wait_s"]))

    def _reweight_rows(self, rollouts: list[Rollout]) -> list[RowResult]:
        if not self._checked:  # the policy's tokenizer against the service's, once per worker
            self._checked = True
            self.tokenizer_ok = self.reweighter.check_tokenizer(self.tokenizer)
        return self.reweighter.reweight(rollouts)

    async def run_single(self, data: Any) -> dict[str, Any]:
        sample = data[-1:]  # like verl's managers: the last sequence of a multi-sequence output
        # joins the samples verl scores concurrently with this one, before the inner score runs
        kawhi = asyncio.ensure_future(self.samples.submit(rollout_from_sample(sample, self.tokenizer)))
        try:
            result = await self.inner.run_single(data)
        except BaseException:
            kawhi.cancel()
            raise
        extra = row_extra_info(await kawhi, self.reweighter.on_error,
                               ref_logprobs=bool(self.reweighter.options.get("return_ref_logprobs")))
        result = dict(result)
        result["reward_extra_info"] = {**dict(result.get("reward_extra_info") or {}), **extra}
        return result


class SampleBatcher:
    """Sends the samples verl hands a reward manager together in one call.

    verl's reward loop scores a batch with one ``run_single`` task per sample, all
    created at once (``RewardLoopWorker.compute_score_batch``: ``create_task`` for each,
    then ``gather``). Each task submits its sample here first; the first submission
    schedules a flush that runs once the event loop has let every task of that batch
    reach its submission (and ``max_wait_s`` more, for stragglers). The flush sends them
    all in one ``reweight`` call, where samples sharing an image and prompt (a GRPO
    group) become one group. Samples of a group that reach the service in different
    calls (verl chunks the batch across reward workers) share their prefix through the
    service's prefix cache instead.
    """

    def __init__(self, reweight: Any, *, max_wait_s: float = 0.002, max_rows: int = 1024) -> None:
        self.reweight = reweight
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.calls = 0
        self._pending: list[tuple[Rollout, Any]] = []
        self._flush: Any = None

    async def submit(self, rollout: Rollout) -> RowResult:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((rollout, future))
        if self._flush is None:
            self._flush = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        seen = -1
        while seen != len(self._pending) and len(self._pending) < self.max_rows:
            seen = len(self._pending)
            await asyncio.sleep(0)  # every task already scheduled runs up to its submission
        if self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)
        batch, self._pending, self._flush = self._pending, [], None
        self.calls += 1
        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, self.reweight, [r for r, _ in batch])
        except BaseException as exc:  # the failure policy said raise: every sample of the call fails
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), row in zip(batch, rows):
            if not future.done():
                future.set_result(row)


# ============================================================================ advantage stage

_BOUND_WEIGHTS: contextvars.ContextVar[Any] = contextvars.ContextVar("kawhi_token_weights", default=None)
_DRIVER_POLICY = FailurePolicy("fallback")


def driver_policy() -> FailurePolicy:
    """The counters of the advantage stage in this process: ``fallbacks`` / ``fallback_rows``
    (samples trained with plain GRPO advantages), ``reweighted_rows``."""
    return _DRIVER_POLICY


def weights_tensor(encoded: Any, response_mask: Any) -> Any:
    """The stored weights of a batch -> a ``(B, T)`` float tensor (1 where a sample fell back).

    Row i's weights cover its first ``n_i`` response positions (its valid response tokens);
    a response-mask position beyond them means the weights were computed for other tokens
    than the trainer's, which the reward stage's policy then decides (raise, or weight 1)."""
    import torch

    rows = list(encoded.tolist() if hasattr(encoded, "tolist") else encoded)
    B, T = response_mask.shape
    if len(rows) != B:
        raise KawhiIntegrationError(f"{len(rows)} stored KAWHI weights for a batch of {B}")
    out = torch.ones((B, T), dtype=torch.float32, device=response_mask.device)
    fell_back: list[str] = []
    for i, value in enumerate(rows):
        weights, reason, on_error = decode_weights(value)
        if weights is None:
            fell_back.append(reason or "fallback")
            continue
        n = len(weights)
        beyond = int(response_mask[i, n:].sum()) if n < T else 0
        if n > T or beyond:
            detail = (f"sample {i}: {n} stored weights for a {T}-token response with {beyond} masked token(s) "
                      "past them (weights computed for different tokens)")
            if on_error == "raise":
                raise KawhiIntegrationError(f"KAWHI result mismatch: {detail}")
            fell_back.append(detail)
            continue
        if n:
            out[i, :n] = torch.tensor(weights, dtype=torch.float32, device=response_mask.device)
    if fell_back:
        _DRIVER_POLICY.failed("fallback in the reward stage",
                              f"{len(fell_back)} of {B} samples have no KAWHI weights ({fell_back[0]})",
                              rows=len(fell_back))
    _DRIVER_POLICY.succeeded(B - len(fell_back))
    return out


def compute_grpo_kawhi_advantage(
    token_level_rewards: Any,
    response_mask: Any,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    kawhi_token_weights: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """verl's GRPO advantage times KAWHI's token weights (registered as ``grpo_kawhi``).

    ``kawhi_token_weights``: the batch's ``non_tensor_batch["kawhi_token_weights"]``; when
    verl calls the estimator (which passes no such field) ``install()``'s wrapper of
    ``compute_advantage`` provides it. ``norm_adv_by_std_in_grpo`` defaults to
    ``config.norm_adv_by_std_in_grpo`` (verl's ``algorithm`` config), else True.
    Returns ``(advantages, returns)`` like verl's GRPO (the same tensor twice)."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    encoded = kawhi_token_weights if kawhi_token_weights is not None else _BOUND_WEIGHTS.get()
    if encoded is None:
        raise KawhiIntegrationError(
            f"the '{ESTIMATOR_NAME}' estimator found no '{WEIGHTS_KEY}' on the batch. Use "
            "reward.reward_manager.name=KawhiRewardManager (source=importlib, "
            "module.path=pkg://kawhi_client.integrations.verl) and trainer.use_v1=false: verl's v1 trainer "
            "does not hand reward extra info to the advantage stage")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards, response_mask=response_mask, index=index, epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
    advantages = advantages * weights_tensor(encoded, response_mask).to(advantages.dtype)
    return advantages, advantages


def _estimator_name(adv_estimator: Any) -> str:
    return getattr(adv_estimator, "value", adv_estimator)


def _wrap_compute_advantage(original: Any) -> Any:
    if getattr(original, "__kawhi_original__", None) is not None:
        return original

    @functools.wraps(original)
    def compute_advantage(data: Any, adv_estimator: Any, *args: Any, **kwargs: Any) -> Any:
        if _estimator_name(adv_estimator) != ESTIMATOR_NAME:
            return original(data, adv_estimator, *args, **kwargs)
        token = _BOUND_WEIGHTS.set(data.non_tensor_batch.get(WEIGHTS_KEY))
        try:
            return original(data, adv_estimator, *args, **kwargs)
        finally:
            _BOUND_WEIGHTS.reset(token)

    compute_advantage.__kawhi_original__ = original  # type: ignore[attr-defined]
    return compute_advantage


def ref_log_prob_tensor(encoded: Any, response_mask: Any) -> Any:
    """The stored reference log-probs of a batch -> verl's ``ref_log_prob`` ``(B, T)`` float32:
    row i's values on its first ``n_i`` response positions, 0 after them (as verl's own
    ``no_padding_2_padding`` leaves them). A sample without them fails: the KL term has no
    reference to fall back to."""
    import torch

    rows = list(encoded.tolist() if hasattr(encoded, "tolist") else encoded)
    B, T = response_mask.shape
    if len(rows) != B:
        raise KawhiIntegrationError(f"{len(rows)} stored reference log-probs for a batch of {B}")
    out = torch.zeros((B, T), dtype=torch.float32, device=response_mask.device)
    for i, value in enumerate(rows):
        values, reason = decode_ref_logprobs(value)
        if values is None:
            raise KawhiIntegrationError(f"sample {i}: no reference log-probs from KAWHI ({reason}); "
                                        "the KL term has no reference to fall back to")
        n = len(values)
        if n > T or int(response_mask[i, n:].sum()):
            raise KawhiIntegrationError(f"sample {i}: {n} reference log-probs for a {T}-token response "
                                        f"with {int(response_mask[i].sum())} masked tokens")
        if n:
            out[i, :n] = torch.tensor(values, dtype=torch.float32, device=response_mask.device)
    return out


def service_ref_log_prob(batch: Any) -> Any:
    """What verl's ``RayPPOTrainer._compute_ref_log_prob`` returns, from the service's values:
    a ``DataProto`` holding ``ref_log_prob`` (verl unions it into the batch itself)."""
    from verl import DataProto

    if REF_KEY not in batch.non_tensor_batch:
        raise KawhiIntegrationError(
            f"+reward.kawhi.ref_logprobs is on but the batch has no '{REF_KEY}': the reward manager must be "
            "KawhiRewardManager (and trainer.use_v1=false)")
    tensor = ref_log_prob_tensor(batch.non_tensor_batch[REF_KEY], batch.batch["response_mask"])
    return DataProto.from_dict(tensors={"ref_log_prob": tensor})


def _ref_from_service(config: Any) -> bool:
    try:
        return bool(kawhi_settings(config)["ref_logprobs"])
    except Exception:
        return False


def _wrap_ref_step(original: Any) -> Any:
    if getattr(original, "__kawhi_original__", None) is not None:
        return original

    @functools.wraps(original)
    def _compute_ref_log_prob(self: Any, batch: Any) -> Any:
        if not _ref_from_service(self.config):
            return original(self, batch)
        return service_ref_log_prob(batch)

    _compute_ref_log_prob.__kawhi_original__ = original  # type: ignore[attr-defined]
    return _compute_ref_log_prob


def _wrap_init_workers(original: Any) -> Any:
    if getattr(original, "__kawhi_original__", None) is not None:
        return original

    @functools.wraps(original)
    def init_workers(self: Any, *args: Any, **kwargs: Any) -> Any:
        from verl.trainer.ppo.utils import Role

        if not (_ref_from_service(self.config) and self.use_reference_policy
                and Role.ActorRolloutRef not in self.role_worker_mapping):
            return original(self, *args, **kwargs)
        # no reference worker was mapped (see add_actor_rollout_worker): build the others
        # as verl does without one, then keep the reference step on (it reads the service)
        self.use_reference_policy = False
        try:
            result = original(self, *args, **kwargs)
        finally:
            self.use_reference_policy = True
        self.ref_policy_wg = self.actor_rollout_wg  # only profiling touches it; the ref step is ours
        return result

    init_workers.__kawhi_original__ = original  # type: ignore[attr-defined]
    return init_workers


def _wrap_role_mapping(original: Any) -> Any:
    if getattr(original, "__kawhi_original__", None) is not None:
        return original

    @functools.wraps(original)
    def add_actor_rollout_worker(self: Any, config: Any) -> Any:
        from verl.trainer.ppo.utils import Role

        result = original(self, config)
        if _ref_from_service(config) and Role.ActorRolloutRef in self.role_worker_mapping:
            # the fused actor + reference worker would load a second copy of the model
            self.role_worker_mapping[Role.ActorRollout] = self.role_worker_mapping.pop(Role.ActorRolloutRef)
            self.mapping[Role.ActorRollout] = self.mapping.pop(Role.ActorRolloutRef)
        return result

    add_actor_rollout_worker.__kawhi_original__ = original  # type: ignore[attr-defined]
    return add_actor_rollout_worker


_INSTALLED = False


def install() -> None:
    """Register ``grpo_kawhi`` and the ``kawhi`` reward manager with verl, and let
    ``compute_advantage`` hand the batch's weights to ``grpo_kawhi``. Idempotent."""
    global _INSTALLED
    from verl.experimental.reward_loop.reward_manager import registry
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not compute_grpo_kawhi_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_grpo_kawhi_advantage)
    if registry.REWARD_MANAGER.get(REWARD_MANAGER_NAME) is not KawhiRewardManager:
        registry.register(REWARD_MANAGER_NAME)(KawhiRewardManager)
    # compute_advantage lives in ray_trainer; modules that imported the name get the wrapper too.
    try:
        from verl.trainer.ppo import ray_trainer
    except ImportError as exc:  # the trainer's own deps missing: the estimator still registers
        log.warning("KAWHI: verl.trainer.ppo.ray_trainer not importable (%s); compute_advantage not wrapped", exc)
    else:
        ray_trainer.compute_advantage = _wrap_compute_advantage(ray_trainer.compute_advantage)
        trainer_cls = ray_trainer.RayPPOTrainer
        trainer_cls._compute_ref_log_prob = _wrap_ref_step(trainer_cls._compute_ref_log_prob)
        trainer_cls.init_workers = _wrap_init_workers(trainer_cls.init_workers)
        try:
            from verl.trainer import main_ppo_v0
        except ImportError as exc:  # pragma: no cover - verl without its legacy runner
            log.warning("KAWHI: verl.trainer.main_ppo_v0 not importable (%s); role mapping not wrapped", exc)
        else:
            runner = main_ppo_v0.BaseTaskRunner
            runner.add_actor_rollout_worker = _wrap_role_mapping(runner.add_actor_rollout_worker)
        for name, module in list(sys.modules.items()):
            if name.startswith("verl.") and module is not None and module is not ray_trainer:
                current = getattr(module, "compute_advantage", None)
                if current is not None and getattr(current, "__kawhi_original__", None) is None and \
                        getattr(current, "__module__", "") == ray_trainer.__name__:
                    module.compute_advantage = ray_trainer.compute_advantage
    _INSTALLED = True


if _Base is not _LazyBase:
    install()
