"""The harness of the GPU variant tests (test_variants_gpu.py) and sink tests (test_sinks_gpu.py).

A case (`Case`) is one call of a public entry with the attention options of a `Variant`, on a
packed batch (or a fixed-length one seen packed), with seeded upstream gradients. `run_kernel`
calls the entry (forward and backward) on a NaN-poisoned allocator; `check_case` compares out,
softmax_lse and the gradients with flash_varlen.reference by the tolerance rule of
tests/accuracy.py and makes the exact checks (rows that see no key, keys no query sees, rows
past seqused). See the two test modules' docstrings for what is checked and why.

A variant with `sinks` set (a kind of sink values: RANDOM_SINKS, LARGE_SINKS or DOMINANT_SINKS)
gives its case a float32 (nheads,) `learnable_sink`. Every call then passes it, the gradients
are (dq, dk, dv, dsink) instead of (dq, dk, dv), and check_case also checks dsink by the
gradient rule and softmax_lse = sink bit for bit on the used rows that see no key.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
import torch

import flash_varlen
from flash_varlen import reference
from flash_varlen.reference import BOTTOM_RIGHT, NO_WINDOW

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
    require_backward_kernel,
    rounding_floor,
    seeded_randn,
    varlen_from_fixed,
)

Gradients = tuple[torch.Tensor, ...]
"""(dq, dk, dv), shaped like (q, k, v); with a sink (dq, dk, dv, dsink), dsink like the sink."""

DEVICE = "cuda"
DTYPES = (torch.float16, torch.bfloat16)
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}

# Tests that are not about dtype, head dim or head layout use this configuration, which every
# (even narrowed) development build contains.
DEFAULT_DTYPE = torch.bfloat16
DEFAULT_HEAD_DIM = 128
DEFAULT_LAYOUT = "gqa"

# The varlen batch of the matrix: seqlen_q > seqlen_k (rows without keys under causal masking)
# and seqlen_q < seqlen_k, lengths that are not tile multiples (113, 203, 257, 37, 90), a single
# query row, a single key, and empty query and key sequences. With seqused the used lengths are
# smaller than the slot (50 of 113, 60 of 203, ...), equal to it (203 of 203, 1 of 1), or 0 with
# a non-empty slot, on the query side, the key side or both.
MATRIX_SEQLENS_Q = (113, 203, 0, 1, 257, 64, 37, 90)
MATRIX_SEQLENS_K = (203, 113, 17, 0, 257, 1, 37, 90)
MATRIX_SEQUSED_Q = (50, 203, 0, 0, 200, 1, 0, 90)
MATRIX_SEQUSED_K = (203, 60, 0, 0, 129, 1, 37, 0)

# Fixed-length cases: this many sequences of one of these (seqlen_q, seqlen_k) pairs.
FIXED_BATCH = 2
FIXED_SEQLEN_PAIRS = ((113, 203), (203, 113), (257, 257))

# Seeds: the batches use 0; upstream gradients 1 and 2 as in test_backward_gpu.py; the dropout
# RNG (torch.manual_seed before the forward) DROPOUT_SEED; the sinks SINK_SEED.
DOUT_SEED = 1
DLSE_SEED = 2
DROPOUT_SEED = 3
SINK_SEED = 5

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
ALIBI_SLOPE_BASE_EXPONENT = 8.0
"""ALiBi's geometric slopes (Press et al.): head h of H gets 2^(-8 (h + 1) / H)."""

ALIBI_PER_HEAD = "heads"
"""alibi_slopes of shape (nheads,)."""
ALIBI_PER_SEQUENCE = "batch"
"""alibi_slopes of shape (batch, nheads)."""

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

# S_dmask (contract): (batch, nheads, round_up(max_seqlen_q, 128), round_up(max_seqlen_k, 128)).
DMASK_ROUNDING = 128


