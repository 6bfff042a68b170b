"""The gRPC front end over real sockets: the same numbers and the same errors as HTTP.

Every server here is kawhi-tiny behind a real uvicorn with the gRPC listener
attached (tests/grpc_fixtures.py); calls go through real grpc channels.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_fixtures import GrpcServerThread, problem_of, retry_after, rpc_error, violations
from kawhi_client import Client, GrpcClient
from kawhi_client.errors import InvalidRequest, PayloadTooLarge
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from server_fixtures import example_groups, metric, png_bytes, small_group


@pytest.fixture(scope="module")
def server() -> Any:
    with GrpcServerThread() as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def stub(server: GrpcServerThread) -> Any:
    return server.stub()


def token_group(seed: int = 0) -> dict[str, Any]:
    """A group scored on the trainer's own token ids (ids in [20, 520): inside kawhi-tiny's vocabulary, past its special tokens)."""
    g = small_group(seed)
    g["id"] = f"t{seed}"
    g["responses"] = [
        {"text": "ignored when token ids are given", "reward": float(i), "token_ids": [(7 * i + k) % 500 + 20 for k in range(40)]}
        for i in range(3)
    ]
    return g


def assert_close(a: Any, b: Any, where: str = "") -> None:
    """Same structure, numbers equal to 1e-9."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys() if isinstance(a, dict) else a, b)
        for k in a:
            assert_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, len(a), b if not isinstance(b, list) else len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}/{i}")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


def http_body(req: pb.ReweightRequest) -> dict[str, Any]:
    return json_format.MessageToDict(req, preserving_proto_field_name=True)


# ====================================================================== the contract


