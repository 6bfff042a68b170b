"""Does a kawhi-tiny model look up the asked object? Attention from the position that must
read it to the visual tokens, split into the asked object, the other objects and the background.

    python -m bench.tiny_lookup                                   # the embedded model
    python -m bench.tiny_lookup --model runs/tiny/checkpoints/step_02000 --at name

Binding a property to a named object ("What colour is the triangle?") needs the reading
position to attend to the named object's visual token more than to the other objects'.
This probe measures that and nothing else (docs/tiny.md, the third training round):

* ``--at answer``: the item's question, then ``Answer:``; the last token predicts the answer;
* ``--at name``: the description prompt, then ``The <asked shape>``; the last token is the
  name, whose next token in a description row is the object's colour.

Per layer and head, over the val-split shape-colour items with two or more shapes: the mean
attention weight on the asked object's token, on one other object's token (the mean over
the others) and on one background token (the mean over the background). A model that looks
the object up puts clearly more on the asked token than on another object's; equal shares
mean the lookup is not there, whatever the accuracy says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from kawhi.engine.engine import TINY_MODEL_DIR
from kawhi.models.qwen import QwenVLReference
from kawhi.tiny.model import MODEL_NAME, Row, encode_row, image_processor, rows_forward
from kawhi.tiny.responses import DESCRIBE_PROMPT
from kawhi.tiny.task import make_item

from bench.tiny_eval import _repo_relative


def reference_for(folder: Path) -> QwenVLReference:
    """The model in ``folder`` with eager attention (the probe reads attention weights)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return QwenVLReference(model, AutoTokenizer.from_pretrained(folder), image_processor(), MODEL_NAME)


def lookup_shares(reference: QwenVLReference, at: str, items: int) -> dict:
    """(L, H) mean attention weight, from the reading position (``at``), on the asked object's
    token, on another object's token (mean over the others) and on a background token (mean
    over the background), over the val shape-colour items among the first ``items`` that
    hold two or more shapes."""
    text = reference.model.config.text_config
    shares = {k: torch.zeros(text.num_hidden_layers, text.num_attention_heads) for k in ("asked", "other", "background")}
    used = 0
    for index in range(items):
        item = make_item("shape_colour", index, split="val")
        if len(item.objects) < 2:
            continue
        asked = item.objects[item.asked[0]]
        if at == "answer":
            row = encode_row(reference, item, "Answer:")
        else:
            row = encode_row(reference, item, f"The {asked.kind}", DESCRIBE_PROMPT)
        # the reading position is the last token: the row without its end-of-turn
        out = rows_forward(reference, [Row(row.prompt, row.targets[:-1])], output_attentions=True)
        rows, cols = row.prompt.grid  # visual_positions are row-major over this grid
        token = {(r, c): int(row.prompt.visual_positions[r * cols + c]) for r in range(rows) for c in range(cols)}
        others = [token[o.cells[0]] for j, o in enumerate(item.objects) if j != item.asked[0]]
        taken = {token[o.cells[0]] for o in item.objects}
        background = [t for t in token.values() if t not in taken]
        for layer, attention in enumerate(out.attentions):
            last = attention[0, :, -1]  # (H, S)
            shares["asked"][layer] += last[:, token[asked.cells[0]]]
            shares["other"][layer] += last[:, others].mean(-1)
            shares["background"][layer] += last[:, background].mean(-1)
        used += 1
    return {"items": used, **{k: [[round(x, 4) for x in heads] for heads in (v / used).tolist()]
                              for k, v in shares.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--at", choices=("answer", "name"), default="answer")
    parser.add_argument("--items", type=int, default=60, help="val items scanned (those with one shape are skipped)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = reference_for(args.model)
    with torch.inference_mode():
        shares = lookup_shares(reference, args.at, args.items)
    asked, other = torch.tensor(shares["asked"]), torch.tensor(shares["other"])
    report = {"model": _repo_relative(str(args.model)), "at": args.at, **shares,
              "best_head_asked_over_other": round(float((asked / other.clamp_min(1e-9)).max()), 3),
              "command": _repo_relative(" ".join(["python -m bench.tiny_lookup", *sys.argv[1:]]))}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
