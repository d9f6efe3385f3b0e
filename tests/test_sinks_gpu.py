"""GPU tests of attention sinks (``learnable_sink``, issue 12) through the public API.

Every case passes a float32 (nheads,) sink and is checked against flash_varlen.reference called
with the same options: out and softmax_lse (return_attn_probs=True) with the forward tolerance
rule, and dq, dk, dv and dsink (autograd of sum(out * dout) + sum(softmax_lse * dlse), seeded
upstream gradients) with the gradient tolerance rule of tests/accuracy.py: a factor times the
error of the same PyTorch math in the input dtype, plus a rounding floor. dsink is a gradient
like the others: its float32 truth is the reference's float32 autograd, its baseline the input-
dtype autograd, and its floor half an ulp of the input dtype at the largest dsink (the floor
``gradient_floor`` gives dq, dk and dv), since it sums rowsum(dout * out) terms formed from the
rounded out.

The sinks are rounded to bfloat16 (exactly representable in float16 too), so that the
input-dtype reference, which casts the sink to its dtype as it does ALiBi slopes, sees the same
sink as the kernel and the float32 reference.

Exact checks on top of the tolerance rule: a used query row that sees no key (an empty key
sequence, or every key hidden by causal masking or the window) has out = 0 and softmax_lse =
sink[h] bit for bit and dq = 0; the dk, dv of keys no query sees are 0; rows past seqused_q /
seqused_k get zero gradients. As in test_variants_gpu.py, outputs and gradients are
NaN-poisoned through the caching allocator, and with seqused the rows past the used lengths of
q, k, v, dout and dlse are NaN: a kernel that reads them (into out, or into the dsink sum) turns
that NaN into the compared results. The upstream dlse is nonzero on rows that see no key, whose
only dependence is on the sink: a backward that skips those rows loses their share of dsink.

Cases whose (dtype, head-dim bucket) kernels a narrowed build lacks are skipped with the reason.
Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

import flash_varlen
from flash_varlen import reference
from flash_varlen.reference import BOTTOM_RIGHT, NO_WINDOW, TOP_LEFT

from accuracy import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
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
    random_lengths,
    require_backward_kernel,
    rounding_floor,
    seeded_randn,
    varlen_from_fixed,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(dq, dk, dv, dsink), shaped like (q, k, v, learnable_sink)."""

DEVICE = "cuda"
DTYPES = (torch.float16, torch.bfloat16)
# One head dim per tile configuration (64, 128, 256) and one that is no bucket size (72, which
# runs in the 96 bucket with a partial head-dim tile).
HEAD_DIMS = (64, 128, 256, 72)
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}

# Tests that are not about dtype, head dim or head layout use this configuration, which every
# (even narrowed) development build contains.
DEFAULT_DTYPE = torch.bfloat16
DEFAULT_HEAD_DIM = 128
DEFAULT_LAYOUT = "gqa"

# The varlen batch of the matrix (test_variants_gpu.py's): seqlen_q > seqlen_k (rows without
# keys under causal masking) and seqlen_q < seqlen_k, lengths that are not tile multiples, a
# single query row, a single key, and empty query and key sequences. With seqused the used
# lengths are smaller than the slot, equal to it, or 0 with a non-empty slot.
MATRIX_SEQLENS_Q = (113, 203, 0, 1, 257, 64, 37, 90)
MATRIX_SEQLENS_K = (203, 113, 17, 0, 257, 1, 37, 90)
MATRIX_SEQUSED_Q = (50, 203, 0, 0, 200, 1, 0, 90)
MATRIX_SEQUSED_K = (203, 60, 0, 0, 129, 1, 37, 0)

FIXED_BATCH = 2
FIXED_SEQLEN_PAIRS = ((113, 203), (203, 113), (257, 257))

# Seeds: batches 0; upstream gradients 1 and 2 (as in test_backward_gpu.py); the dropout RNG
# (torch.manual_seed before the forward) 3; the sinks 5.
DOUT_SEED = 1
DLSE_SEED = 2
DROPOUT_SEED = 3
SINK_SEED = 5

DROPOUT_P = 0.17
"""Not a round number, so that neither p nor 1 / (1 - p) is exact in binary."""
SOFTCAP = 30.0
SMALL_SOFTCAP = 2.0
SOFTCAP_QK_SCALE = 4.0
"""q and k scaled by this in the SOFTCAP cases, so that the cap of 30 changes the scores."""
ALIBI_SLOPE_BASE_EXPONENT = 8.0
ALIBI_PER_HEAD = "heads"
ALIBI_PER_SEQUENCE = "batch"

