"""The public API without a GPU: signatures, unsupported options, errors, and the registered
ops' fake implementations (shapes, dtypes, torch.export tracing) through fake CUDA tensors; the
backward ops' fakes on meta tensors. Tracing forward + backward of the public functions and the
backward's handling of gradients are in test_autograd_cpu.py.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_varlen
from flash_varlen import ops

EMPTY = inspect.Parameter.empty
NHEADS, NHEADS_K, HEAD_DIM = 4, 2, 64
TOTAL_Q, TOTAL_K, MAX_Q, MAX_K = 12, 10, 7, 6
BATCH, SEQLEN_Q, SEQLEN_K = 2, 5, 7

# flash-attn 2.7 (flash_attn/flash_attn_interface.py): names, order and defaults.
OPTIONS = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
VARLEN_TENSORS = ["cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
EXPECTED_SIGNATURES = {
    "flash_attn_func": [(n, EMPTY) for n in ("q", "k", "v")] + OPTIONS,
    "flash_attn_qkvpacked_func": [("qkv", EMPTY)] + OPTIONS,
    "flash_attn_kvpacked_func": [("q", EMPTY), ("kv", EMPTY)] + OPTIONS,
    "flash_attn_varlen_func": [(n, EMPTY) for n in ["q", "k", "v", *VARLEN_TENSORS]]
    + OPTIONS
    + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [
        (n, EMPTY) for n in ("qkv", "cu_seqlens", "max_seqlen")
    ]
    + OPTIONS,
    "flash_attn_varlen_kvpacked_func": [(n, EMPTY) for n in ["q", "kv", *VARLEN_TENSORS]]
    + OPTIONS,
}
FUNCTION_NAMES = list(EXPECTED_SIGNATURES)
VARLEN_NAMES = [name for name in FUNCTION_NAMES if "varlen" in name]


def fp16(*shape: int, device: str) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float16, device=device)


def positional_args(name: str, device: str = "cpu") -> tuple:
    """Valid positional arguments of each public function (valid except the device on CPU)."""
    cu_q = torch.tensor([0, 5, TOTAL_Q], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, TOTAL_K], dtype=torch.int32, device=device)
    return {
        "flash_attn_varlen_func": lambda: (
            fp16(TOTAL_Q, NHEADS, HEAD_DIM, device=device),
            fp16(TOTAL_K, NHEADS_K, HEAD_DIM, device=device),
            fp16(TOTAL_K, NHEADS_K, HEAD_DIM, device=device),
            cu_q,
            cu_k,
            MAX_Q,
            MAX_K,
        ),
        "flash_attn_varlen_qkvpacked_func": lambda: (
            fp16(TOTAL_Q, 3, NHEADS, HEAD_DIM, device=device),
            cu_q,
            MAX_Q,
        ),
        "flash_attn_varlen_kvpacked_func": lambda: (
            fp16(TOTAL_Q, NHEADS, HEAD_DIM, device=device),
            fp16(TOTAL_K, 2, NHEADS_K, HEAD_DIM, device=device),
            cu_q,
            cu_k,
            MAX_Q,
            MAX_K,
        ),
        "flash_attn_func": lambda: (
            fp16(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, device=device),
            fp16(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, device=device),
            fp16(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, device=device),
        ),
        "flash_attn_qkvpacked_func": lambda: (
            fp16(BATCH, SEQLEN_Q, 3, NHEADS, HEAD_DIM, device=device),
        ),
        "flash_attn_kvpacked_func": lambda: (
            fp16(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, device=device),
            fp16(BATCH, SEQLEN_K, 2, NHEADS_K, HEAD_DIM, device=device),
        ),
    }[name]()


def expected_shapes(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out shape, softmax_lse shape) of each function for positional_args(name)."""
    if name in VARLEN_NAMES:
        return (TOTAL_Q, NHEADS, HEAD_DIM), (NHEADS, TOTAL_Q)
    return (BATCH, SEQLEN_Q, NHEADS, HEAD_DIM), (BATCH, NHEADS, SEQLEN_Q)


def public(name: str) -> Callable:
    return getattr(flash_varlen, name)


def fake_cuda_supported() -> bool:
    try:
        with FakeTensorMode():
            torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError):
        return False
    return True


needs_fake_cuda = pytest.mark.skipif(
    not fake_cuda_supported(), reason="this torch cannot create fake CUDA tensors"
)


