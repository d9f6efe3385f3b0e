"""Public attention functions, call-compatible with flash-attn 2.x.

Argument names, order, defaults and returns follow ``flash_attn.flash_attn_interface``, so code
written for flash-attn works by changing the import. Each function validates its inputs first
(``validation.py``: clear errors, no device read) and then calls one registered op (``ops.py``):
``flash_varlen::varlen_fwd`` for the packed variable-length layout, ``flash_varlen::fwd`` for
the fixed-length layout. Gradients flow through those ops' registered backward
(``flash_varlen::varlen_bwd`` / ``flash_varlen::bwd``). The packed variants (``qkv``, ``kv``)
pass views, never copies, so autograd assembles the gradient of a packed input into one tensor
of the packed shape. Options flash-attn 2 does not have are keyword-only: ``causal_alignment``
(all six functions) and ``seqused_q`` / ``seqused_k`` (the varlen functions with separate q).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from flash_varlen import ops, validation
from flash_varlen.reference import BOTTOM_RIGHT
from flash_varlen.validation import ArgNames, Options

AttentionResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
_F = TypeVar("_F", bound=Callable[..., AttentionResult])

NUM_QKV, NUM_KV = 3, 2  # sizes of the packing dim: qkv = (q, k, v), kv = (k, v)

_CAUSAL_DOC = """\
    Causal masking (``causal=True``) aligns the diagonal to the bottom-right corner of each
    sequence's attention matrix by default (``causal_alignment="bottom_right"``, as flash-attn,
    which is what a KV cache needs): query i sees key j iff ``j <= i + seqlen_k - seqlen_q``.
    ``causal_alignment="top_left"`` (the meaning of PyTorch's ``is_causal``) aligns it to the
    top-left corner: query i sees key j iff ``j <= i``. The two agree when seqlen_q ==
    seqlen_k. For seqlen_q = 2, seqlen_k = 5 (1 = attends, 0 = masked out)::

        bottom_right    top_left
        1 1 1 1 0       1 0 0 0 0
        1 1 1 1 1       1 1 0 0 0

    For seqlen_q = 5, seqlen_k = 2::

        bottom_right    top_left
        0 0             1 0
        0 0             1 1
        0 0             1 1
        1 0             1 1
        1 1             1 1

    (The first three bottom-right rows see no key: out = 0, softmax_lse = -inf.) The same
    diagonal, at key ``i + offset`` for query i with offset = seqlen_k - seqlen_q (bottom_right)
    or 0 (top_left), places the sliding window and the ALiBi distance; with seqused_q /
    seqused_k, seqlen means the used length.

    Any query row that sees no key (fully masked, or an empty key sequence) gets out = 0,
    softmax_lse = -inf and zero gradients; nothing is ever NaN. Both out and softmax_lse are
    differentiable w.r.t. q, k and v. Query head h attends with key/value head
    h // (nheads // nheads_k) (multi-query / grouped-query attention).

    Tensors must be float16 or bfloat16 on one CUDA device, contiguous in the last dim, with
    every other stride and the storage offset a multiple of 8 elements (views such as
    ``qkv[:, 0]`` qualify and are never copied); headdim is a multiple of 8, at most 256."""

_OPTIONS_DOC = """\
        dropout_p: float in [0, 1). Attention dropout: each probability is dropped with
            probability dropout_p and the kept ones are scaled by 1 / (1 - dropout_p);
            softmax_lse never sees dropout. The mask comes from a counter-based RNG (Philox)
            whose seed and offset are drawn from PyTorch's default CUDA generator, so
            torch.manual_seed makes runs reproducible and CUDA-graph capture is safe; the
            backward regenerates the same mask instead of storing it. Pass 0.0 for evaluation.
        softmax_scale: float > 0. Scale of q @ k^T before the softmax. Default
            1 / sqrt(headdim).
        causal: bool. Causal mask, aligned as causal_alignment says (drawn above).
        window_size: (left, right), ints, each -1 (unbounded) or >= 0. Sliding window: query i
            sees key j iff ``i + offset - left <= j <= i + offset + right`` (offset as drawn
            above). causal=True forces right = 0 and keeps left; a causal window of w keys
            (Mistral's) is (w - 1, 0), and (-1, 0) is the causal mask. Key blocks wholly
            outside the window are skipped, so the cost scales with the window.
        softcap: float >= 0, finite. 0 disables it; otherwise each score s (after
            softmax_scale) becomes ``softcap * tanh(s / softcap)``, before ALiBi and masking
            (Gemma 2's logit soft-capping).
        alibi_slopes: None, or float32 of shape (nheads,) or (batch, nheads) (one row per
            sequence) on q's device. Adds ``-slope[h] * |i + offset - j|`` to the scores of
            head h, after softcap. Not differentiable: no gradient reaches the slopes.
        deterministic: bool. Whether the backward pass is bitwise reproducible run to run.
            The forward pass and the gradients of k and v always are (fixed summation order,
            no atomics). The gradient of q is accumulated with fp32 atomic adds across key
            blocks, so with False it may differ in the last bits between runs; True orders
            those adds and makes it reproducible too, at some speed cost. The ordered path is
            also taken while ``torch.use_deterministic_algorithms(True)`` is on, as for
            PyTorch's own ops. Dropout masks are reproducible either way.
        return_attn_probs: bool. Also return softmax_lse and S_dmask (see Returns)."""

_ALIGNMENT_DOC = """\
        causal_alignment: "bottom_right" (default, flash-attn) or "top_left" (PyTorch's
            is_causal), keyword-only. Where the diagonal lies (drawn above) for causal, the
            window and ALiBi."""

_SEQUSED_DOC = """\
        seqused_q: None, or (batch,) int32 on q's device, keyword-only. Sequence b uses only
            the first seqused_q[b] query rows of its slot (cu_seqlens_q[b] to
            cu_seqlens_q[b + 1]); the rest of the slot is neither read nor written: out and
            softmax_lse keep whatever their allocation held there, and the gradients of q there
            are 0. Each entry must lie in [0, slot length] (FLASH_VARLEN_DEBUG=1 checks it).
        seqused_k: None, or (batch,) int32 on q's device, keyword-only. Sequence b uses only
            the first seqused_k[b] keys and values of its slot (e.g. a preallocated cache filled
            partway); the rest is never read, and the gradients of k and v there are 0. Same
            bounds. Everything else (the causal diagonal, the window, ALiBi) uses the used
            lengths, as if the sequences had been truncated to them."""

_S_DMASK_DOC = """\
        S_dmask is None without dropout (dropout_p = 0). With dropout it is the dropout
        pattern, for testing only: (batch, nheads, max_seqlen_q rounded up to a multiple of
        128, max_seqlen_k rounded up likewise) in q's dtype (max_seqlen = seqlen for the
        fixed-length functions), indexed by positions within each sequence. A dropped entry has
        its sign bit set (``flash_varlen.reference.dropout_keep_mask(S_dmask)`` gives the keep
        mask); magnitudes are un-normalized probabilities, and entries outside a sequence's
        used rows and columns are 0. It costs O(batch * nheads * seqlen^2) memory."""

_RAISES_DOC = """\
    Raises:
        TypeError, ValueError: invalid inputs; the message names the argument and the rule.
        NotImplementedError: an unsupported option, or a (dtype, headdim) this build lacks;
            also from backward() when this build lacks the backward kernel for the (dtype,
            headdim, causal) (a narrowed build; the message names the FLASH_VARLEN_*
            variables to rebuild with).
        RuntimeError: the compiled extension is not available (the message says why)."""


def _documented(func: _F) -> _F:
    """Fills the shared sections into the docstring (kept in one place, shown by help())."""
    if func.__doc__:
        func.__doc__ = func.__doc__.format(
            causal=_CAUSAL_DOC,
            options=_OPTIONS_DOC,
            alignment=_ALIGNMENT_DOC,
            seqused=_SEQUSED_DOC,
            s_dmask=_S_DMASK_DOC,
            raises=_RAISES_DOC,
        )
    return func


def _result(
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    s_dmask: torch.Tensor,
    options: Options,
    return_attn_probs: bool,
) -> AttentionResult:
    if not return_attn_probs:
        return out
    # Without dropout there is no pattern to return (the op's s_dmask is then empty): None, as
    # flash-attn.
    return out, softmax_lse, (s_dmask if options.dropout_p > 0 else None)


def _varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None,
    options: Options,
    alibi_slopes: torch.Tensor | None,
    seqused_q: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    return_attn_probs: bool,
    names: ArgNames,
) -> AttentionResult:
    validation.check_varlen_inputs(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        names,
        alibi_slopes=alibi_slopes,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
    )
    if validation.debug_enabled():
        validation.check_varlen_values(
            q,
            k,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            names,
            seqused_q=seqused_q,
            seqused_k=seqused_k,
        )
    scale = validation.resolve_softmax_scale(softmax_scale, q.shape[-1])
    out, softmax_lse, s_dmask, _ = ops.varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        options.causal,
        options.deterministic,
        alibi_slopes=alibi_slopes,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        return_dropout_mask=return_attn_probs,
        **options.variant_kwargs(),
    )
    return _result(out, softmax_lse, s_dmask, options, return_attn_probs)


def _fixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    options: Options,
    alibi_slopes: torch.Tensor | None,
    return_attn_probs: bool,
    names: ArgNames,
) -> AttentionResult:
    validation.check_fixed_inputs(q, k, v, names, alibi_slopes=alibi_slopes)
    scale = validation.resolve_softmax_scale(softmax_scale, q.shape[-1])
    out, softmax_lse, s_dmask, _ = ops.fwd(
        q,
        k,
        v,
        scale,
        options.causal,
        options.deterministic,
        alibi_slopes=alibi_slopes,
        return_dropout_mask=return_attn_probs,
        **options.variant_kwargs(),
    )
    return _result(out, softmax_lse, s_dmask, options, return_attn_probs)


@_documented
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> AttentionResult:
    """Exact attention over packed variable-length sequences.

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v; sequences are stored back to back and no
    padding is ever computed. A sequence may be empty (two equal cu_seqlens entries).

{causal}

    Arguments:
        q: (total_q, nheads, headdim).
        k: (total_k, nheads_k, headdim); nheads must be a multiple of nheads_k.
        v: (total_k, nheads_k, headdim).
        cu_seqlens_q: (batch + 1,) int32, on q's device. Prefix sums of the query lengths,
            starting at 0 and ending at total_q.
        cu_seqlens_k: (batch + 1,) int32, on q's device. Prefix sums of the key lengths.
        max_seqlen_q: int. Longest query sequence. A Python int, so nothing reads the device;
            an overestimate is safe, an underestimate is an error (FLASH_VARLEN_DEBUG=1
            detects it).
        max_seqlen_k: int. Longest key sequence, same rules.
{options}
        block_table: Must be None: a paged KV cache is not supported yet.
{alignment}
{seqused}

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total_q) float32, the natural log of sum_j exp(score_ij) over the keys row
        i sees.
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
        block_table=block_table,
    )
    return _varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        options,
        alibi_slopes,
        seqused_q,
        seqused_k,
        return_attn_probs,
        ArgNames(),
    )


