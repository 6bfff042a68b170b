"""Train kawhi-tiny: a few-million-parameter Qwen2.5-VL on the kawhi-tiny task, on CPU.

Deterministic (fixed seeds, one data order: step s uses train-split items
s * batch .. s * batch + batch - 1, kinds in turn), through the real adapter path
(kawhi.tiny.model). Logs JSON lines of loss and held-out (val split) accuracy per kind
to <out>/train_log.jsonl, saves a checkpoint every --save-every steps to
<out>/checkpoints/step_NNNNN/ (loadable as --model; the early ones are the still-
imperfect policies an RL experiment starts from) and the final model to <out>/.

    python scripts/train_tiny_model.py --out runs/tiny              # the shipped model's run
    python scripts/train_tiny_model.py --out runs/tiny --steps 600  # a short, imperfect policy
    python scripts/train_tiny_model.py --out runs/tiny-long --init runs/tiny --steps 9000 --lr 1e-3
        # continue a finished run (its weights and tokenizer) on a fresh schedule; the card
        # records the chain of runs and the total steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from kawhi.models.qwen import QwenVLReference
from kawhi.tiny.model import (
    MODEL_NAME,
    Architecture,
    accuracy_by_kind,
    build_model,
    build_tokenizer,
    image_processor,
    row_logprobs,
    training_row,
)
from kawhi.tiny.task import KINDS, chance, make_item, tiny_items
from tqdm import tqdm

SEED = 20260327


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(reference: QwenVLReference, folder: Path, card: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    reference.model.save_pretrained(folder, safe_serialization=True)
    reference.tokenizer.save_pretrained(folder)
    reference.image_processor.save_pretrained(folder)
    (folder / "KAWHI_MODEL_CARD.json").write_text(json.dumps(card, indent=2) + "\n")


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak learning rate (docs/tiny.md: lower rates and what they did)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--short-share", type=float, default=0.4,
                        help="share of training responses that are `Answer: X` alone (the rest: 2-4 paragraphs)")
    parser.add_argument("--describe-share", type=float, default=0.0,
                        help="share of training rows that describe the whole image (\"Describe the image.\": every "
                             "object's colour and place, or every bar's height) instead of answering the item's question")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-items", type=int, default=20, help="val items per kind at each evaluation")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared 2-core machine 1 measured 6x faster than 2 (OpenMP spin)")
    parser.add_argument("--size", type=int, default=112, help="image side in px (a multiple of 28)")
    parser.add_argument("--fewest-share", type=float, default=0.0,
                        help="curriculum: share of training items drawn with the fewest objects (1 shape, 2 bars) "
                             "at step 0, falling linearly to 0 at --fewest-until (a share of the steps)")
    parser.add_argument("--fewest-until", type=float, default=0.5)
    parser.add_argument("--rope-theta", type=float, default=Architecture.rope_theta,
                        help="the decoder's rotary base (docs/tiny.md: why not Qwen's 1e6 on a 4 x 4 grid)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this trained model folder (weights and tokenizer) instead of a fresh one")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    arch = Architecture(rope_theta=args.rope_theta)
    previous: dict = {}
    if args.init is None:
        tokenizer = build_tokenizer(arch)
        model = build_model(tokenizer, arch, args.size)
    else:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        previous = json.loads((args.init / "KAWHI_MODEL_CARD.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init)
    earlier_steps = int(previous.get("total_steps", previous.get("steps", 0)))
    # a continued run sees new training items: it starts where the runs before it stopped
    offset = earlier_steps * args.batch
    reference = QwenVLReference(model, tokenizer, image_processor(), MODEL_NAME)
    reference.split_attention = False
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    val = tiny_items(args.eval_items, seed=0, size=args.size, split="val")
    kinds = list(KINDS)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "train_log.jsonl").open("w", encoding="utf-8")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    card = {"name": MODEL_NAME, "demo": False, "task": "kawhi-tiny (docs/tiny.md): shape scenes and bar charts, "
            f"{len(kinds)} question kinds, {args.size} px images", "parameters": parameters,
            "architecture": dataclasses.asdict(arch), "training_command": command, "commit": git_commit(),
            "seed": SEED, "chance": {k: chance(k, args.size) for k in kinds}}
    if previous:
        card["continued_from"] = {k: previous.get(k) for k in ("training_command", "commit", "steps", "total_steps",
                                                              "continued_from", "val_accuracy") if k in previous}

    def evaluate(step: int) -> dict[str, float]:
        model.eval()
        accuracy = accuracy_by_kind(reference, val)
        model.train()
        return accuracy

    started, running = time.monotonic(), None
    rng = random.Random(SEED)
    curriculum = random.Random(SEED + 1)  # its own stream: without a curriculum the run is the one before
    model.train()
    bar = tqdm(range(args.steps), disable=args.quiet, file=sys.stderr, desc="train kawhi-tiny", unit="step")
    for step in bar:
        fewest = args.fewest_share * max(0.0, 1 - step / max(1, args.fewest_until * args.steps))
        items = [make_item(kinds[(step * args.batch + j) % len(kinds)], offset + step * args.batch + j, seed=0,
                           size=args.size, split="train", fewest_objects=curriculum.random() < fewest)
                 for j in range(args.batch)]
        rows = [training_row(reference, item, rng, args.short_share, args.describe_share) for item in items]
        logprobs = row_logprobs(reference, rows)
        loss = -torch.cat(logprobs).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        bar.set_postfix(loss=f"{running:.3f}")
        done = step + 1
        record = {"step": done, "loss": round(float(loss), 5), "loss_ema": round(running, 5),
                  "seconds": round(time.monotonic() - started, 1)}
        if done % args.eval_every == 0 or done == args.steps:
            record["val_accuracy"] = evaluate(done)
            tqdm.write(f"step {done}: loss {running:.3f} val " + json.dumps(record["val_accuracy"]), file=sys.stderr)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if done % args.save_every == 0 and done != args.steps:
            save(reference, args.out / "checkpoints" / f"step_{done:05d}",
                 {**card, "steps": done, "total_steps": earlier_steps + done, "val_accuracy": record.get("val_accuracy")})
    final = {**card, "steps": args.steps, "total_steps": earlier_steps + args.steps, "val_accuracy": record["val_accuracy"],
             "train_seconds": round(time.monotonic() - started)}
    save(reference, args.out, final)
    print(json.dumps({"parameters": parameters, **{k: final[k] for k in ("steps", "val_accuracy", "train_seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
