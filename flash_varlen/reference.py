"""Plain PyTorch attention, the reference the kernels are tested against.

It runs on any device, one sequence at a time with dense math, so it is slow and simple on
purpose. ``compute_dtype`` chooses the precision of the whole computation: float32 (or float64)
for the reference itself, and the input dtype (float16 / bfloat16) for "the same PyTorch math in
the input dtype" whose error sets the kernels' tolerance (see design.md, Testing rules).
Everything is differentiable by autograd, so the same functions give the reference gradients.

Conventions shared with the kernels, per sequence and per query head h (which uses kv head
h // (nheads // nheads_k), grouped-query attention), with i the query index and j the key index
counted from 0 within the sequence:

1. scores = softmax_scale * q_i . k_j;
2. softcap > 0: scores = softcap * tanh(scores / softcap);
3. ALiBi: scores += -slope_h * |i + offset - j|, added after the softcap as flash-attn 2 does
   (its kernel caps first, then adds the bias inside the mask step, so the bias is never capped);
4. masking: key j is visible to query i iff
       j <= i + offset + right   (unless right == -1)   and
       j >= i + offset - left    (unless left == -1),
   with (left, right) = window_size, and causal=True forcing right = 0 while keeping left
   (flash-attn 2's host code does exactly this: ``if (is_causal) window_size_right = 0``);
   invisible scores become -inf;
5. probs = softmax over the visible keys; softmax_lse = log(sum(exp(scores))) over the visible
   keys, natural log, float32. softmax_lse never sees dropout. With ``learnable_sink`` (one
   logit per query head, gpt-oss's attention sinks) the sink joins every row's normalization
   as one more logit that has no value vector:
       probs_ij = exp(scores_ij) / (exp(sink_h) + sum_j exp(scores_ij)),
       softmax_lse_i = log(exp(sink_h) + sum_j exp(scores_ij)),
   so a row's probabilities sum to less than 1. The sink is neither scaled, capped nor biased;
6. dropout: probs are multiplied by keep_mask / (1 - dropout_p); out = probs @ v. Only the
   keys' probabilities are dropped (the sink has no value to drop).

``offset`` places the diagonal (the key a query is aligned with) and is set by causal_alignment:
"bottom_right" (flash-attn, the default) aligns the last query with the last key,
offset = seqlen_k - seqlen_q; "top_left" (PyTorch's ``is_causal``) aligns the first query with
the first key, offset = 0. The same diagonal is used by the causal mask, the window and the
ALiBi distance, so that the three stay consistent. Causal masks for seqlen_q = 3, seqlen_k = 5
(x = visible):

    bottom_right (j <= i + 2)       top_left (j <= i)
          key j 0 1 2 3 4                key j 0 1 2 3 4
    query 0     x x x . .          query 0     x . . . .
    query 1     x x x x .          query 1     x x . . .
    query 2     x x x x x          query 2     x x x . .

A query row that sees no key (an empty key sequence, a window or causal mask that hides every
key, e.g. causal with seqlen_q > seqlen_k, or a sequence whose used length is 0) gets out = 0 and
softmax_lse = -inf, never NaN, and autograd gives it zero gradients. With a sink the sink is the
row's only logit: out = 0 and softmax_lse = sink_h, whose gradient reaches the sink (the row's
dq stays 0). Query rows outside the used ranges (seqused_q) take part in no softmax, sink or
not: out = 0, softmax_lse = -inf.

The sink's gradient, which autograd computes here and the kernels compute in closed form, is
    dsink_h = -sum_i exp(sink_h - softmax_lse_i) * (rowsum(dout_i * out_i) - dlse_i)
over the rows i of head h (dlse: the gradient of softmax_lse), since d softmax_lse_i / d sink_h
is the sink's probability exp(sink_h - softmax_lse_i) and d out_i / d sink_h is minus that
probability times out_i.

Dropout keep masks follow flash-attn's ``S_dmask`` (the third value returned with
``return_attn_probs=True``): a (batch, nheads, seqlen_q_rounded, seqlen_k_rounded) tensor indexed
by positions within each sequence, where a dropped entry has its sign bit set. The reference
therefore takes a boolean keep mask of that padded form (sizes at least the sequence lengths;
extra rows and columns are ignored), and ``dropout_keep_mask`` turns an ``S_dmask`` into one.

``attention_ref_varlen_paged`` is the reference of ``flash_attn_varlen_func`` with a
``block_table`` (paged K/V): ``gather_paged_kv`` copies each sequence's keys and values out of
its pages into packed tensors, which ``attention_ref_varlen`` then attends to.

``attention_ref_kvcache`` is the reference of ``flash_attn_with_kvcache``: it appends the new
keys and values (rotated keys first) to copies of the caches, gathers each sequence's keys from
its cache entry or pages, rotates the queries, and runs ``attention_one_sequence``; its
docstring gives flash-attn 2's conventions for positions, cache_leftpad and cache_batch_idx.

Known differences from flash-attn 2 (the reference follows the documented formulas instead):
- with causal=True and ALiBi (and no window), flash-attn 2 adds +slope * j rather than
  -slope * |i + offset - j|; on visible keys the two differ by a per-row constant, so out is the
  same but flash-attn 2's softmax_lse is larger by slope * (i + offset);
- flash-attn 2 replaces a window side >= max_seqlen_k by -1 before running. For left that
  changes nothing, but when seqlen_q - 1 > right >= max_seqlen_k the formula hides the last
  keys from the first queries and flash-attn 2 shows them (flash-attn 3's threshold for right,
  max_seqlen_q - 1, changes nothing);
- flash-attn 2 refuses softcap together with dropout; the reference computes it;
- flash-attn 2 returns softmax_lse = +inf for rows that see no key (this project uses -inf).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from flash_varlen import contract
from flash_varlen.contract import UNBOUNDED_WINDOW_SIDE as UNBOUNDED
from flash_varlen.options import BOTTOM_RIGHT, CAUSAL_ALIGNMENTS, TOP_LEFT
from flash_varlen.padding import cu_seqlens_from_lengths
from flash_varlen.validation import check_page_numbers

LSE_DTYPE = getattr(torch, contract.LSE_DTYPE)

NO_WINDOW = (UNBOUNDED, UNBOUNDED)


def default_softmax_scale(head_dim: int) -> float:
    """The flash-attn default scale, 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def diagonal_offset(seqlen_q: int, seqlen_k: int, causal_alignment: str = BOTTOM_RIGHT) -> int:
    """The key index aligned with query 0: seqlen_k - seqlen_q (bottom_right) or 0 (top_left)."""
    _check_causal_alignment(causal_alignment)
    return seqlen_k - seqlen_q if causal_alignment == BOTTOM_RIGHT else 0


