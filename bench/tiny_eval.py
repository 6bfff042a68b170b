"""kawhi-tiny's evaluation: accuracy, SGUF on the task's images, alpha by paragraph role and
by region strategy, and the accuracy cost of masking the found heads (docs/tiny.md).

    python -m bench.tiny_eval                         # the embedded model, ~5 min on 2 cores
    python -m bench.tiny_eval --model runs/tiny/checkpoints/step_01000 --items 20

Every figure is over the test split (seed 0), never seen in training (train split) or in
model selection (val split). The protocol is fixed here, before any comparison:

* accuracy: closed-set (kawhi.tiny.model), ``--items`` per kind, with chance beside it;
* SGUF (image only, no model): a key token is *on an object* when its 28 px cell overlaps
  an object's pixel box; coverage: an asked object with at least one key token on it;
* alpha by role: each item's reading paragraph and restating paragraph, in both orders
  (kawhi.tiny.responses.paired_responses), through Engine.reweight with the model's
  default options and with ``rope=before`` and ``similarity=key_key``. Reported: the
  share of responses where the reading paragraph gets the higher alpha when it comes
  first and when it comes second (the goal needs >= 0.8 in both), the share where the
  *later* paragraph wins whatever it says (the position effect) and the share of items
  where the reading paragraph wins in both orders (the content effect);
* regions: the reading paragraph's alpha under regions sguf, random and inverse (the
  other options default), both orders; the share of responses ordered
  sguf > random > inverse and the mean alphas;
* position drift: the same reading paragraph after 0-3 image-independent paragraphs; its
  mean alpha at each depth (content fixed, positions moved) under each variant;
* masking: accuracy with the found heads (the model folder's heads file) zeroed in every
  layer, against every other head set of the same size.

Prints one JSON object and writes it to ``--out`` (default bench/results/tiny_eval.json).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kawhi.engine.engine import Engine
from kawhi.engine.regions import sguf_key_mask
from kawhi.heads.masking import masked_heads
from kawhi.tiny.model import accuracy_by_kind
from kawhi.tiny.responses import GENERIC, READS, paired_responses, reading_paragraph
from kawhi.tiny.task import CELL, KINDS, TinyItem, chance, tiny_items

ROOT = Path(__file__).resolve().parents[1]
ROLE_VARIANTS = {"default": {}, "rope_before": {"rope": "before"}, "key_key": {"similarity": "key_key"}}


def _repo_relative(text: str) -> str:
    """Paths inside the repository as repo-relative (a recorded report names no machine's folders)."""
    return text.replace(str(ROOT) + "/", "")


def sguf_figures(items: list[TinyItem]) -> dict:
    """Key-token precision on object pixels and asked-object coverage, image only."""
    on_object = key_total = covered = asked_total = 0
    for item in items:
        cells = item.image.size[0] // CELL
        mask = sguf_key_mask(np.asarray(item.image.convert("RGB")), (cells, cells))
        keys = [(r, c) for r in range(cells) for c in range(cells) if mask[r, c]]

        def hits(box: tuple[int, int, int, int], r: int, c: int) -> bool:
            x0, y0, x1, y1 = box
            return x0 < (c + 1) * CELL and x1 > c * CELL and y0 < (r + 1) * CELL and y1 > r * CELL

        key_total += len(keys)
        on_object += sum(any(hits(o.box, r, c) for o in item.objects) for r, c in keys)
        for box in item.asked_boxes:
            asked_total += 1
            covered += any(hits(box, r, c) for r, c in keys)
    return {"items": len(items), "key_tokens": key_total,
            "key_on_object": round(on_object / max(1, key_total), 4),
            "asked_covered": round(covered / max(1, asked_total), 4),
            "goal": {"key_on_object": 0.8, "asked_covered": 0.9}}


def _group(item: TinyItem, texts: list[str]) -> dict:
    buffer = io.BytesIO()
    item.image.save(buffer, format="PNG")
    return {"image": {"data": base64.b64encode(buffer.getvalue()).decode()}, "prompt": item.question,
            "responses": [{"text": t, "reward": 1.0} for t in texts]}


def paired_alphas(engine: Engine, items: list[TinyItem], options: dict) -> list[tuple[float, float, float, float]]:
    """Per item: (reading, restating) alpha with reading first, then (reading, restating) with it second."""
    groups, out = [], []
    for item in items:
        first, second = paired_responses(item)
        groups.append(_group(item, [first.text, second.text]))
    for result in engine.reweight(groups, options):
        if result.error is not None:
            raise RuntimeError(f"reweight failed: {result.error.detail}")
        a = [p.alpha for p in result.responses[0].paragraphs]
        b = [p.alpha for p in result.responses[1].paragraphs]
        out.append((a[0], a[1], b[1], b[0]))
    return out


def role_figures(pairs: list[tuple[float, float, float, float]]) -> dict:
    first = [r > o for r, o, _, _ in pairs]
    second = [r > o for _, _, r, o in pairs]
    later = [not f for f in first] + second  # the later paragraph won
    return {"responses": 2 * len(pairs),
            "reading_wins_when_first": round(float(np.mean(first)), 4),
            "reading_wins_when_second": round(float(np.mean(second)), 4),
            "position_effect_later_wins": round(float(np.mean(later)), 4),
            "content_effect_wins_both_orders": round(float(np.mean([f and s for f, s in zip(first, second)])), 4),
            "mean_alpha_reading": round(float(np.mean([p[0] for p in pairs] + [p[2] for p in pairs])), 5),
            "mean_alpha_restating": round(float(np.mean([p[1] for p in pairs] + [p[3] for p in pairs])), 5),
            "goal_met": bool(np.mean(first) >= 0.8 and np.mean(second) >= 0.8)}


def position_drift(engine: Engine, items: list[TinyItem], options: dict, fillers: int = 3) -> dict:
    """The same reading paragraph after 0..``fillers`` image-independent paragraphs: its mean
    alpha at each depth. Content is fixed, only its token positions move."""
    groups = []
    for item in items:
        reading = reading_paragraph(item, item.answer)
        texts = ["\n\n".join([*GENERIC[:k], reading, f"Answer: {item.answer}"]) for k in range(fillers + 1)]
        groups.append(_group(item, texts))
    by_depth = [[] for _ in range(fillers + 1)]
    for result in engine.reweight(groups, options):
        if result.error is not None:
            raise RuntimeError(f"reweight failed: {result.error.detail}")
        for k, response in enumerate(result.responses):
            by_depth[k].append(response.paragraphs[k].alpha)
    means = [float(np.mean(v)) for v in by_depth]
    return {"options": options, "mean_alpha_by_depth": [round(m, 5) for m in means],
            "spread": round(max(means) - min(means), 5)}


def region_figures(engine: Engine, items: list[TinyItem], base: dict) -> dict:
    alphas = {name: paired_alphas(engine, items, {**base, "regions": name}) for name in ("sguf", "random", "inverse")}
    reading = {name: [a for p in pairs for a in (p[0], p[2])] for name, pairs in alphas.items()}
    ordered = [s > r > i for s, r, i in zip(reading["sguf"], reading["random"], reading["inverse"])]
    return {"responses": len(ordered), "options": base,
            "mean_alpha_reading": {k: round(float(np.mean(v)), 5) for k, v in reading.items()},
            "share_sguf_gt_random_gt_inverse": round(float(np.mean(ordered)), 4),
            "share_sguf_gt_inverse": round(float(np.mean([s > i for s, i in zip(reading["sguf"], reading["inverse"])])), 4)}


def masking_figures(engine: Engine, items: list[TinyItem]) -> dict:
    found = engine.head_set.heads
    if not found:
        return {"skipped": "the model has no heads file: run `kawhi heads discover` first"}
    reference = engine.model
    baseline = accuracy_by_kind(reference, items)

    def mean_accuracy(heads: tuple[int, ...]) -> float:
        with masked_heads(reference, heads):
            return float(np.mean(list(accuracy_by_kind(reference, items).values())))

    others = [h for h in itertools.combinations(range(reference.num_heads), len(found)) if h != tuple(found)]
    found_acc = mean_accuracy(tuple(found))
    other_acc = {",".join(map(str, h)): round(mean_accuracy(h), 4) for h in others}
    base = float(np.mean(list(baseline.values())))
    return {"found_heads": list(found), "heads_source": _repo_relative(engine.head_set.source), "items": len(items),
            "accuracy_unmasked": round(base, 4), "accuracy_found_masked": round(found_acc, 4),
            "accuracy_other_sets_masked": other_acc,
            "drop_found": round(base - found_acc, 4),
            "drop_other_mean": round(base - float(np.mean(list(other_acc.values()))), 4) if other_acc else None,
            "goal_met": bool(other_acc) and found_acc < min(other_acc.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded kawhi-tiny)")
    parser.add_argument("--items", type=int, default=50, help="test items per kind for accuracy and SGUF")
    parser.add_argument("--alpha-items", type=int, default=16, help="test items per kind for the alpha figures")
    parser.add_argument("--mask-items", type=int, default=20, help="test items per kind for the masking figures")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alpha-only", action="store_true",
                        help="only the alpha-by-role and position-drift figures (printed, not written)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tiny_eval.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    load_start = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    engine = Engine.load(args.model)
    reference = engine.model
    alpha_items = tiny_items(args.alpha_items, seed=0, split="test")
    if args.alpha_only:  # the position/content figures alone, e.g. over a run's checkpoints
        report = {"model": engine.model_name, "model_folder": _repo_relative(str(reference.source_dir)),
                  "steps": (engine.model_card or {}).get("steps"),
                  "alpha_by_role": {name: role_figures(paired_alphas(engine, alpha_items, opts))
                                    for name, opts in ROLE_VARIANTS.items()},
                  "position_drift": {name: position_drift(engine, alpha_items, opts)
                                     for name, opts in ROLE_VARIANTS.items()},
                  "seconds": round(time.monotonic() - started, 1)}
        print(json.dumps(report))
        return report
    test = tiny_items(args.items, seed=0, split="test")
    accuracy = accuracy_by_kind(reference, test)
    report = {
        "model": engine.model_name, "model_folder": _repo_relative(str(reference.source_dir)), "heads": list(engine.resolve_heads(engine.defaults)),
        "accuracy": {k: {"accuracy": round(accuracy[k], 4), "chance": round(chance(k), 4)} for k in KINDS},
        "accuracy_goal_met": all(v >= 0.9 for v in accuracy.values()),
        "sguf": sguf_figures(test),
        "alpha_by_role": {name: role_figures(paired_alphas(engine, alpha_items, opts))
                          for name, opts in ROLE_VARIANTS.items()},
        "regions": {name: region_figures(engine, alpha_items, opts) for name, opts in
                    (("default", {}), ("rope_before", {"rope": "before"}))},
        "position_drift": {name: position_drift(engine, alpha_items, opts) for name, opts in ROLE_VARIANTS.items()},
        "masking": masking_figures(engine, tiny_items(args.mask_items, seed=0, split="test")),
        "items_per_kind": {"accuracy_sguf": args.items, "alpha": args.alpha_items, "masking": args.mask_items},
        "reading_role": READS,
        "command": "python -m bench.tiny_eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "loadavg_start": load_start,
                    "loadavg_end": Path("/proc/loadavg").read_text().split()[0] if load_start else None},
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
