"""GPU tests of the backward pass: gradients against the PyTorch reference, edge cases, contract.

Every kernel gradient (dq, dk, dv) is checked with the tolerance rule of design.md
(tests/accuracy.py, GRADIENT_FACTOR): the reference gradients come from torch.autograd through
flash_varlen.reference on the GPU, once in float32 (the truth) and once in the input dtype (the
error PyTorch itself makes, which sets the allowed error). Gradient buffers are NaN-poisoned
through the caching allocator before each backward, rows that see nothing must get exactly 0,
and nothing may be NaN. Cases whose (dtype, head-dim bucket) kernel a narrowed build lacks are
skipped with the reason.

Determinism contract tested here: dk and dv are bitwise reproducible always; dq only with
deterministic=True (or torch.use_deterministic_algorithms(True)). Comparisons that involve dq
across two calls therefore pass deterministic=True.

Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import pytest
import torch

from accuracy import (
    GRADIENT_NAMES,
    VarlenBatch,
    assert_bitwise_equal,
    assert_gradients_within_tolerance,
    assert_rows_zero,
    device_generator,
    dtype_name,
    gradient_nbytes,
    head_dim_bucket,
    keys_without_queries,
    make_fixed_batch,
    make_varlen_batch,
    poison_freed_blocks,
    random_lengths,
    require_backward_kernel,
    rows_without_keys,
    seeded_randn,
    varlen_from_fixed,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(dq, dk, dv), shaped like (q, k, v)."""

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 40, 64, 72, 96, 128, 160, 192, 256]
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
SEQLEN_PAIRS = [(1, 147), (113, 203), (1023, 1024), (1024, 1023), (2048, 2048), (3, 1)]
# The head-layout axis multiplies the case count; on the most expensive pair MHA alone runs.
MHA_ONLY_PAIRS = {(2048, 2048)}
FIXED_BATCH = 2
# The length-pair tests pack the named pair with this many shorter random sequences.
EXTRA_SEQUENCES = 2

# The dtype x head dim x causal x layout matrix runs on one moderate batch that has
# seqlen_q > seqlen_k and seqlen_q < seqlen_k, a single-row sequence and tails that are not
# tile multiples (causal then leaves rows without keys); the fixed-length matrix on one pair.
MATRIX_SEQLENS_Q = (113, 203, 1, 64, 257)
MATRIX_SEQLENS_K = (203, 113, 147, 64, 1)
MATRIX_FIXED_SEQLENS = (113, 203)

# Tests that are not about dtype or head dim use the configuration that every (even narrowed)
# development build contains.
DEFAULT_DTYPE = torch.bfloat16
DEFAULT_HEAD_DIM = 128

# Seeds of the upstream gradients (the batches use seed 0).
DOUT_SEED = 1
DLSE_SEED = 2

LARGE_INPUT_SCALE = 10.0
# A case built for large dS = P * (dP - rowsum(dO * O)): q and k at 2x give scores of standard
# deviation 4, so P spreads over a few competing keys instead of one; v and dout at 8x give
# dP = dO . v a standard deviation of 64 * sqrt(d) (512 to 1024 for d = 64 to 256, extremes
# about 5x that), so |dS| reaches thousands, while every true gradient and every intermediate
# of the float16 reference stays inside float16's range (65504). Powers of two keep the scaled
# inputs exact.
LARGE_DS_QK_SCALE = 2.0
LARGE_DS_VALUE_SCALE = 8.0
LARGE_MAGNITUDE_HEAD_DIMS = [64, 128, 256]
EXPLICIT_SOFTMAX_SCALE = 0.3

# Extra columns of a wider buffer that dout is sliced from (keeps rows 16-byte aligned).
HEAD_STRIDE_PADDING = 8
# Rows past cu_seqlens[-1] in the tensors given to _C.varlen_bwd (not a tile multiple).
TAIL_ROWS = 37

# Race hunting: enough tokens and heads that many thread blocks add into the same dq rows at
# once, with uneven sequences so that blocks finish at different times.
REPEAT_RUNS = 50
REPEAT_LENGTHS = [3001, 2500, 1700, 1000, 129, 37]  # 8367 tokens
REPEAT_LAYOUTS = {"mha": (16, 16), "gqa": (16, 4)}
DETERMINISM_RUNS = 20

# GQA memory: 32 query heads share 4 kv heads, so a full-size (nheads) dk or dv temporary
# would be 8x the size of dk and stand far above the allowance below.
GQA_MEMORY_LENGTHS = [4096, 2048, 1024, 1024]
GQA_MEMORY_HEADS = (32, 4)
# The dq accumulator may be padded to whole row blocks per sequence (128 rows is the largest
# row block of any kernel configuration).
DQ_ACCUM_PAD_ROWS_PER_SEQUENCE = 128
# Per-row float32 vectors a backward may hold: dot(dO, O), a rescaled copy of softmax_lse, a
# zero softmax_lse gradient, and one spare.
BACKWARD_ROW_VECTORS = 4
# Semaphores for deterministic mode, small workspaces, allocator rounding.
BACKWARD_MEMORY_SLACK_BYTES = 8 << 20

# Memory linearity: 4x the tokens (a few long sequences) must cost about 4x the memory; any
# O(seqlen^2) buffer would make it 16x.
LINEAR_MEMORY_SMALL_LENGTHS = [8192, 4096, 4096]  # 16k tokens
LINEAR_MEMORY_LARGE_LENGTHS = [32768, 16384, 16384]  # 64k tokens
LINEAR_MEMORY_HEADS = 8
LINEAR_PEAK_RATIO_LIMIT = 5.0

# Training: predict the previous token of random packed sequences. Checked with the float32
# reference in place of the kernel (CPU, 4 seeds): the loss falls from ln(16) = 2.77 to about
# 0.01 within 60 steps; with the q and k gradients cut it stays above 2.4.
TRAIN_VOCAB = 16
TRAIN_HEADS = 2
TRAIN_SEQUENCES = 16
TRAIN_MIN_LENGTH = 8
TRAIN_MAX_LENGTH = 64
TRAIN_STEPS = 100
TRAIN_LEARNING_RATE = 3e-3
TRAIN_TAIL_STEPS = 10
TRAIN_LOSS_RATIO = 0.25


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _api() -> Any:
    """The flash_varlen package, imported on first use so collection never needs it."""
    import flash_varlen

    return flash_varlen


def _extension() -> Any:
    """The compiled module flash_varlen._C."""
    from flash_varlen._extension import load_extension

    return load_extension()


