"""pad_token_advantages: hand-built cases, with numpy and without it."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from kawhi_client import pad_token_advantages, token_advantage_rows
from kawhi_client.schema import GroupResult, Problem, ResponseResult, ReweightResponse, Usage


def resp(*adv: float) -> ResponseResult:
    return ResponseResult(advantage=adv[0] if adv else 0.0, paragraphs=[], token_advantages=list(adv),
                          token_weights=[1.0] * len(adv))


GROUPS = [GroupResult(id="a", responses=[resp(1.0, 2.0), resp(3.0)]), GroupResult(id="b", responses=[resp(4.0, 5.0, 6.0)])]


@pytest.fixture(params=["numpy", "lists"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "lists":
        monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` now raises ImportError
    return request.param


def as_lists(out: Any, backend: str) -> list[list[float]]:
    if backend == "numpy":
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        return out.tolist()
    assert isinstance(out, list)
    return out


def test_groups_flatten_into_responses_in_order() -> None:
    assert token_advantage_rows(GROUPS) == [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]]
    envelope = ReweightResponse(model="m", version="v", options={}, usage=Usage(), results=GROUPS)
    assert token_advantage_rows(envelope) == token_advantage_rows(GROUPS)
    assert token_advantage_rows([g.model_dump() for g in GROUPS]) == token_advantage_rows(GROUPS)
    assert token_advantage_rows([resp(1.0), [2, 3], np.array([4.0])]) == [[1.0], [2.0, 3.0], [4.0]]


def test_left_and_right_padding(backend: str) -> None:
    assert as_lists(pad_token_advantages(GROUPS), backend) == [[1, 2, 0], [3, 0, 0], [4, 5, 6]]
    assert as_lists(pad_token_advantages(GROUPS, 4, pad_value=-1.0, align="right"), backend) == [
        [-1, -1, 1, 2], [-1, -1, -1, 3], [-1, 4, 5, 6]]
    with pytest.raises(ValueError, match="response 2 has 3 token advantages, more than max_len=2"):
        pad_token_advantages(GROUPS, 2)
    with pytest.raises(ValueError, match="align"):
        pad_token_advantages(GROUPS, align="center")  # type: ignore[arg-type]


def test_values_land_where_the_response_mask_is_set(backend: str) -> None:
    # a trainer's batch: left-padded prompt area cut off, a response mask with a hole (e.g. a masked tool call)
    mask = [[1, 1, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [1, 0, 1, 1, 0]]
    want = [[1, 2, 0, 0, 0],
            [0, 3, 0, 0, 0],
            [4, 0, 5, 6, 0]]
    assert as_lists(pad_token_advantages(GROUPS, response_mask=mask), backend) == want
    assert as_lists(pad_token_advantages(GROUPS, response_mask=np.array(mask, dtype=bool)), backend) == want
    assert as_lists(pad_token_advantages(GROUPS, 5, response_mask=mask, pad_value=9.0), backend) == [
        [1, 2, 9, 9, 9], [9, 3, 9, 9, 9], [4, 9, 5, 6, 9]]


def test_a_mask_that_disagrees_with_the_advantages_is_an_error(backend: str) -> None:
    with pytest.raises(ValueError, match=r"response 1: 1 token advantages but its mask has 2 response tokens"):
        pad_token_advantages(GROUPS, response_mask=[[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="2 rows but the results hold 3 responses"):
        pad_token_advantages(GROUPS, response_mask=[[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="max_len=4 but response_mask is 3 wide"):
        pad_token_advantages(GROUPS, 4, response_mask=[[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="row 1 has 2 columns"):
        pad_token_advantages(GROUPS, response_mask=[[1, 1, 0], [1, 0], [1, 1, 1]])


def test_a_torch_like_mask_is_read_without_importing_torch() -> None:
    class FakeTensor:  # what the helper uses of a torch tensor: detach().cpu() and tolist()
        def __init__(self, rows: list[list[int]]) -> None:
            self.rows = rows

        def detach(self) -> FakeTensor:
            return self

        def cpu(self) -> FakeTensor:
            return self

        def tolist(self) -> list[list[int]]:
            return self.rows

    out = pad_token_advantages(GROUPS, response_mask=FakeTensor([[0, 1, 1], [1, 0, 0], [1, 1, 1]]))
    assert out.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 6]]


def test_error_groups_and_empty_batches() -> None:
    bad = GroupResult(id="x", error=Problem(title="Invalid", status=422, pointer="/groups/0"))
    with pytest.raises(ValueError, match="error result"):
        pad_token_advantages([bad])
    assert pad_token_advantages([]).shape == (0, 0)
    assert pad_token_advantages([], 7).shape == (0, 7)
    assert pad_token_advantages([resp()], 2).tolist() == [[0.0, 0.0]]