# ----------------------------------------------------------------------------------------------
# Variants and cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """The attention options of one case: the public keyword arguments, tensors described.

    alibi: None, ALIBI_PER_HEAD or ALIBI_PER_SEQUENCE (shape of the slopes, built per batch).
    seqused: varlen only; use the batch's seqused lengths (MATRIX_SEQUSED_Q/K in the matrix).
    qk_scale: q and k are multiplied by this before the call (not an API option).
    sinks: None (no learnable_sink), or the kind of sink values (RANDOM_SINKS, LARGE_SINKS or
        DOMINANT_SINKS).
    """

    causal: bool = False
    window_size: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    alibi: str | None = None
    dropout_p: float = 0.0
    causal_alignment: str = BOTTOM_RIGHT
    seqused: bool = False
    qk_scale: float = 1.0
    sinks: str | None = None


EVERYTHING = Variant(
    causal=True,
    window_size=(64, 0),
    softcap=SOFTCAP,
    alibi=ALIBI_PER_SEQUENCE,
    dropout_p=DROPOUT_P,
    seqused=True,
    qk_scale=SOFTCAP_QK_SCALE,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything one kernel call and its references read, in the packed layout.

    batch: the inputs; for a fixed-length case (fixed=True) the uniform-length packed view of
        (b, s, h, d) tensors, which the kernel call reshapes back.
    lengths_q, lengths_k: the used length of every sequence (the slot lengths without seqused).
    seqused_q, seqused_k: int32 (batch,) on the device, or None.
    alibi_slopes: float32 (nheads,) or (batch, nheads) on the device, or None.
    sink: float32 (nheads,) on the device, or None (the variant has no sinks).
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
    sink: torch.Tensor | None
    dout: torch.Tensor
    dlse: torch.Tensor


@dataclasses.dataclass(frozen=True)
class KernelResult:
    """What a public call returned, in the packed layout.

    out: (total_q, h, d); lse: (h, total_q) or None (return_attn_probs=False); s_dmask: as
    returned (batch, h, rounded s_q, rounded s_k), or None; grads: (dq, dk, dv), with a sink
    (dq, dk, dv, dsink), or None when the backward was not run.
    """

    out: torch.Tensor
    lse: torch.Tensor | None
    s_dmask: torch.Tensor | None
    grads: Gradients | None


def gradient_names(case: Case) -> tuple[str, ...]:
    """The names of the case's gradients: GRADIENT_NAMES, and "dsink" with a sink."""
    return GRADIENT_NAMES if case.sink is None else (*GRADIENT_NAMES, "dsink")


