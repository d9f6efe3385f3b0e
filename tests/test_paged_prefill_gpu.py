"""GPU tests of paged prefill: ``flash_attn_varlen_func(q, k_pool, v_pool, ..., block_table=...)``
against the float32 reference (``reference.attention_ref_varlen_paged``: the pages gathered into
packed keys, then the varlen reference) by the tolerance rule of design.md (tests/accuracy.py).

Each sequence's pages are a random subset of a larger pool whose other pages hold random values,
and the table's entries past a sequence's pages are -1 (never read). Covered: page sizes 1, 3,
16, 64 and 256 (smaller and larger than a key tile, and sizes that are not powers of two),
seqlen_q != seqlen_k both ways, causal or not, GQA, head dims 64 / 128 / 256, both dtypes, empty
query and key sequences, seqused_k below the slots, one sequence alone and hundreds of them, the
variants (window, softcap, ALiBi, sinks; dropout against the contiguous call), the result of the
same call on the keys gathered into contiguous tensors, no host sync, a CUDA graph replayed with
a new block table, and Hopper's dispatch (the sm90 family refuses a block table; the sm80 family
runs it). Outputs are NaN-poisoned through the caching allocator and checked to be fully
written.

Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from accuracy import (
    FORWARD_FACTOR,
    allocates_no_device_memory,
    assert_all_written,
    assert_bitwise_equal,
    assert_lse_within_tolerance,
    assert_within_tolerance,
    capture_graph,
    cu_seqlens_from_lengths,
    device_generator,
    dtype_name,
    output_nbytes,
    poison_freed_blocks,
    random_lengths,
    require_kernel,
    seeded_randn,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
OVERRIDE = "FLASH_VARLEN_KERNEL_FAMILY"
DTYPES = [torch.float16, torch.bfloat16]
DEFAULT_DTYPE = torch.bfloat16  # in every (even narrowed) development build
DEFAULT_HEAD_DIM = 128
NHEADS, NHEADS_K = 8, 2  # GQA
PAGE_SIZES = [1, 3, 16, 64, 256]
SPARE_PAGES = 5  # pages no sequence owns: the table's pages are a random subset of the pool
UNUSED_ENTRY = -1  # the table past a sequence's pages: never read, so anything goes
# Lengths that are not tile multiples (the sm80 key tiles are 64 or 128 keys), seqlen_q > and <
# seqlen_k, an empty key sequence with queries (out 0, lse -inf) and an empty query sequence.
SEQLENS_Q = (1, 77, 130, 0, 45, 300)
SEQLENS_K = (9, 77, 203, 40, 0, 129)
WINDOW = (37, 5)
SOFTCAP = 20.0
ALIBI_SLOPE_SCALE = 0.3


def _flash_varlen() -> Any:
    import flash_varlen

    return flash_varlen


@dataclass(frozen=True)
class PagedBatch:
    """A paged call's tensors: q (total_q, nheads, d) packed; k, v (num_pages, page_size,
    nheads_k, d) pools; block_table (batch, max_pages) int32; cu_seqlens_k counts each
    sequence's keys (its slot), seqused_k (or None) the used ones."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    seqused_k: torch.Tensor | None = None

    def arguments(self) -> dict[str, Any]:
        """flash_attn_varlen_func's arguments by name."""
        arguments = {
            "q": self.q,
            "k": self.k,
            "v": self.v,
            "cu_seqlens_q": self.cu_seqlens_q,
            "cu_seqlens_k": self.cu_seqlens_k,
            "max_seqlen_q": self.max_seqlen_q,
            "max_seqlen_k": self.max_seqlen_k,
            "block_table": self.block_table,
        }
        if self.seqused_k is not None:
            arguments["seqused_k"] = self.seqused_k
        return arguments


