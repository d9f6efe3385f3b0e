"""Paged prefill (``flash_attn_varlen_func(..., block_table=...)``) without a GPU: the validation
rules and their messages (CPU tensors reach every rule but the last, the device check), the
debug-mode page checks, how the block table reaches the registered op (fake CUDA tensors), the
op's fake, and the paged reference (``reference.gather_paged_kv``,
``reference.attention_ref_varlen_paged``) against hand-built pools. The kernels are checked
against that reference in test_paged_prefill_gpu.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flash_varlen import interface, ops, reference, validation

from cpu_checks import needs_fake_cuda, raises

NHEADS, NHEADS_K, HEAD_DIM = 4, 2, 64
SEQLENS_Q = (5, 7)
SEQLENS_K = (4, 6)  # counted by cu_seqlens_k; the keys live in the pages
PAGE_SIZE = 3
NUM_PAGES = 7
MAX_PAGES = 2  # 2 * 3 = 6 keys per sequence: exactly max(SEQLENS_K)


def paged_args(device: str = "cpu", dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Valid arguments of a paged flash_attn_varlen_func call (valid but for the device on
    the CPU): two sequences over a pool of NUM_PAGES pages of PAGE_SIZE rows."""
    pool = (NUM_PAGES, PAGE_SIZE, NHEADS_K, HEAD_DIM)
    return {
        "q": torch.zeros(sum(SEQLENS_Q), NHEADS, HEAD_DIM, dtype=dtype, device=device),
        "k": torch.zeros(pool, dtype=dtype, device=device),
        "v": torch.zeros(pool, dtype=dtype, device=device),
        "cu_seqlens_q": torch.tensor([0, 5, 12], dtype=torch.int32, device=device),
        "cu_seqlens_k": torch.tensor([0, 4, 10], dtype=torch.int32, device=device),
        "max_seqlen_q": max(SEQLENS_Q),
        "max_seqlen_k": max(SEQLENS_K),
        "block_table": torch.tensor([[6, 2], [0, 4]], dtype=torch.int32, device=device),
    }


def call(**changes: Any) -> None:
    interface.flash_attn_varlen_func(**{**paged_args(), **changes})


# --------------------------------------------------------------------------------------------
# Validation


def test_valid_paged_inputs_reach_the_device_check() -> None:
    with raises(ValueError, "q must be a CUDA tensor, got device cpu"):
        call()


def test_any_page_size_and_a_table_with_spare_pages_pass() -> None:
    """Page size 1, and more table columns than the keys need."""
    pool = torch.zeros(40, 1, NHEADS_K, HEAD_DIM, dtype=torch.float16)
    table = torch.zeros(2, 9, dtype=torch.int32)
    with raises(ValueError, "must be a CUDA tensor"):
        call(k=pool, v=pool.clone(), block_table=table)