def make_sink(kind: str, nheads: int) -> torch.Tensor:
    """float32 (nheads,) sink logits of ``kind`` on DEVICE, every value exact in bfloat16.

    The sinks are rounded to bfloat16 (exactly representable in float16 too), so that the
    input-dtype reference, which casts the sink to its dtype as it does ALiBi slopes, sees the
    same sink as the kernel and the float32 reference.
    """
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
    """The case of `variant` on `batch`: slopes, sink, seqused tensors and upstream gradients.

    q and k are scaled by variant.qk_scale. With variant.seqused, `seqused` gives the used
    lengths (query side, key side), and the rows past them in q, k, v, dout and dlse become NaN
    (see the test modules' docstrings).
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
        sink=None if variant.sinks is None else make_sink(variant.sinks, nheads),
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
    """`variant` on a packed batch of the given lengths (the matrix's by default), with the
    matrix's seqused lengths (MATRIX_SEQUSED_*) when the variant uses seqused."""
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = make_varlen_batch(*seqlens, nheads, nheads_k, head_dim, dtype, DEVICE)
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
    return varlen_case(variant, DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM)


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
    """out, lse and grads of the case's entry in the packed layout (views where possible).

    grads: (dq, dk, dv), or (dq, dk, dv, dsink) with a sink; dsink (nheads,) is the same in
    both layouts.
    """
    if not case.fixed:
        return out, lse, None if grads is None else tuple(grads)
    nheads = out.shape[2]
    packed_lse = None if lse is None else lse.permute(1, 0, 2).reshape(nheads, -1)
    packed_grads = None
    if grads is not None:
        input_grads, sink_grads = grads[: len(GRADIENT_NAMES)], grads[len(GRADIENT_NAMES) :]
        packed_grads = (*(g.flatten(0, 1) for g in input_grads), *sink_grads)
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
    sink: torch.Tensor | None = None,
) -> KernelResult:
    """One forward (and backward) of the public entry of `case`, on a NaN-poisoned allocator.

    The forward runs after torch.manual_seed(seed) (unless seed is None). The backward is
    torch.autograd.grad of sum(out * dout) (+ sum(softmax_lse * dlse) when return_attn_probs
    and lse_grad) w.r.t. q, k, v, and the sink when the case has one; `between` runs after the
    forward, before the backward. `sink` replaces the case's sink leaf (a view, say); the
    gradient is then the one of that tensor.
    """
    q, k, v = (x.detach().requires_grad_() for x in entry_inputs(case))
    options = {
        **api_options(case),
        "deterministic": deterministic,
        "return_attn_probs": return_attn_probs,
    }
    leaves = (q, k, v)
    if case.sink is not None:
        sink_leaf = case.sink.detach().clone().requires_grad_() if sink is None else sink
        options["learnable_sink"] = sink_leaf
        leaves = (q, k, v, sink_leaf)
    elif sink is not None:
        raise ValueError("sink replaces the case's sink, and this case has none")
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
            outputs, leaves, grad_outputs, allow_unused=True, materialize_grads=True
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
    """out, softmax_lse and (dq, dk, dv), with a sink (dq, dk, dv, dsink), of
    flash_varlen.reference for `case`, the whole computation in `compute_dtype` (float32 leaves
    are exact copies, so float32 gradients are never rounded to the input dtype; the sink leaf
    stays float32: the reference casts it, and the cast's backward returns dsink in float32).

    keep: the dropout keep mask (from the kernel's S_dmask), or None. The upstream gradients
    are zeroed on rows past seqused (the reference computes nothing there: lse -inf). Without a
    sink, dlse is also zeroed on rows whose reference lse is -inf (autograd through log(0) is
    not meaningful; the kernel must ignore whatever dlse holds there, which the exact-zero
    checks cover); with a sink every used row's lse is finite, so dlse is kept on every used
    row. When no sequence has both queries and keys, out depends on nothing differentiable:
    without a sink the gradients are then zeros; with one, out takes no upstream gradient.
    """
    batch, variant = case.batch, case.variant
    leaf_dtype = torch.float32 if compute_dtype == torch.float32 else batch.q.dtype
    q, k, v = (x.detach().to(leaf_dtype).requires_grad_() for x in (batch.q, batch.k, batch.v))
    sink = None if case.sink is None else case.sink.detach().clone().requires_grad_()
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
    if sink is None and not out.requires_grad:  # no sequence has both queries and keys
        return out, lse, (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    leaves = (q, k, v) if sink is None else (q, k, v, sink)
    used = used_rows(batch.cu_seqlens_q, case.seqused_q, batch.q.shape[0])
    dout = torch.where(used[:, None, None], case.dout, 0.0).to(compute_dtype)
    dlse_rows = used[None, :]
    if sink is None:
        dlse_rows = dlse_rows & torch.isfinite(lse.detach())
    dlse = torch.where(dlse_rows, case.dlse, 0.0)
    if sink is None:
        outputs, cotangents = (out, lse), (dout, dlse)
    else:
        differentiable = [(x, dx) for x, dx in ((out, dout), (lse, dlse)) if x.requires_grad]
        outputs, cotangents = zip(*differentiable)
    grads = torch.autograd.grad(
        outputs, leaves, cotangents, allow_unused=True, materialize_grads=True
    )
    return out.detach(), lse.detach(), grads


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
    """Shapes; the tolerance rules for out, softmax_lse, dq, dk, dv (and dsink) against the
    reference on the used rows; the exact values where nothing is seen or used: out 0 (and
    softmax_lse = sink with a sink) on used rows that see no key, zero gradients of rows without
    keys, keys without queries and unused rows."""
    batch = case.batch
    total_q, nheads, _ = batch.q.shape
    out, lse, grads = result.out, result.lse, result.grads
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype, f"{name}: out shape/dtype"
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32, f"{name}: lse"
    assert len(grads) == len(gradient_names(case)), f"{name}: {len(grads)} gradients"
    input_grads = grads[: len(GRADIENT_NAMES)]
    for grad, like, grad_name in zip(input_grads, (batch.q, batch.k, batch.v), GRADIENT_NAMES):
        assert grad.shape == like.shape, f"{name}: {grad_name} shape {tuple(grad.shape)}"
        assert grad.dtype == like.dtype, f"{name}: {grad_name} dtype {grad.dtype}"
    if case.sink is not None:
        dsink = grads[len(GRADIENT_NAMES)]
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
    if case.sink is not None:
        sink_per_row = case.sink[:, None].expand(-1, int(blind.sum()))
        assert_bitwise_equal(lse[:, blind], sink_per_row, f"{name}: lse of rows that see no key")

    assert_gradients_within_tolerance(input_grads, ref_grads[:3], low_grads[:3], name)
    if case.sink is not None:
        assert_within_tolerance(
            dsink, ref_grads[3], low_grads[3], GRADIENT_FACTOR, f"{name} dsink",
            floor=rounding_floor(batch.q, ref_grads[3]),
        )
    dq, dk, dv = input_grads
    assert_rows_zero(dq, ~sees_a_key, f"{name}: dq of rows that see no key or are unused")
    assert_rows_zero(dk, ~seen, f"{name}: dk of keys that no query sees or are unused")
    assert_rows_zero(dv, ~seen, f"{name}: dv of keys that no query sees or are unused")


def assert_results_bitwise_equal(
    case: Case,
    actual: KernelResult,
    expected: KernelResult,
    name: str,
    compare_lse: bool = True,
) -> None:
    """out (and lse) on the used rows, and every gradient (dsink included), of two results have
    identical bits.

    Rows past seqused_q are not written (they hold whatever the allocation held), so they are
    left out of out and lse; the gradients there must be exactly 0 and are compared whole.
    """
    used = used_rows(case.batch.cu_seqlens_q, case.seqused_q, case.batch.q.shape[0])
    assert_bitwise_equal(actual.out[used], expected.out[used], f"{name} out")
    if compare_lse:
        assert_bitwise_equal(actual.lse[:, used], expected.lse[:, used], f"{name} lse")
    for grad_name, grad, expected_grad in zip(
        gradient_names(case), actual.grads, expected.grads, strict=True
    ):
        assert_bitwise_equal(grad, expected_grad, f"{name} {grad_name}")


# ----------------------------------------------------------------------------------------------
# The matrix parameters
# ----------------------------------------------------------------------------------------------

Rotation = Callable[[int], tuple[torch.dtype, int]]
"""A case's turn (an index) -> the (dtype, head dim) of the case."""


def varlen_params(variants: Iterable[str], rotation: Rotation) -> list[Any]:
    """pytest params (name, layout, dtype, head_dim), id "name-layout-dtype-dHEAD_DIM": every
    variant with every head layout, dtype and head dim from rotation(variant index + layout
    index)."""
    cases = []
    for variant_index, name in enumerate(variants):
        for layout_index, layout in enumerate(HEAD_LAYOUTS):
            dtype, head_dim = rotation(variant_index + layout_index)
            case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}"
            cases.append(pytest.param(name, layout, dtype, head_dim, id=case_id))
    return cases


