"""Registered operators around the compiled kernels.

``flash_varlen::varlen_fwd`` and ``flash_varlen::fwd`` (forward), ``flash_varlen::varlen_bwd``
and ``flash_varlen::bwd`` (backward) and ``flash_varlen::kvcache_fwd`` (the decode kernels on a
KV cache, inference only: no autograd) are ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` traces through forward and backward: their fake
implementations give output shapes and dtypes without running anything. Their parameters are
``signatures.py``'s lists, which place the options declared in ``options.py``; this module writes
each op from its list, so an option declared there reaches the ops, their fakes, the extension
call and the autograd context without an edit here.

Calls that nothing observes (no tracing, autograd, tensor subclass, Python mode, functorch
transform or profiler: ``op_dispatch_needed``) run the ops' implementations directly
(``varlen_fwd_eager``, ``fwd_eager``, ``kvcache_fwd_eager``): the same extension call, without
the dispatch layers' host time.

Autograd is attached to the forward ops through ``register_autograd``: the forward saves the
backward op's tensors that the forward has (q, k, v, out, softmax_lse, cu_seqlens, the tensor
options the backward reads, the dropout RNG state), O(total tokens) and never O(seqlen^2), and
keeps the backward's other options; the backward calls the backward op with them. The ops
assume validated inputs (see ``validation.py``); the public functions in ``interface.py``
validate first.

The forward ops return (out, softmax_lse, s_dmask, rng_state); only out and softmax_lse are
differentiable. With dropout the forward draws its (seed, offset) from PyTorch's default CUDA
generator, so the forward ops carry the ``nondeterministic_seeded`` tag of PyTorch's own random
ops: graph passes then treat a call as consuming random state (never removed as dead code nor
constant-folded) rather than as a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flash_varlen import contract
from flash_varlen._codegen import (
    NO_DEFAULT,
    FunctionParameter,
    arguments_by_name,
    call_source,
    make_function,
)
from flash_varlen._extension import load_extension
from flash_varlen.signatures import (
    BACKWARD_OPS,
    EXTENSION_ENTRY_POINT_BY_NAME,
    FORWARD_OPS,
    Layout,
    Signature,
)
from flash_varlen.validation import IntLike, has_kernel_layout

LSE_DTYPE = getattr(torch, contract.LSE_DTYPE)
RNG_STATE_DTYPE = getattr(torch, contract.RNG_STATE_DTYPE)
# q, k, v: the first three inputs of both forward ops; the backward ops return their gradients
# first, then those of the differentiable options (Signature.differentiable_options).
DIFFERENTIABLE_INPUTS = ("q", "k", "v")
# What the forward op returns, by the names the backward op takes them under.
FORWARD_OUTPUTS = ("out", "softmax_lse", "s_dmask", "rng_state")

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Gradients = tuple[torch.Tensor, ...]
Arguments = dict[str, Any]

_RANDOM = (torch.Tag.nondeterministic_seeded,)


def _parameters(signature: Signature) -> list[FunctionParameter]:
    return [
        FunctionParameter(p.name, p.kind.annotation, NO_DEFAULT if p.required else p.default)
        for p in signature.parameters
    ]


def _function(
    name: str, signature: Signature, body: Callable[[Arguments], Any], returns: str, doc: str | None
) -> Callable[..., Any]:
    """A function with ``signature``'s parameters that passes them by name to ``body``."""
    return make_function(
        name,
        _parameters(signature),
        f"_body({arguments_by_name(signature.names)})",
        {"_body": body},
        returns=returns,
        doc=doc,
        module_globals=globals(),
    )


def _implementation(signature: Signature, returns: str) -> Callable[..., Any]:
    """The op's real implementation: one call of the extension's entry point of the same name,
    with the entry's leading parameters positionally, in order, as far as the op has them, and
    the rest the op has by keyword (written out, so a call builds no argument dicts)."""
    entry = EXTENSION_ENTRY_POINT_BY_NAME[signature.name]
    available = set(signature.names)
    positional: list[str] = []
    for name in entry.leading:
        if name not in available:
            break
        positional.append(name)
    keywords = [name for name in entry.names[len(positional) :] if name in available]
    call = call_source(f"_load_extension().{entry.name}", positional, keywords)
    return make_function(
        signature.name,
        _parameters(signature),
        f"tuple({call})",
        {"_load_extension": load_extension},
        returns=returns,
        doc=signature.doc,
        module_globals=globals(),
    )


# --------------------------------------------------------------------------------------------
# Fake implementations


def _round_up_to_block(length: IntLike) -> IntLike:
    """``length`` (an int or SymInt) rounded up to a multiple of the dropout mask's block."""
    block = contract.DROPOUT_MASK_BLOCK
    return (length + block - 1) // block * block


