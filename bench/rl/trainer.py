"""One run of the RL experiment: a policy checkpoint trained with TRL's real ``GRPOTrainer``
(or ``KawhiGRPOTrainer`` against a live ``kawhi serve``) for a fixed number of steps, with
held-out accuracy, paragraphs per response and a step-time split recorded along the way.

Step time is split by wrapping the trainer's own methods (nothing in TRL's path changes):
``generate`` = ``GRPOTrainer._generate`` (sampling the G completions), ``kawhi`` = the
``Reweighter.reweight`` call (HTTP round trip to the service), ``ref`` = TRL's reference
forward (``_get_per_token_logps_and_entropies`` on ``ref_model``, only with ``beta > 0``),
``score`` = the rest of ``_generate_and_score_completions`` (tokenising, rewards, advantages),
``update`` = the rest of the optimiser step (policy forward, backward, optimiser).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.rl.task import completion_text, exact_match_reward, is_correct, paragraphs


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment. ``kawhi_options`` None = plain GRPO (no service call)."""

    name: str
    kawhi_options: dict[str, Any] | None = None
    beta: float = 0.0
    ref_from_service: bool = False  # KL reference log-probs from the service (needs beta > 0)


@dataclass
class Hyper:
    """The hyper-parameters every arm shares (docs/experiments.md fixes them)."""

    steps: int = 30
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 128
    learning_rate: float = 1e-4
    temperature: float = 1.0
    loss_type: str = "grpo"
    eval_every: int = 10
    eval_max_new_tokens: int = 128
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def image_only_processor(model_dir: str | Path) -> Any:
    """A Qwen2.5-VL processor from ``model_dir``'s tokenizer, image processor and chat template.
    Built by hand: AutoProcessor also wants the video processor, which needs torchvision."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"  # TRL's own default; kawhi_ref_logprobs needs it
    template = model_dir / "chat_template.jinja"
    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True),
                              tokenizer=tokenizer, video_processor=None,
                              chat_template=template.read_text() if template.exists() else tokenizer.chat_template)


def load_policy(model_dir: str | Path) -> Any:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)


def user_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def make_dataset(items: Sequence[Any]) -> Any:
    """TRL's VLM GRPO rows: a conversational prompt (TRL inserts the image part), the image, and
    the columns the reward reads."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": it.question}], "image": it.image,
                               "answer": it.answer, "kind": it.kind} for it in items])


def evaluate(model: Any, processor: Any, items: Sequence[Any], max_new_tokens: int,
             batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers of ``model`` on ``items``: accuracy, accuracy per kind, paragraphs per response."""
    import torch

    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    n_paragraphs: list[int] = []
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [processor.apply_chat_template(user_messages(it.question), add_generation_prompt=True, tokenize=False)
                   for it in batch]
        enc = processor(text=prompts, images=[it.image for it in batch], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        for it, text in zip(batch, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True),
                            strict=True):
            texts.append(text)
            correct.append(is_correct(text, it.answer))
            n_paragraphs.append(len(paragraphs(text)))
    if was_training:
        model.train()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for it, ok in zip(items, correct, strict=True):
        by_kind[it.kind].append(ok)
    return {"accuracy": sum(correct) / len(correct),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "paragraphs": sum(n_paragraphs) / len(n_paragraphs), "sample": [t[:300] for t in texts[:2]]}


class StepClock:
    """Seconds per named part of the current step; ``close()`` files the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] += time.perf_counter() - start

    def close(self, total: float) -> None:
        c = self.current
        row = {"step": total, "generate": c["generate"], "kawhi": c["kawhi"], "ref": c["ref"],
               "score": c["generate_and_score"] - c["generate"] - c["kawhi"] - c["ref"],
               "update": total - c["generate_and_score"]}
        self.steps.append(row)
        self.current = defaultdict(float)


def timed(base: type) -> type:
    """``base`` (GRPOTrainer or KawhiGRPOTrainer) with its parts timed into ``self.clock``."""

    class Timed(base):  # type: ignore[misc, valid-type]
        clock: StepClock

        def _generate(self, prompts: list) -> Any:
            with self.clock.part("generate"):
                return super()._generate(prompts)

        def _generate_and_score_completions(self, inputs: list) -> Any:
            with self.clock.part("generate_and_score"):
                return super()._generate_and_score_completions(inputs)

        def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> Any:
            if model is not None and model is getattr(self, "ref_model", None):
                with self.clock.part("ref"):
                    return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