def test_json_mapping_of_a_request_is_the_http_body() -> None:
    body = {
        "groups": [*example_groups()[:2], token_group(1),
                   {"id": "m", "image": {"sha256": "ab" * 32},
                    "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                    "responses": [{"text": "A.", "reward": 0.5}], "advantages": [1.5]}],
        "options": {"estimator": "rloo", "temperature": 0.5, "heads": [0, 2], "granularity": "sentence",
                    "sguf": {"beta": 0.2, "delta_l": 25.0}},
        "per_group_errors": True,
    }
    parsed = json_format.ParseDict(body, pb.ReweightRequest())
    assert http_body(parsed) == body  # proto3 JSON mapping == the HTTP body
    assert convert.request_from_message(parsed) == body  # what the server hands the pipeline
    assert convert.request_to_message(body["groups"], body["options"], True) == parsed  # what the client sends
    presets = json_format.ParseDict({"groups": [], "options": {"heads": "preset"}}, pb.ReweightRequest())
    assert convert.request_from_message(presets)["options"] == {"heads": "preset"}


def test_the_proto_has_every_field_of_the_wire_schema() -> None:
    """One definition: a field added to the wire models (kawhi_client.schema) must be added to the proto."""
    from kawhi_client import schema

    pairs = [(pb.ReweightRequest, schema.ReweightRequest), (pb.RolloutGroup, schema.RolloutGroup),
             (pb.ResponseIn, schema.ResponseIn), (pb.ImageRef, schema.ImageRef), (pb.Options, schema.Options),
             (pb.SgufOptions, schema.SgufOptions), (pb.GroupResult, schema.GroupResult),
             (pb.ResponseResult, schema.ResponseResult), (pb.Paragraph, schema.Paragraph),
             (pb.ReweightResponse, schema.ReweightResponse), (pb.Usage, schema.Usage)]
    for message, model in pairs:
        assert set(message.DESCRIPTOR.fields_by_name) == set(model.model_fields), message.DESCRIPTOR.name
    assert set(convert.OPTION_FIELDS) | {"heads", "sguf"} == set(schema.Options.model_fields)
    assert set(convert.SGUF_FIELDS) == set(schema.SgufOptions.model_fields)


def test_round_trip_equals_http(server: GrpcServerThread, stub: Any) -> None:
    groups = [*example_groups(), token_group(2)]
    req = convert.request_to_message(groups, {"estimator": "rloo"})
    answer = convert.response_from_message(stub.Reweight(req, timeout=300))
    with server.client(timeout=300) as c:
        http = c.post("/v1/reweight", json=http_body(req))
    assert http.status_code == 200, http.text
    got, want = answer.model_dump(mode="json"), http.json()
    assert got.keys() == want.keys()
    assert got["model"] == want["model"] and got["version"] == want["version"]
    assert_close(got["options"], want["options"], "/options")
    assert_close(got["results"], want["results"], "/results")
    assert [len(r["responses"][0]["token_advantages"]) for r in got["results"]][-1] == 40  # one per given id
    # the server builds its message from the cached JSON answer: the same message as from the model
    from kawhi_client.schema import ReweightResponse

    assert convert.response_json_to_message(http.content) == convert.response_to_message(
        ReweightResponse.model_validate_json(http.content))

    with GrpcClient(server.target, wait_ready=30) as g, Client(server.url, wait_ready=30) as h:
        a = g.reweight_response(groups, estimator="rloo")
        b = h.reweight_response(groups, estimator="rloo")
        assert_close(a.model_dump(mode="json")["results"], b.model_dump(mode="json")["results"])
        assert g.info() == h.info()
        assert g.upload_image(png_bytes(60, 60, 7)) == h.upload_image(png_bytes(60, 60, 7))


def test_grpc_client_token_arrays_false_like_the_http_client(server: GrpcServerThread) -> None:
    """GrpcClient(token_arrays=False): answers without the per-token arrays, unary and streamed,
    with the same paragraphs as the HTTP client's."""
    groups = [small_group(61), small_group(62)]
    with GrpcClient(server.target, wait_ready=30, token_arrays=False) as g, \
            Client(server.url, wait_ready=30, token_arrays=False) as h:
        unary, http = g.reweight(groups), h.reweight(groups)
        streamed = [r for _, r in sorted(g.reweight_stream(groups), key=lambda item: item[0])]
    assert len(unary) == len(streamed) == len(http) == 2
    for results in (unary, streamed):
        for got, want in zip(results, http):
            assert got.error is None
            for a, b in zip(got.responses, want.responses):
                assert a.token_advantages is None and a.token_weights is None
                assert [p.model_dump() for p in a.paragraphs] == [p.model_dump() for p in b.paragraphs]


def test_log_probs_and_omitted_arrays_round_trip_like_http(server: GrpcServerThread, stub: Any) -> None:
    """Reference log-probs and entropy travel as packed arrays; token_arrays=false leaves the
    token arrays out, and the client sees None for them as over HTTP."""
    groups = example_groups()[:1]
    options = {"return_ref_logprobs": True, "return_entropy": True, "logprob_temperature": 0.7}
    req = convert.request_to_message(groups, options, token_arrays=False)
    got = convert.response_from_message(stub.Reweight(req, timeout=300)).model_dump(mode="json")
    with server.client(timeout=300) as c:
        http = c.post("/v1/reweight", json=http_body(req))
    assert http.status_code == 200, http.text
    want = http.json()
    for response in want["results"][0]["responses"]:  # JSON leaves absent arrays out
        response.update({name: None for name in ("token_advantages", "token_weights")})
    assert_close(got["results"], want["results"], "/results")
    for response in got["results"][0]["responses"]:
        assert response["token_advantages"] is None and response["token_weights"] is None
        n = response["paragraphs"][-1]["token_end"]
        assert len(response["ref_logprobs"]) == n and len(response["entropy"]) == n
        assert all(v <= 0 for v in response["ref_logprobs"])


def test_the_client_sends_each_groups_routing_key_and_the_server_counts_it(server: GrpcServerThread) -> None:
    """Replica affinity over gRPC: the same routing key as over HTTP, in x-kawhi-routing-key."""
    import re

    def seen() -> dict[str, float]:
        with server.client(timeout=30) as c:
            text = c.get("/metrics").text
        return {k: float(v) for k, v in re.findall(r'kawhi_routing_requests_total\{key="(\w+)"\} ([0-9.e+]+)', text)}

    import uuid

    groups = example_groups()[:1]
    groups[0]["prompt"] = f"{groups[0]['prompt']} ({uuid.uuid4().hex})"  # a key this server has not seen
    before = seen()
    with GrpcClient(server.target, wait_ready=30) as g:
        g.reweight(groups, estimator="rloo")
        g.reweight(groups, estimator="rloo", seed=3)  # the same image and prompt: the same key
    after = seen()
    assert after.get("new", 0) - before.get("new", 0) == 1
    assert after.get("seen", 0) - before.get("seen", 0) == 1
    assert after.get("none", 0) == before.get("none", 0)


# ====================================================================== errors


def _bad(kind: str) -> tuple[dict[str, Any], grpc.StatusCode, str]:
    g = small_group(3)
    if kind == "option":
        return {"groups": [g], "options": {"temperature": -1.0}}, grpc.StatusCode.INVALID_ARGUMENT, "/options/temperature"
    if kind == "token":
        g["responses"][1]["token_ids"] = [5, 10**6]
        return {"groups": [g]}, grpc.StatusCode.INVALID_ARGUMENT, "/groups/0/responses/1/token_ids/1"
    if kind == "path":
        g["image"] = {"path": "/etc/passwd"}
        return {"groups": [g]}, grpc.StatusCode.INVALID_ARGUMENT, "/groups/0/image/path"
    if kind == "no-image":
        del g["image"]
        return {"groups": [small_group(4), g]}, grpc.StatusCode.INVALID_ARGUMENT, "/groups/1/image"
    if kind == "image-bytes":
        g["image"] = {"data": base64.b64encode(b"not an image").decode()}
        return {"groups": [g]}, grpc.StatusCode.INVALID_ARGUMENT, "/groups/0/image/data"
    if kind == "unknown-sha":
        g["image"] = {"sha256": "cd" * 32}
        return {"groups": [g]}, grpc.StatusCode.NOT_FOUND, "/groups/0/image/sha256"
    if kind == "too-many-responses":
        g["responses"] = g["responses"] * 30  # 90 > 64
        return {"groups": [g]}, grpc.StatusCode.RESOURCE_EXHAUSTED, "/groups/0/responses"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["option", "token", "path", "no-image", "image-bytes", "unknown-sha", "too-many-responses"])
def test_each_error_has_its_status_field_violation_and_the_http_problem(server: GrpcServerThread, stub: Any,
                                                                         kind: str) -> None:
    body, code, pointer = _bad(kind)
    req = json_format.ParseDict(body, pb.ReweightRequest())
    exc = rpc_error(stub.Reweight, req, timeout=60)
    assert exc.code() == code, (exc.code(), exc.details())
    assert pointer in violations(exc)
    assert retry_after(exc) is None  # none of these gets better by waiting
    problem = problem_of(exc)
    with server.client() as c:
        http = c.post("/v1/reweight", json=body).json()
    assert (problem.type, problem.status, problem.pointer, problem.detail) == (
        http["type"], http["status"], http["pointer"], http["detail"])
    if kind == "unknown-sha":
        assert problem.sha256 == "cd" * 32
    # the client raises what Client raises
    with GrpcClient(server.target, wait_ready=30) as g, Client(server.url, wait_ready=30) as h:
        errors = []
        for c in (g, h):
            try:
                c.reweight(body["groups"], options=body.get("options"))
            except Exception as e:  # compared below
                errors.append(e)
        if len(errors) == 2:
            assert type(errors[0]) is type(errors[1]) and errors[0].pointer == errors[1].pointer


def test_per_group_errors_keep_the_good_groups(stub: Any) -> None:
    good, (bad, _, pointer) = small_group(5), _bad("token")
    req = json_format.ParseDict({"groups": [good, bad["groups"][0]], "per_group_errors": True}, pb.ReweightRequest())
    answer = convert.response_from_message(stub.Reweight(req, timeout=60))
    assert answer.results[0].error is None and answer.results[0].id == "g5"
    assert answer.results[1].error.pointer == pointer.replace("/groups/0/", "/groups/1/", 1)
    assert answer.results[1].error.status == 422


def test_queue_full_is_resource_exhausted_with_retry_info_and_the_client_retries() -> None:
    with GrpcServerThread(queue_groups=2, batch_wait_ms=20) as s:
        s.wait_ready()
        stub = s.stub()
        futures = [stub.Reweight.future(convert.request_to_message([small_group(300 + i)]), timeout=120)
                   for i in range(12)]
        refused = []
        for f in futures:
            try:
                f.result()
            except grpc.RpcError as exc:
                refused.append(exc)
        assert refused, "a queue of 2 groups must refuse some of 12 concurrent requests"
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_after(exc) >= 1 and problem_of(exc).type.endswith("/queue-full")
        groups = [small_group(400 + i) for i in range(12)]
        with GrpcClient(s.target, max_in_flight=12, backoff=0.05, retries=50) as g:
            results = g.reweight(groups)
            assert [r.id for r in results] == [x["id"] for x in groups] and all(r.error is None for r in results)
            assert g.stats.snapshot()["retries"] >= 1
        with s.client() as c:
            text = c.get("/metrics").text
        assert metric(text, "kawhi_requests_total",
                      'frontend="grpc",route="/kawhi.v1.Kawhi/Reweight",status="RESOURCE_EXHAUSTED"') >= len(refused)
        assert metric(text, "kawhi_queue_depth") == 0


def _heavy(n: int = 4) -> list[dict[str, Any]]:
    groups = []
    for k in range(n):
        for g in example_groups():
            g["id"] = f"{g['id']}-{k}"
            g["prompt"] += f" (copy {k})"
            groups.append(g)
    return groups


def _settled(s: GrpcServerThread) -> str:
    deadline = time.monotonic() + 60
    while True:
        with s.client() as c:
            text = c.get("/metrics").text
        if metric(text, "kawhi_queue_depth") == 0 and s.state.batcher is not None and not s.state.batcher.busy:
            return text
        assert time.monotonic() < deadline, "queued work was not dropped"
        time.sleep(0.05)


def _working(s: GrpcServerThread) -> None:
    """Returns once the server holds admitted work (what a cancel or a drain must then drop),
    read from the kawhi_queue_depth metric as the HTTP twins do; no fixed sleep."""
    deadline = time.monotonic() + 60
    while True:
        with s.client() as c:
            if metric(c.get("/metrics").text, "kawhi_queue_depth") > 0:
                return
        assert time.monotonic() < deadline, "the call's groups never reached the queue"
        time.sleep(0.02)


def test_the_callers_deadline_and_cancellation_drop_queued_work() -> None:
    # one example group per forward (each is ~1,100 tokens): a call's groups queue one after another
    with GrpcServerThread(batch_tokens=1600) as s:
        s.wait_ready()
        stub = s.stub()
        heavy = _heavy(8)
        exc = rpc_error(stub.Reweight, convert.request_to_message(heavy), timeout=0.3)
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first = metric(_settled(s), "kawhi_groups_total")
        assert first < len(heavy), "the groups of an abandoned call still ran"
        text = _settled(s)  # dropped at the caller's deadline: by the server's matching deadline or the cancel
        assert sum(metric(text, "kawhi_queue_dropped_total", f'reason="{r}"') for r in ("timeout", "client-closed")) >= 1

        cancelled = _heavy(6)
        future = stub.Reweight.future(convert.request_to_message(cancelled), timeout=120)
        _working(s)
        assert future.cancel()
        done = metric(_settled(s), "kawhi_groups_total") - first
        assert done < len(cancelled), "the groups of a cancelled call still ran"
        # the server is fine afterwards
        assert len(stub.Reweight(convert.request_to_message([small_group(9)]), timeout=60).results) == 1


def test_the_servers_own_deadline_is_deadline_exceeded_with_its_problem() -> None:
    with GrpcServerThread(request_timeout_s=0.05) as s:
        s.wait_ready()
        exc = rpc_error(s.stub().Reweight, convert.request_to_message(_heavy(1)), timeout=60)
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and problem_of(exc).type.endswith("/timeout")
        _settled(s)


def test_auth_on_and_off(server: GrpcServerThread, stub: Any) -> None:
    assert convert.from_struct(stub.Info(pb.InfoRequest(), timeout=10))["server"]["auth"] is False
    with GrpcServerThread(api_keys="key-one,key-two") as s:
        s.wait_ready()
        guarded = s.stub()
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "key-one"),)):
            exc = rpc_error(guarded.Info, pb.InfoRequest(), timeout=10, metadata=metadata)
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and problem_of(exc).status == 401
        info = guarded.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer key-two"),))
        assert convert.from_struct(info)["server"]["auth"] is True
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(s.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key, as /readyz
        with GrpcClient(s.target, "key-one", wait_ready=30) as g:
            assert len(g.reweight([small_group(11)])) == 1


# ====================================================================== streams


def test_stream_results_come_as_they_finish_and_are_matched_by_id(server: GrpcServerThread, stub: Any) -> None:
    slow = _heavy(1)[0]
    slow["id"] = "slow"
    path = dict(small_group(21), id="path", image={"path": "x.png"})
    unknown = dict(small_group(22), id="unknown", image={"sha256": "ef" * 32})
    sent = [slow, path, unknown, small_group(23)]

    def requests() -> Any:
        yield convert.request_to_message([slow], {"estimator": "rloo"})
        yield convert.request_to_message([path, unknown], {"estimator": "rloo"})
        yield convert.request_to_message([sent[3]], {"estimator": "rloo"})

    arrived = list(stub.ReweightStream(requests(), timeout=300))
    ids = [m.result.id for m in arrived]
    assert sorted(ids) == sorted(g["id"] for g in sent)
    assert ids.index("path") < ids.index("slow") and ids.index("unknown") < ids.index("slow"), ids
    by_id = {m.result.id: m for m in arrived}
    assert (by_id["path"].request_index, by_id["path"].group_index) == (1, 0)
    assert by_id["unknown"].result.error.pointer == "/groups/1/image/sha256"  # into its own message
    assert by_id["unknown"].result.error.status == 404 and by_id["path"].result.error.status == 422
    unary = convert.response_from_message(stub.Reweight(convert.request_to_message([slow], {"estimator": "rloo"})))
    got = convert.group_result_from_message(by_id["slow"].result)
    assert_close(got.model_dump(mode="json"), unary.results[0].model_dump(mode="json"))

    with GrpcClient(server.target, wait_ready=30) as g:
        pairs = list(g.reweight_stream([small_group(24), dict(small_group(25), image={"sha256": "ef" * 32})]))
        assert sorted(i for i, _ in pairs) == [0, 1]
        errors = {i: r.error for i, r in pairs}
        assert errors[0] is None and errors[1].pointer == "/groups/1/image/sha256"


def test_reflection_lists_the_services(server: GrpcServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    answers = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="kawhi.v1.Kawhi"),
    ]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"kawhi.v1.Kawhi", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[1].file_descriptor_response.file_descriptor_proto]
    kawhi = next(f for f in files if f.package == "kawhi.v1")
    assert [m.name for m in kawhi.service[0].method] == ["Reweight", "ReweightStream", "PutImage", "Info"]


