"""The shared layer of the trainer integrations (kawhi_client.integrations: backends, the
failure policy, inputs and the Reweighter); plus both real backends side by side."""

from __future__ import annotations

import base64
import io
import logging
import subprocess
import sys
import warnings
from typing import Any

import pytest
from kawhi_client import Client, GroupResult, Problem, ResponseResult
from kawhi_client.integrations import (
    FailurePolicy,
    HttpBackend,
    InProcessBackend,
    KawhiFallbackWarning,
    KawhiIntegrationError,
    KawhiTokenizerWarning,
    Reweighter,
    Rollout,
    as_backend,
)
from kawhi_client.integrations.inputs import image_bytes, insert_image_placeholder, tokenizer_fingerprint, wire_messages
from test_integration_helpers import ROOT, default_engine, free_port, kawhi_serve, png, small_image


class FakeBackend:
    """Answers like the service: token_advantages = advantage * weight, weight = 0.5 + 0.1 * t."""

    def __init__(self, fail: Exception | None = None, refuse: set[int] = frozenset(), short: bool = False) -> None:
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        self.fail, self.refuse, self.short = fail, refuse, short

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        self.calls.append((groups, options))
        if self.fail is not None:
            raise self.fail
        out = []
        for g, group in enumerate(groups):
            if g in self.refuse:
                out.append(GroupResult(error=Problem(title="Invalid rollout group", status=422, detail="bad token",
                                                     pointer=f"/groups/{g}/responses/0/token_ids/0")))
                continue
            responses = []
            for response, adv in zip(group["responses"], group["advantages"]):
                n = len(response["token_ids"]) - (1 if self.short else 0)
                w = [0.5 + 0.1 * t for t in range(n)]
                responses.append(ResponseResult(advantage=adv, paragraphs=[], token_weights=w,
                                                token_advantages=[adv * x for x in w]))
            out.append(GroupResult(responses=responses))
        return out


def rollouts() -> list[Rollout]:
    a, b = png(small_image("triangle.png")), png(small_image("bar_chart.png"))
    return [
        Rollout(token_ids=[10, 11, 12], image=a, prompt="p0", advantage=1.0),
        Rollout(token_ids=[13, 14], image=b, prompt="p1", advantage=-0.5),
        Rollout(token_ids=[15], image=a, prompt="p0", advantage=-1.0),
        Rollout(token_ids=[16, 17], image=a, prompt="p0", advantage=0.0),  # zero: not sent
        Rollout(token_ids=[], image=a, prompt="p0", advantage=2.0),  # empty: not sent
    ]


