"""``python -m bench.shapes``: memory and speed of ``kawhi serve`` at the real model shapes.

For each shape (``bench/real_shapes.py``: Qwen2.5-VL-3B/7B, Qwen3-VL-4B/8B widths, the real
151,936-token Qwen vocabulary and tokenizer) it builds the model in memory with random
weights, writes it to a temporary folder, frees it, starts ``kawhi serve --model <folder>``
and sends groups (a 448 x 448 image, G responses of T token ids) twice each: weights only,
and weights + reference log-probs + entropy; then the last group's image again (prefix
cache hit). Per request: wall time, response tokens/s, the server's peak RSS over the
request (``clear_refs`` reset before it, ``VmHWM`` after), its RSS after loading, the
engine's own accounting (``/v1/info`` memory section, ``/metrics`` prefix-cache bytes) and
the memory model's prediction (``kawhi.engine.memory.estimate``), with the 1-minute load
average before and after. A run started above ``--max-load`` is flagged ``under_load``.

``--layers`` / ``--vision-depth`` cut the depth (every width, the vocabulary and the image
pipeline stay real): on this 2-core CPU a full-depth 3B forward takes minutes and bfloat16
matmuls run at 0.2-3 GFLOP/s (no AMX / AVX512-BF16 here), so the CPU runs are float32 at
reduced depth and the memory model carries the measured per-token costs to full depth.
Any run whose expected peak exceeds 6 GiB takes ``/tmp/kawhi-bigmem.lock`` and refuses to
start unless MemAvailable leaves 4 GiB beyond it.

    python -m bench.shapes --quick                 # 3B widths, 2 layers, G=5 x 64/256 tokens, ~5 min
    python -m bench.shapes --shape qwen2.5-vl-7b --tokens 256 --out bench/recorded/shapes-7b.json
    python -m bench.shapes --device cuda --dtype bfloat16 --layers 0 --shape qwen2.5-vl-7b --tokens 1024
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from kawhi.engine.memory import ACTIVATION_WIDTHS

from bench.real_shapes import SHAPES, build_model, parameter_count
from bench.workload import GroupSpec, make_group

LOCK = "/tmp/kawhi-bigmem.lock"
BIG = 6 * 2**30
HEADROOM = 4 * 2**30


def load_avg() -> float:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return float(handle.read().split()[0])


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def gpu_used_bytes(pid: int) -> int | None:
    """Device memory of ``pid`` from nvidia-smi (the server's own process), or None."""
    import subprocess

    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in text.splitlines():
        p, _, mib = line.partition(",")
        if p.strip() == str(pid):
            return int(mib) * 2**20
    return None


@contextlib.contextmanager
def big_memory(expected: int, what: str):
    """Hold the shared big-memory lock when ``expected`` > 6 GiB; refuse without 4 GiB headroom."""
    if expected <= BIG:
        yield
        return
    with open(LOCK, "w", encoding="ascii") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        available = mem_available()
        if available < expected + HEADROOM:
            raise MemoryError(f"{what}: expected peak {expected / 2**30:.1f} GiB, MemAvailable {available / 2**30:.1f}"
                              f" GiB < peak + {HEADROOM / 2**30:.0f} GiB headroom: not measured")
        yield


def request(url: str, group: Any, group_id: str, ref: bool) -> tuple[dict[str, Any], float]:
    import httpx

    body: dict[str, Any] = {"groups": [group.api(group_id)], "encoding_format": "base64"}
    if ref:
        body["options"] = {"return_ref_logprobs": True, "return_entropy": True}
    start = time.perf_counter()
    answer = httpx.post(url + "/v1/reweight", json=body, timeout=3600.0)
    seconds = time.perf_counter() - start
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:500]}")
    return answer.json(), seconds


