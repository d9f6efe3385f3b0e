"""Which forward calls go through the registered ops and which call their implementation directly
(ops.op_dispatch_needed), on the CPU.

The public forward functions skip the dispatch layers of the ops (about 30 us of host time per
call, benchmarks/bench_host_overhead.py) when nothing observes the op: no tracing, no autograd,
no tensor subclass, no Python mode, no functorch transform, no profiler. Everything else must
still see the op, or torch.compile, autograd, FakeTensorMode and friends would break; these
tests pin each case, and that both paths reach the same extension call.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flash_varlen
from flash_varlen import _extension, ops, validation

TOTAL, NHEADS, HEAD_DIM = 12, 2, 16


@pytest.fixture
def plain() -> list[torch.Tensor]:
    return [torch.zeros(TOTAL, NHEADS, HEAD_DIM), torch.tensor([0, 5, TOTAL], dtype=torch.int32)]


def test_plain_tensors_without_autograd_skip_the_op(plain: list[torch.Tensor]) -> None:
    assert not ops.op_dispatch_needed([*plain, None, 3, 0.5, True])


def test_this_torch_has_what_the_check_reads() -> None:
    """Else every call takes the op (correct, but the saving is gone): a torch upgrade that
    removes one of these private attributes shows here."""
    missing = [path for path in ops._OBSERVER_CHECKS if not ops._torch_has(path)]
    assert missing == []


def test_a_torch_without_the_checks_always_takes_the_op(
    plain: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "_CAN_TELL_OBSERVERS", False)
    assert ops.op_dispatch_needed(plain)


def test_a_tensor_that_requires_grad_needs_the_op_under_grad_mode_only(
    plain: list[torch.Tensor],
) -> None:
    leaf = torch.zeros(TOTAL, NHEADS, HEAD_DIM, requires_grad=True)
    assert ops.op_dispatch_needed([*plain, leaf])
    with torch.no_grad():
        assert not ops.op_dispatch_needed([*plain, leaf])
    with torch.inference_mode():
        assert not ops.op_dispatch_needed([*plain, leaf])
    # An op without autograd (the decode ops) does not care.
    assert not ops.op_dispatch_needed([*plain, leaf], differentiable=False)


def test_tracing_needs_the_op(plain: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.op_dispatch_needed(plain)


def test_a_tensor_subclass_needs_the_op(plain: list[torch.Tensor]) -> None:
    parameter = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    assert ops.op_dispatch_needed([*plain, parameter])


def test_python_modes_need_the_op(plain: list[torch.Tensor]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert ops.op_dispatch_needed(plain)
    with FlopCounterMode(display=False):
        assert ops.op_dispatch_needed(plain)

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert ops.op_dispatch_needed(plain)


def test_functorch_transforms_need_the_op(plain: list[torch.Tensor]) -> None:
    seen = []

    def body(x: torch.Tensor) -> torch.Tensor:
        seen.append(ops.op_dispatch_needed([x, plain[1]]))
        return x

    torch.func.vmap(body)(torch.zeros(2, TOTAL))
    assert seen == [True]


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_a_torch_jit_trace_needs_the_op(plain: list[torch.Tensor]) -> None:
    seen = []

    def body(x: torch.Tensor) -> torch.Tensor:
        seen.append(ops.op_dispatch_needed([x, plain[1]]))
        return x * 2

    torch.jit.trace(body, (torch.zeros(3),), check_trace=False)
    assert seen == [True]
    assert not ops.op_dispatch_needed(plain)


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")
def test_the_profiler_needs_the_op(plain: list[torch.Tensor]) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert ops.op_dispatch_needed(plain)
    assert not ops.op_dispatch_needed(plain)


class StandInExtension(types.ModuleType):
    """Records the varlen_fwd entry's arguments and returns outputs of the contract's shapes."""

    def __init__(self) -> None:
        super().__init__(_extension.EXTENSION_NAME)
        self.calls: list[tuple] = []

    def varlen_fwd(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        q = args[0]
        return (torch.full_like(q, 2.0), torch.zeros(q.shape[1], q.shape[0]),
                torch.empty(0, dtype=q.dtype), torch.empty(0, dtype=torch.int64))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandInExtension:
    extension = StandInExtension()
    monkeypatch.setattr(_extension, "_cached", _extension._LoadResult(module=extension, reason=""))
    # CPU tensors stand in for CUDA ones: the device check is the only rule they break.
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)
    return extension


def forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"ops.{name} ran")

    monkeypatch.setattr(ops, name, refuse)


def varlen_call(q: torch.Tensor, **kwargs) -> torch.Tensor:
    cu = torch.tensor([0, 5, TOTAL], dtype=torch.int32)
    return flash_varlen.flash_attn_varlen_func(q, q, q, cu, cu, 7, 7, causal=True, **kwargs)


def test_an_eager_inference_call_runs_the_implementation_directly(
    stand_in: StandInExtension, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid(monkeypatch, "varlen_fwd")
    q = torch.randn(TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    out = varlen_call(q)
    assert torch.equal(out, torch.full_like(q, 2.0))
    (args, kwargs), = stand_in.calls
    assert args[0] is q and args[1] is q and args[2] is q


def test_a_call_that_autograd_records_goes_through_the_op(
    stand_in: StandInExtension, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid(monkeypatch, "varlen_fwd_eager")
    q = torch.randn(TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
    out = varlen_call(q)
    assert out.grad_fn is not None  # the op's autograd recorded the call
    assert torch.equal(out.detach(), torch.full_like(q, 2.0))
    assert len(stand_in.calls) == 1


def test_both_paths_make_the_same_extension_call(stand_in: StandInExtension) -> None:
    q = torch.randn(TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    options = dict(window_size=(3, 0), softcap=5.0, return_attn_probs=True)
    varlen_call(q, **options)
    varlen_call(q.clone().requires_grad_(), **options)
    (direct_args, direct_kwargs), (op_args, op_kwargs) = stand_in.calls
    assert direct_kwargs == op_kwargs
    assert len(direct_args) == len(op_args)
    for direct, through_op in zip(direct_args, op_args):
        if isinstance(direct, torch.Tensor):
            assert torch.equal(direct, through_op.detach())
        else:
            assert direct == through_op