class RewardLog:
    """The TRL reward function, recording per call (= per step) mean reward and paragraphs."""

    __name__ = "exact_match"

    def __init__(self) -> None:
        self.calls: list[dict[str, float]] = []

    def __call__(self, completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
        rewards = exact_match_reward(completions, answer)
        counts = [len(paragraphs(completion_text(c))) for c in completions]
        self.calls.append({"reward": sum(rewards) / len(rewards), "paragraphs": sum(counts) / len(counts)})
        return rewards


def step_timer(clock: StepClock) -> Any:
    """Files each optimiser step's wall time (and its parts) into ``clock``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.close(time.perf_counter() - self.started)

    return StepTimer()


def eval_callback(on_eval: Callable[[int, Any], None], eval_every: int) -> Any:
    """Evaluates before the first step and every ``eval_every`` steps (after the step timer filed the step)."""
    from transformers import TrainerCallback

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            on_eval(0, model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step % eval_every == 0 or state.global_step == state.max_steps:
                on_eval(state.global_step, model)

    return Evaluate()


def build_trainer(arm: Arm, seed: int, hyper: Hyper, policy_dir: str | Path, train: Sequence[Any],
                  url: str | None, out_dir: Path, reward: Callable[..., list[float]],
                  clock: StepClock, callbacks: Sequence[Any] = (), base: type | None = None) -> Any:
    """The arm's trainer (not trained yet), its parts timed into ``clock`` (``trainer.clock``)."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(seed)
    config = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=hyper.prompts_per_step * hyper.num_generations,
        num_generations=hyper.num_generations, max_completion_length=hyper.max_completion_length,
        max_steps=hyper.steps, learning_rate=hyper.learning_rate, temperature=hyper.temperature,
        loss_type=hyper.loss_type, beta=arm.beta, seed=seed, data_seed=seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, **hyper.extra)
    kwargs: dict[str, Any] = {"model": load_policy(policy_dir), "reward_funcs": reward, "args": config,
                              "train_dataset": make_dataset(train), "processing_class": image_only_processor(policy_dir),
                              "callbacks": [step_timer(clock), *callbacks]}
    if arm.kawhi_options is None:
        cls = timed(base or GRPOTrainer)
        trainer = cls(**kwargs)
    else:
        from kawhi_client import Client
        from kawhi_client.integrations.trl import KawhiGRPOTrainer

        if url is None:
            raise ValueError(f"arm {arm.name} needs a kawhi serve URL")
        cls = timed(base or KawhiGRPOTrainer)
        trainer = cls(**kwargs, kawhi=Client(url, timeout=300), kawhi_options=dict(arm.kawhi_options),
                      kawhi_ref_logprobs=arm.ref_from_service)
    trainer.clock = clock
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TRL's metrics are in the record; keep the log readable
    if arm.kawhi_options is not None:
        reweight = trainer.kawhi.reweight

        def timed_reweight(rollouts: Any) -> Any:
            with clock.part("kawhi"):
                return reweight(rollouts)

        trainer.kawhi.reweight = timed_reweight
    return trainer


def run_arm(arm: Arm, seed: int, hyper: Hyper, policy_dir: str | Path, train: Sequence[Any],
            heldout: Sequence[Any], url: str | None, out_dir: Path,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one (arm, seed) and return its record (evaluations, per-step times and stats)."""
    import torch

    torch.set_num_threads(hyper.threads)
    reward = RewardLog()
    evals: list[dict[str, Any]] = []

    def on_eval(step: int, model: Any) -> None:
        if not heldout:
            return
        result = evaluate(model, processor, heldout, hyper.eval_max_new_tokens)
        evals.append({"step": step, **result})
        log(f"  [{arm.name} seed {seed}] step {step}: held-out accuracy {result['accuracy']:.3f}, "
            f"paragraphs {result['paragraphs']:.2f}")

    processor = image_only_processor(policy_dir)
    clock = StepClock()
    trainer = build_trainer(arm, seed, hyper, policy_dir, train, url, out_dir, reward, clock,
                            callbacks=[eval_callback(on_eval, hyper.eval_every)])
    started = time.perf_counter()
    trainer.train()
    record = {"arm": arm.name, "seed": seed, "options": arm.kawhi_options, "beta": arm.beta,
              "ref_from_service": arm.ref_from_service, "evals": evals, "steps": clock.steps,
              "train": reward.calls, "seconds": time.perf_counter() - started,
              "trl_log": trainer.state.log_history}  # TRL's own metrics per step (kawhi/weight_mean among them)
    if arm.kawhi_options is not None:
        record["kawhi"] = {**trainer.kawhi.policy.stats(), "tokenizer_matches_service": trainer.kawhi_tokenizer_ok}
    return record