RANDOM_SINKS = "random"
"""N(0, SINK_STD^2) per head: with unit q, k the scores have standard deviation about 1, so the
sink takes a share of every row from negligible to most of it."""
LARGE_SINKS = "large"
"""Heads alternate +LARGE_SINK and -LARGE_SINK: a sink that takes nearly all of the row, and one
that takes nearly nothing."""
DOMINANT_SINKS = "dominant"
"""Even heads DOMINANT_SINK, odd heads random: the sink far above every score."""
SINK_STD = 2.0
LARGE_SINK = 20.0
DOMINANT_SINK = 100.0
"""More than float32's exp range (88.7) above every score here: an implementation that
exponentiates the sink against the keys' running maximum, instead of taking the maximum of
both, overflows to inf. The key probabilities, about exp(-100), then underflow in every dtype,
so out and the gradients are 0 to rounding and softmax_lse is the sink."""


# ----------------------------------------------------------------------------------------------
# Variants and cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """The attention options of one case besides the sink, which every case has.

    alibi: None, ALIBI_PER_HEAD or ALIBI_PER_SEQUENCE. seqused: varlen only, the matrix's used
    lengths. qk_scale: q and k are multiplied by this (not an API option). sinks: the kind of
    sink values (RANDOM_SINKS, LARGE_SINKS or DOMINANT_SINKS).
    """

    causal: bool = False
    window_size: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    alibi: str | None = None
    dropout_p: float = 0.0
    causal_alignment: str = BOTTOM_RIGHT
    seqused: bool = False
    qk_scale: float = 1.0
    sinks: str = RANDOM_SINKS


EVERYTHING = Variant(
    causal=True,
    window_size=(64, 0),
    softcap=SOFTCAP,
    alibi=ALIBI_PER_SEQUENCE,
    dropout_p=DROPOUT_P,
    seqused=True,
    qk_scale=SOFTCAP_QK_SCALE,
)

VARIANTS = {
    "plain": Variant(),
    "causal": Variant(causal=True),
    "causal_top_left": Variant(causal=True, causal_alignment=TOP_LEFT),
    # Non-causal windows that hide every key from the first rows when seqlen_q > seqlen_k.
    "window_64_0": Variant(window_size=(64, 0)),
    "window_0_0": Variant(window_size=(0, 0)),
    "window_32_96": Variant(window_size=(32, 96)),
    "window_48_0_causal": Variant(causal=True, window_size=(48, 0)),
    "window_top_left": Variant(window_size=(48, 16), causal_alignment=TOP_LEFT),
    "softcap_30": Variant(softcap=SOFTCAP, qk_scale=SOFTCAP_QK_SCALE),
    "softcap_2_causal": Variant(causal=True, softcap=SMALL_SOFTCAP),
    "alibi_heads": Variant(alibi=ALIBI_PER_HEAD),
    "alibi_batch_causal": Variant(causal=True, alibi=ALIBI_PER_SEQUENCE),
    "dropout": Variant(dropout_p=DROPOUT_P),
    "dropout_causal": Variant(causal=True, dropout_p=DROPOUT_P),
    "seqused": Variant(seqused=True),
    "seqused_causal": Variant(causal=True, seqused=True),
    "large_sinks_causal": Variant(causal=True, sinks=LARGE_SINKS),
    "dominant_sinks": Variant(sinks=DOMINANT_SINKS),
    "everything": EVERYTHING,
    "everything_top_left": dataclasses.replace(EVERYTHING, causal_alignment=TOP_LEFT),
}

# flash_attn_func has no seqused: every variant without it, and "everything" less seqused.
FIXED_VARIANTS = {
    **{name: variant for name, variant in VARIANTS.items() if not variant.seqused},
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
    sink: float32 (nheads,) on the device.
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
    sink: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor


@dataclasses.dataclass(frozen=True)
class KernelResult:
    """What a public call returned, in the packed layout: out (total_q, h, d); lse (h, total_q);
    s_dmask as returned, or None; grads (dq, dk, dv, dsink), or None without a backward."""

    out: torch.Tensor
    lse: torch.Tensor
    s_dmask: torch.Tensor | None
    grads: Gradients | None


def make_sink(kind: str, nheads: int) -> torch.Tensor:
    """float32 (nheads,) sink logits of ``kind`` on DEVICE, every value exact in bfloat16."""
    generator = device_generator(DEVICE, SINK_SEED)
    random = seeded_randn((nheads,), torch.bfloat16, DEVICE, generator, SINK_STD).float()
    even = torch.arange(nheads, device=DEVICE) % 2 == 0
    if kind == RANDOM_SINKS:
        return random
    if kind == LARGE_SINKS:
        return torch.where(even, LARGE_SINK, -LARGE_SINK)
    if kind == DOMINANT_SINKS:
        return torch.where(even, DOMINANT_SINK, random)
    raise ValueError(f"unknown sink kind {kind!r}")


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


def make_alibi_slopes(kind: str | None, batch_size: int, nheads: int) -> torch.Tensor | None:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / nheads) as (nheads,), or (batch, nheads) with
    sequence b's rotated by b heads; None without ALiBi."""
    if kind is None:
        return None
    exponents = torch.arange(1, nheads + 1, dtype=torch.float32, device=DEVICE)
    slopes = torch.exp2(-ALIBI_SLOPE_BASE_EXPONENT * exponents / nheads)
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
    """The case of `variant` on `batch`: slopes, sink, seqused tensors and upstream gradients.

    q and k are scaled by variant.qk_scale. With variant.seqused, `seqused` gives the used
    lengths (query side, key side), and the rows past them in q, k, v, dout and dlse become NaN.
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
        sink=make_sink(variant.sinks, nheads),
        dout=dout,
        dlse=dlse,
    )


def varlen_case(
    variant: Variant,
    layout: str,
    dtype: torch.dtype,
    head_dim: int,
    seqlens: tuple[Sequence[int], Sequence[int]] = (MATRIX_SEQLENS_Q, MATRIX_SEQLENS_K),
) -> Case:
    """`variant` on a packed batch of the given lengths (the matrix's by default, with its
    seqused lengths when the variant uses them)."""
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = make_varlen_batch(*seqlens, nheads, nheads_k, head_dim, dtype, DEVICE)
    return build_case(batch, variant, seqused=(MATRIX_SEQUSED_Q, MATRIX_SEQUSED_K))


def fixed_case(
    variant: Variant, seqlens: tuple[int, int], layout: str, dtype: torch.dtype, head_dim: int
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
    return varlen_case(variant, DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Kernel calls
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def dropout_seed(seed: int) -> Iterator[None]:
    """torch.manual_seed(seed) for the calls inside, the generators restored afterwards."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(seed)
        yield