def check_logprobs(answer: dict[str, Any], tokens: int) -> dict[str, Any]:
    import numpy as np

    response = answer["results"][0]["responses"][0]
    logp = np.frombuffer(base64.b64decode(response["ref_logprobs"]), dtype="<f4")
    entropy = np.frombuffer(base64.b64decode(response["entropy"]), dtype="<f4")
    assert logp.shape == (tokens,) and np.isfinite(logp).all() and np.isfinite(entropy).all()
    return {"mean_logprob": float(logp.mean()), "mean_entropy": float(entropy.mean())}


def measure_shape(args: argparse.Namespace, shape: str, points: list[tuple[int, int]]) -> dict[str, Any]:
    from kawhi.engine.memory import ModelShape

    from bench.server import Server, metrics_snapshot

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    layers, depth = args.layers or None, args.vision_depth or None
    counts = parameter_count(shape, layers=layers, vision_depth=depth)
    weights = counts["total"] * dtype.itemsize
    # the build here, then the server (weights mmapped from the folder: its peak stays near them)
    expected = int(weights * 1.2 + 2**30)
    record: dict[str, Any] = {"shape": shape, "dtype": args.dtype, "layers": layers or "all",
                              "vision_depth": depth or "all", "params": counts,
                              "full_depth_params": parameter_count(shape), "weights_bytes": weights, "requests": []}
    try:
        lock = big_memory(expected if args.device == "cpu" else 0, shape)
        lock.__enter__()
    except MemoryError as exc:
        record["not_measured"] = str(exc)
        print(json.dumps({"shape": shape, "not_measured": str(exc)}), flush=True)
        return record
    folder = Path(tempfile.mkdtemp(prefix=f"kawhi-shape-{shape}-"))
    try:
        started = time.perf_counter()
        model, tokenizer, processor = build_model(shape, dtype=dtype, device="cpu", layers=layers, vision_depth=depth)
        record["build_s"] = round(time.perf_counter() - started, 1)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        processor.save_pretrained(folder)
        del model
        gc.collect()
        flags = {"dtype": args.dtype, "device": args.device, "torch_threads": args.threads,
                 "batch_wait_ms": 0, "request_timeout_s": 3600}
        ref = type("Ref", (), {"tokenizer": tokenizer})()
        with Server(folder, flags=flags, ready_timeout=1800.0) as srv:
            pid = srv.proc.pid
            record["startup_s"] = round(srv.startup_s, 1)
            record["load"] = proc_status(pid)
            record["engine_memory"] = srv.info.get("memory")
            model_shape = ModelShape(**srv.info["memory"]["shape"])
            prefix, visual = prefix_tokens(tokenizer, shape)
            record.update(prefix_tokens=prefix, visual_tokens=visual)
            warm = make_group(ref, GroupSpec(8, 1, (448, 448), seed=999))
            request(srv.url, warm, "warm", True)
            last = None
            for group_size, tokens in points:
                for ref_on in (False, True):
                    group = make_group(ref, GroupSpec(tokens, group_size, (448, 448),
                                                      seed=1000 + tokens + group_size + 7 * ref_on))
                    try:
                        out = measure_request(srv.url, pid, group, f"{shape}-{group_size}x{tokens}-{ref_on}",
                                              ref_on, args.device, args.max_load)
                    except RuntimeError as exc:  # recorded, and the other points still run
                        out = {"error": str(exc)[:300]}
                    out.update(group_size=group_size, tokens=tokens, logprobs=ref_on, prefix_hit=False)
                    if "error" not in out:
                        out["predicted"] = predict(model_shape, out, prefix, visual, args.device)
                    out["activation_widths"] = ACTIVATION_WIDTHS
                    record["requests"].append(out)
                    print(json.dumps({"shape": shape, **{k: v for k, v in out.items() if k != "answer"}}), flush=True)
                    last = group if "error" not in out else last
            if last is not None:  # the same image + prompt again: the prefix comes from the cache
                out = measure_request(srv.url, pid, last, f"{shape}-hit", True, args.device, args.max_load)
                out.update(group_size=points[-1][0], tokens=points[-1][1], logprobs=True, prefix_hit=True)
                out["prefix_cache_hits"] = metrics_snapshot(srv.url).get("kawhi_prefix_cache_hits_total")
                record["requests"].append(out)
                print(json.dumps({"shape": shape, **out}), flush=True)
    finally:
        lock.__exit__(None, None, None)
        shutil.rmtree(folder, ignore_errors=True)
    return record