def without_sink_gradient(result: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the extension's backward result (dq, dk, dv, dlearnable_sink), after
    checking that the sink's gradient is the empty float32 placeholder of a call without one."""
    assert len(result) == 4, f"the backward returned {len(result)} tensors, expected 4"
    sink_grad = result[3]
    assert sink_grad.shape == (0,) and sink_grad.dtype == torch.float32, sink_grad
    return tuple(result[:3])


def _pair_id(seqlens: tuple[int, int]) -> str:
    return f"q{seqlens[0]}k{seqlens[1]}"


def _mask_id(causal: bool) -> str:
    return "causal" if causal else "full"


def random_like(x: torch.Tensor, seed: int, scale: float = 1.0) -> torch.Tensor:
    """scale * N(0, 1) with x's shape, dtype and device, seeded (an upstream gradient)."""
    return seeded_randn(x.shape, x.dtype, x.device, device_generator(x.device, seed), scale)


def random_lse_grad(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A seeded float32 upstream gradient for softmax_lse: (h, total_q) or (b, h, s_q)."""
    return seeded_randn(shape, torch.float32, DEVICE, device_generator(DEVICE, seed))


def grad_leaves(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Leaves sharing the tensors' storage that require grad, one fresh set per backward."""
    return tuple(x.detach().requires_grad_() for x in tensors)


def loss_terms(
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (outputs, grad_outputs) of the loss sum(out * dout) + sum(lse * dlse); a term whose
    upstream gradient is None is left out."""
    pairs = [(t, g) for t, g in ((out, dout), (lse, dlse)) if g is not None]
    return [t for t, _ in pairs], [g for _, g in pairs]


def kernel_backward(
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
) -> Gradients:
    """Gradients of the kernel's (out, lse) by autograd, with the gradient blocks NaN-poisoned.

    An input that the loss does not reach (v when only lse is used) gets a zero gradient.
    """
    q, k = inputs[0], inputs[1]
    poison_freed_blocks(gradient_nbytes(q, k, head_dim_bucket(q.shape[-1])), q.device)
    outputs, grads = loss_terms(out, lse, dout, dlse)
    dq, dk, dv = torch.autograd.grad(
        outputs, inputs, grads, allow_unused=True, materialize_grads=True
    )
    return dq, dk, dv


def varlen_gradients(
    batch: VarlenBatch,
    dout: torch.Tensor | None,
    causal: bool,
    dlse: torch.Tensor | None = None,
    **kwargs: Any,
) -> Gradients:
    """(dq, dk, dv) of flash_attn_varlen_func on `batch` for upstream gradients dout
    (total_q, h, d) and dlse (h, total_q); kwargs go to flash_attn_varlen_func."""
    q, k, v = grad_leaves(batch.q, batch.k, batch.v)
    out, lse, _ = _api().flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        causal=causal, return_attn_probs=True, **kwargs,
    )
    return kernel_backward(out, lse, dout, dlse, (q, k, v))


def fixed_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None,
    causal: bool,
    dlse: torch.Tensor | None = None,
    **kwargs: Any,
) -> Gradients:
    """(dq, dk, dv) of flash_attn_func for dout (b, s_q, h, d) and dlse (b, h, s_q)."""
    leaves = grad_leaves(q, k, v)
    out, lse, _ = _api().flash_attn_func(
        *leaves, causal=causal, return_attn_probs=True, **kwargs
    )
    return kernel_backward(out, lse, dout, dlse, leaves)


def reference_gradients(
    batch: VarlenBatch,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    causal: bool,
    compute_dtype: torch.dtype,
    softmax_scale: float | None = None,
) -> Gradients:
    """(dq, dk, dv) of flash_varlen.reference by autograd, the whole computation in
    `compute_dtype`.

    For float32 the leaves are float32 copies of the inputs (exact), so the gradients are
    float32 and never rounded to the input dtype; otherwise they are in the input dtype.
    """
    from flash_varlen.reference import attention_ref_varlen

    leaf_dtype = torch.float32 if compute_dtype == torch.float32 else batch.q.dtype
    q, k, v = (x.detach().to(leaf_dtype).requires_grad_() for x in (batch.q, batch.k, batch.v))
    out, lse = attention_ref_varlen(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k,
        softmax_scale=softmax_scale, causal=causal, compute_dtype=compute_dtype,
    )
    if not out.requires_grad:  # every sequence is empty on one side: no input reaches a loss
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout_c = None if dout is None else dout.to(compute_dtype)
    outputs, grads = loss_terms(out, lse, dout_c, dlse)
    dq, dk, dv = torch.autograd.grad(
        outputs, (q, k, v), grads, allow_unused=True, materialize_grads=True
    )
    return dq, dk, dv


def check_varlen_gradients(
    batch: VarlenBatch,
    grads: Sequence[torch.Tensor],
    dout: torch.Tensor | None,
    causal: bool,
    name: str,
    dlse: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> None:
    """Shapes, the gradient tolerance rule and exact zeros of a varlen backward.

    grads: (dq, dk, dv) like (q, k, v); dout: (total_q, h, d) or None; dlse: (h, total_q) or
    None. Rows of q that see no key must have dq exactly 0, and the k/v rows of sequences
    without queries dk = dv = 0 exactly. The references get dlse zeroed on rows without keys:
    their lse there is log(0) = -inf and autograd through it is not meaningful, while the
    kernel must ignore whatever dlse holds there (the exact-zero check covers it).
    """
    for grad, like, grad_name in zip(grads, (batch.q, batch.k, batch.v), GRADIENT_NAMES):
        assert grad.shape == like.shape, f"{name}: {grad_name} shape {tuple(grad.shape)}"
        assert grad.dtype == like.dtype, f"{name}: {grad_name} dtype {grad.dtype}"
    blind = rows_without_keys(batch.seqlens_q, batch.seqlens_k, causal, DEVICE)
    ref_dlse = None if dlse is None else dlse.masked_fill(blind, 0.0)
    refs_fp32 = reference_gradients(batch, dout, ref_dlse, causal, torch.float32, softmax_scale)
    refs_lowp = reference_gradients(batch, dout, ref_dlse, causal, batch.q.dtype, softmax_scale)
    assert_gradients_within_tolerance(grads, refs_fp32, refs_lowp, name)
    dq, dk, dv = grads
    assert_rows_zero(dq, blind, f"{name}: dq of rows that see no key")
    idle = keys_without_queries(batch.seqlens_q, batch.seqlens_k, DEVICE)
    assert_rows_zero(dk, idle, f"{name}: dk of sequences without queries")
    assert_rows_zero(dv, idle, f"{name}: dv of sequences without queries")


def fixed_lse_as_varlen(lse: torch.Tensor) -> torch.Tensor:
    """A fixed-length lse (or its gradient) (b, h, s) in the varlen layout (h, b*s)."""
    batch, nheads, seqlen = lse.shape
    return lse.permute(1, 0, 2).reshape(nheads, batch * seqlen)


def check_fixed_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grads: Sequence[torch.Tensor],
    dout: torch.Tensor | None,
    causal: bool,
    name: str,
    dlse: torch.Tensor | None = None,
) -> None:
    """`check_varlen_gradients` for the fixed-length layout (checked as uniform lengths).

    grads: (dq, dk, dv) like (q, k, v); dout: (b, s_q, h, d) or None; dlse: (b, h, s_q) or None.
    """
    for grad, like, grad_name in zip(grads, (q, k, v), GRADIENT_NAMES):
        assert grad.shape == like.shape, f"{name}: {grad_name} shape {tuple(grad.shape)}"
    check_varlen_gradients(
        varlen_from_fixed(q, k, v),
        tuple(g.flatten(0, 1) for g in grads),
        None if dout is None else dout.flatten(0, 1),
        causal,
        name,
        None if dlse is None else fixed_lse_as_varlen(dlse),
    )


def default_batch(
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    nheads: int = 4,
    nheads_k: int = 2,
    seed: int = 0,
) -> VarlenBatch:
    """A batch in the default configuration (skips the test if this build lacks it)."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    return make_varlen_batch(
        seqlens_q, seqlens_k, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE, seed=seed
    )


def default_fixed_batch(
    batch: int, seqlen_q: int, seqlen_k: int, nheads: int = 4, nheads_k: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (b, s_q, h, d), k, v (b, s_k, h_k, d) in the default configuration (or skip)."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    return make_fixed_batch(
        batch, seqlen_q, seqlen_k, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )


def with_lengths_and_extras(
    seqlens: tuple[int, int], nheads: int, nheads_k: int, dtype: torch.dtype, head_dim: int
) -> VarlenBatch:
    """The named (seqlen_q, seqlen_k) pair first, then shorter random sequences, so that
    lengths and offsets vary in the pack (the forward's length-pair batches)."""
    seqlen_q, seqlen_k = seqlens
    seqlens_q = [seqlen_q] + random_lengths(EXTRA_SEQUENCES, 1, seqlen_q, seed=1)
    seqlens_k = [seqlen_k] + random_lengths(EXTRA_SEQUENCES, 1, seqlen_k, seed=2)
    return make_varlen_batch(seqlens_q, seqlens_k, nheads, nheads_k, head_dim, dtype, DEVICE)


# ----------------------------------------------------------------------------------------------
# The accuracy matrix: dtype x head dim x causal x head layout; length pairs on the default
# ----------------------------------------------------------------------------------------------


def _matrix_cases() -> list[Any]:
    cases = []
    for dtype, head_dim, causal, layout in itertools.product(
        DTYPES, HEAD_DIMS, (False, True), HEAD_LAYOUTS
    ):
        case_id = f"{dtype_name(dtype)}-d{head_dim}-{_mask_id(causal)}-{layout}"
        cases.append(pytest.param(dtype, head_dim, causal, layout, id=case_id))
    return cases


MATRIX = _matrix_cases()
MATRIX_ARGS = "dtype, head_dim, causal, layout"


@pytest.mark.parametrize(MATRIX_ARGS, MATRIX)
def test_varlen_gradients_match_reference(
    dtype: torch.dtype, head_dim: int, causal: bool, layout: str
) -> None:
    """dq, dk, dv of a moderate varlen batch within 3x the input-dtype PyTorch error.

    Fails if any (dtype, head-dim bucket, causal) backward kernel computes a wrong gradient, if
    a head dim below its bucket reads or writes the padding columns, if GQA/MQA dk/dv miss the
    sum over the query heads of a group, or if the causal offset for seqlen_q != seqlen_k (or
    the blind rows it creates) is wrong in the backward.
    """
    require_backward_kernel(dtype, head_dim)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = make_varlen_batch(
        MATRIX_SEQLENS_Q, MATRIX_SEQLENS_K, nheads, nheads_k, head_dim, dtype, DEVICE
    )
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, "flash_attn_varlen_func backward")


@pytest.mark.parametrize(MATRIX_ARGS, MATRIX)
def test_fixed_gradients_match_reference(
    dtype: torch.dtype, head_dim: int, causal: bool, layout: str
) -> None:
    """The same matrix through flash_attn_func (b, s, h, d): fails if the fixed-length entry
    (uniform lengths, batch-strided layout) computes gradients differently from the varlen one."""
    require_backward_kernel(dtype, head_dim)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    q, k, v = make_fixed_batch(
        FIXED_BATCH, *MATRIX_FIXED_SEQLENS, nheads, nheads_k, head_dim, dtype, DEVICE
    )
    dout = random_like(q, DOUT_SEED)
    grads = fixed_gradients(q, k, v, dout, causal)
    check_fixed_gradients(q, k, v, grads, dout, causal, "flash_attn_func backward")


def _pair_cases() -> list[Any]:
    cases = []
    for causal, pair, layout in itertools.product((False, True), SEQLEN_PAIRS, HEAD_LAYOUTS):
        if pair in MHA_ONLY_PAIRS and layout != "mha":
            continue
        case_id = f"{_mask_id(causal)}-{_pair_id(pair)}-{layout}"
        cases.append(pytest.param(causal, pair, layout, id=case_id))
    return cases


PAIRS = _pair_cases()
PAIRS_ARGS = "causal, seqlens, layout"


@pytest.mark.parametrize(PAIRS_ARGS, PAIRS)
def test_varlen_length_pairs_gradients(causal: bool, seqlens: tuple[int, int], layout: str) -> None:
    """The forward's (seqlen_q, seqlen_k) pairs, packed with shorter sequences (bf16, d=128).

    Fails on wrong masking of partial key/query blocks at tails that are not tile multiples
    (1023, 1024 + 1, 113, 203), on the causal diagonal when seqlen_q != seqlen_k either way, on a
    single query row (1, 147), and on rows without keys ((3, 1) causal).
    """
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = with_lengths_and_extras(seqlens, nheads, nheads_k, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, f"varlen {_pair_id(seqlens)}")


@pytest.mark.parametrize(PAIRS_ARGS, PAIRS)
def test_fixed_length_pairs_gradients(causal: bool, seqlens: tuple[int, int], layout: str) -> None:
    """The same pairs through flash_attn_func with batch 2: fails if a tail or the causal
    diagonal is handled differently when sequences sit at batch strides."""
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    q, k, v = default_fixed_batch(FIXED_BATCH, *seqlens, nheads, nheads_k)
    dout = random_like(q, DOUT_SEED)
    grads = fixed_gradients(q, k, v, dout, causal)
    check_fixed_gradients(q, k, v, grads, dout, causal, f"fixed {_pair_id(seqlens)}")


# ----------------------------------------------------------------------------------------------
# Varlen batches: empty sequences, many short ones, a single one
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


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("layout", list(EMPTY_LAYOUTS))
def test_varlen_empty_sequences_gradients(layout: str, dtype: torch.dtype, causal: bool) -> None:
    """Sequences with q-len 0, k-len 0 or both, at the start, middle and end of the pack.

    Fails if a query row without keys gets a nonzero or NaN dq (exp(s - lse) with lse = -inf
    is NaN unless handled), if the k/v rows of a sequence without queries are not exactly 0
    (never written, or written by a neighbour's tile), or if an empty sequence shifts the
    offsets of the ones after it.
    """
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    seqlens_q, seqlens_k = EMPTY_LAYOUTS[layout]
    batch = make_varlen_batch(seqlens_q, seqlens_k, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, f"empty sequences {layout}")


SHORT_SEQUENCE_COUNT = 300
SHORT_SEQUENCE_MAX = 200


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("same_lengths", [True, False], ids=["q_eq_k", "q_ne_k"])
def test_varlen_many_short_sequences_gradients(
    same_lengths: bool, dtype: torch.dtype, causal: bool
) -> None:
    """300 sequences of 1..200 tokens: fails if a key block's dk/dv or a row block's dq
    reaches across a sequence boundary, or if the per-sequence scheduling skips a block."""
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    seqlens_q = random_lengths(SHORT_SEQUENCE_COUNT, 1, SHORT_SEQUENCE_MAX, seed=3)
    seqlens_k = seqlens_q if same_lengths else random_lengths(
        SHORT_SEQUENCE_COUNT, 1, SHORT_SEQUENCE_MAX, seed=4
    )
    batch = make_varlen_batch(seqlens_q, seqlens_k, 4, 2, DEFAULT_HEAD_DIM, dtype, DEVICE)
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, f"{SHORT_SEQUENCE_COUNT} short sequences")


