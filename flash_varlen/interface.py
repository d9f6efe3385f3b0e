"""Public attention functions, call-compatible with flash-attn 2.x.

Argument names, order, defaults and returns follow ``flash_attn.flash_attn_interface``, so code
written for flash-attn works by changing the import. Each function is written from its entry in
``FUNCTIONS`` below (its own tensors and how they unpack) and the option parameters declared in
``options.PUBLIC_OPTIONS`` (flash-attn's, in its order, then keyword-only ones flash-attn 2 does
not have), so an option declared there reaches every function that takes it, with its
documentation. A call validates its inputs first (``validation.py``: clear errors, no device
read) and then calls one registered op (``ops.py``): ``flash_varlen::varlen_fwd`` for the packed
variable-length layout, ``flash_varlen::fwd`` for the fixed-length layout, or, where nothing
observes the op (no tracing, no autograd, no mode: ``ops.op_dispatch_needed``), the op's
implementation directly, which saves the dispatch layers' host time. Gradients flow through
those ops' registered backward. The packed variants (``qkv``, ``kv``) pass views, never copies, so
autograd assembles the gradient of a packed input into one tensor of the packed shape.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen import ops, validation
from flash_varlen._codegen import NO_DEFAULT, FunctionParameter, arguments_by_name, make_function
from flash_varlen.options import PUBLIC_OPTIONS, PublicOption, Scope
from flash_varlen.signatures import FORWARD_OPS, Layout
from flash_varlen.validation import ArgNames

AttentionResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

_CAUSAL_DOC = """\
    Causal masking (``causal=True``) aligns the diagonal to the bottom-right corner of each
    sequence's attention matrix by default (``causal_alignment="bottom_right"``, as flash-attn,
    which is what a KV cache needs): query i sees key j iff ``j <= i + seqlen_k - seqlen_q``.
    ``causal_alignment="top_left"`` (the meaning of PyTorch's ``is_causal``) aligns it to the
    top-left corner: query i sees key j iff ``j <= i``. The two agree when seqlen_q ==
    seqlen_k. For seqlen_q = 2, seqlen_k = 5 (1 = attends, 0 = masked out)::

        bottom_right    top_left
        1 1 1 1 0       1 0 0 0 0
        1 1 1 1 1       1 1 0 0 0

    For seqlen_q = 5, seqlen_k = 2::

        bottom_right    top_left
        0 0             1 0
        0 0             1 1
        0 0             1 1
        1 0             1 1
        1 1             1 1

    (The first three bottom-right rows see no key: out = 0, softmax_lse = -inf.) The same
    diagonal, at key ``i + offset`` for query i with offset = seqlen_k - seqlen_q (bottom_right)
    or 0 (top_left), places the sliding window and the ALiBi distance; with seqused_q /
    seqused_k, seqlen means the used length.

    Any query row that sees no key (fully masked, or an empty key sequence) gets out = 0,
    softmax_lse = -inf and zero gradients; nothing is ever NaN. Both out and softmax_lse are
    differentiable w.r.t. q, k and v. Query head h attends with key/value head
    h // (nheads // nheads_k) (multi-query / grouped-query attention).

    Tensors must be float16 or bfloat16 on one CUDA device, contiguous in the last dim, with
    every other stride and the storage offset a multiple of 8 elements (views such as
    ``qkv[:, 0]`` qualify and are never copied); headdim is a multiple of 8, at most 256."""

_S_DMASK_DOC = """\
        S_dmask is None without dropout (dropout_p = 0). With dropout it is the dropout
        pattern, for testing only: (batch, nheads, max_seqlen_q rounded up to a multiple of
        128, max_seqlen_k rounded up likewise) in q's dtype (max_seqlen = seqlen for the
        fixed-length functions), indexed by positions within each sequence. A dropped entry has
        its sign bit set (``flash_varlen.reference.dropout_keep_mask(S_dmask)`` gives the keep
        mask); magnitudes are un-normalized probabilities, and entries outside a sequence's
        used rows and columns are 0. It costs O(batch * nheads * seqlen^2) memory."""

_RAISES_DOC = """\
    Raises:
        TypeError, ValueError: invalid inputs; the message names the argument and the rule.
        NotImplementedError: an unsupported option, or a (dtype, headdim) this build lacks;
            also from backward() when this build lacks the backward kernel for the (dtype,
            headdim, causal) (a narrowed build; the message names the FLASH_VARLEN_*
            variables to rebuild with).
        RuntimeError: the compiled extension is not available (the message says why)."""

_OPTION_INDENT = " " * 8
# The forward ops' own inputs, which a public function passes under these names.
_OP_INPUTS = frozenset(
    ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
)
# The forward ops' parameters with their defaults, in order (a function passes no value for an
# option it does not take: seqused_q of the qkv-packed function).
_OP_PARAMETERS = {
    layout: tuple((p.name, p.default) for p in signature.parameters)
    for layout, signature in FORWARD_OPS.items()
}


class Packing(enum.Enum):
    """How q, k and v reach a function: separately, k and v stacked, or all three stacked."""

    NONE = 0
    KV = 2  # the size of the packing dim
    QKV = 3


@dataclass(frozen=True)
class PublicFunction:
    """One public function: its own leading parameters and how they become q, k, v (and, varlen,
    cu_seqlens and max_seqlen). ``doc`` is its docstring with ``{causal}``, ``{options}``,
    ``{s_dmask}`` and ``{raises}`` filled in when the function is made."""

    name: str
    layout: Layout
    packing: Packing
    leading: tuple[str, ...]
    packed_shape: str
    doc: str

    def takes(self, option: PublicOption) -> bool:
        if option.scope is Scope.ALL:
            return True
        varlen = self.layout is Layout.VARLEN
        if option.scope is Scope.VARLEN_SEPARATE_Q:
            return varlen and self.packing is not Packing.QKV
        return varlen and self.packing is Packing.NONE

    @property
    def options(self) -> tuple[PublicOption, ...]:
        return tuple(option for option in PUBLIC_OPTIONS if self.takes(option))

    def unpack(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], ArgNames]:
        """q, k, v (views of a packed input) and, varlen, cu_seqlens_q/k and max_seqlen_q/k by
        the ops' names, with the names messages use for them."""
        varlen = self.layout is Layout.VARLEN
        inputs = {name: values[name] for name in self.leading if name in _OP_INPUTS}
        names = validation.DEFAULT_NAMES
        if self.packing is not Packing.NONE:
            packed_name = "qkv" if self.packing is Packing.QKV else "kv"
            packed = values[packed_name]
            validation.check_packed(
                packed, packed_name, layout=self.packed_shape, count=self.packing.value
            )
            # The packing dim follows the token dim (varlen) or the batch and sequence dims.
            dim = 1 if varlen else 2
            index = ":, " if varlen else ":, :, "
            unpacked = ("q", "k", "v")[-self.packing.value :]
            inputs.update(zip(unpacked, packed.unbind(dim=dim)))
            names = ArgNames(**{n: f"{packed_name}[{index}{i}]" for i, n in enumerate(unpacked)})
        if varlen and self.packing is Packing.QKV:
            inputs.update(
                cu_seqlens_q=values["cu_seqlens"],
                cu_seqlens_k=values["cu_seqlens"],
                max_seqlen_q=values["max_seqlen"],
                max_seqlen_k=values["max_seqlen"],
            )
            names = dataclasses.replace(
                names,
                cu_seqlens_q="cu_seqlens",
                cu_seqlens_k="cu_seqlens",
                max_seqlen_q="max_seqlen",
                max_seqlen_k="max_seqlen",
            )
        return inputs, names


