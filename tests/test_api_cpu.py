"""The public API without a GPU: signatures, errors, how the options reach the registered ops,
and the ops' fake implementations (shapes, dtypes, torch.export tracing) through fake CUDA
tensors; the backward ops' fakes on meta tensors. Tracing forward + backward of the public
functions and the backward's handling of gradients are in test_autograd_cpu.py; the validation
rules of each option in test_validation_cpu.py.
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

from cpu_checks import needs_fake_cuda

EMPTY = inspect.Parameter.empty
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
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
# Functions whose q is separate from k and v, so that seqused_q / seqused_k apply.
SEQUSED_NAMES = ["flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func"]
# flash_varlen's own options, keyword-only after flash-attn's.
EXPECTED_KEYWORD_ONLY = {
    name: [("causal_alignment", "bottom_right")]
    + ([("seqused_q", None), ("seqused_k", None)] if name in SEQUSED_NAMES else [])
    + [("learnable_sink", None)]
    for name in FUNCTION_NAMES
}


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


# --------------------------------------------------------------------------------------------
# Signatures and exports


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_signature_matches_flash_attn(name: str) -> None:
    """flash-attn's parameters, in its order, then flash_varlen's keyword-only ones."""
    params = inspect.signature(public(name)).parameters.values()
    shared = [p for p in params if p.kind is not KEYWORD_ONLY]
    own = [p for p in params if p.kind is KEYWORD_ONLY]
    assert [(p.name, p.default) for p in shared] == EXPECTED_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in shared)
    assert [(p.name, p.default) for p in own] == EXPECTED_KEYWORD_ONLY[name]


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
def test_docstring_documents_causal_alignment_options_and_returns(name: str) -> None:
    doc = inspect.getdoc(public(name))
    # Both alignments, drawn side by side: the bottom-right and top-left rows of seqlen_q = 2.
    assert "bottom_right    top_left" in doc
    assert "1 1 1 1 0       1 0 0 0 0" in doc and "softmax_lse = -inf" in doc
    assert "(out, softmax_lse, S_dmask)" in doc and "sign bit" in doc
    assert "1 / sqrt(headdim)" in doc
    options = (
        "dropout_p", "window_size", "softcap", "alibi_slopes", "causal_alignment", "learnable_sink"
    )
    for option in options:
        assert f"\n    {option}: " in doc  # listed under Arguments
    assert "torch.manual_seed" in doc and "Not differentiable" in doc
    assert ("\n    seqused_q: " in doc) is (name in SEQUSED_NAMES)
    assert "{" not in doc  # every shared section was filled in


# --------------------------------------------------------------------------------------------
# Options and device errors (CPU tensors)


def variant_options(name: str, device: str = "cpu") -> dict:
    """Valid non-default values of every variant option that ``name`` accepts."""
    options = {
        "dropout_p": 0.1,
        "window_size": (16, 0),
        "softcap": 30.0,
        "alibi_slopes": torch.ones(BATCH, NHEADS, device=device),
        "causal_alignment": "top_left",
    }
    if name in SEQUSED_NAMES:
        options["seqused_q"] = torch.tensor([3, 7], dtype=torch.int32, device=device)
        options["seqused_k"] = torch.tensor([4, 0], dtype=torch.int32, device=device)
    return options


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_every_variant_option_passes_validation(name: str) -> None:
    """Supported values of every option reach the device check (the last rule)."""
    with pytest.raises(ValueError, match="must be a CUDA tensor, got device cpu"):
        public(name)(*positional_args(name), causal=True, **variant_options(name))


@pytest.mark.parametrize("name", [n for n in FUNCTION_NAMES if n not in SEQUSED_NAMES])
@pytest.mark.parametrize("seqused", ["seqused_q", "seqused_k"])
def test_seqused_is_not_an_argument_without_separate_q(name: str, seqused: str) -> None:
    """The fixed-length functions have no slots, and qkvpacked has one cu_seqlens for q and k."""
    used = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{seqused}'"):
        public(name)(*positional_args(name), **{seqused: used})


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_valid_cpu_inputs_raise_the_device_error(name: str) -> None:
    with pytest.raises(ValueError, match="must be a CUDA tensor, got device cpu"):
        public(name)(*positional_args(name))


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_deterministic_and_neutral_options_pass_validation(name: str) -> None:
    """The neutral value of every option reaches the device check (the last one)."""
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
            causal_alignment="bottom_right",
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
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_fake_s_dmask_with_dropout(name: str) -> None:
    """(batch, nheads, max_seqlen_q, max_seqlen_k rounded up to 128) in q's dtype; None
    without dropout even when asked for."""
    with FakeTensorMode():
        args = positional_args(name, device="cuda")
        _, _, s_dmask = public(name)(*args, dropout_p=0.25, return_attn_probs=True)
        _, _, without_dropout = public(name)(*args, dropout_p=0.0, return_attn_probs=True)
        out = public(name)(*args, dropout_p=0.25)
    assert s_dmask.shape == (BATCH, NHEADS, 128, 128)  # every length here is below 128
    assert s_dmask.dtype == torch.float16 and s_dmask.device.type == "cuda"
    assert without_dropout is None
    assert isinstance(out, torch.Tensor) and out.shape == expected_shapes(name)[0]


@needs_fake_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_output_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        args = positional_args("flash_attn_varlen_func", device="cuda")
        q, k, v = (x.to(dtype) for x in args[:3])
        out = flash_varlen.flash_attn_varlen_func(q, k, v, *args[3:])
    assert out.dtype == dtype


class OpRecorder:
    """Stands in for a registered forward op: records each call's arguments by parameter name
    (defaults filled in) and returns what the op's fake implementation returns."""

    def __init__(self, fake: Callable) -> None:
        self.fake = fake
        self.calls: list[dict[str, object]] = []

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(self.fake).bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(dict(bound.arguments))
        return self.fake(*args, **kwargs)


