"""Shared helpers for the GPU accuracy tests: seeded batch builders, the tolerance rule, poisoning.

The tolerance rule (design.md, "Testing rules"): the kernel's max error against a float32
reference may be at most `factor` times the error of the same PyTorch math run in the input
dtype, plus a tiny floor (half an ulp of the output dtype at the reference's largest
magnitude). The bound scales with the data instead of hiding behind a loose constant.
Forward outputs use FORWARD_FACTOR, gradients GRADIENT_FACTOR.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest
import torch

# How dispatch (csrc/bindings/dispatch.cpp) says that a kernel family lacks an option of the
# call: under FLASH_VARLEN_KERNEL_FAMILY such a call raises NotImplementedError with it.
UNIMPLEMENTED_OPTION = ": does not implement "

FORWARD_FACTOR = 2.0
"""Forward outputs may be this many times less accurate than the input-dtype PyTorch math."""

GRADIENT_FACTOR = 3.0
"""Gradients (dq, dk, dv) may be this many times less accurate than the input-dtype PyTorch
autograd: the backward rounds more intermediates (P and dS to the input dtype) than the forward."""

GRADIENT_NAMES = ("dq", "dk", "dv")

POISON_BYTE = 0xFF
"""The all-ones bit pattern is a NaN in float16, bfloat16 and float32 alike."""


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Prefix sums of `lengths`: an int32 tensor of shape (batch + 1,) starting at 0."""
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + int(length))
    return torch.tensor(prefix, dtype=torch.int32, device=device)


def random_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """`count` sequence lengths drawn uniformly from [low, high] with a seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


def seeded_randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    scale: float = 1.0,
) -> torch.Tensor:
    """`scale * N(0, 1)` samples drawn in float32 from `generator`, then cast to `dtype`."""
    values = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return (values * scale).to(dtype)


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed`, so that a failing case reproduces exactly."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class VarlenBatch:
    """A packed batch of variable-length sequences.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q/k: (batch + 1,) int32.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]


def make_varlen_batch(
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    nheads: int,
    nheads_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    scale: float = 1.0,
    seed: int = 0,
) -> VarlenBatch:
    """Random packed q, k, v for the given per-sequence lengths (entries scaled by `scale`).

    max_seqlen_q/k are the longest lengths but at least 1: the API takes them as positive upper
    bounds (an overestimate is allowed), even for a batch whose sequences are all empty.
    """
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError("seqlens_q and seqlens_k must describe the same number of sequences")
    generator = device_generator(device, seed)
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)
    q = seeded_randn((total_q, nheads, head_dim), dtype, device, generator, scale)
    k = seeded_randn((total_k, nheads_k, head_dim), dtype, device, generator, scale)
    v = seeded_randn((total_k, nheads_k, head_dim), dtype, device, generator, scale)
    return VarlenBatch(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_from_lengths(seqlens_q, device),
        cu_seqlens_k=cu_seqlens_from_lengths(seqlens_k, device),
        max_seqlen_q=max(1, *seqlens_q),
        max_seqlen_k=max(1, *seqlens_k),
        seqlens_q=tuple(int(s) for s in seqlens_q),
        seqlens_k=tuple(int(s) for s in seqlens_k),
    )