@pytest.mark.parametrize(
    ("changes", "kind", "fragments"),
    [
        (
            {"block_table": torch.zeros(2, 2, dtype=torch.int64)},
            TypeError,
            ("block_table must have dtype torch.int32, got torch.int64",),
        ),
        (
            {"block_table": [[0, 1], [2, 3]]},
            TypeError,
            ("block_table must be a torch.Tensor, got list",),
        ),
        (
            {"block_table": torch.zeros(4, dtype=torch.int32)},
            ValueError,
            (
                "block_table must have shape (batch, max_pages) with batch = "
                "len(cu_seqlens_k) - 1 = 2 and max_pages >= 1, got (4,)",
            ),
        ),
        (
            {"block_table": torch.zeros(3, 2, dtype=torch.int32)},
            ValueError,
            ("block_table must have shape (batch, max_pages)", "got (3, 2)"),
        ),
        (
            {"block_table": torch.zeros(2, 0, dtype=torch.int32)},
            ValueError,
            ("max_pages >= 1, got (2, 0)",),
        ),
        (
            {"block_table": torch.zeros(2, 4, dtype=torch.int32)[:, ::2]},
            ValueError,
            ("block_table must be contiguous in its last dim (stride(-1) == 1)", "(4, 2)"),
        ),
        (
            {"k": torch.zeros(10, NHEADS_K, HEAD_DIM, dtype=torch.float16)},
            ValueError,
            ("k must have 4 dims (num_pages, page_size, nheads_k, headdim), got shape (10,",),
        ),
        (
            {"v": torch.zeros(NUM_PAGES + 1, PAGE_SIZE, NHEADS_K, HEAD_DIM, dtype=torch.float16)},
            ValueError,
            ("v must have the shape of k (7, 3, 2, 64), got (8, 3, 2, 64)",),
        ),
        (
            {
                "k": torch.zeros(NUM_PAGES, 0, NHEADS_K, HEAD_DIM, dtype=torch.float16),
                "v": torch.zeros(NUM_PAGES, 0, NHEADS_K, HEAD_DIM, dtype=torch.float16),
            },
            ValueError,
            ("k.shape[1] (page_size) must be positive, got 0",),
        ),
        (
            {
                "k": torch.zeros(0, PAGE_SIZE, NHEADS_K, HEAD_DIM, dtype=torch.float16),
                "v": torch.zeros(0, PAGE_SIZE, NHEADS_K, HEAD_DIM, dtype=torch.float16),
            },
            ValueError,
            ("k.shape[0] (num_pages) must be positive, got 0",),
        ),
        (
            {"max_seqlen_k": 7},
            ValueError,
            (
                "block_table holds max_pages * page_size = 2 * 3 = 6 keys per sequence",
                "fewer than max_seqlen_k = 7",
            ),
        ),
        (
            {"v": torch.zeros(NUM_PAGES, PAGE_SIZE, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16)},
            TypeError,
            ("v must have the same dtype as q",),
        ),
        (
            {"k": torch.zeros(NUM_PAGES, PAGE_SIZE, 3, HEAD_DIM, dtype=torch.float16)},
            ValueError,
            ("must equal k.shape[-2] (3)",),
        ),
    ],
    ids=[
        "int64",
        "list",
        "one_dim",
        "batch",
        "no_pages",
        "strided",
        "packed_k",
        "v_pool",
        "page_size_0",
        "num_pages_0",
        "capacity",
        "dtype",
        "heads",
    ],
)
def test_paged_rules_name_the_argument(changes, kind, fragments) -> None:
    with raises(kind, *fragments):
        call(**changes)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_block_table_with_inputs_that_need_gradients_is_refused(name: str) -> None:
    tensor = paged_args()[name].float().requires_grad_().half()
    with raises(NotImplementedError, "block_table (paged K/V) is forward only", f"{name} requires"):
        call(**{name: tensor})


def test_block_table_with_a_sink_that_needs_gradients_is_refused() -> None:
    sink = torch.zeros(NHEADS, requires_grad=True)
    with raises(NotImplementedError, "block_table", "learnable_sink requires grad"):
        call(learnable_sink=sink)


def test_gradients_off_lets_a_paged_call_through() -> None:
    """Under no_grad nothing could need the (missing) backward."""
    q = paged_args()["q"].float().requires_grad_().half()
    with torch.no_grad(), raises(ValueError, "must be a CUDA tensor"):
        call(q=q)


def test_packed_kv_needs_block_table_for_four_dims() -> None:
    """Without a block table, k and v are packed (total_k, nheads_k, headdim)."""
    args = paged_args()
    del args["block_table"]
    with raises(ValueError, "k must have 3 dims (total_k, nheads_k, headdim)"):
        interface.flash_attn_varlen_func(**args)