def test_importing_the_integrations_imports_no_trainer_and_no_torch() -> None:
    code = ("import sys, kawhi_client, kawhi_client.integrations; "
            "from kawhi_client.integrations import common, backends, inputs, policy, reweighter; "
            "from kawhi_client.integrations import Reweighter, InProcessBackend, HttpBackend; "
            "print(sorted(m for m in ('torch', 'trl', 'verl', 'numpy', 'PIL', 'kawhi', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_reweighter_groups_by_image_and_prompt_keeps_order_and_skips_exact_zeros() -> None:
    backend = FakeBackend()
    rw = Reweighter(backend, options={"temperature": 0.2})
    rows = rw.reweight(rollouts())
    (groups, options), = backend.calls
    assert options == {"temperature": 0.2}
    assert [len(g["responses"]) for g in groups] == [2, 1]  # rows 0 and 2 share image+prompt
    assert groups[0]["advantages"] == [1.0, -1.0] and groups[0]["prompt"] == "p0"
    assert groups[0]["responses"][1]["token_ids"] == [15]
    assert isinstance(groups[0]["image"], bytes)
    assert rows[0].reweighted and rows[0].token_advantages == pytest.approx([0.5, 0.6, 0.7])
    assert rows[1].token_advantages == pytest.approx([-0.25, -0.3])
    assert rows[2].token_weights == pytest.approx([0.5])
    assert (rows[3].reweighted, rows[3].reason, rows[3].token_advantages) == (False, "zero advantage", [0.0, 0.0])
    assert (rows[4].reason, rows[4].token_advantages) == ("empty response", [])
    assert rw.policy.stats() == {"on_error": "raise", "fallbacks": 0, "fallback_rows": 0, "reweighted_rows": 3}


def test_max_group_size_splits_groups() -> None:
    backend = FakeBackend()
    img = png(small_image())
    Reweighter(backend, max_group_size=2).reweight(
        [Rollout(token_ids=[i + 10], image=img, prompt="p", advantage=1.0) for i in range(5)])
    assert [len(g["responses"]) for g in backend.calls[0][0]] == [2, 2, 1]


def test_service_failure_raises_by_default_with_the_cause() -> None:
    boom = ConnectionError("refused")
    rw = Reweighter(FakeBackend(fail=boom))
    with pytest.raises(KawhiIntegrationError, match="service call failed: ConnectionError: refused") as info:
        rw.reweight(rollouts())
    assert info.value.__cause__ is boom


def test_fallback_keeps_uniform_advantages_counts_logs_and_warns_every_event(caplog: Any) -> None:
    rw = Reweighter(FakeBackend(fail=TimeoutError("slow")), on_error="fallback")
    caplog.set_level(logging.WARNING, logger="kawhi_client.integrations")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        first = rw.reweight(rollouts())
        rw.reweight(rollouts())
    fallback_warnings = [w for w in caught if issubclass(w.category, KawhiFallbackWarning)]
    assert len(fallback_warnings) == 2  # one per event, not once per process
    assert len([r for r in caplog.records if "UNWEIGHTED" in r.getMessage()]) == 2
    assert first[0].token_advantages == [1.0, 1.0, 1.0] and not first[0].reweighted
    assert first[0].reason == "fallback: TimeoutError"
    assert first[1].token_advantages == [-0.5, -0.5] and first[2].token_weights == [1.0]
    assert rw.policy.fallbacks == 2 and rw.policy.fallback_rows == 6 and rw.policy.reweighted_rows == 0
    assert [e.number for e in rw.policy.events] == [1, 2] and rw.policy.events[0].rows == 3


def test_a_refused_group_falls_back_alone() -> None:
    rw = Reweighter(FakeBackend(refuse={1}), on_error="fallback")
    with pytest.warns(KawhiFallbackWarning, match="group refused: 422 Invalid rollout group at /groups/1"):
        rows = rw.reweight(rollouts())
    assert rows[0].reweighted and rows[2].reweighted
    assert not rows[1].reweighted and rows[1].token_advantages == [-0.5, -0.5]
    assert (rw.policy.fallbacks, rw.policy.fallback_rows, rw.policy.reweighted_rows) == (1, 1, 2)
    with pytest.raises(KawhiIntegrationError, match="group refused"):
        Reweighter(FakeBackend(refuse={0})).reweight(rollouts())


def test_a_different_number_of_token_advantages_is_never_misaligned() -> None:
    with pytest.raises(KawhiIntegrationError, match="different tokenisation"):
        Reweighter(FakeBackend(short=True)).reweight(rollouts())
    rw = Reweighter(FakeBackend(short=True), on_error="fallback")
    with pytest.warns(KawhiFallbackWarning):
        rows = rw.reweight(rollouts())
    assert all(not r.reweighted for r in rows[:3]) and rows[0].token_advantages == [1.0, 1.0, 1.0]


def test_a_rollout_without_image_goes_through_the_policy() -> None:
    bad = [Rollout(token_ids=[1, 2], image=None, prompt="p", advantage=1.0)]
    with pytest.raises(KawhiIntegrationError, match="bad rollout: rollout 0: no image"):
        Reweighter(FakeBackend()).reweight(bad)
    rw = Reweighter(FakeBackend(), on_error="fallback")
    with pytest.warns(KawhiFallbackWarning):
        assert rw.reweight(bad)[0].token_advantages == [1.0, 1.0]


def test_options_and_policy_are_validated_up_front() -> None:
    with pytest.raises(ValueError, match="temprature"):
        Reweighter(FakeBackend(), options={"temprature": 0.1})
    with pytest.raises(ValueError, match="on_error"):
        FailurePolicy("ignore")  # type: ignore[arg-type]


def test_image_bytes_never_loses_pixels() -> None:
    import numpy as np
    from PIL import Image

    img = small_image()
    data = image_bytes(img)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(img))
    assert image_bytes(img.copy()) == data  # same pixels, same bytes (cached, deterministic)
    raw = png(img)
    assert image_bytes(raw) == raw  # encoded bytes go unchanged
    assert image_bytes({"bytes": raw, "path": None}) == raw  # HF datasets, undecoded
    assert image_bytes({"data": base64.b64encode(raw).decode()}) == raw
    assert image_bytes(str(ROOT / "examples/images/triangle.png")) == (ROOT / "examples/images/triangle.png").read_bytes()
    assert image_bytes({"sha256": "AB" * 32}) == {"sha256": "ab" * 32}
    assert image_bytes(np.asarray(img)).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="not fetched"):
        image_bytes("https://example.com/x.png")
    with pytest.raises(TypeError):
        image_bytes(3.5)


