"""The group barrier of the verl v1 agent loop (no verl needed): the n sessions of one uid
settle in any order, the last one sends the group's ONE request, and each session gets its
own rows back; a failed session releases the others without a request. And the stored
values a worker writes: weights, fallback markers, and the raise-policy error marker that
makes the trainer raise."""

from __future__ import annotations

import asyncio
import random

import pytest
from kawhi_client.integrations import KawhiIntegrationError
from kawhi_client.integrations.common import Rollout, RowResult
from kawhi_client.integrations.verl_shared import WEIGHTS_KEY, decode_weights, weights_tensor
from kawhi_client.integrations.verl_v1 import GroupBarrier, stored_values


def rollout(session: int, k: int = 0) -> Rollout:
    return Rollout(token_ids=[session * 10 + k, 1, 2], image=b"x", prompt="p")


async def settle(group: GroupBarrier, sessions: dict[int, int], fail: set[int], delays: dict[int, float]) -> dict:
    async def one(session: int) -> object:
        await asyncio.sleep(delays[session])
        if session in fail:
            await group.fail(session)
            return "failed"
        return await group.arrive(session, [rollout(session, k) for k in range(sessions[session])])

    results = await asyncio.gather(*[one(s) for s in sessions])
    return dict(zip(sessions, results))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_last_session_sends_one_request_and_each_gets_its_own_rows(seed: int) -> None:
    rng = random.Random(seed)
    sessions = {0: 1, 1: 2, 2: 1}  # session 1's agent loop produced two outputs
    delays = {s: rng.random() / 100 for s in sessions}
    calls: list[list[int]] = []

    async def send(rollouts: list[Rollout]) -> list[RowResult]:
        calls.append([r.token_ids[0] for r in rollouts])
        return [RowResult([], [float(r.token_ids[0])] * 3, True) for r in rollouts]

    got = asyncio.run(settle(GroupBarrier(3, send), sessions, set(), delays))
    assert len(calls) == 1 and sorted(calls[0]) == [0, 10, 11, 20]  # one request, every response of the group
    for session, rows in got.items():
        assert [row.token_weights[0] for row in rows] == [session * 10 + k for k in range(sessions[session])]


def test_a_failed_session_releases_the_group_without_a_request() -> None:
    calls: list[int] = []

    async def send(rollouts: list[Rollout]) -> list[RowResult]:
        calls.append(len(rollouts))
        return []

    got = asyncio.run(settle(GroupBarrier(3, send), {0: 1, 1: 1, 2: 1}, {1}, {0: 0.0, 1: 0.01, 2: 0.0}))
    assert calls == [] and got == {0: None, 1: "failed", 2: None}


def test_stored_values_carry_the_policy_to_the_trainer() -> None:
    import torch

    ok = RowResult([], [0.5, 0.5, 1.0], True)
    fell_back = RowResult.uniform(1.0, 3, "fallback: KawhiConnectionError")
    fields = stored_values([ok, fell_back], 2, "fallback", ref_logprobs=False)
    assert decode_weights(fields[0][WEIGHTS_KEY]) == ([0.5, 0.5, 1.0], None, "fallback")
    assert decode_weights(fields[1][WEIGHTS_KEY])[:2] == (None, "fallback: KawhiConnectionError")
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.warns(Warning, match="1 of 2 samples"):
        w = weights_tensor([f[WEIGHTS_KEY] for f in fields], mask)
    assert w.tolist() == [[0.5, 0.5, 1.0], [1.0, 1.0, 1.0]]
    # under raise the worker cannot raise (verl would drop the group): the trainer does
    raised = stored_values(None, 2, "raise", ref_logprobs=True, error="KAWHI service call failed: down")
    assert all(f["kawhi_ref_logprobs"].startswith("kawhi-fallback:") for f in raised)
    with pytest.raises(KawhiIntegrationError, match="service call failed: down"):
        weights_tensor([f[WEIGHTS_KEY] for f in raised], mask)


def test_a_hanging_service_is_a_failure_after_the_deadline_not_a_hang() -> None:
    """A real socket that accepts and never answers (verl's own reward client would wait
    forever): the adapter's call gives up after deadline_s and the policy decides."""
    import socket
    import threading
    import time

    from kawhi_client.integrations.verl_shared import reweighter_from_config

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        # the wait for a loading server, then the request's own read (no readiness wait)
        for on_error, wait_ready in (("fallback", True), ("raise", True), ("fallback", False)):
            config = {"reward": {"kawhi": {"url": url, "on_error": on_error, "deadline_s": 1.5,
                                           "client": {"retries": 0, **({} if wait_ready else {"wait_ready": False})}}}}
            kawhi = reweighter_from_config(config)
            started = time.monotonic()
            if on_error == "raise":
                with pytest.raises(KawhiIntegrationError):
                    kawhi.reweight([rollout(0)])
            else:
                with pytest.warns(Warning, match="service call failed.*(not ready after 1.5s|Timeout)"):
                    (row,) = kawhi.reweight([rollout(0)])
                assert not row.reweighted
            assert time.monotonic() - started < 10  # the deadline, not the client's 600 s wait
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
