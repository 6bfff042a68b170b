"""KAWHI in verl's v1 trainer (``trainer.use_v1=true``, verl's default since 0.9).
Exercised with verl 0.9.1 on CPU (see docs/integrations.md for exactly what ran).

Three pieces, all loaded by verl's own loaders, no fork of verl:

1. **One KAWHI call per GRPO group, in the agent loop** -- ``KawhiAgentLoopManagerTQ``
   (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``), whose Ray workers
   (``KawhiAgentLoopWorkerTQ``, a subclass of verl's ``AgentLoopWorkerTQ``) run the n
   sessions of one ``uid`` as verl does. Each session writes its sample to the
   TransferQueue (verl's code), then waits at the group's ``GroupBarrier``; the last session
   to settle sends the group's ONE request (all n responses, the policy's own token ids,
   the image and chat prompt of verl's ``raw_prompt``) and every session writes its result
   next to its sample (``kawhi_token_weights``, and ``kawhi_ref_logprobs`` when asked)
   before verl marks the group ``finished``. The call overlaps with the rollout of the
   other groups (bench/verl_call_placement.py measured why this place, see
   docs/integrations.md). A group in which a session failed is dropped by verl's replay
   buffer; it sends nothing.
2. **The trainer** -- ``KawhiPPOTrainer``, registered as ``trainer.v1.trainer_mode=kawhi``:
   verl's synchronous v1 trainer (``PPOTrainerSync``; its settings stay under
   ``trainer.v1.sync``) whose ``_compute_advantage`` calls verl's own, then multiplies the
   advantages (and returns) of every sample by its stored token weights and writes them
   back to the TransferQueue. With ``+reward.kawhi.ref_logprobs=true`` its
   ``_compute_ref_log_prob`` writes the service's reference log-probs (same call, at
   verl's rollout temperature) as ``ref_log_prob`` and no reference model is built.
3. **The entry point** -- ``python -m kawhi_client.integrations.verl_v1 <verl overrides>``:
   verl's own ``main_ppo`` with the three overrides that select the pieces above plus
   ``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=kawhi_client.integrations.verl_v1.register``,
   which imports this module in every Ray process verl starts (its ``TaskRunnerV1`` looks
   the trainer up in its own process).

Failures follow ``+reward.kawhi.on_error``. A failure cannot raise in the agent loop
(verl would log it and drop the group), so the worker stores a marker and the trainer
process applies the policy when it reads the weights: ``raise`` stops training with
``KawhiIntegrationError``; ``fallback`` keeps verl's GRPO advantages for those samples,
counted and warned in the worker and again in the trainer (``driver_policy()``). Every
call has a deadline (``+reward.kawhi.deadline_s``, default 120 s, waiting for a loading
server and retries included); past it the call is a failure like any other.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from kawhi_client.integrations.common import KawhiIntegrationError, Rollout, RowResult
from kawhi_client.integrations.verl_shared import (
    REF_KEY,
    WEIGHTS_KEY,
    encode_error,
    encode_fallback,
    encode_ref_logprobs,
    encode_weights,
    kawhi_settings,
    ref_log_prob_tensor,
    reweighter_from_config,
    rollout_from_prompt,
    weights_tensor,
)

__all__ = [
    "MANAGER_CLASS",
    "SETUP_HOOK",
    "TRAINER_MODE",
    "GroupBarrier",
    "KawhiAgentLoopManagerTQ",
    "KawhiAgentLoopWorkerTQ",
    "KawhiPPOTrainer",
    "main",
    "register",
    "stored_values",
]

log = logging.getLogger("kawhi_client.integrations")

TRAINER_MODE = "kawhi"
MANAGER_CLASS = "kawhi_client.integrations.verl_v1.KawhiAgentLoopManagerTQ"
SETUP_HOOK = "kawhi_client.integrations.verl_v1.register"


def stored_values(rows: Sequence[RowResult] | None, n: int, on_error: str, ref_logprobs: bool,
                  error: str | None = None) -> list[dict[str, str]]:
    """The TransferQueue fields of ``n`` samples from their KAWHI results.

    ``error`` (the call failed under ``on_error="raise"``) marks every sample so that the
    trainer raises; a row that fell back under ``"fallback"`` gets the fallback marker."""
    out: list[dict[str, str]] = []
    for i in range(n):
        row = None if rows is None else rows[i]
        if error is not None or row is None:
            weights = encode_error(error or "no result")
        elif row.reweighted or row.reason == "empty response":
            weights = encode_weights(row.token_weights, on_error)
        else:
            weights = encode_fallback(row.reason or "fallback")
        fields = {WEIGHTS_KEY: weights}
        if ref_logprobs:
            fields[REF_KEY] = encode_ref_logprobs(row.ref_logprobs) if (
                error is None and row is not None and row.ref_logprobs is not None) else \
                encode_fallback(error or (row.reason if row is not None else None) or "no reference log-probs")
        out.append(fields)
    return out


class GroupBarrier:
    """The n sessions of one uid: each ``arrive``s with its rollouts (or ``fail``s); the last
    one runs ``send`` once for the whole group and every session gets its own rows back.

    A group with a failed session sends nothing (verl drops it): ``arrive`` returns None."""

    def __init__(self, n: int, send: Callable[[list[Rollout]], Any]) -> None:
        self.n = n
        self.send = send
        self.arrived: dict[Any, list[Rollout]] = {}
        self.failed = 0
        self.done = asyncio.Event()
        self.rows: dict[Any, list[RowResult]] | None = None
        self._sending = False

    async def arrive(self, session: Any, rollouts: list[Rollout]) -> list[RowResult] | None:
        self.arrived[session] = rollouts
        await self._settle()
        await self.done.wait()
        return None if self.rows is None else self.rows[session]

    async def fail(self, session: Any) -> None:
        if session in self.arrived:
            return
        self.failed += 1
        await self._settle()

    async def _settle(self) -> None:
        if self._sending or len(self.arrived) + self.failed < self.n:
            return
        self._sending = True
        try:
            if not self.failed:
                order = list(self.arrived)
                flat = [r for s in order for r in self.arrived[s]]
                rows = list(await self.send(flat))
                self.rows, start = {}, 0
                for s in order:
                    self.rows[s] = rows[start:start + len(self.arrived[s])]
                    start += len(self.arrived[s])
        finally:
            self.done.set()


# ============================================================================ verl's classes

try:  # verl present: the real bases (this module is imported where verl runs)
    import ray
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ, PPOTrainerSync, register_trainer
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    from verl.workers.utils.padding import response_to_nested

    HAVE_VERL = True
except ImportError:  # pragma: no cover - exercised where verl is not installed
    HAVE_VERL = False


# run as ``python -m``, this file is ``__main__``; it then imports itself under its own name
# (main), and verl's trainer registry would see the trainer class twice
if HAVE_VERL and __name__ != "__main__":

    @ray.remote
    class KawhiAgentLoopWorkerTQ(AgentLoopWorkerTQ.__ray_actor_class__):  # type: ignore[name-defined, misc]
        """verl's ``AgentLoopWorkerTQ`` plus the group's KAWHI call (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kawhi_settings = kawhi_settings(self.config)
            self.kawhi = reweighter_from_config(self.config)
            self.kawhi_groups: dict[str, GroupBarrier] = {}
            self.kawhi_requests = 0  # one per group: what the tests count

        async def _run_prompt(self, prompt: dict, sampling_params: dict, trajectory: dict,
                              trace: bool = False) -> None:
            if trajectory["validate"]:  # validation has no advantages to scale
                return await super()._run_prompt(prompt, sampling_params, trajectory=trajectory, trace=trace)
            uid = prompt["uid"]
            n = int(prompt.get("__rollout_n__", self.config.actor_rollout_ref.rollout.n))  # as verl reads it
            self.kawhi_groups[uid] = GroupBarrier(n, self._kawhi_send)
            try:
                await super()._run_prompt(prompt, sampling_params, trajectory=trajectory, trace=trace)
            finally:
                self.kawhi_groups.pop(uid, None)

        async def _run_agent_loop(self, sampling_params: dict, trajectory: dict, *, agent_name: str,
                                  trace: bool = True, **kwargs: Any) -> Any:
            group = None if trajectory["validate"] else self.kawhi_groups.get(kwargs.get("uid"))
            try:
                return await super()._run_agent_loop(sampling_params, trajectory, agent_name=agent_name, trace=trace,
                                                     **kwargs)
            except BaseException:
                if group is not None:  # the siblings must not wait for this session
                    await group.fail(kwargs.get("session_id"))
                raise

        async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> None:
            await super()._agent_loop_postprocess(output, validate, **kwargs)  # the samples go to the TQ
            group = None if validate else self.kawhi_groups.get(kwargs["uid"])
            if group is None:
                return
            uid, session = kwargs["uid"], kwargs["session_id"]
            outputs = output if isinstance(output, list) else [output]
            rollouts = [rollout_from_prompt(o.response_ids, kwargs.get("raw_prompt"), kwargs.get("multi_modal_data"),
                                            uid, self.tokenizer) for o in outputs]
            rows = await group.arrive(session, rollouts)
            if rows is None or not outputs:
                return
            await tq.async_kv_batch_put(
                keys=[f"{uid}_{session}_{i}" for i in range(len(outputs))],  # verl's own key format
                fields=list_of_dict_to_tensordict(self._kawhi_fields(rows)), partition_id="train")

        def _kawhi_fields(self, rows: list[Any]) -> list[dict[str, str]]:
            error = rows[0] if rows and isinstance(rows[0], str) else None
            return stored_values(None if error else rows, len(rows), self.kawhi.on_error,
                                 bool(self.kawhi_settings["ref_logprobs"]), error=error)

        async def _kawhi_send(self, rollouts: list[Rollout]) -> list[Any]:
            """The group's one request, under the deadline and the policy. Under ``raise`` a
            failure comes back as its message (one per rollout) for the trainer to raise."""
            self.kawhi_requests += 1
            deadline = float(self.kawhi_settings["deadline_s"])
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            try:
                try:
                    return await asyncio.wait_for(loop.run_in_executor(None, self.kawhi.reweight, rollouts), deadline)
                except asyncio.TimeoutError:
                    self.kawhi.policy.failed("deadline exceeded",
                                             f"no answer within deadline_s={deadline:g} "
                                             f"({time.monotonic() - started:.1f} s)", rows=len(rollouts))
                    return [RowResult.uniform(1.0, len(r.token_ids), "fallback: deadline exceeded") for r in rollouts]
            except KawhiIntegrationError as exc:  # on_error="raise"
                return [str(exc)] * len(rollouts)

        def kawhi_stats(self) -> dict[str, Any]:
            """Requests sent and the policy's counters of this worker (for tests and logs)."""
            return {"requests": self.kawhi_requests, **self.kawhi.policy.stats()}

    class KawhiAgentLoopManagerTQ(AgentLoopManagerTQ):
        """verl's ``AgentLoopManagerTQ`` with ``KawhiAgentLoopWorkerTQ`` workers."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.agent_loop_workers_class = KawhiAgentLoopWorkerTQ

    @register_trainer(TRAINER_MODE)
    class KawhiPPOTrainer(PPOTrainerSync):
        """verl's synchronous v1 trainer with KAWHI's token weights (and, when asked, its
        reference log-probs). Registered as ``trainer.v1.trainer_mode=kawhi``; it behaves as
        mode ``sync`` everywhere verl branches on the mode."""

        @property
        def trainer_mode(self) -> str:
            return "sync"

        @trainer_mode.setter
        def trainer_mode(self, value: str) -> None:  # verl assigns config.trainer.v1.trainer_mode
            self.configured_trainer_mode = value

        @property
        def kawhi_ref(self) -> bool:
            return bool(kawhi_settings(self.config)["ref_logprobs"])

        def _init_resource_pool_mgr(self) -> None:
            super()._init_resource_pool_mgr()
            if self.kawhi_ref and Role.ActorRolloutRef in self.role_worker_mapping:
                # the reference comes from the service: no second copy of the model in the actor
                self.role_worker_mapping[Role.ActorRollout] = self.role_worker_mapping.pop(Role.ActorRolloutRef)
                self.mapping[Role.ActorRollout] = self.mapping.pop(Role.ActorRolloutRef)

        def _kawhi_read(self, batch: Any, field: str) -> Any:
            try:
                data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                       select_fields=["response_mask", field])
            except Exception as exc:
                raise KawhiIntegrationError(
                    f"the TransferQueue has no '{field}' for this batch ({type(exc).__name__}: {exc}); start verl "
                    f"with `python -m kawhi_client.integrations.verl_v1` or set "
                    f"actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}") from exc
            values = list(data[field])
            for i, tag in enumerate(batch.tags):
                if tag.get("is_padding", False):  # verl's synthetic padding copies another sample's fields
                    values[i] = encode_weights([]) if field == WEIGHTS_KEY else encode_ref_logprobs([])
            return data["response_mask"], values

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            batch = super()._compute_advantage(batch, metrics)
            mask, encoded = self._kawhi_read(batch, WEIGHTS_KEY)
            weights = weights_tensor(encoded, mask.to_padded_tensor(0))
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["advantages", "returns"])
            scaled = {name: response_to_nested(data[name].to_padded_tensor(0.0) * weights.to(data[name].dtype), mask)
                      for name in ("advantages", "returns")}
            return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                                   fields=TensorDict(scaled, batch_size=len(batch)))

        def _compute_ref_log_prob(self, batch: Any, metrics: dict) -> Any:
            if not self.kawhi_ref:
                return super()._compute_ref_log_prob(batch, metrics)
            mask, encoded = self._kawhi_read(batch, REF_KEY)
            ref = ref_log_prob_tensor(encoded, mask.to_padded_tensor(0))
            tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                            fields=TensorDict({"ref_log_prob": response_to_nested(ref, mask)}, batch_size=len(batch)))
            return batch


def register() -> None:
    """Ray's ``worker_process_setup_hook``: importing this module registers the trainer with
    verl in the process that runs it (verl's ``TaskRunnerV1`` looks it up in its own)."""
    if not HAVE_VERL:
        log.warning("KAWHI: verl is not importable in this process; the kawhi trainer is not registered")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kawhi_client.integrations.verl_v1 [verl overrides]``: verl's ``main_ppo``
    with the KAWHI pieces selected (an override given on the command line wins)."""
    args = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0].lstrip("+~") for a in args}
    defaults = ["trainer.use_v1=true", f"trainer.v1.trainer_mode={TRAINER_MODE}",
                f"++actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}",
                f"++ray_kwargs.ray_init.runtime_env.worker_process_setup_hook={SETUP_HOOK}"]
    # after the user's arguments: Hydra's parser takes the overrides as one trailing positional list
    sys.argv = [sys.argv[0], *args, *[d for d in defaults if d.split("=", 1)[0].lstrip("+") not in given]]
    from verl.trainer.main_ppo import main as verl_main

    verl_main()


if __name__ == "__main__":
    from kawhi_client.integrations import verl_v1

    verl_v1.main()