# --------------------------------------------------------------------------------------------
# Signatures and exports


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_signature_matches_flash_attn(name: str) -> None:
    params = inspect.signature(public(name)).parameters.values()
    assert [(p.name, p.default) for p in params] == EXPECTED_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_exports_and_version() -> None:
    assert flash_varlen.__version__ == "0.1.0"
    helpers = [
        "unpad_input",
        "pad_input",
        "cu_seqlens_from_lengths",
        "cu_seqlens_from_attention_mask",
        "cu_seqlens_from_position_ids",
    ]
    for name in [*FUNCTION_NAMES, *helpers, "reference"]:
        assert name in flash_varlen.__all__
        assert hasattr(flash_varlen, name)
    assert callable(flash_varlen.reference.attention_ref_varlen)
    assert callable(flash_varlen.reference.attention_ref)


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_docstring_documents_causal_alignment_and_returns(name: str) -> None:
    doc = inspect.getdoc(public(name))
    assert "1 1 1 1 0" in doc and "softmax_lse = -inf" in doc
    assert "(out, softmax_lse, None)" in doc
    assert "1 / sqrt(headdim)" in doc
    assert "{" not in doc  # every shared section was filled in


# --------------------------------------------------------------------------------------------
# Unsupported options and device errors (CPU tensors)

UNSUPPORTED_OPTIONS = [
    ("dropout_p", {"dropout_p": 0.1}),
    ("softcap", {"softcap": 30.0}),
    ("alibi_slopes", {"alibi_slopes": torch.ones(NHEADS)}),
    ("window_size", {"window_size": (16, -1)}),
    ("window_size", {"window_size": (16, 0), "causal": True}),
    ("window_size", {"window_size": (-1, 16)}),
]


@pytest.mark.parametrize("name", FUNCTION_NAMES)
@pytest.mark.parametrize(("option", "kwargs"), UNSUPPORTED_OPTIONS)
def test_unsupported_option_raises_not_implemented(name, option, kwargs) -> None:
    with pytest.raises(NotImplementedError, match=option):
        public(name)(*positional_args(name), **kwargs)


