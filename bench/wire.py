"""Wire cost of an answer: bytes per token and serialisation time, float vs base64.

A verl-sized answer (``--groups`` groups x ``--group`` responses x ``--tokens`` tokens,
paragraphs every ~``--paragraph`` tokens) is built with the engine's own result types and
encoded as the server does (``kawhi.pipeline.encoding.encode_answer``: JSON numbers,
base64 float32, or no per-token arrays; each also gzipped as the server's middleware
does, level 9), then parsed as the client does (``ReweightResponse.model_validate_json``,
which decodes base64 arrays to lists). The reference forward of the same batch is timed
on one group of the bench model and scaled by the group count, so every wire cost is
also given as a share of the forward.

    python -m bench.wire --model bench --groups 64 --group 5 --tokens 1024
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def build_answer(groups: int, group: int, tokens: int, paragraph: int, seed: int = 0) -> Any:
    from kawhi_client.schema import GroupResult, Paragraph, ResponseResult, ReweightResponse, Usage

    rng = random.Random(seed)
    results = []
    for g in range(groups):
        responses = []
        for _ in range(group):
            advantage = rng.uniform(-1.5, 1.5)
            bounds = list(range(0, tokens, paragraph)) + [tokens]
            paragraphs, weights = [], []
            for start, end in zip(bounds, bounds[1:]):
                w = rng.uniform(0.1, 1.0)
                paragraphs.append(Paragraph(char_start=start * 4, char_end=end * 4, token_start=start, token_end=end,
                                            alpha=rng.random() * 0.01, weight=w))
                weights += [w] * (end - start)
            responses.append(ResponseResult(advantage=advantage, paragraphs=paragraphs,
                                            token_advantages=[advantage * w for w in weights], token_weights=weights))
        results.append(GroupResult(id=f"g{g}", grid=[12, 16], key_tokens=list(range(40)),
                                   selected_tokens=list(range(60)), responses=responses))
    return ReweightResponse(model="bench", version="0", options={}, usage=Usage(tokens=groups * group * tokens),
                            results=results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", choices=("demo", "bench"))
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--paragraph", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-forward", action="store_true", help="skip timing the forward")
    args = parser.parse_args(argv)

    from kawhi.pipeline.encoding import WireFormat, encode_answer
    from kawhi_client.schema import ReweightResponse

    load_start = os.getloadavg()[0]
    answer = build_answer(args.groups, args.group, args.tokens, args.paragraph)
    n_tokens = args.groups * args.group * args.tokens
    rows: dict[str, Any] = {}
    for name, wire in (("float", WireFormat()), ("base64", WireFormat("base64")), ("no_arrays", WireFormat("float", False))):
        encode_s, body = _best(lambda wire=wire: encode_answer(answer, wire), args.repeats)
        decode_s, _ = _best(lambda body=body: ReweightResponse.model_validate_json(body), args.repeats)
        gzip_s, zipped = _best(lambda body=body: gzip.compress(body, 9), 1)
        gunzip_s, _ = _best(lambda zipped=zipped: gzip.decompress(zipped), args.repeats)
        rows[name] = {"bytes": len(body), "bytes_per_token": round(len(body) / n_tokens, 2),
                      "server_encode_s": round(encode_s, 4), "client_decode_s": round(decode_s, 4),
                      "gzip_bytes_per_token": round(len(zipped) / n_tokens, 2), "gzip_s": round(gzip_s, 4),
                      "gunzip_s": round(gunzip_s, 4)}
    out: dict[str, Any] = {"groups": args.groups, "group": args.group, "tokens": args.tokens, "response_tokens": n_tokens,
                           "paragraph_tokens": args.paragraph, "wire": rows}
    if not args.no_forward:
        from bench.context import Bench
        from bench.workload import GroupSpec

        bench = Bench(args.model, threads=args.threads)
        prepared = bench.prepare(bench.groups(GroupSpec(args.tokens, args.group, (448, 336), 5)))
        bench.engine.run(prepared)  # warm-up
        per_group, _ = _best(lambda: bench.engine.run(prepared), args.repeats)
        forward = per_group * args.groups
        out["forward_s_per_group"] = round(per_group, 4)
        out["forward_s"] = round(forward, 3)
        for row in rows.values():
            row["encode_decode_share_of_forward"] = round((row["server_encode_s"] + row["client_decode_s"]) / forward, 5)
            row["with_gzip_share_of_forward"] = round((row["server_encode_s"] + row["client_decode_s"] + row["gzip_s"]
                                                       + row["gunzip_s"]) / forward, 5)
        out["model"] = args.model
    out["load_avg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    out["command"] = "python -m bench.wire " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
