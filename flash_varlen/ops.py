"""Registered operators around the compiled kernels.

``flash_varlen::varlen_fwd`` and ``flash_varlen::fwd`` are ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` traces through them: their fake implementations give output
shapes and dtypes without running anything, and autograd is attached through
``register_autograd``. The ops assume validated inputs (see ``validation.py``); the public
functions in ``interface.py`` validate first.

The backward pass is not implemented yet: gradients raise NotImplementedError. The forward
already saves what the backward will need (q, k, v, out, softmax_lse, cu_seqlens).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_varlen._extension import load_extension

LSE_DTYPE = torch.float32
BACKWARD_NOT_IMPLEMENTED = (
    "flash_varlen: the backward pass is not implemented yet (forward only); gradients of "
    "flash_varlen attention cannot be computed in this version."
)


# --------------------------------------------------------------------------------------------
# Variable-length forward


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32. Returns out (total_q, nheads, d) in q's dtype and softmax_lse
    (nheads, total_q) float32.
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
) -> tuple[torch.Tensor, torch.Tensor]:
    total_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((nheads, total_q), dtype=LSE_DTYPE)
    return out, softmax_lse


def _varlen_fwd_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q = max_seqlen_q
    ctx.max_seqlen_k = max_seqlen_k
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal


def _varlen_fwd_backward(
    ctx: Any, grad_out: torch.Tensor, grad_softmax_lse: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    raise NotImplementedError(BACKWARD_NOT_IMPLEMENTED)


varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_varlen_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# Fixed-length forward


@torch.library.custom_op("flash_varlen::fwd", mutates_args=())
def fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a batch of equal-length sequences.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d). Returns out
    (batch, seqlen_q, nheads, d) in q's dtype and softmax_lse (batch, nheads, seqlen_q) float32.
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
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=LSE_DTYPE)
    return out, softmax_lse


def _fwd_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, softmax_scale, causal = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal


def _fwd_backward(
    ctx: Any, grad_out: torch.Tensor, grad_softmax_lse: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    raise NotImplementedError(BACKWARD_NOT_IMPLEMENTED)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
