"""Correctness gate of the benchmark: no implementation is timed before its output is checked.

The reference is plain PyTorch attention, per sequence, in float64. The tolerance follows the
project's testing rule (design.md): twice (outputs) or three times (gradients) the error of the
same PyTorch math run in the input dtype, plus a small floor, so it scales with the data instead
of hiding behind a loose constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Query rows per reference step: bounds the score block to (nheads, rows, seqlen) elements.
QUERY_CHUNK_ROWS = 1024
LOWP_ERROR_FACTOR = 2.0
GRAD_LOWP_ERROR_FACTOR = 3.0
TOLERANCE_FLOOR = 1e-3
GRAD_NAMES = ("dq", "dk", "dv")


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: tuple[int, ...],
    causal: bool,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """softmax(scale * q k^T) v per sequence, all of it computed in `compute_dtype`.

    q: (total, nheads_q, d); k, v: (total, nheads_kv, d), packed with seqlen_q == seqlen_k given
    by `lengths`; query head h reads kv head h // (nheads_q // nheads_kv). Causal: query i sees
    keys 0..i of its sequence. Returns (total, nheads_q, d) in float32.
    """
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start = 0
    for length in lengths:
        end = start + length
        q_seq = _heads_first(q[start:end], compute_dtype, 1)
        k_seq = _heads_first(k[start:end], compute_dtype, group)
        v_seq = _heads_first(v[start:end], compute_dtype, group)
        for rows in _row_chunks(length):
            probs = _probs(q_seq[:, rows], k_seq, rows, causal, scale)
            out[start + rows.start : start + rows.stop] = (probs @ v_seq).transpose(0, 1).float()
        start = end
    return out


def _heads_first(x: torch.Tensor, compute_dtype: torch.dtype, repeat: int) -> torch.Tensor:
    """(s, nheads, d) -> (nheads * repeat, s, d) in `compute_dtype`; head h becomes heads
    h * repeat .. h * repeat + repeat - 1 (the kv head of every query head in its group)."""
    return x.to(compute_dtype).transpose(0, 1).repeat_interleave(repeat, dim=0)


def _row_chunks(length: int) -> list[slice]:
    """Query rows of a sequence of `length` tokens, QUERY_CHUNK_ROWS at a time."""
    return [
        slice(row, min(row + QUERY_CHUNK_ROWS, length))
        for row in range(0, length, QUERY_CHUNK_ROWS)
    ]


def _probs(
    q_rows: torch.Tensor, k_seq: torch.Tensor, rows: slice, causal: bool, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T) of the query rows `rows` of one sequence.

    q_rows: (nheads_q, rows, d), the rows `rows` of the sequence; k_seq: (nheads_q, s, d), kv
    heads already repeated per query head. Causal: query i sees keys 0..i. Returns
    (nheads_q, rows, s) in the inputs' dtype.
    """
    scores = (q_rows @ k_seq.transpose(1, 2)) * scale  # (nheads_q, rows, s)
    if causal:
        key_index = torch.arange(k_seq.shape[1], device=k_seq.device)
        hidden = key_index[None, :] > key_index[rows, None]  # (rows, s)
        scores = scores.masked_fill(hidden, -math.inf)
    return torch.softmax(scores, dim=-1)


