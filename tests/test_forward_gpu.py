"""GPU tests of the forward pass: accuracy against the PyTorch reference, edge cases, API contract.

Every kernel result is checked with the tolerance rule of design.md (tests/accuracy.py) against
a float32 reference computed per sequence on the GPU, and the same math in the input dtype sets
the allowed error. Outputs are NaN-poisoned through the caching allocator before each call and
checked to be fully written. Cases whose (dtype, head-dim bucket) kernel a narrowed build lacks
are skipped with the reason.

Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import pytest
import torch

from accuracy import (
    FORWARD_FACTOR,
    allocates_no_device_memory,
    VarlenBatch,
    assert_all_written,
    assert_bitwise_equal,
    assert_lse_within_tolerance,
    assert_within_tolerance,
    cu_seqlens_from_lengths,
    dtype_name,
    make_fixed_batch,
    make_varlen_batch,
    output_nbytes,
    poison_freed_blocks,
    random_lengths,
    require_kernel,
    rows_without_keys,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 40, 64, 72, 96, 128, 160, 192, 256]
SEQLEN_PAIRS = [(1, 147), (113, 203), (1023, 1024), (1024, 1023), (2048, 2048), (3, 1)]
# The head-layout axis multiplies the case count; on the most expensive pair MHA alone runs.
MHA_ONLY_PAIRS = {(2048, 2048)}
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
FIXED_BATCH = 2
# The varlen matrix packs the named pair with this many shorter random sequences.
EXTRA_SEQUENCES = 2

# Edge-case tests that are not about dtype or head dim use the configuration that every
# (even narrowed) development build contains.
DEFAULT_DTYPE = torch.bfloat16
DEFAULT_HEAD_DIM = 128

LARGE_INPUT_SCALE = 10.0
EXPLICIT_SOFTMAX_SCALE = 0.3
# Extra columns of a wider buffer that q/k/v are sliced from (keeps rows 16-byte aligned).
HEAD_STRIDE_PADDING = 8
# About 0.1 s of GPU time on an H100: long enough that a kernel launched on another stream
# would run before the side stream has written its inputs.
SIDE_STREAM_DELAY_CYCLES = 200_000_000
MEMORY_TEST_LENGTHS = [32768, 16384, 8192, 4096, 4096]  # 64k tokens in all
MEMORY_SLACK_FACTOR = 3
MEMORY_SLACK_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _api() -> Any:
    """The flash_varlen package, imported on first use so collection never needs it."""
    import flash_varlen

    return flash_varlen


def _reference() -> Any:
    """The pure PyTorch reference module flash_varlen.reference."""
    import flash_varlen.reference

    return flash_varlen.reference


def _pair_id(seqlens: tuple[int, int]) -> str:
    return f"q{seqlens[0]}k{seqlens[1]}"


def varlen_forward(batch: VarlenBatch, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisoned call of flash_attn_varlen_func on `batch`: out (total_q, h, d), lse (h, total_q)."""
    q = batch.q
    poison_freed_blocks(output_nbytes(q, q.shape[0] * q.shape[1]), q.device)
    out, lse, _ = _api().flash_attn_varlen_func(
        *varlen_args(batch), return_attn_probs=True, **kwargs
    )
    assert_all_written(out, lse, "varlen forward")
    return out, lse


