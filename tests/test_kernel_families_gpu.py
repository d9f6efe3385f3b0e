"""GPU tests of kernel-family dispatch: every family this build contains that runs on this GPU,
forced with FLASH_VARLEN_KERNEL_FAMILY, gives forward and backward within the tolerance rule of
the float32 reference; without the override the best runnable family is chosen; an override
naming no family is refused before any kernel runs. Dropout's keep mask is part of the contract
between families (the sm80 backward regenerates the mask of whichever forward ran): every
family's forward draws the same one, bit for bit.

The whole suite runs under one family with ``FLASH_VARLEN_KERNEL_FAMILY=<name> python -m pytest
tests -m gpu`` (scripts/gpu_check.sh does this for each family); these tests check the
mechanism itself. Runs only where CUDA is available.
"""

from __future__ import annotations

import pytest
import torch

import flash_varlen
from flash_varlen._extension import load_extension
from flash_varlen.reference import attention_ref_varlen, dropout_keep_mask, visible_keys

from accuracy import (
    FORWARD_FACTOR,
    UNIMPLEMENTED_OPTION,
    assert_gradients_within_tolerance,
    assert_lse_within_tolerance,
    assert_within_tolerance,
    device_generator,
    dtype_name,
    make_varlen_batch,
    require_backward_kernel,
    require_kernel,
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


def runnable_families(
    monkeypatch, direction: str, head_dim: int = HEAD_DIM, local: bool = True
) -> list[str]:
    """The families whose kernels of `direction` ("forward" or "backward") for (DTYPE, head_dim,
    local mask) run on this GPU, best first, options aside (dispatch is asked without a call)."""
    extension = load_extension()
    runnable = []
    for family in extension.kernel_families():
        monkeypatch.setenv(OVERRIDE, family["name"])
        try:
            extension.select_kernel_family(
                direction, dtype_name(DTYPE), head_dim, local, capability()
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


def backward_kernel_names(batch, dout: torch.Tensor, **options) -> list[str]:
    """Names of the CUDA kernels one backward of `batch` launches (its forward run first)."""
    leaves = [x.detach().clone().requires_grad_() for x in (batch.q, batch.k, batch.v)]
    out = flash_varlen.flash_attn_varlen_func(
        *leaves, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        **options,
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.autograd.grad(out, leaves, dout)
        torch.cuda.synchronize()
    return [event.name for event in profile.events()]


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_runs_the_best_family_deterministic_or_not(monkeypatch, deterministic) -> None:
    """Without the override, a causal d = 128 backward runs the main kernel of the best family
    that serves it, deterministic or not: on Hopper the sm90 backward, which served deterministic
    calls only under the override until 2026-12-06. Seen in the profiler's kernel names
    (flash_varlen::<family>::flash_bwd_kernel); fails if dispatch sends one of the two elsewhere."""
    require_backward_kernel(DTYPE, HEAD_DIM)
    best = runnable_families(monkeypatch, "backward")[0]
    batch = make_varlen_batch(SEQLENS_Q, SEQLENS_K, 8, 2, HEAD_DIM, DTYPE, DEVICE, seed=13)
    dout = seeded_randn(batch.q.shape, DTYPE, DEVICE, device_generator(DEVICE, 14))
    names = backward_kernel_names(batch, dout, causal=True, deterministic=deterministic)
    main_kernels = [name for name in names if "::flash_bwd_kernel<" in name]
    assert main_kernels, f"no backward main kernel among {names}"
    assert all(f"flash_varlen::{best}::" in name for name in main_kernels), main_kernels


# Head dims whose buckets have more than one family's backward (sm90: 64 and 128).
@pytest.mark.parametrize("head_dim", [64, HEAD_DIM])
def test_every_runnable_family_matches_the_reference(monkeypatch, head_dim) -> None:
    """Each family forced on its own: its forward (out, lse) and, where it has a backward that
    serves the call, the gradients of a forward and backward both run by it. (A backward may
    refuse an option of the call: the sm90 backward, in progress, serves only what it
    implements.)"""
    require_backward_kernel(DTYPE, head_dim)
    batch = make_varlen_batch(SEQLENS_Q, SEQLENS_K, 8, 2, head_dim, DTYPE, DEVICE, seed=11)
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
    with_backward = runnable_families(monkeypatch, "backward", head_dim)
    forward_only = runnable_families(monkeypatch, "forward", head_dim)
    assert forward_only
    checked_backward = []
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
            try:
                grads = torch.autograd.grad(out, leaves, dout)
            except NotImplementedError as error:
                if UNIMPLEMENTED_OPTION not in str(error):
                    raise
                continue
            assert_gradients_within_tolerance(grads, ref_grads, low_grads, family)
            checked_backward.append(family)
    assert checked_backward and set(with_backward) <= set(forward_only)


def test_override_naming_no_family_is_refused(monkeypatch) -> None:
    require_backward_kernel(DTYPE, HEAD_DIM)
    batch = make_varlen_batch((5,), (5,), 2, 2, HEAD_DIM, DTYPE, DEVICE)
    monkeypatch.setenv(OVERRIDE, "sm75")
    with pytest.raises(ValueError, match=f"{OVERRIDE}=sm75 names no kernel family"):
        flash_varlen.flash_attn_varlen_func(
            batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k, 5, 5
        )


# Dropout (with ALiBi) in every family: lengths that are not tile multiples, empty sequences on
# either side, short sequences; one MHA layout and one GQA layout (8 query heads per key/value
# head: each query head its own tiles, its own slope and Philox stream).
VARIANT_SEQLENS_Q = (1, 5, 17, 40, 0, 77, 130, 203)
VARIANT_SEQLENS_K = (9, 5, 33, 40, 13, 0, 203, 130)
VARIANT_LAYOUTS = {"mha": (4, 4), "gqa": (32, 4)}
VARIANT_HEAD_DIMS = (64, 128, 256)
DROPOUT_P = 0.17
DROPOUT_SEED = 3


def visible_pairs(batch, nheads: int, causal: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool of S_dmask's shape (batch, nheads, rows, cols): True on each sequence's visible
    (query, key) pairs, the only ones whose keep bit a kernel must decide (the rest of S_dmask
    depends on which key blocks a family's tiles visit)."""
    visible = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    for b, (length_q, length_k) in enumerate(zip(batch.seqlens_q, batch.seqlens_k)):
        pairs = visible_keys(length_q, length_k, causal, DEVICE)
        visible[b, :, :length_q, :length_k] = pairs.expand(nheads, -1, -1)
    return visible


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("layout", list(VARIANT_LAYOUTS))
@pytest.mark.parametrize("head_dim", VARIANT_HEAD_DIMS, ids=lambda d: f"d{d}")
def test_dropout_keep_mask_is_the_same_in_every_family(
    monkeypatch, head_dim: int, layout: str, causal: bool
) -> None:
    """Each family that runs this forward here, forced in turn, on a varlen batch with dropout
    and per-head ALiBi slopes after the same torch.manual_seed: S_dmask's keep bits (its sign
    bits) are identical on every visible pair, and out and softmax_lse are within the forward
    tolerance of the reference given that mask.

    Fails if a family keys a pair's Philox draw by its place in a tile instead of its (batch,
    head, token, key), takes another of the group's four draws, rescales the kept probabilities
    differently, or biases a row with another head's slope."""
    require_kernel(DTYPE, head_dim)
    families = runnable_families(monkeypatch, "forward", head_dim, causal)
    if len(families) < 2:
        pytest.skip(f"only {families} runs this forward here: nothing to compare")
    nheads, nheads_k = VARIANT_LAYOUTS[layout]
    batch = make_varlen_batch(
        VARIANT_SEQLENS_Q, VARIANT_SEQLENS_K, nheads, nheads_k, head_dim, DTYPE, DEVICE, seed=13
    )
    exponents = torch.arange(1, nheads + 1, dtype=torch.float32, device=DEVICE)
    slopes = torch.exp2(-8.0 * exponents / nheads)  # ALiBi's geometric slopes
    options = {"causal": causal, "alibi_slopes": slopes, "dropout_p": DROPOUT_P}
    reference_inputs = {
        compute_dtype: [x.to(compute_dtype) for x in (batch.q, batch.k, batch.v)]
        for compute_dtype in (torch.float32, DTYPE)
    }

    keeps = {}
    for family in families:
        monkeypatch.setenv(OVERRIDE, family)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            torch.manual_seed(DROPOUT_SEED)
            out, lse, s_dmask = flash_varlen.flash_attn_varlen_func(
                batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k,
                batch.max_seqlen_q, batch.max_seqlen_k, return_attn_probs=True, **options,
            )
        keep = dropout_keep_mask(s_dmask)
        keeps[family] = keep
        (ref_out, ref_lse), (low_out, low_lse) = (
            attention_ref_varlen(
                *reference_inputs[compute_dtype], batch.cu_seqlens_q, batch.cu_seqlens_k,
                compute_dtype=compute_dtype, dropout_mask=keep, **options,
            )
            for compute_dtype in (torch.float32, DTYPE)
        )
        assert_within_tolerance(out, ref_out, low_out, FORWARD_FACTOR, f"{family} out")
        assert_lse_within_tolerance(lse, ref_lse, low_lse, FORWARD_FACTOR, f"{family} lse")
    monkeypatch.delenv(OVERRIDE)

    first = families[0]
    visible = visible_pairs(batch, nheads, causal, tuple(keeps[first].shape))
    assert bool((~keeps[first][visible]).any()), f"{first} dropped no visible pair"
    for family in families[1:]:
        assert keeps[family].shape == keeps[first].shape, f"{family} S_dmask shape"
        differ = (keeps[family] != keeps[first]) & visible
        assert not bool(differ.any()), (
            f"{family} and {first} keep {int(differ.sum())} of {int(visible.sum())} visible "
            f"pairs differently, first at (batch, head, row, key) "
            f"{tuple(differ.nonzero()[0].tolist())}"
        )