# ====================================================================== health, loading, draining


def test_health_follows_loading_and_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from kawhi.pipeline.service import ReweightService

    gate = threading.Event()
    real_load = ReweightService.load_engine
    monkeypatch.setattr(ReweightService, "load_engine", lambda self: (gate.wait(30), real_load(self))[1])
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with GrpcServerThread(engine=None) as s:
        health = health_pb2_grpc.HealthStub(s.channel())
        for name in ("", "kawhi.v1.Kawhi"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == NOT_SERVING
        assert rpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=10).code() == \
            grpc.StatusCode.NOT_FOUND
        watched: list[int] = []
        watch = health.Watch(health_pb2.HealthCheckRequest(service="kawhi.v1.Kawhi"), timeout=120)

        def read() -> None:
            try:
                for m in watch:
                    watched.append(m.status)
            except grpc.RpcError as exc:  # the cancel at the end
                assert exc.code() == grpc.StatusCode.CANCELLED

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        exc = rpc_error(s.stub().Reweight, convert.request_to_message([small_group(1)]), timeout=10)
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and problem_of(exc).type.endswith("/loading")
        assert retry_after(exc) >= 1
        client = GrpcClient(s.target, wait_ready=120)
        waited: list[Any] = []
        waiter = threading.Thread(target=lambda: waited.append(client.wait_ready()), daemon=True)
        waiter.start()
        time.sleep(0.3)
        assert not waited  # still loading
        gate.set()
        waiter.join(120)
        assert waited == [{"state": "ready", "reasons": []}]
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert len(client.reweight([small_group(2)])) == 1

        s.state.begin_drain()  # what SIGTERM does first
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
        exc = rpc_error(s.stub().Reweight, convert.request_to_message([small_group(1)]), timeout=10)
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and problem_of(exc).type.endswith("/draining")
        deadline = time.monotonic() + 10
        while watched[-1:] != [NOT_SERVING] or len(watched) < 3:
            assert time.monotonic() < deadline, watched
            time.sleep(0.05)
        assert watched == [NOT_SERVING, SERVING, NOT_SERVING]
        watch.cancel()
        reader.join(10)
        client.close()


