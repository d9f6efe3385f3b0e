"""Autograd through the public functions without a GPU.

Tracing: forward + backward of every public function with ``make_fx`` (fake tracing) and with
``torch.compile(fullgraph=True)``, on meta tensors. Fake CUDA tensors, which the forward-only
tests in test_api_cpu.py use, cannot go through a backward here: the autograd engine stashes
the current stream of every CUDA device when a graph holds CUDA tensors, and that fails on a
machine without a GPU even for fake ones. So these tests switch off the device check (the last
validation rule, tested in test_validation_cpu.py); every other rule still runs.

Gradient handling: CPU tensors through the real ops and autograd formulas, with a stand-in for
the compiled extension that records its calls (argument order, the deterministic flag, the
layout of the incoming gradients, what the forward saves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

import flash_varlen
from flash_varlen import _extension, validation

NHEADS, NHEADS_K, HEAD_DIM = 4, 2, 64
TOTAL_Q, TOTAL_K, MAX_Q, MAX_K = 12, 10, 7, 6
CU_Q, CU_K = [0, 5, TOTAL_Q], [0, 4, TOTAL_K]
BATCH, SEQLEN_Q, SEQLEN_K = 2, 5, 7
SCALE = 0.25
DTYPE = torch.bfloat16

FUNCTION_NAMES = [
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
]
VARLEN_NAMES = [name for name in FUNCTION_NAMES if "varlen" in name]

Run = Callable[..., tuple[torch.Tensor, torch.Tensor, None]]


def tensor(*shape: int, device: str) -> torch.Tensor:
    return torch.zeros(*shape, dtype=DTYPE, device=device)


def make_case(
    name: str, device: str, **option_overrides: object
) -> tuple[list[torch.Tensor], list[torch.Tensor], Run]:
    """Inputs of one public function: (differentiable tensors, cu_seqlens, run).

    ``run(*differentiable, *cu_seqlens)`` returns ``(out, softmax_lse, None)``, calling the
    function with causal=True, SCALE and ``option_overrides``. The unpacked functions use GQA
    (NHEADS query heads, NHEADS_K key/value heads).
    """
    func = getattr(flash_varlen, name)
    options = {"softmax_scale": SCALE, "causal": True, "return_attn_probs": True}
    options.update(option_overrides)
    if name in VARLEN_NAMES:
        cu = [torch.tensor(CU_Q, dtype=torch.int32, device=device)]
        if name != "flash_attn_varlen_qkvpacked_func":
            cu.append(torch.tensor(CU_K, dtype=torch.int32, device=device))
    else:
        cu = []
    q = tensor(TOTAL_Q, NHEADS, HEAD_DIM, device=device)
    k = tensor(TOTAL_K, NHEADS_K, HEAD_DIM, device=device)
    kv = tensor(TOTAL_K, 2, NHEADS_K, HEAD_DIM, device=device)
    q_fixed = tensor(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, device=device)
    k_fixed = tensor(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, device=device)
    differentiable, run = {
        "flash_attn_varlen_func": (
            [q, k, k.clone()],
            lambda q, k, v, cu_q, cu_k: func(q, k, v, cu_q, cu_k, MAX_Q, MAX_K, **options),
        ),
        "flash_attn_varlen_qkvpacked_func": (
            [tensor(TOTAL_Q, 3, NHEADS, HEAD_DIM, device=device)],
            lambda qkv, cu: func(qkv, cu, MAX_Q, **options),
        ),
        "flash_attn_varlen_kvpacked_func": (
            [q, kv],
            lambda q, kv, cu_q, cu_k: func(q, kv, cu_q, cu_k, MAX_Q, MAX_K, **options),
        ),
        "flash_attn_func": (
            [q_fixed, k_fixed, k_fixed.clone()],
            lambda q, k, v: func(q, k, v, **options),
        ),
        "flash_attn_qkvpacked_func": (
            [tensor(BATCH, SEQLEN_Q, 3, NHEADS, HEAD_DIM, device=device)],
            lambda qkv: func(qkv, **options),
        ),
        "flash_attn_kvpacked_func": (
            [q_fixed, tensor(BATCH, SEQLEN_K, 2, NHEADS_K, HEAD_DIM, device=device)],
            lambda q, kv: func(q, kv, **options),
        ),
    }[name]
    for leaf in differentiable:
        leaf.requires_grad_()
    return differentiable, cu, run


def unpacked(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """q, k, v (or their gradients) out of the function's inputs (or their gradients).

    For a packed input these are views of it, as the function hands them to the op.
    """
    if "qkvpacked" in name:
        return list(tensors[0].unbind(dim=-3))
    if "kvpacked" in name:
        return [tensors[0], *tensors[1].unbind(dim=-3)]
    return tensors


@pytest.fixture
def any_device(monkeypatch) -> None:
    """Lets meta and CPU tensors past the device check (see the module docstring)."""
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)


# --------------------------------------------------------------------------------------------
# Tracing forward + backward (meta tensors, no extension needed)


def call_targets(graph: torch.fx.Graph) -> list[object]:
    return [node.target for node in graph.nodes if node.op == "call_function"]


class GraphRecorder:
    """A torch.compile backend that keeps AOTAutograd's forward and backward graphs and runs
    them as they are (eagerly)."""

    def __init__(self) -> None:
        self.forward: list[torch.fx.GraphModule] = []
        self.backward: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compile_with_autograd = aot_autograd(
            fw_compiler=self._keeping(self.forward), bw_compiler=self._keeping(self.backward)
        )
        return compile_with_autograd(graph_module, example_inputs)

    @staticmethod
    def _keeping(graphs: list[torch.fx.GraphModule]) -> Callable:
        def compiler(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
            graphs.append(graph_module)
            return make_boxed_func(graph_module.forward)

        return compiler


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_make_fx_traces_forward_and_backward(name: str, any_device) -> None:
    differentiable, cu, run = make_case(name, device="meta")

    def step(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, lse, _ = run(*inputs)
        loss = out.float().sum() + lse.sum()
        return (out, *torch.autograd.grad(loss, inputs[: len(differentiable)]))

    graph = make_fx(step, tracing_mode="fake")(*differentiable, *cu).graph
    ops = torch.ops.flash_varlen
    fwd, bwd = (ops.varlen_fwd, ops.varlen_bwd) if name in VARLEN_NAMES else (ops.fwd, ops.bwd)
    targets = call_targets(graph)
    assert targets.count(fwd.default) == 1 and targets.count(bwd.default) == 1
    output = next(node for node in graph.nodes if node.op == "output")
    out, *grads = (node.meta["val"] for node in output.args[0])
    assert out.shape == unpacked(name, differentiable)[0].shape
    # One gradient per input, of its shape and dtype: dk, dv have nheads_k heads, and a packed
    # qkv / kv gets one packed gradient.
    assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in differentiable]


def test_compile_fullgraph_traces_forward_and_backward(any_device) -> None:
    """torch.compile(fullgraph=True) over all six functions: one forward graph and one backward
    graph with the six backward ops; the compiled backward runs (on meta tensors)."""
    cases = [make_case(name, device="meta") for name in FUNCTION_NAMES]

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        total = inputs[0].new_zeros((), dtype=torch.float32)
        position = 0
        for differentiable, cu, run in cases:
            count = len(differentiable) + len(cu)
            out, lse, _ = run(*inputs[position : position + count])
            total = total + out.float().sum() + lse.sum()
            position += count
        return total

    inputs = [x for differentiable, cu, _ in cases for x in (*differentiable, *cu)]
    backend = GraphRecorder()
    torch.compile(loss, fullgraph=True, backend=backend)(*inputs).backward()
    ops = torch.ops.flash_varlen
    (forward_graph,), (backward_graph,) = backend.forward, backend.backward
    forward_targets = call_targets(forward_graph.graph)
    backward_targets = call_targets(backward_graph.graph)
    assert forward_targets.count(ops.varlen_fwd.default) == 3
    assert forward_targets.count(ops.fwd.default) == 3
    assert backward_targets.count(ops.varlen_bwd.default) == 3
    assert backward_targets.count(ops.bwd.default) == 3
    for differentiable, _, _ in cases:
        for leaf in differentiable:
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape
            assert leaf.grad.dtype == DTYPE


# --------------------------------------------------------------------------------------------
# A stand-in for the compiled extension (CPU tensors through the real ops)

BACKWARD_PARAMETERS = {
    "varlen_bwd": (
        "dout q k v out softmax_lse cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k "
        "softmax_scale causal deterministic softmax_lse_grad dq dk dv"
    ).split(),
    "bwd": (
        "dout q k v out softmax_lse softmax_scale causal deterministic softmax_lse_grad dq dk dv"
    ).split(),
}
DQ, DK, DV = 1.0, 2.0, 3.0  # values of the stand-in's gradients


class RecordingExtension:
    """Stands in for flash_varlen._C: outputs of the contract's shapes, and a record of calls.

    The forward returns fresh out and softmax_lse; the backward returns dq, dk, dv filled with
    DQ, DK, DV (new contiguous tensors, as the contract says) and records its arguments by
    their contract names.
    """

    def __init__(self) -> None:
        self.forward_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.backward_calls: list[SimpleNamespace] = []

    def varlen_fwd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal):
        return self._forward(q, (q.shape[1], q.shape[0]))

    def fwd(self, q, k, v, softmax_scale, causal):
        return self._forward(q, (q.shape[0], q.shape[2], q.shape[1]))

    def varlen_bwd(self, *args):
        return self._backward("varlen_bwd", args)

    def bwd(self, *args):
        return self._backward("bwd", args)

    def _forward(self, q: torch.Tensor, lse_shape: tuple[int, ...]):
        outputs = q.new_zeros(q.shape), torch.zeros(lse_shape, dtype=torch.float32)
        self.forward_outputs.append(outputs)
        return outputs

    def _backward(self, entry: str, args: tuple) -> tuple[torch.Tensor, ...]:
        names = BACKWARD_PARAMETERS[entry]
        assert len(args) <= len(names)
        call = SimpleNamespace(**{**dict.fromkeys(names), **dict(zip(names, args))})
        self.backward_calls.append(call)
        inputs = (call.q, call.k, call.v)
        return tuple(x.new_full(x.shape, value) for x, value in zip(inputs, (DQ, DK, DV)))


@pytest.fixture
def extension(monkeypatch, any_device) -> RecordingExtension:
    """Installs the stand-in as the loaded extension (load_extension() itself still runs)."""
    stand_in = RecordingExtension()
    loaded = _extension._LoadResult(module=stand_in, reason="")  # type: ignore[arg-type]
    monkeypatch.setattr(_extension, "_cached", loaded)
    return stand_in


@pytest.fixture
def deterministic_algorithms() -> Iterator[Callable[[bool], None]]:
    """Sets torch.use_deterministic_algorithms for one test and restores it afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield torch.use_deterministic_algorithms
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same memory seen the same way (no copy was made)."""
    return (a.data_ptr(), a.shape, a.stride()) == (b.data_ptr(), b.shape, b.stride())


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_backward_calls_the_extension_in_contract_order(name: str, extension) -> None:
    differentiable, cu, run = make_case(name, device="cpu")
    out, lse, _ = run(*differentiable, *cu)
    grad = torch.randn(out.shape).to(DTYPE)
    out.backward(grad)
    (call,) = extension.backward_calls
    (forward_out, forward_lse) = extension.forward_outputs[0]
    q, k, v = unpacked(name, differentiable)
    assert same_view(call.dout, grad)
    assert all(map(same_view, (call.q, call.k, call.v), (q, k, v)))
    assert same_view(call.out, forward_out) and same_view(call.softmax_lse, forward_lse)
    assert (call.softmax_scale, call.causal, call.deterministic) == (SCALE, True, False)
    assert call.softmax_lse_grad is None  # only out was used
    assert call.dq is None and call.dk is None and call.dv is None  # the kernels allocate
    if name in VARLEN_NAMES:
        assert same_view(call.cu_seqlens_q, cu[0]) and same_view(call.cu_seqlens_k, cu[-1])
        max_seqlen_k = MAX_Q if "qkvpacked" in name else MAX_K
        assert (call.max_seqlen_q, call.max_seqlen_k) == (MAX_Q, max_seqlen_k)
    # The stand-in's dq, dk, dv reach the inputs; a packed input gets them in its slots.
    grads = [leaf.grad for leaf in differentiable]
    assert [g.shape for g in grads] == [leaf.shape for leaf in differentiable]
    assert [g.unique().tolist() for g in unpacked(name, grads)] == [[DQ], [DK], [DV]]


@pytest.mark.parametrize(
    ("requested", "globally", "expected"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_qkvpacked_func"])
def test_deterministic_backward_when_requested_or_globally_on(
    name, requested, globally, expected, extension, deterministic_algorithms
) -> None:
    """deterministic=True, or torch.use_deterministic_algorithms(True) when backward runs."""
    differentiable, cu, run = make_case(name, device="cpu", deterministic=requested)
    out, _, _ = run(*differentiable, *cu)
    deterministic_algorithms(globally)
    out.float().sum().backward()
    assert extension.backward_calls[0].deterministic is expected


def padded(shape: tuple[int, ...], pad: int) -> torch.Tensor:
    """A view of ``shape`` whose rows (dim -2 stride) are ``shape[-1] + pad`` elements apart."""
    return torch.ones(*shape[:-1], shape[-1] + pad, dtype=DTYPE)[..., : shape[-1]]


def offset_by(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    numel = torch.Size(shape).numel()
    return torch.ones(numel + offset, dtype=DTYPE)[offset:].view(shape)


def every_other(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A view of ``shape`` with stride(-1) == 2."""
    return torch.ones(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


def heads_major(shape: tuple[int, ...]) -> torch.Tensor:
    """A view of ``shape`` (.., rows, heads, d) stored heads first: aligned, not contiguous."""
    *lead, rows, heads, d = shape
    return torch.ones(*lead, heads, rows, d, dtype=DTYPE).transpose(-3, -2)


GRAD_LAYOUTS = {
    # name: (make a gradient of out's shape, whether the kernel can read it as is)
    "contiguous": (lambda shape: torch.ones(shape, dtype=DTYPE), True),
    "heads-major view": (heads_major, True),
    "rows padded by 8": (lambda shape: padded(shape, pad=8), True),
    "expanded (stride 0)": (lambda shape: torch.ones((), dtype=DTYPE).expand(shape), False),
    "rows padded by 4": (lambda shape: padded(shape, pad=4), False),
    "offset by 4 elements": (lambda shape: offset_by(shape, 4), False),
    "last dim strided": (lambda shape: every_other(shape, DTYPE), False),
}


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_func"])
def test_grad_out_is_copied_only_when_the_kernel_cannot_read_it(name, layout, extension) -> None:
    make_grad, readable = GRAD_LAYOUTS[layout]
    differentiable, cu, run = make_case(name, device="cpu")
    out, _, _ = run(*differentiable, *cu)
    grad = make_grad(tuple(out.shape))
    out.backward(grad)
    dout = extension.backward_calls[0].dout
    assert validation.has_kernel_layout(dout)
    assert same_view(dout, grad) is readable
    if not readable:
        assert dout.is_contiguous() and torch.equal(dout, grad)


def test_grad_of_out_sum_is_made_contiguous(extension) -> None:
    """out.sum() hands backward an expanded gradient (every stride 0)."""
    differentiable, cu, run = make_case("flash_attn_varlen_func", device="cpu")
    out, _, _ = run(*differentiable, *cu)
    out.sum().backward()
    dout = extension.backward_calls[0].dout
    assert dout.is_contiguous() and dout.shape == out.shape and torch.all(dout == 1)


@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_func"])
def test_grad_of_softmax_lse_reaches_the_kernel_with_unit_last_stride(name, extension) -> None:
    differentiable, cu, run = make_case(name, device="cpu")
    out, lse, _ = run(*differentiable, *cu)
    lse_grad_aligned = torch.ones(*lse.shape[:-1], lse.shape[-1] + 3)[..., : lse.shape[-1]]
    lse_grad_strided = every_other(tuple(lse.shape), torch.float32)
    torch.autograd.backward([out, lse], [torch.ones_like(out), lse_grad_aligned], retain_graph=True)
    torch.autograd.backward([lse], [lse_grad_strided], retain_graph=True)
    lse.sum().backward()  # an expanded gradient; out unused
    aligned, strided, expanded = extension.backward_calls
    assert same_view(aligned.softmax_lse_grad, lse_grad_aligned)  # stride(-1) == 1: no copy
    for call, grad in ((strided, lse_grad_strided), (expanded, torch.ones(lse.shape))):
        assert call.softmax_lse_grad.is_contiguous() and torch.equal(call.softmax_lse_grad, grad)
        # out was not used: the kernel gets a zero gradient of out's shape and layout rules.
        assert call.dout.shape == out.shape and not call.dout.any()
        assert validation.has_kernel_layout(call.dout)


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_forward_saves_only_inputs_outputs_and_cu_seqlens(name: str, extension) -> None:
    """Saved for backward: q, k, v, out, softmax_lse (+ cu_seqlens), nothing O(seqlen^2)."""
    differentiable, cu, run = make_case(name, device="cpu")
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, lse, _ = run(*differentiable, *cu)
    cu_seqlens = [cu[0], cu[-1]] if cu else []
    expected = [*unpacked(name, differentiable), out, lse, *cu_seqlens]
    assert len(saved) == len(expected)
    assert all(map(same_view, saved, expected))


def test_missing_backward_kernel_error_reaches_the_caller(extension, monkeypatch) -> None:
    message = "flash_varlen: no backward kernel for float16 head dim 128 in this build"

    def narrowed_build(*args):
        raise NotImplementedError(message)

    monkeypatch.setattr(extension, "varlen_bwd", narrowed_build)
    differentiable, cu, run = make_case("flash_attn_varlen_func", device="cpu")
    out, _, _ = run(*differentiable, *cu)
    with pytest.raises(NotImplementedError, match=message):
        out.float().sum().backward()
