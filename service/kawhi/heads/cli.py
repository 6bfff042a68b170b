"""`kawhi heads`: `discover` (the causal test), `synth` (a synthetic labelled set), `show`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kawhi.helptext import DefaultsHelpFormatter


def add_heads_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("heads", help="vision-critical heads: discover a model's set, show the set in use")
    sub = parser.add_subparsers(dest="heads_command", required=True)

    d = sub.add_parser(
        "discover", help="find a model's vision-critical heads by masking each head (writes a --heads-file)",
        description="Mask each head index in every decoder layer and measure the drop of the gold answers' "
        "log-likelihood, with the image and with a blank one; see docs/heads.md for the decision rule.",
        formatter_class=DefaultsHelpFormatter)
    d.add_argument("--model", default=None, help="local model folder (default: the embedded kawhi-tiny model)")
    d.add_argument("--data", type=Path, default=None,
                   help="JSONL of {image, question, answer} (image: {path} relative to the file, or {data}); "
                   "default: a synthetic set of --synthetic-items charts and shapes")
    d.add_argument("-o", "--output", type=Path, required=True, help="heads file to write (JSON, usable as --heads-file)")
    d.add_argument("--all", dest="all_heads", action="store_true", help="test every head (no screen)")
    d.add_argument("--top-k", type=int, default=12, help="heads the attention screen passes to the causal test")
    d.add_argument("--controls", type=int, default=4, help="random other heads tested as a check on the screen")
    d.add_argument("--threshold", type=float, default=0.05,
                   help="least drop, as a fraction of the log-likelihood the image adds")
    d.add_argument("--confidence", type=float, default=0.95, help="family-wise confidence of the bootstrap intervals")
    d.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--limit", type=int, default=None, help="use only the first N items")
    d.add_argument("--synthetic-items", type=int, default=48, help="size of the default synthetic set")
    d.add_argument("--synthetic-task", choices=["charts", "tiny"], default=None,
                   help="the default synthetic set: kawhi-tiny's task (docs/tiny.md) or charts and shapes "
                   "with one-word answers (default: tiny for the embedded kawhi-tiny model, charts otherwise)")
    d.add_argument("--batch-heads", type=int, default=8, help="heads masked per forward, one per batch row "
                   "(speed and memory only; results do not depend on it beyond float rounding)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    d.add_argument("--restart", action="store_true", help="ignore (delete) the state of an earlier, interrupted run")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_discover)

    s = sub.add_parser("synth", help="write a small labelled synthetic VQA set (charts, geometry)")
    s.add_argument("-o", "--output", type=Path, required=True, help="folder for vqa.jsonl and images/")
    s.add_argument("--items", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=224, help="image side in pixels (charts)")
    s.add_argument("--task", choices=["charts", "tiny"], default="charts",
                   help="charts and shapes, or kawhi-tiny's task (112 px, answers `Answer: X`)")
    s.set_defaults(func=cmd_synth)

    show = sub.add_parser("show", help="print a model's identity, its head set and where the set comes from")
    show.add_argument("--model", default=None, help="local model folder (default: the embedded kawhi-tiny model)")
    show.add_argument("--heads-file", default=os.environ.get("KAWHI_HEADS_FILE") or None,
                      help="heads file to check against the model (default: $KAWHI_HEADS_FILE)")
    show.set_defaults(func=cmd_show)
    return parser


def _default_dir() -> Path:
    from kawhi.engine.engine import TINY_MODEL_DIR

    return TINY_MODEL_DIR


def cmd_show(args: argparse.Namespace) -> int:
    from kawhi.heads.files import HeadsFileError, check_model_folder_heads
    from kawhi.heads.identity import ModelIdentity

    folder = Path(args.model) if args.model else _default_dir()
    try:
        head_set = check_model_folder_heads(folder, args.heads_file)
    except HeadsFileError as exc:
        print(f"kawhi: {exc}", file=sys.stderr)
        return 2
    identity = ModelIdentity.from_folder(folder)
    print(json.dumps({"model": identity.to_dict(), "heads": list(head_set.heads) if head_set.heads else None,
                      "heads_source": head_set.source}, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from kawhi.heads.synthetic import write_synthetic_vqa

    path = write_synthetic_vqa(args.output, args.items, args.seed, args.size, args.task)
    print(f"kawhi: {args.items} labelled items -> {path}", file=sys.stderr)
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kawhi.heads.discover import DiscoveryError, DiscoverySettings, discover, items_hash, load_vqa_jsonl
    from kawhi.heads.files import write_heads_file
    from kawhi.heads.synthetic import synthetic_items
    from kawhi.models.qwen import QwenVLReference

    try:
        settings = DiscoverySettings(all_heads=args.all_heads, top_k=args.top_k, controls=args.controls,
                                     threshold=args.threshold, confidence=args.confidence,
                                     bootstrap=args.bootstrap, seed=args.seed)
        if args.data is not None:
            items, data_hash = load_vqa_jsonl(args.data, args.limit)
            source = str(args.data)
        else:
            task = args.synthetic_task or ("tiny" if args.model is None else "charts")
            items = synthetic_items(task, args.synthetic_items, seed=args.seed)[: args.limit]
            data_hash, source = items_hash(items), f"synthetic (kawhi heads synth --task {task} " \
                                                    f"--items {args.synthetic_items} --seed {args.seed})"
    except (DiscoveryError, ValueError) as exc:
        print(f"kawhi: {exc}", file=sys.stderr)
        return 2
    reference = QwenVLReference.from_pretrained(args.model or _default_dir(), device=args.device,
                                                dtype="float32" if args.model is None else args.dtype)
    state_path = args.output.with_name(args.output.name + ".partial.jsonl")
    if args.restart:
        state_path.unlink(missing_ok=True)
    elif state_path.is_file():
        print(f"kawhi: resuming the interrupted run recorded in {state_path}", file=sys.stderr)

    def bar(total: int) -> Any:
        return tqdm(total=total, unit="score", disable=args.quiet, file=sys.stderr, desc="heads discover")

    try:
        report = discover(reference, items, data_sha256=data_hash, settings=settings, state_path=state_path,
                          progress=bar, data_source=source, batch_heads=args.batch_heads)
    except (DiscoveryError, ValueError) as exc:
        print(f"kawhi: {exc}", file=sys.stderr)
        return 2
    write_heads_file(args.output, report)
    state_path.unlink(missing_ok=True)
    timing = report["timing"]
    print(f"kawhi: vision-critical heads {report['heads']} of {reference.num_heads} "
          f"({len(report['tested'])} tested on {len(items)} items, {timing['seconds_per_head_mean']:.2f} s per head, "
          f"{timing['seconds_total_this_run']:.1f} s in all) -> {args.output}", file=sys.stderr)
    for note in report["notes"]:
        print(f"kawhi: note: {note}", file=sys.stderr)
    return 0