def _attention(
    function: PublicFunction, options: tuple[PublicOption, ...], values: Mapping[str, Any]
) -> AttentionResult:
    """Checks a call's values, runs the layout's forward op and shapes the result. ``options``:
    ``function.options``, computed once when the function is made (not in traced code)."""
    arguments = validation.option_arguments(values, options)
    inputs, names = function.unpack(values)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if function.layout is Layout.VARLEN:
        max_seqlens = validation.check_varlen_inputs(
            q,
            k,
            v,
            inputs["cu_seqlens_q"],
            inputs["cu_seqlens_k"],
            inputs["max_seqlen_q"],
            inputs["max_seqlen_k"],
            names,
            arguments,
        )
        inputs["max_seqlen_q"], inputs["max_seqlen_k"] = max_seqlens
        if validation.debug_enabled():
            validation.check_varlen_values(
                q,
                k,
                inputs["cu_seqlens_q"],
                inputs["cu_seqlens_k"],
                *max_seqlens,
                names,
                seqused_q=arguments.get("seqused_q"),
                seqused_k=arguments.get("seqused_k"),
                block_table=arguments.get("block_table"),
            )
    else:
        validation.check_fixed_inputs(q, k, v, names, arguments)
    arguments["softmax_scale"] = validation.resolve_softmax_scale(
        arguments["softmax_scale"], q.shape[-1]
    )
    # Positionally, in the op's order: the dispatcher parses keywords more slowly (about 10 us
    # a call for all of them, bench_host_overhead.py).
    arguments.update(inputs)
    op_arguments = [
        arguments.get(name, default) for name, default in _OP_PARAMETERS[function.layout]
    ]
    op_name = FORWARD_OPS[function.layout].name
    if not ops.op_dispatch_needed(op_arguments):
        op_name += "_eager"  # the same call without the op's dispatch layers
    out, softmax_lse, s_dmask, _ = getattr(ops, op_name)(*op_arguments)
    if not values["return_attn_probs"]:
        return out
    # Without dropout there is no pattern to return (the op's s_dmask is then empty): None, as
    # flash-attn.
    return out, softmax_lse, (s_dmask if arguments["dropout_p"] > 0 else None)