def fixed_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisoned call of flash_attn_func: out (b, s_q, h, d), lse (b, h, s_q)."""
    poison_freed_blocks(output_nbytes(q, q.numel() // q.shape[-1]), q.device)
    out, lse, _ = _api().flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    assert_all_written(out, lse, "fixed-length forward")
    return out, lse


def assert_empty_rows_exact(
    out: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor, name: str
) -> None:
    """Rows in `empty` are exactly 0 with lse -inf; every other lse is finite.

    out: (total_q, h, d); lse: (h, total_q); empty: (total_q,) bool.
    """
    assert bool((out[empty] == 0).all()), f"{name}: a row that sees no key has nonzero output"
    assert bool(torch.isneginf(lse[:, empty]).all()), f"{name}: a row without keys has lse != -inf"
    assert bool(torch.isfinite(lse[:, ~empty]).all()), f"{name}: a row with keys has lse not finite"


def check_varlen(
    batch: VarlenBatch,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    name: str,
    softmax_scale: float | None = None,
) -> None:
    """Shapes, tolerance rule for out and lse, and exact empty rows of a varlen result."""
    total_q, nheads, _ = batch.q.shape
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype, f"{name}: out shape/dtype"
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32, f"{name}: lse shape"
    reference = _reference()
    args = (batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k)
    ref_out, ref_lse = reference.attention_ref_varlen(
        *args, softmax_scale=softmax_scale, causal=causal
    )
    low_out, low_lse = reference.attention_ref_varlen(
        *args, softmax_scale=softmax_scale, causal=causal, compute_dtype=batch.q.dtype
    )
    assert_within_tolerance(out, ref_out, low_out, FORWARD_FACTOR, f"{name} out")
    assert_lse_within_tolerance(lse, ref_lse, low_lse, FORWARD_FACTOR, f"{name} lse")
    empty = rows_without_keys(batch.seqlens_q, batch.seqlens_k, causal, DEVICE)
    assert_empty_rows_exact(out, lse, empty, name)


def fixed_as_varlen(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length results in the varlen layout.

    out: (b, s, h, d) -> (b*s, h, d); lse: (b, h, s) -> (h, b*s).
    """
    batch, seqlen, nheads, head_dim = out.shape
    packed_lse = lse.permute(1, 0, 2).reshape(nheads, batch * seqlen)
    return out.reshape(batch * seqlen, nheads, head_dim), packed_lse


def check_fixed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    name: str,
    softmax_scale: float | None = None,
) -> None:
    """Shapes, tolerance rule for out and lse, and exact empty rows of a fixed-length result."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    assert out.shape == q.shape and out.dtype == q.dtype, f"{name}: out shape/dtype"
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32, f"{name}: lse"
    reference = _reference()
    ref_out, ref_lse = reference.attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal)
    low_out, low_lse = reference.attention_ref(
        q, k, v, softmax_scale=softmax_scale, causal=causal, compute_dtype=q.dtype
    )
    assert_within_tolerance(out, ref_out, low_out, FORWARD_FACTOR, f"{name} out")
    assert_lse_within_tolerance(lse, ref_lse, low_lse, FORWARD_FACTOR, f"{name} lse")
    empty = rows_without_keys((seqlen_q,) * batch, (seqlen_k,) * batch, causal, DEVICE)
    assert_empty_rows_exact(*fixed_as_varlen(out, lse), empty, name)


def default_batch(
    seqlens_q: list[int], seqlens_k: list[int], nheads: int = 4, nheads_k: int = 2, seed: int = 0
) -> VarlenBatch:
    """A batch in the default configuration (skips the test if this build lacks it)."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    return make_varlen_batch(
        seqlens_q, seqlens_k, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE, seed=seed
    )


def varlen_args(batch: VarlenBatch) -> tuple[Any, ...]:
    """The positional arguments of flash_attn_varlen_func for `batch`."""
    return (
        batch.q,
        batch.k,
        batch.v,
        batch.cu_seqlens_q,
        batch.cu_seqlens_k,
        batch.max_seqlen_q,
        batch.max_seqlen_k,
    )


# ----------------------------------------------------------------------------------------------
# The accuracy matrix: dtype x head dim x causal x (seqlen_q, seqlen_k) x head layout
# ----------------------------------------------------------------------------------------------


def _matrix_cases() -> list[Any]:
    """Full cross product, except that MHA_ONLY_PAIRS run with MHA alone."""
    cases = []
    axes = itertools.product(DTYPES, HEAD_DIMS, (False, True), SEQLEN_PAIRS, HEAD_LAYOUTS)
    for dtype, head_dim, causal, pair, layout in axes:
        if pair in MHA_ONLY_PAIRS and layout != "mha":
            continue
        mask = "causal" if causal else "full"
        case_id = f"{dtype_name(dtype)}-d{head_dim}-{mask}-{_pair_id(pair)}-{layout}"
        cases.append(pytest.param(dtype, head_dim, causal, pair, layout, id=case_id))
    return cases


MATRIX = _matrix_cases()
MATRIX_ARGS = "dtype, head_dim, causal, seqlens, layout"


@pytest.mark.parametrize(MATRIX_ARGS, MATRIX)
def test_fixed_length_matches_reference(
    dtype: torch.dtype, head_dim: int, causal: bool, seqlens: tuple[int, int], layout: str
) -> None:
    require_kernel(dtype, head_dim)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    q, k, v = make_fixed_batch(FIXED_BATCH, *seqlens, nheads, nheads_k, head_dim, dtype, DEVICE)
    out, lse = fixed_forward(q, k, v, causal=causal)
    check_fixed(q, k, v, out, lse, causal, "flash_attn_func")


