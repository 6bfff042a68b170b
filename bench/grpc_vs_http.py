"""HTTP-JSON vs gRPC for one large batch on the bench model: wall time, bytes each way,
and client + server serialisation time.

    python -m bench.grpc_vs_http                                  # 16 x 5 x 1024 end to end, 64 x 5 x 1024 offline
    python -m bench.grpc_vs_http --groups 64 --serialise-groups 64 # the full batch end to end (slow on 2 cores)
    python -m bench.grpc_vs_http --serialise-only --groups 1       # serialisation mode only: no server, one
                                                                  # group computed in-process, tiled to 64

1. ``kawhi serve --model <bench model> --grpc-port P`` in a subprocess (bench.server.Server);
2. ``--groups`` groups of ``--responses`` responses of ``--tokens`` token ids each
   (bench.workload: the trainer's own ``token_ids``, images inline), sent ``--reps`` times
   over each transport, interleaved, with fresh ids each time (no idempotent cache hit).
   Wall time = wire dicts in the client -> ``ReweightResponse`` in the client (request
   encoding, transfer, the server's work, answer decoding). Bytes = the request and answer
   payloads (the HTTP body; the serialised protobuf message), framing not counted;
3. serialisation, offline in this process on the real answer tiled to
   ``--serialise-groups`` groups (the per-token arrays are what grows): each step the
   client and the server perform to turn wire objects into bytes and back, median of
   ``--serialise-reps``. Each step is the code the server and the clients run: the
   server parses and admits a request (HTTP: JSON body -> ``Pipeline.parse_body``;
   gRPC: message -> ``kawhi.grpc.messages.parse_request_message``, image bytes as
   bytes) and encodes the answer from the model (HTTP: the JSON bytes; gRPC: the
   ``ProtobufCodec``'s serialised message, the very bytes sent and stored).
   ``--serialise-only`` skips steps 1-2: the answer is computed in-process
   (kawhi.pipeline.local) on ``--groups`` groups of the bench model.

The last line printed is one JSON object; ``--out`` writes it to a file as well.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import build_reference, save_reference
from bench.server import Server, free_port
from bench.workload import GroupSpec, make_group


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _results_close(a: Any, b: Any) -> float:
    """Largest absolute difference between the numbers of two answers' results."""
    worst = 0.0
    for ra, rb in zip(a.results, b.results):
        for xa, xb in zip(ra.responses, rb.responses):
            worst = max(worst, abs(xa.advantage - xb.advantage))
            for u, v in zip(xa.token_advantages + xa.token_weights, xb.token_advantages + xb.token_weights):
                worst = max(worst, abs(u - v))
    return worst


def serialisation(wire: list[dict], http_answer: bytes, scale: int, reps: int, pipeline: Any) -> dict[str, Any]:
    """Every encode/decode step of both transports on a batch ``scale`` times the measured one;
    ``pipeline``: a kawhi.pipeline.Pipeline whose admit step both servers run."""
    from kawhi.grpc.messages import PROTOBUF, parse_request_message
    from kawhi.pipeline import Pipeline
    from kawhi.pipeline.encoding import WireFormat, encode_answer
    from kawhi_client.grpc import convert
    from kawhi_client.grpc._proto import kawhi_pb2 as pb
    from kawhi_client.schema import ReweightResponse

    groups = [dict(g, id=f"{g['id']}-x{k}") for k in range(scale) for g in wire]
    response = ReweightResponse.model_validate_json(http_answer)
    response = response.model_copy(update={"results": [r.model_copy(update={"id": f"{r.id}-x{k}"})
                                                       for k in range(scale) for r in response.results]})
    body = json.dumps({"groups": groups}).encode()
    answer_json = encode_answer(response, WireFormat())
    request_bytes = convert.request_to_message(groups).SerializeToString()
    answer_bytes, _ = PROTOBUF.encode(response, WireFormat())
    limits = pipeline.limits
    pipeline = Pipeline(pipeline.engine, type(limits)(**{**vars(limits), "max_groups": len(groups)}))

    def admit(parsed: Any) -> Any:
        return pipeline.admit(parsed, allow_paths=False)

    t = {
        "client_http_encode": _median_time(lambda: json.dumps({"groups": groups}).encode(), reps),
        "client_http_decode": _median_time(lambda: ReweightResponse.model_validate_json(answer_json), reps),
        "client_grpc_encode": _median_time(lambda: convert.request_to_message(groups).SerializeToString(), reps),
        "client_grpc_decode": _median_time(
            lambda: convert.response_from_message(pb.ReweightResponse.FromString(answer_bytes)), reps),
        "server_http_decode": _median_time(lambda: admit(Pipeline.parse_body(body)), reps),
        "server_http_encode": _median_time(lambda: encode_answer(response, WireFormat()), reps),
        "server_grpc_decode": _median_time(
            lambda: admit(parse_request_message(pb.ReweightRequest.FromString(request_bytes))), reps),
        "server_grpc_encode": _median_time(lambda: PROTOBUF.encode(response, WireFormat()), reps),
    }
    # answers equal to the last bit, whichever way they travelled
    via_http = ReweightResponse.model_validate_json(answer_json)
    via_grpc = convert.response_from_message(pb.ReweightResponse.FromString(answer_bytes))
    http_total = t["client_http_encode"] + t["client_http_decode"] + t["server_http_decode"] + t["server_http_encode"]
    grpc_total = t["client_grpc_encode"] + t["client_grpc_decode"] + t["server_grpc_decode"] + t["server_grpc_encode"]
    return {
        "groups": len(groups),
        "bytes": {"http_request": len(body), "http_answer": len(answer_json),
                  "grpc_request": len(request_bytes), "grpc_answer": len(answer_bytes)},
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "totals": {"http": round(http_total, 4), "grpc": round(grpc_total, 4),
                   "grpc_over_http": round(grpc_total / http_total, 3)},
        "answers_equal": via_http == via_grpc == response,
    }