# One long sequence in the middle of many short ones: its key blocks are most of the work.
SKEWED_LONG_LENGTH = 3000


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_varlen_one_long_sequence_among_many_short_gradients(
    causal: bool, deterministic: bool
) -> None:
    """A 3000-token sequence among 300 of 1..200 tokens: a launch order by sequence length (the
    sm90 backward's tile schedule takes such batches) must still visit every key block once, and
    deterministic mode's dq turns must hold in that order (a wrong order hangs: run the GPU tests
    under a timeout)."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    short = random_lengths(SHORT_SEQUENCE_COUNT, 1, SHORT_SEQUENCE_MAX, seed=5)
    half = SHORT_SEQUENCE_COUNT // 2
    seqlens = [*short[:half], SKEWED_LONG_LENGTH, *short[half:]]
    batch = make_varlen_batch(seqlens, seqlens, 4, 2, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE)
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal, deterministic=deterministic)
    check_varlen_gradients(batch, grads, dout, causal, "one long sequence among 300 short")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("seqlens", [(1, 1), (77, 77), (300, 129), (129, 300)], ids=_pair_id)
def test_varlen_single_sequence_gradients(seqlens: tuple[int, int], causal: bool) -> None:
    """A batch of one sequence (cu_seqlens of two entries): fails on off-by-one batch counts."""
    batch = default_batch([seqlens[0]], [seqlens[1]])
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, "single sequence")


# ----------------------------------------------------------------------------------------------
# Numerics: large magnitudes, large dS, explicit softmax scale
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("head_dim", LARGE_MAGNITUDE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_magnitude_inputs_gradients(dtype: torch.dtype, head_dim: int, causal: bool) -> None:
    """q, k, v scaled by 10 (scores in the hundreds, P nearly one-hot).

    Fails if the backward recomputes P = exp(S - lse) without the stored lse (exp overflows to
    inf, then NaN), or uses an lse that does not match the forward's scores exactly enough.
    """
    require_backward_kernel(dtype, head_dim)
    lengths = [300, 129, 1000]
    batch = make_varlen_batch(
        lengths, lengths, 4, 2, head_dim, dtype, DEVICE, scale=LARGE_INPUT_SCALE
    )
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal)
    check_varlen_gradients(batch, grads, dout, causal, "inputs x10")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("head_dim", LARGE_MAGNITUDE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_ds_gradients(dtype: torch.dtype, head_dim: int, causal: bool) -> None:
    """Inputs built so that dS = P * (dP - rowsum(dO * O)) reaches thousands (see the constants).

    Fails if an intermediate of the backward overflows float16 (dP, dS or a partial sum of dq,
    dk held in the input dtype where the math needs float32) or if rowsum(dO * O) is formed in
    too low a precision: the errors then exceed 3x the float16/bfloat16 PyTorch error.
    """
    require_backward_kernel(dtype, head_dim)
    lengths = [300, 129, 1000]
    batch = make_varlen_batch(lengths, lengths, 4, 2, head_dim, dtype, DEVICE)
    scaled = dataclasses.replace(
        batch,
        q=batch.q * LARGE_DS_QK_SCALE,
        k=batch.k * LARGE_DS_QK_SCALE,
        v=batch.v * LARGE_DS_VALUE_SCALE,
    )
    dout = random_like(batch.q, DOUT_SEED, scale=LARGE_DS_VALUE_SCALE)
    grads = varlen_gradients(scaled, dout, causal)
    check_varlen_gradients(scaled, grads, dout, causal, "large dS")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_explicit_softmax_scale_gradients(causal: bool) -> None:
    """softmax_scale=0.3: fails if the backward uses 1/sqrt(d) (or forgets the scale in dq/dk)
    instead of the scale the forward was called with."""
    batch = default_batch([200, 33, 517], [150, 33, 600])
    dout = random_like(batch.q, DOUT_SEED)
    grads = varlen_gradients(batch, dout, causal, softmax_scale=EXPLICIT_SOFTMAX_SCALE)
    check_varlen_gradients(
        batch, grads, dout, causal, "softmax_scale=0.3", softmax_scale=EXPLICIT_SOFTMAX_SCALE
    )


# ----------------------------------------------------------------------------------------------
# The gradient of softmax_lse
# ----------------------------------------------------------------------------------------------

LSE_SEQLENS_Q = [45, 0, 130, 10, 23, 300]
LSE_SEQLENS_K = [70, 19, 130, 4, 0, 129]
LSE_TERMS = {"out_and_lse": True, "lse_only": False}


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("terms", list(LSE_TERMS))
def test_varlen_softmax_lse_gradient(terms: str, causal: bool) -> None:
    """A loss that uses softmax_lse (return_attn_probs=True), with or without out.

    Fails if the lse gradient is dropped or folded in wrongly (dS = P * (dP - D + dlse)), if
    autograd's zero gradient for an unused out is mishandled (lse only: dv must be exactly 0),
    or if a nonzero dlse on a row without keys (lse = -inf) leaks into dq as NaN or garbage.
    """
    batch = default_batch(LSE_SEQLENS_Q, LSE_SEQLENS_K)
    total_q, nheads, _ = batch.q.shape
    dout = random_like(batch.q, DOUT_SEED) if LSE_TERMS[terms] else None
    dlse = random_lse_grad((nheads, total_q), DLSE_SEED)
    grads = varlen_gradients(batch, dout, causal, dlse=dlse)
    check_varlen_gradients(batch, grads, dout, causal, f"softmax_lse gradient {terms}", dlse)
    if dout is None:
        assert bool((grads[2] == 0).all()), "lse only: dv must be exactly 0 (lse ignores v)"


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("terms", list(LSE_TERMS))
def test_fixed_softmax_lse_gradient(terms: str, causal: bool) -> None:
    """The same for flash_attn_func, whose lse is (b, h, s_q): fails if the fixed-length entry
    maps the lse gradient's layout wrongly onto the rows (150 > 100 leaves blind causal rows)."""
    q, k, v = default_fixed_batch(FIXED_BATCH, 150, 100)
    batch, seqlen_q, nheads, _ = q.shape
    dout = random_like(q, DOUT_SEED) if LSE_TERMS[terms] else None
    dlse = random_lse_grad((batch, nheads, seqlen_q), DLSE_SEED)
    grads = fixed_gradients(q, k, v, dout, causal, dlse=dlse)
    check_fixed_gradients(q, k, v, grads, dout, causal, f"fixed softmax_lse gradient {terms}", dlse)
    if dout is None:
        assert bool((grads[2] == 0).all()), "lse only: dv must be exactly 0 (lse ignores v)"