@pytest.mark.parametrize(MATRIX_ARGS, MATRIX)
def test_varlen_matches_reference(
    dtype: torch.dtype, head_dim: int, causal: bool, seqlens: tuple[int, int], layout: str
) -> None:
    require_kernel(dtype, head_dim)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    seqlen_q, seqlen_k = seqlens
    # The named pair first, then shorter sequences so that lengths and offsets vary in the pack.
    seqlens_q = [seqlen_q] + random_lengths(EXTRA_SEQUENCES, 1, seqlen_q, seed=1)
    seqlens_k = [seqlen_k] + random_lengths(EXTRA_SEQUENCES, 1, seqlen_k, seed=2)
    batch = make_varlen_batch(seqlens_q, seqlens_k, nheads, nheads_k, head_dim, dtype, DEVICE)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, "flash_attn_varlen_func")


# ----------------------------------------------------------------------------------------------
# Varlen batches: empty sequences, one sequence, many short ones, long ones, uneven q/k
# ----------------------------------------------------------------------------------------------

EMPTY_LAYOUTS = {
    "q_empty_start": ([0, 45, 130], [19, 70, 130]),
    "k_empty_start": ([23, 45, 130], [0, 70, 130]),
    "both_empty_start": ([0, 45, 130], [0, 70, 130]),
    "q_empty_end": ([45, 130, 0], [70, 130, 19]),
    "k_empty_end": ([45, 130, 23], [70, 130, 0]),
    "both_empty_end": ([45, 130, 0], [70, 130, 0]),
    "mixed_middle": ([45, 0, 0, 31, 130, 7], [70, 0, 19, 0, 130, 7]),
    "all_k_empty": ([45, 130], [0, 0]),
    "all_empty": ([0, 0, 0], [0, 0, 0]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("layout", list(EMPTY_LAYOUTS))
def test_varlen_empty_sequences(layout: str, dtype: torch.dtype, causal: bool) -> None:
    require_kernel(dtype, DEFAULT_HEAD_DIM)
    seqlens_q, seqlens_k = EMPTY_LAYOUTS[layout]
    batch = make_varlen_batch(seqlens_q, seqlens_k, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, f"empty sequences {layout}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(1, 1), (77, 77), (300, 129), (129, 300)], ids=_pair_id)
def test_varlen_single_sequence(seqlens: tuple[int, int], causal: bool) -> None:
    batch = default_batch([seqlens[0]], [seqlens[1]])
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, "single sequence")


SHORT_SEQUENCE_COUNT = 300
SHORT_SEQUENCE_MAX = 200


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("same_lengths", [True, False], ids=["q_eq_k", "q_ne_k"])
def test_varlen_many_short_sequences(same_lengths: bool, dtype: torch.dtype, causal: bool) -> None:
    require_kernel(dtype, DEFAULT_HEAD_DIM)
    seqlens_q = random_lengths(SHORT_SEQUENCE_COUNT, 1, SHORT_SEQUENCE_MAX, seed=3)
    seqlens_k = seqlens_q if same_lengths else random_lengths(
        SHORT_SEQUENCE_COUNT, 1, SHORT_SEQUENCE_MAX, seed=4
    )
    batch = make_varlen_batch(seqlens_q, seqlens_k, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, f"{SHORT_SEQUENCE_COUNT} short sequences")


LONG_SEQUENCE_LENGTHS = [7, 16384, 100, 1, 2047]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_long_sequence(causal: bool) -> None:
    batch = default_batch(LONG_SEQUENCE_LENGTHS, LONG_SEQUENCE_LENGTHS)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, "16k sequence")


# One long document among many tiny (and some empty) sequences: the varlen tile schedule's
# longest-first order and its upper-bound grid (kernels/common/varlen_tile_schedule.h).
SKEWED_LONG_LENGTH = 3000
SKEWED_TINY_COUNT = 2500
SKEWED_TINY_MAX = 9


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_one_long_sequence_among_thousands(causal: bool) -> None:
    tiny_q = random_lengths(SKEWED_TINY_COUNT, 0, SKEWED_TINY_MAX, seed=5)
    tiny_k = random_lengths(SKEWED_TINY_COUNT, 0, SKEWED_TINY_MAX, seed=6)
    middle = SKEWED_TINY_COUNT // 2
    seqlens_q = [*tiny_q[:middle], SKEWED_LONG_LENGTH, *tiny_q[middle:]]
    seqlens_k = [*tiny_k[:middle], SKEWED_LONG_LENGTH - 1, *tiny_k[middle:]]
    batch = default_batch(seqlens_q, seqlens_k)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, "one long sequence among thousands")


