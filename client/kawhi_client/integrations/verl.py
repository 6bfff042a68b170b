"""KAWHI in verl's LEGACY trainer (``trainer.use_v1=false``, ``RayPPOTrainer``, deprecated by
verl): a reward-stage component and the ``grpo_kawhi`` advantage estimator. Exercised with
verl 0.9.1 on CPU (see docs/integrations.md for exactly what ran). For verl's v1 trainer
(its default) use ``kawhi_client.integrations.verl_v1``; what both share is in
``kawhi_client.integrations.verl_shared`` (re-exported here).

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

Scope: verl 0.9.1's legacy trainer. Under the v1 trainer reward extra info never reaches an
estimator (its advantage stage reads fixed TransferQueue fields), so ``grpo_kawhi`` raises
there (it never silently trains plain GRPO under its name): use ``verl_v1``.

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
import contextvars
import functools
import logging
import sys
from typing import Any

from kawhi_client.integrations.common import KawhiIntegrationError, Reweighter, Rollout, RowResult
from kawhi_client.integrations.verl_shared import (
    FALLBACK_KEY,
    REF_KEY,
    WEIGHTS_KEY,
    _cfg_get,
    decode_ref_logprobs,
    decode_weights,
    driver_policy,
    encode_fallback,
    encode_ref_logprobs,
    encode_weights,
    kawhi_settings,
    ref_log_prob_tensor,
    reweighter_from_config,
    rollout_from_sample,
    row_extra_info,
    weights_tensor,
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


def kawhi_extra_info(reweighter: Reweighter, data: Any, tokenizer: Any = None) -> dict[str, Any]:
    """The reward-extra-info entries for one sample: ``{WEIGHTS_KEY: str, FALLBACK_KEY: 0.0|1.0}``.

    Applies the reweighter's policy: under ``raise`` a failure raises here (the reward
    stage fails); under ``fallback`` the sample gets the fallback marker."""
    rollout = rollout_from_sample(data, tokenizer)
    (row,) = reweighter.reweight([rollout])
    return row_extra_info(row, reweighter.on_error, ref_logprobs=bool(reweighter.options.get("return_ref_logprobs")))



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