# ----------------------------------------------------------------------------------------------
# Upstream gradients in unusual layouts
# ----------------------------------------------------------------------------------------------


def padded_head_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` as the first d columns of a NaN-filled wider buffer (row stride d + padding)."""
    head_dim = x.shape[-1]
    buffer = torch.full(
        (*x.shape[:-1], head_dim + HEAD_STRIDE_PADDING), float("nan"), dtype=x.dtype,
        device=x.device,
    )
    buffer[..., :head_dim] = x
    return buffer[..., :head_dim]


def heads_before_tokens(x: torch.Tensor) -> torch.Tensor:
    """`x` (tokens, h, d) stored as (h, tokens, d) and seen transposed back (token stride d)."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def odd_storage_offset(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `x` that starts one element into its buffer: the data pointer is
    not 16-byte aligned, which the extension refuses, so the backward must copy it first."""
    buffer = torch.full((x.numel() + 1,), float("nan"), dtype=x.dtype, device=x.device)
    view = buffer[1:].view(x.shape)
    view.copy_(x)
    return view


DOUT_LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "padded_head_stride": padded_head_stride,
    "heads_before_tokens": heads_before_tokens,
    "odd_storage_offset": odd_storage_offset,
}


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("layout", list(DOUT_LAYOUTS))
def test_strided_dout(layout: str, causal: bool) -> None:
    """dout as a slice of a wider buffer, a transposed-back view, or at an odd offset.

    Gradients must equal, bit for bit (deterministic=True), those of a contiguous dout with the
    same values. Fails if the backward assumes dout is contiguous (reads the wrong elements or
    the NaN padding), or passes a layout the extension rejects instead of copying it.
    """
    batch = default_batch([129, 1, 300], [200, 17, 300])
    dout = random_like(batch.q, DOUT_SEED)
    strided = DOUT_LAYOUTS[layout](dout)
    assert torch.equal(strided, dout), "the restrided dout must hold the same values"
    expected = varlen_gradients(batch, dout, causal, deterministic=True)
    got = varlen_gradients(batch, strided, causal, deterministic=True)
    for grad_name, actual, wanted in zip(GRADIENT_NAMES, got, expected):
        assert_bitwise_equal(actual, wanted, f"{layout} dout: {grad_name}")
    check_varlen_gradients(batch, got, dout, causal, f"{layout} dout")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_expanded_dout_from_sum(causal: bool) -> None:
    """out.sum().backward(): autograd hands the backward an expanded dout (all strides 0).

    Fails if the backward feeds that zero-stride view to the kernel (the extension refuses it,
    or the kernel reads one element as the whole tensor) instead of materializing it.
    """
    batch = default_batch([129, 1, 300], [200, 17, 300])
    q, k, v = grad_leaves(batch.q, batch.k, batch.v)
    out = _api().flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        causal=causal, deterministic=True,
    )
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ones = torch.ones_like(batch.q)
    expected = varlen_gradients(batch, ones, causal, deterministic=True)
    for grad_name, actual, wanted in zip(GRADIENT_NAMES, got, expected):
        assert_bitwise_equal(actual, wanted, f"out.sum() backward: {grad_name}")
    check_varlen_gradients(batch, got, ones, causal, "out.sum() backward")


# ----------------------------------------------------------------------------------------------
# The extension entry points directly: given buffers, poisoned allocations, rows past the end
# ----------------------------------------------------------------------------------------------

POISON_SEQLENS_Q = [45, 0, 130, 10, 23]
POISON_SEQLENS_K = [70, 19, 130, 4, 0]


def with_nan_tail(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` (tokens, ...) followed by `rows` NaN rows: rows past cu_seqlens[-1]."""
    tail = torch.full((rows, *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
    return torch.cat([x, tail])


@dataclasses.dataclass(frozen=True)
class PaddedBackwardInputs:
    """Arguments of _C.varlen_bwd for a batch whose tensors run TAIL_ROWS past cu_seqlens[-1].

    Every row past the end is NaN in dout, q, k, v, out and softmax_lse, so a kernel that reads
    one into a valid result produces NaN there.
    """

    batch: VarlenBatch
    dout: torch.Tensor  # the valid rows only: (total_q, h, d)
    args: tuple[Any, ...]  # dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale


def padded_backward_inputs(causal: bool) -> PaddedBackwardInputs:
    batch = default_batch(POISON_SEQLENS_Q, POISON_SEQLENS_K)
    total_q = batch.q.shape[0]
    q, k, v = (with_nan_tail(x, TAIL_ROWS) for x in (batch.q, batch.k, batch.v))
    scale = 1.0 / math.sqrt(DEFAULT_HEAD_DIM)
    out, lse, *_ = _extension().varlen_fwd(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        scale, causal,
    )
    assert bool(torch.isfinite(out[:total_q]).all()), "forward: NaN rows past the end leaked in"
    out[total_q:] = float("nan")
    lse[:, total_q:] = float("nan")
    dout = random_like(batch.q, DOUT_SEED)
    args = (
        with_nan_tail(dout, TAIL_ROWS), q, k, v, out, lse, batch.cu_seqlens_q,
        batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k, scale,
    )
    return PaddedBackwardInputs(batch=batch, dout=dout, args=args)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_extension_varlen_bwd_writes_given_buffers(causal: bool, deterministic: bool) -> None:
    """_C.varlen_bwd with NaN-filled dq/dk/dv that run TAIL_ROWS past cu_seqlens[-1].

    Every valid row must be written (no NaN left, within tolerance, exact zeros where nothing
    is visible) and every row past the end must still be NaN. Fails if the kernel skips rows it
    must zero (blind rows, sequences without queries), writes past a sequence's end, ignores
    the given buffers, or lets NaN rows past the end leak into valid results.
    """
    inputs = padded_backward_inputs(causal)
    given = tuple(torch.full_like(x, float("nan")) for x in inputs.args[1:4])  # like q, k, v
    returned = without_sink_gradient(
        _extension().varlen_bwd(*inputs.args, causal, deterministic, None, *given)
    )
    total_q, total_k = inputs.batch.q.shape[0], inputs.batch.k.shape[0]
    totals = (total_q, total_k, total_k)
    for grad_name, result, buffer, total in zip(GRADIENT_NAMES, returned, given, totals):
        assert result.data_ptr() == buffer.data_ptr(), f"{grad_name}: not the given buffer"
        assert bool(torch.isnan(buffer[total:]).all()), f"{grad_name}: rows past the end written"
    valid = tuple(buffer[:total] for buffer, total in zip(given, totals))
    check_varlen_gradients(inputs.batch, valid, inputs.dout, causal, "_C.varlen_bwd in place")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_extension_varlen_bwd_allocates_zeroed_grads(causal: bool) -> None:
    """_C.varlen_bwd allocating dq/dk/dv itself, with the allocator's free blocks NaN-poisoned.

    The valid rows must be right and the rows past cu_seqlens[-1] exactly 0 (the contract: the
    allocated gradients are zero-filled). Fails if a valid row is never written or the
    allocation is not zeroed.
    """
    inputs = padded_backward_inputs(causal)
    q, k = inputs.args[1], inputs.args[2]
    poison_freed_blocks(gradient_nbytes(q, k, head_dim_bucket(DEFAULT_HEAD_DIM)), DEVICE)
    grads = without_sink_gradient(_extension().varlen_bwd(*inputs.args, causal, False))
    total_q, total_k = inputs.batch.q.shape[0], inputs.batch.k.shape[0]
    totals = (total_q, total_k, total_k)
    for grad_name, grad, total in zip(GRADIENT_NAMES, grads, totals):
        assert bool((grad[total:] == 0).all()), f"{grad_name}: rows past the end are not 0"
    valid = tuple(grad[:total] for grad, total in zip(grads, totals))
    check_varlen_gradients(inputs.batch, valid, inputs.dout, causal, "_C.varlen_bwd allocated")


@pytest.mark.parametrize("given_name", GRADIENT_NAMES)
def test_extension_varlen_bwd_mixes_given_and_allocated(given_name: str) -> None:
    """_C.varlen_bwd with one gradient buffer given (NaN-filled) and the other two allocated.

    The given buffer's rows past cu_seqlens[-1] must stay NaN, the allocated ones' must be 0
    (the backward clears only the unused rows of buffers it allocated). Fails if the clearing
    touches a caller's buffer or skips an allocated one.
    """
    inputs = padded_backward_inputs(causal=False)
    q, k = inputs.args[1], inputs.args[2]
    index = GRADIENT_NAMES.index(given_name)
    given = torch.full_like(inputs.args[1 + index], float("nan"))  # like q, k or v
    buffers = [None, None, None]
    buffers[index] = given
    poison_freed_blocks(gradient_nbytes(q, k, head_dim_bucket(DEFAULT_HEAD_DIM)), DEVICE)
    grads = without_sink_gradient(
        _extension().varlen_bwd(*inputs.args, False, False, None, *buffers)
    )
    total_q, total_k = inputs.batch.q.shape[0], inputs.batch.k.shape[0]
    totals = (total_q, total_k, total_k)
    assert grads[index].data_ptr() == given.data_ptr(), f"{given_name}: not the given buffer"
    for grad_name, grad, total in zip(GRADIENT_NAMES, grads, totals):
        tail = grad[total:]
        if grad_name == given_name:
            assert bool(torch.isnan(tail).all()), f"{grad_name}: given buffer's tail written"
        else:
            assert bool((tail == 0).all()), f"{grad_name}: allocated buffer's tail is not 0"
    valid = tuple(grad[:total] for grad, total in zip(grads, totals))
    check_varlen_gradients(inputs.batch, valid, inputs.dout, False, "_C.varlen_bwd mixed")


def test_extension_varlen_bwd_only_empty_sequences_allocates_zeros() -> None:
    """_C.varlen_bwd where every sequence is empty (cu_seqlens = [0, 0, 0]) on tensors that
    still have rows.

    Every row is past cu_seqlens[-1], so the allocated gradients must be exactly 0; fails if the
    backward returns uninitialized (here NaN-poisoned) memory when it has nothing to compute.
    """
    require_backward_kernel(torch.bfloat16, DEFAULT_HEAD_DIM)
    rows, nheads = 9, 2
    shape = (rows, nheads, DEFAULT_HEAD_DIM)
    generator = device_generator(DEVICE, DOUT_SEED)
    q, k, v, dout = (seeded_randn(shape, torch.bfloat16, DEVICE, generator) for _ in range(4))
    out = torch.zeros_like(q)
    lse = torch.full((nheads, rows), float("-inf"), device=DEVICE)
    cu_seqlens = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    poison_freed_blocks(gradient_nbytes(q, k, head_dim_bucket(DEFAULT_HEAD_DIM)), DEVICE)
    grads = without_sink_gradient(
        _extension().varlen_bwd(
            dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, 1, 1, 1.0, False, False
        )
    )
    for grad_name, grad in zip(GRADIENT_NAMES, grads):
        assert grad.shape == shape, f"{grad_name}: shape {tuple(grad.shape)}"
        assert bool((grad == 0).all()), f"{grad_name}: not all 0 without any query or key"


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_extension_fixed_bwd_poisoned(causal: bool) -> None:
    """_C.bwd into NaN-filled given buffers, then allocating with the allocator poisoned.

    seqlen_q 150 > seqlen_k 100 leaves causal rows without keys. Fails if any element of
    dq/dk/dv is left unwritten (it stays NaN) or a blind row is not exactly 0.
    """
    q, k, v = default_fixed_batch(FIXED_BATCH, 150, 100)
    scale = 1.0 / math.sqrt(DEFAULT_HEAD_DIM)
    extension = _extension()
    out, lse, *_ = extension.fwd(q, k, v, scale, causal)
    dout = random_like(q, DOUT_SEED)
    args = (dout, q, k, v, out, lse, scale, causal, False)
    given = tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
    returned = without_sink_gradient(extension.bwd(*args, None, *given))
    for grad_name, result, buffer in zip(GRADIENT_NAMES, returned, given):
        assert result.data_ptr() == buffer.data_ptr(), f"{grad_name}: not the given buffer"
    check_fixed_gradients(q, k, v, given, dout, causal, "_C.bwd in place")
    poison_freed_blocks(gradient_nbytes(q, k, head_dim_bucket(DEFAULT_HEAD_DIM)), DEVICE)
    allocated = without_sink_gradient(extension.bwd(*args))
    check_fixed_gradients(q, k, v, allocated, dout, causal, "_C.bwd allocated")


# ----------------------------------------------------------------------------------------------
# Reproducibility: races, the deterministic switches, packed variants, one code path, compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("layout", list(REPEAT_LAYOUTS))
@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_backward_repeats_bitwise(causal: bool, layout: str, deterministic: bool) -> None:
    """50 backward runs of one forward on 8k tokens, 16 heads: dk, dv (and dq when
    deterministic) bitwise equal to the first run.

    Fails on a race (a missing barrier, shared memory reused too early, unordered atomics in dk
    or dv, or a GQA head-group reduction whose order depends on timing), and, with
    deterministic=True, if the dq accumulation is not ordered.
    """
    nheads, nheads_k = REPEAT_LAYOUTS[layout]
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_varlen_batch(
        REPEAT_LENGTHS, REPEAT_LENGTHS, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    q, k, v = grad_leaves(batch.q, batch.k, batch.v)
    out = _api().flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        causal=causal, deterministic=deterministic,
    )
    dout = random_like(out, DOUT_SEED)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for grad_name, grad in zip(GRADIENT_NAMES, first):
        assert bool(torch.isfinite(grad).all()), f"first run: {grad_name} not finite"
    compared = GRADIENT_NAMES if deterministic else ("dk", "dv")
    for run in range(1, REPEAT_RUNS):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for grad_name, grad, reference in zip(GRADIENT_NAMES, again, first):
            if grad_name in compared:
                assert_bitwise_equal(grad, reference, f"run {run} {grad_name}")


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) for the block, the previous setting restored."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def determinism_switch(switch: str) -> tuple[contextlib.AbstractContextManager[Any], bool]:
    """The context to run in and the deterministic= argument for one of DETERMINISM_SWITCHES."""
    if switch == "deterministic_kwarg":
        return contextlib.nullcontext(), True
    return deterministic_algorithms(), False


DETERMINISM_SWITCHES = ["deterministic_kwarg", "use_deterministic_algorithms"]


@pytest.mark.parametrize("switch", DETERMINISM_SWITCHES)
def test_deterministic_switches_make_dq_repeatable(switch: str) -> None:
    """deterministic=True, or torch.use_deterministic_algorithms(True) with the default
    deterministic=False: 20 backward runs give bitwise-equal dq, dk, dv (GQA, causal, 8k
    tokens). The global setting is restored afterwards.

    Fails if the switch does not reach the kernel (dq keeps its unordered atomic adds), e.g. if
    the backward ignores torch.are_deterministic_algorithms_enabled().
    """
    nheads, nheads_k = REPEAT_LAYOUTS["gqa"]
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_varlen_batch(
        REPEAT_LENGTHS, REPEAT_LENGTHS, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    dout = random_like(batch.q, DOUT_SEED)
    setting_before = torch.are_deterministic_algorithms_enabled()
    context, deterministic = determinism_switch(switch)
    with context:
        q, k, v = grad_leaves(batch.q, batch.k, batch.v)
        out = _api().flash_attn_varlen_func(
            q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, causal=True, deterministic=deterministic,
        )
        first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for run in range(1, DETERMINISM_RUNS):
            again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            for grad_name, grad, reference in zip(GRADIENT_NAMES, again, first):
                assert_bitwise_equal(grad, reference, f"{switch} run {run} {grad_name}")
    assert torch.are_deterministic_algorithms_enabled() == setting_before


# One sequence with more key blocks than a GPU runs at once (132 SMs on an H100, one backward
# block each): 313 key blocks of 128 keys, 625 of 64.
ORDER_LENGTH = 40_000
# bf16 rounds to 2^-8 relative; summation order moves the float32 sums by far less.
ORDER_TOLERANCE = 2**-6


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_deterministic_order_with_more_key_blocks_than_the_gpu_holds(causal: bool) -> None:
    """deterministic=True on one 40k-token sequence with one head: dq, dk, dv bitwise equal over
    two runs and within rounding of the default backward's (which another kernel family may run:
    a family can serve the default backward and not yet deterministic mode).

    The key blocks add into each dq row block in a fixed order and wait for their turn; a block
    that waits for one drawn after it deadlocks once the blocks before it fill the GPU (the
    sm90 backward draws causal key blocks in descending order for that reason). Such a bug
    hangs this test rather than failing it: run the GPU tests under a timeout.
    """
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_varlen_batch(
        [ORDER_LENGTH], [ORDER_LENGTH], 1, 1, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    dout = random_like(batch.q, DOUT_SEED)
    default = varlen_gradients(batch, dout, causal)
    first = varlen_gradients(batch, dout, causal, deterministic=True)
    again = varlen_gradients(batch, dout, causal, deterministic=True)
    for grad_name, grad, reference in zip(GRADIENT_NAMES, again, first):
        assert_bitwise_equal(grad, reference, f"second deterministic run {grad_name}")
    # The same float32 terms added in another order, then rounded to bf16: a key block's dq add
    # lost or made twice moves whole rows by the size of dq itself.
    for grad_name, grad, reference in zip(GRADIENT_NAMES, first, default):
        assert bool(torch.isfinite(grad).all()), f"{grad_name} not finite"
        largest = float(reference.float().abs().max())
        difference = float((grad.float() - reference.float()).abs().max())
        assert difference <= ORDER_TOLERANCE * largest, (
            f"{grad_name}: deterministic differs from default by {difference:.3g} "
            f"(largest |{grad_name}| {largest:.3g})"
        )


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_varlen_qkvpacked_gradients_match_unpacked(causal: bool) -> None:
    """flash_attn_varlen_qkvpacked_func: the grad of qkv (total, 3, h, d) holds, bit for bit,
    the unpacked call's dq, dk, dv. Fails if the packed path scatters gradients into the
    wrong slots or strides of the pack."""
    lengths = [129, 1, 300, 64]
    batch = default_batch(lengths, lengths, nheads=4, nheads_k=4)
    dout = random_like(batch.q, DOUT_SEED)
    expected = varlen_gradients(batch, dout, causal, deterministic=True)
    qkv = torch.stack([batch.q, batch.k, batch.v], dim=1).requires_grad_()
    out = _api().flash_attn_varlen_qkvpacked_func(
        qkv, batch.cu_seqlens_q, batch.max_seqlen_q, causal=causal, deterministic=True
    )
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert dqkv.shape == qkv.shape, f"dqkv shape {tuple(dqkv.shape)}"
    for index, grad_name in enumerate(GRADIENT_NAMES):
        assert_bitwise_equal(dqkv[:, index], expected[index], f"varlen qkvpacked {grad_name}")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_varlen_kvpacked_gradients_match_unpacked(causal: bool) -> None:
    """flash_attn_varlen_kvpacked_func (GQA): dq and the grad of kv (total_k, 2, h_k, d) equal
    the unpacked call's bit for bit. Fails if dk/dv land in the wrong half of the pack."""
    batch = default_batch([129, 1, 300, 64], [200, 17, 300, 1])
    dout = random_like(batch.q, DOUT_SEED)
    expected = varlen_gradients(batch, dout, causal, deterministic=True)
    q = batch.q.detach().requires_grad_()
    kv = torch.stack([batch.k, batch.v], dim=1).requires_grad_()
    out = _api().flash_attn_varlen_kvpacked_func(
        q, kv, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        causal=causal, deterministic=True,
    )
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    assert dkv.shape == kv.shape, f"dkv shape {tuple(dkv.shape)}"
    assert_bitwise_equal(dq, expected[0], "varlen kvpacked dq")
    assert_bitwise_equal(dkv[:, 0], expected[1], "varlen kvpacked dk")
    assert_bitwise_equal(dkv[:, 1], expected[2], "varlen kvpacked dv")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_fixed_qkvpacked_gradients_match_unpacked(causal: bool) -> None:
    """flash_attn_qkvpacked_func: the grad of qkv (b, s, 3, h, d) equals the unpacked call's
    gradients bit for bit. Fails on a wrong scatter into the fixed-length pack."""
    q, k, v = default_fixed_batch(FIXED_BATCH, 300, 300, nheads=4, nheads_k=4)
    dout = random_like(q, DOUT_SEED)
    expected = fixed_gradients(q, k, v, dout, causal, deterministic=True)
    qkv = torch.stack([q, k, v], dim=2).requires_grad_()
    out = _api().flash_attn_qkvpacked_func(qkv, causal=causal, deterministic=True)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert dqkv.shape == qkv.shape, f"dqkv shape {tuple(dqkv.shape)}"
    for index, grad_name in enumerate(GRADIENT_NAMES):
        assert_bitwise_equal(dqkv[:, :, index], expected[index], f"qkvpacked {grad_name}")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
