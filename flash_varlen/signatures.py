"""The parameter lists of the registered ops and of the extension's entry points.

Each list names the layout's own inputs (the tensors and lengths of the variable-length or the
fixed-length layout, the backward's extra tensors) and places the options of ``options.py``:
options named in the list stand there, and ``OTHER_OPTIONS`` stands for the remaining ones that
the entry takes, in declaration order. Which options an entry takes follows from the
declaration: the forward ops take every option of their layout (autograd saves the ones the
backward reads), the extension's forward entry points and every backward entry take those their
direction reads. ``ops.py`` builds the ops from these lists; ``csrc/generate.py`` writes the
extension's entry points from them, so the two cannot disagree.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

from flash_varlen.options import OPTION_BY_NAME, OPTIONS, REQUIRED, Direction, Kind, Option


class Layout(enum.Enum):
    VARLEN = "varlen"  # packed sequences described by cu_seqlens
    FIXED = "fixed"  # a batch of equal-length sequences


@dataclass(frozen=True)
class Input:
    """A parameter of an entry that is not an option."""

    name: str
    kind: Kind
    default: Any = REQUIRED


INPUTS: dict[str, Input] = {
    entry.name: entry
    for entry in (
        Input("q", Kind.TENSOR),
        Input("k", Kind.TENSOR),
        Input("v", Kind.TENSOR),
        Input("cu_seqlens_q", Kind.TENSOR),
        Input("cu_seqlens_k", Kind.TENSOR),
        Input("max_seqlen_q", Kind.INT),
        Input("max_seqlen_k", Kind.INT),
        Input("dout", Kind.TENSOR),
        Input("out", Kind.TENSOR),
        Input("softmax_lse", Kind.TENSOR),
        # The gradient of the loss with respect to softmax_lse; None for zero.
        Input("softmax_lse_grad", Kind.OPTIONAL_TENSOR, None),
        # Caller-provided gradient buffers (extension only); None: allocated.
        Input("dq", Kind.OPTIONAL_TENSOR, None),
        Input("dk", Kind.OPTIONAL_TENSOR, None),
        Input("dv", Kind.OPTIONAL_TENSOR, None),
        # The forward's dropout RNG state, for the backward to regenerate the mask.
        Input("rng_state", Kind.OPTIONAL_TENSOR, None),
        # A KV cache (kvcache_fwd): contiguous (batch_cache, seqlen_cache, nheads_k, d) or paged
        # (num_pages, page_size, nheads_k, d) with block_table; cache_seqlens: int32 (batch,)
        # one past each request's last key position (after any append). block_table: int32
        # (batch, max_pages), also the varlen forward's (paged prefill: k and v are then page
        # pools); forward only, so no backward entry takes it.
        Input("k_cache", Kind.TENSOR),
        Input("v_cache", Kind.TENSOR),
        Input("cache_seqlens", Kind.TENSOR),
        Input("block_table", Kind.OPTIONAL_TENSOR, None),
        Input("cache_batch_idx", Kind.OPTIONAL_TENSOR, None),
        Input("cache_leftpad", Kind.OPTIONAL_TENSOR, None),
        Input("num_splits", Kind.INT, 0),
        # kvcache_fwd's append step (flash_attn_with_kvcache's k and v, renamed here because k
        # and v are the packed keys of the other entries): (batch, seqlen_new, nheads_k, d)
        # each, written into the cache at cache_seqlens[b] + i before attending; the rotary
        # tables (seqlen_ro, rotary_dim / 2) rotate them and q (only with k_new and v_new).
        Input("k_new", Kind.OPTIONAL_TENSOR, None),
        Input("v_new", Kind.OPTIONAL_TENSOR, None),
        Input("rotary_cos", Kind.OPTIONAL_TENSOR, None),
        Input("rotary_sin", Kind.OPTIONAL_TENSOR, None),
        Input("rotary_interleaved", Kind.BOOL, True),
    )
}

OTHER_OPTIONS = "..."


@dataclass(frozen=True)
class Parameter:
    """One parameter of an entry, inputs and options alike."""

    name: str
    kind: Kind
    default: Any
    is_option: bool

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Signature:
    """An entry's parameters: ``order`` with OTHER_OPTIONS expanded (computed once: calls read
    them on the hot path).

    ``options_for``: None for every option of the layout (the forward ops), else the options
    read by that direction.
    """

    name: str
    layout: Layout
    direction: Direction
    order: tuple[str, ...]
    options_for: Direction | None
    doc: str

    def takes(self, option: Option) -> bool:
        if option.varlen_only and self.layout is not Layout.VARLEN:
            return False
        return self.options_for is None or option.read_by(self.options_for)

    @functools.cached_property
    def parameters(self) -> tuple[Parameter, ...]:
        named = set(self.order)
        result = []
        for name in self.order:
            if name == OTHER_OPTIONS:
                result += [
                    _option_parameter(option)
                    for option in OPTIONS
                    if option.name not in named and self.takes(option)
                ]
            elif name in OPTION_BY_NAME:
                result.append(_option_parameter(OPTION_BY_NAME[name]))
            else:
                entry = INPUTS[name]
                result.append(Parameter(entry.name, entry.kind, entry.default, is_option=False))
        return tuple(result)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(parameter.name for parameter in self.parameters)

    @functools.cached_property
    def differentiable_options(self) -> tuple[str, ...]:
        """The tensor options of this entry that receive gradients, in declaration order: a
        backward entry returns their gradients after dq, dk and dv."""
        return tuple(
            option.name for option in OPTIONS if option.differentiable and self.takes(option)
        )

    @functools.cached_property
    def leading(self) -> tuple[str, ...]:
        """The names before OTHER_OPTIONS: the entry's positional contract."""
        return self.order[: self.order.index(OTHER_OPTIONS)]


