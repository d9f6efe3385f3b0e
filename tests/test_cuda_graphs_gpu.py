"""GPU tests of the CUDA-graph recipe: capture one forward + backward step on static buffers,
then replay it after writing new contents into the inputs and into cu_seqlens.

The recipe (README, "CUDA graphs"): keep q, k, v, dout and cu_seqlens in fixed buffers, pass
max_seqlen as an upper bound (a Python int fixed at capture), warm up on a side stream, capture,
and before each replay copy the new tokens and the new cu_seqlens into the buffers. The batch
size (cu_seqlens' length) and the buffers' row counts stay fixed; the sequence lengths may change,
including to empty sequences and to fewer tokens than the buffers hold.

What the tests prove: the capture succeeds (any host synchronization inside it would raise), an
eager call under torch.cuda.set_sync_debug_mode("error") raises no sync either, and every replay
matches an eager call on the same contents: out, dk and dv bitwise (their kernels are
deterministic), dq bitwise with deterministic=True and within a float32-rounding bound
otherwise, and gradient rows past the new cu_seqlens[-1] are exactly 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accuracy import assert_bitwise_equal, device_generator, require_backward_kernel, seeded_randn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPE = torch.bfloat16
HEAD_DIM = 128
NHEADS, NHEADS_K = 8, 2  # GQA: the group reduction is part of the captured backward
BUFFER_ROWS = 1024  # rows of every static token buffer
MAX_SEQLEN = 512  # the upper bound given at capture; every replay's lengths stay within it
WARMUP_STEPS = 3  # side-stream calls before capture (PyTorch's CUDA-graph guidance)
# Sequence lengths written before each replay: same batch size, different lengths, totals below
# BUFFER_ROWS, empty sequences included.
CAPTURE_LENGTHS = [300, 200, 1, 400]
REPLAY_LENGTHS = [
    [512, 0, 77, 130],
    [5, 490, 0, 0],
    [0, 0, 0, 0],
]
# dq without deterministic=True sums key blocks in run-dependent order (float32), then rounds
# to bf16: a replay and an eager call may differ by one bf16 ulp (at most 2^-7 of the value),
# plus float32 reordering noise on elements that cancel to near 0 (bounded by a tiny fraction
# of the largest element).
DQ_RELATIVE_BOUND = 2.0**-7
DQ_ABSOLUTE_FRACTION = 2.0**-12


@dataclasses.dataclass
class StaticStep:
    """The buffers one captured step reads and writes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu_seqlens: torch.Tensor
    out: torch.Tensor | None = None


def _flash_varlen():
    import flash_varlen

    return flash_varlen


def cu_seqlens_for(lengths: list[int]) -> torch.Tensor:
    total = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return total.to(DEVICE)


def fill(step: StaticStep, lengths: list[int], seed: int) -> None:
    """Writes new token contents and new cu_seqlens into the static buffers, in place."""
    generator = device_generator(DEVICE, seed)
    for buffer in (step.q, step.k, step.v, step.dout):
        with torch.no_grad():
            buffer.copy_(seeded_randn(buffer.shape, DTYPE, DEVICE, generator))
    step.cu_seqlens.copy_(cu_seqlens_for(lengths))


def attention_step(step: StaticStep, deterministic: bool) -> torch.Tensor:
    """Forward and backward of causal varlen attention on the static buffers."""
    out = _flash_varlen().flash_attn_varlen_func(
        step.q, step.k, step.v, step.cu_seqlens, step.cu_seqlens, MAX_SEQLEN, MAX_SEQLEN,
        causal=True, deterministic=deterministic,
    )
    out.backward(step.dout)
    return out


def new_static_step() -> StaticStep:
    def leaf(nheads: int) -> torch.Tensor:
        shape = (BUFFER_ROWS, nheads, HEAD_DIM)
        return torch.empty(shape, dtype=DTYPE, device=DEVICE, requires_grad=True)

    dout = torch.empty((BUFFER_ROWS, NHEADS, HEAD_DIM), dtype=DTYPE, device=DEVICE)
    cu_seqlens = torch.empty(len(CAPTURE_LENGTHS) + 1, dtype=torch.int32, device=DEVICE)
    return StaticStep(leaf(NHEADS), leaf(NHEADS_K), leaf(NHEADS_K), dout, cu_seqlens)


def capture(step: StaticStep, deterministic: bool) -> torch.cuda.CUDAGraph:
    """Warms up on a side stream, then captures one step; gradients are None before capture
    so that the captured backward writes them instead of accumulating."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            attention_step(step, deterministic)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in (step.q, step.k, step.v):
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.out = attention_step(step, deterministic)
    return graph


def eager_results(step: StaticStep, deterministic: bool) -> tuple[torch.Tensor, ...]:
    """out, dq, dk, dv of an eager call on clones of the buffers' current contents, with any
    host synchronization raising."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (step.q, step.k, step.v))
    eager = StaticStep(q, k, v, step.dout.clone(), step.cu_seqlens.clone())
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention_step(eager, deterministic)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_captured_step_replays_with_new_cu_seqlens(deterministic: bool) -> None:
    """Capture once, replay with three new cu_seqlens contents, compare with eager calls.

    Fails if the step synchronizes with the host (capture or the sync-debug eager call raises),
    if a kernel's launch shape depends on the contents of cu_seqlens captured at capture time
    (the replays would compute the old sequences), or if rows past the new end keep stale
    gradients.
    """
    require_backward_kernel(DTYPE, HEAD_DIM)
    step = new_static_step()
    fill(step, CAPTURE_LENGTHS, seed=0)
    graph = capture(step, deterministic)

    for replay, lengths in enumerate(REPLAY_LENGTHS, start=1):
        fill(step, lengths, seed=replay)
        graph.replay()
        expected_out, *expected_grads = eager_results(step, deterministic)
        total = sum(lengths)
        assert_bitwise_equal(step.out[:total], expected_out[:total], f"replay {replay}: out")
        names = ("dq", "dk", "dv")
        for name, leaf, expected in zip(names, (step.q, step.k, step.v), expected_grads):
            label = f"replay {replay} {lengths}: {name}"
            assert bool((leaf.grad[total:] == 0).all()), f"{label}: rows past the end not 0"
            if name == "dq" and not deterministic:
                magnitude = expected.float().abs()
                error = (leaf.grad.float() - expected.float()).abs()
                bound = DQ_RELATIVE_BOUND * magnitude + DQ_ABSOLUTE_FRACTION * magnitude.max()
                assert bool((error <= bound).all()), f"{label}: max error {float(error.max())}"
            else:
                assert_bitwise_equal(leaf.grad, expected, label)
