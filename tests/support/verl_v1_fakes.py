"""The one stand-in of the verl v1 tests: the rollout engine (vLLM/SGLang, GPU only).

``ScriptedLLM`` answers verl's ``LLMServerClient.generate`` with scripted token ids,
cycling through the responses it was given; every other part of verl's agent loop
(prompt building with the processor, the agent loop, the reward loop, the TransferQueue)
is verl's own code. Importable by the Ray workers (tests/support is on their PYTHONPATH).
"""

from __future__ import annotations

import itertools
from typing import Any


class ScriptedLLM:
    def __init__(self, responses: list[list[int]], fail: bool = False) -> None:
        self.responses = responses
        self.fail = fail
        self._next: Any = None

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        if self._next is None:  # per worker process: the counter is not pickled state
            self._next = itertools.count()
        k = next(self._next)
        ids = self.responses[k % len(self.responses)]
        return TokenOutput(token_ids=list(ids), log_probs=[-1.0] * len(ids), stop_reason="completed")


def _single_turn_agent_loop() -> Any:
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    return SingleTurnAgentLoop


class TinyProcessorAgentLoop(_single_turn_agent_loop()):  # type: ignore[misc]
    """verl's own ``SingleTurnAgentLoop`` without torchvision.

    torchvision is not installed here (its PyPI build is a CUDA build of another torch),
    and verl needs it in two places on the VL path: ``AutoProcessor`` also builds the
    Qwen2.5-VL video processor, and ``qwen_vl_utils.process_vision_info`` (which only
    collects the message's images) imports it. So this loop gets the image-only processor
    the kawhi tests build (``tiny_processor``) and collects the images of the messages
    itself; prompt building, generation, and the output are verl's. Registered for the test
    through verl's ``agent_loop_config_path`` (its plug point for agent loops)."""

    def __init__(self, *args: Any, processor: Any = None, **kwargs: Any) -> None:
        from test_integration_helpers import tiny_processor

        super().__init__(*args, processor=processor if processor is not None else tiny_processor(), **kwargs)

    async def process_multi_modal_info(self, messages: list[dict]) -> dict:
        images = [part["image"].convert("RGB") for m in messages if isinstance(m.get("content"), list)
                  for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]
        return {"images": images} if images else {}