def effective_window(causal: bool, window_size: Sequence[int] = NO_WINDOW) -> tuple[int, int]:
    """(left, right) after causal is folded in: causal forces right = 0 and keeps left."""
    left, right = _check_window_size(window_size)
    return (left, 0) if causal else (left, right)


def visible_keys(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    device: torch.device | str | None = None,
    *,
    window_size: Sequence[int] = NO_WINDOW,
    causal_alignment: str = BOTTOM_RIGHT,
) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) matrix: True where query i may attend to key j.

    The rule is item 4 of the module docstring: key j is visible to query i iff it lies within
    [i + offset - left, i + offset + right], a side of -1 being unbounded, causal forcing
    right = 0, and offset given by ``causal_alignment``.
    """
    left, right = effective_window(causal, window_size)
    offset = diagonal_offset(seqlen_q, seqlen_k, causal_alignment)
    diagonal = torch.arange(seqlen_q, device=device).unsqueeze(1) + offset  # (seqlen_q, 1)
    cols = torch.arange(seqlen_k, device=device).unsqueeze(0)  # (1, seqlen_k)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right != UNBOUNDED:
        visible &= cols <= diagonal + right
    if left != UNBOUNDED:
        visible &= cols >= diagonal - left
    return visible


def alibi_bias(
    alibi_slopes: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    causal_alignment: str = BOTTOM_RIGHT,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ALiBi bias of one sequence, -slope_h * |i + offset - j|.

    alibi_slopes: (nheads,) float. Returns (nheads, seqlen_q, seqlen_k) in ``dtype`` on the
    slopes' device.
    """
    device = alibi_slopes.device
    offset = diagonal_offset(seqlen_q, seqlen_k, causal_alignment)
    diagonal = torch.arange(seqlen_q, device=device).unsqueeze(1) + offset  # (seqlen_q, 1)
    distance = (diagonal - torch.arange(seqlen_k, device=device)).abs()  # (seqlen_q, seqlen_k)
    return -alibi_slopes.to(dtype).view(-1, 1, 1) * distance.to(dtype)