@pytest.fixture
def recorded_ops(monkeypatch) -> dict[str, OpRecorder]:
    recorders = {
        "varlen_fwd": OpRecorder(ops._varlen_fwd_fake),
        "fwd": OpRecorder(ops._fwd_fake),
    }
    for op_name, recorder in recorders.items():
        monkeypatch.setattr(ops, op_name, recorder)
    return recorders


def op_name_of(name: str) -> str:
    return "varlen_fwd" if name in VARLEN_NAMES else "fwd"


# The forward ops' variant arguments when the public function gets no option.
DEFAULT_VARIANT_ARGUMENTS = {
    "window_left": -1,
    "window_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "causal_top_left": False,
    "dropout_p": 0.0,
    "return_dropout_mask": False,
}


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_each_function_calls_its_op_once_with_default_scale(name, recorded_ops) -> None:
    with FakeTensorMode():
        public(name)(*positional_args(name, device="cuda"))
    expected_op = op_name_of(name)
    other_op = "fwd" if expected_op == "varlen_fwd" else "varlen_fwd"
    assert len(recorded_ops[expected_op].calls) == 1
    assert recorded_ops[other_op].calls == []
    call = recorded_ops[expected_op].calls[0]
    assert call["softmax_scale"] == pytest.approx(1 / math.sqrt(HEAD_DIM))
    assert call["causal"] is False
    assert call["deterministic"] is False
    assert {key: call[key] for key in DEFAULT_VARIANT_ARGUMENTS} == DEFAULT_VARIANT_ARGUMENTS
    if name in VARLEN_NAMES:
        assert call["seqused_q"] is None and call["seqused_k"] is None


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_deterministic_is_passed_to_the_op(name, recorded_ops) -> None:
    """The forward op carries the flag so that its backward can read it."""
    with FakeTensorMode():
        public(name)(*positional_args(name, device="cuda"), deterministic=True)
    assert recorded_ops[op_name_of(name)].calls[0]["deterministic"] is True


@needs_fake_cuda
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_variant_options_reach_the_op(name, recorded_ops) -> None:
    with FakeTensorMode():
        options = variant_options(name, device="cuda")
        _, _, s_dmask = public(name)(
            *positional_args(name, device="cuda"), return_attn_probs=True, **options
        )
    (call,) = recorded_ops[op_name_of(name)].calls
    # window_size=(16, 0) without causal: 16 keys back and none ahead, not the causal mask.
    assert (call["causal"], call["window_left"], call["window_right"]) == (False, 16, 0)
    assert call["softcap"] == 30.0 and call["dropout_p"] == 0.1
    assert call["alibi_slopes"] is options["alibi_slopes"]
    assert call["causal_top_left"] is True
    assert call["return_dropout_mask"] is True
    if name in SEQUSED_NAMES:
        assert call["seqused_q"] is options["seqused_q"]
        assert call["seqused_k"] is options["seqused_k"]
    elif name in VARLEN_NAMES:
        assert call["seqused_q"] is None and call["seqused_k"] is None
    assert s_dmask.shape == (BATCH, NHEADS, 128, 128)  # the op's s_dmask, returned as S_dmask