def make_fixed_batch(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q: (batch, seqlen_q, nheads, d) and k, v: (batch, seqlen_k, nheads_k, d)."""
    generator = device_generator(device, seed)
    q = seeded_randn((batch, seqlen_q, nheads, head_dim), dtype, device, generator, scale)
    k = seeded_randn((batch, seqlen_k, nheads_k, head_dim), dtype, device, generator, scale)
    v = seeded_randn((batch, seqlen_k, nheads_k, head_dim), dtype, device, generator, scale)
    return q, k, v


def varlen_from_fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> VarlenBatch:
    """A fixed-length batch seen as a packed one with uniform lengths (views, no copies).

    q: (b, s_q, h, d) -> (b*s_q, h, d); k, v: (b, s_k, h_k, d) -> (b*s_k, h_k, d).
    """
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    return VarlenBatch(
        q=q.flatten(0, 1),
        k=k.flatten(0, 1),
        v=v.flatten(0, 1),
        cu_seqlens_q=cu_seqlens_from_lengths([seqlen_q] * batch, q.device),
        cu_seqlens_k=cu_seqlens_from_lengths([seqlen_k] * batch, q.device),
        max_seqlen_q=max(1, seqlen_q),
        max_seqlen_k=max(1, seqlen_k),
        seqlens_q=(seqlen_q,) * batch,
        seqlens_k=(seqlen_k,) * batch,
    )


def rows_without_keys(
    seqlens_q: Sequence[int], seqlens_k: Sequence[int], causal: bool, device: torch.device | str
) -> torch.Tensor:
    """(total_q,) bool: the query rows that see no key (empty key sequence or fully masked).

    With bottom-right causal alignment, row i sees key j iff j <= i + seqlen_k - seqlen_q, so
    the first seqlen_q - seqlen_k rows of a sequence see nothing.
    """
    flags = [torch.zeros(0, dtype=torch.bool, device=device)]
    for seqlen_q, seqlen_k in zip(seqlens_q, seqlens_k):
        if seqlen_k == 0:
            blind = seqlen_q
        elif causal:
            blind = max(0, seqlen_q - seqlen_k)
        else:
            blind = 0
        flags.append(torch.arange(seqlen_q, device=device) < blind)
    return torch.cat(flags)


def keys_without_queries(
    seqlens_q: Sequence[int], seqlens_k: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """(total_k,) bool: the key rows that no query sees, i.e. those of sequences without queries.

    With bottom-right causal alignment the last query of a sequence sees every key, so causal
    masking never hides a key from all queries; only an empty query sequence does.
    """
    flags = [torch.zeros(0, dtype=torch.bool, device=device)]
    for seqlen_q, seqlen_k in zip(seqlens_q, seqlens_k):
        flags.append(torch.full((seqlen_k,), seqlen_q == 0, dtype=torch.bool, device=device))
    return torch.cat(flags)


# ----------------------------------------------------------------------------------------------
# Tolerance rule
# ----------------------------------------------------------------------------------------------


def _max_abs_error(
    actual: torch.Tensor, expected: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> tuple[float, tuple[int, ...]]:
    """Largest |actual - expected| (over `mask` if given) and the index where it occurs."""
    error = (actual.float() - expected.float()).abs()
    if mask is not None:
        error = torch.where(mask, error, torch.zeros_like(error))
    if error.numel() == 0:
        return 0.0, ()
    flat_index = int(error.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), error.shape))
    return float(error.reshape(-1)[flat_index]), index


def rounding_floor(actual: torch.Tensor, ref_fp32: torch.Tensor) -> float:
    """The error bound of rounding the reference's largest magnitude once to `actual`'s dtype.

    That is half an ulp: unit roundoff (eps / 2) times max |ref_fp32|. It covers the cases where
    the input-dtype math happens to be exact (every row sees one key, say) while the kernel still
    rounds its output once, and is too small to matter anywhere else.
    """
    if ref_fp32.numel() == 0:
        return 0.0
    unit_roundoff = torch.finfo(actual.dtype).eps / 2
    return unit_roundoff * float(ref_fp32.abs().max())


def assert_no_nan(actual: torch.Tensor, name: str) -> None:
    """Fail, naming the first NaN position, if `actual` holds a NaN."""
    nan = torch.isnan(actual)
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(nan.sum())} NaN of {actual.numel()} elements, first at {first}"
        )


def assert_within_tolerance(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor,
    factor: float,
    name: str,
    floor: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
) -> None:
    """max|actual - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + floor (over `mask` if given).

    actual, ref_fp32, ref_lowp: tensors of one shape; ref_lowp is the same math in the input
    dtype. floor defaults to `rounding_floor(actual, ref_fp32)`. Also fails on any NaN in `actual`.
    """
    if actual.shape != ref_fp32.shape or ref_lowp.shape != ref_fp32.shape:
        raise AssertionError(
            f"{name}: shapes differ: actual {tuple(actual.shape)}, "
            f"ref_fp32 {tuple(ref_fp32.shape)}, ref_lowp {tuple(ref_lowp.shape)}"
        )
    assert_no_nan(actual, name)
    if floor is None:
        checked = ref_fp32 if mask is None else ref_fp32[mask]
        floor = rounding_floor(actual, checked)
    error, where = _max_abs_error(actual, ref_fp32, mask)
    lowp_error, lowp_where = _max_abs_error(ref_lowp, ref_fp32, mask)
    bound = factor * lowp_error + floor
    if not error <= bound:
        raise AssertionError(
            f"{name}: max |actual - ref_fp32| = {error:.4e} at {where} "
            f"(actual {float(actual[where]):.6g}, ref_fp32 {float(ref_fp32[where]):.6g}) "
            f"exceeds {factor} x max |ref_lowp - ref_fp32| = {factor} x {lowp_error:.4e} "
            f"(at {lowp_where}) + floor {floor:.2e} = {bound:.4e}"
        )


def assert_lse_within_tolerance(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor,
    factor: float,
    name: str,
    floor: Optional[float] = None,
) -> None:
    """The tolerance rule for a log-sum-exp tensor, whose rows without keys are -inf.

    -inf must appear in `actual` exactly where it appears in `ref_fp32`; NaN and +inf never.
    The finite entries follow `assert_within_tolerance`.
    """
    assert_no_nan(actual, name)
    if bool(torch.isposinf(actual).any()):
        first = tuple(int(i) for i in torch.isposinf(actual).nonzero()[0])
        raise AssertionError(f"{name}: +inf at {first}")
    actual_empty = torch.isneginf(actual)
    ref_empty = torch.isneginf(ref_fp32)
    mismatch = actual_empty != ref_empty
    if bool(mismatch.any()):
        first = tuple(int(i) for i in mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: -inf pattern differs from the reference in {int(mismatch.sum())} places, "
            f"first at {first} (actual {float(actual[first])}, ref {float(ref_fp32[first])})"
        )
    assert_within_tolerance(actual, ref_fp32, ref_lowp, factor, name, floor, mask=~ref_empty)


def gradient_floor(actual: torch.Tensor, refs_fp32: Sequence[torch.Tensor]) -> float:
    """The floor of the gradient tolerance: half an ulp at the largest gradient of the call.

    One floor for dq, dk and dv together, because one of them can be exactly 0 in both
    references while the kernel legitimately leaves rounding noise: when every query sees a
    single key, dS = P * (dP - rowsum(dO * O)) is 0 in exact math and the references compute 0
    exactly, but the kernel forms dP and the row sum in different fp32 summation orders.
    """
    return max((rounding_floor(actual, ref) for ref in refs_fp32), default=0.0)


def assert_gradients_within_tolerance(
    actual: Sequence[torch.Tensor],
    refs_fp32: Sequence[torch.Tensor],
    refs_lowp: Sequence[torch.Tensor],
    name: str,
    factor: float = GRADIENT_FACTOR,
) -> None:
    """The tolerance rule for (dq, dk, dv), each against its own references.

    actual: (dq, dk, dv) from the kernel; refs_fp32: the float32 autograd reference;
    refs_lowp: the same autograd run in the input dtype. For each gradient,
    max|actual - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + `gradient_floor`, and no NaN.
    """
    floor = gradient_floor(actual[0], refs_fp32)
    for grad_name, grad, ref_fp32, ref_lowp in zip(GRADIENT_NAMES, actual, refs_fp32, refs_lowp):
        assert_within_tolerance(grad, ref_fp32, ref_lowp, factor, f"{name} {grad_name}", floor)


def assert_rows_zero(grad: torch.Tensor, rows: torch.Tensor, name: str) -> None:
    """The rows of grad (tokens, ...) selected by the (tokens,) bool `rows` are exactly 0."""
    selected = grad[rows]
    if not bool((selected == 0).all()):
        bad_rows = rows.nonzero().flatten()[(selected != 0).flatten(1).any(dim=1)]
        raise AssertionError(
            f"{name}: {bad_rows.numel()} rows that must be exactly 0 are not, first row "
            f"{int(bad_rows[0])}"
        )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Same shape, dtype and bits (NaN-free inputs, so torch.equal is a bit comparison)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.equal(actual, expected):
        differ = actual != expected
        first = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(differ.sum())} elements differ, first at {first} "
            f"({float(actual[first])} vs {float(expected[first])})"
        )


# ----------------------------------------------------------------------------------------------
# Poisoning
# ----------------------------------------------------------------------------------------------


def poison_freed_blocks(nbytes: Sequence[int], device: torch.device | str) -> None:
    """Leave freed blocks of the given sizes, filled with NaN bytes, in the caching allocator.

    The API allocates its outputs itself, so they cannot be pre-filled. Instead this allocates
    blocks of the outputs' sizes, fills them with NaN and frees them: the caching allocator
    hands the same blocks to the next allocations of those sizes on this stream, so an element
    that the kernel forgets to write reads back as NaN instead of a lucky leftover value.
    """
    blocks = [
        torch.full((int(n),), POISON_BYTE, dtype=torch.uint8, device=device) for n in nbytes
    ]
    del blocks


def output_nbytes(q: torch.Tensor, lse_numel: int) -> list[int]:
    """Sizes in bytes of an attention call's outputs: out (like q) and float32 softmax_lse."""
    lse_bytes = lse_numel * torch.finfo(torch.float32).bits // 8
    return [q.numel() * q.element_size(), lse_bytes]


def gradient_nbytes(q: torch.Tensor, k: torch.Tensor, head_dim_bucket: int) -> list[int]:
    """Sizes in bytes of a backward call's allocations, for `poison_freed_blocks`: dq (like q),
    dk and dv (like k), and the float32 dq accumulator (q's rows and heads, head dim padded to
    its bucket; an implementation may pad rows too, so that block is matched only roughly)."""
    dq_accum_bytes = (q.numel() // q.shape[-1]) * head_dim_bucket * 4
    k_bytes = k.numel() * k.element_size()
    return [q.numel() * q.element_size(), k_bytes, k_bytes, dq_accum_bytes]


def assert_all_written(out: torch.Tensor, lse: torch.Tensor, name: str) -> None:
    """Every element of out is finite and every lse entry is finite or -inf.

    Together with `poison_freed_blocks` this catches rows that the kernel never wrote.
    """
    if not bool(torch.isfinite(out).all()):
        bad = ~torch.isfinite(out)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: out has {int(bad.sum())} non-finite elements of {out.numel()}, "
            f"first at {first}"
        )
    bad_lse = torch.isnan(lse) | torch.isposinf(lse)
    if bool(bad_lse.any()):
        first = tuple(int(i) for i in bad_lse.nonzero()[0])
        raise AssertionError(
            f"{name}: softmax_lse has {int(bad_lse.sum())} NaN/+inf entries, first at {first}"
        )


# ----------------------------------------------------------------------------------------------
# Which kernels this build has
# ----------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of compiled_kernels()."""
    return str(dtype).removeprefix("torch.")


def head_dim_bucket(head_dim: int) -> int:
    """The smallest head-dim bucket of the kernels that holds `head_dim`."""
    from flash_varlen._extension import load_extension

    return min(b for b in load_extension().head_dim_buckets() if b >= head_dim)


def _compiled_configs(triples) -> set[tuple[str, int]]:
    """(dtype name, bucket) pairs of (family, dtype name, bucket) triples, of the family that
    FLASH_VARLEN_KERNEL_FAMILY forces when it is set (then only that family runs)."""
    forced = os.environ.get("FLASH_VARLEN_KERNEL_FAMILY") or None
    return {
        (str(name), int(bucket))
        for family, name, bucket in triples
        if forced is None or family == forced
    }


def require_kernel(dtype: torch.dtype, head_dim: int) -> None:
    """Skip the calling test when this build has no kernel for (dtype, bucket of head_dim).

    Fails (rather than skips) when the extension itself does not load: on a GPU machine that is
    a broken build, not a narrowed one.
    """
    from flash_varlen._extension import compiled_kernels

    bucket = head_dim_bucket(head_dim)
    if (dtype_name(dtype), bucket) not in _compiled_configs(compiled_kernels()):
        pytest.skip(
            f"narrowed build: no {dtype_name(dtype)} kernel for head-dim bucket {bucket} "
            f"(head dim {head_dim})"
        )


def require_decode_kernel(dtype: torch.dtype, head_dim: int) -> None:
    """Skip the calling test when this build has no decode-family kernel (paged KV caches,
    split-KV) for (dtype, bucket of head_dim), or FLASH_VARLEN_KERNEL_FAMILY forces another
    family. Fails when the extension does not load (see require_kernel)."""
    from flash_varlen._extension import load_extension

    extension = load_extension()
    bucket = head_dim_bucket(head_dim)
    built = getattr(extension, "compiled_decode_kernels", list)()
    if (dtype_name(dtype), bucket) not in _compiled_configs(built):
        pytest.skip(
            f"no {dtype_name(dtype)} decode kernel for head-dim bucket {bucket} (head dim "
            f"{head_dim}) in this build or under FLASH_VARLEN_KERNEL_FAMILY"
        )


def require_backward_kernel(dtype: torch.dtype, head_dim: int) -> None:
    """`require_kernel`, and also skip when this build has no backward kernel for (dtype,
    bucket of head_dim): a test that checks gradients needs both directions.

    The extension lists its backward kernels separately (``_C.compiled_backward_kernels``),
    because a narrowed build may compile them for fewer (dtype, bucket) pairs.
    """
    from flash_varlen._extension import load_extension

    require_kernel(dtype, head_dim)
    bucket = head_dim_bucket(head_dim)
    if (dtype_name(dtype), bucket) not in _compiled_configs(
        load_extension().compiled_backward_kernels()
    ):
        pytest.skip(
            f"narrowed build: no {dtype_name(dtype)} backward kernel for head-dim bucket "
            f"{bucket} (head dim {head_dim})"
        )


# Side-stream calls before a CUDA-graph capture (PyTorch's CUDA-graph guidance).
GRAPH_WARMUP_STEPS = 3


def capture_graph(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``step`` warmed up on a side stream (PyTorch's CUDA-graph guidance), then captured:
    returns the graph and the outputs of the captured call (its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@contextlib.contextmanager
def allocates_no_device_memory(what: str = "the call") -> Iterator[None]:
    """Asserts that the block leaves torch's allocated device memory unchanged: outputs are
    allocated before a launch, so an unchanged count means no kernel ran before an error.

    The garbage collector runs first and is held off inside the block: otherwise a collection
    that happens to run during the block frees an earlier test's tensors and the count drops
    (seen on the GPU machine after ~1700 tests: 151,147,520 -> 121,186,304 bytes).
    """
    gc.collect()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
    assert torch.cuda.memory_allocated() == allocated, f"{what} allocated memory before the error"