def fixed_params(variants: Iterable[str], rotation: Rotation) -> list[Any]:
    """pytest params (name, seqlens, layout, dtype, head_dim), id
    "name-layout-dtype-dHEAD_DIM-qSEQLEN_QkSEQLEN_K": every variant once, the layout and the
    FIXED_SEQLEN_PAIRS pair turning with the variant's index, dtype and head dim from
    rotation(index)."""
    cases = []
    layouts = list(HEAD_LAYOUTS)
    for index, name in enumerate(variants):
        layout = layouts[index % len(layouts)]
        dtype, head_dim = rotation(index)
        seqlens = FIXED_SEQLEN_PAIRS[(index // len(DTYPES)) % len(FIXED_SEQLEN_PAIRS)]
        case_id = f"{name}-{layout}-{dtype_name(dtype)}-d{head_dim}-q{seqlens[0]}k{seqlens[1]}"
        cases.append(pytest.param(name, seqlens, layout, dtype, head_dim, id=case_id))
    return cases


# ----------------------------------------------------------------------------------------------
# Packed entries
# ----------------------------------------------------------------------------------------------

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


def packed_case(entry: str, sinks: str | None = None) -> Case:
    """The case of a packed entry in the default dtype and head dim, with sinks of that kind
    (None: no sink)."""
    fixed, layout, variant = PACKED_ENTRIES[entry]
    variant = dataclasses.replace(variant, sinks=sinks)
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
    seeded like run_kernel; gradients unpacked to (dq, dk, dv), with a sink (dq, dk, dv, dsink),
    in the packed layout."""
    q, k, v = entry_inputs(case)
    options = {**api_options(case), "deterministic": True, "return_attn_probs": True}
    sink_leaves = ()
    if case.sink is not None:
        sink = case.sink.detach().clone().requires_grad_()
        options["learnable_sink"] = sink
        sink_leaves = (sink,)
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
    all_grads = torch.autograd.grad(
        (out, lse), (*leaves, *sink_leaves), entry_upstream(case)
    )
    packed_grads, sink_grads = all_grads[: len(leaves)], all_grads[len(leaves) :]
    if len(packed_grads) == 1:
        grads = packed_grads[0].unbind(dim=-3)
    else:
        grads = (packed_grads[0], *packed_grads[1].unbind(dim=-3))
    packed_out, packed_lse, unpacked = packed_results(
        case, out.detach(), lse.detach(), (*grads, *sink_grads)
    )
    return KernelResult(packed_out, packed_lse, s_dmask, unpacked)