def test_block_table_raises_not_implemented() -> None:
    args = positional_args("flash_attn_varlen_func")
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_varlen.flash_attn_varlen_func(*args, block_table=torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_valid_cpu_inputs_raise_the_device_error(name: str) -> None:
    with pytest.raises(ValueError, match="must be a CUDA tensor, got device cpu"):
        public(name)(*positional_args(name))


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_deterministic_and_supported_options_pass_validation(name: str) -> None:
    """Supported values of every option reach the device check (the last one)."""
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        public(name)(
            *positional_args(name),
            dropout_p=0.0,
            softmax_scale=0.5,
            causal=True,
            window_size=(-1, -1),
            softcap=0.0,
            alibi_slopes=None,
            deterministic=True,
            return_attn_probs=True,
        )


# --------------------------------------------------------------------------------------------
# Fake implementations through the public functions (fake CUDA tensors, no GPU)


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_fake_outputs_have_the_documented_shapes(name: str) -> None:
    out_shape, lse_shape = expected_shapes(name)
    with FakeTensorMode():
        args = positional_args(name, device="cuda")
        out = public(name)(*args)
        out_again, lse, s_dmask = public(name)(*args, causal=True, return_attn_probs=True)
    assert isinstance(out, torch.Tensor)
    assert out.shape == out_shape and out.dtype == torch.float16 and out.device.type == "cuda"
    assert out_again.shape == out_shape
    assert lse.shape == lse_shape and lse.dtype == torch.float32 and lse.device.type == "cuda"
    assert s_dmask is None


@needs_fake_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_output_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        args = positional_args("flash_attn_varlen_func", device="cuda")
        q, k, v = (x.to(dtype) for x in args[:3])
        out = flash_varlen.flash_attn_varlen_func(q, k, v, *args[3:])
    assert out.dtype == dtype


class OpRecorder:
    """Stands in for a registered op and records how the interface called it."""

    def __init__(self, lse_shape: Callable[[torch.Tensor], tuple[int, ...]]) -> None:
        self.calls: list[tuple] = []
        self.lse_shape = lse_shape

    def __call__(self, *args):
        self.calls.append(args)
        q = args[0]
        return torch.empty_like(q), q.new_empty(self.lse_shape(q), dtype=torch.float32)


@pytest.fixture
def recorded_ops(monkeypatch) -> dict[str, OpRecorder]:
    recorders = {
        "varlen_fwd": OpRecorder(lambda q: (q.shape[1], q.shape[0])),
        "fwd": OpRecorder(lambda q: (q.shape[0], q.shape[2], q.shape[1])),
    }
    for op_name, recorder in recorders.items():
        monkeypatch.setattr(ops, op_name, recorder)
    return recorders


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_each_function_calls_its_op_once_with_default_scale(name, recorded_ops) -> None:
    with FakeTensorMode():
        public(name)(*positional_args(name, device="cuda"))
    expected_op, other_op = ("varlen_fwd", "fwd") if name in VARLEN_NAMES else ("fwd", "varlen_fwd")
    assert len(recorded_ops[expected_op].calls) == 1
    assert recorded_ops[other_op].calls == []
    *_, scale, causal, deterministic = recorded_ops[expected_op].calls[0]
    assert scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
    assert causal is False
    assert deterministic is False


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_deterministic_is_passed_to_the_op(name, recorded_ops) -> None:
    """The forward op carries the flag so that its backward can read it."""
    with FakeTensorMode():
        public(name)(*positional_args(name, device="cuda"), deterministic=True)
    op_name = "varlen_fwd" if name in VARLEN_NAMES else "fwd"
    assert recorded_ops[op_name].calls[0][-1] is True


@needs_fake_cuda
@pytest.mark.parametrize(
    ("causal", "window_size", "expected_causal"),
    [
        (False, (-1, 0), True),
        (True, (-1, -1), True),
        (True, (-1, 0), True),
        (False, (-1, -1), False),
    ],
)
def test_causal_window_is_normalized_before_the_op(
    recorded_ops, causal, window_size, expected_causal
) -> None:
    with FakeTensorMode():
        args = positional_args("flash_attn_varlen_func", device="cuda")
        flash_varlen.flash_attn_varlen_func(*args, causal=causal, window_size=window_size)
    assert recorded_ops["varlen_fwd"].calls[0][-2] is expected_causal


@needs_fake_cuda
def test_explicit_softmax_scale_is_passed_through(recorded_ops) -> None:
    with FakeTensorMode():
        flash_varlen.flash_attn_func(*positional_args("flash_attn_func", "cuda"), softmax_scale=0.3)
    assert recorded_ops["fwd"].calls[0][-3] == 0.3


@needs_fake_cuda
@pytest.mark.parametrize(
    ("name", "packed_index", "view_slots"),
    [
        ("flash_attn_varlen_qkvpacked_func", 0, (0, 1, 2)),
        ("flash_attn_varlen_kvpacked_func", 1, (1, 2)),
        ("flash_attn_qkvpacked_func", 0, (0, 1, 2)),
        ("flash_attn_kvpacked_func", 1, (1, 2)),
    ],
)
def test_packed_variants_pass_views_not_copies(
    recorded_ops, name, packed_index, view_slots
) -> None:
    op_name = "varlen_fwd" if name in VARLEN_NAMES else "fwd"
    with FakeTensorMode():
        args = positional_args(name, device="cuda")
        public(name)(*args)
    packed = args[packed_index]
    call = recorded_ops[op_name].calls[0]
    pack_dim = packed.dim() - 3
    for position, slot in enumerate(view_slots):
        tensor = call[slot]
        assert tensor._base is packed
        assert tensor.storage_offset() == position * packed.stride(pack_dim)


# --------------------------------------------------------------------------------------------
# torch.compile traceability: strict torch.export (full graph, no breaks) with fake CUDA inputs


class AllFunctions(torch.nn.Module):
    """Calls every public function once; inputs are the packed qkv / kv tensors."""

    def forward(self, qkv_varlen, cu_seqlens, kv_varlen, qkv_fixed, kv_fixed):
        q_varlen, q_fixed = qkv_varlen[:, 0], qkv_fixed[:, :, 0]
        k_varlen, v_varlen = kv_varlen[:, 0], kv_varlen[:, 1]
        return (
            flash_varlen.flash_attn_varlen_func(
                q_varlen, k_varlen, v_varlen, cu_seqlens, cu_seqlens, MAX_Q, MAX_K, causal=True
            ),
            flash_varlen.flash_attn_varlen_qkvpacked_func(qkv_varlen, cu_seqlens, MAX_Q),
            flash_varlen.flash_attn_varlen_kvpacked_func(
                q_varlen, kv_varlen, cu_seqlens, cu_seqlens, MAX_Q, MAX_K, return_attn_probs=True
            )[1],
            flash_varlen.flash_attn_func(q_fixed, kv_fixed[:, :, 0], kv_fixed[:, :, 1]),
            flash_varlen.flash_attn_qkvpacked_func(qkv_fixed, causal=True),
            flash_varlen.flash_attn_kvpacked_func(q_fixed, kv_fixed, window_size=(-1, 0)),
        )


@needs_fake_cuda
def test_strict_export_traces_every_function_without_graph_breaks() -> None:
    with FakeTensorMode():
        inputs = (
            fp16(TOTAL_Q, 3, NHEADS, HEAD_DIM, device="cuda"),
            torch.tensor([0, 5, TOTAL_Q], dtype=torch.int32, device="cuda"),
            fp16(TOTAL_Q, 2, NHEADS_K, HEAD_DIM, device="cuda"),
            fp16(BATCH, SEQLEN_Q, 3, NHEADS, HEAD_DIM, device="cuda"),
            fp16(BATCH, SEQLEN_K, 2, NHEADS_K, HEAD_DIM, device="cuda"),
        )
    total = torch.export.Dim("total", min=2)
    exported = torch.export.export(
        AllFunctions(),
        inputs,
        dynamic_shapes=({0: total}, None, {0: total}, None, None),
        strict=True,
    )
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.flash_varlen.varlen_fwd.default) == 3
    assert targets.count(torch.ops.flash_varlen.fwd.default) == 3
    output_node = next(node for node in exported.graph.nodes if node.op == "output")
    outputs = [node.meta["val"] for node in output_node.args[0]]
    assert outputs[2].shape[0] == NHEADS and outputs[2].dtype == torch.float32  # varlen lse
    assert tuple(outputs[3].shape) == (BATCH, SEQLEN_Q, NHEADS, HEAD_DIM)