@_documented
def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
) -> AttentionResult:
    """Packed variable-length self-attention with q, k, v stacked in one tensor.

    Same as ``flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
    max_seqlen, max_seqlen, ...)``; the three are views of qkv, not copies, and the gradient
    of qkv is one tensor of its shape. For MQA/GQA use ``flash_attn_varlen_kvpacked_func`` or
    ``flash_attn_varlen_func``.

{causal}

    Arguments:
        qkv: (total, 3, nheads, headdim).
        cu_seqlens: (batch + 1,) int32, on qkv's device. Prefix sums of the sequence lengths,
            starting at 0 and ending at total.
        max_seqlen: int. Longest sequence (a Python int; an overestimate is safe).
{options}
{alignment}

    Returns:
        out: (total, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
    )
    validation.check_packed(qkv, "qkv", layout="(total, 3, nheads, headdim)", count=NUM_QKV)
    names = ArgNames(
        q="qkv[:, 0]",
        k="qkv[:, 1]",
        v="qkv[:, 2]",
        cu_seqlens_q="cu_seqlens",
        cu_seqlens_k="cu_seqlens",
        max_seqlen_q="max_seqlen",
        max_seqlen_k="max_seqlen",
    )
    q, k, v = qkv.unbind(dim=1)
    return _varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        softmax_scale,
        options,
        alibi_slopes,
        None,
        None,
        return_attn_probs,
        names,
    )


@_documented
def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> AttentionResult:
    """Packed variable-length attention with k and v stacked in one tensor.

    Same as ``flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], ...)``; k and v are views of kv,
    not copies, and the gradient of kv is one tensor of its shape.

