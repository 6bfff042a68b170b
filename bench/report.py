"""Markdown tables from a results JSON (what bench/README.md quotes).

    python -m bench.report bench/recorded/cpu-bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mark(met: Any) -> str:
    return {True: "met", False: "**missed**"}.get(met, "-")


def report(r: dict[str, Any]) -> str:
    meta, model, s = r["meta"], r["model"], r.get("summary", {})
    m = meta["machine"]
    lines = [
        f"Model `{model['name']}`: {model['layers']} layers x {model['hidden']} hidden, {model['heads']} heads / "
        f"{model['kv_heads']} KV heads, MLP {model['intermediate']}, vision {model['vision_depth']} x "
        f"{model['vision_hidden']}; {model['params'] / 1e6:.1f} M parameters, {model['dtype']} on {model['device']}.",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['torch_threads']} "
        f"torch threads, torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, "
        f"commit {m.get('git_commit')}.",
        f"Command: `{meta['command']}`; started {meta['started']}, {meta['seconds']:.0f} s; 1-min load average "
        f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end.",
        "",
        "| | measured | target | |",
        "|---|---|---|---|",
    ]
    met = s.get("met", {})
    rows = [("P1 HTTP throughput / bare SDPA forward", "p1_ratio"),
            ("P2 speed-up over naive (eager + attention maps)", "p2_speedup"),
            ("P2 peak memory, kawhi / naive", "p2_memory_ratio"),
            ("P3 group of 5 / five independent forwards", "p3_cost_ratio")]
    for label, key in rows:
        if s.get(key) is not None:
            lines.append(f"| {label} | {_f(s[key])} | {s['targets'][key]} | {_mark(met.get(key))} |")
    if "p1" in r:
        p = r["p1"]
        w = p["workload"]
        lines += ["", f"P1 workload: {w['groups']} groups x {w['group_size']} responses x {w['response_tokens']} tokens, "
                      f"prefix {w['prefix_tokens']} tokens ({w['visual_tokens']} visual), {w['groups_per_request']} "
                      f"groups per request, {w['concurrency']} requests in flight; {w['sequence_tokens']} sequence "
                      f"tokens per pass. Bare {_f(p['bare']['median_s'], 3)} s "
                      f"({p['bare']['sequence_tokens_per_s']:.0f} tok/s), HTTP {_f(p['http']['median_s'], 3)} s "
                      f"({p['http']['sequence_tokens_per_s']:.0f} tok/s), in-process prepare + Engine.run "
                      f"{_f(p['engine_inprocess']['median_s'], 3)} s (ratio {_f(p['ratio_inprocess'])})."]
    if "p2" in r:
        p = r["p2"]
        t = p["time"]
        w = p["workload"]
        mem = p.get("memory", {})
        lines += ["", f"P2 workload: 1 group x {w['group_size']} responses x {w['response_tokens']} tokens, prefix "
                      f"{w['prefix_tokens']}. " + ", ".join(
                          f"{k} {_f(v['median_s'], 3)} s ({v['gflop_per_s']:.1f} GFLOP/s)" for k, v in t.items())
                  + (". Peak memory over baseline: " + ", ".join(
                      f"{k} {v['delta_mib']:.0f} MiB" for k, v in mem.items()) if mem else "") + "."]
    if "p3" in r:
        p = r["p3"]
        w = p["workload"]
        lines += ["", f"P3 workload: prefix {w['prefix_tokens']} tokens, 5 responses x {w['response_tokens']} tokens "
                      f"(prefix = {w['prefix_share']:.2f} of each sequence). Shared {_f(p['time']['shared']['median_s'], 3)} s, "
                      f"independent {_f(p['time']['independent']['median_s'], 3)} s, token-count ratio "
                      f"{_f(p['token_ratio'])}; the group costs {_f(p['shared_vs_bare'])}x five bare forwards."]
    sc = r.get("scaling")
    if sc:
        for curve, label in (("length", "response tokens"), ("group", "responses per group"),
                             ("image", "image px (visual tokens)")):
            pts = sc.get(curve) or []
            if not pts:
                continue
            lines += ["", f"| {label} | kawhi s | bare s | naive s | kawhi / bare | kawhi MiB | bare MiB | naive MiB |",
                      "|---|---|---|---|---|---|---|---|"]
            for p in pts:
                v = p["value"]
                v = f"{v[0]}x{v[1]} ({p['visual_tokens']})" if isinstance(v, list) else v
                t, mem = p["time"], p.get("memory", {})
                lines.append(
                    f"| {v} | {_f(t['kawhi']['median_s'], 3)} | {_f(t['bare']['median_s'], 3)} | "
                    f"{_f(t.get('naive', {}).get('median_s'), 3)} | {_f(p['kawhi_over_bare'])} | "
                    f"{_f(mem.get('kawhi', {}).get('delta_mib'), 0)} | {_f(mem.get('bare', {}).get('delta_mib'), 0)} | "
                    f"{_f(mem.get('naive', {}).get('delta_mib'), 0)} |")
    if "load" in r:
        ld = r["load"]
        lat = ld["latency"]
        w = ld["workload"]
        lines += ["", f"Load: {ld['clients']} closed-loop clients for {ld['duration_s']:.0f} s against `kawhi serve` on "
                      f"127.0.0.1, one group of {w['group_size']} x {w['response_tokens']} tokens per request "
                      f"({w['distinct_groups']} distinct images). {ld['requests']} requests, statuses "
                      f"{ld['statuses']}, errors other than 429: {ld['errors_other_than_429']}; "
                      f"{ld['ok_requests_per_s']:.2f} requests/s, {ld['sequence_tokens_per_s']:.0f} sequence tokens/s; "
                      f"latency p50 {_f(lat['p50_s'])} s, p95 {_f(lat['p95_s'])} s, p99 {_f(lat['p99_s'])} s, "
                      f"max {_f(lat['max_s'])} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    print(report(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
