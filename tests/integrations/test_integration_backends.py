"""InProcessBackend hands the trainer's image bytes to the engine as they are: no base64
on the way in, the same advantages as the wire form, and the engine's own loader for the
image forms a trainer does not hold as bytes."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kawhi.pipeline.local import LocalService
from kawhi_client.integrations import InProcessBackend
from test_integration_helpers import default_engine, png, small_image


class RecordingEngine(LocalService):
    """The real kawhi-tiny engine, recording what reaches it: the groups and the bytes its
    image loader answers."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.groups: list[dict[str, Any]] = []
        self.loaded: list[bytes] = []

    def reweight(self, groups: list[dict[str, Any]], options: Any, *, load_image: Any) -> Any:
        def recording(ref: Any) -> bytes:
            data = load_image(ref)
            self.loaded.append(data)
            return data

        self.groups = groups
        return super().reweight(groups, options, load_image=recording)


def group(image: Any, **extra: Any) -> dict[str, Any]:
    return {"image": image, "prompt": "How tall is the bar?", **extra,
            "responses": [{"text": "It is tall.\n\nAbout 5.", "reward": 1.0}, {"text": "Short.", "reward": 0.0}]}


@pytest.fixture(scope="module")
def engine() -> Any:
    return default_engine()


def test_image_bytes_reach_the_engine_unchanged_and_never_as_base64(engine: Any) -> None:
    data = png(small_image("bar_chart.png"))
    spy = RecordingEngine(engine)
    results = InProcessBackend(spy).reweight([group(data, id="a"), group(data, id="b")], {"temperature": 0.2})
    assert all(set(g["image"]) == {"sha256"} for g in spy.groups)  # named by hash, no "data"
    assert spy.loaded == [data, data] and all(b is data for b in spy.loaded)
    wire = LocalService(engine).reweight([group({"data": base64.b64encode(data).decode()}, id="a")], {"temperature": 0.2})
    assert results[0].error is None and results[0].id == "a"
    for got, want in zip(results[0].responses, wire[0].responses):
        assert got.token_advantages == pytest.approx(want.token_advantages, abs=1e-12)


def test_other_image_forms_go_through_the_engines_own_loader(engine: Any, tmp_path: Any) -> None:
    data = png(small_image("triangle.png"))
    path = tmp_path / "triangle.png"
    path.write_bytes(data)
    spy = RecordingEngine(engine)
    results = InProcessBackend(spy).reweight(
        [group({"path": str(path)}), group({"data": base64.b64encode(data).decode()}),
         group({"sha256": "0" * 64})], {})
    assert spy.loaded == []  # path and data are read by the pipeline's admission, never by the loader
    assert results[0].error is None and results[1].error is None
    assert results[0].responses[0].token_advantages == results[1].responses[0].token_advantages
    assert results[2].error is not None and results[2].error.status == 404  # a hash it was never given