def _in_process(reference: Any, groups: list[Any]) -> bytes:
    """The JSON answer for ``groups``, computed in this process (serialisation mode)."""
    from kawhi.engine.engine import Engine
    from kawhi.pipeline.encoding import WireFormat, encode_answer
    from kawhi.pipeline.local import LocalService

    local = LocalService(Engine(reference))
    wire = [g.api(f"s-{i}") for i, g in enumerate(groups)]
    parsed = local.pipeline.parse_document({"groups": wire})
    return encode_answer(local.pipeline.reweight(parsed, allow_paths=False), WireFormat())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--serialise-groups", type=int, default=64)
    parser.add_argument("--serialise-reps", type=int, default=3)
    parser.add_argument("--serialise-only", action="store_true",
                        help="serialisation mode only: no server; the answer is computed in-process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.serialise_only:
        return _serialise_only(args, argv)

    import os

    import grpc
    import httpx
    from kawhi_client.grpc import convert
    from kawhi_client.grpc._proto import kawhi_pb2_grpc
    from kawhi_client.schema import ReweightResponse

    load_start = os.getloadavg()[0]
    reference = build_reference("bench")
    groups = [make_group(reference, GroupSpec(response_tokens=args.tokens, group_size=args.responses, seed=i))
              for i in range(args.groups)]
    tokens = args.groups * args.responses * args.tokens
    grpc_port = free_port()
    flags = {"grpc_port": grpc_port, "request_timeout_s": 3600, "max_groups": max(256, args.groups),
             "queue_groups": max(512, args.groups), "log_level": "warning"}
    samples: dict[str, list[dict[str, Any]]] = {"http": [], "grpc": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_reference(reference, Path(tmp) / "bench-model")
        with Server(model_dir, flags=flags, ready_timeout=600) as srv, \
                httpx.Client(base_url=srv.url, timeout=3600) as http, \
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", -1),
                                                                          ("grpc.max_send_message_length", -1)]) as ch:
            stub = kawhi_pb2_grpc.KawhiStub(ch)
            warm = [groups[0].api("warm-h")]
            http.post("/v1/reweight", json={"groups": warm}).raise_for_status()
            stub.Reweight(convert.request_to_message([groups[0].api("warm-g")]), timeout=600)
            answers: dict[str, Any] = {}
            for rep in range(args.reps):
                wire = [g.api(f"h{rep}-{i}") for i, g in enumerate(groups)]
                t0 = time.perf_counter()
                body = json.dumps({"groups": wire}).encode()
                resp = http.post("/v1/reweight", content=body, headers={"content-type": "application/json"})
                resp.raise_for_status()
                answers["http"] = ReweightResponse.model_validate_json(resp.content)
                samples["http"].append({"wall_s": time.perf_counter() - t0, "request_bytes": len(body),
                                        "answer_bytes": len(resp.content)})
                http_answer = resp.content

                wire = [g.api(f"g{rep}-{i}") for i, g in enumerate(groups)]
                t0 = time.perf_counter()
                request = convert.request_to_message(wire)
                message = stub.Reweight(request, timeout=3600)
                answers["grpc"] = convert.response_from_message(message)
                samples["grpc"].append({"wall_s": time.perf_counter() - t0, "request_bytes": request.ByteSize(),
                                        "answer_bytes": message.ByteSize()})
            difference = _results_close(answers["http"], answers["grpc"])
            server_log = srv.log_tail(2000)
    scale = max(1, args.serialise_groups // args.groups)
    from kawhi.engine.engine import Engine
    from kawhi.pipeline import Pipeline

    offline = serialisation([g.api(f"s-{i}") for i, g in enumerate(groups)], http_answer, scale,
                            args.serialise_reps, Pipeline(Engine(reference)))
    out = {
        "benchmark": "grpc_vs_http",
        "command": "python -m bench.grpc_vs_http " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": {"groups": args.groups, "responses": args.responses, "tokens_per_response": args.tokens,
                  "response_tokens": tokens},
        "end_to_end": {k: {"wall_s_median": round(statistics.median(s["wall_s"] for s in v), 3),
                           "request_bytes": v[-1]["request_bytes"], "answer_bytes": v[-1]["answer_bytes"],
                           "samples": v} for k, v in samples.items()},
        "max_abs_difference": difference,
        "serialisation": offline,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}},
    }
    if difference > 1e-9:
        print(server_log, file=sys.stderr)
    text = json.dumps(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(text)
    return 0 if difference <= 1e-9 else 1


def _serialise_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    import os

    from kawhi.engine.engine import Engine
    from kawhi.pipeline import Pipeline

    load_start = os.getloadavg()
    reference = build_reference("bench")
    groups = [make_group(reference, GroupSpec(response_tokens=args.tokens, group_size=args.responses, seed=i))
              for i in range(args.groups)]
    answer = _in_process(reference, groups)
    scale = max(1, args.serialise_groups // args.groups)
    offline = serialisation([g.api(f"s-{i}") for i, g in enumerate(groups)], answer, scale, args.serialise_reps,
                            Pipeline(Engine(reference)))
    out = {
        "benchmark": "grpc_vs_http --serialise-only",
        "command": "python -m bench.grpc_vs_http " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": {"groups": args.groups * scale, "responses": args.responses, "tokens_per_response": args.tokens},
        "serialisation": offline,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": {"start": [round(x, 2) for x in load_start],
                                "end": [round(x, 2) for x in os.getloadavg()]}},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0 if offline["answers_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
