"""The attention options, declared once.

``OPTIONS`` declares every option the registered ops and the extension take besides the tensors
of the layout (softmax_scale, causal, the variants, ...): its type, default, which directions'
kernels read it, whether it exists only in the variable-length layout, and its rule.
``PUBLIC_OPTIONS`` declares the option parameters of the public functions, in flash-attn 2.x's
order, and how each becomes op arguments. From these two follow:

- the registered ops' signatures, their fakes' parameters and the autograd context: what the
  forward saves and hands to the backward (``ops.py``, ``signatures.py``);
- the public functions' option parameters and their documentation (``interface.py``);
- the checks of the public values (the converters below; tensor rules in ``validation.py``);
- the extension's side: ``csrc/generate.py`` writes the C++ options struct, the checks of each
  rule, and the four pybind11 entry points from this module (``csrc/generated/``).

Adding an option: declare it in ``OPTIONS`` (and in ``PUBLIC_OPTIONS`` when users pass it; a
keyword-only option that is passed through unchanged is ``PublicOption.keyword(option)``), run
``python csrc/generate.py``, then give the kernels a params field for it
(``csrc/kernels/common/flash_params.h``, filled in ``csrc/bindings/kernel_params.cpp``) and
read it there.
"""

from __future__ import annotations

import enum
import math
import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen.contract import UNBOUNDED_WINDOW_SIDE
from flash_varlen.errors import error

BOTTOM_RIGHT = "bottom_right"
TOP_LEFT = "top_left"
CAUSAL_ALIGNMENTS = (BOTTOM_RIGHT, TOP_LEFT)
# Unbounded on the left, nothing to the right of the diagonal: the causal mask as a window.
CAUSAL_WINDOW = (UNBOUNDED_WINDOW_SIDE, 0)


class Kind(enum.Enum):
    """The type of a parameter, as each layer spells it."""

    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    TENSOR = "Tensor"
    OPTIONAL_TENSOR = "Tensor?"

    @property
    def annotation(self) -> str:
        """Python annotation (torch.library infers the op schema from it: int -> SymInt)."""
        return {
            Kind.FLOAT: "float",
            Kind.INT: "int",
            Kind.BOOL: "bool",
            Kind.TENSOR: "torch.Tensor",
            Kind.OPTIONAL_TENSOR: "torch.Tensor | None",
        }[self]

    @property
    def is_tensor(self) -> bool:
        return self in (Kind.TENSOR, Kind.OPTIONAL_TENSOR)