@needs_fake_cuda
@pytest.mark.parametrize(
    ("causal", "window_size", "expected"),
    [
        # (causal, window_left, window_right) as the op receives them
        (False, (-1, 0), (True, -1, 0)),  # the causal mask spelled as a window
        (True, (-1, -1), (True, -1, 0)),
        (True, (-1, 0), (True, -1, 0)),
        (False, (-1, -1), (False, -1, -1)),
        (True, (16, 8), (True, 16, 0)),  # causal forces right = 0 and keeps left
        (True, (16, -1), (True, 16, 0)),
        (False, (16, 0), (False, 16, 0)),
        (False, (0, 0), (False, 0, 0)),
        (False, (-1, 5), (False, -1, 5)),
        (False, (3, 5), (False, 3, 5)),
    ],
)
@pytest.mark.parametrize("name", ["flash_attn_varlen_func", "flash_attn_func"])
def test_causal_and_window_are_normalized_before_the_op(
    recorded_ops, name, causal, window_size, expected
) -> None:
    with FakeTensorMode():
        args = positional_args(name, device="cuda")
        public(name)(*args, causal=causal, window_size=window_size)
    call = recorded_ops[op_name_of(name)].calls[0]
    assert (call["causal"], call["window_left"], call["window_right"]) == expected


@needs_fake_cuda
@pytest.mark.parametrize(("alignment", "top_left"), [("bottom_right", False), ("top_left", True)])
def test_causal_alignment_becomes_the_top_left_flag(recorded_ops, alignment, top_left) -> None:
    with FakeTensorMode():
        args = positional_args("flash_attn_varlen_qkvpacked_func", device="cuda")
        flash_varlen.flash_attn_varlen_qkvpacked_func(
            *args, causal=True, causal_alignment=alignment
        )
    assert recorded_ops["varlen_fwd"].calls[0]["causal_top_left"] is top_left


@needs_fake_cuda
def test_explicit_softmax_scale_is_passed_through(recorded_ops) -> None:
    with FakeTensorMode():
        flash_varlen.flash_attn_func(*positional_args("flash_attn_func", "cuda"), softmax_scale=0.3)
    assert recorded_ops["fwd"].calls[0]["softmax_scale"] == 0.3


@needs_fake_cuda
@pytest.mark.parametrize(
    ("name", "packed_index", "view_names"),
    [
        ("flash_attn_varlen_qkvpacked_func", 0, ("q", "k", "v")),
        ("flash_attn_varlen_kvpacked_func", 1, ("k", "v")),
        ("flash_attn_qkvpacked_func", 0, ("q", "k", "v")),
        ("flash_attn_kvpacked_func", 1, ("k", "v")),
    ],
)
def test_packed_variants_pass_views_not_copies(
    recorded_ops, name, packed_index, view_names
) -> None:
    with FakeTensorMode():
        args = positional_args(name, device="cuda")
        public(name)(*args)
    packed = args[packed_index]
    call = recorded_ops[op_name_of(name)].calls[0]
    pack_dim = packed.dim() - 3
    for position, view_name in enumerate(view_names):
        tensor = call[view_name]
        assert tensor._base is packed
        assert tensor.storage_offset() == position * packed.stride(pack_dim)


# --------------------------------------------------------------------------------------------
# torch.compile traceability: strict torch.export (full graph, no breaks) with fake CUDA inputs