def reference_attention_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lengths: tuple[int, ...],
    causal: bool,
    scale: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output and its gradients for the output gradient `dout`, per sequence.

    Same inputs and conventions as `reference_attention`; dout: (total, nheads_q, d). Autograd
    through a whole sequence would keep every chunk's scores alive (a 32 x 4k x 4k float64 block
    is 4 GiB), so the gradients are written out in closed form, one chunk of query rows at a
    time: P = softmax(S), S = scale * Q K^T; dV = P^T dO; dP = dO V^T;
    dS = P * (dP - rowsum(dO * O)); dQ = scale * dS K; dK = scale * dS^T Q. Every product runs
    in `compute_dtype`; dK and dV are summed over row chunks and over the query heads of a kv
    group in at least float32 (as a single matrix product would accumulate), then rounded to
    `compute_dtype` once. Returns out, dq: (total, nheads_q, d) and dk, dv: (total, nheads_kv, d),
    all float32.
    """
    nheads_kv = k.shape[1]
    group = q.shape[1] // nheads_kv
    sum_dtype = torch.promote_types(compute_dtype, torch.float32)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    start = 0
    for length in lengths:
        end = start + length
        q_seq = _heads_first(q[start:end], compute_dtype, 1)  # (nheads_q, s, d)
        k_seq = _heads_first(k[start:end], compute_dtype, group)  # (nheads_q, s, d)
        v_seq = _heads_first(v[start:end], compute_dtype, group)
        dout_seq = _heads_first(dout[start:end], compute_dtype, 1)
        dk_sum = torch.zeros(k_seq.shape, dtype=sum_dtype, device=q.device)  # (nheads_q, s, d)
        dv_sum = torch.zeros(v_seq.shape, dtype=sum_dtype, device=q.device)
        for rows in _row_chunks(length):
            q_rows, dout_rows = q_seq[:, rows], dout_seq[:, rows]  # (nheads_q, rows, d)
            probs = _probs(q_rows, k_seq, rows, causal, scale)  # (nheads_q, rows, s)
            out_rows = probs @ v_seq  # (nheads_q, rows, d)
            dprobs = dout_rows @ v_seq.transpose(1, 2)  # (nheads_q, rows, s)
            delta = (dout_rows * out_rows).sum(dim=-1, keepdim=True)  # (nheads_q, rows, 1)
            dscores = probs * (dprobs - delta)
            del dprobs
            packed_rows = slice(start + rows.start, start + rows.stop)
            out[packed_rows] = out_rows.transpose(0, 1).float()
            dq[packed_rows] = ((dscores @ k_seq) * scale).transpose(0, 1).float()
            dk_sum += (dscores.transpose(1, 2) @ q_rows) * scale
            dv_sum += probs.transpose(1, 2) @ dout_rows
        dk[start:end] = _sum_group(dk_sum, nheads_kv, compute_dtype)
        dv[start:end] = _sum_group(dv_sum, nheads_kv, compute_dtype)
        start = end
    return out, dq, dk, dv


def _sum_group(per_query_head: torch.Tensor, nheads_kv: int,
               compute_dtype: torch.dtype) -> torch.Tensor:
    """(nheads_q, s, d) -> (s, nheads_kv, d) float32: the sum over the query heads of each kv
    group (the inverse of `_heads_first`'s repeat), rounded to `compute_dtype` once."""
    nheads_q, length, head_dim = per_query_head.shape
    grouped = per_query_head.view(nheads_kv, nheads_q // nheads_kv, length, head_dim)
    return grouped.sum(dim=1).to(compute_dtype).transpose(0, 1).float()


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over all elements; NaN if `actual` holds a NaN anywhere."""
    return (actual.float() - expected.float()).abs().max().item()


@dataclass(frozen=True)
class Reference:
    """The float64 answer of one benchmark row and the error allowed against it."""

    out: torch.Tensor  # (total, nheads_q, d), float32
    lowp_max_abs_err: float  # error of the PyTorch math in the input dtype
    tolerance: float

    def passes(self, out: torch.Tensor) -> tuple[bool, float]:
        """Checks `out` (total, nheads_q, d) against the reference: (passed, max abs error).

        A NaN anywhere (an element never written) fails, since NaN <= tolerance is False.
        """
        err = max_abs_diff(out, self.out)
        return err <= self.tolerance, err


def build_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: tuple[int, ...],
    causal: bool,
    scale: float,
) -> Reference:
    """Reference output in float64 and the tolerance derived from the input-dtype error."""
    exact = reference_attention(q, k, v, lengths, causal, scale, torch.float64)
    lowp = reference_attention(q, k, v, lengths, causal, scale, q.dtype)
    lowp_err = max_abs_diff(lowp, exact)
    del lowp
    return Reference(exact, lowp_err, LOWP_ERROR_FACTOR * lowp_err + TOLERANCE_FLOOR)


@dataclass(frozen=True)
class GradReference:
    """The float64 gradients of one benchmark row and the errors allowed against them.

    Every tuple is ordered as GRAD_NAMES (dq, dk, dv).
    """

    grads: tuple[torch.Tensor, ...]  # dq (total, nheads_q, d), dk, dv (total, nheads_kv, d); fp32
    lowp_max_abs_errs: tuple[float, ...]  # errors of the PyTorch math in the input dtype
    tolerances: tuple[float, ...]

    def check(self, grads: tuple[torch.Tensor, ...]) -> dict[str, tuple[bool, float]]:
        """Checks dq, dk, dv in the packed layout: name -> (passed, max abs error).

        A NaN anywhere (an element never written) fails, since NaN <= tolerance is False.
        """
        results = {}
        for name, actual, expected, tolerance in zip(GRAD_NAMES, grads, self.grads,
                                                     self.tolerances):
            err = max_abs_diff(actual, expected)
            results[name] = (err <= tolerance, err)
        return results


def build_references(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lengths: tuple[int, ...],
    causal: bool,
    scale: float,
) -> tuple[Reference, GradReference]:
    """Reference output and gradients (for the output gradient `dout`) in float64, with the
    tolerances derived from the input-dtype errors: one pass per precision gives both."""
    with torch.no_grad():
        exact = reference_attention_grads(q, k, v, dout, lengths, causal, scale, torch.float64)
        lowp = reference_attention_grads(q, k, v, dout, lengths, causal, scale, q.dtype)
        errs = [max_abs_diff(low, high) for low, high in zip(lowp, exact)]
        del lowp
    forward = Reference(exact[0], errs[0], LOWP_ERROR_FACTOR * errs[0] + TOLERANCE_FLOOR)
    backward = GradReference(
        grads=exact[1:],
        lowp_max_abs_errs=tuple(errs[1:]),
        tolerances=tuple(GRAD_LOWP_ERROR_FACTOR * err + TOLERANCE_FLOOR for err in errs[1:]),
    )
    return forward, backward


def poison_allocator(*likes: torch.Tensor) -> None:
    """Leaves NaN-filled free blocks the sizes of `likes` in the CUDA caching allocator.

    The next call allocates its outputs of those sizes from these blocks, so elements a kernel
    forgets to write read as NaN and fail the check, instead of showing a previous run's values.
    With several blocks this is best effort: a call's temporaries may take a block first.
    """
    torch.cuda.empty_cache()
    poison = [torch.full_like(like, math.nan) for like in likes]
    del poison