def test_fixed_kvpacked_gradients_match_unpacked(causal: bool) -> None:
    """flash_attn_kvpacked_func (GQA): dq and the grad of kv (b, s_k, 2, h_k, d) equal the
    unpacked call's bit for bit."""
    q, k, v = default_fixed_batch(FIXED_BATCH, 300, 257)
    dout = random_like(q, DOUT_SEED)
    expected = fixed_gradients(q, k, v, dout, causal, deterministic=True)
    q_leaf = q.detach().requires_grad_()
    kv = torch.stack([k, v], dim=2).requires_grad_()
    out = _api().flash_attn_kvpacked_func(q_leaf, kv, causal=causal, deterministic=True)
    dq, dkv = torch.autograd.grad(out, (q_leaf, kv), dout)
    assert dkv.shape == kv.shape, f"dkv shape {tuple(dkv.shape)}"
    assert_bitwise_equal(dq, expected[0], "kvpacked dq")
    assert_bitwise_equal(dkv[:, :, 0], expected[1], "kvpacked dk")
    assert_bitwise_equal(dkv[:, :, 1], expected[2], "kvpacked dv")


@pytest.mark.parametrize("causal", [False, True], ids=_mask_id)
@pytest.mark.parametrize("seqlens", [(333, 517), (517, 333), (256, 256)], ids=_pair_id)
def test_fixed_and_varlen_gradients_agree_bitwise(seqlens: tuple[int, int], causal: bool) -> None:
    """The fixed-length backward is the varlen one with uniform lengths: identical bits
    (deterministic=True). Fails if the two entries diverge into different code paths."""
    q, k, v = default_fixed_batch(3, *seqlens)
    dout = random_like(q, DOUT_SEED)
    fixed = fixed_gradients(q, k, v, dout, causal, deterministic=True)
    packed = varlen_from_fixed(q, k, v)
    varlen = varlen_gradients(packed, dout.flatten(0, 1), causal, deterministic=True)
    for grad_name, fixed_grad, varlen_grad in zip(GRADIENT_NAMES, fixed, varlen):
        assert_bitwise_equal(fixed_grad.flatten(0, 1), varlen_grad, f"fixed vs varlen {grad_name}")