class AllFunctions(torch.nn.Module):
    """Calls every public function once, with variant options in three of them; inputs are the
    packed qkv / kv tensors, ALiBi slopes and seqused."""

    def forward(self, qkv_varlen, cu_seqlens, kv_varlen, qkv_fixed, kv_fixed, slopes, seqused):
        q_varlen, q_fixed = qkv_varlen[:, 0], qkv_fixed[:, :, 0]
        k_varlen, v_varlen = kv_varlen[:, 0], kv_varlen[:, 1]
        _, lse, s_dmask = flash_varlen.flash_attn_varlen_kvpacked_func(
            q_varlen,
            kv_varlen,
            cu_seqlens,
            cu_seqlens,
            MAX_Q,
            MAX_K,
            dropout_p=0.1,
            return_attn_probs=True,
        )
        return (
            flash_varlen.flash_attn_varlen_func(
                q_varlen,
                k_varlen,
                v_varlen,
                cu_seqlens,
                cu_seqlens,
                MAX_Q,
                MAX_K,
                causal=True,
                window_size=(3, 0),
                softcap=5.0,
                alibi_slopes=slopes,
                causal_alignment="top_left",
                seqused_q=seqused,
                seqused_k=seqused,
            ),
            flash_varlen.flash_attn_varlen_qkvpacked_func(qkv_varlen, cu_seqlens, MAX_Q),
            lse,
            flash_varlen.flash_attn_func(
                q_fixed, kv_fixed[:, :, 0], kv_fixed[:, :, 1], alibi_slopes=slopes[0]
            ),
            flash_varlen.flash_attn_qkvpacked_func(qkv_fixed, causal=True),
            flash_varlen.flash_attn_kvpacked_func(q_fixed, kv_fixed, window_size=(-1, 0)),
            s_dmask,
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
            torch.ones(BATCH, NHEADS, device="cuda"),
            torch.tensor([4, 6], dtype=torch.int32, device="cuda"),
        )
    total = torch.export.Dim("total", min=2)
    exported = torch.export.export(
        AllFunctions(),
        inputs,
        dynamic_shapes=({0: total}, None, {0: total}, None, None, None, None),
        strict=True,
    )
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.flash_varlen.varlen_fwd.default) == 3
    assert targets.count(torch.ops.flash_varlen.fwd.default) == 3
    output_node = next(node for node in exported.graph.nodes if node.op == "output")
    outputs = [node.meta["val"] for node in output_node.args[0]]
    assert outputs[2].shape[0] == NHEADS and outputs[2].dtype == torch.float32  # varlen lse
    assert tuple(outputs[3].shape) == (BATCH, SEQLEN_Q, NHEADS, HEAD_DIM)
    assert tuple(outputs[6].shape) == (BATCH, NHEADS, 128, 128)  # S_dmask
    # The variant options are constants of the graph, in the ops' own argument form.
    varlen_calls = [
        dict(zip((argument.name for argument in node.target._schema.arguments), node.args))
        for node in exported.graph.nodes
        if node.target == torch.ops.flash_varlen.varlen_fwd.default
    ]
    with_dropout, with_variants, _ = varlen_calls
    assert (with_dropout["dropout_p"], with_dropout["return_dropout_mask"]) == (0.1, True)
    assert (with_variants["window_left"], with_variants["window_right"]) == (3, 0)
    assert (with_variants["softcap"], with_variants["causal_top_left"]) == (5.0, True)
    assert with_variants["alibi_slopes"].name == "slopes"


# --------------------------------------------------------------------------------------------
# The ops directly on meta tensors (works with any torch build), forward and backward