def _options_doc(function: PublicFunction) -> str:
    lines = []
    for option in function.options:
        for line in option.doc.splitlines():
            lines.append(_OPTION_INDENT + line)
    return "\n".join(lines)


def make_public_function(function: PublicFunction) -> Callable[..., AttentionResult]:
    """The function ``function`` describes, with flash-attn's parameters and flash_varlen's
    keyword-only ones, each with its name, default and annotation."""
    parameters = [
        FunctionParameter(
            name, "int" if name.startswith("max_seqlen") else "torch.Tensor", NO_DEFAULT
        )
        for name in function.leading
    ]
    parameters += [
        FunctionParameter(
            option.name, option.annotation, option.default, keyword_only=not option.flash_attn
        )
        for option in function.options
    ]
    doc = function.doc.format(
        causal=_CAUSAL_DOC, options=_options_doc(function), s_dmask=_S_DMASK_DOC, raises=_RAISES_DOC
    )
    return make_function(
        function.name,
        parameters,
        f"_attention(_function, _options, {arguments_by_name([p.name for p in parameters])})",
        {"_attention": _attention, "_function": function, "_options": function.options},
        returns="AttentionResult",
        doc=doc,
        module_globals=globals(),
    )


_VARLEN_RETURNS = """\
    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total_q) float32, the natural log of sum_j exp(score_ij) over the keys row
        i sees.
{s_dmask}"""