def test_torch_compile_fullgraph_backward_matches_eager() -> None:
    """torch.compile(fullgraph=True) of forward + a loss using out and softmax_lse, then
    .backward(): gradients bitwise equal to eager (deterministic=True).

    Fails if the backward op breaks the graph (fullgraph raises), has a wrong fake
    implementation (shapes, dtypes), or if the compiled graph calls the kernel differently.
    """
    batch = default_batch([129, 0, 300, 64], [200, 17, 300, 1])
    api = _api()
    total_q, nheads, _ = batch.q.shape
    dout = random_like(batch.q, DOUT_SEED)
    dlse = random_lse_grad((nheads, total_q), DLSE_SEED)

    def loss_fn(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor
    ) -> torch.Tensor:
        out, lse, _ = api.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, batch.max_seqlen_q, batch.max_seqlen_k,
            causal=True, deterministic=True, return_attn_probs=True,
        )
        lse_term = torch.where(torch.isfinite(lse), lse * dlse, torch.zeros_like(lse))
        return (out.float() * dout.float()).sum() + lse_term.sum()

    def gradients(fn: Callable[..., torch.Tensor]) -> Gradients:
        q, k, v = grad_leaves(batch.q, batch.k, batch.v)
        fn(q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k).backward()
        return q.grad, k.grad, v.grad

    eager = gradients(loss_fn)
    compiled = gradients(torch.compile(loss_fn, fullgraph=True))
    for grad_name, compiled_grad, eager_grad in zip(GRADIENT_NAMES, compiled, eager):
        assert_bitwise_equal(compiled_grad, eager_grad, f"compiled {grad_name}")


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def backward_allowance_bytes(q: torch.Tensor, k: torch.Tensor, batch_size: int) -> int:
    """What a backward may allocate: dq, dk, dv, the float32 dq accumulator (padded per
    sequence to whole row blocks), a few per-row float32 vectors, and a small slack."""
    total_q, nheads, head_dim = q.shape
    padded_rows = total_q + DQ_ACCUM_PAD_ROWS_PER_SEQUENCE * (batch_size + 1)
    float32_bytes = 4
    dq_accum = padded_rows * nheads * head_dim_bucket(head_dim) * float32_bytes
    row_vectors = BACKWARD_ROW_VECTORS * nheads * padded_rows * float32_bytes
    grads = sum(gradient_nbytes(q, k, head_dim_bucket(head_dim))[:3])
    return dq_accum + grads + row_vectors + BACKWARD_MEMORY_SLACK_BYTES


