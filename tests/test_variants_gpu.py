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

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import flash_varlen
from flash_varlen import reference
from flash_varlen.reference import BOTTOM_RIGHT, NO_WINDOW, TOP_LEFT, UNBOUNDED

from accuracy import (
    FORWARD_FACTOR,
    GRADIENT_NAMES,
    VarlenBatch,
    assert_all_written,
    assert_bitwise_equal,
    assert_gradients_within_tolerance,
    assert_lse_within_tolerance,
    assert_rows_zero,
    assert_within_tolerance,
    device_generator,
    dtype_name,
    gradient_nbytes,
    head_dim_bucket,
    make_fixed_batch,
    make_varlen_batch,
    output_nbytes,
    poison_freed_blocks,
    require_backward_kernel,
    require_kernel,
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
DTYPES = (torch.float16, torch.bfloat16)
# A representative head dim per tile configuration family: 64 (128 x 128 tiles), 128 (the
# default) and 256 (8 warps, the largest shared-memory footprint).
HEAD_DIMS = (64, 128, 256)
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
ENTRIES = ("varlen", "fixed")

# Tests that are not about dtype, head dim or head layout use this configuration, which every
# (even narrowed) development build contains.
DEFAULT_DTYPE = torch.bfloat16
DEFAULT_HEAD_DIM = 128
DEFAULT_LAYOUT = "gqa"

# The varlen batch of the variant matrix: seqlen_q > seqlen_k and seqlen_q < seqlen_k, lengths
# that are not tile multiples (113, 203, 257, 37, 90), a single query row, a single key, and
# empty query and key sequences. With seqused the used lengths are smaller than the slot
# (50 of 113, 60 of 203, ...), equal to it (203 of 203, 1 of 1), or 0 with a non-empty slot,
# on the query side, the key side or both.
MATRIX_SEQLENS_Q = (113, 203, 0, 1, 257, 64, 37, 90)
MATRIX_SEQLENS_K = (203, 113, 17, 0, 257, 1, 37, 90)
MATRIX_SEQUSED_Q = (50, 203, 0, 0, 200, 1, 0, 90)
MATRIX_SEQUSED_K = (203, 60, 0, 0, 129, 1, 37, 0)

# Fixed-length cases: this many sequences of one of these (seqlen_q, seqlen_k) pairs.
FIXED_BATCH = 2
FIXED_SEQLEN_PAIRS = ((113, 203), (203, 113), (257, 257))

# Seeds: the batches use 0; upstream gradients 1 and 2 as in test_backward_gpu.py; the dropout
# RNG (torch.manual_seed before the forward) DROPOUT_SEED, or OTHER_DROPOUT_SEED where a test
# needs a second, different mask.
DOUT_SEED = 1
DLSE_SEED = 2
DROPOUT_SEED = 3
OTHER_DROPOUT_SEED = 4

DROPOUT_P = 0.17
"""Not a round number, so that neither p nor 1 / (1 - p) is exact in binary."""
SOFTCAP = 30.0
"""Gemma 2's attention softcap."""
SMALL_SOFTCAP = 2.0
"""A cap well inside the score range, so that tanh saturates and its gradient matters."""
SOFTCAP_QK_SCALE = 4.0
"""q and k scaled by this in the SOFTCAP cases: raw scores of standard deviation 16, many beyond
tanh's linear range at cap 30 (unit inputs give scores of about 1, where a cap of 30 changes
less than the bfloat16 tolerance, so a missing cap would pass). A power of two: exact."""
WIDE_WINDOW = 1000
"""Wider than every sequence here (the longest has 257 tokens): the window hides nothing."""
LARGE_INPUT_SCALE = 10.0
"""q and k scaled by this give scores of standard deviation 100: without the cap exp overflows."""
ALIBI_SLOPE_BASE_EXPONENT = 8.0
"""ALiBi's geometric slopes (Press et al.): head h of H gets 2^(-8 (h + 1) / H)."""

# S_dmask (contract): (batch, nheads, round_up(max_seqlen_q, 128), round_up(max_seqlen_k, 128)).
DMASK_ROUNDING = 128
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

ALIBI_PER_HEAD = "heads"
"""alibi_slopes of shape (nheads,)."""
ALIBI_PER_SEQUENCE = "batch"
"""alibi_slopes of shape (batch, nheads)."""


# ----------------------------------------------------------------------------------------------
# Variants and cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """The attention options of one case: the public keyword arguments, tensors described.

    alibi: None, ALIBI_PER_HEAD or ALIBI_PER_SEQUENCE (shape of the slopes, built per batch).
    seqused: varlen only; use the batch's seqused lengths (MATRIX_SEQUSED_Q/K in the matrix).
    qk_scale: q and k are multiplied by this before the call (not an API option).
    """

    causal: bool = False
    window_size: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    alibi: str | None = None
    dropout_p: float = 0.0
    causal_alignment: str = BOTTOM_RIGHT
    seqused: bool = False
    qk_scale: float = 1.0


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

EVERYTHING = Variant(
    causal=True,
    window_size=(64, 0),
    softcap=SOFTCAP,
    alibi=ALIBI_PER_SEQUENCE,
    dropout_p=DROPOUT_P,
    seqused=True,
    qk_scale=SOFTCAP_QK_SCALE,
)

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


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything one kernel call and its references read, in the packed layout.

    batch: the inputs; for a fixed-length case (fixed=True) the uniform-length packed view of
        (b, s, h, d) tensors, which the kernel call reshapes back.
    lengths_q, lengths_k: the used length of every sequence (the slot lengths without seqused).
    seqused_q, seqused_k: int32 (batch,) on the device, or None.
    alibi_slopes: float32 (nheads,) or (batch, nheads) on the device, or None.
    dout: (total_q, h, d) and dlse: (h, total_q) float32, the seeded upstream gradients.
    """

    variant: Variant
    batch: VarlenBatch
    fixed: bool
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    seqused_q: torch.Tensor | None
    seqused_k: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    dout: torch.Tensor
    dlse: torch.Tensor


@dataclasses.dataclass(frozen=True)
class KernelResult:
    """What a public call returned, in the packed layout.

    out: (total_q, h, d); lse: (h, total_q) or None (return_attn_probs=False); s_dmask: as
    returned (batch, h, rounded s_q, rounded s_k), or None; grads: (dq, dk, dv) or None when
    the backward was not run.
    """

    out: torch.Tensor
    lse: torch.Tensor | None
    s_dmask: torch.Tensor | None
    grads: Gradients | None


def seeded_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, 1) with x's shape, dtype and device, from a generator seeded with `seed`."""
    return seeded_randn(x.shape, x.dtype, x.device, device_generator(x.device, seed))