class Direction(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


BOTH_DIRECTIONS = frozenset(Direction)


class _Required:
    """The default of an option every call must pass."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Range:
    """A numeric rule: the value lies in an interval, and is finite where ``finite`` says so.

    ``phrase`` completes "<name> must be ..." in both layers' messages. ``holds`` is False for
    NaN whatever the bounds.
    """

    phrase: str
    low: float
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = False
    finite: bool = False

    def holds(self, value: float) -> bool:
        if self.finite and not math.isfinite(value):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        if self.high is None:
            return bool(above)
        below = value <= self.high if self.high_inclusive else value < self.high
        return bool(above and below)


@dataclass(frozen=True)
class TensorRule:
    """A tensor option's dtype (a torch dtype name) and its allowed shapes.

    Each shape lists sizes by name ("batch", "nheads"), resolved per call. ``note`` follows the
    shape in messages. Any strides: the extension makes the tensor contiguous (it is small).
    """

    dtype: str
    shapes: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Option:
    """One option as the registered ops and the extension take it.

    ``readers``: the directions whose kernels read it. The forward op takes every option, so
    that autograd can save the ones the backward reads; the extension's forward entry points
    take only those the forward reads, and the backward ones those the backward reads.
    ``varlen_only``: absent from the fixed-length layout. ``rule``: what a value must satisfy
    (checked by both layers; None: any value of the kind). ``differentiable``: a tensor option
    that receives a gradient: the backward entries return one for it (empty when it is not
    given), after dq, dk and dv, in declaration order.
    """

    name: str
    kind: Kind
    doc: str
    default: Any = REQUIRED
    readers: frozenset[Direction] = BOTH_DIRECTIONS
    varlen_only: bool = False
    rule: Range | TensorRule | None = None
    differentiable: bool = False

    def __post_init__(self) -> None:
        # The backward computes the gradient, so it must receive the value.
        assert not self.differentiable or (
            self.kind is Kind.OPTIONAL_TENSOR and self.read_by(Direction.BACKWARD)
        ), f"{self.name}: a differentiable option is an optional tensor the backward reads"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def read_by(self, direction: Direction) -> bool:
        return direction in self.readers


WINDOW_SIDE_RULE = Range("-1 (unbounded) or >= 0", low=UNBOUNDED_WINDOW_SIDE)

OPTIONS: tuple[Option, ...] = (
    Option(
        "softmax_scale",
        Kind.FLOAT,
        "Scale of q.k before the softmax.",
        rule=Range("finite and positive", low=0.0, low_inclusive=False, finite=True),
    ),
    Option("causal", Kind.BOOL, "Causal mask: window_right is 0 whatever was passed."),
    Option(
        "deterministic",
        Kind.BOOL,
        "Order the dQ accumulation so that dq is bitwise reproducible.",
        default=False,
        readers=frozenset({Direction.BACKWARD}),
    ),
    Option(
        "window_left",
        Kind.INT,
        "Keys visible left of the diagonal; -1 unbounded.",
        default=UNBOUNDED_WINDOW_SIDE,
        rule=WINDOW_SIDE_RULE,
    ),
    Option(
        "window_right",
        Kind.INT,
        "Keys visible right of the diagonal; -1 unbounded.",
        default=UNBOUNDED_WINDOW_SIDE,
        rule=WINDOW_SIDE_RULE,
    ),
    Option(
        "softcap",
        Kind.FLOAT,
        "Soft-capping of the scaled scores, softcap * tanh(s / softcap); 0 disables it.",
        default=0.0,
        rule=Range("finite and >= 0 (0 disables it)", low=0.0, finite=True),
    ),
    Option(
        "alibi_slopes",
        Kind.OPTIONAL_TENSOR,
        "ALiBi slopes, float32 (nheads,) or (batch, nheads); bias -slope * |i + offset - j|.",
        default=None,
        rule=TensorRule("float32", (("nheads",), ("batch", "nheads"))),
    ),
    Option(
        "seqused_q",
        Kind.OPTIONAL_TENSOR,
        "Used query rows of each sequence's slot, int32 (batch,).",
        default=None,
        varlen_only=True,
        rule=TensorRule("int32", (("batch",),), note="one entry per sequence"),
    ),
    Option(
        "seqused_k",
        Kind.OPTIONAL_TENSOR,
        "Used keys of each sequence's slot, int32 (batch,).",
        default=None,
        varlen_only=True,
        rule=TensorRule("int32", (("batch",),), note="one entry per sequence"),
    ),
    Option(
        "causal_top_left",
        Kind.BOOL,
        "Align the diagonal top-left (key i for query i) instead of bottom-right.",
        default=False,
    ),
    Option(
        "dropout_p",
        Kind.FLOAT,
        "Attention dropout probability.",
        default=0.0,
        rule=Range("in [0, 1)", low=0.0, high=1.0),
    ),
    Option(
        "return_dropout_mask",
        Kind.BOOL,
        "Also return the dropout pattern (testing only; dropout_p > 0).",
        default=False,
        readers=frozenset({Direction.FORWARD}),
    ),
    Option(
        "learnable_sink",
        Kind.OPTIONAL_TENSOR,
        "Per-head sink logits, float32 (nheads,): one more softmax logit per row, with no value.",
        default=None,
        rule=TensorRule("float32", (("nheads",),), note="one logit per query head"),
        differentiable=True,
    ),
)

OPTION_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}


# --------------------------------------------------------------------------------------------
# Public forms


class Scope(enum.Enum):
    """Which public functions take a public option."""

    ALL = "all"
    # Variable-length functions with a q separate from k and v (not qkv-packed).
    VARLEN_SEPARATE_Q = "varlen, q separate"
    # flash_attn_varlen_func alone (flash-attn's own placement of block_table).
    VARLEN_UNPACKED = "varlen, unpacked"


# (value, every public value of the call by name) -> the values of the op arguments it sets.
Converter = Callable[[Any, Mapping[str, Any]], tuple[Any, ...]]


@dataclass(frozen=True)
class PublicOption:
    """An option parameter of the public functions.

    ``sets``: the op arguments (``OPTIONS`` names, or an op input: block_table) that ``convert``
    gives values to, after checking the value (it raises TypeError / ValueError /
    NotImplementedError naming the parameter). ``flash_attn``: one of flash-attn 2.x's
    positional parameters, declared in its order; otherwise keyword-only. ``doc``: the
    docstring entry (indented by the functions). Tensor values pass through unchanged here:
    their rules need the call's sizes and are checked with the tensors
    (``validation.check_tensor_option``).
    """

    name: str
    annotation: str
    default: Any
    sets: tuple[str, ...]
    convert: Converter
    doc: str
    flash_attn: bool = True
    scope: Scope = Scope.ALL

    @classmethod
    def keyword(cls, option: Option, doc: str, scope: Scope = Scope.ALL) -> PublicOption:
        """A keyword-only public option passed to the op argument of the same name unchanged
        (after its kind's type check and its rule)."""
        annotation = option.kind.annotation
        if option.default is None and not option.kind.is_tensor:
            annotation += " | None"
        return cls(
            option.name,
            annotation,
            option.default,
            (option.name,),
            lambda value, _: (checked_value(option, value, option.name),),
            doc,
            flash_attn=False,
            scope=scope,
        )


def _number(value: Any, name: str, expected: str = "a float") -> float:
    """value as a float; TypeError unless it is a real number (a bool is not one here)."""
    if type(value) is float:  # the common case first: the ABC check below costs a microsecond
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(error(f"{name} must be {expected}, got {type(value).__name__}."))
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(error(f"{name} must be a bool, got {type(value).__name__}."))
    return value


def host_int(value: Any, name: str, expected: str) -> int:
    """An integer argument read on the host: anything ``operator.index`` takes (Python and
    numpy ints), including a one-element integer tensor on the CPU; a bool is not one. A tensor
    on another device is refused: reading it would synchronize with that device."""
    if type(value) is int:  # the common case first
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(
                error(
                    f"{name} must be {expected}; a {value.device.type} tensor would need a "
                    f"device read, got one."
                )
            )
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(error(f"{name} must be {expected}, got {_describe(value)}."))
        return int(value.item())
    if isinstance(value, bool):
        raise TypeError(error(f"{name} must be {expected}, got bool."))
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(error(f"{name} must be {expected}, got {_describe(value)}.")) from None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_rule(option: Option, value: Any, name: str) -> None:
    """ValueError naming ``name`` when a scalar value breaks the option's Range."""
    if isinstance(option.rule, Range) and not option.rule.holds(value):
        raise ValueError(error(f"{name} must be {option.rule.phrase}, got {value}."))


def checked_value(option: Option, value: Any, name: str) -> Any:
    """A public value for ``option``: its kind's type checked (numbers converted), its Range
    checked. Tensor values pass unchanged (see PublicOption)."""
    if option.kind is Kind.FLOAT:
        value = _number(value, name)
    elif option.kind is Kind.INT:
        value = host_int(value, name, "an int")
    elif option.kind is Kind.BOOL:
        value = _flag(value, name)
    check_rule(option, value, name)
    return value


def _dropout(value: Any, _: Mapping[str, Any]) -> tuple[float]:
    return (checked_value(OPTION_BY_NAME["dropout_p"], value, "dropout_p"),)


def _softmax_scale(value: Any, _: Mapping[str, Any]) -> tuple[float | None]:
    """None stays None: the scale defaults to 1 / sqrt(headdim) once the tensors are checked."""
    if value is None:
        return (None,)
    value = _number(value, "softmax_scale", "a float or None")
    # The kernels take the row maximum of the unscaled scores, which is only the maximum of the
    # scaled scores for a positive scale.
    check_rule(OPTION_BY_NAME["softmax_scale"], value, "softmax_scale")
    return (value,)


def effective_window(window_size: Any, causal: bool) -> tuple[int, int]:
    """(left, right) of ``window_size`` after ``causal`` forced right = 0 (as flash-attn).

    Each side may be anything ``host_int`` takes (flash-attn's own tests pass a tensor of two
    ints).
    """
    if type(window_size) is tuple and len(window_size) == 2:  # the common case first
        left, right = window_size
        if type(left) is int and type(right) is int and left >= WINDOW_SIDE_RULE.low <= right:
            return left, 0 if causal else right
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(
            error(f"window_size must be a pair (left, right) of ints, got {window_size!r}.")
        ) from None
    expected = "a pair of ints"
    left = host_int(left, "window_size", expected)
    right = host_int(right, "window_size", expected)
    if not (WINDOW_SIDE_RULE.holds(left) and WINDOW_SIDE_RULE.holds(right)):
        raise ValueError(
            error(f"window_size sides must be {WINDOW_SIDE_RULE.phrase}, got {(left, right)}.")
        )
    return left, 0 if causal else right


def _causal(value: Any, public: Mapping[str, Any]) -> tuple[bool]:
    """The window (-1, 0) given without causal is exactly the causal mask: the flag lets the
    kernels treat it as one."""
    causal = _flag(value, "causal")
    return (causal or effective_window(public["window_size"], causal) == CAUSAL_WINDOW,)


def _window(value: Any, public: Mapping[str, Any]) -> tuple[int, int]:
    return effective_window(value, _flag(public["causal"], "causal"))


def _softcap(value: Any, _: Mapping[str, Any]) -> tuple[float]:
    return (checked_value(OPTION_BY_NAME["softcap"], value, "softcap"),)


def _tensor(value: Any, _: Mapping[str, Any]) -> tuple[Any]:
    return (value,)


def _deterministic(value: Any, _: Mapping[str, Any]) -> tuple[bool]:
    return (_flag(value, "deterministic"),)


def _return_attn_probs(value: Any, _: Mapping[str, Any]) -> tuple[bool]:
    return (_flag(value, "return_attn_probs"),)


def _causal_alignment(value: Any, _: Mapping[str, Any]) -> tuple[bool]:
    if value not in CAUSAL_ALIGNMENTS:
        raise ValueError(
            error(f"causal_alignment must be {BOTTOM_RIGHT!r} or {TOP_LEFT!r}, got {value!r}.")
        )
    return (value == TOP_LEFT,)


PUBLIC_OPTIONS: tuple[PublicOption, ...] = (
    PublicOption(
        "dropout_p",
        "float",
        0.0,
        ("dropout_p",),
        _dropout,
        """\
dropout_p: float in [0, 1). Attention dropout: each probability is dropped with
    probability dropout_p and the kept ones are scaled by 1 / (1 - dropout_p);
    softmax_lse never sees dropout. The mask comes from a counter-based RNG (Philox)
    whose seed and offset are drawn from PyTorch's default CUDA generator, so
    torch.manual_seed makes runs reproducible and CUDA-graph capture is safe; the
    backward regenerates the same mask instead of storing it. Pass 0.0 for evaluation.""",
    ),
    PublicOption(
        "softmax_scale",
        "float | None",
        None,
        ("softmax_scale",),
        _softmax_scale,
        """\
softmax_scale: float > 0. Scale of q @ k^T before the softmax. Default
    1 / sqrt(headdim).""",
    ),
    PublicOption(
        "causal",
        "bool",
        False,
        ("causal",),
        _causal,
        "causal: bool. Causal mask, aligned as causal_alignment says (drawn above).",
    ),
    PublicOption(
        "window_size",
        "Sequence[int]",
        (UNBOUNDED_WINDOW_SIDE, UNBOUNDED_WINDOW_SIDE),
        ("window_left", "window_right"),
        _window,
        """\
window_size: (left, right), ints, each -1 (unbounded) or >= 0 (anything operator.index
    takes, also a CPU tensor of two ints). Sliding window: query i sees key j iff
    ``i + offset - left <= j <= i + offset + right`` (offset as drawn above).
    causal=True forces right = 0 and keeps left; a causal window of w keys (Mistral's)
    is (w - 1, 0), and (-1, 0) is the causal mask. Key blocks wholly outside the window
    are skipped, so the cost scales with the window.""",
    ),
    PublicOption(
        "softcap",
        "float",
        0.0,
        ("softcap",),
        _softcap,
        """\
softcap: float >= 0, finite. 0 disables it; otherwise each score s (after
    softmax_scale) becomes ``softcap * tanh(s / softcap)``, before ALiBi and masking
    (Gemma 2's logit soft-capping).""",
    ),
    PublicOption(
        "alibi_slopes",
        "torch.Tensor | None",
        None,
        ("alibi_slopes",),
        _tensor,
        """\
alibi_slopes: None, or float32 of shape (nheads,) or (batch, nheads) (one row per
    sequence) on q's device. Adds ``-slope[h] * |i + offset - j|`` to the scores of
    head h, after softcap. Not differentiable: no gradient reaches the slopes.""",
    ),
    PublicOption(
        "deterministic",
        "bool",
        False,
        ("deterministic",),
        _deterministic,
        """\
deterministic: bool. Whether the backward pass is bitwise reproducible run to run.
    The forward pass and the gradients of k and v always are (fixed summation order,
    no atomics). The gradient of q is accumulated with fp32 atomic adds across key
    blocks, so with False it may differ in the last bits between runs; True orders
    those adds and makes it reproducible too, at some speed cost. The ordered path is
    also taken while ``torch.use_deterministic_algorithms(True)`` is on, as for
    PyTorch's own ops. Dropout masks are reproducible either way.""",
    ),
    PublicOption(
        "return_attn_probs",
        "bool",
        False,
        ("return_dropout_mask",),
        _return_attn_probs,
        "return_attn_probs: bool. Also return softmax_lse and S_dmask (see Returns).",
    ),
    PublicOption(
        "block_table",
        "torch.Tensor | None",
        None,
        ("block_table",),
        _tensor,
        """\
block_table: None, or int32 (batch, max_pages) on q's device: paged K/V (paged
    prefill, flash-attn's meaning). k and v are then page pools (num_pages, page_size,
    nheads_k, headdim) of one shape, any page_size >= 1, and key j of sequence b is row
    j % page_size of page block_table[b, j // page_size]; sequence b has
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys (seqused_k[b] when given): cu_seqlens_k
    only counts keys, it places none. max_pages * page_size must be at least
    max_seqlen_k; entries past a sequence's used pages are never read, the others
    must lie in [0, num_pages) (FLASH_VARLEN_DEBUG=1 checks it; otherwise a page out
    of range is clamped into the pool, never read outside it). Forward only: a call
    whose inputs need gradients raises NotImplementedError.""",
        scope=Scope.VARLEN_UNPACKED,
    ),
    PublicOption(
        "causal_alignment",
        "str",
        BOTTOM_RIGHT,
        ("causal_top_left",),
        _causal_alignment,
        """\
causal_alignment: "bottom_right" (default, flash-attn) or "top_left" (PyTorch's
    is_causal), keyword-only. Where the diagonal lies (drawn above) for causal, the
    window and ALiBi.""",
        flash_attn=False,
    ),
    PublicOption(
        "seqused_q",
        "torch.Tensor | None",
        None,
        ("seqused_q",),
        _tensor,
        """\
seqused_q: None, or (batch,) int32 on q's device, keyword-only. Sequence b uses only
    the first seqused_q[b] query rows of its slot (cu_seqlens_q[b] to
    cu_seqlens_q[b + 1]); the rest of the slot is neither read nor written: out and
    softmax_lse keep whatever their allocation held there, and the gradients of q there
    are 0. Each entry must lie in [0, slot length] (FLASH_VARLEN_DEBUG=1 checks it).""",
        flash_attn=False,
        scope=Scope.VARLEN_SEPARATE_Q,
    ),
    PublicOption(
        "seqused_k",
        "torch.Tensor | None",
        None,
        ("seqused_k",),
        _tensor,
        """\
seqused_k: None, or (batch,) int32 on q's device, keyword-only. Sequence b uses only
    the first seqused_k[b] keys and values of its slot (e.g. a preallocated cache filled
    partway); the rest is never read, and the gradients of k and v there are 0. Same
    bounds. Everything else (the causal diagonal, the window, ALiBi) uses the used
    lengths, as if the sequences had been truncated to them.""",
        flash_attn=False,
        scope=Scope.VARLEN_SEPARATE_Q,
    ),
    PublicOption.keyword(
        OPTION_BY_NAME["learnable_sink"],
        """\
learnable_sink: None, or float32 (nheads,) on q's device, keyword-only; differentiable.
    Attention sinks (gpt-oss): each row of head h gets one more logit, sink[h], that has
    no value vector: ``P_ij = exp(s_ij) / (exp(sink[h]) + sum_j exp(s_ij))`` over the
    visible keys (s after softmax_scale, softcap and ALiBi) and ``out = P @ V``, so a
    row's weights sum to less than 1. softmax_lse includes the sink; a row that sees no
    key gets out 0 and softmax_lse = sink[h] (not -inf). Rows outside the used ranges
    (seqused_q) take part in no softmax. Dropout drops key probabilities only.""",
    ),
)