def test_wire_messages_strip_payloads_and_refuse_video() -> None:
    img = small_image()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "q?"}]}]
    wire, found = wire_messages(messages)
    assert wire[1]["content"] == [{"type": "image"}, {"type": "text", "text": "q?"}]
    assert found == [{"image": img}]
    assert wire_messages([{"role": "user", "content": "q?"}]) == ([{"role": "user", "content": "q?"}], [])
    assert insert_image_placeholder([{"role": "user", "content": "q?"}])[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "q?"}]
    with pytest.raises(ValueError, match="video"):
        wire_messages([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


def test_as_backend_accepts_what_users_have() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert isinstance(as_backend(url), HttpBackend)
    client = Client(url, wait_ready=False)
    assert as_backend(client).client is client
    engine = default_engine()
    assert as_backend(engine).engine is engine
    fake = FakeBackend()
    assert as_backend(fake) is fake
    with pytest.raises(TypeError):
        as_backend(object())
    with pytest.raises(ValueError):
        as_backend("kawhi:8000")


def test_in_process_and_http_backends_give_the_same_advantages_and_real_group_errors() -> None:
    engine = default_engine()
    rows = rollouts()[:3] + [
        # a token id outside the model's vocabulary: the service refuses this group with a pointer
        Rollout(token_ids=[10, 99999], image=png(small_image("line_plot.png")), prompt="p2", advantage=1.0)]
    options = {"granularity": "sentence"}
    with pytest.warns(KawhiFallbackWarning, match="token_ids"):
        local = Reweighter(InProcessBackend(engine), options=options, on_error="fallback").reweight(rows)
    with kawhi_serve() as url:
        with Client(url) as client:
            rw = Reweighter(client, options=options, on_error="fallback")
            with pytest.warns(KawhiFallbackWarning, match="422"):
                remote = rw.reweight(rows)
    for a, b in zip(local[:3], remote[:3]):
        assert a.reweighted and b.reweighted
        assert a.token_advantages == pytest.approx(b.token_advantages, abs=1e-9)
        assert a.token_weights == pytest.approx(b.token_weights, abs=1e-9)
    assert not local[3].reweighted and not remote[3].reweighted
    assert remote[3].token_advantages == [1.0, 1.0]
    assert (rw.policy.fallbacks, rw.policy.fallback_rows, rw.policy.reweighted_rows) == (1, 1, 3)


def test_tokenizer_check_compares_the_trainers_tokenizer_with_the_services() -> None:
    from kawhi.engine.engine import TINY_MODEL_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    engine = default_engine()
    assert tokenizer_fingerprint(tok) == engine.info()["tokenizer_fingerprint"]
    assert Reweighter(InProcessBackend(engine)).check_tokenizer(tok) is True

    class OtherTokenizer(FakeBackend):
        def info(self) -> dict[str, Any]:
            return {"tokenizer_fingerprint": "0123456789abcdef"}

    with pytest.warns(KawhiTokenizerWarning, match="differs"):
        assert Reweighter(OtherTokenizer()).check_tokenizer(tok) is False
    assert Reweighter(FakeBackend()).check_tokenizer(tok) is None  # no info(): unknown
    dead = Reweighter(Client(f"http://127.0.0.1:{free_port()}", retries=0, wait_ready=False, connect_timeout=1.0))
    assert dead.check_tokenizer(tok) is None  # unreachable: the reweight call reports it, under the policy


def test_a_client_without_token_arrays_gives_the_same_rows(default_server: Any) -> None:
    """token_arrays=False: the service sends paragraphs only, and the Reweighter rebuilds each
    token's weight and advantage from them; the rows equal those of the full answer."""
    from kawhi_client.integrations import HttpBackend

    sent = [r for r in rollouts() if r.token_ids and r.advantage != 0.0]
    full = Reweighter(HttpBackend(default_server.url)).reweight(sent)
    lean = Reweighter(HttpBackend(default_server.url, token_arrays=False)).reweight(sent)
    assert all(row.reweighted for row in full) and all(row.reweighted for row in lean)
    for a, b in zip(full, lean):
        assert b.token_weights == pytest.approx(a.token_weights, abs=1e-12)
        assert b.token_advantages == pytest.approx(a.token_advantages, abs=1e-12)
