"""GPU tests of the attention variants (issue 4) through the public API, forward and backward.

Every variant (sliding window, causal alignment, softcap, ALiBi, dropout, seqused_q/k) and the
pairwise combinations run through flash_varlen.flash_attn_varlen_func / flash_attn_func and are
checked against flash_varlen.reference called with the same keyword options: out and
softmax_lse (return_attn_probs=True) with the forward tolerance rule, and dq, dk, dv (autograd
of sum(out * dout) + sum(softmax_lse * dlse), seeded upstream gradients) with the gradient
tolerance rule of tests/accuracy.py (a factor times the error of the same PyTorch math in the
input dtype, plus a rounding floor). Dropout cases give the reference the keep mask that the
kernel reports in S_dmask, so they are checked as deterministically as the others; the mask's
statistics are tested on their own.

Exact checks on top of the tolerance rule: query rows that see no key have out = 0 and
softmax_lse = -inf; their dq, and the dk, dv of keys no query sees, are exactly 0; rows past
seqused_q / seqused_k get exactly zero gradients. Outputs and gradients are NaN-poisoned
through the caching allocator; with seqused the rows past the used lengths of q, k, v, dout and
dlse are NaN as well, since the issue requires that "the rest is neither read nor written": a
kernel that reads them turns that NaN into the compared rows or gradients.

Cases whose (dtype, head-dim bucket) kernels a narrowed build lacks are skipped with the reason.
Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from flash_varlen.reference import TOP_LEFT, UNBOUNDED

from accuracy import (
    GRADIENT_NAMES,
    allocates_no_device_memory,
    assert_bitwise_equal,
    dtype_name,
    make_varlen_batch,
    require_backward_kernel,
    require_kernel,
)
from variant_harness import (
    ALIBI_PER_HEAD,
    ALIBI_PER_SEQUENCE,
    DEFAULT_DTYPE,
    DEFAULT_HEAD_DIM,
    DEFAULT_LAYOUT,
    DEVICE,
    DROPOUT_P,
    DROPOUT_SEED,
    DTYPES,
    EVERYTHING,
    HEAD_LAYOUTS,
    PACKED_ENTRIES,
    SMALL_SOFTCAP,
    SOFTCAP,
    SOFTCAP_QK_SCALE,
    Case,
    Variant,
    assert_results_bitwise_equal,
    build_case,
    call_entry,
    check_case,
    default_case,
    dropout_keep,
    entry_inputs,
    fixed_case,
    fixed_params,
    isolated_rng,
    packed_case,
    run_kernel,
    run_packed,
    sequence_visibility,
    varlen_case,
    varlen_params,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The harness (cases, kernel calls, reference and checks) and the configuration both test files
# share (dtypes, head layouts, the matrix batch, seeds, softcap and ALiBi constants) are in
# variant_harness.py.

# A representative head dim per tile configuration family: 64 (128 x 128 tiles), 128 (the
# default) and 256 (8 warps, the largest shared-memory footprint).
HEAD_DIMS = (64, 128, 256)
ENTRIES = ("varlen", "fixed")

# Seeds besides the harness's: OTHER_DROPOUT_SEED where a test needs a second, different mask.
OTHER_DROPOUT_SEED = 4

WIDE_WINDOW = 1000
"""Wider than every sequence here (the longest has 257 tokens): the window hides nothing."""
LARGE_INPUT_SCALE = 10.0
"""q and k scaled by this give scores of standard deviation 100: without the cap exp overflows."""
# The kept fraction of dropout may deviate from 1 - p by at most this many binomial standard
# deviations: a false failure has probability below 1e-6, while a keep threshold off by 1/256
# (an 8-bit comparison) is caught at the sample sizes of the kept-fraction test.
KEPT_FRACTION_SIGMAS = 5.0
KEPT_FRACTION_PS = (0.1, DROPOUT_P, 0.5, 0.9)
KEPT_FRACTION_SEQLENS_Q = (1024, 517, 0, 129, 300)
KEPT_FRACTION_SEQLENS_K = (1024, 600, 31, 129, 0)
KEPT_FRACTION_HEADS = (4, 2)
# Every tile size the kernels use divides this, so a mask that repeats per tile (a Philox
# offset that ignores the tile index) repeats with this period too.
MASK_REPEAT_PERIOD = 128
# Random numbers drawn between a forward and its backward: the backward must use the saved
# (seed, offset), not the generator's state at backward time.
RNG_DISTURB_DRAWS = 1000


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

VARIANTS = {
    "window_0_0": Variant(window_size=(0, 0)),
    "window_64_0": Variant(window_size=(64, 0)),
    "window_64_0_causal": Variant(causal=True, window_size=(64, 0)),
    "window_64_unbounded_causal": Variant(causal=True, window_size=(64, UNBOUNDED)),
    "window_32_96": Variant(window_size=(32, 96)),
    "window_100_7": Variant(window_size=(100, 7)),
    "window_unbounded_32": Variant(window_size=(UNBOUNDED, 32)),
    "window_17_unbounded": Variant(window_size=(17, UNBOUNDED)),
    "window_wider_than_sequences": Variant(window_size=(WIDE_WINDOW, WIDE_WINDOW)),
    "window_wider_than_sequences_causal": Variant(causal=True, window_size=(WIDE_WINDOW, 0)),
    "top_left_causal": Variant(causal=True, causal_alignment=TOP_LEFT),
    "top_left_window": Variant(window_size=(48, 16), causal_alignment=TOP_LEFT),
    "top_left_causal_window": Variant(
        causal=True, window_size=(48, 0), causal_alignment=TOP_LEFT
    ),
    "softcap_30": Variant(softcap=SOFTCAP, qk_scale=SOFTCAP_QK_SCALE),
    "softcap_2_causal": Variant(causal=True, softcap=SMALL_SOFTCAP),
    "alibi_heads": Variant(alibi=ALIBI_PER_HEAD),
    "alibi_heads_causal": Variant(causal=True, alibi=ALIBI_PER_HEAD),
    "alibi_batch": Variant(alibi=ALIBI_PER_SEQUENCE),
    "alibi_batch_causal_top_left": Variant(
        causal=True, alibi=ALIBI_PER_SEQUENCE, causal_alignment=TOP_LEFT
    ),
    "dropout": Variant(dropout_p=DROPOUT_P),
    "dropout_causal": Variant(causal=True, dropout_p=DROPOUT_P),
    "seqused": Variant(seqused=True),
    "seqused_causal": Variant(causal=True, seqused=True),
}

COMBINATIONS = {
    "window+softcap": Variant(window_size=(96, 8), softcap=SOFTCAP, qk_scale=SOFTCAP_QK_SCALE),
    "window+alibi": Variant(causal=True, window_size=(80, UNBOUNDED), alibi=ALIBI_PER_HEAD),
    "window+dropout": Variant(window_size=(40, 40), dropout_p=DROPOUT_P),
    "softcap+alibi": Variant(
        softcap=SOFTCAP, alibi=ALIBI_PER_SEQUENCE, qk_scale=SOFTCAP_QK_SCALE
    ),
    "softcap+dropout": Variant(
        causal=True, softcap=SOFTCAP, dropout_p=DROPOUT_P, qk_scale=SOFTCAP_QK_SCALE
    ),
    "alibi+dropout": Variant(alibi=ALIBI_PER_HEAD, dropout_p=DROPOUT_P),
    "seqused+window": Variant(causal=True, window_size=(32, 0), seqused=True),
    "seqused+alibi": Variant(alibi=ALIBI_PER_SEQUENCE, seqused=True),
    "seqused+dropout": Variant(causal=True, dropout_p=DROPOUT_P, seqused=True),
    "top_left+window+softcap": Variant(
        window_size=(24, 40), softcap=SMALL_SOFTCAP, causal_alignment=TOP_LEFT
    ),
    "everything": EVERYTHING,
    "everything_top_left": dataclasses.replace(EVERYTHING, causal_alignment=TOP_LEFT),
}

ALL_VARIANTS = {**VARIANTS, **COMBINATIONS}

# flash_attn_func has no seqused: every variant without it, and "everything" less seqused.
FIXED_VARIANTS = {
    **{name: variant for name, variant in ALL_VARIANTS.items() if not variant.seqused},
    "everything_but_seqused": dataclasses.replace(EVERYTHING, seqused=False),
}


def assert_differ(first: torch.Tensor, second: torch.Tensor, what: str) -> None:
    """The two tensors of one shape are not equal everywhere."""
    assert first.shape == second.shape, f"{what}: shapes {first.shape} and {second.shape}"
    assert not torch.equal(first, second), f"{what} are identical"


# ----------------------------------------------------------------------------------------------
# The variant matrix: every variant and combination x head layout, dtype and head dim rotating
# ----------------------------------------------------------------------------------------------


def matrix_rotation(turn: int) -> tuple[torch.dtype, int]:
    """The (dtype, head dim) of a matrix case: they turn with the case, so that each variant
    meets both dtypes and all three head dims, and every (dtype, head dim) pair occurs (a
    pairwise cover instead of the full product, to keep the file's GPU time small)."""
    return DTYPES[turn % len(DTYPES)], HEAD_DIMS[turn % len(HEAD_DIMS)]


@pytest.mark.parametrize(
    "name, layout, dtype, head_dim", varlen_params(ALL_VARIANTS, matrix_rotation)
)
def test_varlen_variant_matches_reference(
    name: str, layout: str, dtype: torch.dtype, head_dim: int
) -> None:
    """flash_attn_varlen_func with one variant or combination on the matrix batch: out, lse and
    dq, dk, dv within the tolerance rule, exact zeros where nothing is seen or used.

    Fails if a window bound, the causal diagonal or its alignment is off by one or ignores
    seqlen_q != seqlen_k; if a key block is skipped that holds visible keys (or one is kept
    without masking); if softcap or ALiBi (or their order, or the softcap gradient) is wrong; if
    the backward draws a different dropout mask than the forward reported; if rows past seqused
    are read (NaN reaches the results) or written; if GQA/MQA sums dk/dv wrongly under a
    variant; or if an empty sequence shifts its neighbours.
    """
    require_backward_kernel(dtype, head_dim)
    case = varlen_case(ALL_VARIANTS[name], layout, dtype, head_dim)
    check_case(case, run_kernel(case), f"varlen {name}")


def fixed_rotation(index: int) -> tuple[torch.dtype, int]:
    """The (dtype, head dim) of the fixed-length case of the index-th variant without seqused
    (flash_attn_func runs each once): the dtype turns with every case, the head dim with every
    round of head layouts."""
    return DTYPES[index % len(DTYPES)], HEAD_DIMS[(index // len(HEAD_LAYOUTS)) % len(HEAD_DIMS)]


@pytest.mark.parametrize(
    "name, seqlens, layout, dtype, head_dim", fixed_params(FIXED_VARIANTS, fixed_rotation)
)
def test_fixed_variant_matches_reference(
    name: str, seqlens: tuple[int, int], layout: str, dtype: torch.dtype, head_dim: int
) -> None:
    """flash_attn_func (b, s, h, d) with each variant: the same checks as the varlen matrix,
    with (batch, nheads) ALiBi slopes and S_dmask indexed by batch. Fails if the fixed-length
    entry passes a variant option differently (or not at all) to the kernels."""
    require_backward_kernel(dtype, head_dim)
    case = fixed_case(FIXED_VARIANTS[name], seqlens, layout, dtype, head_dim)
    check_case(case, run_kernel(case), f"fixed {name}")


# ----------------------------------------------------------------------------------------------
# Softcap with large-magnitude inputs
# ----------------------------------------------------------------------------------------------

LARGE_MAGNITUDE_SEQLENS = (300, 129, 1000)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("softcap", [SOFTCAP, SMALL_SOFTCAP], ids=["softcap30", "softcap2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_softcap_large_magnitude_inputs(dtype: torch.dtype, softcap: float, causal: bool) -> None:
    """q and k scaled by 10: raw scores of standard deviation 100, capped to (-softcap, softcap).

    Fails if the cap is applied after the exponent (overflow to inf, then NaN), if tanh's
    saturated gradient (1 - tanh^2 near 0) is formed in a way that loses it or makes NaN, or if
    the row maximum used for the softmax is taken before capping inconsistently with the lse.
    """
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    nheads, nheads_k = HEAD_LAYOUTS[DEFAULT_LAYOUT]
    batch = make_varlen_batch(
        LARGE_MAGNITUDE_SEQLENS, LARGE_MAGNITUDE_SEQLENS, nheads, nheads_k, DEFAULT_HEAD_DIM,
        dtype, DEVICE,
    )
    scaled = dataclasses.replace(
        batch, q=batch.q * LARGE_INPUT_SCALE, k=batch.k * LARGE_INPUT_SCALE
    )
    case = build_case(scaled, Variant(causal=causal, softcap=softcap))
    result = run_kernel(case)
    for grad_name, grad in zip(GRADIENT_NAMES, result.grads):
        assert bool(torch.isfinite(grad).all()), f"softcap {softcap}: {grad_name} not finite"
    check_case(case, result, f"softcap {softcap} inputs x{LARGE_INPUT_SCALE:g}")


# ----------------------------------------------------------------------------------------------
# Dropout: the mask, its statistics, reproducibility, regeneration in the backward
# ----------------------------------------------------------------------------------------------

KEPT_FRACTION_MASKS = {
    "full": Variant(),
    "causal_window": Variant(causal=True, window_size=(200, 0)),
}


def kept_and_visible(case: Case, keep: torch.Tensor) -> tuple[int, int]:
    """Kept entries and all entries of the keep mask over the visible (query, key) pairs of
    every sequence and head (dropped entries outside them are not defined by the contract)."""
    kept = visible_count = 0
    nheads = keep.shape[1]
    for b, _, _, visible in sequence_visibility(case):
        length_q, length_k = visible.shape
        block = keep[b, :, :length_q, :length_k]
        kept += int(block[:, visible].sum())
        visible_count += nheads * int(visible.sum())
    return kept, visible_count


@pytest.mark.parametrize("mask", list(KEPT_FRACTION_MASKS))
@pytest.mark.parametrize("dropout_p", KEPT_FRACTION_PS)
def test_dropout_kept_fraction(dropout_p: float, mask: str) -> None:
    """The fraction of visible entries that S_dmask marks kept is 1 - p within
    KEPT_FRACTION_SIGMAS binomial standard deviations, and the mask is not repeated across heads
    of one kv group, sequences, or 128-row / 128-column tiles.

    Fails if the keep probability is p instead of 1 - p, is quantized coarsely (an 8-bit
    threshold is off by up to 1/256), or if the Philox counter ignores the head, the sequence
    or the tile, so that dropout patterns repeat.
    """
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    nheads, nheads_k = KEPT_FRACTION_HEADS
    batch = make_varlen_batch(
        KEPT_FRACTION_SEQLENS_Q, KEPT_FRACTION_SEQLENS_K, nheads, nheads_k, DEFAULT_HEAD_DIM,
        DEFAULT_DTYPE, DEVICE,
    )
    variant = dataclasses.replace(KEPT_FRACTION_MASKS[mask], dropout_p=dropout_p)
    case = build_case(batch, variant)
    result = run_kernel(case, backward=False)
    keep = dropout_keep(case, result.s_dmask, f"dropout {dropout_p}")
    kept, visible = kept_and_visible(case, keep)
    keep_probability = 1.0 - dropout_p
    std = math.sqrt(keep_probability * dropout_p / visible)
    fraction = kept / visible
    assert abs(fraction - keep_probability) <= KEPT_FRACTION_SIGMAS * std, (
        f"kept {fraction:.6f} of {visible} visible entries, expected {keep_probability:.6f} "
        f"+- {KEPT_FRACTION_SIGMAS} x {std:.2e}"
    )
    if mask == "full":
        first_q, first_k = KEPT_FRACTION_SEQLENS_Q[0], KEPT_FRACTION_SEQLENS_K[0]
        second_q, second_k = KEPT_FRACTION_SEQLENS_Q[1], KEPT_FRACTION_SEQLENS_K[1]
        period = MASK_REPEAT_PERIOD
        assert_differ(
            keep[0, 0, :first_q, :first_k], keep[0, 1, :first_q, :first_k], "masks of heads 0, 1"
        )
        assert_differ(
            keep[0, 0, :second_q, :second_k], keep[1, 0, :second_q, :second_k],
            "masks of sequences 0, 1",
        )
        assert_differ(
            keep[0, 0, :period, :first_k], keep[0, 0, period : 2 * period, :first_k],
            "consecutive row tiles of the mask",
        )
        assert_differ(
            keep[0, 0, :first_q, :period], keep[0, 0, :first_q, period : 2 * period],
            "consecutive column tiles of the mask",
        )


REPRODUCIBILITY_VARIANT = Variant(
    causal=True, window_size=(96, 0), alibi=ALIBI_PER_HEAD, dropout_p=DROPOUT_P
)


def disturb_rng() -> None:
    """Reseeds and draws from the CUDA generator, as other work between forward and backward
    would."""
    torch.manual_seed(OTHER_DROPOUT_SEED)
    torch.rand(RNG_DISTURB_DRAWS, device=DEVICE)


@pytest.mark.parametrize("entry", ENTRIES)
def test_dropout_is_reproducible_from_the_seed(entry: str) -> None:
    """torch.manual_seed(s) twice: out, lse, dq, dk, dv bitwise equal (deterministic=True), even
    when the generator is reseeded and drawn from between forward and backward. Another seed
    gives another out, and two calls after one seed draw different masks (the first of them the
    same as the seeded run).

    Fails if the forward does not take its seed from PyTorch's CUDA generator, if the backward
    reads the generator instead of the forward's saved (seed, offset), or if the forward does
    not advance the generator's offset (every call, every layer, the same mask).
    """
    case = default_case(REPRODUCIBILITY_VARIANT, fixed=entry == "fixed")
    with isolated_rng():
        first = run_kernel(case, deterministic=True, seed=DROPOUT_SEED)
        again = run_kernel(case, deterministic=True, seed=DROPOUT_SEED, between=disturb_rng)
        assert_results_bitwise_equal(case, again, first, f"{entry} same seed")
        other = run_kernel(case, deterministic=True, seed=OTHER_DROPOUT_SEED, backward=False)
        assert_differ(other.out, first.out, f"{entry} outputs of two seeds")
        torch.manual_seed(DROPOUT_SEED)
        one = run_kernel(case, seed=None, backward=False)
        two = run_kernel(case, seed=None, backward=False)
        assert_bitwise_equal(one.out, first.out, f"{entry} first call after the seed")
        assert_differ(one.out, two.out, f"{entry} outputs of two calls after one seed")


@pytest.mark.parametrize("entry", ENTRIES)
def test_dropout_backward_regenerates_the_mask(entry: str) -> None:
    """Gradients without return_attn_probs (no S_dmask exists) equal, bit for bit, those with it
    for the same seed (deterministic=True), and so does out. Fails if the backward depends on
    the S_dmask buffer, or if writing S_dmask changes which entries the forward drops."""
    case = default_case(REPRODUCIBILITY_VARIANT, fixed=entry == "fixed")
    with_mask = run_kernel(case, deterministic=True, lse_grad=False)
    without_mask = run_kernel(case, deterministic=True, return_attn_probs=False)
    assert_results_bitwise_equal(
        case, without_mask, with_mask, f"{entry} no S_dmask", compare_lse=False
    )


# ----------------------------------------------------------------------------------------------
# Determinism, packed entries
# ----------------------------------------------------------------------------------------------

DETERMINISM_VARIANTS = ("window+softcap", "alibi+dropout", "everything")


@pytest.mark.parametrize("name", DETERMINISM_VARIANTS)
def test_deterministic_variant_gradients_are_bitwise_reproducible(name: str) -> None:
    """deterministic=True with a variant: two backward passes give identical dq (and dk, dv).
    Fails if a variant path adds dq with unordered atomics despite deterministic=True."""
    case = default_case(ALL_VARIANTS[name])
    first = run_kernel(case, deterministic=True)
    second = run_kernel(case, deterministic=True)
    assert_results_bitwise_equal(case, second, first, f"deterministic {name}")


@pytest.mark.parametrize("entry", list(PACKED_ENTRIES))
def test_packed_entry_with_variants_matches_unpacked(entry: str) -> None:
    """A packed entry with window + softcap + ALiBi + dropout (and seqused for the varlen
    kvpacked one) gives the unpacked call's out, lse, S_dmask and gradients bit for bit (same
    seed, deterministic=True). Fails if a packed entry drops or reorders a variant option."""
    case = packed_case(entry)
    expected = run_kernel(case, deterministic=True)
    got = run_packed(case, entry)
    assert_results_bitwise_equal(case, got, expected, entry)
    assert_bitwise_equal(got.s_dmask, expected.s_dmask, f"{entry} S_dmask")


# ----------------------------------------------------------------------------------------------
# Validation of the new options, before any kernel
# ----------------------------------------------------------------------------------------------


def assert_rejected(case: Case, error: type[Exception], match: str, **options: Any) -> None:
    """The case's entry raises `error` naming `match` for `options`, before allocating."""
    q, k, v = entry_inputs(case)
    with allocates_no_device_memory(), pytest.raises(error, match=match):
        call_entry(case, q, k, v, **options)


@pytest.mark.parametrize("entry", ENTRIES)
def test_dropout_p_one_raises_value_error(entry: str) -> None:
    """dropout_p=1.0 (out would be 0 / 0) is a ValueError naming dropout_p."""
    case = default_case(Variant(), fixed=entry == "fixed")
    assert_rejected(case, ValueError, "dropout_p", dropout_p=1.0)


@pytest.mark.parametrize("entry", ENTRIES)
def test_float16_alibi_slopes_raise_type_error(entry: str) -> None:
    """alibi_slopes must be float32: float16 slopes are a TypeError naming alibi_slopes."""
    case = default_case(Variant(alibi=ALIBI_PER_HEAD), fixed=entry == "fixed")
    assert_rejected(
        case, TypeError, "alibi_slopes", alibi_slopes=case.alibi_slopes.to(torch.float16)
    )