{causal}

    Arguments:
        q: (total_q, nheads, headdim).
        kv: (total_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.
        cu_seqlens_q: (batch + 1,) int32, on q's device. Prefix sums of the query lengths.
        cu_seqlens_k: (batch + 1,) int32, on q's device. Prefix sums of the key lengths.
        max_seqlen_q: int. Longest query sequence (a Python int; an overestimate is safe).
        max_seqlen_k: int. Longest key sequence, same rules.
{options}
{alignment}
{seqused}

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total_q) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
    )
    validation.check_packed(kv, "kv", layout="(total_k, 2, nheads_k, headdim)", count=NUM_KV)
    k, v = kv.unbind(dim=1)
    return _varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        options,
        alibi_slopes,
        seqused_q,
        seqused_k,
        return_attn_probs,
        ArgNames(k="kv[:, 0]", v="kv[:, 1]"),
    )


@_documented
def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
) -> AttentionResult:
    """Exact attention over a batch of equal-length sequences.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k.
        v: (batch, seqlen_k, nheads_k, headdim).
{options}
{alignment}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen_q) float32, the natural log of sum_j exp(score_ij) over the
        keys row i sees.
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
    )
    return _fixed_attention(
        q, k, v, softmax_scale, options, alibi_slopes, return_attn_probs, ArgNames()
    )


@_documented
def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
) -> AttentionResult:
    """Fixed-length self-attention with q, k, v stacked in one tensor.

    Same as ``flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)``; the three are
    views of qkv, not copies, and the gradient of qkv is one tensor of its shape. For MQA/GQA
    use ``flash_attn_kvpacked_func`` or ``flash_attn_func``.