def measure_request(url: str, pid: int, group: Any, group_id: str, ref_on: bool, device: str,
                    max_load: float) -> dict[str, Any]:
    import httpx

    load_before = load_avg()
    if device == "cpu":
        reset_peak(pid)
        base = proc_status(pid)["VmRSS"]
    answer, seconds = request(url, group, group_id, ref_on)
    out: dict[str, Any] = {"seconds": round(seconds, 3), "load_avg": [load_before, load_avg()]}
    tokens = sum(len(r) for r in group.responses)
    out["response_tokens_per_s"] = round(tokens / seconds, 1)
    if device == "cpu":
        status = proc_status(pid)
        # RssFile: weights the loader left file-backed (mmapped safetensors) and that were touched
        out.update(rss_before=base, peak_rss=status["VmHWM"], peak_over_before=status["VmHWM"] - base,
                   rss_anon_after=status.get("RssAnon"), rss_file_after=status.get("RssFile"))
    else:
        out["gpu_used_bytes"] = gpu_used_bytes(pid)
    metrics = httpx.get(url + "/metrics", timeout=10.0).text
    for line in metrics.splitlines():
        if line.startswith("kawhi_prefix_cache_bytes "):
            out["prefix_cache_bytes"] = int(float(line.split()[1]))
    if ref_on:
        out["logprob_check"] = check_logprobs(answer, len(group.responses[0]))
    out["under_load"] = load_before > max_load
    return out


def prefix_tokens(tokenizer: Any, shape: str) -> tuple[int, int]:
    """(image + prompt tokens, visual tokens) of the 448 x 448 workload for ``shape``."""
    from bench.workload import PROMPT

    side = SHAPES[shape]["vision"]["patch_size"] * 2
    visual = (448 // side) ** 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return len(ids) - 1 + visual, visual


def predict(shape: Any, out: dict[str, Any], prefix: int, visual: int, device: str) -> dict[str, int]:
    """The memory model's parts for this request (``kawhi.engine.memory.estimate``)."""
    from kawhi.engine.memory import CPU_RUNTIME_BYTES, GPU_RUNTIME_BYTES, estimate

    return estimate(shape, prefix_tokens=prefix, visual_tokens=visual,
                    response_tokens=[out["tokens"]] * out["group_size"], logprobs=out["logprobs"],
                    prefix_cache_bytes=out.get("prefix_cache_bytes", 0),
                    runtime_bytes=CPU_RUNTIME_BYTES if device == "cpu" else GPU_RUNTIME_BYTES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable (default: 3B)")
    parser.add_argument("--quick", action="store_true", help="3B widths, 2 layers, 2 vision blocks, 5 x 64 / 256")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (0 = all)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks kept (0 = all)")
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--tokens", default="256", help="response lengths, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-load", type=float, default=1.5, help="flag requests started above this load")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shapes = args.shape or ["qwen2.5-vl-3b"]
    if args.quick:
        shapes, args.tokens = ["qwen2.5-vl-3b"], "64,256"
    points = [(args.group, int(t)) for t in args.tokens.split(",")]
    from bench.context import quiet

    quiet()
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), load_avg()
    records = []
    for shape in shapes:
        records.append(measure_shape(args, shape, points))
    result = {
        "command": "python -m bench.shapes " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": platform.python_version(), "torch": torch.__version__},
        "load_avg_start": load_start, "load_avg_end": load_avg(), "seconds": round(time.time() - started, 1),
        "records": records,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