def _option_parameter(option: Option) -> Parameter:
    return Parameter(option.name, option.kind, option.default, is_option=True)


_VARLEN_INPUTS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_FIXED_INPUTS = ("q", "k", "v")
_BACKWARD_TENSORS = ("dout", "q", "k", "v", "out", "softmax_lse")
_VARLEN_BACKWARD_INPUTS = (*_BACKWARD_TENSORS, *_VARLEN_INPUTS[3:])
_SCALE_AND_MASK = ("softmax_scale", "causal")
_BACKWARD_CONTROLS = (*_SCALE_AND_MASK, "deterministic", "softmax_lse_grad")
_GRADIENT_BUFFERS = ("dq", "dk", "dv")

VARLEN_FORWARD_DOC = """\
Attention over packed sequences. q: (total_q, nheads, d); k, v: (total_k, nheads_k, d);
cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32. With block_table, int32 (batch, max_pages), k and
v are page pools (num_pages, page_size, nheads_k, d) of one shape: key j of sequence b is row
j % page_size of page block_table[b, j // page_size], and cu_seqlens_k (or seqused_k) only count
each sequence's keys (forward only). Returns out (total_q, nheads, d) in q's dtype, softmax_lse
(nheads, total_q) float32, the dropout pattern (testing only; empty unless return_dropout_mask
and dropout_p > 0) and rng_state (the (2,) int64 Philox (seed, offset) with dropout, else
empty)."""
FIXED_FORWARD_DOC = """\
Attention over a batch of equal-length sequences. q: (batch, seqlen_q, nheads, d); k, v:
(batch, seqlen_k, nheads_k, d). Returns out (batch, seqlen_q, nheads, d) in q's dtype,
softmax_lse (batch, nheads, seqlen_q) float32, the dropout pattern and rng_state."""
VARLEN_BACKWARD_DOC = """\
Gradients of varlen_fwd: (dq, dk, dv, dlearnable_sink), the last float32 (nheads,), empty
without learnable_sink. dout, out like q; softmax_lse and softmax_lse_grad
(nheads, total_q) float32. The options must be the forward's, and rng_state its fourth output
when dropout_p > 0."""
KVCACHE_FORWARD_DOC = """\
Decode attention over a KV cache (the decode kernel family). q: (batch, seqlen_q, nheads, d);
k_cache, v_cache: contiguous (batch_cache, seqlen_cache, nheads_k, d) or, with block_table int32
(batch, max_pages), paged (num_pages, page_size, nheads_k, d), with equal strides; cache_seqlens:
int32 (batch,), each request's cache length before the append; cache_batch_idx, cache_leftpad:
int32 (batch,), contiguous caches only; num_splits: key splits (0: heuristic). k_new, v_new:
(batch, seqlen_new, nheads_k, d), written in place into the caches at positions
cache_seqlens[b] + i first, k_new rotated there when rotary_cos, rotary_sin (seqlen_ro,
rotary_dim / 2) are given, q then rotated too (at cache_seqlens[b] + i with a causal or local
mask, else at cache_seqlens[b]). Request b attends to cache positions cache_leftpad[b] (or 0) to
cache_seqlens[b] + seqlen_new - 1. Returns out (batch, seqlen_q, nheads, d), softmax_lse (batch,
nheads, seqlen_q) float32, and two empty tensors."""
FIXED_BACKWARD_DOC = """\
Gradients of fwd: (dq, dk, dv, dlearnable_sink). softmax_lse and softmax_lse_grad (batch,
nheads, seqlen_q)."""