def random_table(
    slots: Sequence[int], page_size: int, num_pages: int, max_pages: int, seed: int
) -> torch.Tensor:
    """(batch, max_pages) int32: each sequence's ceil(slot / page_size) pages drawn without
    replacement from the pool, UNUSED_ENTRY past them."""
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(slots), max_pages), UNUSED_ENTRY, dtype=torch.int32)
    for b, slot in enumerate(slots):
        for index in range(-(-slot // page_size)):
            table[b, index] = order.pop()
    return table.to(DEVICE)


def make_paged_batch(
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    page_size: int,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    head_dim: int = DEFAULT_HEAD_DIM,
    nheads: int = NHEADS,
    nheads_k: int = NHEADS_K,
    seqused_k: Sequence[int] | None = None,
    seed: int = 0,
) -> PagedBatch:
    """Random q and pools (every cell random, owned or not) for the given lengths; seqlens_k
    are the slots (cu_seqlens_k), seqused_k the used keys (None: the slots)."""
    generator = device_generator(DEVICE, seed)
    max_seqlen_k = max(1, *seqlens_k)
    max_pages = -(-max_seqlen_k // page_size)
    num_pages = sum(-(-slot // page_size) for slot in seqlens_k) + SPARE_PAGES
    pool = (num_pages, page_size, nheads_k, head_dim)
    return PagedBatch(
        q=seeded_randn((sum(seqlens_q), nheads, head_dim), dtype, DEVICE, generator),
        k=seeded_randn(pool, dtype, DEVICE, generator),
        v=seeded_randn(pool, dtype, DEVICE, generator),
        block_table=random_table(seqlens_k, page_size, num_pages, max_pages, seed),
        cu_seqlens_q=cu_seqlens_from_lengths(seqlens_q, DEVICE),
        cu_seqlens_k=cu_seqlens_from_lengths(seqlens_k, DEVICE),
        max_seqlen_q=max(1, *seqlens_q),
        max_seqlen_k=max_seqlen_k,
        seqused_k=(
            None
            if seqused_k is None
            else torch.tensor(list(seqused_k), dtype=torch.int32, device=DEVICE)
        ),
    )


def reference_of(
    batch: PagedBatch, causal: bool, compute_dtype: torch.dtype, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_varlen().reference.attention_ref_varlen_paged(
        batch.q,
        batch.k,
        batch.v,
        batch.block_table,
        batch.cu_seqlens_q,
        batch.cu_seqlens_k,
        options.pop("softmax_scale", None),
        causal,
        compute_dtype,
        seqused_k=batch.seqused_k,
        **options,
    )


def run_and_check(batch: PagedBatch, name: str, causal: bool, **options: Any) -> torch.Tensor:
    """One poisoned paged call against the float32 reference (out and softmax_lse); returns
    out."""
    require_kernel(batch.q.dtype, batch.q.shape[-1])
    expected_out, expected_lse = reference_of(batch, causal, torch.float32, **options)
    lowp_out, lowp_lse = reference_of(batch, causal, batch.q.dtype, **options)
    poison_freed_blocks(output_nbytes(batch.q, batch.q.shape[0] * batch.q.shape[1]), DEVICE)
    out, lse, _ = _flash_varlen().flash_attn_varlen_func(
        **batch.arguments(), causal=causal, return_attn_probs=True, **options
    )
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert lse.shape == (batch.q.shape[1], batch.q.shape[0]) and lse.dtype == torch.float32
    assert_all_written(out, lse, name)
    assert_within_tolerance(out, expected_out, lowp_out, FORWARD_FACTOR, f"{name} out")
    assert_lse_within_tolerance(lse, expected_lse, lowp_lse, FORWARD_FACTOR, f"{name} lse")
    return out


# --------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_page_sizes(page_size: int, causal: bool) -> None:
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, page_size, seed=page_size)
    run_and_check(batch, f"page {page_size} causal={causal}", causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [3, 16])
def test_dtypes_and_head_dims(dtype: torch.dtype, head_dim: int, page_size: int) -> None:
    batch = make_paged_batch(
        SEQLENS_Q, SEQLENS_K, page_size, dtype=dtype, head_dim=head_dim, seed=head_dim
    )
    run_and_check(batch, f"{dtype} d{head_dim} page {page_size}", causal=True)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_head_layouts(heads: tuple[int, int]) -> None:
    nheads, nheads_k = heads
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, nheads=nheads, nheads_k=nheads_k, seed=3)
    run_and_check(batch, f"heads {nheads}/{nheads_k}", causal=True)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_seqused_k_below_the_slots(page_size: int) -> None:
    """Sequence b uses its first seqused_k[b] keys; the pages past them hold other values and
    must not reach the result (a tile's tail rows are zero-filled, never read)."""
    slots = (200, 64, 129, 40, 10)
    seqused_k = (131, 0, 129, 17, 1)
    batch = make_paged_batch((50, 3, 129, 64, 1), slots, page_size, seqused_k=seqused_k, seed=7)
    run_and_check(batch, f"seqused_k page {page_size}", causal=True)
    run_and_check(batch, f"seqused_k page {page_size} not causal", causal=False)


def test_every_sequence_empty() -> None:
    """No key anywhere: out 0 and lse -inf everywhere, nothing read from the pool."""
    batch = make_paged_batch((5, 17), (0, 0), 16, seed=8)
    out = run_and_check(batch, "no keys", causal=False)
    assert bool((out == 0).all())


def test_one_sequence() -> None:
    batch = make_paged_batch((1000,), (1500,), 16, seed=9)
    run_and_check(batch, "one sequence", causal=True)


@pytest.mark.parametrize("page_size", [1, 16])
def test_hundreds_of_sequences(page_size: int) -> None:
    count = 300
    seqlens_q = random_lengths(count, 0, 40, seed=10)
    seqlens_k = random_lengths(count, 0, 90, seed=11)
    # One long sequence among them.
    seqlens_q[123], seqlens_k[123] = 700, 1100
    batch = make_paged_batch(seqlens_q, seqlens_k, page_size, seed=12)
    run_and_check(batch, f"{count} sequences page {page_size}", causal=True)


@pytest.mark.parametrize(
    "options",
    [
        {"window_size": WINDOW},
        {"window_size": WINDOW, "causal_alignment": "top_left"},
        {"softcap": SOFTCAP},
        {"softmax_scale": 0.05},
    ],
    ids=["window", "top_left_window", "softcap", "scale"],
)
def test_options(options: dict[str, Any]) -> None:
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seed=13)
    run_and_check(batch, f"options {options}", causal=True, **options)


def test_alibi_and_sink() -> None:
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 3, seed=14)
    slopes = torch.rand(len(SEQLENS_Q), NHEADS, generator=torch.Generator().manual_seed(15))
    sink = torch.randn(NHEADS, generator=torch.Generator().manual_seed(16))
    run_and_check(
        batch,
        "alibi sink",
        causal=True,
        alibi_slopes=(slopes * ALIBI_SLOPE_SCALE).to(DEVICE),
        learnable_sink=sink.to(DEVICE),
    )


# --------------------------------------------------------------------------------------------
# Against the same call on contiguous keys


def contiguous_call(batch: PagedBatch) -> dict[str, Any]:
    """The arguments of the same call with the keys gathered out of the pages into packed k, v
    (each sequence's used keys, so no seqused_k)."""
    k, v, cu_seqlens_k = _flash_varlen().reference.gather_paged_kv(
        batch.k, batch.v, batch.block_table, batch.cu_seqlens_k, batch.seqused_k
    )
    arguments = {**batch.arguments(), "k": k, "v": v, "cu_seqlens_k": cu_seqlens_k}
    del arguments["block_table"]
    arguments.pop("seqused_k", None)
    return arguments


@pytest.mark.parametrize("page_size", [1, 3, 64, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_call_on_contiguous_keys_bitwise(monkeypatch, page_size, causal) -> None:
    """Bitwise, with both calls in one kernel: the sm80 family (forced: on Hopper the
    contiguous call would otherwise run sm90, another algorithm) and its general kernel, which
    the paged call always runs; zero ALiBi slopes send the contiguous call there too and add
    -0.0 to every score, which changes no value. The two calls then differ only in where the
    kernel reads each key row from: the same values land in shared memory (rows past a
    sequence's keys zero-filled both ways) and the same instructions follow."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    monkeypatch.setenv(OVERRIDE, "sm80")
    batch = make_paged_batch(
        SEQLENS_Q, SEQLENS_K, page_size, seqused_k=(9, 70, 203, 1, 0, 128), seed=17
    )
    zero_slopes = torch.zeros(NHEADS, device=DEVICE)
    api = _flash_varlen()
    paged = api.flash_attn_varlen_func(
        **batch.arguments(), causal=causal, alibi_slopes=zero_slopes, return_attn_probs=True
    )
    contiguous = api.flash_attn_varlen_func(
        **contiguous_call(batch), causal=causal, alibi_slopes=zero_slopes, return_attn_probs=True
    )
    assert_bitwise_equal(paged[0], contiguous[0], "out")
    assert_bitwise_equal(paged[1], contiguous[1], "lse")


def test_dropout_equals_the_call_on_contiguous_keys_bitwise(monkeypatch) -> None:
    """Dropout's draws depend on (sequence, head, query, key position), not on where a key is
    stored: from the same generator state the paged and the contiguous call (both in the
    sm80 family's general kernel) drop the same pairs, and agree bitwise, pattern included."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    monkeypatch.setenv(OVERRIDE, "sm80")
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 3, seed=27)
    api = _flash_varlen()
    results = []
    for arguments in (batch.arguments(), contiguous_call(batch)):
        torch.manual_seed(28)
        results.append(
            api.flash_attn_varlen_func(
                **arguments, dropout_p=0.2, causal=True, return_attn_probs=True
            )
        )
    (paged_out, paged_lse, paged_mask), (out, lse, mask) = results
    assert_bitwise_equal(paged_out, out, "out")
    assert_bitwise_equal(paged_lse, lse, "lse")
    assert_bitwise_equal(paged_mask, mask, "S_dmask")


def test_matches_the_plain_call_on_contiguous_keys() -> None:
    """Without forcing anything: the contiguous call runs the best family's plain kernel (sm90
    on Hopper), so the two agree within the tolerance rule rather than bitwise."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seed=18)
    expected_out, _ = reference_of(batch, True, torch.float32)
    lowp_out, _ = reference_of(batch, True, DEFAULT_DTYPE)
    api = _flash_varlen()
    paged = api.flash_attn_varlen_func(**batch.arguments(), causal=True)
    contiguous = api.flash_attn_varlen_func(**contiguous_call(batch), causal=True)
    assert_within_tolerance(paged, expected_out, lowp_out, FORWARD_FACTOR, "paged")
    assert_within_tolerance(contiguous, expected_out, lowp_out, FORWARD_FACTOR, "contiguous")


# --------------------------------------------------------------------------------------------
# No host sync, CUDA graphs, forward only


def test_eager_call_does_not_synchronize() -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seqused_k=(9, 70, 203, 1, 0, 128))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _flash_varlen().flash_attn_varlen_func(**batch.arguments(), causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replays_with_a_new_block_table() -> None:
    """A paged call captured once and replayed after writing a new block table, new pools and
    queries, and new used lengths into its static buffers: each replay equals an eager call on
    the same contents bitwise and the reference within the tolerance rule."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    slots = (200, 64, 129, 40)
    seqlens_q = (30, 1, 64, 0)
    static = make_paged_batch(seqlens_q, slots, 16, seqused_k=slots, seed=19)
    api = _flash_varlen()

    def step() -> torch.Tensor:
        return api.flash_attn_varlen_func(**static.arguments(), causal=True)

    graph, static_out = capture_graph(step)

    for seed, used in enumerate([(200, 0, 100, 40), (1, 64, 129, 17), (0, 0, 0, 0)], start=20):
        fresh = make_paged_batch(seqlens_q, slots, 16, seqused_k=used, seed=seed)
        assert not torch.equal(fresh.block_table, static.block_table)
        for name in ("q", "k", "v", "block_table", "seqused_k"):
            getattr(static, name).copy_(getattr(fresh, name))
        graph.replay()
        eager_out = api.flash_attn_varlen_func(**fresh.arguments(), causal=True)
        torch.cuda.synchronize()
        assert_bitwise_equal(static_out, eager_out, f"replay {seed}")
        expected, _ = reference_of(fresh, True, torch.float32)
        lowp, _ = reference_of(fresh, True, DEFAULT_DTYPE)
        assert_within_tolerance(static_out, expected, lowp, FORWARD_FACTOR, f"replay {seed}")


def test_gradients_are_refused_before_any_kernel() -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seed=24)
    q = batch.q.clone().requires_grad_()
    with allocates_no_device_memory(), pytest.raises(
        NotImplementedError, match="block_table .* forward only"
    ):
        _flash_varlen().flash_attn_varlen_func(**replace(batch, q=q).arguments())
    with torch.no_grad():
        _flash_varlen().flash_attn_varlen_func(**replace(batch, q=q).arguments())


def test_debug_mode_reports_a_page_outside_the_pool(monkeypatch) -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    monkeypatch.setenv("FLASH_VARLEN_DEBUG", "1")
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seed=25)
    table = batch.block_table.clone()
    table[2, 1] = batch.k.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[2, 1\] = .* must be in \[0, "):
        _flash_varlen().flash_attn_varlen_func(**replace(batch, block_table=table).arguments())


# --------------------------------------------------------------------------------------------
# Hopper: the sm90 family refuses a block table, dispatch runs the sm80 family


def test_hopper_runs_paged_calls_on_the_sm80_family(monkeypatch) -> None:
    """On a Hopper GPU with the sm90 family built, a plain call dispatches to sm90; the same
    call with a block table passes to sm80 (sm90's fwd_unsupported_option names "paged KV
    cache", which forcing sm90 shows) and matches the reference."""
    from flash_varlen._extension import load_extension

    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    major, minor = torch.cuda.get_device_capability()
    extension = load_extension()
    monkeypatch.delenv(OVERRIDE, raising=False)
    best = extension.select_kernel_family(
        "forward", dtype_name(DEFAULT_DTYPE), DEFAULT_HEAD_DIM, True, major * 10 + minor
    )
    if best != "sm90":
        pytest.skip(f"the plain forward runs the {best} family on this GPU, not sm90")
    batch = make_paged_batch(SEQLENS_Q, SEQLENS_K, 16, seed=26)
    run_and_check(batch, "hopper paged", causal=True)  # sm90 refuses, sm80 runs it
    monkeypatch.setenv(OVERRIDE, "sm90")
    with pytest.raises(NotImplementedError, match="sm90: does not implement paged KV cache"):
        _flash_varlen().flash_attn_varlen_func(**batch.arguments(), causal=True)
    monkeypatch.setenv(OVERRIDE, "sm80")
    run_and_check(batch, "hopper paged, sm80 forced", causal=True)
