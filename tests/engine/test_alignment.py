import pytest
import torch
from kawhi.engine.alignment import (
    alignment_scores,
    alignment_scores_reference,
    mean_unit_keys,
    repeat_kv,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def orthogonal_to(u, shape, g):
    """Random vectors (..., d) with their component along the unit vector u removed."""
    x = torch.randn(*shape, u.numel(), generator=g, dtype=torch.float64)
    return x - (x @ u)[..., None] * u


# ---- repeat_kv and GQA ---------------------------------------------------------


def test_repeat_kv_layout():
    keys = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = repeat_kv(keys, 2)
    assert out.shape == (4, 3, 4)
    for h in range(4):
        assert torch.equal(out[h], keys[h // 2])
    assert repeat_kv(keys, 1) is keys
    with pytest.raises(ValueError):
        repeat_kv(keys, 0)
    with pytest.raises(ValueError):
        repeat_kv(keys[0], 2)


def test_gqa_head_3_reads_kv_head_1():
    g = gen(1)
    keys = torch.randn(2, 5, 8, generator=g)  # H_kv = 2
    sel = torch.tensor([0, 2, 3])
    unit = keys / keys.norm(dim=-1, keepdim=True)
    out = mean_unit_keys(keys, sel, torch.tensor([3, 0, 2]), num_query_heads=4)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], unit[1, sel].mean(0))  # head 3 -> kv head 1
    torch.testing.assert_close(out[1], unit[0, sel].mean(0))  # head 0 -> kv head 0
    torch.testing.assert_close(out[2], unit[1, sel].mean(0))  # head 2 -> kv head 1

    # and alignment_scores agrees: planting in kv head 1 shows up at query heads 2 and 3 only
    u = torch.zeros(8)
    u[0] = 1.0
    keys[1, sel] = u * torch.tensor([[1.0], [2.0], [0.5]])
    queries = torch.randn(4, 3, 8, generator=g)
    queries[:, 1] = u * 3.0
    for h, expected in ((3, 1.0), (2, 1.0)):
        assert alignment_scores(queries, keys, sel, torch.tensor([h]))[1].item() == pytest.approx(expected, abs=1e-6)
    assert alignment_scores(queries, keys, sel, torch.tensor([0]))[1].item() < 0.99


# ---- planted structure ---------------------------------------------------------


def test_planted_head_aligns_tokens_exactly():
    g = gen(2)
    H, H_kv, T, N, d = 4, 2, 8, 12, 32
    sel = torch.tensor([1, 4, 5, 9])
    planted_tokens = [2, 6]
    head = 3  # reads kv head 1

    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    keys = torch.randn(H_kv, N, d, generator=g, dtype=torch.float64)
    keys[1, sel] = u * torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=torch.float64)
    queries = torch.randn(H, T, d, generator=g, dtype=torch.float64)
    queries[head] = orthogonal_to(u, (T,), g)
    queries[head, planted_tokens] = u * torch.tensor([[4.0], [0.1]], dtype=torch.float64)

    alpha = alignment_scores(queries, keys, sel, torch.tensor([head]))
    expected = torch.zeros(T, dtype=torch.float32)
    expected[planted_tokens] = 1.0
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=0)

    # Averaged with three random heads the planted tokens still stand out.
    alpha_all = alignment_scores(queries, keys, sel)
    others = [t for t in range(T) if t not in planted_tokens]
    assert alpha_all[planted_tokens].min() > alpha_all[others].max()


def test_random_high_dimensional_vectors_score_near_zero():
    g = gen(3)
    queries = torch.randn(2, 16, 512, generator=g)
    keys = torch.randn(2, 64, 512, generator=g)
    alpha = alignment_scores(queries, keys, torch.arange(64))
    assert alpha.abs().max() < 0.05


# ---- equivalence with the explicit cosine matrix -------------------------------


@pytest.mark.parametrize(
    "H, H_kv, heads",
    [(4, 4, None), (4, 2, [0, 3]), (8, 2, [5, 1, 6]), (6, 1, None), (4, 2, [2])],
)
def test_matches_reference(H, H_kv, heads):
    g = gen(H * 10 + H_kv)
    T, N, d = 7, 20, 16
    queries = torch.randn(H, T, d, generator=g, dtype=torch.float64)
    keys = torch.randn(H_kv, N, d, generator=g, dtype=torch.float64)
    sel = torch.randperm(N, generator=g)[:9]
    heads_t = None if heads is None else torch.tensor(heads)
    ref = alignment_scores_reference(queries, keys, sel, heads_t)
    out = alignment_scores(queries, keys, sel, heads_t)
    assert ref.dtype == torch.float64 and out.dtype == torch.float32 and out.shape == (T,)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)


def test_heads_and_selected_accept_plain_lists():
    g = gen(4)
    queries = torch.randn(4, 3, 8, generator=g)
    keys = torch.randn(2, 6, 8, generator=g)
    torch.testing.assert_close(
        alignment_scores(queries, keys, [0, 5], [1, 2]),
        alignment_scores(queries, keys, torch.tensor([0, 5]), torch.tensor([1, 2])),
    )