FORWARD_OPS: dict[Layout, Signature] = {
    Layout.VARLEN: Signature(
        "varlen_fwd",
        Layout.VARLEN,
        Direction.FORWARD,
        # block_table last: after the options, so that the positional contract (leading) and
        # the options' places are those of the unpaged call.
        (*_VARLEN_INPUTS, *_SCALE_AND_MASK, OTHER_OPTIONS, "block_table"),
        None,
        VARLEN_FORWARD_DOC,
    ),
    Layout.FIXED: Signature(
        "fwd",
        Layout.FIXED,
        Direction.FORWARD,
        (*_FIXED_INPUTS, *_SCALE_AND_MASK, OTHER_OPTIONS),
        None,
        FIXED_FORWARD_DOC,
    ),
}

BACKWARD_OPS: dict[Layout, Signature] = {
    Layout.VARLEN: Signature(
        "varlen_bwd",
        Layout.VARLEN,
        Direction.BACKWARD,
        (*_VARLEN_BACKWARD_INPUTS, *_BACKWARD_CONTROLS, OTHER_OPTIONS, "rng_state"),
        Direction.BACKWARD,
        VARLEN_BACKWARD_DOC,
    ),
    Layout.FIXED: Signature(
        "bwd",
        Layout.FIXED,
        Direction.BACKWARD,
        (*_BACKWARD_TENSORS, *_BACKWARD_CONTROLS, OTHER_OPTIONS, "rng_state"),
        Direction.BACKWARD,
        FIXED_BACKWARD_DOC,
    ),
}

# The extension's entry points: the ops' lists, the forward with only the options the forward
# reads, the backward with caller-provided gradient buffers.
EXTENSION_ENTRY_POINTS: tuple[Signature, ...] = (
    Signature(
        "varlen_fwd",
        Layout.VARLEN,
        Direction.FORWARD,
        FORWARD_OPS[Layout.VARLEN].order,
        Direction.FORWARD,
        VARLEN_FORWARD_DOC,
    ),
    Signature(
        "fwd",
        Layout.FIXED,
        Direction.FORWARD,
        FORWARD_OPS[Layout.FIXED].order,
        Direction.FORWARD,
        FIXED_FORWARD_DOC,
    ),
    Signature(
        "varlen_bwd",
        Layout.VARLEN,
        Direction.BACKWARD,
        (
            *_VARLEN_BACKWARD_INPUTS,
            *_BACKWARD_CONTROLS,
            *_GRADIENT_BUFFERS,
            OTHER_OPTIONS,
            "rng_state",
        ),
        Direction.BACKWARD,
        VARLEN_BACKWARD_DOC
        + " dq, dk, dv, when given, are written in place (rows past cu_seqlens[-1] or past "
        "the used lengths untouched); otherwise allocated, with those rows 0.",
    ),
    Signature(
        "bwd",
        Layout.FIXED,
        Direction.BACKWARD,
        (*_BACKWARD_TENSORS, *_BACKWARD_CONTROLS, *_GRADIENT_BUFFERS, OTHER_OPTIONS, "rng_state"),
        Direction.BACKWARD,
        FIXED_BACKWARD_DOC,
    ),
    # Inference only: no op, no autograd; flash_varlen/kvcache.py calls it.
    Signature(
        "kvcache_fwd",
        Layout.FIXED,
        Direction.FORWARD,
        (
            "q",
            "k_cache",
            "v_cache",
            "cache_seqlens",
            *_SCALE_AND_MASK,
            "block_table",
            "cache_batch_idx",
            "cache_leftpad",
            "num_splits",
            "k_new",
            "v_new",
            "rotary_cos",
            "rotary_sin",
            "rotary_interleaved",
            OTHER_OPTIONS,
        ),
        Direction.FORWARD,
        KVCACHE_FORWARD_DOC,
    ),
)
EXTENSION_ENTRY_POINT_BY_NAME: dict[str, Signature] = {
    signature.name: signature for signature in EXTENSION_ENTRY_POINTS
}
