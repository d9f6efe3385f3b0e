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
from flash_varlen import ops as flash_ops

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
        "softmax_scale causal deterministic softmax_lse_grad dq dk dv window_left window_right "
        "softcap alibi_slopes seqused_q seqused_k causal_top_left dropout_p learnable_sink "
        "rng_state"
    ).split(),
    "bwd": (
        "dout q k v out softmax_lse softmax_scale causal deterministic softmax_lse_grad dq dk dv "
        "window_left window_right softcap alibi_slopes causal_top_left dropout_p learnable_sink "
        "rng_state"
    ).split(),
}
# The keyword arguments of the contract's forward bindings, with their defaults.
FORWARD_OPTIONS = {
    "window_left": -1,
    "window_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "causal_top_left": False,
    "dropout_p": 0.0,
    "return_dropout_mask": False,
    "learnable_sink": None,
}
# The varlen entry's keywords: its own options, and block_table (paged K/V), an input after them.
VARLEN_FORWARD_OPTIONS = {
    **FORWARD_OPTIONS,
    "seqused_q": None,
    "seqused_k": None,
    "block_table": None,
}
DQ, DK, DV, DSINK = 1.0, 2.0, 3.0, 4.0  # values of the stand-in's gradients
SEED, OFFSET = 1234, 56  # the stand-in's dropout RNG state
MASK_BLOCK = 128  # the contract rounds s_dmask's sequence dims up to a multiple of this