def test_key_key_similarity_by_passing_repeated_keys():
    g = gen(5)
    H, H_kv, d = 4, 2, 8
    response_keys = torch.randn(H_kv, 5, d, generator=g)
    visual_keys = torch.randn(H_kv, 9, d, generator=g)
    sel = torch.tensor([0, 3, 8])
    alpha = alignment_scores(repeat_kv(response_keys, H // H_kv), visual_keys, sel)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    expected = (unit(response_keys) @ unit(visual_keys[:, sel]).transpose(1, 2)).mean(dim=(0, 2))
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=0)


# ---- rotary position embedding --------------------------------------------------


def rope(x, positions, base=10000.0):
    """Rotate consecutive pairs (x_{2i}, x_{2i+1}) by positions * base^(-2i/d)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv_freq  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def test_rope_same_position_keeps_cosine_different_positions_change_it():
    g = gen(6)
    d = 16
    q = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    sel = torch.tensor([0])
    before = alignment_scores(q, k, sel).item()

    def after(pq, pk):
        return alignment_scores(rope(q, torch.tensor([pq])), rope(k, torch.tensor([pk])), sel).item()

    # identical rotation angle for q and k: cosine unchanged
    for p in (0, 3, 100):
        assert after(p, p) == pytest.approx(before, abs=1e-6)
    # different positions: cosine changes, and only through the relative offset
    assert abs(after(40, 7) - before) > 1e-3
    assert after(40, 7) == pytest.approx(after(133, 100), abs=1e-6)


def test_rope_planted_alignment_is_broken_by_position_offset():
    # q_t == k_v exactly: cosine 1 before RoPE, and after RoPE only where positions match.
    g = gen(7)
    d = 8
    v = torch.randn(d, generator=g, dtype=torch.float64)
    keys = v.expand(1, 1, d).clone()  # one visual token at position 5
    queries = v.expand(1, 4, d).clone()  # response tokens at positions 5, 6, 9, 30
    sel = torch.tensor([0])
    torch.testing.assert_close(alignment_scores(queries, keys, sel), torch.ones(4), atol=1e-6, rtol=0)
    q_pos = torch.tensor([5, 6, 9, 30])
    alpha = alignment_scores(rope(queries[0], q_pos)[None], rope(keys[0], torch.tensor([5]))[None], sel)
    assert alpha[0].item() == pytest.approx(1.0, abs=1e-6)
    assert (alpha[1:] < 1.0 - 1e-4).all()


# ---- dtypes, degenerate vectors, validation ---------------------------------------


def test_bf16_inputs_give_float32_output():
    g = gen(8)
    q32 = torch.randn(4, 5, 16, generator=g)
    k32 = torch.randn(2, 7, 16, generator=g)
    sel = torch.tensor([1, 2, 6])
    out = alignment_scores(q32.bfloat16(), k32.bfloat16(), sel)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, alignment_scores(q32, k32, sel), atol=2e-2, rtol=0)
    assert mean_unit_keys(k32.bfloat16(), sel, torch.tensor([0]), 4).dtype == torch.float32


def test_zero_vectors_give_zero_not_nan():
    queries = torch.zeros(1, 2, 4)
    queries[0, 1, 0] = 1.0
    keys = torch.zeros(1, 3, 4)
    keys[0, 1, 0] = 2.0
    alpha = alignment_scores(queries, keys, torch.tensor([0, 1]))  # key 0 is zero
    torch.testing.assert_close(alpha, torch.tensor([0.0, 0.5]))


def test_no_response_tokens():
    out = alignment_scores(torch.zeros(2, 0, 4), torch.randn(1, 3, 4), torch.tensor([0]))
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "q_shape, k_shape, selected, heads",
    [
        ((4, 3, 8), (2, 5, 8), [], None),  # empty selection
        ((4, 3, 8), (2, 5, 8), [5], None),  # selected out of range
        ((4, 3, 8), (2, 5, 8), [-1], None),
        ((4, 3, 8), (2, 5, 8), [1, 1], None),  # duplicate
        ((4, 3, 8), (2, 5, 8), [[0, 1]], None),  # not 1-D
        ((4, 3, 8), (2, 5, 8), [0.0], None),  # not integer
        ((4, 3, 8), (2, 5, 8), [0], [4]),  # head out of range
        ((4, 3, 8), (2, 5, 8), [0], []),  # no heads
        ((4, 3, 8), (2, 5, 8), [0], [2, 2]),
        ((4, 3, 8), (3, 5, 8), [0], None),  # 4 % 3 != 0
        ((4, 3, 8), (2, 5, 6), [0], None),  # head dim mismatch
        ((3, 8), (2, 5, 8), [0], None),  # queries not 3-D
        ((4, 3, 8), (5, 8), [0], None),  # keys not 3-D
    ],
)
def test_invalid_inputs_raise(q_shape, k_shape, selected, heads):
    queries, keys = torch.randn(*q_shape), torch.randn(*k_shape)
    with pytest.raises(ValueError):
        alignment_scores(queries, keys, selected, heads)
    if len(q_shape) == 3 and len(k_shape) == 3:
        with pytest.raises(ValueError):
            alignment_scores_reference(queries, keys, selected, heads)


def test_mean_unit_keys_validation():
    keys = torch.randn(2, 5, 8)
    with pytest.raises(ValueError):
        mean_unit_keys(keys, torch.tensor([0]), torch.tensor([0]), num_query_heads=3)
    with pytest.raises(ValueError):
        mean_unit_keys(keys, torch.tensor([0]), torch.tensor([4]), num_query_heads=4)
