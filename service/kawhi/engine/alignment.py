"""Spatial alignment score of each response token (docs/method.md §4, eq. 12-13).

    s_{t,v}^h = cos(q_t^h, k_v^h)
    alpha_t   = mean over h in heads, v in selected of s_{t,v}^h        in [-1, 1]

The mean of cosines over v is ``q_t/|q_t|`` dotted with the mean unit key
``mean_v k_v/|k_v|``, so ``alignment_scores`` forms that mean once per head
(O(h N_s d)) and then costs O(h T d); it never builds the (T x N_s) cosine matrix.
``alignment_scores_reference`` builds it explicitly and exists only to test against.

Conventions: all computation is in float32 whatever the input dtype (bf16 states
from the model included) and the result is float32. A vector's norm is clamped to
at least ``NORM_EPS`` before dividing, as ``torch.nn.functional.normalize`` does, so a
zero query or key contributes a cosine of 0 instead of NaN. GQA: query head h reads
kv head ``h // (H // H_kv)``, as Hugging Face's ``repeat_kv`` lays heads out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NORM_EPS", "alignment_scores", "alignment_scores_reference", "mean_unit_keys", "repeat_kv",
    "visual_token_alignment",
]

NORM_EPS = 1e-12

IndexLike = Tensor | Sequence[int]


def repeat_kv(keys: Tensor, n_rep: int) -> Tensor:
    """(H_kv, N, d) -> (H_kv * n_rep, N, d); output head h is input head h // n_rep."""
    if keys.dim() != 3:
        raise ValueError(f"keys must be (H_kv, N, d), got shape {tuple(keys.shape)}")
    if not (isinstance(n_rep, int) and n_rep >= 1):
        raise ValueError(f"n_rep must be a positive int, got {n_rep!r}")
    if n_rep == 1:
        return keys
    h_kv, n, d = keys.shape
    return keys[:, None].expand(h_kv, n_rep, n, d).reshape(h_kv * n_rep, n, d)


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _indices(idx: IndexLike, name: str, size: int, device: torch.device) -> Tensor:
    """A validated 1-D int64 index tensor: non-empty, distinct, in [0, size)."""
    t = torch.as_tensor(idx, device=device)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.dim() != 1 or t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{lo}, {hi}]")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} contains duplicates")
    return t.long()


def _check_qk(queries: Tensor, keys: Tensor) -> int:
    """Validate shapes; return n_rep = H // H_kv."""
    if queries.dim() != 3:
        raise ValueError(f"queries must be (H, T, d), got shape {tuple(queries.shape)}")
    if keys.dim() != 3:
        raise ValueError(f"keys must be (H_kv, N, d), got shape {tuple(keys.shape)}")
    h, _, d = queries.shape
    h_kv, _, d_k = keys.shape
    if d != d_k:
        raise ValueError(f"queries have head dim {d} but keys {d_k}")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({h_kv})")
    return h // h_kv


def mean_unit_keys(keys: Tensor, selected: IndexLike, heads: IndexLike, num_query_heads: int) -> Tensor:
    """(h, d) float32: for each query head in ``heads``, the mean over ``selected``
    tokens of k/|k| of the kv head it reads.

    keys (H_kv, N, d); selected (N_s,) token indices into N; heads (h,) query-head
    indices into ``num_query_heads``. Only the needed kv heads and tokens are
    gathered and cast; nothing is repeated.
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be (H_kv, N, d), got shape {tuple(keys.shape)}")
    h_kv, n, _ = keys.shape
    if h_kv == 0 or num_query_heads % h_kv != 0:
        raise ValueError(f"query heads ({num_query_heads}) must be a multiple of key heads ({h_kv})")
    sel = _indices(selected, "selected", n, keys.device)
    hs = _indices(heads, "heads", num_query_heads, keys.device)
    kv_heads, inverse = torch.unique(hs // (num_query_heads // h_kv), return_inverse=True)
    k = keys.index_select(0, kv_heads).index_select(1, sel).float()  # (u, N_s, d)
    return _unit(k).mean(dim=1)[inverse]


def alignment_scores(
    queries: Tensor, keys: Tensor, selected: IndexLike, heads: IndexLike | None = None
) -> Tensor:
    """alpha: (T,) float32 mean cosine of each response token with the selected visual tokens.

    queries  (H, T, d): response tokens' queries (after RoPE for the paper's setting).
    keys     (H_kv, N, d): keys of the visual tokens (or of the whole sequence), H % H_kv == 0.
    selected (N_s,): indices into N of the selected visual tokens; non-empty, distinct.
    heads    (h,): query heads to average over (distinct, in [0, H)); None = all H.

    Key-key similarity (the paper's ablation): pass the response tokens' *keys*
    repeated to query heads, ``repeat_kv(response_keys, H // H_kv)``, as ``queries``.
    Raises ValueError on bad shapes or indices.
    """
    _check_qk(queries, keys)
    num_heads = queries.shape[0]
    hs = (
        torch.arange(num_heads, device=keys.device)
        if heads is None
        else _indices(heads, "heads", num_heads, keys.device)
    )
    mean_keys = mean_unit_keys(keys, selected, hs, num_heads)  # (h, d)
    q = _unit(queries.index_select(0, hs.to(queries.device)).float())  # (h, T, d)
    return torch.einsum("htd,hd->t", q, mean_keys.to(q.device)) / hs.numel()


def visual_token_alignment(queries: Tensor, keys: Tensor, heads: IndexLike | None = None) -> Tensor:
    """(N,) float32: each visual token's mean cosine with a response's tokens, over ``heads``.

    The transpose of ``alignment_scores``, for the explain view's heat map:
    ``a_v = mean over h in heads, t in [0, T) of cos(q_t^h, k_v^h)``. Averaging ``a_v``
    over the selected tokens gives the mean of alpha_t over the response. Costs
    O(h (T + N) d): the mean unit query per head, dotted with every unit key.
    queries (H, T, d) with T >= 1; keys (H_kv, N, d); heads as in ``alignment_scores``.
    """
    n_rep = _check_qk(queries, keys)
    if queries.shape[1] == 0:
        raise ValueError("queries hold no tokens: an empty response has no alignment map")
    num_heads = queries.shape[0]
    hs = (
        torch.arange(num_heads, device=keys.device)
        if heads is None
        else _indices(heads, "heads", num_heads, keys.device)
    )
    mean_query = _unit(queries.index_select(0, hs.to(queries.device)).float()).mean(dim=1)  # (h, d)
    k = _unit(keys.index_select(0, hs // n_rep).float())  # (h, N, d)
    return torch.einsum("hnd,hd->n", k, mean_query.to(k.device)) / hs.numel()


def alignment_scores_reference(
    queries: Tensor, keys: Tensor, selected: IndexLike, heads: IndexLike | None = None
) -> Tensor:
    """The naive version of ``alignment_scores``, for tests only: repeats every kv
    head, builds the full (h, T, N_s) cosine matrix in float64 and averages it.
    Returns (T,) float64."""
    n_rep = _check_qk(queries, keys)
    num_heads, _, _ = queries.shape
    hs = torch.arange(num_heads) if heads is None else _indices(heads, "heads", num_heads, queries.device)
    sel = _indices(selected, "selected", keys.shape[1], keys.device)
    k = repeat_kv(keys, n_rep)[hs][:, sel].double()  # (h, N_s, d)
    q = queries[hs].double()  # (h, T, d)
    cos = _unit(q) @ _unit(k).transpose(1, 2)  # (h, T, N_s)
    return cos.mean(dim=(0, 2))