class RecordingExtension:
    """Stands in for flash_varlen._C: outputs of the contract's shapes, and a record of calls.

    The forward takes the contract's keyword options (an unknown keyword fails) and returns
    fresh out, softmax_lse, s_dmask and rng_state; the backward returns dq, dk, dv filled with
    DQ, DK, DV (new contiguous tensors, as the contract says) and records its arguments by
    their contract names.
    """

    def __init__(self) -> None:
        self.forward_outputs: list[tuple[torch.Tensor, ...]] = []
        self.forward_options: list[dict[str, object]] = []
        self.backward_calls: list[SimpleNamespace] = []

    def varlen_fwd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal, **kw):
        batch = cu_seqlens_q.shape[0] - 1
        dims = (batch, q.shape[1], max_q, max_k)
        return self._forward(q, (q.shape[1], q.shape[0]), dims, VARLEN_FORWARD_OPTIONS, kw)

    def fwd(self, q, k, v, softmax_scale, causal, **kw):
        dims = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        return self._forward(q, (q.shape[0], q.shape[2], q.shape[1]), dims, FORWARD_OPTIONS, kw)

    def varlen_bwd(self, *args, **kwargs):
        return self._backward("varlen_bwd", args, kwargs)

    def bwd(self, *args, **kwargs):
        return self._backward("bwd", args, kwargs)

    def _forward(
        self,
        q: torch.Tensor,
        lse_shape: tuple[int, ...],
        dims: tuple[int, int, int, int],
        defaults: dict[str, object],
        options: dict[str, object],
    ) -> tuple[torch.Tensor, ...]:
        assert options.keys() <= defaults.keys(), f"unknown options {options.keys() - defaults}"
        options = {**defaults, **options}
        self.forward_options.append(options)
        batch, nheads, max_q, max_k = dims
        if options["dropout_p"] > 0:
            rng_state = torch.tensor([SEED, OFFSET], dtype=torch.int64)
        else:
            rng_state = torch.empty(0, dtype=torch.int64)
        if options["dropout_p"] > 0 and options["return_dropout_mask"]:
            rounded = [-(-length // MASK_BLOCK) * MASK_BLOCK for length in (max_q, max_k)]
            s_dmask = q.new_zeros(batch, nheads, *rounded)
        else:
            s_dmask = q.new_empty(0)
        outputs = (q.new_zeros(q.shape), torch.zeros(lse_shape), s_dmask, rng_state)
        self.forward_outputs.append(outputs)
        return outputs

    def _backward(self, entry: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        names = BACKWARD_PARAMETERS[entry]
        assert len(args) <= len(names) and kwargs.keys() <= set(names[len(args) :])
        call = SimpleNamespace(**{**dict.fromkeys(names), **dict(zip(names, args)), **kwargs})
        self.backward_calls.append(call)
        inputs = (call.q, call.k, call.v)
        grads = tuple(x.new_full(x.shape, value) for x, value in zip(inputs, (DQ, DK, DV)))
        sink = call.learnable_sink
        # The contract: the sink's gradient, or an empty float32 tensor without a sink.
        sink_grad = torch.empty(0) if sink is None else sink.new_full(sink.shape, DSINK)
        return (*grads, sink_grad)


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
    (forward_out, forward_lse, _, forward_rng_state) = extension.forward_outputs[0]
    q, k, v = unpacked(name, differentiable)
    assert same_view(call.dout, grad)
    assert all(map(same_view, (call.q, call.k, call.v), (q, k, v)))
    assert same_view(call.out, forward_out) and same_view(call.softmax_lse, forward_lse)
    assert (call.softmax_scale, call.causal, call.deterministic) == (SCALE, True, False)
    assert call.softmax_lse_grad is None  # only out was used
    assert call.dq is None and call.dk is None and call.dv is None  # the kernels allocate
    # Default variant options (causal: right = 0); the forward's (empty) rng_state comes back.
    assert (call.window_left, call.window_right, call.softcap) == (-1, 0, 0.0)
    assert (call.alibi_slopes, call.causal_top_left, call.dropout_p) == (None, False, 0.0)
    assert same_view(call.rng_state, forward_rng_state) and call.rng_state.numel() == 0
    if name in VARLEN_NAMES:
        assert call.seqused_q is None and call.seqused_k is None
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
    """Saved for backward: q, k, v, out, softmax_lse (+ cu_seqlens) and the rng_state, nothing
    O(seqlen^2)."""
    differentiable, cu, run = make_case(name, device="cpu")
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, lse, _ = run(*differentiable, *cu)
    cu_seqlens = [cu[0], cu[-1]] if cu else []
    rng_state = extension.forward_outputs[0][3]  # empty: no dropout
    expected = [*unpacked(name, differentiable), out, lse, *cu_seqlens, rng_state]
    assert len(saved) == len(expected)
    assert all(map(same_view, saved, expected))


def test_missing_backward_kernel_error_reaches_the_caller(extension, monkeypatch) -> None:
    message = "flash_varlen: no backward kernel for float16 head dim 128 in this build"

    def narrowed_build(*args, **kwargs):
        raise NotImplementedError(message)

    monkeypatch.setattr(extension, "varlen_bwd", narrowed_build)
    differentiable, cu, run = make_case("flash_attn_varlen_func", device="cpu")
    out, _, _ = run(*differentiable, *cu)
    with pytest.raises(NotImplementedError, match=message):
        out.float().sum().backward()


# --------------------------------------------------------------------------------------------
# Variant options: forward to backward


def variant_overrides(name: str, device: str) -> dict[str, object]:
    """Non-default values of every variant option that ``name`` accepts (batch 2, NHEADS)."""
    overrides: dict[str, object] = {
        "causal": False,
        "dropout_p": 0.25,
        "window_size": (3, 1),
        "softcap": 4.0,
        "alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device),
        "causal_alignment": "top_left",
    }
    if name in ("flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func"):
        overrides["seqused_q"] = torch.tensor([4, 6], dtype=torch.int32, device=device)
        overrides["seqused_k"] = torch.tensor([3, 0], dtype=torch.int32, device=device)
    return overrides


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_variant_options_reach_forward_and_backward(name: str, extension) -> None:
    overrides = variant_overrides(name, device="cpu")
    differentiable, cu, run = make_case(name, device="cpu", **overrides)
    out, _, s_dmask = run(*differentiable, *cu)
    out.float().sum().backward()

    (forward,) = extension.forward_options
    (call,) = extension.backward_calls
    _, _, forward_s_dmask, forward_rng_state = extension.forward_outputs[0]
    for options in (forward, vars(call)):
        assert (options["window_left"], options["window_right"]) == (3, 1)
        assert (options["softcap"], options["dropout_p"]) == (4.0, 0.25)
        assert options["causal_top_left"] is True
        assert same_view(options["alibi_slopes"], overrides["alibi_slopes"])
        for seqused in ("seqused_q", "seqused_k"):
            if seqused in overrides:
                assert same_view(options[seqused], overrides[seqused])
            elif name in VARLEN_NAMES:
                assert options[seqused] is None
    assert forward["return_dropout_mask"] is True
    # The backward regenerates the forward's mask from the forward's RNG state.
    assert same_view(call.rng_state, forward_rng_state)
    assert call.rng_state.tolist() == [SEED, OFFSET]
    # S_dmask is the extension's s_dmask: (batch, nheads, both lengths rounded up to 128).
    assert same_view(s_dmask, forward_s_dmask)
    assert s_dmask.shape == (2, NHEADS, MASK_BLOCK, MASK_BLOCK) and not s_dmask.requires_grad


@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_func"])
def test_alibi_slopes_get_no_gradient(name: str, extension) -> None:
    slopes = torch.ones(NHEADS, requires_grad=True)
    differentiable, cu, run = make_case(name, device="cpu", alibi_slopes=slopes)
    out, _, _ = run(*differentiable, *cu)
    out.float().sum().backward()
    assert slopes.grad is None
    assert [leaf.grad.unique().tolist() for leaf in differentiable] == [[DQ], [DK], [DV]]


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_learnable_sink_reaches_both_directions_and_gets_its_gradient(name, extension) -> None:
    """The sink goes to the forward and (saved by reference) to the backward, and the backward's
    fourth result becomes its gradient; q, k, v keep theirs."""
    sink = torch.zeros(NHEADS, requires_grad=True)
    differentiable, cu, run = make_case(name, device="cpu", learnable_sink=sink)
    out, _, _ = run(*differentiable, *cu)
    out.float().sum().backward()
    (forward,) = extension.forward_options
    (call,) = extension.backward_calls
    assert same_view(forward["learnable_sink"], sink) and same_view(call.learnable_sink, sink)
    assert sink.grad is not None and sink.grad.tolist() == [DSINK] * NHEADS
    grads = [leaf.grad for leaf in differentiable]
    assert [g.unique().tolist() for g in unpacked(name, grads)] == [[DQ], [DK], [DV]]


@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_func"])
def test_without_a_sink_the_backward_gets_none(name, extension) -> None:
    """No sink: the extension gets None both ways and its empty placeholder reaches no input."""
    differentiable, cu, run = make_case(name, device="cpu")
    out, _, _ = run(*differentiable, *cu)
    out.float().sum().backward()
    assert extension.forward_options[0]["learnable_sink"] is None
    assert extension.backward_calls[0].learnable_sink is None
    assert [leaf.grad.unique().tolist() for leaf in differentiable] == [[DQ], [DK], [DV]]


@pytest.mark.parametrize("return_attn_probs", [False, True])
def test_dropout_mask_is_requested_only_with_return_attn_probs(return_attn_probs, extension):
    differentiable, cu, run = make_case(
        "flash_attn_func", device="cpu", dropout_p=0.5, return_attn_probs=return_attn_probs
    )
    result = run(*differentiable, *cu)
    assert extension.forward_options[0]["return_dropout_mask"] is return_attn_probs
    assert isinstance(result, tuple) is return_attn_probs


def test_forward_saves_the_variant_tensors(extension) -> None:
    """ALiBi slopes, seqused and the RNG state are saved for the backward, by reference."""
    name = "flash_attn_varlen_func"
    overrides = variant_overrides(name, device="cpu")
    differentiable, cu, run = make_case(name, device="cpu", **overrides)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, lse, _ = run(*differentiable, *cu)
    rng_state = extension.forward_outputs[0][3]
    variant_tensors = [overrides[key] for key in ("alibi_slopes", "seqused_q", "seqused_k")]
    expected = [*differentiable, out, lse, *cu, *variant_tensors, rng_state]
    assert len(saved) == len(expected)
    assert all(map(same_view, saved, expected))


def node_arguments(node: torch.fx.Node) -> dict[str, object]:
    """A call of a registered op by argument name (graphs pass them positionally)."""
    names = (argument.name for argument in node.target._schema.arguments)
    return {**dict(zip(names, node.args)), **node.kwargs}


def test_compile_fullgraph_passes_variants_and_rng_state_to_the_backward(any_device) -> None:
    """Under torch.compile the backward ops get the forward's options, its ALiBi slopes and
    seqused, and the rng_state the forward op returned (saved across the graphs)."""
    names = ["flash_attn_varlen_func", "flash_attn_func"]
    cases = [make_case(name, "meta", **variant_overrides(name, device="meta")) for name in names]

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        total = inputs[0].new_zeros((), dtype=torch.float32)
        position = 0
        for differentiable, cu, run in cases:
            count = len(differentiable) + len(cu)
            out, _, s_dmask = run(*inputs[position : position + count])
            total = total + out.float().sum() + s_dmask.float().sum()
            position += count
        return total

    inputs = [x for differentiable, cu, _ in cases for x in (*differentiable, *cu)]
    backend = GraphRecorder()
    torch.compile(loss, fullgraph=True, backend=backend)(*inputs).backward()
    (forward_graph,), (backward_graph,) = backend.forward, backend.backward
    def calls_of(graph: torch.fx.GraphModule, target: object) -> list[dict[str, object]]:
        return [node_arguments(node) for node in graph.graph.nodes if node.target == target]

    ops = torch.ops.flash_varlen
    assert len(calls_of(forward_graph, ops.varlen_fwd.default)) == 1
    assert len(calls_of(forward_graph, ops.fwd.default)) == 1
    (varlen_call,) = calls_of(backward_graph, ops.varlen_bwd.default)
    (fixed_call,) = calls_of(backward_graph, ops.bwd.default)
    for call in (varlen_call, fixed_call):
        assert (call["window_left"], call["window_right"], call["softcap"]) == (3, 1, 4.0)
        assert (call["dropout_p"], call["causal_top_left"]) == (0.25, True)
        assert call["rng_state"].op == "placeholder"  # saved from the forward graph
        assert tuple(call["rng_state"].meta["val"].shape) == (2,)
        assert call["alibi_slopes"].op == "placeholder"
    assert varlen_call["seqused_q"].op == varlen_call["seqused_k"].op == "placeholder"


def random_tensor(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DTYPE)


@pytest.mark.parametrize("variants", [False, True], ids=["defaults", "variants"])
def test_opcheck_forward_ops(variants: bool, extension) -> None:
    """torch.library.opcheck on the forward ops, backed by the stand-in: schema, fake outputs
    against the real ones, the autograd registration and AOT dispatch with its backward."""
    q = random_tensor(TOTAL_Q, NHEADS, HEAD_DIM).requires_grad_()
    k = random_tensor(TOTAL_K, NHEADS_K, HEAD_DIM).requires_grad_()
    v = random_tensor(TOTAL_K, NHEADS_K, HEAD_DIM).requires_grad_()
    cu_q, cu_k = (torch.tensor(cu, dtype=torch.int32) for cu in (CU_Q, CU_K))
    # More keys than one 128-row block, so that s_dmask's two rounded lengths differ.
    seqlen_k = MASK_BLOCK + 2
    q_fixed = random_tensor(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM).requires_grad_()
    k_fixed = random_tensor(BATCH, seqlen_k, NHEADS_K, HEAD_DIM).requires_grad_()
    v_fixed = random_tensor(BATCH, seqlen_k, NHEADS_K, HEAD_DIM).requires_grad_()
    options = {}
    if variants:
        options = dict(
            window_left=3,
            window_right=0,
            softcap=2.0,
            alibi_slopes=torch.ones(BATCH, NHEADS),
            causal_top_left=True,
            dropout_p=0.2,
            return_dropout_mask=True,
        )
    seqused = {"seqused_q": torch.tensor([4, 6], dtype=torch.int32)} if variants else {}
    cases = [
        (flash_ops.varlen_fwd, (q, k, v, cu_q, cu_k, MAX_Q, MAX_K, SCALE, True), seqused),
        (flash_ops.fwd, (q_fixed, k_fixed, v_fixed, SCALE, False), {}),
    ]
    for op, args, extra in cases:
        results = torch.library.opcheck(op, args, {**options, **extra})
        assert set(results.values()) == {"SUCCESS"}, results
