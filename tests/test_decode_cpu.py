"""The decode family's host logic on the CPU: the split heuristic and workspace sizes (the C++
header itself, compiled here with the host compiler), the family's declaration and generated
instantiations, which kernel serves a KV-cache call, and flash_attn_with_kvcache routed through
the decode path with the kernel replaced by the float32 reference.

The kernels themselves run in tests/test_kvcache_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

import flash_varlen
from accuracy import FORWARD_FACTOR, assert_lse_within_tolerance, assert_within_tolerance
from host_cpp import compile_host_driver
from flash_varlen import kvcache, kvcache_decode, reference, validation
from flash_varlen.kvcache_validation import check_kvcache_inputs
from test_kvcache_cpu import call_args, int32, paged_args, raises, reference_sequence

ROOT = Path(__file__).resolve().parents[1]
HEURISTIC_HEADER = ROOT / "csrc" / "kernels" / "decode" / "split_heuristic.h"
H200_SMS = 132
CTAS_PER_SM = 2  # the d = 128 decode kernel: 2 x about 100 KB of shared memory per SM
KEYS_PER_BLOCK = 64  # decode_kernel_traits.h's kBlockN
MAX_SPLITS = 64
MIN_BLOCKS_PER_SPLIT = 4

# ----------------------------------------------------------------------------------------------
# The split heuristic and the workspace, from the C++ header


DRIVER = r"""
#include <cstdio>
#include "kernels/decode/split_heuristic.h"
using namespace flash_varlen::decode;
int main() {
    long long ctas, blocks; int sms, per_sm, requested, bucket; long long rows;
    while (std::scanf("%lld %lld %d %d %d %lld %d", &ctas, &blocks, &sms, &per_sm, &requested,
                      &rows, &bucket) == 7) {
        const SplitProblem p{ctas, blocks, sms, per_sm};
        const int splits = resolve_num_splits(requested, p);
        const long long bytes = split_workspace(splits, rows, bucket).bytes();
        std::printf("[%d, %lld]\n", splits, bytes);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def heuristic(tmp_path_factory):
    """resolve_num_splits and split_workspace of split_heuristic.h, compiled with the host C++
    compiler: a function (ctas, key_blocks, requested=0, rows=1, bucket=128, sms, per_sm) ->
    (splits, workspace bytes)."""
    binary = compile_host_driver(tmp_path_factory, "heuristic", DRIVER)

    def run(ctas, key_blocks, requested=0, rows=1, bucket=128, sms=H200_SMS, per_sm=CTAS_PER_SM):
        line = f"{ctas} {key_blocks} {sms} {per_sm} {requested} {rows} {bucket}\n"
        result = subprocess.run([binary], input=line, capture_output=True, text=True, check=True)
        return tuple(json.loads(result.stdout))

    return run


def ctas_of(batch: int, nheads_k: int = 8, row_blocks: int = 1) -> int:
    return batch * nheads_k * row_blocks


def key_blocks(cache_length: int) -> int:
    return -(-cache_length // KEYS_PER_BLOCK)


@pytest.mark.parametrize("batch, length", [(64, 2048), (128, 8192)])
def test_a_call_that_fills_the_gpu_runs_one_split(heuristic, batch: int, length: int) -> None:
    """64 x 2k and 128 x 8k (GQA 32/8): 512 and 1024 CTAs for 264 slots already."""
    assert heuristic(ctas_of(batch), key_blocks(length)) == (1, 0)


def test_few_long_requests_split_to_fill_the_waves(heuristic) -> None:
    """16 x 32k, 8 KV heads: 128 CTAs fill 48% of 264 slots; 2 splits fill 97%, the smallest
    count within 0.85 of the best wave efficiency."""
    assert heuristic(ctas_of(16), key_blocks(32768))[0] == 2


def test_one_request_one_head_splits_near_the_cap(heuristic) -> None:
    """1 CTA for 264 slots: within the cap every count stays in one wave, the best is kMaxSplits
    (64 / 264 of the slots) and the smallest count within 0.85 of it is 55 (55 / 264 >=
    0.85 * 64 / 264 > 54 / 264)."""
    assert heuristic(1, key_blocks(1 << 20))[0] == 55


def test_splits_keep_enough_key_blocks_each(heuristic) -> None:
    """A short cache is not split below kMinBlocksPerSplit blocks per split."""
    blocks = 3 * MIN_BLOCKS_PER_SPLIT
    assert heuristic(1, blocks)[0] == blocks // MIN_BLOCKS_PER_SPLIT
    assert heuristic(1, 1)[0] == 1
    assert heuristic(0, 100)[0] == 1


def test_requested_splits_are_honoured_within_the_key_blocks(heuristic) -> None:
    assert heuristic(ctas_of(128), key_blocks(8192), requested=3)[0] == 3
    assert heuristic(ctas_of(128), 2, requested=8)[0] == 2  # every split owns a block
    assert heuristic(ctas_of(128), 10_000, requested=1000)[0] == MAX_SPLITS


@pytest.mark.parametrize("bucket", [64, 128])
def test_workspace_holds_partial_outputs_and_lse(heuristic, bucket: int) -> None:
    rows = 16 * 32 * 1  # batch * nheads * seqlen_q
    splits, size = heuristic(1, 1000, requested=5, rows=rows, bucket=bucket)
    assert (splits, size) == (5, 5 * rows * (bucket + 1) * 4)
    assert heuristic(1, 1000, requested=1, rows=rows, bucket=bucket) == (1, 0)


# ----------------------------------------------------------------------------------------------
# The family's declaration and instantiations


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_for_decode", ROOT / "csrc" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_family_instantiates_one_file_per_dtype_and_bucket() -> None:
    gen = load_generator()
    names = sorted(i.relative_path for i in gen.all_instantiations() if i.family == "decode")
    assert names == [
        "decode/decode_bf16_hdim128.cu",
        "decode/decode_bf16_hdim64.cu",
        "decode/decode_fp16_hdim128.cu",
        "decode/decode_fp16_hdim64.cu",
    ]
    text = (ROOT / "csrc" / "instantiations" / "decode" / "decode_bf16_hdim128.cu").read_text()
    assert "KernelRegistration<FlashDecodeParams>" in text
    assert "decode::decode_workspace_size<cutlass::bfloat16_t, 128>" in text
    assert "&decode::decode_unsupported_option" in text


def test_decode_family_builds_for_sm80_and_sm90_without_wgmma_targets() -> None:
    family = next(f for f in load_generator().kernel_families.FAMILIES if f.name == "decode")
    assert set(family.targets) == {"80", "90"}
    assert all("90a" not in target.gencode() for target in family.targets.values())
    assert list(family.directions) == ["decode"]
    assert family.local_variants == (False,)


# ----------------------------------------------------------------------------------------------
# Which kernel serves a call


SHARED_OPTION_DEFAULTS = {
    "softmax_scale": None,
    "causal": False,
    "window_size": (-1, -1),
    "softcap": 0.0,
    "alibi_slopes": None,
    "learnable_sink": None,
}


def checked(args: dict):
    """The KVCacheCall of flash_attn_with_kvcache's arguments (options not given: defaults)."""
    options = {name: args.get(name, default) for name, default in SHARED_OPTION_DEFAULTS.items()}
    fields = (
        "q k_cache v_cache k v rotary_cos rotary_sin cache_seqlens cache_batch_idx cache_leftpad "
        "block_table"
    ).split()
    return check_kvcache_inputs(*[args.get(name) for name in fields], True, 0, False, options)


def kernel_built(q: torch.Tensor) -> None:
    return None


def test_paged_calls_go_to_the_decode_kernels_whatever_seqlen_q() -> None:
    for seqlen_q in (1, 16, 17, 40):
        call = checked(paged_args(q=torch.zeros(3, seqlen_q, 4, 16, dtype=torch.float16)))
        assert kvcache_decode.decode_kernel_refusal(call, kernel_built) is None


def test_contiguous_calls_go_to_the_decode_kernels_up_to_16_query_tokens() -> None:
    for seqlen_q, refused in ((1, False), (16, False), (17, True)):
        call = checked(call_args(seqlen_q=seqlen_q))
        refusal = kvcache_decode.decode_kernel_refusal(call, kernel_built)
        assert (refusal is not None) == refused
        if refused:
            assert "seqlen_q = 17" in refusal and "16" in refusal


def test_caches_with_different_strides_are_refused() -> None:
    args = call_args()
    # The head dim of a wider buffer: rows and heads further apart than k_cache's.
    args["v_cache"] = torch.zeros(3, 24, 2, 32, dtype=torch.float16)[..., :16]
    refusal = kvcache_decode.decode_kernel_refusal(checked(args), kernel_built)
    assert refusal is not None and "strides" in refusal


def test_the_builds_refusal_is_passed_on() -> None:
    call = checked(call_args())
    assert kvcache_decode.decode_kernel_refusal(call, lambda q: "not in this build") == (
        "not in this build"
    )


def test_cpu_tensors_are_refused_without_loading_the_extension(monkeypatch) -> None:
    def no_extension():
        raise AssertionError("the extension must not be loaded for a CPU tensor")

    monkeypatch.setattr(kvcache_decode, "load_extension", no_extension)
    refusal = kvcache_decode.build_kernel_check(torch.zeros(1, 1, 1, 16, dtype=torch.float16))
    assert refusal is not None and "CUDA" in refusal


def test_cache_lengths_of_full_caches_are_the_capacity() -> None:
    lengths = kvcache.decode_cache_lengths(None, 3, 48, torch.device("cpu"))
    assert lengths.dtype == torch.int32 and lengths.tolist() == [48, 48, 48]
    given = kvcache.decode_cache_lengths(torch.tensor([1, 2, 3]), 3, 48, torch.device("cpu"))
    assert given.dtype == torch.int32 and given.tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# The public function through the decode path, the kernel replaced by the reference


class ReferenceDecode:
    """Stands in for the decode op: the append and rotary steps as torch operations
    (kvcache.append_and_rotate, which the op's kernel matches bit for bit on the GPU), then
    each request's keys read from the cache as the kernel's KvCacheRows addresses them (page
    block_table[b, c // page_size], slot c % page_size; or entry cache_batch_idx[b], row c; c
    from cache_leftpad[b] to the key end) and the float32 reference."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, call, cache_lengths):
        self.calls += 1
        assert cache_lengths.dtype == torch.int32 and cache_lengths.shape == (call.q.shape[0],)
        q, key_ends = kvcache.append_and_rotate(call, cache_lengths)
        options = call.options
        outs, lses = [], []
        for b in range(q.shape[0]):
            start = 0 if call.cache_leftpad is None else int(call.cache_leftpad[b])
            positions = torch.arange(start, int(key_ends[b]))
            if call.paged:
                page_size = call.k_cache.shape[1]
                pages = call.block_table[b].long()[positions // page_size]
                cells = (pages, positions % page_size)
            else:
                entry = b if call.cache_batch_idx is None else int(call.cache_batch_idx[b])
                cells = (torch.full_like(positions, entry), positions)
            out, lse = reference_sequence(
                q[b], call.k_cache[cells], call.v_cache[cells], b, options
            )
            outs.append(out)
            lses.append(lse)
        return torch.stack(outs).to(q.dtype), torch.stack(lses)


@pytest.fixture
def on_reference_decode(monkeypatch):
    """CPU tensors past the device check, the decode path chosen, the kernel the reference."""
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)
    monkeypatch.setattr(kvcache, "build_kernel_check", kernel_built)
    monkeypatch.setattr(kvcache_decode, "build_kernel_check", kernel_built)
    fake = ReferenceDecode()
    monkeypatch.setattr(kvcache, "_decode_attention", fake)

    def varlen_must_not_run(*args):
        raise AssertionError("the call should have gone to the decode kernels")

    monkeypatch.setattr(kvcache, "_varlen_forward", varlen_must_not_run)
    return fake


DECODE_CASES = {
    # Appends that cross page boundaries (lengths 3 + 2, 0 + 2, 10 + 2 with 4-key pages).
    "paged_4_rotary_causal": (paged_args(page_size=4, max_pages=6, num_pages=20), {"causal": True}),
    "paged_1_window": (
        paged_args(page_size=1, max_pages=24, num_pages=80),
        {"window_size": (3, 0)},
    ),
    "paged_random_table_softcap_alibi": (
        paged_args(
            page_size=8,
            max_pages=3,
            num_pages=12,
            block_table=torch.randperm(12, generator=torch.Generator().manual_seed(3))[:9]
            .view(3, 3)
            .int(),
        ),
        {"softcap": 3.0, "alibi_slopes": torch.tensor([0.1, 0.2, 0.3, 0.4])},
    ),
    "contiguous_batch_idx_leftpad": (
        call_args(
            k_cache=torch.randn(5, 24, 2, 16).half(),
            v_cache=torch.randn(5, 24, 2, 16).half(),
            cache_batch_idx=int32([4, 1, 2]),
            cache_leftpad=int32([2, 0, 10]),
        ),
        {"causal": True},
    ),
    "contiguous_full_no_append": (
        call_args(k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None),
        {},
    ),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_public_function_through_the_decode_path(on_reference_decode, case: str) -> None:
    args, options = DECODE_CASES[case]
    window = options.get("window_size", (-1, -1))
    plain = {name: value for name, value in options.items() if name != "window_size"}
    expected = reference.attention_ref_kvcache(**args, window_size=window, **plain)
    lowp = reference.attention_ref_kvcache(
        **args, window_size=window, compute_dtype=args["q"].dtype, **plain
    )
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    out, lse = flash_varlen.flash_attn_with_kvcache(
        **{**args, "k_cache": k_cache, "v_cache": v_cache}, return_softmax_lse=True, **options
    )
    assert on_reference_decode.calls == 1
    assert lse.shape == (args["q"].shape[0], args["q"].shape[2], args["q"].shape[1])
    assert_within_tolerance(out, expected.out, lowp.out, FORWARD_FACTOR, case)
    assert_lse_within_tolerance(lse, expected.softmax_lse, lowp.softmax_lse, FORWARD_FACTOR, case)
    assert torch.equal(v_cache, expected.v_cache)


def test_a_paged_call_the_decode_kernels_refuse_writes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)
    monkeypatch.setattr(kvcache, "build_kernel_check", lambda q: "not in this build")
    args = paged_args()
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    with raises(NotImplementedError, "block_table", "not in this build"):
        flash_varlen.flash_attn_with_kvcache(**{**args, "k_cache": k_cache, "v_cache": v_cache})
    assert torch.equal(k_cache, args["k_cache"]) and torch.equal(v_cache, args["v_cache"])


# ----------------------------------------------------------------------------------------------
# The registered op


def test_kvcache_op_fake_gives_the_output_shapes() -> None:
    """flash_varlen::kvcache_fwd's fake (what torch.compile traces): out like q, lse (batch,
    nheads, seqlen_q) float32, two empty tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flash_varlen import ops

    with FakeTensorMode():
        q = torch.empty(3, 5, 8, 64, dtype=torch.bfloat16)
        pool = torch.empty(20, 16, 2, 64, dtype=torch.bfloat16)
        lengths = torch.empty(3, dtype=torch.int32)
        table = torch.empty(3, 4, dtype=torch.int32)
        out, lse, first, second = ops.kvcache_fwd(
            q, pool, pool, lengths, 0.125, True, block_table=table, num_splits=2
        )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (3, 8, 5) and lse.dtype == torch.float32
    assert first.shape == second.shape == (0,)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiling"])
def test_decode_attention_hands_the_call_to_the_op(monkeypatch, compiling: bool) -> None:
    """Every part of the call reaches the kernel: q as given, the caches in place, the cache
    lengths, the block table, the split count, the new keys and values, the rotary tables and
    the options; through the registered op while torch.compile traces, straight to the op's
    implementation eagerly (no dispatch layers)."""
    from flash_varlen import ops

    recorded = {}

    def op(q, k_cache, v_cache, cache_seqlens, **kwargs):
        recorded.update(kwargs, q=q, k_cache=k_cache, v_cache=v_cache, lengths=cache_seqlens)
        return q, torch.zeros(1), torch.empty(0), torch.empty(0)

    def not_this_one(*args, **kwargs):
        raise AssertionError("the other entry ran")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    # The call appends: while compiling, the op that declares its writes to the caches.
    monkeypatch.setattr(ops, "kvcache_fwd", not_this_one)
    monkeypatch.setattr(ops, "kvcache_append_fwd", op if compiling else not_this_one)
    monkeypatch.setattr(ops, "kvcache_fwd_eager", not_this_one if compiling else op)
    args = paged_args()
    call = checked({**args, "causal": True, "softcap": 2.0})
    call = type(call)(**{**call.__dict__, "num_splits": 5})
    lengths = int32([4, 5, 6])
    versions = (call.k_cache._version, call.v_cache._version)
    kvcache_decode.decode_attention(call, lengths)
    if not compiling:  # the eager call tells autograd that the caches changed
        assert (call.k_cache._version, call.v_cache._version) == tuple(x + 1 for x in versions)
    assert recorded["q"] is call.q
    assert recorded["k_cache"] is call.k_cache and recorded["v_cache"] is call.v_cache
    assert recorded["lengths"] is lengths and recorded["block_table"] is call.block_table
    assert recorded["k_new"] is call.k and recorded["v_new"] is call.v
    assert recorded["rotary_cos"] is call.rotary_cos and recorded["rotary_sin"] is call.rotary_sin
    assert call.rotary_cos is not None
    assert recorded["rotary_interleaved"] is call.rotary_interleaved
    assert recorded["num_splits"] == 5
    assert recorded["causal"] is True and recorded["softcap"] == 2.0
    assert recorded["cache_batch_idx"] is None and recorded["cache_leftpad"] is None


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiling"])
def test_a_call_without_new_keys_leaves_the_caches_alone(monkeypatch, compiling: bool) -> None:
    """Without k and v the op that declares no writes runs while compiling (so torch.compile
    does not functionalize the caches of a plain decode step), and eagerly the caches' versions
    stay as they were."""
    from flash_varlen import ops

    ran = []

    def op(q, k_cache, v_cache, cache_seqlens, **kwargs):
        ran.append(kwargs["k_new"])
        return q, torch.zeros(1), torch.empty(0), torch.empty(0)

    def not_this_one(*args, **kwargs):
        raise AssertionError("the other entry ran")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(ops, "kvcache_fwd", op if compiling else not_this_one)
    monkeypatch.setattr(ops, "kvcache_append_fwd", not_this_one)
    monkeypatch.setattr(ops, "kvcache_fwd_eager", not_this_one if compiling else op)
    call = checked(paged_args(k=None, v=None, rotary_cos=None, rotary_sin=None))
    versions = (call.k_cache._version, call.v_cache._version)
    kvcache_decode.decode_attention(call, int32([4, 5, 6]))
    assert ran == [None]
    assert (call.k_cache._version, call.v_cache._version) == versions


# ----------------------------------------------------------------------------------------------
# The extension's entry point (skipped with an extension built before the decode family)


def decode_extension():
    """The compiled module when it has the decode entry point, else a skip."""
    from flash_varlen import _extension

    if not _extension.is_available():
        pytest.skip(f"extension not built: {_extension.unavailable_reason()}")
    extension = _extension.load_extension()
    if not hasattr(extension, "kvcache_fwd"):
        pytest.skip("this build of the extension predates the decode family")
    return extension


def entry_args(**changes) -> dict:
    """Valid kvcache_fwd arguments but for the device (CPU tensors): a paged cache."""
    args = {
        "q": torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16),
        "k_cache": torch.zeros(10, 16, 2, 64, dtype=torch.bfloat16),
        "v_cache": torch.zeros(10, 16, 2, 64, dtype=torch.bfloat16),
        "cache_seqlens": int32([3, 20]),
        "softmax_scale": 0.125,
        "causal": True,
        "block_table": int32([[0, 1], [2, 3]]),
    }
    args.update(changes)
    return args


def new_keys(seqlen_new: int = 1, heads: int = 2) -> dict:
    """k_new and v_new for entry_args' cache (bf16, d 64)."""
    shape = (2, seqlen_new, heads, 64)
    return {
        "k_new": torch.zeros(shape, dtype=torch.bfloat16),
        "v_new": torch.zeros(shape, dtype=torch.bfloat16),
    }


def rotary_tables_of(rows: int, half: int, dtype: torch.dtype = torch.float32) -> dict:
    """rotary_cos and rotary_sin of `rows` positions and `half` columns (rotary_dim / 2)."""
    return {
        "rotary_cos": torch.zeros(rows, half, dtype=dtype),
        "rotary_sin": torch.zeros(rows, half, dtype=dtype),
    }


ENTRY_ERRORS = {
    "table_dtype": (
        {"block_table": torch.zeros(2, 2, dtype=torch.int64)},
        TypeError,
        "block_table must have dtype torch.int32",
    ),
    "table_batch": (
        {"block_table": int32([[0, 1]])},
        ValueError,
        "block_table must have shape (batch, max_pages)",
    ),
    "lengths_shape": (
        {"cache_seqlens": int32([3])},
        ValueError,
        "cache_seqlens must have shape (batch,)",
    ),
    "strides": (
        {"v_cache": torch.zeros(10, 16, 2, 128, dtype=torch.bfloat16)[..., :64]},
        ValueError,
        "k_cache and v_cache must have the same shape and strides",
    ),
    "leftpad_with_table": (
        {"cache_leftpad": int32([0, 0])},
        ValueError,
        "cannot be combined with block_table",
    ),
    "splits": ({"num_splits": -1}, ValueError, "num_splits must be >= 0"),
    "k_new_alone": (
        {"k_new": torch.zeros(2, 1, 2, 64, dtype=torch.bfloat16)},
        ValueError,
        "k_new and v_new must be given together",
    ),
    "k_new_heads": (
        new_keys(heads=8),
        ValueError,
        "k_new must have shape (batch, seqlen_new, nheads_k, d) = (2, seqlen_new, 2, 64)",
    ),
    "v_new_dtype": (
        {**new_keys(), "v_new": torch.zeros(2, 1, 2, 64, dtype=torch.float16)},
        TypeError,
        "v_new must have the dtype of q",
    ),
    "k_new_strided_last_dim": (
        {**new_keys(), "k_new": torch.zeros(2, 1, 2, 128, dtype=torch.bfloat16)[..., ::2]},
        ValueError,
        "k_new must have a contiguous last dim",
    ),
    "rotary_without_new_keys": (
        rotary_tables_of(32, 32),
        ValueError,
        "rotary_cos and rotary_sin need k_new and v_new",
    ),
    "rotary_dim": (
        {**new_keys(), **rotary_tables_of(32, 33)},
        ValueError,
        "rotary_dim / 2) must be in [1, d / 2 = 32], got 33",
    ),
    "rotary_rows": (
        {**new_keys(), **rotary_tables_of(31, 32)},
        ValueError,
        "rotary_cos.shape[0] must be at least the cache capacity (32), got 31",
    ),
    "rotary_table_dtype": (
        {**new_keys(), **rotary_tables_of(32, 32, torch.float16)},
        TypeError,
        "rotary_cos must be float32 or have the dtype of q",
    ),
    "valid_but_cpu": ({}, RuntimeError, "q must be a CUDA tensor"),
    "valid_append_but_cpu": (
        {**new_keys(seqlen_new=3), **rotary_tables_of(32, 16)},
        RuntimeError,
        "q must be a CUDA tensor",
    ),
}


@pytest.mark.parametrize("case", list(ENTRY_ERRORS))
def test_entry_point_checks_name_the_argument(case: str) -> None:
    """_C.kvcache_fwd refuses bad shapes, dtypes and strides by name before the device check
    (the last rule), reading no device memory."""
    extension = decode_extension()
    changes, kind, fragment = ENTRY_ERRORS[case]
    with raises(kind, fragment):
        extension.kvcache_fwd(**entry_args(**changes))


def test_dispatch_names_the_decode_family_where_it_is_built() -> None:
    """Each decode kernel of the build is dispatch's choice on the architectures it was
    compiled for, and refused below sm_80."""
    extension = decode_extension()
    family = next(f for f in extension.kernel_families() if f["name"] == "decode")
    for name, dtype, bucket in extension.compiled_decode_kernels():
        assert name == "decode"
        for capability in family["built_for"]:
            chosen = extension.select_kernel_family("decode", dtype, bucket, False, capability)
            assert chosen == "decode"
        with raises(NotImplementedError, "decode", "compute capability 7.5"):
            extension.select_kernel_family("decode", dtype, bucket, False, 75)