def api_options(case: Case) -> dict[str, Any]:
    """The variant's keyword arguments of every public function (seqused and sink excluded)."""
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
    return {"seqused_q": case.seqused_q, "seqused_k": case.seqused_k}


def fixed_shape(case: Case, x: torch.Tensor) -> torch.Tensor:
    """A packed (b * s, ...) tensor of a fixed-length case as (b, s, ...) (a view)."""
    return x.unflatten(0, (len(case.batch.seqlens_q), -1))


def entry_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the layout of the case's entry: packed, or (b, s, h, d) when fixed."""
    tensors = (case.batch.q, case.batch.k, case.batch.v)
    return tuple(fixed_shape(case, x) for x in tensors) if case.fixed else tensors


def entry_upstream(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """dout and dlse in the layout of the entry's out and softmax_lse."""
    if not case.fixed:
        return case.dout, case.dlse
    batch_size = len(case.batch.seqlens_q)
    dlse = case.dlse.unflatten(1, (batch_size, -1)).permute(1, 0, 2).contiguous()
    return fixed_shape(case, case.dout), dlse


def packed_results(
    case: Case, out: torch.Tensor, lse: torch.Tensor, grads: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, Gradients | None]:
    """out, lse and (dq, dk, dv, dsink) of the case's entry in the packed layout."""
    if not case.fixed:
        return out, lse, None if grads is None else tuple(grads)
    nheads = out.shape[2]
    packed_lse = lse.permute(1, 0, 2).reshape(nheads, -1)
    packed_grads = None
    if grads is not None:
        *input_grads, dsink = grads
        packed_grads = (*(g.flatten(0, 1) for g in input_grads), dsink)
    return out.flatten(0, 1), packed_lse, packed_grads


def call_entry(case: Case, q, k, v, **options: Any) -> Any:
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
    backward: bool = True,
    sink: torch.Tensor | None = None,
) -> KernelResult:
    """One forward (and backward) of the public entry of `case`, on a NaN-poisoned allocator.

    The forward runs after torch.manual_seed(DROPOUT_SEED), with return_attn_probs=True. The
    backward is torch.autograd.grad of sum(out * dout) + sum(softmax_lse * dlse) w.r.t. q, k, v
    and the sink. `sink` replaces the case's sink leaf (a view, say); the gradient is then the
    one of that tensor.
    """
    q, k, v = (x.detach().requires_grad_() for x in entry_inputs(case))
    sink_leaf = case.sink.detach().clone().requires_grad_() if sink is None else sink
    options = {
        **api_options(case),
        "learnable_sink": sink_leaf,
        "deterministic": deterministic,
        "return_attn_probs": True,
    }
    total_q, nheads = case.batch.q.shape[:2]
    poison_freed_blocks(output_nbytes(case.batch.q, total_q * nheads), DEVICE)
    with dropout_seed(DROPOUT_SEED):
        out, lse, s_dmask = call_entry(case, q, k, v, **options)
    grads = None
    if backward:
        bucket = head_dim_bucket(case.batch.q.shape[-1])
        poison_freed_blocks(gradient_nbytes(case.batch.q, case.batch.k, bucket), DEVICE)
        grads = torch.autograd.grad(
            (out, lse), (q, k, v, sink_leaf), entry_upstream(case), allow_unused=True,
            materialize_grads=True,
        )
    packed_out, packed_lse, packed_grads = packed_results(case, out.detach(), lse.detach(), grads)
    return KernelResult(packed_out, packed_lse, s_dmask, packed_grads)


