"""Every validation rule, exercised through the public functions with CPU tensors.

Device checks run last, so each broken input below raises its own error before the device
check would; the exception type and the argument named in the message are both asserted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_varlen
from flash_varlen import interface, validation
from flash_varlen.options import PUBLIC_OPTIONS

from cpu_checks import needs_fake_cuda, raises

NHEADS, NHEADS_K, HEAD_DIM = 4, 2, 64
SEQLENS_Q, SEQLENS_K = (5, 7), (4, 6)

Change = Callable[[dict], None]
CU_ONE = torch.zeros(1, dtype=torch.int32)


def varlen_args(device: str = "cpu", dtype: torch.dtype = torch.float16) -> dict:
    """Valid arguments of flash_attn_varlen_func (valid except for the device when on CPU)."""
    total_q, total_k = sum(SEQLENS_Q), sum(SEQLENS_K)
    return {
        "q": torch.zeros(total_q, NHEADS, HEAD_DIM, dtype=dtype, device=device),
        "k": torch.zeros(total_k, NHEADS_K, HEAD_DIM, dtype=dtype, device=device),
        "v": torch.zeros(total_k, NHEADS_K, HEAD_DIM, dtype=dtype, device=device),
        "cu_seqlens_q": torch.tensor([0, 5, 12], dtype=torch.int32, device=device),
        "cu_seqlens_k": torch.tensor([0, 4, 10], dtype=torch.int32, device=device),
        "max_seqlen_q": max(SEQLENS_Q),
        "max_seqlen_k": max(SEQLENS_K),
    }


def fixed_args(device: str = "cpu") -> dict:
    """Valid arguments of flash_attn_func (valid except for the device when on CPU)."""
    return {
        "q": torch.zeros(2, 5, NHEADS, HEAD_DIM, dtype=torch.float16, device=device),
        "k": torch.zeros(2, 7, NHEADS_K, HEAD_DIM, dtype=torch.float16, device=device),
        "v": torch.zeros(2, 7, NHEADS_K, HEAD_DIM, dtype=torch.float16, device=device),
    }


def misaligned_stride(shape: tuple[int, ...], pad: int) -> torch.Tensor:
    """A (.., head, d) view whose dim -2 stride is d + pad elements."""
    *lead, d = shape
    return torch.zeros(*lead, d + pad, dtype=torch.float16)[..., :d]


def offset_by(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    numel = torch.Size(shape).numel()
    return torch.zeros(numel + offset, dtype=torch.float16)[offset:].view(shape)


def head_count(name: str, other: str | None, count: int) -> Change:
    """Gives tensor ``name`` (and ``other``) ``count`` heads (dim -2)."""

    def change(args: dict) -> None:
        for key in filter(None, (name, other)):
            shape = list(args[key].shape)
            shape[-2] = count
            args[key] = torch.zeros(shape, dtype=args[key].dtype)

    return change


def batch_of(size: int) -> Change:
    """Gives the fixed-length q, k, v a batch of ``size``."""
    return lambda args: args.update({n: args[n][:size] for n in ("q", "k", "v")})


def case(name: str, change: Change, kind: type[Exception], *fragments: str):
    """One broken input: how to break valid arguments, the exception and its message parts."""
    return pytest.param(change, kind, fragments, id=name)


def setting(**values) -> Change:
    """Replaces arguments by fixed values."""
    return lambda args: args.update(values)


def replacing(name: str, transform: Callable[[torch.Tensor], object]) -> Change:
    """Replaces one tensor argument by a transform of it."""
    return lambda args: args.update({name: transform(args[name])})


def head_dim(size: int) -> Change:
    """Gives q, k and v the head dim ``size`` (new contiguous tensors)."""

    def change(args: dict) -> None:
        for name in ("q", "k", "v"):
            shape = (*args[name].shape[:-1], size)
            args[name] = torch.zeros(shape, dtype=args[name].dtype)

    return change


def unchanged(args: dict) -> None:
    """Valid arguments: on CPU only the device check fails."""


WINDOW_RULE = "window_size sides must be -1 (unbounded) or >= 0"
SOFTCAP_RULE = "softcap must be finite and >= 0 (0 disables it)"

VARLEN_CASES = [
    case("q not a tensor", setting(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    case("q fp32", replacing("q", torch.Tensor.float), TypeError, "q must have dtype", "float16"),
    case("k bf16", replacing("k", torch.Tensor.bfloat16), TypeError, "k must have the same dtype"),
    case("v float32", replacing("v", torch.Tensor.float), TypeError, "v must have the same dtype"),
    case("q rank 4", replacing("q", lambda t: t[None]), ValueError, "q must have 3 dims"),
    case("k rank 2", replacing("k", lambda t: t[:, 0]), ValueError, "k must have 3 dims"),
    case("v rank 4", replacing("v", lambda t: t[None]), ValueError, "v must have 3 dims"),
    case("head dim 60", head_dim(60), ValueError, "q.shape[-1]", "multiple of 8"),
    case("head dim 264", head_dim(264), ValueError, "q.shape[-1]", "and 256, got 264"),
    case("head dim 0", head_dim(0), ValueError, "q.shape[-1]", "between 8 and 256"),
    case(
        "k head dim differs",
        replacing("k", lambda t: t[..., :32].contiguous()),
        ValueError,
        "k.shape[-1]",
        "must equal q.shape[-1]",
    ),
    case(
        "v head dim differs",
        replacing("v", lambda t: t[..., :32].contiguous()),
        ValueError,
        "v.shape[-1]",
        "must equal q.shape[-1]",
    ),
    case(
        "nheads not a multiple of nheads_k",
        setting(q=torch.zeros(12, 3, HEAD_DIM, dtype=torch.float16)),
        ValueError,
        "nheads (q.shape[-2] = 3)",
        "multiple of nheads_k",
    ),
    case("zero kv heads", head_count("k", "v", 0), ValueError, "k.shape[-2] (nheads_k)"),
    case("v heads differ", replacing("v", lambda t: t[:, :1]), ValueError, "v.shape[-2]"),
    case("k, v totals differ", replacing("v", lambda t: t[:9]), ValueError, "v.shape[0] (total_k)"),
    case(
        "q last dim not contiguous",
        setting(q=torch.zeros(12, HEAD_DIM, NHEADS, dtype=torch.float16).transpose(1, 2)),
        ValueError,
        "q must be contiguous in its last dim",
    ),
    case(
        "k last dim not contiguous",
        setting(k=torch.zeros(10, HEAD_DIM, NHEADS_K, dtype=torch.float16).mT),
        ValueError,
        "k must be contiguous in its last dim",
    ),
    case(
        "q stride not a multiple of 8",
        setting(q=misaligned_stride((12, NHEADS, HEAD_DIM), pad=4)),
        ValueError,
        "q.stride(1) must be a multiple of 8",
    ),
    case(
        "v stride not a multiple of 8",
        setting(v=misaligned_stride((10, NHEADS_K, HEAD_DIM), pad=4)),
        ValueError,
        "v.stride(1) must be a multiple of 8",
    ),
    case(
        "k storage offset not a multiple of 8",
        setting(k=offset_by((10, NHEADS_K, HEAD_DIM), 4)),
        ValueError,
        "k.storage_offset() must be a multiple of 8",
    ),
    case(
        "cu_seqlens_q int64",
        replacing("cu_seqlens_q", torch.Tensor.long),
        TypeError,
        "cu_seqlens_q must have dtype torch.int32",
    ),
    case(
        "cu_seqlens_k not a tensor",
        setting(cu_seqlens_k=[0, 4, 10]),
        TypeError,
        "cu_seqlens_k must be a torch.Tensor",
    ),
    case(
        "cu_seqlens_k 2-D",
        replacing("cu_seqlens_k", lambda t: t[None]),
        ValueError,
        "cu_seqlens_k must be 1-D",
    ),
    case(
        "cu_seqlens_q too short",
        setting(cu_seqlens_q=CU_ONE, cu_seqlens_k=CU_ONE),
        ValueError,
        "cu_seqlens_q must have batch + 1 >= 2 entries",
    ),
    case(
        "cu_seqlens lengths differ",
        setting(cu_seqlens_k=torch.tensor([0, 4, 8, 10], dtype=torch.int32)),
        ValueError,
        "cu_seqlens_k must have the same length",
    ),
    case(
        "cu_seqlens_q not contiguous",
        setting(cu_seqlens_q=torch.tensor([0, 9, 5, 9, 12], dtype=torch.int32)[::2]),
        ValueError,
        "cu_seqlens_q must be contiguous",
    ),
    case("max_seqlen_q 0", setting(max_seqlen_q=0), ValueError, "max_seqlen_q must be positive"),
    case("max_seqlen_k -3", setting(max_seqlen_k=-3), ValueError, "max_seqlen_k must be positive"),
    case("max_seqlen_q bool", setting(max_seqlen_q=True), TypeError, "max_seqlen_q must be a"),
    case("max_seqlen_k float", setting(max_seqlen_k=6.0), TypeError, "max_seqlen_k must be a"),
    case(
        "max_seqlen_q device tensor",
        setting(max_seqlen_q=torch.tensor(7, device="meta")),
        TypeError,
        "max_seqlen_q must be a Python int",
        "would need a device read",
    ),
    case(
        "max_seqlen_k two-element tensor",
        setting(max_seqlen_k=torch.tensor([6, 6])),
        TypeError,
        "max_seqlen_k must be a Python int",
    ),
    case(
        "window side a device tensor",
        setting(window_size=torch.tensor([3, 1], device="meta")),
        TypeError,
        "window_size must be a pair of ints",
        "would need a device read",
    ),
    case(
        "window sides float tensor",
        setting(window_size=torch.tensor([3.0, 1.0])),
        TypeError,
        "window_size must be a pair of ints",
    ),
    case("scale nan", setting(softmax_scale=math.nan), ValueError, "softmax_scale must be finite"),
    case("scale inf", setting(softmax_scale=math.inf), ValueError, "softmax_scale must be finite"),
    case("scale 0", setting(softmax_scale=0.0), ValueError, "softmax_scale must be finite and pos"),
    case("scale < 0", setting(softmax_scale=-0.1), ValueError, "softmax_scale must be finite and pos"),
    case("scale str", setting(softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    case("causal str", setting(causal="yes"), TypeError, "causal must be a bool"),
    case("deterministic int", setting(deterministic=1), TypeError, "deterministic must be a bool"),
    case("window of 3", setting(window_size=(-1, -1, 0)), ValueError, "window_size must be a pair"),
    case("window floats", setting(window_size=(-1.0, -1)), TypeError, "window_size must be a pair"),
    case("window left -2", setting(window_size=(-2, 0)), ValueError, WINDOW_RULE, "(-2, 0)"),
    case("window right -5", setting(window_size=(4, -5)), ValueError, WINDOW_RULE, "(4, -5)"),
    case("window both < -1", setting(window_size=(-5, -2)), ValueError, WINDOW_RULE),
    case(
        "window below -1 with causal",
        setting(window_size=(-3, 7), causal=True),  # causal would replace right, not left
        ValueError,
        WINDOW_RULE,
    ),
    case("dropout 1", setting(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1), got 1.0"),
    case("dropout < 0", setting(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    case("dropout nan", setting(dropout_p=math.nan), ValueError, "dropout_p must be in [0, 1)"),
    case("dropout str", setting(dropout_p="0.1"), TypeError, "dropout_p must be a float, got str"),
    case("dropout bool", setting(dropout_p=True), TypeError, "dropout_p must be a float"),
    case("dropout None", setting(dropout_p=None), TypeError, "dropout_p must be a float"),
    case("softcap < 0", setting(softcap=-1.0), ValueError, SOFTCAP_RULE, "got -1.0"),
    case("softcap inf", setting(softcap=math.inf), ValueError, SOFTCAP_RULE),
    case("softcap nan", setting(softcap=math.nan), ValueError, SOFTCAP_RULE),
    case("softcap None", setting(softcap=None), TypeError, "softcap must be a float, got NoneType"),
    case("softcap tensor", setting(softcap=torch.tensor(5.0)), TypeError, "softcap must be a"),
    case(
        "alignment misspelled",
        setting(causal_alignment="top-left"),
        ValueError,
        "causal_alignment must be 'bottom_right' or 'top_left', got 'top-left'",
    ),
    case("alignment None", setting(causal_alignment=None), ValueError, "causal_alignment must be"),
    case(
        "slopes fp16",
        setting(alibi_slopes=torch.ones(NHEADS, dtype=torch.float16)),
        TypeError,
        "alibi_slopes must have dtype torch.float32, got torch.float16",
    ),
    case(
        "slopes fp64",
        setting(alibi_slopes=torch.ones(NHEADS, dtype=torch.float64)),
        TypeError,
        "alibi_slopes must have dtype torch.float32",
    ),
    case(
        "slopes a list",
        setting(alibi_slopes=[1.0] * NHEADS),
        TypeError,
        "alibi_slopes must be a torch.Tensor",
    ),
    case(
        "slopes per kv head",
        setting(alibi_slopes=torch.ones(NHEADS_K)),
        ValueError,
        "alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = (2, 4), got (2,)",
    ),
    case(
        "slopes batch 3",
        setting(alibi_slopes=torch.ones(3, NHEADS)),
        ValueError,
        "alibi_slopes must have shape",
        "got (3, 4)",
    ),
    case(
        "slopes 3-D",
        setting(alibi_slopes=torch.ones(2, NHEADS, 1)),
        ValueError,
        "alibi_slopes must have shape",
    ),
    case(
        "seqused_q int64",
        setting(seqused_q=torch.tensor([5, 7])),
        TypeError,
        "seqused_q must have dtype torch.int32, got torch.int64",
    ),
    case(
        "seqused_k a list",
        setting(seqused_k=[4, 6]),
        TypeError,
        "seqused_k must be a torch.Tensor",
    ),
    case(
        "seqused_k one per cu_seqlens entry",
        setting(seqused_k=torch.tensor([0, 4, 6], dtype=torch.int32)),
        ValueError,
        "seqused_k must have shape (batch,) = (2,)",
        "got (3,)",
    ),
    case(
        "seqused_q 2-D",
        setting(seqused_q=torch.tensor([[5, 7]], dtype=torch.int32)),
        ValueError,
        "seqused_q must be 1-D (batch,)",
    ),
    case(
        "sink bf16",
        setting(learnable_sink=torch.zeros(NHEADS, dtype=torch.bfloat16)),
        TypeError,
        "learnable_sink must have dtype torch.float32, got torch.bfloat16",
    ),
    case(
        "sink fp64",
        setting(learnable_sink=torch.zeros(NHEADS, dtype=torch.float64)),
        TypeError,
        "learnable_sink must have dtype torch.float32",
    ),
    case(
        "sink a list",
        setting(learnable_sink=[0.0] * NHEADS),
        TypeError,
        "learnable_sink must be a torch.Tensor",
    ),
    case(
        "sink a float",
        setting(learnable_sink=0.5),
        TypeError,
        "learnable_sink must be a torch.Tensor",
    ),
    case(
        "sink per kv head",
        setting(learnable_sink=torch.zeros(NHEADS_K)),
        ValueError,
        "learnable_sink must have shape (nheads,) = (4,)",
        "got (2,)",
    ),
    case(
        "sink per sequence",
        setting(learnable_sink=torch.zeros(2, NHEADS)),
        ValueError,
        "learnable_sink must be 1-D (nheads,) = (4,)",
    ),
    case(
        "sink 0-d",
        setting(learnable_sink=torch.tensor(0.0)),
        ValueError,
        "learnable_sink must be 1-D",
    ),
    case("q on CPU", unchanged, ValueError, "q must be a CUDA tensor"),
    case(
        "every variant option valid",
        setting(
            dropout_p=0.5,
            window_size=[0, 0],
            softcap=1,  # an int is a number too
            alibi_slopes=torch.ones(NHEADS, 2).t(),  # (2, NHEADS), any strides
            causal_alignment="top_left",
            seqused_q=torch.tensor([0, 7], dtype=torch.int32),
            seqused_k=torch.tensor([4, 0, 6, 0], dtype=torch.int32)[::2],  # any stride
            learnable_sink=torch.zeros(NHEADS),
        ),
        ValueError,
        "q must be a CUDA tensor",
    ),
]


@pytest.mark.parametrize(("change", "kind", "fragments"), VARLEN_CASES)
def test_varlen_validation(change, kind, fragments) -> None:
    args = varlen_args()
    change(args)
    with raises(kind, *fragments):
        flash_varlen.flash_attn_varlen_func(**args)


FIXED_CASES = [
    case("q float64", replacing("q", torch.Tensor.double), TypeError, "q must have dtype"),
    case("v bf16", replacing("v", torch.Tensor.bfloat16), TypeError, "v must have the same dtype"),
    case("q rank 3", replacing("q", lambda t: t[0]), ValueError, "q must have 4 dims"),
    case("k rank 5", replacing("k", lambda t: t[None]), ValueError, "k must have 4 dims"),
    case("head dim 12", head_dim(12), ValueError, "q.shape[-1]", "multiple of 8"),
    case("batch 0 is valid", batch_of(0), ValueError, "q must be a CUDA tensor"),
    case("k batch differs", replacing("k", lambda t: t[:1]), ValueError, "k.shape[0] (batch)"),
    case("v batch differs", replacing("v", lambda t: t[:1]), ValueError, "v.shape[0] (batch)"),
    case("v seqlen short", replacing("v", lambda t: t[:, :6]), ValueError, "v.shape[1] (seqlen_k)"),
    case("nheads 3 vs 2", head_count("q", None, 3), ValueError, "nheads (q.shape[-2] = 3)"),
    case(
        "q misaligned",
        setting(q=misaligned_stride((2, 5, NHEADS, HEAD_DIM), pad=6)),
        ValueError,
        "q.stride(2) must be a multiple of 8",
    ),
    case(
        "slopes batch 1 of 2",
        setting(alibi_slopes=torch.ones(1, NHEADS)),
        ValueError,
        "alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = (2, 4)",
    ),
    case(
        "slopes bf16",
        setting(alibi_slopes=torch.ones(NHEADS, dtype=torch.bfloat16)),
        TypeError,
        "alibi_slopes must have dtype torch.float32",
    ),
    case("window -3", setting(window_size=(-1, -3)), ValueError, WINDOW_RULE),
    case("dropout 2", setting(dropout_p=2), ValueError, "dropout_p must be in [0, 1)"),
    case("softcap < 0", setting(softcap=-0.5), ValueError, SOFTCAP_RULE),
    case("alignment", setting(causal_alignment="left"), ValueError, "causal_alignment must be"),
    case(
        "sink fp16",
        setting(learnable_sink=torch.zeros(NHEADS, dtype=torch.float16)),
        TypeError,
        "learnable_sink must have dtype torch.float32, got torch.float16",
    ),
    case(
        "sink per kv head",
        setting(learnable_sink=torch.zeros(NHEADS_K)),
        ValueError,
        "learnable_sink must have shape (nheads,) = (4,)",
    ),
    case("q on CPU", unchanged, ValueError, "q must be a CUDA tensor"),
    case(
        "per-sequence slopes valid",
        setting(alibi_slopes=torch.ones(2, NHEADS), dropout_p=0.1, window_size=(3, 3)),
        ValueError,
        "q must be a CUDA tensor",
    ),
    case(
        "sink valid",
        setting(learnable_sink=torch.zeros(NHEADS), causal=True),
        ValueError,
        "q must be a CUDA tensor",
    ),
]


@pytest.mark.parametrize(("change", "kind", "fragments"), FIXED_CASES)
def test_fixed_validation(change, kind, fragments) -> None:
    args = fixed_args()
    change(args)
    with raises(kind, *fragments):
        flash_varlen.flash_attn_func(**args)


def test_packed_shapes_are_checked_and_views_are_named() -> None:
    qkv = torch.zeros(12, 3, NHEADS, HEAD_DIM, dtype=torch.float16)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with raises(ValueError, "qkv must have shape (total, 3, nheads, headdim)"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv[:, :2], cu, 7)
    with raises(ValueError, "qkv must have shape (batch, seqlen, 3, nheads, headdim)"):
        flash_varlen.flash_attn_qkvpacked_func(qkv)
    with raises(ValueError, "kv must have shape (total_k, 2, nheads_k, headdim)"):
        flash_varlen.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv, cu, cu, 7, 7)
    with raises(ValueError, "kv must have shape (batch, seqlen_k, 2, nheads_k, headdim)"):
        flash_varlen.flash_attn_kvpacked_func(qkv[None, :, 0], qkv[None])
    with raises(TypeError, "qkv must be a torch.Tensor"):
        flash_varlen.flash_attn_qkvpacked_func("qkv")
    with raises(ValueError, "qkv[:, 0].shape[-1]"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv[..., :20], cu, 7)
    with raises(TypeError, "cu_seqlens must have dtype torch.int32"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu.long(), 7)
    with raises(ValueError, "max_seqlen must be positive"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu, 0)
    with raises(ValueError, "qkv[:, 0] must be a CUDA tensor"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu, 7)
    with raises(ValueError, "qkv[:, :, 0] must be a CUDA tensor"):
        flash_varlen.flash_attn_qkvpacked_func(qkv[None])
    kv = torch.zeros(10, 2, 3, HEAD_DIM, dtype=torch.float16)
    with raises(ValueError, "nheads (q.shape[-2] = 4)", "(kv[:, 0].shape[-2] = 3)"):
        flash_varlen.flash_attn_varlen_kvpacked_func(qkv[:, 0], kv, cu, cu, 7, 7)


def test_packed_views_with_aligned_head_dims_pass_layout_checks() -> None:
    """qkv[:, i] has offset i * nheads * d and strides multiple of 8: only the device fails."""
    qkv = torch.zeros(12, 3, NHEADS, 72, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with raises(ValueError, "must be a CUDA tensor"):
        flash_varlen.flash_attn_varlen_qkvpacked_func(qkv, cu, 7)


# --------------------------------------------------------------------------------------------
# Devices (fake CUDA tensors: no GPU needed)


@needs_fake_cuda
@pytest.mark.parametrize("name", ["k", "v", "cu_seqlens_q", "cu_seqlens_k"])
def test_tensor_on_another_device_than_q(name: str) -> None:
    with FakeTensorMode():
        args = varlen_args(device="cuda")
        args[name] = args[name].cpu()
        with raises(ValueError, f"{name} must be on the same device as q"):
            flash_varlen.flash_attn_varlen_func(**args)


@needs_fake_cuda
def test_fixed_length_v_on_another_device() -> None:
    with FakeTensorMode():
        args = fixed_args(device="cuda")
        args["v"] = args["v"].cpu()
        with raises(ValueError, "v must be on the same device as q"):
            flash_varlen.flash_attn_func(**args)


@needs_fake_cuda
@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("alibi_slopes", torch.ones(NHEADS)),
        ("seqused_q", torch.tensor([5, 7], dtype=torch.int32)),
        ("seqused_k", torch.tensor([4, 6], dtype=torch.int32)),
        ("learnable_sink", torch.zeros(NHEADS)),
    ],
)
def test_variant_tensor_on_another_device_than_q(name: str, tensor: torch.Tensor) -> None:
    with FakeTensorMode():
        args = varlen_args(device="cuda")
        with raises(ValueError, f"{name} must be on the same device as q"):
            flash_varlen.flash_attn_varlen_func(**args, **{name: tensor})
        if name in ("alibi_slopes", "learnable_sink"):  # the options of both layouts
            with raises(ValueError, f"{name} must be on the same device as q"):
                flash_varlen.flash_attn_func(**fixed_args(device="cuda"), **{name: tensor})


# --------------------------------------------------------------------------------------------
# Options


def op_arguments(**public_values) -> dict:
    """The op arguments of public option values given by keyword (the others at their public
    defaults), as flash_attn_varlen_func converts them."""
    values = {option.name: option.default for option in PUBLIC_OPTIONS}
    values.update(public_values)
    return validation.option_arguments(values, PUBLIC_OPTIONS)


@pytest.mark.parametrize(
    ("causal", "window_size", "expected"),
    [
        # expected: (causal, window_left, window_right) as the ops take them
        (False, (-1, -1), (False, -1, -1)),
        (True, (-1, -1), (True, -1, 0)),
        (True, (-1, 0), (True, -1, 0)),
        (False, (-1, 0), (True, -1, 0)),  # flash-attn: right = 0 with left = -1 is causal
        (False, [-1, -1], (False, -1, -1)),
        (True, (-1, 7), (True, -1, 0)),  # causal forces right = 0
        (True, (8, 7), (True, 8, 0)),  # ... and keeps left: a causal sliding window
        (False, (8, 0), (False, 8, 0)),  # the same mask, but not the unbounded causal one
        (False, (0, 0), (False, 0, 0)),  # each query sees only its diagonal key
        (False, (-1, 3), (False, -1, 3)),
        (False, (2, 3), (False, 2, 3)),
    ],
)
def test_causal_and_window_normalization(causal, window_size, expected) -> None:
    options = op_arguments(
        dropout_p=0.0,
        softmax_scale=None,
        causal=causal,
        window_size=window_size,
        softcap=0.0,
    )
    assert (options["causal"], options["window_left"], options["window_right"]) == expected


def test_option_arguments_are_every_option_in_the_ops_form() -> None:
    options = op_arguments(
        dropout_p=0,
        softmax_scale=0.5,
        causal=False,
        window_size=(4, 1),
        softcap=30,
        deterministic=True,
        causal_alignment="top_left",
    )
    assert options == {
        "dropout_p": 0.0,
        "softmax_scale": 0.5,
        "causal": False,
        "window_left": 4,
        "window_right": 1,
        "softcap": 30.0,
        "alibi_slopes": None,
        "deterministic": True,
        "return_dropout_mask": False,
        "causal_top_left": True,
        "seqused_q": None,
        "seqused_k": None,
        "learnable_sink": None,
        "block_table": None,  # paged K/V: an input of the varlen op, passed as given
    }
    assert type(options["softcap"]) is float and type(options["dropout_p"]) is float
    default = op_arguments()
    assert default["causal_top_left"] is False and default["deterministic"] is False
    assert default["softmax_scale"] is None  # resolved from the head dim with the tensors


@pytest.mark.parametrize(
    "window_size",
    [
        (np.int64(3), np.int32(1)),
        torch.tensor([3, 1]),
        (torch.tensor(3), torch.tensor([1])),
        [torch.tensor(3, dtype=torch.int16), 1],
    ],
    ids=["numpy ints", "tensor of two", "0-d and one-element tensors", "int16 tensor and int"],
)
def test_window_size_takes_what_operator_index_takes(window_size) -> None:
    """flash-attn's own tests pass window_size as a tensor of two ints: every integer that
    operator.index takes, and one-element integer CPU tensors, are read on the host."""
    options = op_arguments(window_size=window_size)
    assert (options["window_left"], options["window_right"]) == (3, 1)
    assert all(type(options[side]) is int for side in ("window_left", "window_right"))
    with raises(ValueError, "q must be a CUDA tensor"):
        flash_varlen.flash_attn_varlen_func(**varlen_args(), window_size=window_size)


@pytest.mark.parametrize("max_seqlen", [np.int64(7), torch.tensor(7), torch.tensor([7])])
def test_max_seqlen_takes_host_integers(max_seqlen) -> None:
    args = varlen_args()
    args["max_seqlen_q"] = max_seqlen
    with raises(ValueError, "q must be a CUDA tensor"):
        flash_varlen.flash_attn_varlen_func(**args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"causal": True, "window_size": (4, 0)},
        {"window_size": (16, 16)},
        {"window_size": (0, 0), "softcap": 50.0},
        {"dropout_p": 0.999, "alibi_slopes": torch.zeros(NHEADS)},
        {"causal": True, "causal_alignment": "top_left", "window_size": (-1, 2)},
    ],
)
def test_variants_pass_validation(kwargs) -> None:
    """Supported variant options reach the device check (the last rule)."""
    with raises(ValueError, "q must be a CUDA tensor"):
        flash_varlen.flash_attn_varlen_func(**varlen_args(), **kwargs)


@pytest.mark.parametrize(
    ("tensor", "readable"),
    [
        (torch.zeros(12, NHEADS, HEAD_DIM, dtype=torch.float16), True),
        (torch.zeros(12, 3, NHEADS, HEAD_DIM, dtype=torch.float16)[:, 1], True),  # packed view
        (torch.zeros(NHEADS, 12, HEAD_DIM, dtype=torch.bfloat16).transpose(0, 1), True),
        (torch.zeros(1, 1, 1, dtype=torch.float16).expand(12, NHEADS, HEAD_DIM), False),
        (torch.zeros(12, HEAD_DIM, NHEADS, dtype=torch.float16).transpose(1, 2), False),
        (misaligned_stride((12, NHEADS, HEAD_DIM), pad=4), False),
        (offset_by((12, NHEADS, HEAD_DIM), 4), False),
        # The odd stride belongs to a dim of size 1, so it never multiplies an index.
        (
            torch.zeros(12, HEAD_DIM, dtype=torch.float16).as_strided(
                (12, 1, HEAD_DIM), (HEAD_DIM, 3, 1)
            ),
            True,
        ),
    ],
)
def test_has_kernel_layout_applies_the_layout_rules(tensor, readable) -> None:
    """The predicate the backward uses on incoming gradients; same rules as the q/k/v checks."""
    assert validation.has_kernel_layout(tensor) is readable
    assert (validation.layout_problem(tensor, "x") is None) is readable


def test_resolve_softmax_scale() -> None:
    assert validation.resolve_softmax_scale(None, 64) == 0.125
    assert validation.resolve_softmax_scale(2, 64) == 2.0


# --------------------------------------------------------------------------------------------
# Debug mode: value checks of cu_seqlens and seqused (device-agnostic, so CPU tensors exercise
# them)


def check_values(cu_q: list[int], cu_k: list[int], max_q: int = 7, max_k: int = 6) -> None:
    args = varlen_args()
    validation.check_varlen_values(
        args["q"],
        args["k"],
        torch.tensor(cu_q, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
        max_q,
        max_k,
    )


def test_debug_values_accept_valid_cu_seqlens() -> None:
    check_values([0, 5, 12], [0, 4, 10])
    check_values([0, 0, 12], [0, 10, 10], max_q=12, max_k=10)  # empty sequences
    check_values([0, 5, 12], [0, 4, 10], max_q=100, max_k=100)  # overestimates are safe


@pytest.mark.parametrize(
    ("cu_q", "cu_k", "max_q", "max_k", "fragments"),
    [
        ([1, 5, 12], [0, 4, 10], 7, 6, ("cu_seqlens_q[0] must be 0",)),
        ([0, 5, 12], [2, 4, 10], 7, 6, ("cu_seqlens_k[0] must be 0",)),
        ([0, 8, 7, 12], [0, 4, 6, 10], 8, 6, ("cu_seqlens_q must be non-decreasing", "[2] = 7")),
        ([0, 5, 11], [0, 4, 10], 7, 6, ("cu_seqlens_q[-1] must equal q.shape[0] = 12",)),
        ([0, 5, 12], [0, 4, 9], 7, 6, ("cu_seqlens_k[-1] must equal k.shape[0] = 10",)),
        ([0, 5, 12], [0, 4, 10], 6, 6, ("max_seqlen_q = 6 is smaller", "sequence 1 has length 7")),
        ([0, 5, 12], [0, 4, 10], 7, 5, ("max_seqlen_k = 5 is smaller", "sequence 1 has length 6")),
    ],
)
def test_debug_values_reject(cu_q, cu_k, max_q, max_k, fragments) -> None:
    with raises(ValueError, *fragments):
        check_values(cu_q, cu_k, max_q, max_k)


def check_seqused(seqused_q: list[int] | None, seqused_k: list[int] | None) -> None:
    """Debug value checks with cu_seqlens_q = [0, 5, 12] and cu_seqlens_k = [0, 4, 10]."""
    args = varlen_args()
    validation.check_varlen_values(
        args["q"],
        args["k"],
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
        7,
        6,
        seqused_q=None if seqused_q is None else torch.tensor(seqused_q, dtype=torch.int32),
        seqused_k=None if seqused_k is None else torch.tensor(seqused_k, dtype=torch.int32),
    )


def test_debug_values_accept_seqused_within_the_slots() -> None:
    check_seqused([5, 7], [4, 6])  # the whole slots
    check_seqused([0, 3], None)
    check_seqused(None, [0, 0])


@pytest.mark.parametrize(
    ("seqused_q", "seqused_k", "fragments"),
    [
        ([5, 8], None, ("seqused_q[1] = 8 must be in [0, 7]", "slot in cu_seqlens_q")),
        ([-1, 7], None, ("seqused_q[0] = -1 must be in [0, 5]",)),
        (None, [5, 6], ("seqused_k[0] = 5 must be in [0, 4]", "slot in cu_seqlens_k")),
    ],
)
def test_debug_values_reject_seqused_past_the_slot(seqused_q, seqused_k, fragments) -> None:
    with raises(ValueError, *fragments):
        check_seqused(seqused_q, seqused_k)


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, False), ("0", False), ("", False), ("1", True), ("true", True)]
)
def test_debug_env_var_is_read_at_call_time(monkeypatch, value, enabled) -> None:
    if value is None:
        monkeypatch.delenv(validation.DEBUG_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(validation.DEBUG_ENV_VAR, value)
    assert validation.debug_enabled() is enabled


@needs_fake_cuda
@pytest.mark.parametrize("debug", [False, True])
def test_public_function_runs_value_checks_only_in_debug_mode(monkeypatch, debug) -> None:
    """Without debug mode nothing reads cu_seqlens (fake tensors would fail on a read)."""
    calls = []
    monkeypatch.setattr(
        validation, "check_varlen_values", lambda *a, **kw: calls.append((a, kw))
    )
    if debug:
        monkeypatch.setenv(validation.DEBUG_ENV_VAR, "1")
    else:
        monkeypatch.delenv(validation.DEBUG_ENV_VAR, raising=False)
    with FakeTensorMode():
        seqused_k = torch.tensor([4, 6], dtype=torch.int32, device="cuda")
        interface.flash_attn_varlen_func(**varlen_args(device="cuda"), seqused_k=seqused_k)
    assert len(calls) == int(debug)
    if debug:
        ((_, kwargs),) = calls
        assert kwargs["seqused_k"] is seqused_k and kwargs["seqused_q"] is None