def dropout_keep_mask(s_dmask: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask (same shape) from flash-attn's ``S_dmask``.

    A dropped entry is stored with its sign bit set. ``signbit`` rather than ``>= 0`` also
    reads a dropped probability that underflowed to -0.0 as dropped (its contribution is 0
    either way, but the mask then matches the kernel's decision exactly).
    """
    return ~torch.signbit(s_dmask)


def used_query_rows(
    cu_seqlens_q: torch.Tensor, seqused_q: torch.Tensor | None, total_q: int
) -> torch.Tensor:
    """Boolean (total_q,): True for the packed query rows that ``attention_ref_varlen`` computes.

    Rows of sequence b are cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1; with ``seqused_q`` only
    the first seqused_q[b] of them are used. Every other row (also rows past cu_seqlens_q[-1])
    gets out = 0 and softmax_lse = -inf from the reference, which a kernel need not match.
    Returned on the host (CPU).
    """
    bounds = cu_seqlens_q.tolist()
    used = torch.zeros(total_q, dtype=torch.bool)
    for b in range(len(bounds) - 1):
        length = bounds[b + 1] - bounds[b] if seqused_q is None else int(seqused_q[b])
        used[bounds[b] : bounds[b] + length] = True
    return used


def softmax_and_lse(
    scores: torch.Tensor, sink: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax and natural-log LSE of (..., seqlen_k) scores where -inf marks hidden keys.

    sink: None, or one extra logit per row, shape broadcastable to (..., 1) (e.g. (nheads, 1, 1)
    for (nheads, seqlen_q, seqlen_k) scores), in the scores' dtype. It joins the normalization
    (and the LSE) but gets no probability column, so a row's probs sum to less than 1.

    A row of only -inf (and no sink, or a sink of -inf) gives probs 0 and LSE -inf, with zero
    (not NaN) gradients whatever produced the -inf (masked_fill, or an additive -inf bias whose
    backward passes gradients through unchanged). A row of only -inf with a finite sink gives
    probs 0 and LSE = sink, whose gradient is then 1.
    Returns probs (same shape and dtype as scores) and lse (...) in the scores' dtype.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    sees_a_logit = row_max > -math.inf
    # Shifting by the row max only prevents overflow: probs and LSE do not depend on the shift,
    # so it is detached (its exact gradient is 0). A row without keys (or sink) shifts by 0
    # instead of -inf, so that exp(-inf - 0) = 0 rather than NaN.
    shift = torch.where(sees_a_logit, row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - shift)
    # row_sum >= 1 where a key or the sink is visible (the max contributes exp(0)); the
    # placeholder 1 for other rows keeps both the division and log's backward (1 / row_sum)
    # finite.
    row_sum = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        row_sum = row_sum + torch.exp(sink - shift)
    safe_sum = torch.where(sees_a_logit, row_sum, torch.ones_like(row_sum))
    probs = weights / safe_sum
    lse = torch.where(sees_a_logit, shift + torch.log(safe_sum), -math.inf)
    return probs, lse.squeeze(-1)


def attention_one_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    compute_dtype: torch.dtype,
    *,
    window_size: Sequence[int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    causal_alignment: str = BOTTOM_RIGHT,
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence (the steps of the module docstring).

    q: (seqlen_q, nheads, d); k: (seqlen_k, nheads_k, d); v: (seqlen_k, nheads_k, d_v), any
    float dtype. window_size: (left, right), -1 unbounded. softcap: 0 disables it.
    alibi_slopes: (nheads,) float, or None. dropout_p in [0, 1); dropout_mask: (nheads,
    seqlen_q, seqlen_k) bool keep mask, required when dropout_p > 0. causal_alignment:
    "bottom_right" or "top_left". learnable_sink: (nheads,) float sink logits (step 5), or
    None; cast to ``compute_dtype`` like the slopes, and differentiable.

    Returns out (seqlen_q, nheads, d_v) in ``compute_dtype`` and softmax_lse (nheads, seqlen_q)
    float32.
    """
    _check_softcap(softcap)
    _check_dropout(dropout_p, dropout_mask)
    seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k, _ = k.shape
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (nheads,):
        raise ValueError(
            f"alibi_slopes must have shape ({nheads},), got {tuple(alibi_slopes.shape)}"
        )
    _check_sink(learnable_sink, nheads)
    if dropout_mask is not None and tuple(dropout_mask.shape) != (nheads, seqlen_q, seqlen_k):
        raise ValueError(
            f"dropout_mask must have shape ({nheads}, {seqlen_q}, {seqlen_k}), "
            f"got {tuple(dropout_mask.shape)}"
        )
    # Built before the empty-sequence shortcut so that a bad window_size or causal_alignment is
    # reported whatever the lengths.
    visible = visible_keys(
        seqlen_q, seqlen_k, causal, q.device,
        window_size=window_size, causal_alignment=causal_alignment,
    )
    # (nheads, 1, 1): one logit per row of the (nheads, seqlen_q, seqlen_k) scores. .to(q.device)
    # as for the slopes; the cast keeps the graph, so the sink's gradient reaches the caller's
    # tensor in its own dtype.
    sink = (
        None
        if learnable_sink is None
        else learnable_sink.to(device=q.device, dtype=compute_dtype).view(nheads, 1, 1)
    )
    if seqlen_q == 0 or seqlen_k == 0:
        out = torch.zeros(seqlen_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device)
        if sink is None:
            lse = torch.full((nheads, seqlen_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
        else:  # the sink is every row's only logit
            lse = sink.view(nheads, 1).expand(nheads, seqlen_q).to(LSE_DTYPE)
        return out, lse

    group = nheads // nheads_k
    q_c = q.to(compute_dtype)
    k_c = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v_c = v.to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.einsum("qhd,khd->hqk", q_c, k_c) * softmax_scale  # (nheads, sq, sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        # .to(q.device): the reference runs anywhere, so slopes and masks may live elsewhere.
        slopes = alibi_slopes.to(q.device)
        bias = alibi_bias(slopes, seqlen_q, seqlen_k, causal_alignment, compute_dtype)
        scores = scores + bias
    # Masking comes last: -inf must survive the softcap (tanh(-inf) = -1) and the bias, and
    # masked_fill's backward is exactly 0 at masked entries whatever flows into it.
    scores = scores.masked_fill(~visible, -math.inf)

    probs, lse = softmax_and_lse(scores, sink)
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask.to(q.device), 0.0) / (1.0 - dropout_p)
    out = torch.einsum("hqk,khd->qhd", probs, v_c)
    return out, lse.to(LSE_DTYPE)


def attention_ref_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    *,
    window_size: Sequence[int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    causal_alignment: str = BOTTOM_RIGHT,
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over packed variable-length sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) prefix sums (any integer dtype, any device; read on the host).
    softmax_scale defaults to 1 / sqrt(d). window_size, softcap, dropout_p, causal_alignment
    and learnable_sink ((nheads,), shared by all sequences) as in ``attention_one_sequence``.
    alibi_slopes: (nheads,) or (batch, nheads) float, or None.
    dropout_mask: bool keep mask (batch, nheads, >= max used seqlen_q, >= max used seqlen_k),
        indexed by positions within each sequence (``dropout_keep_mask(S_dmask)`` fits).
    seqused_q, seqused_k: (batch,) integers, or None. Sequence b then consists of only the first
        seqused[b] rows of its slot cu_seqlens[b] .. cu_seqlens[b + 1]; lengths, the causal
        diagonal, the window and ALiBi all use these used lengths, as if the sequences had been
        truncated. Must not exceed the slot lengths.

    Returns:
        out: (total_q, nheads, d) in ``compute_dtype``;
        softmax_lse: (nheads, total_q) float32.
        Query rows outside every used range (``used_query_rows`` is False) have out = 0 and
        softmax_lse = -inf (also with a sink) and take part in no softmax.
    """
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    batch = len(bounds_q) - 1
    lengths_q = _used_lengths(bounds_q, seqused_q, "seqused_q")
    lengths_k = _used_lengths(bounds_k, seqused_k, "seqused_k")
    _check_batched_slopes(alibi_slopes, batch, q.shape[1])
    _check_sink(learnable_sink, q.shape[1])
    _check_padded_dropout_mask(dropout_mask, batch, q.shape[1], lengths_q, lengths_k)

    total_q, nheads, _ = q.shape
    out = torch.zeros(total_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.full((nheads, total_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
    for b in range(batch):
        q_rows = slice(bounds_q[b], bounds_q[b] + lengths_q[b])
        k_rows = slice(bounds_k[b], bounds_k[b] + lengths_k[b])
        out[q_rows], lse[:, q_rows] = attention_one_sequence(
            q[q_rows],
            k[k_rows],
            v[k_rows],
            scale,
            causal,
            compute_dtype,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=_slopes_of(alibi_slopes, b),
            dropout_p=dropout_p,
            dropout_mask=_mask_of(dropout_mask, b, lengths_q[b], lengths_k[b]),
            causal_alignment=causal_alignment,
            learnable_sink=learnable_sink,
        )
    return out, lse


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    *,
    window_size: Sequence[int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    causal_alignment: str = BOTTOM_RIGHT,
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for the fixed-length layout.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
    softmax_scale defaults to 1 / sqrt(d). window_size, softcap, dropout_p, causal_alignment
    and learnable_sink ((nheads,)) as in ``attention_one_sequence``.
    alibi_slopes: (nheads,) or (batch, nheads) float, or None.
    dropout_mask: bool keep mask (batch, nheads, >= seqlen_q, >= seqlen_k)
        (``dropout_keep_mask(S_dmask)`` fits).

    Returns:
        out: (batch, seqlen_q, nheads, d) in ``compute_dtype``;
        softmax_lse: (batch, nheads, seqlen_q) float32.
    """
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    _check_batched_slopes(alibi_slopes, batch, nheads)
    _check_sink(learnable_sink, nheads)
    _check_padded_dropout_mask(dropout_mask, batch, nheads, [seqlen_q] * batch, [seqlen_k] * batch)

    out = torch.zeros(batch, seqlen_q, nheads, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
    for b in range(batch):
        out[b], lse[b] = attention_one_sequence(
            q[b],
            k[b],
            v[b],
            scale,
            causal,
            compute_dtype,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=_slopes_of(alibi_slopes, b),
            dropout_p=dropout_p,
            dropout_mask=_mask_of(dropout_mask, b, seqlen_q, seqlen_k),
            causal_alignment=causal_alignment,
            learnable_sink=learnable_sink,
        )
    return out, lse


def _check_window_size(window_size: Sequence[int]) -> tuple[int, int]:
    if len(window_size) != 2 or any(int(side) < UNBOUNDED for side in window_size):
        raise ValueError(
            f"window_size must be (left, right) with each side >= 0 or -1 (unbounded), "
            f"got {tuple(window_size)}"
        )
    return int(window_size[0]), int(window_size[1])


def _check_causal_alignment(causal_alignment: str) -> None:
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(
            f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}"
        )


def _check_softcap(softcap: float) -> None:
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")


def _check_dropout(dropout_p: float, dropout_mask: torch.Tensor | None) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("dropout_p > 0 needs dropout_mask: the reference does not draw randomness")
    if dropout_mask is not None and dropout_mask.dtype != torch.bool:
        raise ValueError(f"dropout_mask must be bool (True = keep), got {dropout_mask.dtype}")


def _check_sink(learnable_sink: torch.Tensor | None, nheads: int) -> None:
    if learnable_sink is not None and tuple(learnable_sink.shape) != (nheads,):
        raise ValueError(
            f"learnable_sink must have shape ({nheads},), got {tuple(learnable_sink.shape)}"
        )


def _check_batched_slopes(alibi_slopes: torch.Tensor | None, batch: int, nheads: int) -> None:
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(
            f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
            f"got {tuple(alibi_slopes.shape)}"
        )


def _check_padded_dropout_mask(
    dropout_mask: torch.Tensor | None,
    batch: int,
    nheads: int,
    lengths_q: Sequence[int],
    lengths_k: Sequence[int],
) -> None:
    if dropout_mask is None:
        return
    min_q, min_k = max(lengths_q, default=0), max(lengths_k, default=0)
    shape = tuple(dropout_mask.shape)
    if len(shape) != 4 or shape[:2] != (batch, nheads) or shape[2] < min_q or shape[3] < min_k:
        raise ValueError(
            f"dropout_mask must have shape ({batch}, {nheads}, >= {min_q}, >= {min_k}), "
            f"got {shape}"
        )


def _used_lengths(bounds: list[int], seqused: torch.Tensor | None, name: str) -> list[int]:
    """Per-sequence lengths: the slot lengths from cu_seqlens, or ``seqused`` checked against
    them."""
    slots = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if seqused is None:
        return slots
    used = seqused.tolist()
    if len(used) != len(slots) or any(not 0 <= u <= s for u, s in zip(used, slots)):
        raise ValueError(
            f"{name} must have one entry per sequence, each in [0, slot length]; "
            f"got {used} for slot lengths {slots}"
        )
    return used


def _slopes_of(alibi_slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Sequence b's (nheads,) slopes from (nheads,) or (batch, nheads) slopes."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def _mask_of(
    dropout_mask: torch.Tensor | None, b: int, seqlen_q: int, seqlen_k: int
) -> torch.Tensor | None:
    """Sequence b's (nheads, seqlen_q, seqlen_k) keep mask from the padded batch form."""
    return None if dropout_mask is None else dropout_mask[b, :, :seqlen_q, :seqlen_k]


# --------------------------------------------------------------------------------------------
# Paged K/V (flash_attn_varlen_func with block_table)


def gather_paged_kv(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed keys and values that a paged call names (flash-attn 2.x's block_table).

    k_pages, v_pages: (num_pages, page_size, nheads_k, d) page pools; block_table:
    (batch, max_pages) integers; cu_seqlens_k: (batch + 1,) prefix sums that only count each
    sequence's keys: sequence b has L_b = cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys, or
    seqused_k[b] (at most that) when given. Key j < L_b of sequence b is row j % page_size of
    page block_table[b, j // page_size]. Values are read on the host; pages past a sequence's
    first ceil(L_b / page_size) are never read, and the page numbers of those must lie in
    [0, num_pages) (ValueError naming the entry otherwise).

    Returns:
        k, v: (sum of L_b, nheads_k, d), the pools' dtype and device, the sequences back to back;
        cu_seqlens: (batch + 1,) int32 prefix sums of the L_b, on cu_seqlens_k's device.
    """
    page_size = k_pages.shape[1]
    lengths = _used_lengths(cu_seqlens_k.tolist(), seqused_k, "seqused_k")
    check_page_numbers(block_table, k_pages, lengths, "k_pages")
    pages = block_table.to(device=k_pages.device, dtype=torch.long)
    # Position j of every sequence, back to back (an empty tensor first: a batch may be empty).
    positions = [torch.zeros(0, dtype=torch.long, device=k_pages.device)]
    positions += [torch.arange(length, device=k_pages.device) for length in lengths]
    page_index = torch.cat(
        [positions[0]] + [pages[b, p // page_size] for b, p in enumerate(positions[1:])]
    )
    slot_index = torch.cat(positions) % page_size
    cu_seqlens, _ = cu_seqlens_from_lengths(lengths, device=cu_seqlens_k.device)
    return k_pages[page_index, slot_index], v_pages[page_index, slot_index], cu_seqlens


def attention_ref_varlen_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    *,
    seqused_k: torch.Tensor | None = None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``flash_attn_varlen_func(q, k_pages, v_pages, ..., block_table=...)``.

    The keys of the call (``gather_paged_kv``: sequence b's L_b keys, L_b from cu_seqlens_k or
    seqused_k) gathered into packed k and v, then ``attention_ref_varlen`` over them with the
    other arguments unchanged (``options``: its keyword arguments, seqused_q among them).
    Returns (out, softmax_lse) as ``attention_ref_varlen`` does.
    """
    k, v, cu_seqlens = gather_paged_kv(k_pages, v_pages, block_table, cu_seqlens_k, seqused_k)
    return attention_ref_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens, softmax_scale, causal, compute_dtype, **options
    )


# --------------------------------------------------------------------------------------------
# KV cache (flash_attn_with_kvcache)


class KVCacheReference(NamedTuple):
    """What ``attention_ref_kvcache`` returns: out (batch, seqlen_q, nheads, d) in the compute
    dtype, softmax_lse (batch, nheads, seqlen_q) float32, and copies of the caches after the
    append (the caller's caches are not modified)."""

    out: torch.Tensor
    softmax_lse: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def rotary_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Sequence[int],
    interleaved: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotary embedding of x (seqlen, nheads, d), row i at position positions[i].

    cos, sin: (seqlen_ro, rotary_dim / 2). Each pair of dims (x0, x1) among the first rotary_dim
    ((2i, 2i + 1) when interleaved, else (i, i + rotary_dim / 2)) is multiplied by the rotation
    matrix [[cos, -sin], [sin, cos]] of its position and pair index; the other dims are kept.
    Returns (seqlen, nheads, d) in ``compute_dtype``.
    """
    half = cos.shape[1]
    rotary_dim = 2 * half
    index = torch.as_tensor(list(positions), dtype=torch.long, device=cos.device)
    c = cos[index].to(device=x.device, dtype=compute_dtype)  # (seqlen, half)
    s = sin[index].to(device=x.device, dtype=compute_dtype)
    rotation = torch.stack((torch.stack((c, -s), dim=-1), torch.stack((s, c), dim=-1)), dim=-2)
    head = x[..., :rotary_dim].to(compute_dtype)
    # (seqlen, nheads, half, 2): pair i of each head, as (x0, x1).
    pairs = head.unflatten(-1, (half, 2)) if interleaved else head.unflatten(-1, (2, half)).mT
    rotated = torch.einsum("sirc,shic->shir", rotation, pairs)
    rotated = rotated.flatten(-2) if interleaved else rotated.mT.flatten(-2)
    return torch.cat((rotated, x[..., rotary_dim:].to(compute_dtype)), dim=-1)


def attention_ref_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = NO_WINDOW,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    learnable_sink: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> KVCacheReference:
    """Reference of ``flash_attn_with_kvcache`` (same arguments; flash-attn 2.x's semantics).

    Sequence b owns cache entry cache_batch_idx[b] (default b) of a contiguous cache
    (batch_cache, seqlen_cache, nheads_k, d), or the pages block_table[b] of a paged cache
    (num_pages, page_size, nheads_k, d), read one after the other (capacity max_pages *
    page_size). With L = cache_seqlens[b] (the capacity when None) and n = seqlen_new:

    1. append: new keys k[b] rotated at positions L .. L + n - 1 (when rotary tables are
       given), then stored in the cache's dtype at those positions, with v[b];
    2. queries: q[b] rotated at positions L + i (causal or a window other than (-1, -1)), or
       all at L (otherwise);
    3. attention (``attention_one_sequence``) over the keys at positions cache_leftpad[b]
       (default 0) .. L + n - 1 of the cache after every sequence's append, as one sequence:
       causal bottom-right, window, softcap, ALiBi (alibi_slopes (nheads,) or (batch, nheads))
       and learnable_sink as for the other functions; no key: out 0, LSE -inf (or the sink).

    Rotary positions count from the start of the cache (cache_leftpad does not shift them),
    as in flash-attn 2's kernel. Values are read on the host; a position past the capacity
    raises ValueError.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    scale = default_softmax_scale(head_dim) if softmax_scale is None else softmax_scale
    _check_batched_slopes(alibi_slopes, batch, nheads)
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    seqlen_new = 0 if k is None else k.shape[1]
    lengths = _cache_lengths(cache_seqlens, batch, capacity, seqlen_new)
    entries = list(range(batch)) if cache_batch_idx is None else cache_batch_idx.tolist()
    starts = [0] * batch if cache_leftpad is None else cache_leftpad.tolist()
    pages = None if block_table is None else block_table.tolist()
    consecutive = effective_window(causal, window_size) != NO_WINDOW

    def cells(b: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of dims 0 and 1 of the cache cells holding sequence b's positions."""
        if pages is None:
            dim0, dim1 = [entries[b]] * len(positions), list(positions)
        else:
            page_size = k_cache.shape[1]
            dim0 = [pages[b][p // page_size] for p in positions]
            dim1 = [p % page_size for p in positions]
        return (
            torch.tensor(dim0, dtype=torch.long, device=k_cache.device),
            torch.tensor(dim1, dtype=torch.long, device=k_cache.device),
        )

    new_k_cache, new_v_cache = k_cache.clone(), v_cache.clone()
    if k is not None:
        for b in range(batch):
            written = range(lengths[b], lengths[b] + seqlen_new)
            new_keys = k[b]
            if rotary_cos is not None:
                new_keys = rotary_ref(
                    new_keys, rotary_cos, rotary_sin, written, rotary_interleaved, compute_dtype
                )
            dim0, dim1 = cells(b, written)
            new_k_cache[dim0, dim1] = new_keys.to(k_cache.dtype)
            new_v_cache[dim0, dim1] = v[b]

    out_shape = (batch, seqlen_q, nheads, v_cache.shape[-1])
    out = torch.zeros(out_shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), -math.inf, dtype=LSE_DTYPE, device=q.device)
    for b in range(batch):
        end = lengths[b] + seqlen_new
        dim0, dim1 = cells(b, range(starts[b], end))
        queries = q[b]
        if rotary_cos is not None:
            offsets = range(seqlen_q) if consecutive else [0] * seqlen_q
            positions = [lengths[b] + i for i in offsets]
            queries = rotary_ref(
                queries, rotary_cos, rotary_sin, positions, rotary_interleaved, compute_dtype
            )
        out[b], lse[b] = attention_one_sequence(
            queries,
            new_k_cache[dim0, dim1],
            new_v_cache[dim0, dim1],
            scale,
            causal,
            compute_dtype,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=_slopes_of(alibi_slopes, b),
            learnable_sink=learnable_sink,
        )
    return KVCacheReference(out, lse, new_k_cache, new_v_cache)


def _cache_lengths(
    cache_seqlens: int | torch.Tensor | None, batch: int, capacity: int, seqlen_new: int
) -> list[int]:
    """Each sequence's keys before the append, checked to leave room for the new ones."""
    if cache_seqlens is None:
        lengths = [capacity] * batch
    elif isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * batch
    else:
        lengths = [int(length) for length in cache_seqlens.tolist()]
    if any(not 0 <= length <= capacity - seqlen_new for length in lengths):
        raise ValueError(
            f"cache_seqlens must leave room for {seqlen_new} new keys in a capacity of "
            f"{capacity}, got {lengths}"
        )
    return lengths