def _dropout_outputs(
    q: torch.Tensor, dims: tuple[IntLike, IntLike, IntLike, IntLike], arguments: Arguments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake s_dmask and rng_state, as the extension allocates them on q's device.

    dims: (batch, nheads, max_seqlen_q, max_seqlen_k), the sequence lengths of the fixed-length
    layout for the last two. s_dmask: with return_dropout_mask and dropout_p > 0, (batch,
    nheads, max_seqlen_q, max_seqlen_k) with both lengths rounded up to the block, in q's dtype;
    else an empty (0,) tensor of q's dtype. rng_state: int64 (seed, offset) with dropout, else
    empty.
    """
    batch, nheads, max_seqlen_q, max_seqlen_k = dims
    with_dropout = arguments["dropout_p"] > 0
    if with_dropout and arguments["return_dropout_mask"]:
        s_dmask = q.new_empty(
            (batch, nheads, _round_up_to_block(max_seqlen_q), _round_up_to_block(max_seqlen_k))
        )
    else:
        s_dmask = q.new_empty((0,))
    rng_size = contract.RNG_STATE_SIZE if with_dropout else 0
    return s_dmask, q.new_empty((rng_size,), dtype=RNG_STATE_DTYPE)


def _varlen_forward_fake(arguments: Arguments) -> Outputs:
    q = arguments["q"]
    total_q, nheads, _ = q.shape
    batch = arguments["cu_seqlens_q"].shape[0] - 1
    dims = (batch, nheads, arguments["max_seqlen_q"], arguments["max_seqlen_k"])
    softmax_lse = q.new_empty((nheads, total_q), dtype=LSE_DTYPE)
    return q.new_empty(q.shape), softmax_lse, *_dropout_outputs(q, dims, arguments)


def _fixed_forward_fake(arguments: Arguments) -> Outputs:
    q, k = arguments["q"], arguments["k"]
    batch, seqlen_q, nheads, _ = q.shape
    dims = (batch, nheads, seqlen_q, k.shape[1])
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=LSE_DTYPE)
    return q.new_empty(q.shape), softmax_lse, *_dropout_outputs(q, dims, arguments)


def _option_gradient_fake(arguments: Arguments, name: str) -> torch.Tensor:
    """Fake gradient of a differentiable option: like the option, or an empty float32 tensor
    on q's device when it is not given (as the extension returns)."""
    option = arguments[name]
    if option is None:
        return arguments["q"].new_empty((0,), dtype=torch.float32)
    return option.new_empty(option.shape)


def _backward_fake(layout: Layout) -> Callable[[Arguments], Gradients]:
    """Fake dq, dk, dv (contiguous, shaped and typed like q, k, v, as the kernels allocate),
    then the fake gradients of the layout's differentiable options."""
    options = BACKWARD_OPS[layout].differentiable_options

    def fake(arguments: Arguments) -> Gradients:
        inputs = [arguments[name] for name in DIFFERENTIABLE_INPUTS]
        grads = [tensor.new_empty(tensor.shape) for tensor in inputs]
        return (*grads, *[_option_gradient_fake(arguments, name) for name in options])

    return fake


_FORWARD_FAKES = {Layout.VARLEN: _varlen_forward_fake, Layout.FIXED: _fixed_forward_fake}

# --------------------------------------------------------------------------------------------
# Autograd


def use_deterministic_backward(requested: bool) -> bool:
    """Whether the backward orders its dq accumulation (bitwise reproducible dq).

    As for PyTorch's own ops with a deterministic alternative, the deterministic path is also
    taken when ``torch.use_deterministic_algorithms(True)`` is on: read when backward runs, or
    under torch.compile when the graph is compiled (Dynamo recompiles when the flag changes).
    """
    return requested or torch.are_deterministic_algorithms_enabled()


def kernel_ready_dout(grad_out: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The gradient of out as the kernel can read it, copied only when it must be.

    Autograd hands over whatever layout the loss produced: ``out.sum()`` gives an expanded
    gradient (all strides 0), slicing gives odd strides or offsets. Those are copied to a new
    contiguous tensor; a gradient that meets the kernel layout rules, views included, is passed
    as is. None (only softmax_lse was used) becomes zeros.
    """
    if grad_out is None:
        return torch.zeros_like(out)
    return grad_out if has_kernel_layout(grad_out) else _contiguous_copy(grad_out)


def kernel_ready_lse_grad(grad_softmax_lse: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of softmax_lse (float32) with stride(-1) == 1 as the kernel needs, or None."""
    if grad_softmax_lse is None or grad_softmax_lse.stride(-1) == 1:
        return grad_softmax_lse
    return _contiguous_copy(grad_softmax_lse)


def _contiguous_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Not .contiguous(): it returns a contiguous tensor itself, also one whose storage offset
    # misaligns it, or whose size-1 last dim has a stride other than 1. A fresh allocation is
    # aligned and has the standard strides.
    return tensor.clone(memory_format=torch.contiguous_format)


class _Autograd:
    """The autograd formula of one forward op: what it keeps and how it calls the backward op.

    The backward op's parameters say what to keep: each one the forward op has as an input or
    an output is saved (tensors, with save_for_backward) or kept on ctx (everything else);
    ``dout`` and ``softmax_lse_grad`` come from the incoming gradients.
    """

    def __init__(self, forward: Signature, backward: Signature, backward_op: Any) -> None:
        self.backward_names = backward.names
        self.backward_op = backward_op
        # Where each kept value sits in (forward inputs..., forward outputs...), found once:
        # setup_context runs on every forward with grad.
        position = {name: i for i, name in enumerate((*forward.names, *FORWARD_OUTPUTS))}
        taken = [p for p in backward.parameters if p.name in position]
        self.saved = tuple(p.name for p in taken if p.kind.is_tensor)
        self.kept = tuple(p.name for p in taken if not p.kind.is_tensor)
        self.saved_positions = tuple(position[name] for name in self.saved)
        self.kept_positions = tuple(position[name] for name in self.kept)
        # The forward inputs that receive the backward op's gradients, in its order.
        self.gradient_names = (*DIFFERENTIABLE_INPUTS, *backward.differentiable_options)
        self.gradient_positions = tuple(position[name] for name in self.gradient_names)

    def setup_context(self, ctx: Any, inputs: tuple[Any, ...], output: Outputs) -> None:
        values = (*inputs, *output)
        ctx.save_for_backward(*[values[i] for i in self.saved_positions])
        ctx.kept = [values[i] for i in self.kept_positions]
        ctx.num_inputs = len(inputs)
        s_dmask, rng_state = output[2:]
        ctx.mark_non_differentiable(s_dmask, rng_state)
        # Unused outputs then reach backward as None instead of zero-filled tensors: in the
        # common case (out alone is used) the softmax_lse gradient is None, so no zero tensor is
        # allocated and the kernel reads none.
        ctx.set_materialize_grads(False)

    def backward(
        self,
        ctx: Any,
        grad_out: torch.Tensor | None,
        grad_softmax_lse: torch.Tensor | None,
        _grad_s_dmask: None,
        _grad_rng_state: None,
    ) -> tuple[torch.Tensor | None, ...]:
        arguments = dict(zip(self.kept, ctx.kept))
        arguments.update(zip(self.saved, ctx.saved_tensors))
        arguments["dout"] = kernel_ready_dout(grad_out, arguments["out"])
        arguments["softmax_lse_grad"] = kernel_ready_lse_grad(grad_softmax_lse)
        arguments["deterministic"] = use_deterministic_backward(arguments["deterministic"])
        # Positionally: the dispatcher parses keywords more slowly.
        gradients = self.backward_op(*[arguments[name] for name in self.backward_names])
        # One gradient per forward input: None for cu_seqlens and seqused (integers),
        # alibi_slopes (not differentiable, as in flash-attn), the non-tensor arguments and a
        # differentiable option that was not given (its gradient is an empty placeholder).
        result: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for name, position, gradient in zip(
            self.gradient_names, self.gradient_positions, gradients
        ):
            if arguments[name] is not None:
                result[position] = gradient
        return tuple(result)


def _backward_op(layout: Layout) -> Any:
    signature = BACKWARD_OPS[layout]
    count = len(DIFFERENTIABLE_INPUTS) + len(signature.differentiable_options)
    returns = f"tuple[{', '.join(['torch.Tensor'] * count)}]"
    op = torch.library.custom_op(f"flash_varlen::{signature.name}", mutates_args=())(
        _implementation(signature, returns)
    )
    op.register_fake(
        _function(
            f"_{signature.name}_fake",
            signature,
            _backward_fake(layout),
            returns,
            None,
        )
    )
    return op


def _forward_op(
    layout: Layout, backward_op: Any
) -> tuple[Any, Callable[..., Outputs], Callable[..., Outputs]]:
    """The forward op of ``layout`` with its fake and autograd; returns (op, fake, and the op's
    implementation alone)."""
    signature = FORWARD_OPS[layout]
    returns = "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]"
    implementation = _implementation(signature, returns)
    op = torch.library.custom_op(f"flash_varlen::{signature.name}", mutates_args=(), tags=_RANDOM)(
        implementation
    )
    fake = _function(f"_{signature.name}_fake", signature, _FORWARD_FAKES[layout], returns, None)
    op.register_fake(fake)
    formula = _Autograd(signature, BACKWARD_OPS[layout], backward_op)
    op.register_autograd(formula.backward, setup_context=formula.setup_context)
    return op, fake, implementation


varlen_bwd = _backward_op(Layout.VARLEN)
bwd = _backward_op(Layout.FIXED)
# varlen_fwd_eager, fwd_eager: the forward ops' implementations without the dispatch layers, for
# calls that nothing observes (op_dispatch_needed).
varlen_fwd, _varlen_fwd_fake, varlen_fwd_eager = _forward_op(Layout.VARLEN, varlen_bwd)
fwd, _fwd_fake, fwd_eager = _forward_op(Layout.FIXED, bwd)


def _torch_has(path: str) -> bool:
    """Whether torch has the (possibly private) attribute at dotted ``path`` below ``torch``."""
    target: Any = torch
    for name in path.split("."):
        if not hasattr(target, name):
            return False
        target = getattr(target, name)
    return True


# The private state op_dispatch_needed reads (present in the torch versions setup.TORCH_RANGE
# admits). A torch without one of them gets the registered op for every call: slower, never wrong.
_OBSERVER_CHECKS = (
    "_C._len_torch_dispatch_stack",
    "_C._is_torch_function_mode_enabled",
    "_C._functorch.peek_interpreter_stack",
    "autograd.profiler._is_profiler_enabled",
    "_C._get_tracing_state",
)
_CAN_TELL_OBSERVERS = all(_torch_has(path) for path in _OBSERVER_CHECKS)


def op_dispatch_needed(arguments: list[Any], differentiable: bool = True) -> bool:
    """Whether a call with these op arguments must go through its registered op, or may call the
    op's implementation directly (``*_eager``): the same extension call and outputs, without the
    dispatch layers of ``torch.library.custom_op``: a flash_attn_varlen_func call took 44.2 us of
    host time through the op and 29.8 us without (``benchmarks/bench_host_overhead.py`` with its
    stand-in extension, idle development machine). An eager call pays them on every layer of
    every step: a decode step of a model that calls the varlen functions, or anything whose GPU
    work is shorter than its host work.

    The op is needed wherever something observes it: torch.compile, export or torch.jit.trace
    tracing (the op is what a trace records; its fake gives the shapes), autograd (``differentiable``: a tensor that requires grad under grad
    mode), a tensor subclass (FakeTensor, DTensor, ...), a Python dispatch or function mode
    (FakeTensorMode, FlopCounterMode, ...), a functorch transform (vmap, grad), or the profiler
    (it labels the op's range in the trace)."""
    if (
        not _CAN_TELL_OBSERVERS
        or torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.profiler._is_profiler_enabled
        or torch._C._get_tracing_state() is not None
    ):
        return True
    grad = differentiable and torch.is_grad_enabled()
    for argument in arguments:
        if isinstance(argument, torch.Tensor) and (
            type(argument) is not torch.Tensor or (grad and argument.requires_grad)
        ):
            return True
    return False


def _kvcache_forward_fake(arguments: Arguments) -> Outputs:
    q = arguments["q"]
    batch, seqlen_q, nheads, _ = q.shape
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=LSE_DTYPE)
    return q.new_empty(q.shape), softmax_lse, q.new_empty((0,)), q.new_empty((0,))


def _kvcache_op(name: str, mutates_args: tuple[str, ...]) -> tuple[Any, Callable[..., Outputs]]:
    """A decode op named ``name`` with its fake (no autograd: flash_attn_with_kvcache is forward
    only), and its implementation alone."""
    signature = EXTENSION_ENTRY_POINT_BY_NAME["kvcache_fwd"]
    returns = "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]"
    implementation = _implementation(signature, returns)
    op = torch.library.custom_op(f"flash_varlen::{name}", mutates_args=mutates_args)(
        implementation
    )
    fake = _function(f"_{name}_fake", signature, _kvcache_forward_fake, returns, None)
    op.register_fake(fake)
    return op, implementation


# Two ops over the one entry point: kvcache_fwd for calls without new keys, which leave the
# caches alone, and kvcache_append_fwd for calls with them (k_new, v_new), which write them into
# the caches in place. A single op declaring the mutation would make torch.compile functionalize
# every decode step, copying or writing back whole caches that a plain step only reads.
# kvcache_fwd_eager: the same call without the op's dispatch, for eager decode steps, whose host
# time a small cache cannot hide (the op's layers took about a fifth of an eager call's 143 us on
# the H200 under cProfile; benchmarks/results/2026-12-05_h200_f4e73c1_decode.md). It has no
# autograd to skip (forward only) and returns fresh tensors as the op does; torch.compile needs
# the ops (kvcache_decode.py picks).
kvcache_fwd, kvcache_fwd_eager = _kvcache_op("kvcache_fwd", ())
kvcache_append_fwd, _ = _kvcache_op("kvcache_append_fwd", ("k_cache", "v_cache"))