UNEVEN_LENGTHS = {
    "q_longer": ([100, 257, 300, 64], [37, 250, 1, 63]),
    "k_longer": ([37, 7, 250, 1], [100, 250, 300, 64]),
    "mixed": ([100, 7, 300, 1], [37, 250, 300, 64]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("layout", list(UNEVEN_LENGTHS))
def test_varlen_seqlen_q_differs_from_seqlen_k(
    layout: str, dtype: torch.dtype, causal: bool
) -> None:
    require_kernel(dtype, DEFAULT_HEAD_DIM)
    seqlens_q, seqlens_k = UNEVEN_LENGTHS[layout]
    batch = make_varlen_batch(seqlens_q, seqlens_k, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, f"uneven lengths {layout}")


# ----------------------------------------------------------------------------------------------
# Numerics: large inputs, softmax scale, rows without keys
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_magnitude_inputs(dtype: torch.dtype, head_dim: int, causal: bool) -> None:
    """Inputs scaled by 10: scores in the hundreds overflow exp unless the max is subtracted."""
    require_kernel(dtype, head_dim)
    lengths = [300, 129, 1000]
    batch = make_varlen_batch(
        lengths, lengths, 4, 2, head_dim, dtype, DEVICE, scale=LARGE_INPUT_SCALE
    )
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, "inputs x10")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("trend", ["rising", "falling"])
def test_row_maxima_that_change_from_key_block_to_key_block(
    trend: str, dtype: torch.dtype, causal: bool
) -> None:
    """Scores that rise (or fall) steadily along the keys, by a rate that differs per query row.

    The kernels visit key blocks from the last down: with "rising" scores toward the first key,
    every block raises the row maximum, by 0.25 to 4 in exp2's argument per block of 128 keys
    depending on the row, so the running maximum and the output's rescaling change at every step
    in some rows and stay nearly put in others of the same warp (the case a conditional rescale
    must get right: it keeps an old maximum while the growth is small and must use that same
    reference for the sums and the output); over 2048 keys the maximum moves by up to 64 powers
    of two. "falling": the first visited block holds every row's maximum.
    """
    require_kernel(dtype, DEFAULT_HEAD_DIM)
    lengths = [2048, 700]
    batch = make_varlen_batch(lengths, lengths, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    softmax_scale = 1.0 / math.sqrt(DEFAULT_HEAD_DIM)
    exp2_growth_per_key = torch.empty(batch.q.shape[:2], device=DEVICE).uniform_(0.25, 4) / 128
    for start, length in zip(batch.cu_seqlens_k[:-1].tolist(), lengths):
        position = torch.arange(length, device=DEVICE, dtype=torch.float32)
        along = length - 1 - position if trend == "rising" else position
        # Score (natural log) of query row i and key j from component 0: q[i, 0] * k[j, 0] *
        # scale = ln 2 * growth_i * along_j; the other components add N(0, d) noise.
        batch.k[start : start + length, :, 0] = (along / 32).unsqueeze(1).to(dtype)
    batch.q[:, :, 0] = (exp2_growth_per_key * 32 * math.log(2) / softmax_scale).to(dtype)
    out, lse = varlen_forward(batch, causal=causal)
    check_varlen(batch, out, lse, causal, f"{trend} row maxima")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_softmax_scale(causal: bool) -> None:
    batch = default_batch([200, 33, 517], [150, 33, 600])
    out, lse = varlen_forward(batch, causal=causal, softmax_scale=EXPLICIT_SOFTMAX_SCALE)
    check_varlen(batch, out, lse, causal, "softmax_scale=0.3", EXPLICIT_SOFTMAX_SCALE)
    default_out, default_lse = varlen_forward(batch, causal=causal)
    assert not torch.equal(out, default_out), "softmax_scale=0.3 gave the default-scale output"
    spelled_out, spelled_lse = varlen_forward(
        batch, causal=causal, softmax_scale=1.0 / math.sqrt(DEFAULT_HEAD_DIM)
    )
    assert_bitwise_equal(default_out, spelled_out, "default vs explicit 1/sqrt(d) out")
    assert_bitwise_equal(default_lse, spelled_lse, "default vs explicit 1/sqrt(d) lse")


def test_causal_rows_without_keys_varlen() -> None:
    """seqlen_q > seqlen_k under causal leaves the first rows blind; seqlen_k == 0 blinds all."""
    batch = default_batch([10, 40, 5, 3], [4, 40, 0, 1])
    out, lse = varlen_forward(batch, causal=True)
    empty = rows_without_keys(batch.seqlens_q, batch.seqlens_k, True, DEVICE)
    expected_blind = (10 - 4) + 0 + 5 + (3 - 1)
    assert int(empty.sum()) == expected_blind
    assert_empty_rows_exact(out, lse, empty, "causal rows without keys")
    check_varlen(batch, out, lse, True, "causal rows without keys")


# Far more tiles than SMs, so that each thread block of a persistent grid (the sm90 family) runs
# many: row blocks that see no key (seqlen_q > seqlen_k under causal; seqlen_k == 0) between
# ones that do. Lengths close together take the grid order (which also skips row blocks past a
# sequence's end); one long sequence among short ones takes the longest-first schedule.
BLIND_TILE_SEQUENCES = 400
BLIND_TILE_LENGTHS = {"close": (200, 390, None), "one_long": (0, 300, 4000)}


@pytest.mark.parametrize("lengths", list(BLIND_TILE_LENGTHS))
def test_many_tiles_per_block_with_blind_row_blocks(lengths: str) -> None:
    low, high, long_length = BLIND_TILE_LENGTHS[lengths]
    seqlens_q = random_lengths(BLIND_TILE_SEQUENCES, low, high, seed=7)
    if long_length is not None:
        seqlens_q[BLIND_TILE_SEQUENCES // 3] = long_length
    # Keys: a third of the queries, every tenth sequence none at all.
    seqlens_k = [0 if i % 10 == 0 else n // 3 for i, n in enumerate(seqlens_q)]
    batch = default_batch(seqlens_q, seqlens_k)
    out, lse = varlen_forward(batch, causal=True)
    empty = rows_without_keys(batch.seqlens_q, batch.seqlens_k, True, DEVICE)
    assert int(empty.sum()) > 0
    assert_empty_rows_exact(out, lse, empty, f"blind row blocks ({lengths})")
    check_varlen(batch, out, lse, True, f"many tiles per block ({lengths})")


def test_causal_rows_without_keys_fixed() -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    seqlen_q, seqlen_k = 10, 4
    q, k, v = make_fixed_batch(2, seqlen_q, seqlen_k, 4, 2, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE)
    out, lse = fixed_forward(q, k, v, causal=True)
    blind = seqlen_q - seqlen_k
    assert bool((out[:, :blind] == 0).all()), "blind rows must be exactly 0"
    assert bool(torch.isneginf(lse[:, :, :blind]).all()), "blind rows must have lse -inf"
    assert bool(torch.isfinite(lse[:, :, blind:]).all()), "rows with keys must have finite lse"
    check_fixed(q, k, v, out, lse, True, "fixed causal rows without keys")


# Rows of NaN/inf appended to k and v past cu_seqlens_k[-1]: more than one key tile of any family.
TAIL_ROWS_PAST_END = 300


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_varlen_non_finite_keys_elsewhere_do_not_leak(poison: float, causal: bool) -> None:
    """One sequence's keys and values, and rows past cu_seqlens_k[-1], hold NaN or inf: every
    other sequence's result stays within tolerance.

    A kernel may load whole key tiles that run past a sequence end (the sm90 family's TMA tiles
    do); the scores of those rows are masked, but P = 0 times a non-finite value is NaN, so the
    rows must never reach O += P V. Lengths end mid-tile for every family's tile widths.
    """
    seqlens_q = [130, 77, 1, 300, 45]
    seqlens_k = [203, 77, 5, 129, 1]
    clean = default_batch(seqlens_q, seqlens_k)
    ref_out, ref_lse = _reference().attention_ref_varlen(
        *varlen_args(clean)[:5], causal=causal
    )
    low_out, low_lse = _reference().attention_ref_varlen(
        *varlen_args(clean)[:5], causal=causal, compute_dtype=clean.q.dtype
    )
    starts_q = clean.cu_seqlens_q.tolist()
    starts_k = clean.cu_seqlens_k.tolist()
    for poisoned in range(len(seqlens_q)):
        tail = torch.full_like(clean.k[:TAIL_ROWS_PAST_END], poison)
        k, v = (torch.cat([x, tail]) for x in (clean.k, clean.v))
        k[starts_k[poisoned] : starts_k[poisoned + 1]] = poison
        v[starts_k[poisoned] : starts_k[poisoned + 1]] = poison
        # Not varlen_forward: the poisoned sequence's own rows are not finite, by design.
        out, lse, _ = _api().flash_attn_varlen_func(
            *varlen_args(dataclasses.replace(clean, k=k, v=v)), causal=causal,
            return_attn_probs=True,
        )
        others = torch.ones(clean.q.shape[0], dtype=torch.bool, device=DEVICE)
        others[starts_q[poisoned] : starts_q[poisoned + 1]] = False
        name = f"sequence {poisoned} poisoned with {poison}"
        assert_within_tolerance(
            out[others], ref_out[others], low_out[others], FORWARD_FACTOR, f"{name}: out"
        )
        assert_lse_within_tolerance(
            lse[:, others], ref_lse[:, others], low_lse[:, others], FORWARD_FACTOR, f"{name}: lse"
        )


# ----------------------------------------------------------------------------------------------
# Layouts: non-contiguous views and the packed API variants
# ----------------------------------------------------------------------------------------------


def padded_head_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` as the first d columns of a NaN-filled wider buffer (row stride d + padding)."""
    head_dim = x.shape[-1]
    wide_shape = (*x.shape[:-1], head_dim + HEAD_STRIDE_PADDING)
    buffer = torch.full(wide_shape, float("nan"), dtype=x.dtype, device=x.device)
    buffer[..., :head_dim] = x
    return buffer[..., :head_dim]


def heads_before_tokens(x: torch.Tensor) -> torch.Tensor:
    """`x` (..., tokens, h, d) stored as (..., h, tokens, d) and seen transposed.

    For the fixed-length layout this is the (b, h, s, d) storage common in transformer code.
    """
    return x.transpose(-3, -2).contiguous().transpose(-3, -2)


def packed_views(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors stacked at dim -3 (like qkv / kv) and handed back as views into that pack."""
    return torch.stack(tensors, dim=-3).unbind(dim=-3)


Restride = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
RESTRIDES: dict[str, Restride] = {
    "qkv_slices": packed_views,
    "kv_slices": lambda q, k, v: (q, *packed_views(k, v)),
    "padded_head_stride": lambda q, k, v: tuple(padded_head_stride(x) for x in (q, k, v)),
    "heads_before_tokens": lambda q, k, v: tuple(heads_before_tokens(x) for x in (q, k, v)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("restride", list(RESTRIDES))
def test_varlen_non_contiguous_inputs(restride: str, causal: bool) -> None:
    lengths = [129, 1, 300]
    batch = default_batch(lengths, lengths, nheads=4, nheads_k=4)
    q, k, v = RESTRIDES[restride](batch.q, batch.k, batch.v)
    assert not all(x.is_contiguous() for x in (q, k, v)), "the layout must be non-contiguous"
    strided = dataclasses.replace(batch, q=q, k=k, v=v)
    out, lse = varlen_forward(strided, causal=causal)
    check_varlen(batch, out, lse, causal, f"varlen {restride}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("restride", list(RESTRIDES))
def test_fixed_non_contiguous_inputs(restride: str, causal: bool) -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    q, k, v = make_fixed_batch(2, 257, 257, 4, 4, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE)
    strided = RESTRIDES[restride](q, k, v)
    assert not all(x.is_contiguous() for x in strided), "the layout must be non-contiguous"
    out, lse = fixed_forward(*strided, causal=causal)
    check_fixed(q, k, v, out, lse, causal, f"fixed {restride}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_packed_variants_match_unpacked(causal: bool) -> None:
    lengths = [129, 1, 300, 64]
    batch = default_batch(lengths, lengths, nheads=4, nheads_k=4)
    api = _api()
    qkv = torch.stack([batch.q, batch.k, batch.v], dim=1)  # (total, 3, h, d)
    cu, max_len = batch.cu_seqlens_q, batch.max_seqlen_q
    expected = api.flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max_len, max_len,
        causal=causal, return_attn_probs=True,
    )
    got = api.flash_attn_varlen_qkvpacked_func(
        qkv, cu, max_len, causal=causal, return_attn_probs=True
    )
    assert_bitwise_equal(got[0], expected[0], "varlen qkvpacked out")
    assert_bitwise_equal(got[1], expected[1], "varlen qkvpacked lse")

    kv = torch.stack([batch.k, batch.v], dim=1)  # (total_k, 2, h_k, d)
    expected = api.flash_attn_varlen_func(
        batch.q, kv[:, 0], kv[:, 1], cu, cu, max_len, max_len,
        causal=causal, return_attn_probs=True,
    )
    got = api.flash_attn_varlen_kvpacked_func(
        batch.q, kv, cu, cu, max_len, max_len, causal=causal, return_attn_probs=True
    )
    assert_bitwise_equal(got[0], expected[0], "varlen kvpacked out")
    assert_bitwise_equal(got[1], expected[1], "varlen kvpacked lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fixed_packed_variants_match_unpacked(causal: bool) -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    api = _api()
    q, k, v = make_fixed_batch(2, 300, 300, 4, 4, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE)
    qkv = torch.stack([q, k, v], dim=2)  # (b, s, 3, h, d)
    expected = api.flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal, return_attn_probs=True
    )
    got = api.flash_attn_qkvpacked_func(qkv, causal=causal, return_attn_probs=True)
    assert_bitwise_equal(got[0], expected[0], "qkvpacked out")
    assert_bitwise_equal(got[1], expected[1], "qkvpacked lse")

    kv = torch.stack([k, v], dim=2)  # (b, s_k, 2, h_k, d)
    expected = api.flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], causal=causal, return_attn_probs=True
    )
    got = api.flash_attn_kvpacked_func(q, kv, causal=causal, return_attn_probs=True)
    assert_bitwise_equal(got[0], expected[0], "kvpacked out")
    assert_bitwise_equal(got[1], expected[1], "kvpacked lse")


# ----------------------------------------------------------------------------------------------
# Reproducibility: determinism, one code path, torch.compile, streams
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_is_deterministic(causal: bool) -> None:
    seqlens_q = random_lengths(50, 0, 700, seed=5)
    seqlens_k = random_lengths(50, 0, 700, seed=6)
    batch = default_batch(seqlens_q, seqlens_k)
    first_out, first_lse = varlen_forward(batch, causal=causal)
    second_out, second_lse = varlen_forward(batch, causal=causal)
    assert_bitwise_equal(second_out, first_out, "repeated out")
    assert_bitwise_equal(second_lse, first_lse, "repeated lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(333, 517), (517, 333), (256, 256)], ids=_pair_id)
def test_fixed_and_varlen_agree_bitwise(seqlens: tuple[int, int], causal: bool) -> None:
    """The fixed-length entry is the varlen path with uniform lengths: identical bits."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch_size, (seqlen_q, seqlen_k) = 3, seqlens
    q, k, v = make_fixed_batch(
        batch_size, seqlen_q, seqlen_k, 4, 2, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    fixed_out, fixed_lse = fixed_forward(q, k, v, causal=causal)
    packed = VarlenBatch(
        q=q.flatten(0, 1),
        k=k.flatten(0, 1),
        v=v.flatten(0, 1),
        cu_seqlens_q=cu_seqlens_from_lengths([seqlen_q] * batch_size, DEVICE),
        cu_seqlens_k=cu_seqlens_from_lengths([seqlen_k] * batch_size, DEVICE),
        max_seqlen_q=seqlen_q,
        max_seqlen_k=seqlen_k,
        seqlens_q=(seqlen_q,) * batch_size,
        seqlens_k=(seqlen_k,) * batch_size,
    )
    varlen_out, varlen_lse = varlen_forward(packed, causal=causal)
    as_varlen_out, as_varlen_lse = fixed_as_varlen(fixed_out, fixed_lse)
    assert_bitwise_equal(as_varlen_out, varlen_out, "fixed vs varlen out")
    assert_bitwise_equal(as_varlen_lse, varlen_lse, "fixed vs varlen lse")


def test_torch_compile_fullgraph_matches_eager() -> None:
    batch = default_batch([129, 0, 300, 64], [200, 17, 300, 1])
    api = _api()

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, _ = api.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, batch.max_seqlen_q, batch.max_seqlen_k,
            causal=True, return_attn_probs=True,
        )
        return out, lse

    args = (batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k)
    eager_out, eager_lse = attend(*args)
    compiled_out, compiled_lse = torch.compile(attend, fullgraph=True)(*args)
    assert_bitwise_equal(compiled_out, eager_out, "compiled out")
    assert_bitwise_equal(compiled_lse, eager_lse, "compiled lse")


def test_runs_on_the_current_stream() -> None:
    """Inputs written on a side stream after a delay: a kernel on any other stream reads NaN."""
    batch = default_batch([129, 1, 300], [200, 17, 300])
    expected_out, expected_lse = varlen_forward(batch, causal=True)
    staged = [torch.full_like(x, float("nan")) for x in (batch.q, batch.k, batch.v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SIDE_STREAM_DELAY_CYCLES)
        for target, source in zip(staged, (batch.q, batch.k, batch.v)):
            target.copy_(source)
        out, lse, _ = _api().flash_attn_varlen_func(
            *staged, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, causal=True, return_attn_probs=True,
        )
    torch.cuda.synchronize()
    assert_bitwise_equal(out, expected_out, "side-stream out")
    assert_bitwise_equal(lse, expected_lse, "side-stream lse")


# ----------------------------------------------------------------------------------------------
# API contract: return values, validation before any kernel, narrowed builds, memory
# ----------------------------------------------------------------------------------------------


def test_return_attn_probs_varlen() -> None:
    batch = default_batch([129, 0, 300], [200, 17, 300])
    api = _api()
    result = api.flash_attn_varlen_func(*varlen_args(batch), causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3 and result[2] is None
    out, lse, _ = result
    total_q, nheads, _ = batch.q.shape
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32
    plain = api.flash_attn_varlen_func(*varlen_args(batch), causal=True)
    assert isinstance(plain, torch.Tensor), "without return_attn_probs only out is returned"
    assert_bitwise_equal(plain, out, "out with and without return_attn_probs")


def test_return_attn_probs_fixed() -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    api = _api()
    q, k, v = make_fixed_batch(2, 100, 150, 4, 2, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE)
    result = api.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3 and result[2] is None
    out, lse, _ = result
    assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    plain = api.flash_attn_func(q, k, v, causal=True)
    assert isinstance(plain, torch.Tensor), "without return_attn_probs only out is returned"
    assert_bitwise_equal(plain, out, "out with and without return_attn_probs")


def test_nheads_not_multiple_of_nheads_k_rejected_before_any_kernel() -> None:
    lengths = [17, 30]
    batch = default_batch(lengths, lengths, nheads=5, nheads_k=2)
    with allocates_no_device_memory(), pytest.raises(ValueError, match="nheads_k"):
        _api().flash_attn_varlen_func(*varlen_args(batch))


def test_missing_kernels_raise_not_implemented() -> None:
    """A narrowed build refuses (dtype, bucket) pairs it lacks instead of returning garbage."""
    from flash_varlen._extension import compiled_kernels, load_extension

    compiled = {(name, bucket) for _, name, bucket in compiled_kernels()}
    missing = [
        (dtype, bucket)
        for dtype in DTYPES
        for bucket in load_extension().head_dim_buckets()
        if (dtype_name(dtype), bucket) not in compiled
    ]
    if not missing:
        pytest.skip("full build: every (dtype, head-dim bucket) kernel is compiled")
    for dtype, bucket in missing:
        batch = make_varlen_batch([9, 4], [9, 4], 2, 2, bucket, dtype, DEVICE)
        with pytest.raises(NotImplementedError):
            _api().flash_attn_varlen_func(*varlen_args(batch))


def test_extension_entry_point_directly() -> None:
    """_C.varlen_fwd without the Python layer: same contract, including rows without keys."""
    from flash_varlen._extension import load_extension

    batch = default_batch([45, 0, 130, 10, 23], [70, 19, 130, 4, 0])
    scale = 1.0 / math.sqrt(DEFAULT_HEAD_DIM)
    q = batch.q
    poison_freed_blocks(output_nbytes(q, q.shape[0] * q.shape[1]), q.device)
    out, lse, *_ = load_extension().varlen_fwd(*varlen_args(batch), scale, True)
    assert_all_written(out, lse, "_C.varlen_fwd")
    check_varlen(batch, out, lse, True, "_C.varlen_fwd")


def test_memory_is_linear_in_tokens() -> None:
    """64k tokens with a 32k sequence: an O(seqlen^2) buffer would show up in the peak."""
    batch = default_batch(MEMORY_TEST_LENGTHS, MEMORY_TEST_LENGTHS, nheads=8, nheads_k=8)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse, _ = _api().flash_attn_varlen_func(
        *varlen_args(batch), causal=True, return_attn_probs=True
    )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    output_bytes = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    limit = MEMORY_SLACK_FACTOR * output_bytes + MEMORY_SLACK_BYTES
    assert peak < limit, f"peak {peak} bytes for {output_bytes} bytes of outputs (limit {limit})"
    assert_all_written(out, lse, "64k tokens")
