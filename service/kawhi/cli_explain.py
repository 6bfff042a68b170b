"""`kawhi explain IN.jsonl -o DIR/`: one PNG (more pages if needed) and one HTML per group."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any


def add_explain_parser(sub: Any) -> None:
    """Register `kawhi explain` with the same input and options as `kawhi reweight`."""
    from kawhi.cli import _add_model_flags, add_method_options

    ex = sub.add_parser("explain", help="draw what KAWHI saw for each group of a JSONL file (PNG + HTML)",
                        description="Reweight each group (same input and options as 'kawhi reweight') and write "
                                    "DIR/<id>.png and DIR/<id>.html: the image as the model saw it with its key and "
                                    "sampled visual tokens, and each response's paragraphs shaded by weight.")
    ex.add_argument("input", help="input JSONL, or - for standard input; image paths are relative to its folder")
    ex.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    ex.add_argument("--heatmap", type=int, default=None, metavar="RESPONSE",
                    help="also draw each visual token's alignment with response RESPONSE (0-based)")
    ex.add_argument("--page-height", type=int, default=None, metavar="PX",
                    help="start a new PNG page past this height (default: 1600)")
    _add_model_flags(ex)
    ex.add_argument("--batch-groups", type=int, default=8, help="groups prepared and run together")
    add_method_options(ex)
    ex.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from kawhi_client.explain import Explanation, file_stem

    from kawhi.cli import _chunks, _read_lines, checked_options, load_engine, resolved_options
    from kawhi.engine.engine import load_image_bytes

    options = checked_options(args)
    lines, base_dir = _read_lines(args.input)
    engine = load_engine(args)
    resolved_options(engine, options)
    load_image = functools.partial(load_image_bytes, base_dir=base_dir)
    used: set[str] = set()
    written: list[Path] = []
    failed = 0
    for chunk in _chunks(lines, args.batch_groups):
        groups, numbers = [], []
        for number, line in chunk:
            try:
                groups.append(json.loads(line))
                numbers.append(number)
            except json.JSONDecodeError as exc:
                print(f"kawhi: line {number}: not JSON: {exc}", file=sys.stderr)
                failed += 1
        outcomes = engine.explain(groups, options, load_image=load_image, base_dir=base_dir, heatmap_response=args.heatmap,
                                  max_page_height=args.page_height) if groups else []
        for number, outcome in zip(numbers, outcomes):
            if not isinstance(outcome, Explanation):
                error = outcome.error
                where = f" at {error.pointer}" if error.pointer else ""
                print(f"kawhi: line {number} ({outcome.id or 'no id'}): {error.title}{where}: {error.detail}",
                      file=sys.stderr)
                failed += 1
                continue
            stem = file_stem(outcome.view.id, number)
            if stem in used:
                stem = f"{stem}-line{number}"
            used.add(stem)
            written += outcome.save(args.output, stem)
    ok = len(lines) - failed
    pictures = ", ".join(str(p) for p in written if p.suffix == ".png")
    print(f"kawhi: {ok} group(s) explained, {failed} failed -> {args.output}/" + (f" (look at {pictures})"
          if pictures else ""), file=sys.stderr)
    return 0 if ok > 0 else 1
