"""Correctness gate of the benchmark: no implementation is timed before its output is checked.

The reference is plain PyTorch attention, per sequence, in float64. The tolerance follows the
project's testing rule (design.md): twice the error of the same PyTorch math run in the input
dtype, plus a small floor, so it scales with the data instead of hiding behind a loose constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Query rows per reference step: bounds the score block to (nheads, rows, seqlen) elements.
QUERY_CHUNK_ROWS = 1024
LOWP_ERROR_FACTOR = 2.0
TOLERANCE_FLOOR = 1e-3


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
        q_seq = q[start:end].to(compute_dtype).transpose(0, 1)  # (nheads_q, s, d)
        k_seq = k[start:end].to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        v_seq = v[start:end].to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        key_index = torch.arange(length, device=q.device)
        for row in range(0, length, QUERY_CHUNK_ROWS):
            rows = slice(row, min(row + QUERY_CHUNK_ROWS, length))
            scores = (q_seq[:, rows] @ k_seq.transpose(1, 2)) * scale  # (nheads_q, rows, s)
            if causal:
                hidden = key_index[None, :] > key_index[rows, None]  # (rows, s)
                scores = scores.masked_fill(hidden, -math.inf)
            probs = torch.softmax(scores, dim=-1)
            out[start + rows.start : start + rows.stop] = (probs @ v_seq).transpose(0, 1).float()
        start = end
    return out


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


def poison_allocator(like: torch.Tensor) -> None:
    """Leaves a NaN-filled free block the size of `like` in the CUDA caching allocator.

    The next call allocates its output of that size from this block, so elements a kernel
    forgets to write read as NaN and fail the check, instead of showing a previous run's values.
    """
    torch.cuda.empty_cache()
    poison = torch.full_like(like, math.nan)
    del poison
