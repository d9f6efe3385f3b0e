"""Public attention functions, call-compatible with flash-attn 2.x.

Argument names, order, defaults and returns follow ``flash_attn.flash_attn_interface``, so code
written for flash-attn works by changing the import. Each function validates its inputs first
(``validation.py``: clear errors, no device read) and then calls one registered op (``ops.py``):
``flash_varlen::varlen_fwd`` for the packed variable-length layout, ``flash_varlen::fwd`` for
the fixed-length layout. Gradients flow through those ops' registered backward
(``flash_varlen::varlen_bwd`` / ``flash_varlen::bwd``). The packed variants (``qkv``, ``kv``)
pass views, never copies, so autograd assembles the gradient of a packed input into one tensor
of the packed shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from flash_varlen import ops, validation
from flash_varlen.validation import ArgNames

AttentionResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]
_F = TypeVar("_F", bound=Callable[..., AttentionResult])

NUM_QKV, NUM_KV = 3, 2  # sizes of the packing dim: qkv = (q, k, v), kv = (k, v)

_CAUSAL_DOC = """\
    Causal masking (``causal=True``) aligns to the bottom-right corner of each sequence's
    attention matrix: query i sees key j iff ``j <= i + seqlen_k - seqlen_q``. For
    seqlen_q = 2, seqlen_k = 5 (1 = attends, 0 = masked out)::

        1 1 1 1 0
        1 1 1 1 1

    For seqlen_q = 5, seqlen_k = 2::

        0 0    <- sees no key: out = 0, softmax_lse = -inf
        0 0    <- sees no key: out = 0, softmax_lse = -inf
        0 0    <- sees no key: out = 0, softmax_lse = -inf
        1 0
        1 1

    Any query row that sees no key (fully masked, or an empty key sequence) gets out = 0,
    softmax_lse = -inf and zero gradients; nothing is ever NaN. Both out and softmax_lse are
    differentiable w.r.t. q, k and v. Query head h attends with key/value head
    h // (nheads // nheads_k) (multi-query / grouped-query attention).

    Tensors must be float16 or bfloat16 on one CUDA device, contiguous in the last dim, with
    every other stride and the storage offset a multiple of 8 elements (views such as
    ``qkv[:, 0]`` qualify and are never copied); headdim is a multiple of 8, at most 256."""

_OPTIONS_DOC = """\
        dropout_p: float. Must be 0.0: dropout is not supported yet.
        softmax_scale: float > 0. Scale of q @ k^T before the softmax. Default
            1 / sqrt(headdim).
        causal: bool. Bottom-right aligned causal mask (drawn above).
        window_size: (left, right). Only (-1, -1) and (-1, 0) (which means causal) are
            supported; a sliding window raises NotImplementedError.
        softcap: float. Must be 0.0: soft-capping is not supported yet.
        alibi_slopes: Must be None: ALiBi is not supported yet.
        deterministic: bool. Whether the backward pass is bitwise reproducible run to run.
            The forward pass and the gradients of k and v always are (fixed summation order,
            no atomics). The gradient of q is accumulated with fp32 atomic adds across key
            blocks, so with False it may differ in the last bits between runs; True orders
            those adds and makes it reproducible too, at some speed cost. The ordered path is
            also taken while ``torch.use_deterministic_algorithms(True)`` is on, as for
            PyTorch's own ops.
        return_attn_probs: bool. Also return softmax_lse (see Returns)."""

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
            causal=_CAUSAL_DOC, options=_OPTIONS_DOC, raises=_RAISES_DOC
        )
    return func


def _result(
    out: torch.Tensor, softmax_lse: torch.Tensor, return_attn_probs: bool
) -> AttentionResult:
    # S_dmask (the dropout pattern) exists only with dropout, which is not supported: None.
    return (out, softmax_lse, None) if return_attn_probs else out


def _varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None,
    causal: bool,
    deterministic: bool,
    return_attn_probs: bool,
    names: ArgNames,
) -> AttentionResult:
    validation.check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names
    )
    if validation.debug_enabled():
        validation.check_varlen_values(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names
        )
    scale = validation.resolve_softmax_scale(softmax_scale, q.shape[-1])
    out, softmax_lse = ops.varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        causal,
        deterministic,
    )
    return _result(out, softmax_lse, return_attn_probs)


def _fixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    deterministic: bool,
    return_attn_probs: bool,
    names: ArgNames,
) -> AttentionResult:
    validation.check_fixed_inputs(q, k, v, names)
    scale = validation.resolve_softmax_scale(softmax_scale, q.shape[-1])
    out, softmax_lse = ops.fwd(q, k, v, scale, causal, deterministic)
    return _result(out, softmax_lse, return_attn_probs)


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

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (nheads, total_q) float32, the natural log of sum_j exp(score_ij) over the keys row i
        sees, and the third item (S_dmask) is None because it exists only with dropout.

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
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
        causal,
        deterministic,
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

    Returns:
        out: (total, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (nheads, total) float32 (natural-log sum of exp(scores) per row).

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
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
        causal,
        deterministic,
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

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (nheads, total_q) float32 (natural-log sum of exp(scores) per row).

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
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
        causal,
        deterministic,
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
) -> AttentionResult:
    """Exact attention over a batch of equal-length sequences.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k.
        v: (batch, seqlen_k, nheads_k, headdim).
{options}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (batch, nheads, seqlen_q) float32, the natural log of sum_j exp(score_ij) over the
        keys row i sees, and the third item (S_dmask) is None because it exists only with
        dropout.

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
    )
    return _fixed_attention(
        q, k, v, softmax_scale, causal, deterministic, return_attn_probs, ArgNames()
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
) -> AttentionResult:
    """Fixed-length self-attention with q, k, v stacked in one tensor.

    Same as ``flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)``; the three are
    views of qkv, not copies, and the gradient of qkv is one tensor of its shape. For MQA/GQA
    use ``flash_attn_kvpacked_func`` or ``flash_attn_func``.

{causal}

    Arguments:
        qkv: (batch, seqlen, 3, nheads, headdim).
{options}

    Returns:
        out: (batch, seqlen, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (batch, nheads, seqlen) float32 (natural-log sum of exp(scores) per row).

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
    )
    validation.check_packed(
        qkv, "qkv", layout="(batch, seqlen, 3, nheads, headdim)", count=NUM_QKV
    )
    q, k, v = qkv.unbind(dim=2)
    names = ArgNames(q="qkv[:, :, 0]", k="qkv[:, :, 1]", v="qkv[:, :, 2]")
    return _fixed_attention(
        q, k, v, softmax_scale, causal, deterministic, return_attn_probs, names
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
) -> AttentionResult:
    """Fixed-length attention with k and v stacked in one tensor.

    Same as ``flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...)``; k and v are views of kv,
    not copies, and the gradient of kv is one tensor of its shape.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        kv: (batch, seqlen_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.
{options}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, None) where softmax_lse is
        (batch, nheads, seqlen_q) float32 (natural-log sum of exp(scores) per row).

{raises}
    """
    causal = validation.check_options(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
    )
    validation.check_packed(
        kv, "kv", layout="(batch, seqlen_k, 2, nheads_k, headdim)", count=NUM_KV
    )
    k, v = kv.unbind(dim=2)
    names = ArgNames(k="kv[:, :, 0]", v="kv[:, :, 1]")
    return _fixed_attention(
        q, k, v, softmax_scale, causal, deterministic, return_attn_probs, names
    )