@pytest.mark.parametrize(
    "name", ["flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]
)
def test_only_flash_attn_varlen_func_takes_block_table(name: str) -> None:
    """flash-attn's placement: the packed variants have no block_table parameter."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'block_table'"):
        getattr(interface, name)(None, None, None, None, None, block_table=None)


# --------------------------------------------------------------------------------------------
# Debug mode: the page numbers (device-agnostic, so CPU tensors exercise them)


def check_pages(table: list[list[int]], seqused_k: list[int] | None = None) -> None:
    args = paged_args()
    validation.check_varlen_values(
        args["q"],
        args["k"],
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
        args["max_seqlen_q"],
        args["max_seqlen_k"],
        seqused_k=None if seqused_k is None else torch.tensor(seqused_k, dtype=torch.int32),
        block_table=torch.tensor(table, dtype=torch.int32),
    )


def test_debug_values_accept_used_pages_in_the_pool() -> None:
    check_pages([[6, 2], [0, 4]])
    # cu_seqlens_k[-1] = 10 is not k.shape[0] (7 pages): paged keys are not packed in k.
    # Entries past a sequence's used pages are never read: anything goes there.
    check_pages([[6, -5], [0, 4]], seqused_k=[3, 6])  # 3 keys of sequence 0: one page
    check_pages([[6, 99], [0, -1]], seqused_k=[3, 2])  # one page each
    check_pages([[-1, -1], [-1, -1]], seqused_k=[0, 0])  # no key: no page read


@pytest.mark.parametrize(
    ("table", "seqused_k", "fragments"),
    [
        (
            [[6, 2], [0, 7]],
            None,
            (
                "block_table[1, 1] = 7 must be in [0, 7) (k.shape[0], num_pages)",
                "sequence 1 uses its first 2 pages",
            ),
        ),
        ([[-1, 2], [0, 4]], None, ("block_table[0, 0] = -1 must be in [0, 7)",)),
        ([[6, 2], [9, 4]], [4, 1], ("block_table[1, 0] = 9", "its first 1 pages")),
    ],
)
def test_debug_values_reject_pages_outside_the_pool(table, seqused_k, fragments) -> None:
    with raises(ValueError, *fragments):
        check_pages(table, seqused_k)


def test_debug_values_still_check_cu_seqlens_k_when_paged() -> None:
    args = paged_args()
    with raises(ValueError, "cu_seqlens_k must be non-decreasing"):
        validation.check_varlen_values(
            args["q"],
            args["k"],
            args["cu_seqlens_q"],
            torch.tensor([0, 4, 3], dtype=torch.int32),
            args["max_seqlen_q"],
            args["max_seqlen_k"],
            block_table=args["block_table"],
        )


# --------------------------------------------------------------------------------------------
# The registered op (fake CUDA tensors) and its fake


@needs_fake_cuda
@pytest.mark.parametrize("debug", [False, True])
def test_block_table_reaches_the_op_and_the_debug_checks(monkeypatch, debug) -> None:
    recorded: list[dict[str, Any]] = []
    debug_calls: list[dict[str, Any]] = []

    def record(*args: Any) -> Any:
        names = [name for name, _ in interface._OP_PARAMETERS[interface.Layout.VARLEN]]
        recorded.append(dict(zip(names, args)))
        return ops._varlen_fwd_fake(*args)

    monkeypatch.setattr(ops, "varlen_fwd", record)
    monkeypatch.setattr(validation, "check_varlen_values", lambda *a, **kw: debug_calls.append(kw))
    if debug:
        monkeypatch.setenv(validation.DEBUG_ENV_VAR, "1")
    else:
        monkeypatch.delenv(validation.DEBUG_ENV_VAR, raising=False)
    with FakeTensorMode():
        args = paged_args(device="cuda")
        out = interface.flash_attn_varlen_func(**args)
    assert out.shape == args["q"].shape
    ((op_call,),) = [recorded]
    assert op_call["block_table"] is args["block_table"]
    assert op_call["k"] is args["k"] and op_call["v"] is args["v"]
    assert len(debug_calls) == int(debug)
    if debug:
        assert debug_calls[0]["block_table"] is args["block_table"]


@needs_fake_cuda
def test_block_table_on_another_device_is_refused() -> None:
    with FakeTensorMode():
        args = paged_args(device="cuda")
        args["block_table"] = args["block_table"].cpu()
        with raises(ValueError, "block_table must be on the same device as q"):
            interface.flash_attn_varlen_func(**args)


def test_unpaged_calls_pass_no_block_table() -> None:
    """The op's block_table defaults to None: unpaged calls and the KV-cache path, which pass
    the op's parameters by name, are unchanged."""
    parameters = dict(interface._OP_PARAMETERS[interface.Layout.VARLEN])
    assert "block_table" in parameters and parameters["block_table"] is None
    assert list(parameters)[-1] == "block_table"


def test_varlen_op_fake_with_a_block_table_on_meta_tensors() -> None:
    q = torch.empty(12, NHEADS, HEAD_DIM, dtype=torch.bfloat16, device="meta")
    pool = torch.empty(
        NUM_PAGES, PAGE_SIZE, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, device="meta"
    )
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    table = torch.empty(2, MAX_PAGES, dtype=torch.int32, device="meta")
    out, lse, _, _ = ops.varlen_fwd(q, pool, pool, cu, cu, 7, 6, 0.125, True, block_table=table)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (NHEADS, 12) and lse.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The paged reference


def scatter_into_pages(
    keys: torch.Tensor, lengths: list[int], page_size: int, spare_pages: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool holding packed ``keys`` (sequence b's lengths[b] rows back to back), written by
    hand: each sequence's pages a random subset of the pool, every other cell random. Returns
    (pool, block_table); the table's unused entries are -1."""
    generator = torch.Generator().manual_seed(seed)
    pages_of = [-(-length // page_size) for length in lengths]
    max_pages = max(max(pages_of), 1)
    num_pages = sum(pages_of) + spare_pages
    pool = torch.randn(num_pages, page_size, *keys.shape[1:], generator=generator)
    order = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.full((len(lengths), max_pages), -1, dtype=torch.int32)
    row = 0
    for b, length in enumerate(lengths):
        for index in range(pages_of[b]):
            table[b, index] = order.pop()
        for j in range(length):
            pool[table[b, j // page_size], j % page_size] = keys[row + j]
        row += length
    return pool, table


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_gather_paged_kv_returns_each_sequences_keys(page_size: int) -> None:
    lengths = [5, 0, 17, 1]
    keys = torch.randn(sum(lengths), NHEADS_K, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    k_pool, table = scatter_into_pages(keys, lengths, page_size, spare_pages=4, seed=1)
    v_pool, v_table = scatter_into_pages(2 * keys, lengths, page_size, spare_pages=4, seed=1)
    assert torch.equal(table, v_table)
    cu_seqlens_k = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32)
    k, v, cu_seqlens = reference.gather_paged_kv(k_pool, v_pool, table, cu_seqlens_k)
    assert torch.equal(k, keys) and torch.equal(v, 2 * keys)
    assert cu_seqlens.tolist() == [0, 5, 5, 22, 23] and cu_seqlens.dtype == torch.int32


def test_gather_paged_kv_takes_only_the_used_keys() -> None:
    """seqused_k keeps each slot's first keys; the pages past them may name anything."""
    lengths = [7, 4]
    keys = torch.randn(sum(lengths), NHEADS_K, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    pool, table = scatter_into_pages(keys, lengths, 3, spare_pages=2, seed=3)
    table[0, 2] = 1000  # page of keys 6.. of sequence 0, past seqused_k[0] = 5
    cu_seqlens_k = torch.tensor([0, 7, 11], dtype=torch.int32)
    seqused_k = torch.tensor([5, 0], dtype=torch.int32)
    k, v, cu_seqlens = reference.gather_paged_kv(pool, pool, table, cu_seqlens_k, seqused_k)
    assert torch.equal(k, keys[:5]) and torch.equal(v, keys[:5])
    assert cu_seqlens.tolist() == [0, 5, 5]


def test_gather_paged_kv_rejects_a_used_page_outside_the_pool() -> None:
    pool = torch.zeros(4, 2, NHEADS_K, HEAD_DIM)
    table = torch.tensor([[0, 4]], dtype=torch.int32)
    with raises(ValueError, "block_table[0, 1] = 4 must be in [0, 4)"):
        reference.gather_paged_kv(pool, pool, table, torch.tensor([0, 3], dtype=torch.int32))


@pytest.mark.parametrize("causal", [False, True])
def test_paged_reference_equals_the_varlen_reference_on_the_packed_keys(causal: bool) -> None:
    """Same keys, same math: the paged reference is the varlen one, bitwise, whatever pages
    the keys were scattered to (GQA, seqlen_q != seqlen_k, an empty key sequence, seqused_k,
    a window and a sink passed through)."""
    generator = torch.Generator().manual_seed(4)
    lengths_q, lengths_k = [3, 6, 2], [8, 0, 5]
    q = torch.randn(sum(lengths_q), NHEADS, HEAD_DIM, generator=generator)
    k = torch.randn(sum(lengths_k), NHEADS_K, HEAD_DIM, generator=generator)
    v = torch.randn(sum(lengths_k), NHEADS_K, HEAD_DIM, generator=generator)
    k_pool, table = scatter_into_pages(k, lengths_k, 3, spare_pages=3, seed=5)
    v_pool, _ = scatter_into_pages(v, lengths_k, 3, spare_pages=3, seed=5)
    cu_q = torch.tensor([0, 3, 9, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 8, 13], dtype=torch.int32)
    seqused_k = torch.tensor([6, 0, 5], dtype=torch.int32)
    options = {"window_size": (4, -1), "learnable_sink": torch.randn(NHEADS, generator=generator)}
    expected = reference.attention_ref_varlen(
        q, k, v, cu_q, cu_k, 0.1, causal, seqused_k=seqused_k, **options
    )
    paged = reference.attention_ref_varlen_paged(
        q, k_pool, v_pool, table, cu_q, cu_k, 0.1, causal, seqused_k=seqused_k, **options
    )
    for got, want in zip(paged, expected):
        assert torch.equal(got, want)
