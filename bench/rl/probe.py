"""What the served reference's weights look like on the task's own planted responses, before
any training: does a paragraph that reads the image get a higher weight than one that does
not (in both paragraph orders), and how far apart are the weights under ``regions: sguf`` and
``regions: random`` (the control arm)? One request per setting to the live service.
"""

from __future__ import annotations

import io
import random
import statistics
from typing import Any

from kawhi.tiny.responses import INDEPENDENT, READS, make_response
from kawhi.tiny.task import tiny_items

SETTINGS = {"sguf": {}, "random": {"regions": "random"}, "inverse": {"regions": "inverse"},
            "sguf, rope before": {"rope": "before"}}


def planted_groups(per_kind: int = 4) -> tuple[list[dict[str, Any]], list[tuple[str, ...]]]:
    """Per test item one group of 4 three-paragraph responses (right, wrong, right, wrong), the
    image-reading paragraph first in two of them and second in the other two; and their roles."""
    rng = random.Random(0)
    groups, roles = [], []
    for item in tiny_items(per_kind, seed=1, split="test"):
        buf = io.BytesIO()
        item.image.save(buf, format="PNG")
        responses = [make_response(item, rng, correct=c, paragraphs=3, reading_first=first)
                     for c, first in ((True, True), (False, True), (True, False), (False, False))]
        groups.append({"image": buf.getvalue(), "prompt": item.question,
                       "responses": [{"text": r.text, "reward": float(r.correct)} for r in responses]})
        roles += [r.roles for r in responses]
    return groups, roles


def weight_probe(url: str, per_kind: int = 4) -> dict[str, Any]:
    from kawhi_client import Client

    groups, roles = planted_groups(per_kind)
    weights: dict[str, list[list[float]]] = {}
    with Client(url, timeout=300) as client:
        for name, options in SETTINGS.items():
            results = client.reweight(groups, **options)
            weights[name] = [[p.weight for p in r.paragraphs] for g in results for r in g.responses]
    out: dict[str, Any] = {"responses": len(roles)}
    for name, ws in weights.items():
        wins = {True: [], False: []}  # reading paragraph first?
        for w, role in zip(ws, roles, strict=True):
            reading, other = w[role.index(READS)], w[role.index(INDEPENDENT)]
            wins[role.index(READS) == 0].append(reading > other)
        out[name] = {
            "reading_beats_independent_when_first": sum(wins[True]) / len(wins[True]),
            "reading_beats_independent_when_second": sum(wins[False]) / len(wins[False]),
            "mean_weight_by_position": [round(statistics.fmean(w[i] for w in ws), 4) for i in range(3)],
        }
    out["mean_abs_weight_diff_sguf_vs_random"] = statistics.fmean(
        abs(a - b) for x, y in zip(weights["sguf"], weights["random"], strict=True) for a, b in zip(x, y, strict=True))
    return out


def probe_table(probe: dict[str, Any]) -> str:
    lines = ["| weights on planted 3-paragraph responses | reading > independent, reading first | "
             "reading > independent, reading second | mean weight by paragraph position |", "|---|---|---|---|"]
    for name in SETTINGS:
        p = probe[name]
        lines.append(f"| {name} | {p['reading_beats_independent_when_first']:.2f} | "
                     f"{p['reading_beats_independent_when_second']:.2f} | {p['mean_weight_by_position']} |")
    lines.append(f"\n{probe['responses']} responses; mean |w_sguf - w_random| per paragraph: "
                 f"{probe['mean_abs_weight_diff_sguf_vs_random']:.4f}")
    return "\n".join(lines)