FUNCTIONS: tuple[PublicFunction, ...] = (
    PublicFunction(
        "flash_attn_varlen_func",
        Layout.VARLEN,
        Packing.NONE,
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
        "",
        """Exact attention over packed variable-length sequences.

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v; sequences are stored back to back and no
    padding is ever computed. A sequence may be empty (two equal cu_seqlens entries). With
    block_table (paged prefill, forward only) k and v are page pools instead: sequence b's
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys are read through its row of the block table.

{causal}

    Arguments:
        q: (total_q, nheads, headdim).
        k: (total_k, nheads_k, headdim); nheads must be a multiple of nheads_k. With
            block_table: (num_pages, page_size, nheads_k, headdim), a pool of pages.
        v: (total_k, nheads_k, headdim), or with block_table a pool of k's shape.
        cu_seqlens_q: (batch + 1,) int32, on q's device. Prefix sums of the query lengths,
            starting at 0 and ending at total_q.
        cu_seqlens_k: (batch + 1,) int32, on q's device. Prefix sums of the key lengths.
        max_seqlen_q: int. Longest query sequence. Read on the host, so nothing reads the
            device; an overestimate is safe, an underestimate is an error
            (FLASH_VARLEN_DEBUG=1 detects it).
        max_seqlen_k: int. Longest key sequence, same rules.
{options}

"""
        + _VARLEN_RETURNS
        + """

{raises}
    """,
    ),
    PublicFunction(
        "flash_attn_varlen_qkvpacked_func",
        Layout.VARLEN,
        Packing.QKV,
        ("qkv", "cu_seqlens", "max_seqlen"),
        "(total, 3, nheads, headdim)",
        """Packed variable-length self-attention with q, k, v stacked in one tensor.

    Same as ``flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
    max_seqlen, max_seqlen, ...)``; the three are views of qkv, not copies, and the gradient
    of qkv is one tensor of its shape. For MQA/GQA use ``flash_attn_varlen_kvpacked_func`` or
    ``flash_attn_varlen_func``.

{causal}

    Arguments:
        qkv: (total, 3, nheads, headdim).
        cu_seqlens: (batch + 1,) int32, on qkv's device. Prefix sums of the sequence lengths,
            starting at 0 and ending at total.
        max_seqlen: int. Longest sequence (read on the host; an overestimate is safe).
{options}

    Returns:
        out: (total, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """,
    ),
    PublicFunction(
        "flash_attn_varlen_kvpacked_func",
        Layout.VARLEN,
        Packing.KV,
        ("q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
        "(total_k, 2, nheads_k, headdim)",
        """Packed variable-length attention with k and v stacked in one tensor.

    Same as ``flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], ...)``; k and v are views of kv,
    not copies, and the gradient of kv is one tensor of its shape.

{causal}

    Arguments:
        q: (total_q, nheads, headdim).
        kv: (total_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.
        cu_seqlens_q: (batch + 1,) int32, on q's device. Prefix sums of the query lengths.
        cu_seqlens_k: (batch + 1,) int32, on q's device. Prefix sums of the key lengths.
        max_seqlen_q: int. Longest query sequence (read on the host; an overestimate is safe).
        max_seqlen_k: int. Longest key sequence, same rules.
{options}

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (nheads, total_q) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """,
    ),
    PublicFunction(
        "flash_attn_func",
        Layout.FIXED,
        Packing.NONE,
        ("q", "k", "v"),
        "",
        """Exact attention over a batch of equal-length sequences.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k.
        v: (batch, seqlen_k, nheads_k, headdim).
{options}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen_q) float32, the natural log of sum_j exp(score_ij) over the
        keys row i sees.
{s_dmask}

{raises}
    """,
    ),
    PublicFunction(
        "flash_attn_qkvpacked_func",
        Layout.FIXED,
        Packing.QKV,
        ("qkv",),
        "(batch, seqlen, 3, nheads, headdim)",
        """Fixed-length self-attention with q, k, v stacked in one tensor.

    Same as ``flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)``; the three are
    views of qkv, not copies, and the gradient of qkv is one tensor of its shape. For MQA/GQA
    use ``flash_attn_kvpacked_func`` or ``flash_attn_func``.

{causal}

    Arguments:
        qkv: (batch, seqlen, 3, nheads, headdim).
{options}

    Returns:
        out: (batch, seqlen, nheads, headdim), dtype of qkv.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """,
    ),
    PublicFunction(
        "flash_attn_kvpacked_func",
        Layout.FIXED,
        Packing.KV,
        ("q", "kv"),
        "(batch, seqlen_k, 2, nheads_k, headdim)",
        """Fixed-length attention with k and v stacked in one tensor.

    Same as ``flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...)``; k and v are views of kv,
    not copies, and the gradient of kv is one tensor of its shape.

{causal}

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        kv: (batch, seqlen_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.
{options}

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
        With return_attn_probs=True, the tuple (out, softmax_lse, S_dmask), where softmax_lse
        is (batch, nheads, seqlen_q) float32 (natural-log sum of exp(scores) per row).
{s_dmask}

{raises}
    """,
    ),
)

_MADE = {function.name: make_public_function(function) for function in FUNCTIONS}
flash_attn_varlen_func = _MADE["flash_attn_varlen_func"]
flash_attn_varlen_qkvpacked_func = _MADE["flash_attn_varlen_qkvpacked_func"]
flash_attn_varlen_kvpacked_func = _MADE["flash_attn_varlen_kvpacked_func"]
flash_attn_func = _MADE["flash_attn_func"]
flash_attn_qkvpacked_func = _MADE["flash_attn_qkvpacked_func"]
flash_attn_kvpacked_func = _MADE["flash_attn_kvpacked_func"]