# ----------------------------------------------------------------------------------------------
# Reference and checks
# ----------------------------------------------------------------------------------------------


def row_coverage(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_q,) bool: query rows that see at least one key; (total_k,) bool: key rows that at
    least one query sees. Rows past the used lengths are False in both."""
    variant = case.variant
    sees_a_key = torch.zeros(case.batch.q.shape[0], dtype=torch.bool, device=DEVICE)
    seen = torch.zeros(case.batch.k.shape[0], dtype=torch.bool, device=DEVICE)
    starts_q = case.batch.cu_seqlens_q.tolist()
    starts_k = case.batch.cu_seqlens_k.tolist()
    for b, (length_q, length_k) in enumerate(zip(case.lengths_q, case.lengths_k)):
        visible = reference.visible_keys(
            length_q, length_k, variant.causal, DEVICE,
            window_size=variant.window_size, causal_alignment=variant.causal_alignment,
        )
        sees_a_key[starts_q[b] : starts_q[b] + length_q] = visible.any(dim=1)
        seen[starts_k[b] : starts_k[b] + length_k] = visible.any(dim=0)
    return sees_a_key, seen


def reference_results(
    case: Case, keep: torch.Tensor | None, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, Gradients]:
    """out, softmax_lse and (dq, dk, dv, dsink) of flash_varlen.reference for `case`, the whole
    computation in `compute_dtype` (the sink leaf stays float32: the reference casts it, and
    the cast's backward returns dsink in float32).

    keep: the dropout keep mask (from the kernel's S_dmask), or None. The upstream gradients
    are zeroed on rows past seqused, where the reference computes nothing (lse -inf). An output
    that depends on nothing differentiable (out when no sequence has both queries and keys)
    takes no upstream gradient.
    """
    batch, variant = case.batch, case.variant
    leaf_dtype = torch.float32 if compute_dtype == torch.float32 else batch.q.dtype
    q, k, v = (x.detach().to(leaf_dtype).requires_grad_() for x in (batch.q, batch.k, batch.v))
    sink = case.sink.detach().clone().requires_grad_()
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
        learnable_sink=sink,
    )
    used = used_rows(batch.cu_seqlens_q, case.seqused_q, batch.q.shape[0])
    dout = torch.where(used[:, None, None], case.dout, 0.0).to(compute_dtype)
    dlse = torch.where(used[None, :], case.dlse, 0.0)
    differentiable = [(x, dx) for x, dx in ((out, dout), (lse, dlse)) if x.requires_grad]
    outputs, cotangents = zip(*differentiable)
    grads = torch.autograd.grad(
        outputs, (q, k, v, sink), cotangents, allow_unused=True, materialize_grads=True
    )
    return out.detach(), lse.detach(), grads


def expected_dmask_shape(case: Case) -> tuple[int, int, int, int]:
    """S_dmask's shape by the contract: (batch, nheads, max_seqlen_q and max_seqlen_k rounded
    up to 128)."""
    batch = case.batch

    def rounded(length: int) -> int:
        return -(-length // 128) * 128

    return (
        len(batch.seqlens_q),
        batch.q.shape[1],
        rounded(batch.max_seqlen_q),
        rounded(batch.max_seqlen_k),
    )


def dropout_keep(case: Case, s_dmask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The keep mask from S_dmask (None without dropout), after checking its shape."""
    if case.variant.dropout_p == 0:
        assert s_dmask is None, f"{name}: S_dmask must be None without dropout"
        return None
    assert s_dmask is not None, f"{name}: S_dmask missing with dropout_p > 0"
    assert tuple(s_dmask.shape) == expected_dmask_shape(case), f"{name}: S_dmask shape"
    return reference.dropout_keep_mask(s_dmask)


def check_case(case: Case, result: KernelResult, name: str) -> None:
    """Shapes; the tolerance rules for out, softmax_lse, dq, dk, dv and dsink against the
    reference on the used rows; the exact values where nothing is seen or used."""
    batch = case.batch
    total_q, nheads, _ = batch.q.shape
    out, lse, grads = result.out, result.lse, result.grads
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype, f"{name}: out shape/dtype"
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32, f"{name}: lse"
    *input_grads, dsink = grads
    for grad, like, grad_name in zip(input_grads, (batch.q, batch.k, batch.v), GRADIENT_NAMES):
        assert grad.shape == like.shape and grad.dtype == like.dtype, f"{name}: {grad_name}"
    assert dsink.shape == (nheads,) and dsink.dtype == torch.float32, f"{name}: dsink"
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
    sink_per_row = case.sink[:, None].expand(-1, int(blind.sum()))
    assert_bitwise_equal(lse[:, blind], sink_per_row, f"{name}: lse of rows that see no key")

    assert_gradients_within_tolerance(input_grads, ref_grads[:3], low_grads[:3], name)
    assert_within_tolerance(
        dsink, ref_grads[3], low_grads[3], GRADIENT_FACTOR, f"{name} dsink",
        floor=rounding_floor(batch.q, ref_grads[3]),
    )
    dq, dk, dv = input_grads
    assert_rows_zero(dq, ~sees_a_key, f"{name}: dq of rows that see no key or are unused")
    assert_rows_zero(dk, ~seen, f"{name}: dk of keys that no query sees or are unused")
    assert_rows_zero(dv, ~seen, f"{name}: dv of keys that no query sees or are unused")


def assert_results_bitwise_equal(
    case: Case, actual: KernelResult, expected: KernelResult, name: str
) -> None:
    """out and lse on the used rows, and every gradient (dsink included), have identical bits.
    Rows past seqused_q are not written, so they are left out of out and lse."""
    used = used_rows(case.batch.cu_seqlens_q, case.seqused_q, case.batch.q.shape[0])
    assert_bitwise_equal(actual.out[used], expected.out[used], f"{name} out")
    assert_bitwise_equal(actual.lse[:, used], expected.lse[:, used], f"{name} lse")
    for grad_name, grad, expected_grad in zip(
        (*GRADIENT_NAMES, "dsink"), actual.grads, expected.grads, strict=True
    ):
        assert_bitwise_equal(grad, expected_grad, f"{name} {grad_name}")


# ----------------------------------------------------------------------------------------------
# The matrix: every variant x head layout, dtype and head dim rotating
# ----------------------------------------------------------------------------------------------


def rotation(turn: int) -> tuple[torch.dtype, int]:
    """The (dtype, head dim) of a case's turn: eight consecutive turns cover every pair."""
    head_dim = HEAD_DIMS[turn % len(HEAD_DIMS)]
    dtype = DTYPES[(turn + turn // len(HEAD_DIMS)) % len(DTYPES)]
    return dtype, head_dim


def _varlen_cases() -> list[Any]:
    """Every variant with every head layout; dtype and head dim turn with the case."""
    cases = []
    for variant_index, name in enumerate(VARIANTS):
        for layout_index, layout in enumerate(HEAD_LAYOUTS):
            dtype, head_dim = rotation(variant_index + layout_index)
            case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}"
            cases.append(pytest.param(name, layout, dtype, head_dim, id=case_id))
    return cases


@pytest.mark.parametrize("name, layout, dtype, head_dim", _varlen_cases())
def test_varlen_sink_matches_reference(
    name: str, layout: str, dtype: torch.dtype, head_dim: int
) -> None:
    """flash_attn_varlen_func with a sink and one variant on the matrix batch: out, lse, dq, dk,
    dv and dsink within the tolerance rule, exact values where nothing is seen or used.

    Fails if the sink is left out of the row maximum, the normalization or the lse; if it is
    scaled, capped or biased like a score; if a head reads another head's sink (GQA/MQA: the
    sink is per query head); if dropout drops the sink; if rows without keys get lse -inf or a
    NaN; if dsink misses the rows without keys, counts rows past seqused (their NaN upstream
    gradients would reach it) or ignores dlse; or if an empty sequence shifts its neighbours.
    """
    require_backward_kernel(dtype, head_dim)
    case = varlen_case(VARIANTS[name], layout, dtype, head_dim)
    check_case(case, run_kernel(case), f"varlen {name}")


def _fixed_cases() -> list[Any]:
    """Every variant without seqused once through flash_attn_func; layout, dtype, head dim and
    the length pair turn with the case."""
    cases = []
    layouts = list(HEAD_LAYOUTS)
    for index, name in enumerate(FIXED_VARIANTS):
        layout = layouts[index % len(layouts)]
        dtype, head_dim = rotation(index + 1)
        seqlens = FIXED_SEQLEN_PAIRS[(index // len(DTYPES)) % len(FIXED_SEQLEN_PAIRS)]
        case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}-q{seqlens[0]}k{seqlens[1]}"
        cases.append(pytest.param(name, seqlens, layout, dtype, head_dim, id=case_id))
    return cases


@pytest.mark.parametrize("name, seqlens, layout, dtype, head_dim", _fixed_cases())
def test_fixed_sink_matches_reference(
    name: str, seqlens: tuple[int, int], layout: str, dtype: torch.dtype, head_dim: int
) -> None:
    """flash_attn_func (b, s, h, d) with a sink and each variant: the checks of the varlen
    matrix. Fails if the fixed-length entry passes the sink differently (or not at all)."""
    require_backward_kernel(dtype, head_dim)
    case = fixed_case(FIXED_VARIANTS[name], seqlens, layout, dtype, head_dim)
    check_case(case, run_kernel(case), f"fixed {name}")


# ----------------------------------------------------------------------------------------------
# Rows without keys, empty sequences, large sinks
# ----------------------------------------------------------------------------------------------

# Causal: sequence 4 has 150 rows without keys, 6 rows of a one-key sequence see it; sequences 1,
# 2 and 7 have queries and no key, 0 and 3 no query.
BLIND_SEQLENS_Q = (0, 5, 3, 0, 200, 1, 130, 7)
BLIND_SEQLENS_K = (4, 0, 0, 0, 50, 1, 300, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("entry", ["varlen", "fixed"])
def test_rows_without_keys_get_the_sink(entry: str, dtype: torch.dtype) -> None:
    """Rows that see no key (empty key sequences, causal seqlen_q > seqlen_k): out 0, lse equal
    to the sink bit for bit, dq 0, and their dlse reaches dsink (exp(sink - lse) = 1, out = 0).

    Fails if a thread block that finds no key block to visit writes -inf (or nothing) instead
    of the sink, or skips those rows' dlse in the dsink reduction."""
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    variant = Variant(causal=True)
    if entry == "fixed":
        case = fixed_case(variant, (257, 113), DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM)
    else:
        seqlens = (BLIND_SEQLENS_Q, BLIND_SEQLENS_K)
        case = varlen_case(variant, DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM, seqlens)
    result = run_kernel(case)
    sees_a_key, _ = row_coverage(case)
    assert int((~sees_a_key).sum()) >= 144  # the premise of the test
    check_case(case, result, f"{entry} rows without keys")


def test_no_sequence_has_keys() -> None:
    """Every key sequence empty: every row's lse is its head's sink, out and dq are 0 and dsink
    is the sum of dlse over the head's rows (compared with the reference by the rule)."""
    seqlens_q, seqlens_k = (3, 0, 129, 1), (0, 0, 0, 0)
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    case = varlen_case(
        Variant(causal=True), DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM,
        (seqlens_q, seqlens_k),
    )
    result = run_kernel(case)
    check_case(case, result, "no keys")
    assert bool((result.out == 0).all())


LARGE_MAGNITUDE_SEQLENS = (300, 129, 1000)


@pytest.mark.parametrize("sinks", [LARGE_SINKS, DOMINANT_SINKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_sinks_of_large_magnitude(dtype: torch.dtype, sinks: str) -> None:
    """Sinks of +-20 and of +100 (far beyond float32's exp range above every score) on long
    causal sequences: finite results within the rule, the dominated rows' out near 0.

    Fails if the sink enters an exponent without the common row maximum (overflow to inf and
    then NaN), or if the rescaling when the sink raises the maximum is wrong."""
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    case = varlen_case(
        Variant(causal=True, sinks=sinks), DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM,
        (LARGE_MAGNITUDE_SEQLENS, LARGE_MAGNITUDE_SEQLENS),
    )
    result = run_kernel(case)
    for grad_name, grad in zip((*GRADIENT_NAMES, "dsink"), result.grads):
        assert bool(torch.isfinite(grad).all()), f"sinks {sinks}: {grad_name} not finite"
    check_case(case, result, f"{sinks} sinks")


# ----------------------------------------------------------------------------------------------
# Many sequences
# ----------------------------------------------------------------------------------------------

SHORT_SEQUENCES = 2000
SHORT_LENGTH_MAX = 3
LONG_LENGTH = 1000


def test_one_long_sequence_among_thousands() -> None:
    """2000 sequences of 0 to 3 tokens (independently on the query and key sides) and one of
    1000 in the middle, causal: every thread block of the dsink reduction contributes, most of
    them with a few rows or none. Compared whole with the reference, which runs sequence by
    sequence (about 20 s on CPU, so in one dtype only).

    Fails if dsink is reduced over a fixed number of blocks or sequences, if short sequences
    lose rows, or if the long sequence's blocks are attributed to a wrong sequence."""
    dtype = DEFAULT_DTYPE
    require_backward_kernel(dtype, DEFAULT_HEAD_DIM)
    lengths_q = random_lengths(SHORT_SEQUENCES, 0, SHORT_LENGTH_MAX, seed=6)
    lengths_k = random_lengths(SHORT_SEQUENCES, 0, SHORT_LENGTH_MAX, seed=7)
    middle = SHORT_SEQUENCES // 2
    lengths_q.insert(middle, LONG_LENGTH)
    lengths_k.insert(middle, LONG_LENGTH)
    case = varlen_case(
        Variant(causal=True), DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM, (lengths_q, lengths_k)
    )
    check_case(case, run_kernel(case), "one among thousands")


# ----------------------------------------------------------------------------------------------
# Determinism, packed entries, a strided sink
# ----------------------------------------------------------------------------------------------

DETERMINISM_VARIANTS = ("causal", "dropout_causal", "everything")


@pytest.mark.parametrize("name", DETERMINISM_VARIANTS)
def test_deterministic_gradients_are_bitwise_reproducible(name: str) -> None:
    """deterministic=True: two runs give identical out, lse, dq, dk, dv and dsink. Fails if
    dsink (or dq) is summed across thread blocks with unordered atomics despite the flag."""
    case = default_case(VARIANTS[name])
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
    seqlens = (
        (MATRIX_SEQLENS_Q, MATRIX_SEQLENS_K)
        if entry == "varlen_kvpacked"
        else (PACKED_SEQLENS, PACKED_SEQLENS)
    )
    return varlen_case(variant, layout, DEFAULT_DTYPE, DEFAULT_HEAD_DIM, seqlens)


def run_packed(case: Case, entry: str) -> KernelResult:
    """The packed entry on the case's tensors stacked into qkv (or kv), deterministic=True,
    seeded like run_kernel; gradients unpacked to (dq, dk, dv, dsink) in the packed layout."""
    q, k, v = entry_inputs(case)
    sink = case.sink.detach().clone().requires_grad_()
    options = {
        **api_options(case),
        "learnable_sink": sink,
        "deterministic": True,
        "return_attn_probs": True,
    }
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
    *packed_grads, dsink = torch.autograd.grad((out, lse), (*leaves, sink), entry_upstream(case))
    if len(packed_grads) == 1:
        grads = packed_grads[0].unbind(dim=-3)
    else:
        grads = (packed_grads[0], *packed_grads[1].unbind(dim=-3))
    packed_out, packed_lse, unpacked = packed_results(
        case, out.detach(), lse.detach(), (*grads, dsink)
    )
    return KernelResult(packed_out, packed_lse, s_dmask, unpacked)


@pytest.mark.parametrize("entry", list(PACKED_ENTRIES))
def test_packed_entry_with_a_sink_matches_unpacked(entry: str) -> None:
    """A packed entry with a sink (and window, softcap, ALiBi, dropout; seqused for the varlen
    kvpacked one) gives the unpacked call's out, lse, S_dmask and gradients, dsink included, bit
    for bit. Fails if a packed entry drops the sink or does not return its gradient."""
    case = packed_case(entry)
    expected = run_kernel(case, deterministic=True)
    got = run_packed(case, entry)
    assert_results_bitwise_equal(case, got, expected, entry)
    assert_bitwise_equal(got.s_dmask, expected.s_dmask, f"{entry} S_dmask")


def test_strided_sink_view() -> None:
    """A sink that is a strided view (every other element of a buffer whose other elements
    are NaN), which validation accepts, gives the contiguous sink's results and gradient bit
    for bit. Fails if the sink is read with unit stride."""
    case = default_case(Variant(causal=True))
    expected = run_kernel(case, deterministic=True)
    nheads = case.sink.shape[0]
    buffer = torch.full((nheads, 2), float("nan"), device=DEVICE)
    buffer[:, 0] = case.sink
    buffer.requires_grad_()
    got = run_kernel(case, deterministic=True, sink=buffer[:, 0])
    assert_results_bitwise_equal(case, got, expected, "strided sink")


# ----------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# ----------------------------------------------------------------------------------------------

COMPILE_SEQLENS_Q = (129, 0, 300, 64, 5)
COMPILE_SEQLENS_K = (200, 17, 300, 1, 0)


def test_torch_compile_fullgraph_matches_eager() -> None:
    """torch.compile(fullgraph=True) of a function calling flash_attn_varlen_func with a sink:
    out, lse and the gradients of q, k, v and the sink equal eager's bit for bit
    (deterministic=True). Fails if the sink breaks the graph, if the fake implementations give
    dsink a wrong shape or dtype, or if the compiled backward drops the sink's gradient."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    case = varlen_case(
        Variant(causal=True, window_size=(64, 0)), DEFAULT_LAYOUT, DEFAULT_DTYPE,
        DEFAULT_HEAD_DIM, (COMPILE_SEQLENS_Q, COMPILE_SEQLENS_K),
    )
    batch = case.batch

    def attend(q, k, v, sink):
        out, lse, _ = flash_varlen.flash_attn_varlen_func(
            q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, causal=True, window_size=(64, 0), learnable_sink=sink,
            deterministic=True, return_attn_probs=True,
        )
        return out, lse

    def run(fn) -> tuple[torch.Tensor, ...]:
        leaves = [x.detach().clone().requires_grad_() for x in (batch.q, batch.k, batch.v)]
        sink = case.sink.detach().clone().requires_grad_()
        out, lse = fn(*leaves, sink)
        grads = torch.autograd.grad((out, lse), (*leaves, sink), (case.dout, case.dlse))
        return out.detach(), lse.detach(), *grads

    eager = run(attend)
    compiled = run(torch.compile(attend, fullgraph=True))
    for name, got, expected in zip(
        ("out", "lse", *GRADIENT_NAMES, "dsink"), compiled, eager, strict=True
    ):
        assert_bitwise_equal(got, expected, f"compiled {name}")


GRAPH_BUFFER_ROWS = 1024
GRAPH_MAX_SEQLEN = 512
GRAPH_WARMUP_STEPS = 3
GRAPH_CAPTURE_LENGTHS = [300, 200, 1, 400]
GRAPH_REPLAY_LENGTHS = [[512, 0, 77, 130], [5, 490, 0, 0], [0, 0, 0, 0]]


@dataclasses.dataclass
class StaticStep:
    """The buffers one captured step reads and writes (test_cuda_graphs_gpu.py's recipe, with
    the sink and an lse gradient)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sink: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor
    cu_seqlens: torch.Tensor
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def new_static_step() -> StaticStep:
    nheads, nheads_k = HEAD_LAYOUTS[DEFAULT_LAYOUT]

    def leaf(*shape: int, dtype: torch.dtype = DEFAULT_DTYPE) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=DEVICE, requires_grad=True)

    rows = GRAPH_BUFFER_ROWS
    return StaticStep(
        q=leaf(rows, nheads, DEFAULT_HEAD_DIM),
        k=leaf(rows, nheads_k, DEFAULT_HEAD_DIM),
        v=leaf(rows, nheads_k, DEFAULT_HEAD_DIM),
        sink=leaf(nheads, dtype=torch.float32),
        dout=torch.empty((rows, nheads, DEFAULT_HEAD_DIM), dtype=DEFAULT_DTYPE, device=DEVICE),
        dlse=torch.empty((nheads, rows), dtype=torch.float32, device=DEVICE),
        cu_seqlens=torch.empty(len(GRAPH_CAPTURE_LENGTHS) + 1, dtype=torch.int32, device=DEVICE),
    )


def fill(step: StaticStep, lengths: list[int], seed: int) -> None:
    """Writes new contents (tokens, sink, upstream gradients, cu_seqlens) into the buffers."""
    generator = device_generator(DEVICE, seed)
    with torch.no_grad():
        for buffer in (step.q, step.k, step.v, step.dout, step.dlse):
            buffer.copy_(seeded_randn(buffer.shape, buffer.dtype, DEVICE, generator))
        step.sink.copy_(seeded_randn(step.sink.shape, torch.float32, DEVICE, generator, SINK_STD))
    prefix = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    step.cu_seqlens.copy_(prefix.to(DEVICE))


def attention_step(step: StaticStep) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of causal varlen attention with the sink, on the step's buffers."""
    out, lse, _ = flash_varlen.flash_attn_varlen_func(
        step.q, step.k, step.v, step.cu_seqlens, step.cu_seqlens, GRAPH_MAX_SEQLEN,
        GRAPH_MAX_SEQLEN, causal=True, learnable_sink=step.sink, deterministic=True,
        return_attn_probs=True,
    )
    torch.autograd.backward((out, lse), (step.dout, step.dlse))
    return out, lse


def capture(step: StaticStep) -> torch.cuda.CUDAGraph:
    """Warms up on a side stream, then captures one step; gradients are None before capture,
    so that the captured backward writes them instead of accumulating."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_STEPS):
            attention_step(step)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in (step.q, step.k, step.v, step.sink):
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.out, step.lse = attention_step(step)
    return graph


def eager_results(step: StaticStep) -> tuple[torch.Tensor, ...]:
    """out, lse, dq, dk, dv, dsink of an eager call on clones of the buffers' contents, with any
    host synchronization raising."""
    leaves = [x.detach().clone().requires_grad_() for x in (step.q, step.k, step.v, step.sink)]
    eager = StaticStep(*leaves, step.dout.clone(), step.dlse.clone(), step.cu_seqlens.clone())
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = attention_step(eager)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out.detach(), lse.detach(), *(leaf.grad for leaf in leaves)


def test_cuda_graph_replays_forward_and_backward_with_a_sink() -> None:
    """Capture one forward + backward with a sink, replay it with new tokens, sinks, upstream
    gradients and cu_seqlens (empty sequences, then no tokens at all): out, lse on the written
    rows and dq, dk, dv, dsink equal an eager call's bit for bit (deterministic=True), and the
    gradient rows past the new end are 0.

    Fails if the sink path synchronizes with the host (capture or the sync-debug eager call
    raises), if dsink's buffer is not zeroed inside the graph (a replay would accumulate the
    previous one), or if the sink is read at capture time rather than at replay."""
    require_backward_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    step = new_static_step()
    fill(step, GRAPH_CAPTURE_LENGTHS, seed=0)
    graph = capture(step)
    for replay, lengths in enumerate(GRAPH_REPLAY_LENGTHS, start=1):
        fill(step, lengths, seed=replay)
        graph.replay()
        expected_out, expected_lse, *expected_grads = eager_results(step)
        total = sum(lengths)
        label = f"replay {replay} {lengths}"
        assert_bitwise_equal(step.out[:total], expected_out[:total], f"{label}: out")
        assert_bitwise_equal(step.lse[:, :total], expected_lse[:, :total], f"{label}: lse")
        leaves = (step.q, step.k, step.v, step.sink)
        for name, leaf, expected in zip((*GRADIENT_NAMES, "dsink"), leaves, expected_grads):
            if name != "dsink":
                assert bool((leaf.grad[total:] == 0).all()), f"{label}: {name} past the end"
            assert_bitwise_equal(leaf.grad, expected, f"{label}: {name}")
    assert bool((step.sink.grad == 0).all()), "no rows: dsink must be 0"