def test_gqa_backward_has_no_full_size_kv_gradient() -> None:
    """Peak memory of a GQA backward (32 query heads, 4 kv heads) stays within dq, dk, dv, the
    dq accumulator and small per-row vectors.

    Fails if the backward materializes dk or dv (or k, v) with all 32 query heads and reduces
    over the group afterwards: one such bf16 tensor is 8x dk and far above the allowance.
    """
    nheads, nheads_k = GQA_MEMORY_HEADS
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    lengths = GQA_MEMORY_LENGTHS
    batch = make_varlen_batch(
        lengths, lengths, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    q, k, v = grad_leaves(batch.q, batch.k, batch.v)
    out = _api().flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k
    )
    dout = random_like(out, DOUT_SEED)
    allowance = backward_allowance_bytes(q, k, len(lengths))
    needed = sum(gradient_nbytes(q, k, head_dim_bucket(DEFAULT_HEAD_DIM)))
    full_size_kv_grad = k.numel() * (nheads // nheads_k) * k.element_size()
    assert full_size_kv_grad > allowance - needed, "the test could not see a full-size temporary"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= allowance, (
        f"GQA backward peak {peak} bytes exceeds the allowance {allowance} bytes (a full-size "
        f"dk or dv would be {full_size_kv_grad} bytes)"
    )
    assert all(bool(torch.isfinite(g).all()) for g in grads), "GQA gradients not finite"


def peak_forward_backward_bytes(lengths: Sequence[int]) -> int:
    """Peak memory of forward + backward (bf16, d=128, causal) above the inputs and dout."""
    batch = make_varlen_batch(
        lengths, lengths, LINEAR_MEMORY_HEADS, LINEAR_MEMORY_HEADS, DEFAULT_HEAD_DIM,
        DEFAULT_DTYPE, DEVICE,
    )
    q, k, v = grad_leaves(batch.q, batch.k, batch.v)
    dout = random_like(batch.q, DOUT_SEED)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = _api().flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        causal=True,
    )
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(g).all()) for g in grads), "gradients not finite"
    return torch.cuda.max_memory_allocated() - before