{causal}

    Arguments:
        qkv: (batch, seqlen, 3, nheads, headdim).
{options}
{alignment}

    Returns:
        out: (batch, seqlen, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
    )
    validation.check_packed(
        qkv, "qkv", layout="(batch, seqlen, 3, nheads, headdim)", count=NUM_QKV
    )
    q, k, v = qkv.unbind(dim=2)
    names = ArgNames(q="qkv[:, :, 0]", k="qkv[:, :, 1]", v="qkv[:, :, 2]")
    return _fixed_attention(
        q, k, v, softmax_scale, options, alibi_slopes, return_attn_probs, names
    )


@_documented
def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    causal_alignment: str = BOTTOM_RIGHT,
) -> AttentionResult:
    """Fixed-length attention with k and v stacked in one tensor.

    Same as ``flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...)``; k and v are views of kv,
    not copies, and the gradient of kv is one tensor of its shape.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        kv: (batch, seqlen_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.
{options}
{alignment}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen_q) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """
    options = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        causal_alignment=causal_alignment,
    )
    validation.check_packed(
        kv, "kv", layout="(batch, seqlen_k, 2, nheads_k, headdim)", count=NUM_KV
    )
    k, v = kv.unbind(dim=2)
    names = ArgNames(k="kv[:, :, 0]", v="kv[:, :, 1]")
    return _fixed_attention(
        q, k, v, softmax_scale, options, alibi_slopes, return_attn_probs, names
    )
