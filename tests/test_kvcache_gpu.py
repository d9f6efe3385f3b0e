"""GPU tests of flash_attn_with_kvcache on contiguous caches, against the float32 reference.

Each call is compared with ``reference.attention_ref_kvcache`` by the tolerance rule of
design.md (tests/accuracy.py: at most FORWARD_FACTOR times the error of the same PyTorch math in
the input dtype): out, softmax_lse, and the caches after the in-place append (values exact,
rotated keys within one rounding). Outputs are NaN-poisoned through the caching allocator and
checked to be fully written. Covered: both dtypes, head dims 64 and 128, seqlen_q 1 to 16,
MHA/GQA/MQA, cache_batch_idx, cache_leftpad, rotary in both styles, causal, window, softcap,
ALiBi, sinks, empty caches, no copy of the cache, and a CUDA-graph capture replayed with new
cache lengths. Contiguous calls of up to 16 query tokens run the decode kernels where the build
has them (the varlen forward otherwise); the paged tests (page sizes 1, 16, 64, 256, random
block tables, appends across page boundaries, num_splits 1 / 2 / many, the row-split kernel for
more than 16 query rows, options, a CUDA graph replayed with new lengths and tables) need them,
as does the check of the decode op's append kernel against the torch steps it replaces (caches
and output bit for bit, paged and contiguous, both rotary styles and table dtypes, strided k, v).

Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pytest
import torch

from accuracy import (
    FORWARD_FACTOR,
    assert_all_written,
    assert_bitwise_equal,
    assert_lse_within_tolerance,
    assert_within_tolerance,
    capture_graph,
    device_generator,
    output_nbytes,
    poison_freed_blocks,
    require_decode_kernel,
    require_kernel,
    seeded_randn,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
SEQLENS_Q = [1, 2, 5, 16]
HEAD_LAYOUTS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
DEFAULT_DTYPE = torch.bfloat16  # in every (even narrowed) development build
DEFAULT_HEAD_DIM = 128
BATCH = 4
# Not a multiple of any tile: the last key block of a full cache is partial.
SEQLEN_CACHE = 333
# Extra cache entries beyond the batch, for cache_batch_idx to pick from.
SPARE_ENTRIES = 2
ALIBI_SLOPE_SCALE = 0.3
SOFTCAP = 20.0
WINDOW = (37, 0)
# Static buffers of the CUDA-graph test and the cache lengths written before each replay
# (an empty cache, a full one, lengths that change by more than a tile).
GRAPH_SEQLEN_NEW = 2
GRAPH_LENGTHS = [[0, 17, 200, SEQLEN_CACHE - GRAPH_SEQLEN_NEW], [5, 0, 64, 128], [0, 0, 0, 0]]
# The call may allocate its small index tensors and rotated q, never a copy of the cache
# (16 MiB per cache at this length with BATCH entries of GQA heads).
NO_COPY_CACHE_SEQLEN = 8192
NO_COPY_FRACTION = 0.05


def _flash_varlen() -> Any:
    import flash_varlen

    return flash_varlen


def rotary_tables(seqlen_ro: int, rotary_dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(seqlen_ro, rotary_dim // 2, generator=generator) * 2 * math.pi
    return torch.cos(angles).to(DEVICE, dtype), torch.sin(angles).to(DEVICE, dtype)


def make_call(
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    head_dim: int = DEFAULT_HEAD_DIM,
    seqlen_q: int = 1,
    seqlen_new: int | None = None,
    layout: str = "gqa",
    lengths: list[int] | None = None,
    rotary_dim: int = 0,
    batch_idx: bool = False,
    leftpad: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Arguments of one call: a contiguous cache of SEQLEN_CACHE keys per entry holding random
    lengths (one empty), seqlen_new (default seqlen_q) keys to append."""
    seqlen_new = seqlen_q if seqlen_new is None else seqlen_new
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    generator = device_generator(DEVICE, seed)
    entries = BATCH + SPARE_ENTRIES if batch_idx else BATCH
    if lengths is None:
        cpu = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, SEQLEN_CACHE - seqlen_new + 1, (BATCH,), generator=cpu).tolist()
        lengths[0] = 0  # an empty cache
    args: dict[str, Any] = {
        "q": seeded_randn((BATCH, seqlen_q, nheads, head_dim), dtype, DEVICE, generator),
        "k_cache": seeded_randn(
            (entries, SEQLEN_CACHE, nheads_k, head_dim), dtype, DEVICE, generator
        ),
        "v_cache": seeded_randn(
            (entries, SEQLEN_CACHE, nheads_k, head_dim), dtype, DEVICE, generator
        ),
        "cache_seqlens": torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
    }
    if seqlen_new > 0:
        shape = (BATCH, seqlen_new, nheads_k, head_dim)
        args["k"] = seeded_randn(shape, dtype, DEVICE, generator)
        args["v"] = seeded_randn(shape, dtype, DEVICE, generator)
    if rotary_dim:
        args["rotary_cos"], args["rotary_sin"] = rotary_tables(
            SEQLEN_CACHE, rotary_dim, dtype, seed
        )
    if batch_idx:
        order = torch.randperm(entries, generator=torch.Generator().manual_seed(seed))[:BATCH]
        args["cache_batch_idx"] = order.to(DEVICE, torch.int32)
    if leftpad:
        pads = [length // 3 for length in lengths]
        args["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    return args


def run_and_check(args: dict[str, Any], name: str, **options: Any) -> None:
    """One poisoned call against the float32 reference (out, softmax_lse, appended caches)."""
    require_kernel(args["q"].dtype, args["q"].shape[-1])
    reference = _flash_varlen().reference
    # num_splits changes how the kernels compute, not what: the reference has no such argument.
    exact = {name: value for name, value in options.items() if name != "num_splits"}
    expected = reference.attention_ref_kvcache(**args, **exact)
    lowp = reference.attention_ref_kvcache(**args, **exact, compute_dtype=args["q"].dtype)
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    q = args["q"]
    lse_numel = q.shape[0] * q.shape[1] * q.shape[2]
    poison_freed_blocks(output_nbytes(q, lse_numel), DEVICE)
    out, lse = _flash_varlen().flash_attn_with_kvcache(
        **{**args, "k_cache": k_cache, "v_cache": v_cache}, return_softmax_lse=True, **options
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_all_written(out, lse, name)
    assert_within_tolerance(out, expected.out, lowp.out, FORWARD_FACTOR, f"{name} out")
    assert_lse_within_tolerance(
        lse, expected.softmax_lse, lowp.softmax_lse, FORWARD_FACTOR, f"{name} lse"
    )
    assert_bitwise_equal(v_cache, expected.v_cache, f"{name} v_cache")
    # Rotated keys: the same float32 rotation rounded once, up to the order of its two products.
    eps = torch.finfo(q.dtype).eps
    torch.testing.assert_close(k_cache, expected.k_cache, atol=eps, rtol=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q", SEQLENS_Q)
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_decode_with_append_and_rotary(dtype, head_dim, seqlen_q, layout) -> None:
    args = make_call(
        dtype=dtype, head_dim=head_dim, seqlen_q=seqlen_q, layout=layout, rotary_dim=head_dim // 2
    )
    run_and_check(args, f"{dtype} d{head_dim} q{seqlen_q} {layout}", causal=True)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, DEFAULT_HEAD_DIM])
@pytest.mark.parametrize("float32_tables", [False, True])
def test_rotary_styles(interleaved, causal, rotary_dim, float32_tables) -> None:
    """Queries at consecutive positions (causal) or all at cache_seqlens (not causal); tables
    in q's dtype or float32."""
    args = make_call(seqlen_q=4, rotary_dim=rotary_dim)
    if float32_tables:
        args["rotary_cos"], args["rotary_sin"] = rotary_tables(
            SEQLEN_CACHE, rotary_dim, torch.float32, seed=0
        )
    run_and_check(args, "rotary", causal=causal, rotary_interleaved=interleaved)


@pytest.mark.parametrize("batch_idx", [False, True])
@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("seqlen_new", [0, 1, 3])
def test_cache_batch_idx_and_leftpad(batch_idx, leftpad, seqlen_new) -> None:
    args = make_call(
        seqlen_q=3,
        seqlen_new=seqlen_new,
        batch_idx=batch_idx,
        leftpad=leftpad,
        rotary_dim=64 if seqlen_new else 0,
    )
    run_and_check(args, f"batch_idx={batch_idx} leftpad={leftpad}", causal=True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": True},
        {"window_size": WINDOW},
        {"window_size": WINDOW, "causal": True},
        {"softcap": SOFTCAP},
        {"softmax_scale": 0.05},
    ],
    ids=["full", "causal", "window", "causal_window", "softcap", "scale"],
)
def test_options(options) -> None:
    run_and_check(make_call(seqlen_q=7, rotary_dim=64), "options", **options)


@pytest.mark.parametrize("batched", [False, True])
def test_alibi(batched) -> None:
    args = make_call(seqlen_q=5)
    nheads = args["q"].shape[2]
    shape = (BATCH, nheads) if batched else (nheads,)
    slopes = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * ALIBI_SLOPE_SCALE
    run_and_check(args, "alibi", causal=True, alibi_slopes=slopes.to(DEVICE))


def test_learnable_sink() -> None:
    args = make_call(seqlen_q=2)
    sink = torch.randn(args["q"].shape[2], generator=torch.Generator().manual_seed(4))
    run_and_check(args, "sink", causal=True, learnable_sink=sink.to(DEVICE))


def test_empty_caches() -> None:
    """No key anywhere: out exactly 0, softmax_lse -inf, nothing NaN."""
    args = make_call(seqlen_q=3, seqlen_new=0, lengths=[0] * BATCH)
    run_and_check(args, "empty")
    out, lse = _flash_varlen().flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_full_caches_without_cache_seqlens() -> None:
    args = make_call(seqlen_q=2, seqlen_new=0)
    del args["cache_seqlens"]
    run_and_check(args, "full caches", causal=True)


def test_int_cache_seqlens() -> None:
    args = make_call(seqlen_q=2, rotary_dim=64)
    args["cache_seqlens"] = 100
    run_and_check(args, "int cache_seqlens", causal=True)


def sliced(cache: torch.Tensor, buffer_seqlen: int) -> torch.Tensor:
    """``cache`` copied into the first keys of a longer (entries, buffer_seqlen, ...) buffer and
    returned as that slice (entries buffer_seqlen rows apart)."""
    buffer = torch.zeros(
        cache.shape[0], buffer_seqlen, *cache.shape[2:], dtype=cache.dtype, device=DEVICE
    )
    buffer[:, : cache.shape[1]] = cache
    return buffer[:, : cache.shape[1]]


def test_sliced_cache_is_read_in_place() -> None:
    """A (batch, seqlen_cache) slice of a longer buffer: written and read where it is."""
    args = make_call(seqlen_q=1, rotary_dim=64)
    for name in ("k_cache", "v_cache"):
        args[name] = sliced(args[name], 2 * SEQLEN_CACHE)
    run_and_check(args, "sliced cache", causal=True)


def test_no_copy_of_the_cache() -> None:
    """The call's peak memory stays a small fraction of one cache: what it allocates is q-sized
    (rotated q, out) or (batch,)-sized (the index tensors), never cache-sized."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    args = make_call(seqlen_q=1, rotary_dim=64)
    long_cache = NO_COPY_CACHE_SEQLEN
    for name in ("k_cache", "v_cache"):
        entries, _, nheads_k, head_dim = args[name].shape
        cache = torch.zeros(
            entries, long_cache, nheads_k, head_dim, dtype=DEFAULT_DTYPE, device=DEVICE
        )
        args[name] = sliced(cache, long_cache + 1)
    args["rotary_cos"], args["rotary_sin"] = rotary_tables(long_cache, 64, DEFAULT_DTYPE, 0)
    cache_bytes = args["k_cache"].numel() * args["k_cache"].element_size()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _flash_varlen().flash_attn_with_kvcache(**args, causal=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < NO_COPY_FRACTION * cache_bytes


def test_index_tensor_on_another_device() -> None:
    args = make_call(seqlen_q=1)
    args["cache_seqlens"] = args["cache_seqlens"].cpu()
    with pytest.raises(ValueError, match="cache_seqlens must be on the same device as q"):
        _flash_varlen().flash_attn_with_kvcache(**args)


def test_eager_call_does_not_synchronize() -> None:
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    args = make_call(seqlen_q=2, rotary_dim=64, batch_idx=True, leftpad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _flash_varlen().flash_attn_with_kvcache(**args, causal=True, return_softmax_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_replay(
    graph: torch.cuda.CUDAGraph,
    static: dict[str, Any],
    outputs: tuple[torch.Tensor, torch.Tensor],
    fresh: dict[str, Any],
    names: tuple[str, ...],
    options: dict[str, Any],
    label: str,
) -> None:
    """Copies ``fresh``'s tensors ``names`` into the static buffers, replays ``graph`` and
    checks its outputs (out, lse) and both caches: bitwise against an eager call on the same
    contents, and out against the reference within the tolerance rule."""
    for name in names:
        static[name].copy_(fresh[name])
    eager_args = {**fresh, "k_cache": fresh["k_cache"].clone(), "v_cache": fresh["v_cache"].clone()}
    graph.replay()
    eager_out, eager_lse = _flash_varlen().flash_attn_with_kvcache(**eager_args, **options)
    torch.cuda.synchronize()
    static_out, static_lse = outputs
    assert_bitwise_equal(static_out, eager_out, f"{label} out")
    assert_bitwise_equal(static_lse, eager_lse, f"{label} lse")
    assert_bitwise_equal(static["k_cache"], eager_args["k_cache"], f"{label} k_cache")
    assert_bitwise_equal(static["v_cache"], eager_args["v_cache"], f"{label} v_cache")
    reference = _flash_varlen().reference
    causal = options["causal"]
    expected = reference.attention_ref_kvcache(**fresh, causal=causal)
    lowp = reference.attention_ref_kvcache(**fresh, causal=causal, compute_dtype=DEFAULT_DTYPE)
    assert_within_tolerance(static_out, expected.out, lowp.out, FORWARD_FACTOR, label)


def test_cuda_graph_replays_with_new_cache_lengths() -> None:
    """A decode step (append + rotary + attention) captured once, replayed after writing new
    queries, keys, values and cache lengths into its static buffers: each replay equals an eager
    call on the same contents bitwise (out, lse and both caches) and the reference within the
    tolerance rule."""
    require_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    static = make_call(
        seqlen_q=GRAPH_SEQLEN_NEW, rotary_dim=64, batch_idx=True, lengths=GRAPH_LENGTHS[0]
    )
    options = {"causal": True, "return_softmax_lse": True}

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return _flash_varlen().flash_attn_with_kvcache(**static, **options)

    graph, (static_out, static_lse) = capture_graph(step)

    for seed, lengths in enumerate(GRAPH_LENGTHS, start=1):
        fresh = make_call(
            seqlen_q=GRAPH_SEQLEN_NEW, rotary_dim=64, batch_idx=True, lengths=lengths, seed=seed
        )
        # The rotary tables too: make_call draws them from the seed, and a replay reads the
        # captured buffers while the eager call reads fresh's.
        names = ("q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "cache_batch_idx")
        names += ("rotary_cos", "rotary_sin")
        check_replay(
            graph, static, (static_out, static_lse), fresh, names, options, f"replay {seed}"
        )


# ----------------------------------------------------------------------------------------------
# Paged caches and split-KV (the decode kernel family)

PAGE_SIZES = [1, 16, 64, 256]
SPARE_PAGES = 3  # pages no request owns, so that the table's pages are a random subset
# num_splits: 1 (the output written directly), 2, a count with empty splits (SEQLEN_CACHE is 6
# key blocks), and 0 (the heuristic).
NUM_SPLITS = [1, 2, 7, 0]


def paged(args: dict[str, Any], page_size: int, seed: int = 0) -> dict[str, Any]:
    """``args`` (a contiguous-cache call of make_call, without cache_batch_idx or leftpad) with
    the same cache contents in a paged pool: each request's pages drawn at random from the
    pool, the pool's other pages random values; rotary tables as long as the paged capacity."""
    k_cache, v_cache = args["k_cache"], args["v_cache"]
    batch, capacity, nheads_k, head_dim = k_cache.shape
    max_pages = -(-capacity // page_size)
    num_pages = batch * max_pages + SPARE_PAGES
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    table = order[: batch * max_pages].view(batch, max_pages).to(DEVICE, torch.int32)
    generator = device_generator(DEVICE, seed + 1)
    result = dict(args)
    positions = torch.arange(capacity, device=DEVICE)
    pages = table.long()[:, positions // page_size]  # (batch, capacity)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        pool = seeded_randn(
            (num_pages, page_size, nheads_k, head_dim), cache.dtype, DEVICE, generator
        )
        pool[pages, positions % page_size] = cache
        result[name] = pool
    result["block_table"] = table
    if "rotary_cos" in args:  # the tables cover the paged capacity (max_pages * page_size)
        rotary_dim = 2 * args["rotary_cos"].shape[1]
        result["rotary_cos"], result["rotary_sin"] = rotary_tables(
            max_pages * page_size, rotary_dim, args["rotary_cos"].dtype, seed
        )
    return result


def run_paged(args: dict[str, Any], name: str, **options: Any) -> None:
    require_decode_kernel(args["q"].dtype, args["q"].shape[-1])
    run_and_check(args, name, **options)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("seqlen_q", [1, 5, 16])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_paged_decode_with_append_and_rotary(page_size, seqlen_q, layout) -> None:
    """Appends of seqlen_q keys at random lengths cross page boundaries for every page size
    below SEQLEN_CACHE; GQA at 5 and 16 tokens and MQA run the row-split kernel (> 16 rows)."""
    args = paged(make_call(seqlen_q=seqlen_q, layout=layout, rotary_dim=64), page_size)
    run_paged(args, f"paged {page_size} q{seqlen_q} {layout}", causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_paged_dtypes_and_head_dims(dtype, head_dim) -> None:
    args = paged(make_call(dtype=dtype, head_dim=head_dim, seqlen_q=2), 16)
    run_paged(args, f"paged {dtype} d{head_dim}", causal=True)


@pytest.mark.parametrize("num_splits", NUM_SPLITS)
@pytest.mark.parametrize("page_size", [16, None], ids=["paged", "contiguous"])
@pytest.mark.parametrize("seqlen_q", [1, 16])
def test_num_splits(num_splits, page_size, seqlen_q) -> None:
    args = make_call(seqlen_q=seqlen_q, rotary_dim=64)
    if page_size is not None:
        args = paged(args, page_size)
    run_paged(args, f"splits {num_splits}", causal=True, num_splits=num_splits)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window_size": WINDOW},
        {"window_size": WINDOW, "causal": True},
        {"softcap": SOFTCAP, "causal": True},
        {"softmax_scale": 0.05},
        {"causal": True, "num_splits": 3},
    ],
    ids=["full", "window", "causal_window", "softcap", "scale", "causal_splits"],
)
def test_paged_options(options) -> None:
    run_paged(paged(make_call(seqlen_q=7, rotary_dim=64), 16), "paged options", **options)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_alibi_and_sink(num_splits) -> None:
    """The sink joins the softmax once: in the kernel's output with one split, in the combine
    with several."""
    args = paged(make_call(seqlen_q=3), 16)
    nheads = args["q"].shape[2]
    slopes = torch.rand(BATCH, nheads, generator=torch.Generator().manual_seed(3))
    sink = torch.randn(nheads, generator=torch.Generator().manual_seed(4))
    run_paged(
        args,
        "paged alibi sink",
        causal=True,
        num_splits=num_splits,
        alibi_slopes=(slopes * ALIBI_SLOPE_SCALE).to(DEVICE),
        learnable_sink=sink.to(DEVICE),
    )


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_empty_caches(num_splits) -> None:
    """No key anywhere, split or not: out exactly 0, softmax_lse -inf, nothing NaN."""
    args = paged(make_call(seqlen_q=3, seqlen_new=0, lengths=[0] * BATCH), 16)
    run_paged(args, "paged empty", num_splits=num_splits)
    out, lse = _flash_varlen().flash_attn_with_kvcache(
        **args, return_softmax_lse=True, num_splits=num_splits
    )
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_paged_long_query_chunk() -> None:
    """More than 16 query tokens over a paged cache: several row blocks, causal."""
    args = paged(make_call(seqlen_q=40, seqlen_new=40, lengths=[0, 50, 200, 293]), 64)
    run_paged(args, "paged 40 tokens", causal=True)


def test_contiguous_decode_runs_the_decode_kernels(monkeypatch) -> None:
    """A contiguous call of up to 16 tokens does not reach the varlen forward when the decode
    kernels are built."""
    require_decode_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    from flash_varlen import kvcache

    def varlen_must_not_run(*args):
        raise AssertionError("the varlen forward ran a decode call")

    monkeypatch.setattr(kvcache, "_varlen_forward", varlen_must_not_run)
    run_and_check(make_call(seqlen_q=4, rotary_dim=64), "decode path", causal=True)


def test_paged_cuda_graph_replays_with_new_lengths_and_tables() -> None:
    """A paged decode step with split-KV captured once and replayed after writing new queries,
    keys, values, lengths and block tables into its static buffers: each replay equals an eager
    call bitwise and the reference within the tolerance rule."""
    require_decode_kernel(DEFAULT_DTYPE, DEFAULT_HEAD_DIM)
    page_size = 16
    static = paged(make_call(seqlen_q=GRAPH_SEQLEN_NEW, lengths=GRAPH_LENGTHS[0]), page_size)
    options = {"causal": True, "return_softmax_lse": True, "num_splits": 3}

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return _flash_varlen().flash_attn_with_kvcache(**static, **options)

    graph, (static_out, static_lse) = capture_graph(step)

    for seed, lengths in enumerate(GRAPH_LENGTHS, start=1):
        fresh = paged(
            make_call(seqlen_q=GRAPH_SEQLEN_NEW, lengths=lengths, seed=seed), page_size, seed
        )
        names = ("q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table")
        label = f"paged replay {seed}"
        check_replay(graph, static, (static_out, static_lse), fresh, names, options, label)


# ----------------------------------------------------------------------------------------------
# The decode op's append kernel against the torch steps it replaces, bit for bit

class AppendCase(NamedTuple):
    page_size: int | None  # None: a contiguous cache (with cache_batch_idx)
    rotary_dim: int  # 0: no rotary tables
    interleaved: bool
    float32_tables: bool
    options: dict[str, Any]
    dtype: torch.dtype = DEFAULT_DTYPE
    head_dim: int = DEFAULT_HEAD_DIM
    seqlen_q: int = 5
    seqlen_new: int = 5


APPEND_CASES = {
    "contiguous_batch_idx": AppendCase(None, 64, True, False, {"causal": True}, seqlen_q=1,
                                       seqlen_new=1),
    # rotary_dim not a multiple of 8; non-causal: every query at one position
    "rotary_dim_10_one_position": AppendCase(None, 10, False, True, {}),
    "neox_whole_head_paged_16": AppendCase(16, 128, False, False, {"causal": True}),
    "page_size_1": AppendCase(1, 64, True, True, {"causal": True}),
    "no_rotary": AppendCase(64, 0, True, False, {"causal": True}),
    # a window without causal: the queries at consecutive positions
    "local_window": AppendCase(16, 32, True, False, {"window_size": (40, 40)}),
    "fp16_d64": AppendCase(16, 64, False, True, {"causal": True}, torch.float16, 64, 2, 2),
    # fewer new keys than queries, and more (paged calls always take the decode kernels)
    "fewer_new_keys": AppendCase(16, 64, True, False, {"causal": True}, seqlen_new=1),
    "more_new_keys": AppendCase(16, 64, False, False, {}, seqlen_q=2, seqlen_new=3),
}


@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_append_kernel_matches_the_torch_steps(monkeypatch, case: str) -> None:
    """The caches after the decode op's append kernel, and its output, equal bit for bit those
    of the torch steps (kvcache.append_and_rotate) followed by the same op without new keys:
    the same cells written with the same rotated bits, and the same rotated queries (an
    attention over different query bits would give different output bits). q, k and v are
    non-contiguous views of three different layouts; the op is checked to have received the new
    keys (the fused path ran)."""
    from flash_varlen import kvcache, kvcache_decode, ops

    spec = APPEND_CASES[case]
    head_dim = spec.head_dim
    require_decode_kernel(spec.dtype, head_dim)
    # Lengths that leave room for the queries' rotary positions (cache_seqlens + seqlen_q - 1).
    room = SEQLEN_CACHE - max(spec.seqlen_q, spec.seqlen_new)
    args = make_call(
        dtype=spec.dtype,
        head_dim=head_dim,
        seqlen_q=spec.seqlen_q,
        seqlen_new=spec.seqlen_new,
        rotary_dim=spec.rotary_dim,
        batch_idx=spec.page_size is None,
        lengths=[0, room, room // 2, 17],
    )
    if spec.page_size is not None:
        args = paged(args, spec.page_size)
    if spec.float32_tables and spec.rotary_dim:
        args["rotary_cos"] = args["rotary_cos"].float()
        args["rotary_sin"] = args["rotary_sin"].float()
    # q: a padded head stride; k: a (batch, heads, seqlen, d) buffer seen transposed; v: every
    # other head of a wider tensor.
    args["q"] = torch.cat((args["q"], torch.zeros_like(args["q"])), dim=-1)[..., :head_dim]
    args["k"] = args["k"].transpose(1, 2).contiguous().transpose(1, 2)
    args["v"] = torch.repeat_interleave(args["v"], 2, dim=2)[:, :, ::2]
    assert len({args[name].stride() for name in ("q", "k", "v")}) == 3
    assert not any(args[name].is_contiguous() for name in ("q", "v"))
    options = {**spec.options, "rotary_interleaved": spec.interleaved}
    fused_caches = {name: args[name].clone() for name in ("k_cache", "v_cache")}
    torch_caches = {name: args[name].clone() for name in ("k_cache", "v_cache")}

    received = []
    op = ops.kvcache_fwd_eager

    def spy(*op_args, **op_kwargs):
        received.append(op_kwargs["k_new"])
        return op(*op_args, **op_kwargs)

    monkeypatch.setattr(ops, "kvcache_fwd_eager", spy)
    fused = _flash_varlen().flash_attn_with_kvcache(**{**args, **fused_caches}, **options)
    assert len(received) == 1 and received[0] is not None

    # The same call, checked by the public function, its op replaced by the torch steps.
    def torch_steps(call, cache_lengths):
        q, key_ends = kvcache.append_and_rotate(call, cache_lengths)
        appended = dataclasses.replace(
            call, q=q, k=None, v=None, rotary_cos=None, rotary_sin=None
        )
        return kvcache_decode.decode_attention(appended, key_ends.to(torch.int32))

    monkeypatch.setattr(kvcache, "_decode_attention", torch_steps)
    expected = _flash_varlen().flash_attn_with_kvcache(**{**args, **torch_caches}, **options)

    for name in ("k_cache", "v_cache"):
        assert_bitwise_equal(fused_caches[name], torch_caches[name], f"{case} {name}")
    assert_bitwise_equal(fused, expected, f"{case} out")