def with_rows_poisoned(x: torch.Tensor, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """A copy of `x` whose entries at the (bool) `rows` of dimension `dim` are NaN."""
    poisoned = x.clone()
    index = [slice(None)] * x.dim()
    index[dim] = rows
    poisoned[tuple(index)] = float("nan")
    return poisoned


def geometric_alibi_slopes(nheads: int) -> torch.Tensor:
    """ALiBi's slopes 2^(-8 (h + 1) / nheads) for h = 0 .. nheads - 1, float32 on DEVICE."""
    exponents = torch.arange(1, nheads + 1, dtype=torch.float32, device=DEVICE)
    return torch.exp2(-ALIBI_SLOPE_BASE_EXPONENT * exponents / nheads)


def make_alibi_slopes(kind: str | None, batch_size: int, nheads: int) -> torch.Tensor | None:
    """(nheads,) geometric slopes, or (batch, nheads) where sequence b gets them rotated by b
    heads, so that every sequence has its own slope per head; None without ALiBi."""
    if kind is None:
        return None
    slopes = geometric_alibi_slopes(nheads)
    if kind == ALIBI_PER_HEAD:
        return slopes
    return torch.stack([slopes.roll(b) for b in range(batch_size)])


def used_rows(cu_seqlens: torch.Tensor, seqused: torch.Tensor | None, total: int) -> torch.Tensor:
    """(total,) bool on DEVICE: the rows of q (or k, v) that the used lengths cover."""
    return reference.used_query_rows(cu_seqlens, seqused, total).to(DEVICE)


def build_case(
    batch: VarlenBatch,
    variant: Variant,
    fixed: bool = False,
    seqused: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Case:
    """The case of `variant` on `batch`: slopes, seqused tensors and upstream gradients.

    q and k are scaled by variant.qk_scale. With variant.seqused, `seqused` gives the used
    lengths (query side, key side), and the rows past them in q, k, v, dout and dlse become NaN
    (see the module docstring).
    """
    if variant.qk_scale != 1.0:
        batch = dataclasses.replace(
            batch, q=batch.q * variant.qk_scale, k=batch.k * variant.qk_scale
        )
    batch_size = len(batch.seqlens_q)
    total_q, nheads, _ = batch.q.shape
    dout = seeded_like(batch.q, DOUT_SEED)
    dlse_generator = device_generator(DEVICE, DLSE_SEED)
    dlse = seeded_randn((nheads, total_q), torch.float32, DEVICE, dlse_generator)
    lengths_q, lengths_k = batch.seqlens_q, batch.seqlens_k
    seqused_q = seqused_k = None
    if variant.seqused:
        if fixed or seqused is None:
            raise ValueError("seqused needs a varlen case and the used lengths")
        lengths_q, lengths_k = tuple(seqused[0]), tuple(seqused[1])
        seqused_q = torch.tensor(lengths_q, dtype=torch.int32, device=DEVICE)
        seqused_k = torch.tensor(lengths_k, dtype=torch.int32, device=DEVICE)
        unused_q = ~used_rows(batch.cu_seqlens_q, seqused_q, total_q)
        unused_k = ~used_rows(batch.cu_seqlens_k, seqused_k, batch.k.shape[0])
        batch = dataclasses.replace(
            batch,
            q=with_rows_poisoned(batch.q, unused_q),
            k=with_rows_poisoned(batch.k, unused_k),
            v=with_rows_poisoned(batch.v, unused_k),
        )
        dout = with_rows_poisoned(dout, unused_q)
        dlse = with_rows_poisoned(dlse, unused_q, dim=1)
    return Case(
        variant=variant,
        batch=batch,
        fixed=fixed,
        lengths_q=tuple(lengths_q),
        lengths_k=tuple(lengths_k),
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        alibi_slopes=make_alibi_slopes(variant.alibi, batch_size, nheads),
        dout=dout,
        dlse=dlse,
    )


def matrix_case(variant: Variant, layout: str, dtype: torch.dtype, head_dim: int) -> Case:
    """`variant` on the matrix batch (MATRIX_SEQLENS_*, MATRIX_SEQUSED_* with seqused)."""
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = make_varlen_batch(
        MATRIX_SEQLENS_Q, MATRIX_SEQLENS_K, nheads, nheads_k, head_dim, dtype, DEVICE
    )
    return build_case(batch, variant, seqused=(MATRIX_SEQUSED_Q, MATRIX_SEQUSED_K))


def fixed_case(
    variant: Variant,
    seqlens: tuple[int, int],
    layout: str,
    dtype: torch.dtype,
    head_dim: int,
) -> Case:
    """`variant` on FIXED_BATCH sequences of the (seqlen_q, seqlen_k) pair, for flash_attn_func."""
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    q, k, v = make_fixed_batch(FIXED_BATCH, *seqlens, nheads, nheads_k, head_dim, dtype, DEVICE)
    return build_case(varlen_from_fixed(q, k, v), variant, fixed=True)


def default_case(variant: Variant, fixed: bool = False) -> Case:
    """`variant` in the default configuration (skips the test if this build lacks it)."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    if fixed:
        return fixed_case(
            variant, FIXED_SEQLEN_PAIRS[0], DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM
        )
    return matrix_case(variant, DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Kernel calls
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restores the CPU and current CUDA generators on exit, so seeding leaks into no test."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        yield


@contextlib.contextmanager
def dropout_seed(seed: int | None) -> Iterator[None]:
    """torch.manual_seed(seed) for the calls inside, the generators restored afterwards; with
    None the calls draw from the generators' current state."""
    if seed is None:
        yield
        return
    with isolated_rng():
        torch.manual_seed(seed)
        yield


def api_options(case: Case) -> dict[str, Any]:
    """The variant's keyword arguments of every public function (seqused excluded)."""
    variant = case.variant
    return {
        "dropout_p": variant.dropout_p,
        "causal": variant.causal,
        "window_size": variant.window_size,
        "softcap": variant.softcap,
        "alibi_slopes": case.alibi_slopes,
        "causal_alignment": variant.causal_alignment,
    }


def seqused_options(case: Case) -> dict[str, Any]:
    """seqused_q / seqused_k for the varlen entries that take them."""
    return {"seqused_q": case.seqused_q, "seqused_k": case.seqused_k}


def fixed_shape(case: Case, x: torch.Tensor) -> torch.Tensor:
    """A packed (b * s, ...) tensor of a fixed-length case as (b, s, ...) (a view)."""
    return x.unflatten(0, (len(case.batch.seqlens_q), -1))


def entry_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the layout of the case's entry: packed, or (b, s, h, d) when fixed."""
    tensors = (case.batch.q, case.batch.k, case.batch.v)
    return tuple(fixed_shape(case, x) for x in tensors) if case.fixed else tensors


def entry_upstream(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """dout and dlse in the layout of the entry's out and softmax_lse: packed (h, total_q), or
    (b, s_q, h, d) and (b, h, s_q) when fixed."""
    if not case.fixed:
        return case.dout, case.dlse
    batch_size = len(case.batch.seqlens_q)
    dlse = case.dlse.unflatten(1, (batch_size, -1)).permute(1, 0, 2).contiguous()
    return fixed_shape(case, case.dout), dlse


def packed_results(
    case: Case,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    grads: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, Gradients | None]:
    """out, lse and grads of the case's entry in the packed layout (views where possible)."""
    if not case.fixed:
        return out, lse, None if grads is None else tuple(grads)
    nheads = out.shape[2]
    packed_lse = None if lse is None else lse.permute(1, 0, 2).reshape(nheads, -1)
    packed_grads = None if grads is None else tuple(g.flatten(0, 1) for g in grads)
    return out.flatten(0, 1), packed_lse, packed_grads


def call_entry(
    case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any
) -> Any:
    """flash_attn_varlen_func (with seqused) or flash_attn_func on q, k, v with `options`."""
    if case.fixed:
        return flash_varlen.flash_attn_func(q, k, v, **options)
    batch = case.batch
    return flash_varlen.flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        **seqused_options(case), **options,
    )


def run_kernel(
    case: Case,
    *,
    deterministic: bool = False,
    return_attn_probs: bool = True,
    lse_grad: bool = True,
    backward: bool = True,
    seed: int | None = DROPOUT_SEED,
    between: Callable[[], None] | None = None,
) -> KernelResult:
    """One forward (and backward) of the public entry of `case`, on a NaN-poisoned allocator.

    The forward runs after torch.manual_seed(seed) (unless seed is None). The backward is
    torch.autograd.grad of sum(out * dout) (+ sum(softmax_lse * dlse) when return_attn_probs
    and lse_grad) w.r.t. q, k, v; `between` runs after the forward, before the backward.
    """
    q, k, v = (x.detach().requires_grad_() for x in entry_inputs(case))
    options = {
        **api_options(case),
        "deterministic": deterministic,
        "return_attn_probs": return_attn_probs,
    }
    total_q, nheads = case.batch.q.shape[:2]
    poison_freed_blocks(output_nbytes(case.batch.q, total_q * nheads), DEVICE)
    with dropout_seed(seed):
        result = call_entry(case, q, k, v, **options)
    out, lse, s_dmask = result if return_attn_probs else (result, None, None)
    if between is not None:
        between()
    grads = None
    if backward:
        dout, dlse = entry_upstream(case)
        outputs, grad_outputs = [out], [dout]
        if lse is not None and lse_grad:
            outputs.append(lse)
            grad_outputs.append(dlse)
        bucket = head_dim_bucket(case.batch.q.shape[-1])
        poison_freed_blocks(gradient_nbytes(case.batch.q, case.batch.k, bucket), DEVICE)
        grads = torch.autograd.grad(
            outputs, (q, k, v), grad_outputs, allow_unused=True, materialize_grads=True
        )
    packed_out, packed_lse, packed_grads = packed_results(
        case, out.detach(), None if lse is None else lse.detach(), grads
    )
    return KernelResult(packed_out, packed_lse, s_dmask, packed_grads)


# ----------------------------------------------------------------------------------------------
# Reference and checks
# ----------------------------------------------------------------------------------------------


def sequence_visibility(case: Case) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Per sequence b: (b, first q row, first k row, visible) where visible is the
    (used seqlen_q, used seqlen_k) bool matrix of reference.visible_keys for the variant."""
    variant = case.variant
    starts_q = case.batch.cu_seqlens_q.tolist()
    starts_k = case.batch.cu_seqlens_k.tolist()
    for b, (length_q, length_k) in enumerate(zip(case.lengths_q, case.lengths_k)):
        visible = reference.visible_keys(
            length_q,
            length_k,
            variant.causal,
            DEVICE,
            window_size=variant.window_size,
            causal_alignment=variant.causal_alignment,
        )
        yield b, starts_q[b], starts_k[b], visible


def row_coverage(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_q,) bool: query rows that see at least one key; (total_k,) bool: key rows that at
    least one query sees. Rows past the used lengths are False in both."""
    sees_a_key = torch.zeros(case.batch.q.shape[0], dtype=torch.bool, device=DEVICE)
    seen = torch.zeros(case.batch.k.shape[0], dtype=torch.bool, device=DEVICE)
    for _, start_q, start_k, visible in sequence_visibility(case):
        length_q, length_k = visible.shape
        sees_a_key[start_q : start_q + length_q] = visible.any(dim=1)
        seen[start_k : start_k + length_k] = visible.any(dim=0)
    return sees_a_key, seen


def reference_results(
    case: Case, keep: torch.Tensor | None, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, Gradients]:
    """out, softmax_lse and (dq, dk, dv) of flash_varlen.reference for `case`, the whole
    computation in `compute_dtype` (float32 leaves are exact copies, so float32 gradients are
    never rounded to the input dtype).

    keep: the dropout keep mask (from the kernel's S_dmask), or None. The upstream gradients
    are zeroed on rows past seqused (the reference computes nothing there) and dlse on rows
    whose reference lse is -inf (autograd through log(0) is not meaningful; the kernel must
    ignore whatever dlse holds there, which the exact-zero checks cover).
    """
    batch, variant = case.batch, case.variant
    leaf_dtype = torch.float32 if compute_dtype == torch.float32 else batch.q.dtype
    q, k, v = (x.detach().to(leaf_dtype).requires_grad_() for x in (batch.q, batch.k, batch.v))
    out, lse = reference.attention_ref_varlen(
        q,
        k,
        v,
        batch.cu_seqlens_q,
        batch.cu_seqlens_k,
        causal=variant.causal,
        compute_dtype=compute_dtype,
        window_size=variant.window_size,
        softcap=variant.softcap,
        alibi_slopes=case.alibi_slopes,
        dropout_p=variant.dropout_p,
        dropout_mask=keep,
        seqused_q=case.seqused_q,
        seqused_k=case.seqused_k,
        causal_alignment=variant.causal_alignment,
    )
    if not out.requires_grad:  # no sequence has both queries and keys: nothing reaches a loss
        return out, lse, (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    used = used_rows(batch.cu_seqlens_q, case.seqused_q, batch.q.shape[0])
    dout = torch.where(used[:, None, None], case.dout, 0.0).to(compute_dtype)
    dlse = torch.where(used[None, :] & torch.isfinite(lse.detach()), case.dlse, 0.0)
    dq, dk, dv = torch.autograd.grad(
        (out, lse), (q, k, v), (dout, dlse), allow_unused=True, materialize_grads=True
    )
    return out.detach(), lse.detach(), (dq, dk, dv)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def expected_dmask_shape(case: Case) -> tuple[int, int, int, int]:
    """S_dmask's shape by the contract: (batch, nheads, round_up(max_seqlen_q, 128),
    round_up(max_seqlen_k, 128)); fixed length: max_seqlen = seqlen."""
    batch = case.batch
    return (
        len(batch.seqlens_q),
        batch.q.shape[1],
        round_up(batch.max_seqlen_q, DMASK_ROUNDING),
        round_up(batch.max_seqlen_k, DMASK_ROUNDING),
    )


def dropout_keep(case: Case, s_dmask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The keep mask from S_dmask after checking its contract (None without dropout)."""
    if case.variant.dropout_p == 0:
        assert s_dmask is None, f"{name}: S_dmask must be None without dropout"
        return None
    assert s_dmask is not None, f"{name}: S_dmask missing with dropout_p > 0"
    assert tuple(s_dmask.shape) == expected_dmask_shape(case), (
        f"{name}: S_dmask shape {tuple(s_dmask.shape)}, expected {expected_dmask_shape(case)}"
    )
    assert s_dmask.dtype == case.batch.q.dtype, f"{name}: S_dmask dtype {s_dmask.dtype}"
    return reference.dropout_keep_mask(s_dmask)


def check_case(case: Case, result: KernelResult, name: str) -> None:
    """Shapes, the tolerance rules for out, softmax_lse, dq, dk, dv against the reference on the
    used rows, and the exact zeros (rows without keys, keys without queries, unused rows)."""
    batch = case.batch
    total_q, nheads, _ = batch.q.shape
    out, lse, grads = result.out, result.lse, result.grads
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype, f"{name}: out shape/dtype"
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32, f"{name}: lse"
    for grad, like, grad_name in zip(grads, (batch.q, batch.k, batch.v), GRADIENT_NAMES):
        assert grad.shape == like.shape, f"{name}: {grad_name} shape {tuple(grad.shape)}"
        assert grad.dtype == like.dtype, f"{name}: {grad_name} dtype {grad.dtype}"
    keep = dropout_keep(case, result.s_dmask, name)
    ref_out, ref_lse, ref_grads = reference_results(case, keep, torch.float32)
    low_out, low_lse, low_grads = reference_results(case, keep, batch.q.dtype)

    used = used_rows(batch.cu_seqlens_q, case.seqused_q, total_q)
    assert_all_written(out[used], lse[:, used], name)
    assert_within_tolerance(out[used], ref_out[used], low_out[used], FORWARD_FACTOR, f"{name} out")
    assert_lse_within_tolerance(
        lse[:, used], ref_lse[:, used], low_lse[:, used], FORWARD_FACTOR, f"{name} lse"
    )
    sees_a_key, seen = row_coverage(case)
    blind = used & ~sees_a_key
    assert bool((out[blind] == 0).all()), f"{name}: a used row that sees no key has nonzero out"

    assert_gradients_within_tolerance(grads, ref_grads, low_grads, name)
    dq, dk, dv = grads
    assert_rows_zero(dq, ~sees_a_key, f"{name}: dq of rows that see no key or are unused")
    assert_rows_zero(dk, ~seen, f"{name}: dk of keys that no query sees or are unused")
    assert_rows_zero(dv, ~seen, f"{name}: dv of keys that no query sees or are unused")


def assert_differ(first: torch.Tensor, second: torch.Tensor, what: str) -> None:
    """The two tensors of one shape are not equal everywhere."""
    assert first.shape == second.shape, f"{what}: shapes {first.shape} and {second.shape}"
    assert not torch.equal(first, second), f"{what} are identical"


def assert_results_bitwise_equal(
    case: Case,
    actual: KernelResult,
    expected: KernelResult,
    name: str,
    compare_lse: bool = True,
) -> None:
    """out (and lse) on the used rows, and every gradient, of two results have identical bits.

    Rows past seqused_q are not written (they hold whatever the allocation held), so they are
    left out of out and lse; the gradients there must be exactly 0 and are compared whole.
    """
    used = used_rows(case.batch.cu_seqlens_q, case.seqused_q, case.batch.q.shape[0])
    assert_bitwise_equal(actual.out[used], expected.out[used], f"{name} out")
    if compare_lse:
        assert_bitwise_equal(actual.lse[:, used], expected.lse[:, used], f"{name} lse")
    for grad_name, grad, reference_grad in zip(GRADIENT_NAMES, actual.grads, expected.grads):
        assert_bitwise_equal(grad, reference_grad, f"{name} {grad_name}")


# ----------------------------------------------------------------------------------------------
# The variant matrix: every variant and combination x head layout, dtype and head dim rotating
# ----------------------------------------------------------------------------------------------


def _varlen_cases() -> list[Any]:
    """Every variant with every head layout. dtype and head dim turn with the case, so that each
    variant meets both dtypes and all three head dims, and every (dtype, head dim) pair occurs
    (a pairwise cover instead of the full product, to keep the file's GPU time small)."""
    cases = []
    for variant_index, name in enumerate(ALL_VARIANTS):
        for layout_index, layout in enumerate(HEAD_LAYOUTS):
            turn = variant_index + layout_index
            dtype = DTYPES[turn % len(DTYPES)]
            head_dim = HEAD_DIMS[turn % len(HEAD_DIMS)]
            case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}"
            cases.append(pytest.param(name, layout, dtype, head_dim, id=case_id))
    return cases


@pytest.mark.parametrize("name, layout, dtype, head_dim", _varlen_cases())
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
    case = matrix_case(ALL_VARIANTS[name], layout, dtype, head_dim)
    check_case(case, run_kernel(case), f"varlen {name}")


def _fixed_cases() -> list[Any]:
    """Every variant without seqused once through flash_attn_func; layout, dtype, head dim and
    the length pair turn with the case."""
    cases = []
    layouts = list(HEAD_LAYOUTS)
    for index, name in enumerate(FIXED_VARIANTS):
        layout = layouts[index % len(layouts)]
        dtype = DTYPES[index % len(DTYPES)]
        head_dim = HEAD_DIMS[(index // len(layouts)) % len(HEAD_DIMS)]
        seqlens = FIXED_SEQLEN_PAIRS[(index // len(DTYPES)) % len(FIXED_SEQLEN_PAIRS)]
        case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}-q{seqlens[0]}k{seqlens[1]}"
        cases.append(pytest.param(name, seqlens, layout, dtype, head_dim, id=case_id))
    return cases


@pytest.mark.parametrize("name, seqlens, layout, dtype, head_dim", _fixed_cases())
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


PACKED_VARIANT = Variant(
    causal=True, window_size=(64, 0), softcap=SOFTCAP, alibi=ALIBI_PER_SEQUENCE,
    dropout_p=DROPOUT_P, qk_scale=SOFTCAP_QK_SCALE,
)
# entry -> (fixed length, head layout, variant); the qkv entries need nheads == nheads_k and
# seqlen_q == seqlen_k; seqused exists only on the varlen kvpacked entry among them.
PACKED_ENTRIES = {
    "varlen_qkvpacked": (False, "mha", PACKED_VARIANT),
    "varlen_kvpacked": (False, "gqa", dataclasses.replace(PACKED_VARIANT, seqused=True)),
    "qkvpacked": (True, "mha", PACKED_VARIANT),
    "kvpacked": (True, "gqa", PACKED_VARIANT),
}
PACKED_SEQLENS = (113, 0, 257, 1, 64)


def packed_case(entry: str) -> Case:
    """The case of a packed entry in the default dtype and head dim."""
    fixed, layout, variant = PACKED_ENTRIES[entry]
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    if fixed:
        pair = FIXED_SEQLEN_PAIRS[-1] if entry == "qkvpacked" else FIXED_SEQLEN_PAIRS[0]
        return fixed_case(variant, pair, layout, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    if entry == "varlen_kvpacked":
        return matrix_case(variant, layout, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = make_varlen_batch(
        PACKED_SEQLENS, PACKED_SEQLENS, nheads, nheads_k, DEFAULT_HEAD_DIM, DEFAULT_DTYPE, DEVICE
    )
    return build_case(batch, variant)


def run_packed(case: Case, entry: str) -> KernelResult:
    """The packed entry on the case's tensors stacked into qkv (or kv), deterministic=True,
    seeded like run_kernel; gradients unpacked to (dq, dk, dv) in the packed layout."""
    q, k, v = entry_inputs(case)
    options = {**api_options(case), "deterministic": True, "return_attn_probs": True}
    batch = case.batch
    with dropout_seed(DROPOUT_SEED):
        if entry.endswith("qkvpacked"):
            leaves = (torch.stack([q, k, v], dim=-3).requires_grad_(),)
            if case.fixed:
                result = flash_varlen.flash_attn_qkvpacked_func(*leaves, **options)
            else:
                result = flash_varlen.flash_attn_varlen_qkvpacked_func(
                    *leaves, batch.cu_seqlens_q, batch.max_seqlen_q, **options
                )
        else:
            leaves = (q.detach().requires_grad_(), torch.stack([k, v], dim=-3).requires_grad_())
            if case.fixed:
                result = flash_varlen.flash_attn_kvpacked_func(*leaves, **options)
            else:
                result = flash_varlen.flash_attn_varlen_kvpacked_func(
                    *leaves, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
                    batch.max_seqlen_k, **seqused_options(case), **options,
                )
    out, lse, s_dmask = result
    packed_grads = torch.autograd.grad((out, lse), leaves, entry_upstream(case))
    if len(packed_grads) == 1:
        grads = packed_grads[0].unbind(dim=-3)
    else:
        grads = (packed_grads[0], *packed_grads[1].unbind(dim=-3))
    packed_out, packed_lse, unpacked = packed_results(case, out.detach(), lse.detach(), grads)
    return KernelResult(packed_out, packed_lse, s_dmask, unpacked)


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
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(error, match=match):
        call_entry(case, q, k, v, **options)
    # Outputs are allocated before a launch, so an unchanged count means no kernel ran.
    assert torch.cuda.memory_allocated() == allocated, "memory was allocated before the error"


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
