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

import dataclasses
from typing import Any

import pytest
import torch

import flash_varlen
from flash_varlen.reference import TOP_LEFT

from accuracy import (
    GRADIENT_NAMES,
    assert_bitwise_equal,
    device_generator,
    dtype_name,
    random_lengths,
    require_backward_kernel,
    seeded_randn,
)
from variant_harness import (
    ALIBI_PER_HEAD,
    ALIBI_PER_SEQUENCE,
    DEFAULT_DTYPE,
    DEFAULT_HEAD_DIM,
    DEFAULT_LAYOUT,
    DEVICE,
    DOMINANT_SINKS,
    DROPOUT_P,
    DTYPES,
    HEAD_LAYOUTS,
    LARGE_SINKS,
    PACKED_ENTRIES,
    RANDOM_SINKS,
    SINK_STD,
    SMALL_SOFTCAP,
    SOFTCAP,
    SOFTCAP_QK_SCALE,
    Variant,
    assert_results_bitwise_equal,
    check_case,
    default_case,
    fixed_case,
    fixed_params,
    packed_case,
    row_coverage,
    run_kernel,
    run_packed,
    varlen_case,
    varlen_params,
)
from variant_harness import EVERYTHING as EVERYTHING_WITHOUT_SINK

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The harness (cases, kernel calls, reference and checks, the sink kinds and values) and the
# configuration shared with test_variants_gpu.py (dtypes, head layouts, the matrix batch,
# seeds, softcap and ALiBi constants) are in variant_harness.py; every case here has a sink.

# One head dim per tile configuration (64, 128, 256) and one that is no bucket size (72, which
# runs in the 96 bucket with a partial head-dim tile).
HEAD_DIMS = (64, 128, 256, 72)


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


def sink_variant(**options: Any) -> Variant:
    """A Variant (the attention options of one case) with sinks of RANDOM_SINKS, unless
    `options` names another kind: every case of this file has a sink."""
    return Variant(**{"sinks": RANDOM_SINKS, **options})


EVERYTHING = dataclasses.replace(EVERYTHING_WITHOUT_SINK, sinks=RANDOM_SINKS)

VARIANTS = {
    "plain": sink_variant(),
    "causal": sink_variant(causal=True),
    "causal_top_left": sink_variant(causal=True, causal_alignment=TOP_LEFT),
    # Non-causal windows that hide every key from the first rows when seqlen_q > seqlen_k.
    "window_64_0": sink_variant(window_size=(64, 0)),
    "window_0_0": sink_variant(window_size=(0, 0)),
    "window_32_96": sink_variant(window_size=(32, 96)),
    "window_48_0_causal": sink_variant(causal=True, window_size=(48, 0)),
    "window_top_left": sink_variant(window_size=(48, 16), causal_alignment=TOP_LEFT),
    "softcap_30": sink_variant(softcap=SOFTCAP, qk_scale=SOFTCAP_QK_SCALE),
    "softcap_2_causal": sink_variant(causal=True, softcap=SMALL_SOFTCAP),
    "alibi_heads": sink_variant(alibi=ALIBI_PER_HEAD),
    "alibi_batch_causal": sink_variant(causal=True, alibi=ALIBI_PER_SEQUENCE),
    "dropout": sink_variant(dropout_p=DROPOUT_P),
    "dropout_causal": sink_variant(causal=True, dropout_p=DROPOUT_P),
    "seqused": sink_variant(seqused=True),
    "seqused_causal": sink_variant(causal=True, seqused=True),
    "large_sinks_causal": sink_variant(causal=True, sinks=LARGE_SINKS),
    "dominant_sinks": sink_variant(sinks=DOMINANT_SINKS),
    "everything": EVERYTHING,
    "everything_top_left": dataclasses.replace(EVERYTHING, causal_alignment=TOP_LEFT),
}

# flash_attn_func has no seqused: every variant without it, and "everything" less seqused.
FIXED_VARIANTS = {
    **{name: variant for name, variant in VARIANTS.items() if not variant.seqused},
    "everything_but_seqused": dataclasses.replace(EVERYTHING, seqused=False),
}


# ----------------------------------------------------------------------------------------------
# The matrix: every variant x head layout, dtype and head dim rotating
# ----------------------------------------------------------------------------------------------


def rotation(turn: int) -> tuple[torch.dtype, int]:
    """The (dtype, head dim) of a case's turn: eight consecutive turns cover every pair."""
    head_dim = HEAD_DIMS[turn % len(HEAD_DIMS)]
    dtype = DTYPES[(turn + turn // len(HEAD_DIMS)) % len(DTYPES)]
    return dtype, head_dim


@pytest.mark.parametrize("name, layout, dtype, head_dim", varlen_params(VARIANTS, rotation))
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


def fixed_rotation(index: int) -> tuple[torch.dtype, int]:
    """The (dtype, head dim) of the fixed-length case of the index-th variant without seqused
    (flash_attn_func runs each once): the matrix's rotation, one turn ahead."""
    return rotation(index + 1)


@pytest.mark.parametrize(
    "name, seqlens, layout, dtype, head_dim", fixed_params(FIXED_VARIANTS, fixed_rotation)
)
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
    variant = sink_variant(causal=True)
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
        sink_variant(causal=True), DEFAULT_LAYOUT, DEFAULT_DTYPE, DEFAULT_HEAD_DIM,
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
        sink_variant(causal=True, sinks=sinks), DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM,
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
        sink_variant(causal=True), DEFAULT_LAYOUT, dtype, DEFAULT_HEAD_DIM, (lengths_q, lengths_k)
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


@pytest.mark.parametrize("entry", list(PACKED_ENTRIES))
def test_packed_entry_with_a_sink_matches_unpacked(entry: str) -> None:
    """A packed entry with a sink (and window, softcap, ALiBi, dropout; seqused for the varlen
    kvpacked one) gives the unpacked call's out, lse, S_dmask and gradients, dsink included, bit
    for bit. Fails if a packed entry drops the sink or does not return its gradient."""
    case = packed_case(entry, RANDOM_SINKS)
    expected = run_kernel(case, deterministic=True)
    got = run_packed(case, entry)
    assert_results_bitwise_equal(case, got, expected, entry)
    assert_bitwise_equal(got.s_dmask, expected.s_dmask, f"{entry} S_dmask")


def test_strided_sink_view() -> None:
    """A sink that is a strided view (every other element of a buffer whose other elements
    are NaN), which validation accepts, gives the contiguous sink's results and gradient bit
    for bit. Fails if the sink is read with unit stride."""
    case = default_case(sink_variant(causal=True))
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
        sink_variant(causal=True, window_size=(64, 0)), DEFAULT_LAYOUT, DEFAULT_DTYPE,
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
