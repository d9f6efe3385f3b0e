"""Registered operators around the compiled kernels.

``flash_varlen::varlen_fwd`` and ``flash_varlen::fwd`` (forward) and ``flash_varlen::varlen_bwd``
and ``flash_varlen::bwd`` (backward) are ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` traces through forward and backward: their fake
implementations give output shapes and dtypes without running anything. Autograd is attached to
the forward ops through ``register_autograd``: the forward saves q, k, v, out, softmax_lse, the
dropout RNG state (and cu_seqlens, the ALiBi slopes and seqused when given), O(total tokens) and
never O(seqlen^2), and the backward calls the backward op with them and the forward's options.
The ops assume validated inputs (see ``validation.py``); the public functions in
``interface.py`` validate first.

The forward ops return (out, softmax_lse, s_dmask, rng_state); only out and softmax_lse are
differentiable. With dropout the forward draws its (seed, offset) from PyTorch's default CUDA
generator, so the forward ops carry the ``nondeterministic_seeded`` tag of PyTorch's own random
ops: graph passes then treat a call as consuming random state (never removed as dead code nor
constant-folded) rather than as a pure function of its inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from flash_varlen._extension import load_extension
from flash_varlen.validation import IntLike, has_kernel_layout

LSE_DTYPE = torch.float32
# rng_state: int64 (seed, offset) of the dropout RNG, or an empty tensor without dropout.
RNG_STATE_DTYPE = torch.int64
RNG_STATE_SIZE = 2
# The dropout mask's sequence dims are rounded up to a multiple of the kernels' 128-row block.
DROPOUT_MASK_BLOCK = 128
# q, k, v: the first three inputs of both forward ops, and the only differentiable ones.
DIFFERENTIABLE_INPUTS = 3

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_RANDOM = (torch.Tag.nondeterministic_seeded,)


# --------------------------------------------------------------------------------------------
# Variable-length forward and backward


@torch.library.custom_op("flash_varlen::varlen_fwd", mutates_args=(), tags=_RANDOM)
def varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    return_dropout_mask: bool = False,
) -> Outputs:
    """Attention over packed sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32. The variant options (window, softcap, ALiBi slopes, seqused, alignment,
    dropout) have the extension's meaning and defaults. Returns out (total_q, nheads, d) in q's
    dtype, softmax_lse (nheads, total_q) float32, s_dmask (see ``_dropout_outputs``) and
    rng_state. ``deterministic`` only selects the backward algorithm (the forward is always
    deterministic); it is an argument so that autograd can save it.
    """
    out, softmax_lse, s_dmask, rng_state = load_extension().varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
        return_dropout_mask=return_dropout_mask,
    )
    return out, softmax_lse, s_dmask, rng_state


@varlen_fwd.register_fake
def _varlen_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    return_dropout_mask: bool = False,
) -> Outputs:
    total_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((nheads, total_q), dtype=LSE_DTYPE)
    batch = cu_seqlens_q.shape[0] - 1
    dims = (batch, nheads, max_seqlen_q, max_seqlen_k)
    return out, softmax_lse, *_dropout_outputs(q, dims, dropout_p, return_dropout_mask)


@torch.library.custom_op("flash_varlen::varlen_bwd", mutates_args=())
def varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    softmax_lse_grad: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> Gradients:
    """Gradients of varlen_fwd.

    dout, out: (total_q, nheads, d) like q; softmax_lse and softmax_lse_grad (the gradient
    w.r.t. softmax_lse, or None for zero): (nheads, total_q) float32. dout must meet the kernel
    layout rules (validation.has_kernel_layout). The variant options are the forward's, and
    rng_state is the one the forward returned (the backward regenerates its dropout mask from
    it). Returns new tensors dq (total_q, nheads, d) and dk, dv (total_k, nheads_k, d),
    contiguous, zero in rows past cu_seqlens[-1] and past seqused. dk and dv are always bitwise
    reproducible; dq is with ``deterministic=True``.
    """
    dq, dk, dv = load_extension().varlen_bwd(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        deterministic,
        softmax_lse_grad,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
        rng_state=rng_state,
    )
    return dq, dk, dv


@varlen_bwd.register_fake
def _varlen_bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    softmax_lse_grad: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> Gradients:
    return _new_gradients(q, k, v)


def _varlen_fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Outputs) -> None:
    (
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
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        seqused_q,
        seqused_k,
        causal_top_left,
        dropout_p,
        _return_dropout_mask,
    ) = inputs
    out, softmax_lse, s_dmask, rng_state = output
    ctx.save_for_backward(
        q,
        k,
        v,
        out,
        softmax_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        alibi_slopes,
        seqused_q,
        seqused_k,
        rng_state,
    )
    ctx.max_seqlen_q = max_seqlen_q
    ctx.max_seqlen_k = max_seqlen_k
    _save_options(
        ctx,
        inputs,
        (s_dmask, rng_state),
        softmax_scale=softmax_scale,
        causal=causal,
        deterministic=deterministic,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
    )


def _varlen_fwd_backward(
    ctx: Any,
    grad_out: torch.Tensor | None,
    grad_softmax_lse: torch.Tensor | None,
    _grad_s_dmask: None,
    _grad_rng_state: None,
) -> tuple[torch.Tensor | None, ...]:
    (
        q,
        k,
        v,
        out,
        softmax_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        alibi_slopes,
        seqused_q,
        seqused_k,
        rng_state,
    ) = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(
        kernel_ready_dout(grad_out, out),
        q,
        k,
        v,
        out,
        softmax_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        ctx.max_seqlen_q,
        ctx.max_seqlen_k,
        ctx.softmax_scale,
        ctx.causal,
        use_deterministic_backward(ctx.deterministic),
        kernel_ready_lse_grad(grad_softmax_lse),
        alibi_slopes=alibi_slopes,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        rng_state=rng_state,
        **ctx.variant_options,
    )
    return _input_gradients(ctx, dq, dk, dv)


varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_varlen_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Fixed-length forward and backward


@torch.library.custom_op("flash_varlen::fwd", mutates_args=(), tags=_RANDOM)
def fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    return_dropout_mask: bool = False,
) -> Outputs:
    """Attention over a batch of equal-length sequences.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d). Returns out
    (batch, seqlen_q, nheads, d) in q's dtype, softmax_lse (batch, nheads, seqlen_q) float32,
    s_dmask and rng_state. The other arguments are as in varlen_fwd.
    """
    out, softmax_lse, s_dmask, rng_state = load_extension().fwd(
        q,
        k,
        v,
        softmax_scale,
        causal,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
        return_dropout_mask=return_dropout_mask,
    )
    return out, softmax_lse, s_dmask, rng_state


@fwd.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    return_dropout_mask: bool = False,
) -> Outputs:
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=LSE_DTYPE)
    dims = (batch, nheads, seqlen_q, k.shape[1])
    return out, softmax_lse, *_dropout_outputs(q, dims, dropout_p, return_dropout_mask)


@torch.library.custom_op("flash_varlen::bwd", mutates_args=())
def bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    softmax_lse_grad: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> Gradients:
    """Gradients of fwd.

    dout, out: (batch, seqlen_q, nheads, d) like q; softmax_lse and softmax_lse_grad (or None
    for zero): (batch, nheads, seqlen_q) float32. Variant options and rng_state as in
    varlen_bwd. Returns new contiguous tensors dq like q and dk, dv (batch, seqlen_k, nheads_k,
    d); determinism as in varlen_bwd.
    """
    dq, dk, dv = load_extension().bwd(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        softmax_scale,
        causal,
        deterministic,
        softmax_lse_grad,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
        rng_state=rng_state,
    )
    return dq, dk, dv


@bwd.register_fake
def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    softmax_lse_grad: torch.Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> Gradients:
    return _new_gradients(q, k, v)


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Outputs) -> None:
    (
        q,
        k,
        v,
        softmax_scale,
        causal,
        deterministic,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        causal_top_left,
        dropout_p,
        _return_dropout_mask,
    ) = inputs
    out, softmax_lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, alibi_slopes, rng_state)
    _save_options(
        ctx,
        inputs,
        (s_dmask, rng_state),
        softmax_scale=softmax_scale,
        causal=causal,
        deterministic=deterministic,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        causal_top_left=causal_top_left,
        dropout_p=dropout_p,
    )


def _fwd_backward(
    ctx: Any,
    grad_out: torch.Tensor | None,
    grad_softmax_lse: torch.Tensor | None,
    _grad_s_dmask: None,
    _grad_rng_state: None,
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, softmax_lse, alibi_slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = bwd(
        kernel_ready_dout(grad_out, out),
        q,
        k,
        v,
        out,
        softmax_lse,
        ctx.softmax_scale,
        ctx.causal,
        use_deterministic_backward(ctx.deterministic),
        kernel_ready_lse_grad(grad_softmax_lse),
        alibi_slopes=alibi_slopes,
        rng_state=rng_state,
        **ctx.variant_options,
    )
    return _input_gradients(ctx, dq, dk, dv)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Shared by both layouts


def _new_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Gradients:
    """Fake dq, dk, dv: contiguous, shaped and typed like q, k, v (as the kernels allocate)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _dropout_outputs(
    q: torch.Tensor,
    dims: tuple[IntLike, IntLike, IntLike, IntLike],
    dropout_p: float,
    return_dropout_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake s_dmask and rng_state, as the extension allocates them on q's device.

    dims: (batch, nheads, max_seqlen_q, max_seqlen_k), the sequence lengths of the fixed-length
    layout for the last two. s_dmask: with return_dropout_mask and dropout_p > 0, (batch,
    nheads, max_seqlen_q, max_seqlen_k) with both lengths rounded up to DROPOUT_MASK_BLOCK, in
    q's dtype; else an empty (0,) tensor of q's dtype. rng_state: int64 (seed, offset) with
    dropout, else empty.
    """
    batch, nheads, max_seqlen_q, max_seqlen_k = dims
    with_dropout = dropout_p > 0
    if with_dropout and return_dropout_mask:
        s_dmask = q.new_empty(
            (batch, nheads, _round_up_to_block(max_seqlen_q), _round_up_to_block(max_seqlen_k))
        )
    else:
        s_dmask = q.new_empty((0,))
    rng_state = q.new_empty((RNG_STATE_SIZE if with_dropout else 0,), dtype=RNG_STATE_DTYPE)
    return s_dmask, rng_state


def _round_up_to_block(length: IntLike) -> IntLike:
    """``length`` (an int or SymInt) rounded up to a multiple of DROPOUT_MASK_BLOCK."""
    return (length + DROPOUT_MASK_BLOCK - 1) // DROPOUT_MASK_BLOCK * DROPOUT_MASK_BLOCK


def _save_options(
    ctx: Any,
    inputs: tuple[Any, ...],
    non_differentiable: tuple[torch.Tensor, torch.Tensor],
    *,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    causal_top_left: bool,
    dropout_p: float,
) -> None:
    """Keeps the forward's non-tensor arguments for the backward, and sets up the outputs.

    ``inputs``: all the forward op's inputs, whose count is the number of gradients the
    backward returns. ``non_differentiable``: the forward's s_dmask and rng_state.
    """
    ctx.num_inputs = len(inputs)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.deterministic = deterministic
    # The backward ops take these under the forward's names.
    ctx.variant_options = {
        "window_left": window_left,
        "window_right": window_right,
        "softcap": softcap,
        "causal_top_left": causal_top_left,
        "dropout_p": dropout_p,
    }
    ctx.mark_non_differentiable(*non_differentiable)
    # Unused outputs then reach backward as None instead of zero-filled tensors: in the common
    # case (out alone is used) the softmax_lse gradient is None, so no zero tensor is allocated
    # and the kernel reads none.
    ctx.set_materialize_grads(False)


def _input_gradients(
    ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """One gradient per forward input: dq, dk, dv for q, k, v, None for the rest: cu_seqlens
    and seqused (integers), alibi_slopes (not differentiable, as in flash-attn) and the
    non-tensor arguments."""
    return dq, dk, dv, *(None,) * (ctx.num_inputs - DIFFERENTIABLE_INPUTS)


def use_deterministic_backward(requested: bool) -> bool:
    """Whether the backward orders its dq accumulation (bitwise reproducible dq).

    As for PyTorch's own ops with a deterministic alternative, the deterministic path is also
    taken when ``torch.use_deterministic_algorithms(True)`` is on: read when backward runs, or
    under torch.compile when the graph is compiled (Dynamo recompiles when the flag changes).
    """
    return requested or torch.are_deterministic_algorithms_enabled()


def kernel_ready_dout(grad_out: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The gradient of out as the kernel can read it, copied only when it must be.

    Autograd hands over whatever layout the loss produced: ``out.sum()`` gives an expanded
    gradient (all strides 0), slicing gives odd strides or offsets. Those are copied to a new
    contiguous tensor; a gradient that meets the kernel layout rules, views included, is passed
    as is. None (only softmax_lse was used) becomes zeros.
    """
    if grad_out is None:
        return torch.zeros_like(out)
    return grad_out if has_kernel_layout(grad_out) else _contiguous_copy(grad_out)


def kernel_ready_lse_grad(grad_softmax_lse: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of softmax_lse (float32) with stride(-1) == 1 as the kernel needs, or None."""
    if grad_softmax_lse is None or grad_softmax_lse.stride(-1) == 1:
        return grad_softmax_lse
    return _contiguous_copy(grad_softmax_lse)


def _contiguous_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Not .contiguous(): it returns a contiguous tensor itself, also one whose storage offset
    # misaligns it, or whose size-1 last dim has a stride other than 1. A fresh allocation is
    # aligned and has the standard strides.
    return tensor.clone(memory_format=torch.contiguous_format)
