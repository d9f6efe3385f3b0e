"""Registered operators around the compiled kernels.

``flash_varlen::varlen_fwd`` and ``flash_varlen::fwd`` (forward) and ``flash_varlen::varlen_bwd``
and ``flash_varlen::bwd`` (backward) are ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` traces through forward and backward: their fake
implementations give output shapes and dtypes without running anything. Autograd is attached to
the forward ops through ``register_autograd``: the forward saves q, k, v, out, softmax_lse (and
cu_seqlens), O(total tokens) and never O(seqlen^2), and the backward calls the backward op with
them. The ops assume validated inputs (see ``validation.py``); the public functions in
``interface.py`` validate first.
"""

from __future__ import annotations

from typing import Any

import torch

from flash_varlen._extension import load_extension
from flash_varlen.validation import has_kernel_layout

LSE_DTYPE = torch.float32

Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Variable-length forward and backward


@torch.library.custom_op("flash_varlen::varlen_fwd", mutates_args=())
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32. Returns out (total_q, nheads, d) in q's dtype and softmax_lse
    (nheads, total_q) float32. ``deterministic`` only selects the backward algorithm (the
    forward is always deterministic); it is an argument so that autograd can save it.
    """
    out, softmax_lse = load_extension().varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
    )
    return out, softmax_lse


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
) -> tuple[torch.Tensor, torch.Tensor]:
    total_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((nheads, total_q), dtype=LSE_DTYPE)
    return out, softmax_lse


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of varlen_fwd.

    dout, out: (total_q, nheads, d) like q; softmax_lse and softmax_lse_grad (the gradient
    w.r.t. softmax_lse, or None for zero): (nheads, total_q) float32. dout must meet the kernel
    layout rules (validation.has_kernel_layout). Returns new tensors dq (total_q, nheads, d)
    and dk, dv (total_k, nheads_k, d), contiguous, zero in rows past cu_seqlens[-1]. dk and dv
    are always bitwise reproducible; dq is with ``deterministic=True``.
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _new_gradients(q, k, v)


def _varlen_fwd_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q = max_seqlen_q
    ctx.max_seqlen_k = max_seqlen_k
    _save_options(ctx, *options)


def _varlen_fwd_backward(
    ctx: Any, grad_out: torch.Tensor | None, grad_softmax_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
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
    )
    # No gradient for cu_seqlens_q/k (integers) and the non-tensor arguments.
    return dq, dk, dv, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_varlen_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Fixed-length forward and backward


@torch.library.custom_op("flash_varlen::fwd", mutates_args=())
def fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a batch of equal-length sequences.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d). Returns out
    (batch, seqlen_q, nheads, d) in q's dtype and softmax_lse (batch, nheads, seqlen_q) float32.
    ``deterministic`` only selects the backward algorithm, as in varlen_fwd.
    """
    out, softmax_lse = load_extension().fwd(q, k, v, softmax_scale, causal)
    return out, softmax_lse


@fwd.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=LSE_DTYPE)
    return out, softmax_lse


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of fwd.

    dout, out: (batch, seqlen_q, nheads, d) like q; softmax_lse and softmax_lse_grad (or None
    for zero): (batch, nheads, seqlen_q) float32. Returns new contiguous tensors dq like q and
    dk, dv (batch, seqlen_k, nheads_k, d); determinism as in varlen_bwd.
    """
    dq, dk, dv = load_extension().bwd(
        dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, softmax_lse_grad
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _new_gradients(q, k, v)


def _fwd_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, *options = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse)
    _save_options(ctx, *options)


def _fwd_backward(
    ctx: Any, grad_out: torch.Tensor | None, grad_softmax_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, softmax_lse = ctx.saved_tensors
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
    )
    return dq, dk, dv, None, None, None  # no gradient for the non-tensor arguments


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Shared by both layouts


def _new_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Gradients:
    """Fake dq, dk, dv: contiguous, shaped and typed like q, k, v (as the kernels allocate)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_options(ctx: Any, softmax_scale: float, causal: bool, deterministic: bool) -> None:
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.deterministic = deterministic
    # Unused outputs then reach backward as None instead of zero-filled tensors: in the common
    # case (out alone is used) the softmax_lse gradient is None, so no zero tensor is allocated
    # and the kernel reads none.
    ctx.set_materialize_grads(False)


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