# ====================================================================== size


def noise_png(side: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def test_a_batch_larger_than_4_mib_and_the_http_body_limit() -> None:
    groups = [small_group(30 + i, image=noise_png(700, i)) for i in range(3)]
    req = convert.request_to_message(groups)
    assert req.ByteSize() > 4 * 1024 * 1024
    with GrpcServerThread(max_body_bytes=int(4.5 * 1024 * 1024)) as s:
        s.wait_ready()
        answer = s.stub().Reweight(req, timeout=300)  # over gRPC's 4 MiB default, under the server's limit
        assert [r.id for r in answer.results] == [g["id"] for g in groups] and not answer.results[0].HasField("error")
        bigger = convert.request_to_message(groups + [small_group(40, image=noise_png(700, 9))])
        exc = rpc_error(s.stub().Reweight, bigger, timeout=60)  # over max_body_bytes: refused before parsing
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after(exc) is None
        with GrpcClient(s.target, wait_ready=30) as g:  # the client raises what Client raises for a 413
            with pytest.raises(PayloadTooLarge):
                g._drive(g._core.exchange("POST", "/v1/reweight", timeout=g.timeouts.for_tokens(0), content=bigger))
            too_big = dict(small_group(41), responses=[{"text": "x", "token_ids": [2**40]}])
            with pytest.raises(InvalidRequest):
                g.reweight([too_big])
            results = g.reweight([small_group(42), too_big], per_group_errors=True)
            assert results[0].error is None and results[1].error.pointer == "/groups/1"


def test_a_call_still_running_at_the_drain_deadline_is_unavailable_and_dropped() -> None:
    with GrpcServerThread(batch_tokens=1600) as s:  # one group per forward: the call is still queued
        s.wait_ready()
        future = s.stub().Reweight.future(convert.request_to_message(_heavy(8)), timeout=120)
        _working(s)
        s.state.begin_drain()
        s.state.expire_drain()  # what the SIGTERM handler does when drain_timeout_s is nearly spent
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert problem_of(info.value).type.endswith("/draining") and retry_after(info.value) >= 1
        _settled(s)


def test_a_repeated_call_is_answered_from_the_idempotent_result_cache(server: GrpcServerThread, stub: Any) -> None:
    req = convert.request_to_message([small_group(77)])

    def hits() -> float:
        with server.client() as c:
            return metric(c.get("/metrics").text, "kawhi_cache_hits_total", 'kind="result"')

    first = stub.Reweight(req, timeout=60)
    before = hits()
    again = stub.Reweight(req, timeout=60)
    assert hits() == before + 1
    assert again.results == first.results
    with server.client() as c:  # each front end stores the answer in its own encoding (protobuf, JSON)
        assert c.post("/v1/reweight", json=http_body(req)).headers["x-kawhi-cache"] == "miss"
        assert c.post("/v1/reweight", json=http_body(req)).headers["x-kawhi-cache"] == "hit"


def test_a_wrong_grpc_target_fails_in_seconds_with_the_default_wait() -> None:
    import socket

    from kawhi_client.errors import ServerNotReady

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with GrpcClient(f"127.0.0.1:{port}") as g:
        t0 = time.monotonic()
        with pytest.raises(ServerNotReady, match=f"nothing answers at 127.0.0.1:{port}"):
            g.reweight([small_group(0)])
    assert time.monotonic() - t0 < 15
