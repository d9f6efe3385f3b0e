"""GPU tests of kernel-family dispatch: every family this build contains that runs on this GPU,
forced with FLASH_VARLEN_KERNEL_FAMILY, gives forward and backward within the tolerance rule of
the float32 reference; without the override the best runnable family is chosen; an override
naming no family is refused before any kernel runs.

The whole suite runs under one family with ``FLASH_VARLEN_KERNEL_FAMILY=<name> python -m pytest
tests -m gpu`` (scripts/gpu_check.sh does this for each family); these tests check the
mechanism itself. Runs only where CUDA is available.
"""

from __future__ import annotations

import pytest
import torch

import flash_varlen
from flash_varlen._extension import load_extension
from flash_varlen.reference import attention_ref_varlen

from accuracy import (
    FORWARD_FACTOR,
    assert_gradients_within_tolerance,
    assert_lse_within_tolerance,
    assert_within_tolerance,
    device_generator,
    dtype_name,
    make_varlen_batch,
    require_backward_kernel,
    seeded_randn,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
OVERRIDE = "FLASH_VARLEN_KERNEL_FAMILY"
DTYPE = torch.bfloat16
HEAD_DIM = 128
# Lengths that are not tile multiples, an empty key sequence, and more queries than keys.
SEQLENS_Q = (1, 77, 130, 0, 45)
SEQLENS_K = (9, 77, 203, 0, 0)


def capability() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def runnable_families(monkeypatch, direction: str) -> list[str]:
    """The families whose kernels of `direction` ("forward" or "backward") for (DTYPE, HEAD_DIM)
    run on this GPU, best first (a family may have no backward: sm90 today)."""
    extension = load_extension()
    runnable = []
    for family in extension.kernel_families():
        monkeypatch.setenv(OVERRIDE, family["name"])
        try:
            extension.select_kernel_family(
                direction, dtype_name(DTYPE), HEAD_DIM, True, capability()
            )
        except NotImplementedError:
            continue
        runnable.append(family["name"])
    monkeypatch.delenv(OVERRIDE)
    return runnable


def test_without_override_the_best_runnable_family_runs(monkeypatch) -> None:
    require_backward_kernel(DTYPE, HEAD_DIM)
    extension = load_extension()
    for direction in ("forward", "backward"):
        families = runnable_families(monkeypatch, direction)
        assert families, f"no family of this build runs the {direction} on this GPU"
        for local in (False, True):
            chosen = extension.select_kernel_family(
                direction, dtype_name(DTYPE), HEAD_DIM, local, capability()
            )
            assert chosen == families[0]


def test_every_runnable_family_matches_the_reference(monkeypatch) -> None:
    """Each family forced on its own: its forward (out, lse) and, where it has a backward, the
    gradients of a forward and backward both run by it."""
    require_backward_kernel(DTYPE, HEAD_DIM)
    batch = make_varlen_batch(SEQLENS_Q, SEQLENS_K, 8, 2, HEAD_DIM, DTYPE, DEVICE, seed=11)
    dout = seeded_randn(batch.q.shape, DTYPE, DEVICE, device_generator(DEVICE, 12))
    refs = {}
    for compute_dtype in (torch.float32, DTYPE):
        leaves = [
            x.detach().to(compute_dtype).requires_grad_() for x in (batch.q, batch.k, batch.v)
        ]
        out, lse = attention_ref_varlen(
            *leaves, batch.cu_seqlens_q, batch.cu_seqlens_k, causal=True,
            compute_dtype=compute_dtype,
        )
        grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
        refs[compute_dtype] = (out, lse, grads)
    (ref_out, ref_lse, ref_grads), (low_out, low_lse, low_grads) = (
        refs[torch.float32], refs[DTYPE]
    )
    with_backward = runnable_families(monkeypatch, "backward")
    forward_only = runnable_families(monkeypatch, "forward")
    assert forward_only
    for family in forward_only:
        monkeypatch.setenv(OVERRIDE, family)
        leaves = [x.detach().clone().requires_grad_() for x in (batch.q, batch.k, batch.v)]
        out, lse, _ = flash_varlen.flash_attn_varlen_func(
            *leaves, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, causal=True, return_attn_probs=True,
        )
        assert_within_tolerance(out, ref_out, low_out, FORWARD_FACTOR, f"{family} out")
        assert_lse_within_tolerance(lse, ref_lse, low_lse, FORWARD_FACTOR, f"{family} lse")
        if family in with_backward:
            grads = torch.autograd.grad(out, leaves, dout)
            assert_gradients_within_tolerance(grads, ref_grads, low_grads, family)
    assert with_backward and set(with_backward) <= set(forward_only)


def test_override_naming_no_family_is_refused(monkeypatch) -> None:
    require_backward_kernel(DTYPE, HEAD_DIM)
    batch = make_varlen_batch((5,), (5,), 2, 2, HEAD_DIM, DTYPE, DEVICE)
    monkeypatch.setenv(OVERRIDE, "sm75")
    with pytest.raises(ValueError, match=f"{OVERRIDE}=sm75 names no kernel family"):
        flash_varlen.flash_attn_varlen_func(
            batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k, 5, 5
        )
