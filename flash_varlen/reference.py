"""Plain PyTorch attention, the reference the kernels are tested against.

It runs on any device, one sequence at a time with dense math, so it is slow and simple on
purpose. ``compute_dtype`` chooses the precision of the whole computation: float32 (or float64)
for the reference itself, and the input dtype (float16 / bfloat16) for "the same PyTorch math in
the input dtype" whose error sets the kernels' tolerance (see design.md, Testing rules).

Conventions shared with the kernels:
- scores = softmax_scale * q @ k^T per sequence and per head; query head h uses kv head
  h // (nheads // nheads_k) (grouped-query attention);
- causal masks align to the bottom-right corner: query i sees key j iff
  j <= i + seqlen_k - seqlen_q;
- a query row that sees no key (empty key sequence, or fully masked) gets out = 0 and
  softmax_lse = -inf, never NaN;
- softmax_lse is the natural-log sum of exp(score) over visible keys, returned as float32.
"""

from __future__ import annotations

import math

import torch

LSE_DTYPE = torch.float32


def default_softmax_scale(head_dim: int) -> float:
    """The flash-attn default scale, 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def visible_keys(
    seqlen_q: int, seqlen_k: int, causal: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) matrix: True where query i may attend to key j."""
    if not causal:
        return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1)
    cols = torch.arange(seqlen_k, device=device).unsqueeze(0)
    return cols <= rows + (seqlen_k - seqlen_q)


def attention_one_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence.

    q: (seqlen_q, nheads, d); k: (seqlen_k, nheads_k, d); v: (seqlen_k, nheads_k, d_v).
    Returns out (seqlen_q, nheads, d_v) in ``compute_dtype`` and softmax_lse (nheads, seqlen_q)
    float32.
    """
    seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k, _ = k.shape
    if seqlen_q == 0 or seqlen_k == 0:
        return (
            torch.zeros(seqlen_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device),
            torch.full((nheads, seqlen_q), -math.inf, dtype=LSE_DTYPE, device=q.device),
        )

    group = nheads // nheads_k
    q_c = q.to(compute_dtype)
    k_c = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v_c = v.to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.einsum("qhd,khd->hqk", q_c, k_c) * softmax_scale  # (nheads, sq, sk)
    visible = visible_keys(seqlen_q, seqlen_k, causal, q.device)
    scores = scores.masked_fill(~visible, -math.inf)

    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; shifting by 0 instead keeps exp(-inf - 0) = 0, not NaN.
    shift = row_max.masked_fill(row_max == -math.inf, 0.0)
    weights = torch.exp(scores - shift)
    row_sum = weights.sum(dim=-1, keepdim=True)
    # row_sum >= 1 for any row with a visible key (its max contributes exp(0)); 0 otherwise.
    probs = weights / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    out = torch.einsum("hqk,khd->qhd", probs, v_c)
    lse = (shift + torch.log(row_sum)).squeeze(-1).to(LSE_DTYPE)  # log(0) = -inf when empty
    return out, lse


def attention_ref_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over packed variable-length sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) prefix sums (any integer dtype, any device; read on the host).
    softmax_scale defaults to 1 / sqrt(d).

    Returns:
        out: (total_q, nheads, d) in ``compute_dtype``;
        softmax_lse: (nheads, total_q) float32.
    """
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    total_q, nheads, _ = q.shape
    out = torch.zeros(total_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.full((nheads, total_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
    for batch in range(len(bounds_q) - 1):
        q_start, q_end = bounds_q[batch], bounds_q[batch + 1]
        k_start, k_end = bounds_k[batch], bounds_k[batch + 1]
        out[q_start:q_end], lse[:, q_start:q_end] = attention_one_sequence(
            q[q_start:q_end],
            k[k_start:k_end],
            v[k_start:k_end],
            scale,
            causal,
            compute_dtype,
        )
    return out, lse


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for the fixed-length layout.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
    softmax_scale defaults to 1 / sqrt(d).

    Returns:
        out: (batch, seqlen_q, nheads, d) in ``compute_dtype``;
        softmax_lse: (batch, nheads, seqlen_q) float32.
    """
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    batch, seqlen_q, nheads, _ = q.shape
    out = torch.zeros(batch, seqlen_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
    for b in range(batch):
        out[b], lse[b] = attention_one_sequence(q[b], k[b], v[b], scale, causal, compute_dtype)
    return out, lse