def test_forward_backward_memory_is_linear_in_tokens() -> None:
    """Peak memory of forward + backward at 16k and 64k tokens (sequences up to 32k): the ratio
    must stay near 4. Fails if anything in either pass is O(seqlen^2) (ratio near 16)."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    small = peak_forward_backward_bytes(LINEAR_MEMORY_SMALL_LENGTHS)
    large = peak_forward_backward_bytes(LINEAR_MEMORY_LARGE_LENGTHS)
    ratio = large / small
    assert ratio < LINEAR_PEAK_RATIO_LIMIT, (
        f"peak memory grows {ratio:.2f}x for 4x the tokens ({small} -> {large} bytes)"
    )


# ----------------------------------------------------------------------------------------------
# A plain training step
# ----------------------------------------------------------------------------------------------


class TokenBatch(NamedTuple):
    """A packed batch of random token sequences for the previous-token task (all on DEVICE).

    tokens, positions, targets: (total,) int64; keep: (total,) bool, False on each sequence's
    first token (it has no previous token); cu_seqlens: (batch + 1,) int32.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    keep: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def previous_token_batch(generator: torch.Generator) -> TokenBatch:
    lengths = torch.randint(
        TRAIN_MIN_LENGTH, TRAIN_MAX_LENGTH + 1, (TRAIN_SEQUENCES,), generator=generator
    )
    tokens = torch.randint(0, TRAIN_VOCAB, (int(lengths.sum()),), generator=generator)
    positions = torch.cat([torch.arange(int(length)) for length in lengths])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return TokenBatch(
        tokens=tokens.to(DEVICE),
        positions=positions.to(DEVICE),
        targets=torch.roll(tokens, 1).to(DEVICE),
        keep=(positions > 0).to(DEVICE),
        cu_seqlens=cu_seqlens.to(device=DEVICE, dtype=torch.int32),
        max_seqlen=int(lengths.max()),
    )


class PreviousTokenModel(torch.nn.Module):
    """Token + position embedding -> q/k/v projection -> causal flash attention -> logits.

    There is no residual path, so the previous token reaches the prediction only through
    attention: learning needs correct dq and dk (to attend to position t - 1) and dv.
    """

    def __init__(self) -> None:
        super().__init__()
        width = TRAIN_HEADS * DEFAULT_HEAD_DIM
        self.tokens = torch.nn.Embedding(TRAIN_VOCAB, width)
        self.positions = torch.nn.Embedding(TRAIN_MAX_LENGTH, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Linear(width, TRAIN_VOCAB)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Logits (total, vocab) for every token of the packed batch."""
        hidden = self.tokens(batch.tokens) + self.positions(batch.positions)
        qkv = self.qkv(hidden).view(-1, 3, TRAIN_HEADS, DEFAULT_HEAD_DIM).to(DEFAULT_DTYPE)
        q, k, v = qkv.unbind(dim=1)
        out = _api().flash_attn_varlen_func(
            q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen,
            causal=True,
        )
        return self.head(out.flatten(1).float())


def test_training_step_learns_previous_token() -> None:
    """100 AdamW steps of a one-layer attention model on packed random sequences.

    The loss must fall below a quarter of its initial value (the reference gets from 2.77 to
    about 0.01). Fails if gradients are wrong enough to stop learning (a sign error, a wrong
    scale, dq or dk zero), or if any step produces a non-finite loss.
    """
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PreviousTokenModel().to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(TRAIN_STEPS):
        batch = previous_token_batch(generator)
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits[batch.keep], batch.targets[batch.keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses), f"non-finite losses: {losses}"
    initial = losses[0]
    final = sum(losses[-TRAIN_TAIL_STEPS:]) / TRAIN_TAIL_STEPS
    assert final < TRAIN_LOSS_RATIO * initial, (
        f"loss fell only from {initial:.3f} to {final:.3f} in {TRAIN_STEPS} steps"
    )