def meta(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_varlen_op_fake_on_meta_tensors() -> None:
    q = meta(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    k = meta(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16)
    cu = meta(3, dtype=torch.int32)
    out, lse, s_dmask, rng_state = ops.varlen_fwd(q, k, k, cu, cu, MAX_Q, MAX_K, 0.125, False)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (NHEADS, TOTAL_Q) and lse.dtype == torch.float32
    # Without dropout: both empty.
    assert s_dmask.shape == (0,) and s_dmask.dtype == torch.bfloat16
    assert rng_state.shape == (0,) and rng_state.dtype == torch.int64


def test_fixed_op_fake_on_meta_tensors() -> None:
    q = meta(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM)
    k = meta(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM)
    out, lse, s_dmask, rng_state = ops.fwd(q, k, k, 0.125, True)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (BATCH, NHEADS, SEQLEN_Q) and lse.dtype == torch.float32
    assert s_dmask.shape == (0,) and rng_state.shape == (0,)


@pytest.mark.parametrize(
    ("max_seqlen_q", "max_seqlen_k", "rounded_q", "rounded_k"),
    [(MAX_Q, MAX_K, 128, 128), (128, 129, 128, 256), (300, 1, 384, 128)],
)
def test_varlen_op_fake_dropout_outputs(max_seqlen_q, max_seqlen_k, rounded_q, rounded_k) -> None:
    """s_dmask (batch, nheads, max_seqlen_q and max_seqlen_k rounded up to 128) in q's dtype
    only with dropout and return_dropout_mask; rng_state (seed, offset) with any dropout."""
    q = meta(TOTAL_Q, NHEADS, HEAD_DIM)
    k = meta(TOTAL_K, NHEADS_K, HEAD_DIM)
    cu = meta(4, dtype=torch.int32)  # batch 3
    args = (q, k, k, cu, cu, max_seqlen_q, max_seqlen_k, 0.125, False)
    *_, s_dmask, rng_state = ops.varlen_fwd(*args, dropout_p=0.5, return_dropout_mask=True)
    assert s_dmask.shape == (3, NHEADS, rounded_q, rounded_k) and s_dmask.dtype == q.dtype
    assert rng_state.shape == (2,) and rng_state.dtype == torch.int64
    *_, s_dmask, rng_state = ops.varlen_fwd(*args, dropout_p=0.5)
    assert s_dmask.shape == (0,) and rng_state.shape == (2,)
    *_, s_dmask, rng_state = ops.varlen_fwd(*args, return_dropout_mask=True)
    assert s_dmask.shape == (0,) and rng_state.shape == (0,)


def test_fixed_op_fake_dropout_outputs() -> None:
    q = meta(BATCH, 200, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    k = meta(BATCH, 5, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16)
    *_, s_dmask, rng_state = ops.fwd(q, k, k, 0.125, False, dropout_p=0.1, return_dropout_mask=True)
    assert s_dmask.shape == (BATCH, NHEADS, 256, 128) and s_dmask.dtype == torch.bfloat16
    assert rng_state.shape == (2,) and rng_state.dtype == torch.int64


def test_backward_op_fakes_on_meta_tensors() -> None:
    """dq like q, dk and dv like k and v (nheads_k heads), new contiguous tensors; the variant
    arguments are accepted by name."""
    q = torch.empty(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k = torch.empty(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    lse = torch.empty(NHEADS, TOTAL_Q, dtype=torch.float32, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    slopes = meta(NHEADS, dtype=torch.float32)
    rng_state = meta(2, dtype=torch.int64)
    variants = dict(
        window_left=4,
        window_right=0,
        softcap=2.0,
        alibi_slopes=slopes,
        causal_top_left=True,
        dropout_p=0.5,
        rng_state=rng_state,
    )
    varlen = ops.varlen_bwd(
        *(q, q, k, k, q, lse, cu, cu, MAX_Q, MAX_K, 0.125, False, True, lse),
        seqused_q=meta(2, dtype=torch.int32),
        seqused_k=meta(2, dtype=torch.int32),
        **variants,
    )
    q_fixed = torch.empty(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k_fixed = torch.empty(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    lse_fixed = torch.empty(BATCH, NHEADS, SEQLEN_Q, dtype=torch.float32, device="meta")
    fixed = ops.bwd(
        q_fixed, q_fixed, k_fixed, k_fixed, q_fixed, lse_fixed, 0.125, True, False, **variants
    )
    for (dq, dk, dv, dsink), q_like, k_like in ((varlen, q, k), (fixed, q_fixed, k_fixed)):
        assert dq.shape == q_like.shape and dk.shape == dv.shape == k_like.shape
        assert dq.dtype == dk.dtype == dv.dtype == torch.float16
        assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
        # No learnable_sink: its gradient is an empty float32 placeholder.
        assert dsink.shape == (0,) and dsink.dtype == torch.float32
    *_, dsink = ops.bwd(
        q_fixed, q_fixed, k_fixed, k_fixed, q_fixed, lse_fixed, 0.125, True, False,
        learnable_sink=meta(NHEADS, dtype=torch.float32),
    )
    assert dsink.shape == (NHEADS,) and dsink.dtype == torch.float32


@pytest.mark.parametrize("grad_of", ["out", "lse", "both"])
def test_backward_reaches_the_backward_op(grad_of: str) -> None:
    """Gradients of out, softmax_lse or both flow through varlen_bwd's fake on meta tensors."""
    q = torch.empty(TOTAL_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    k = torch.empty(TOTAL_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    q.requires_grad_()
    k.requires_grad_()
    out, lse, s_dmask, rng_state = ops.varlen_fwd(q, k, k, cu, cu, MAX_Q, MAX_K, 0.125, False)
    assert out.requires_grad and lse.requires_grad
    assert not s_dmask.requires_grad and not rng_state.requires_grad
    losses = {"out": out.float().sum(), "lse": lse.sum(), "both": out.float().sum() + lse.sum()}
    dq, dk = torch.autograd.grad(losses[grad_of], [q, k])
    assert dq.shape == q.shape and dk.shape == k.shape  # dk: gradients of k and v summed


def test_fixed_backward_reaches_the_backward_op() -> None:
    q = torch.empty(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float16, device="meta")
    v = torch.empty(BATCH, SEQLEN_K, NHEADS_K, HEAD_DIM, dtype=torch.float16, device="meta")
    v.requires_grad_()
    out, *_ = ops.fwd(q, v.detach(), v, 0.125, False)
    (dv,) = torch.autograd.grad(out.float().sum(), [v])
    assert dv.shape == v.shape and dv.dtype == torch.float16
