#!/usr/bin/env python3
"""GRPO on a vision-language model with KAWHI token advantages, in TRL. Copy and adapt.

The KAWHI change to a TRL GRPO script is three lines (marked ``# KAWHI`` below):

    from kawhi_client.integrations.trl import KawhiGRPOTrainer     # instead of trl.GRPOTrainer
    trainer = KawhiGRPOTrainer(..., kawhi="http://kawhi:8000")      # same arguments, plus the service
    trainer.train()

Run it:

    kawhi serve --model /models/Qwen2.5-VL-7B-Instruct --device cuda:1 &     # the frozen reference
    python examples/trl_grpo.py --model /models/Qwen2.5-VL-3B-Instruct --kawhi http://127.0.0.1:8000

    # no server: the reference model inside the trainer process (needs the memory for both)
    python examples/trl_grpo.py --model /models/Qwen2.5-VL-3B-Instruct \\
        --kawhi in-process --kawhi-model /models/Qwen2.5-VL-7B-Instruct --kawhi-device cuda

    # offline smoke run on CPU: the tiny random demo policy and the embedded demo reference
    python examples/trl_grpo.py --demo --max-steps 1

The dataset here is the repository's examples/rollouts.jsonl (three chart/geometry
questions with their images); the reward checks the last number of the completion against
the answer. Replace both with yours: TRL's VLM GRPO wants a conversational ``prompt``
column and an ``image`` column (one image per prompt, which is what KAWHI is defined for).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def build_dataset(jsonl: Path) -> Any:
    """One row per rollout group: the chat prompt, the image, and the answer (the last number
    of a response that earned reward 1)."""
    from datasets import Dataset
    from PIL import Image

    rows = []
    for line in jsonl.read_text().splitlines():
        if not line.strip():
            continue
        group = json.loads(line)
        correct = [r["text"] for r in group["responses"] if r.get("reward") == 1.0]
        answer = re.findall(r"-?\d+(?:\.\d+)?", correct[0])[-1] if correct else ""
        image = Image.open(jsonl.parent / group["image"]["path"]).convert("RGB")
        rows.append({"prompt": [{"role": "user", "content": group["prompt"]}], "image": image, "answer": answer})
    return Dataset.from_list(rows)


def completion_text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def correctness_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1 when the completion's last number is the answer, else 0."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", completion_text(completion))
        out.append(1.0 if numbers and expected and numbers[-1] == expected else 0.0)
    return out


def demo_variety_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """DEMO ONLY: a random policy never answers correctly, so every group would have equal
    rewards and zero advantages (nothing to reweight). This gives the groups some variance."""
    return [len(set(text)) / max(1, len(text)) for text in map(completion_text, completions)]


def demo_policy_and_processor() -> tuple[Any, Any]:
    """The embedded demo Qwen2.5-VL (random weights, ~1 MB) as a policy, with its processor
    built by hand (AutoProcessor would also want torchvision for the video processor)."""
    import torch
    from kawhi.engine.engine import DEMO_MODEL_DIR
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(DEMO_MODEL_DIR, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True),
        video_processor=None, chat_template=(DEMO_MODEL_DIR / "chat_template.jinja").read_text())
    torch.manual_seed(0)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32,
                                                                local_files_only=True)
    return policy, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="policy model (local folder or hub id)")
    parser.add_argument("--demo", action="store_true", help="tiny random demo policy + in-process demo KAWHI (CPU)")
    parser.add_argument("--kawhi", default=None,
                        help="KAWHI service URL, or 'in-process' (default: in-process with --demo, else $KAWHI_URL)")
    parser.add_argument("--kawhi-model", default=None, help="reference model for --kawhi in-process (default: the demo with --demo, else the embedded kawhi-tiny)")
    parser.add_argument("--kawhi-device", default="cpu", help="device of the in-process reference model")
    parser.add_argument("--on-error", choices=["raise", "fallback"], default="raise",
                        help="when the service fails: fail the step, or keep the uniform advantages (counted, warned)")
    parser.add_argument("--normalize", choices=["none", "mean"], default="none",
                        help="KAWHI weight normalisation (none = the paper)")
    parser.add_argument("--dataset", type=Path, default=HERE / "rollouts.jsonl")
    parser.add_argument("--output-dir", default="outputs/kawhi-grpo")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("--model is required (or --demo)")

    import os

    from kawhi_client.integrations import InProcessBackend
    from kawhi_client.integrations.trl import KawhiGRPOTrainer  # KAWHI (1/3)
    from trl import GRPOConfig

    if args.demo:
        policy, processor = demo_policy_and_processor()
        reward_funcs = [correctness_reward, demo_variety_reward]
        args.max_completion_length = min(args.max_completion_length, 16)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        policy = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto")
        processor = AutoProcessor.from_pretrained(args.model)
        reward_funcs = [correctness_reward]

    kawhi: Any = args.kawhi or ("in-process" if args.demo else os.environ.get("KAWHI_URL"))
    if kawhi is None:
        parser.error("--kawhi URL (or in-process) is required, or set KAWHI_URL")
    if kawhi == "in-process":
        from kawhi.engine.engine import DEMO_MODEL_DIR

        # --demo's random policy speaks the demo model's tokenizer: its reference is the demo too
        model = args.kawhi_model or (str(DEMO_MODEL_DIR) if args.demo else None)
        kawhi = InProcessBackend(model=model, device=args.kawhi_device)

    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        beta=0.01,  # the paper's KL coefficient
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=args.demo,
        bf16=not args.demo,
        gradient_checkpointing=not args.demo,
    )
    trainer = KawhiGRPOTrainer(  # KAWHI (2/3): was GRPOTrainer(...)
        model=policy,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=build_dataset(args.dataset),
        processing_class=processor,
        kawhi=kawhi,
        kawhi_options={"normalize": args.normalize},
        kawhi_on_error=args.on_error,
    )
    trainer.train()  # KAWHI (3/3): unchanged
    print(json.dumps({"global_step": trainer.state.global_step, "kawhi": trainer.kawhi.policy.stats()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