# --------------------------------------------------------------------------------------------
# The ops directly on meta tensors (works with any torch build), forward and backward


def test_varlen_op_fake_on_meta_tensors() -> None:
    q = torch.empty(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.bfloat16, device="meta")
    k = torch.empty(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = ops.varlen_fwd(q, k, k, cu, cu, MAX_Q, MAX_K, 0.125, False)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (NHEADS, TOTAL_Q) and lse.dtype == torch.float32


def test_fixed_op_fake_on_meta_tensors() -> None:
    q = torch.empty(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k = torch.empty(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    out, lse = ops.fwd(q, k, k, 0.125, True)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (BATCH, NHEADS, SEQLEN_Q) and lse.dtype == torch.float32


def test_backward_op_fakes_on_meta_tensors() -> None:
    """dq like q, dk and dv like k and v (nheads_k heads), new contiguous tensors."""
    q = torch.empty(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k = torch.empty(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    lse = torch.empty(NHEADS, TOTAL_Q, dtype=torch.float32, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    varlen = ops.varlen_bwd(q, q, k, k, q, lse, cu, cu, MAX_Q, MAX_K, 0.125, False, True, lse)
    q_fixed = torch.empty(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k_fixed = torch.empty(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    lse_fixed = torch.empty(BATCH, NHEADS, SEQLEN_Q, dtype=torch.float32, device="meta")
    fixed = ops.bwd(q_fixed, q_fixed, k_fixed, k_fixed, q_fixed, lse_fixed, 0.125, True, False)
    for (dq, dk, dv), q_like, k_like in ((varlen, q, k), (fixed, q_fixed, k_fixed)):
        assert dq.shape == q_like.shape and dk.shape == dv.shape == k_like.shape
        assert dq.dtype == dk.dtype == dv.dtype == torch.float16
        assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()


@pytest.mark.parametrize("grad_of", ["out", "lse", "both"])
def test_backward_reaches_the_backward_op(grad_of: str) -> None:
    """Gradients of out, softmax_lse or both flow through varlen_bwd's fake on meta tensors."""
    q = torch.empty(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k = torch.empty(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    q.requires_grad_()
    k.requires_grad_()
    out, lse = ops.varlen_fwd(q, k, k, cu, cu, MAX_Q, MAX_K, 0.125, False)
    assert out.requires_grad and lse.requires_grad
    losses = {"out": out.float().sum(), "lse": lse.sum(), "both": out.float().sum() + lse.sum()}
    dq, dk = torch.autograd.grad(losses[grad_of], [q, k])
    assert dq.shape == q.shape and dk.shape == k.shape  # dk: gradients of k and v summed


def test_fixed_backward_reaches_the_backward_op() -> None:
    q = torch.empty(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    v = torch.empty(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    v.requires_grad_()
    out, _ = ops.fwd(q, v.detach(), v, 0.125, False)
    (dv,) = torch.autograd.grad(out.float().sum(), [v])
    assert dv.shape == v.shape and dv.dtype == torch.float16
