"""flash_attn_with_kvcache on the CPU: validation, the reference, the append, the routing.

- Every validation rule, through the public function with CPU tensors: each broken input raises
  its own error (type and message checked) before the device check would.
- The reference (``reference.attention_ref_kvcache``) against an independent naive computation
  written here with explicit loops (rotary by the textbook formula, masks by their
  definitions), and its properties: a paged cache equals the contiguous cache its pages gather
  into (page sizes 1, 16, 64, random block tables, appends across page boundaries),
  cache_batch_idx equals indexing the cache, cache_leftpad equals a cache shifted left.
- ``append_to_cache`` itself: exactly the expected cells change, contiguous and paged, and an
  append outside the cache raises instead of writing elsewhere.
- The public function end to end, with the kernel call replaced by a fake that checks what the
  varlen kernel would be handed (the cache read in place, int32 index tensors, used lengths) and
  computes each sequence with the float32 reference as the kernel's SeqlenInfo would read it
  (first key row cu_seqlens_k[b], seqused_k[b] keys), and the device check let through for CPU
  tensors (as tests/test_autograd_cpu.py does).
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_varlen
from accuracy import FORWARD_FACTOR, assert_lse_within_tolerance, assert_within_tolerance
from cpu_checks import raises
from flash_varlen import kvcache, reference, validation
from flash_varlen.kvcache_validation import check_kvcache_inputs, check_kvcache_values

BATCH, SEQLEN_Q, NHEADS, NHEADS_K, HEAD_DIM = 3, 2, 4, 2, 16
SEQLEN_CACHE = 24
SEQLEN_NEW = 2
ROTARY_HALF = 4  # rotary_dim 8 of head dim 16: some dims are left unrotated
PAGE_SIZES = (1, 16, 64)
DTYPE = torch.float16


def randn(*shape: int, dtype: torch.dtype = DTYPE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def rotary_tables(seqlen_ro: int, half: int = ROTARY_HALF, seed: int = 7):
    """cos, sin of random angles (float32), as a model's position tables would be."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(seqlen_ro, half, generator=generator) * 2 * math.pi
    return torch.cos(angles), torch.sin(angles)


def call_args(
    *,
    seqlen_q: int = SEQLEN_Q,
    seqlen_cache: int = SEQLEN_CACHE,
    seqlen_new: int = SEQLEN_NEW,
    **changes,
) -> dict:
    """Valid arguments of flash_attn_with_kvcache (valid except for the device on the CPU),
    with ``changes`` applied."""
    cos, sin = rotary_tables(seqlen_cache)
    args = {
        "q": randn(BATCH, seqlen_q, NHEADS, HEAD_DIM, seed=1),
        "k_cache": randn(BATCH, seqlen_cache, NHEADS_K, HEAD_DIM, seed=2),
        "v_cache": randn(BATCH, seqlen_cache, NHEADS_K, HEAD_DIM, seed=3),
        "k": randn(BATCH, seqlen_new, NHEADS_K, HEAD_DIM, seed=4),
        "v": randn(BATCH, seqlen_new, NHEADS_K, HEAD_DIM, seed=5),
        "rotary_cos": cos,
        "rotary_sin": sin,
        "cache_seqlens": int32([3, 0, 10]),
    }
    args.update(changes)
    return args


def paged_args(page_size: int = 8, max_pages: int = 3, num_pages: int = 10, **changes) -> dict:
    """Valid arguments with a paged cache (k_cache (num_pages, page_size, ...))."""
    cos, sin = rotary_tables(page_size * max_pages)
    table = torch.arange(BATCH * max_pages, dtype=torch.int32).view(BATCH, max_pages) % num_pages
    paged = {
        "k_cache": randn(num_pages, page_size, NHEADS_K, HEAD_DIM, seed=2),
        "v_cache": randn(num_pages, page_size, NHEADS_K, HEAD_DIM, seed=3),
        "block_table": table,
        "rotary_cos": cos,
        "rotary_sin": sin,
    }
    return call_args(**{**paged, **changes})


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def broken(name: str, value) -> dict:
    return call_args(**{name: value})


VALIDATION_CASES = [
    # q and the cache
    (
        broken("q", randn(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.float32)),
        TypeError,
        ("q must have dtype torch.float16 or torch.bfloat16",),
    ),
    (
        broken("k_cache", randn(BATCH, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16)),
        TypeError,
        ("k_cache must have the same dtype as q",),
    ),
    (
        broken("q", randn(BATCH * SEQLEN_Q, NHEADS, HEAD_DIM)),
        ValueError,
        ("q must have 4 dims (batch, seqlen_q, nheads, headdim)",),
    ),
    (
        broken("k_cache", randn(BATCH, SEQLEN_CACHE, HEAD_DIM)),
        ValueError,
        ("k_cache must have 4 dims (batch_cache, seqlen_cache, nheads_k, headdim)",),
    ),
    (
        broken("v_cache", randn(BATCH, SEQLEN_CACHE, NHEADS_K, 2 * HEAD_DIM)),
        ValueError,
        ("v_cache.shape[-1] (head dim) must equal q.shape[-1] (16)",),
    ),
    (
        broken("k_cache", randn(BATCH, SEQLEN_CACHE, 3, HEAD_DIM)),
        ValueError,
        ("v_cache.shape[-2] (nheads_k) must equal k_cache.shape[-2] (3)",),
    ),
    (
        call_args(
            k_cache=randn(BATCH, SEQLEN_CACHE, 3, HEAD_DIM),
            v_cache=randn(BATCH, SEQLEN_CACHE, 3, HEAD_DIM),
        ),
        ValueError,
        ("nheads (q.shape[-2] = 4) must be a multiple of nheads_k",),
    ),
    (
        broken("v_cache", randn(BATCH, SEQLEN_CACHE + 1, NHEADS_K, HEAD_DIM)),
        ValueError,
        ("v_cache must have the shape of k_cache",),
    ),
    (
        broken("q", randn(BATCH, 0, NHEADS, HEAD_DIM)),
        ValueError,
        ("q.shape[1] (seqlen_q) must be positive",),
    ),
    (
        broken("k_cache", randn(BATCH, SEQLEN_CACHE, NHEADS_K, HEAD_DIM + 4)[..., :HEAD_DIM]),
        ValueError,
        ("k_cache.stride(2) must be a multiple of 8",),
    ),
    # A cache whose entries are 2.5 rows of another layout apart cannot be read as rows.
    (
        broken(
            "k_cache",
            torch.zeros(2 * BATCH * SEQLEN_CACHE * NHEADS_K * HEAD_DIM, dtype=DTYPE).as_strided(
                (BATCH, SEQLEN_CACHE, NHEADS_K, HEAD_DIM),
                (NHEADS_K * HEAD_DIM * SEQLEN_CACHE + 8, NHEADS_K * HEAD_DIM, HEAD_DIM, 1),
            ),
        ),
        ValueError,
        ("k_cache.stride(0) must be a whole number (>= seqlen_cache) of rows",),
    ),
    (
        broken("v_cache", randn(BATCH, 2 * SEQLEN_CACHE, NHEADS_K, HEAD_DIM)[:, :SEQLEN_CACHE]),
        ValueError,
        ("v_cache's entries must be as many rows apart as k_cache's (24", "got 48"),
    ),
    (
        broken("k_cache", randn(BATCH - 1, SEQLEN_CACHE, NHEADS_K, HEAD_DIM)),
        ValueError,
        ("v_cache must have the shape of k_cache",),
    ),
    (
        call_args(
            k_cache=randn(BATCH - 1, SEQLEN_CACHE, NHEADS_K, HEAD_DIM),
            v_cache=randn(BATCH - 1, SEQLEN_CACHE, NHEADS_K, HEAD_DIM),
        ),
        ValueError,
        ("k_cache.shape[0] (batch_cache) = 2 must be at least q.shape[0] (batch) = 3",),
    ),
    # Index tensors
    (
        broken("cache_seqlens", torch.tensor([3, 0, 10])),
        TypeError,
        ("cache_seqlens must have dtype torch.int32",),
    ),
    (
        broken("cache_seqlens", int32([3, 0])),
        ValueError,
        ("cache_seqlens must have one entry per sequence, shape (batch,) = (3,)",),
    ),
    (
        broken("cache_seqlens", SEQLEN_CACHE - SEQLEN_NEW + 1),
        ValueError,
        ("cache_seqlens = 23 must be in [0, 22]",),
    ),
    (broken("cache_seqlens", -1), ValueError, ("cache_seqlens = -1 must be in [0, 22]",)),
    (broken("cache_seqlens", 2.0), TypeError, ("cache_seqlens must be an int or an int32",)),
    (
        broken("cache_batch_idx", int32([[0, 1, 2]])),
        ValueError,
        ("cache_batch_idx must be 1-D (batch,)",),
    ),
    (
        broken("cache_batch_idx", torch.tensor([0, 1, 2])),
        TypeError,
        ("cache_batch_idx must have dtype torch.int32",),
    ),
    (
        broken("cache_leftpad", int32([0, 0])),
        ValueError,
        ("cache_leftpad must have one entry per sequence",),
    ),
    # New keys and values
    (call_args(v=None), ValueError, ("k and v must be given together: got k but v is None",)),
    (
        call_args(k=None, rotary_cos=None, rotary_sin=None),
        ValueError,
        ("k and v must be given together: got v but k is None",),
    ),
    (
        broken("k", randn(BATCH, SEQLEN_NEW, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16)),
        TypeError,
        ("k must have the dtype of q",),
    ),
    (
        broken("k", randn(BATCH, SEQLEN_NEW, NHEADS, HEAD_DIM)),
        ValueError,
        ("k must have shape (batch, seqlen_new, nheads_k, headdim) = (3, seqlen_new, 2, 16)",),
    ),
    (
        broken("v", randn(BATCH, SEQLEN_NEW + 1, NHEADS_K, HEAD_DIM)),
        ValueError,
        ("v must have the shape of k",),
    ),
    (broken("cache_seqlens", None), ValueError, ("cache_seqlens must be given with k and v",)),
    # Rotary
    (call_args(k=None, v=None), ValueError, ("rotary_cos and rotary_sin need k and v",)),
    (
        broken("rotary_sin", None),
        ValueError,
        ("rotary_cos and rotary_sin must be given together: got rotary_cos",),
    ),
    (
        broken("rotary_cos", torch.zeros(SEQLEN_CACHE, ROTARY_HALF, dtype=torch.float64)),
        TypeError,
        ("rotary_cos must have the dtype of q (torch.float16) or torch.float32",),
    ),
    (
        broken("rotary_sin", torch.zeros(SEQLEN_CACHE, ROTARY_HALF + 1)),
        ValueError,
        ("rotary_sin must have the shape and dtype of rotary_cos",),
    ),
    (
        call_args(
            rotary_cos=torch.zeros(SEQLEN_CACHE, HEAD_DIM),
            rotary_sin=torch.zeros(SEQLEN_CACHE, HEAD_DIM),
        ),
        ValueError,
        ("rotary_cos.shape[1] (rotary_dim / 2) must be in [1, headdim / 2 = 8], got 16",),
    ),
    (
        call_args(
            rotary_cos=torch.zeros(SEQLEN_CACHE - 1, ROTARY_HALF),
            rotary_sin=torch.zeros(SEQLEN_CACHE - 1, ROTARY_HALF),
        ),
        ValueError,
        ("rotary_cos.shape[0] (seqlen_ro) must be at least the cache capacity (24",),
    ),
    (
        broken("rotary_cos", torch.zeros(SEQLEN_CACHE)),
        ValueError,
        ("rotary_cos must have 2 dims (seqlen_ro, rotary_dim / 2)",),
    ),
    # Flags and options
    (broken("num_splits", -1), ValueError, ("num_splits must be >= 0",)),
    (broken("num_splits", 1.5), TypeError, ("num_splits must be an int",)),
    (broken("return_softmax_lse", 1), TypeError, ("return_softmax_lse must be a bool",)),
    (broken("rotary_interleaved", None), TypeError, ("rotary_interleaved must be a bool",)),
    (broken("softcap", -1.0), ValueError, ("softcap must be finite and >= 0",)),
    (broken("softmax_scale", 0.0), ValueError, ("softmax_scale must be finite and positive",)),
    (broken("window_size", (-2, 0)), ValueError, ("window_size sides must be",)),
    (
        broken("alibi_slopes", torch.zeros(NHEADS + 1)),
        ValueError,
        ("alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = (3, 4)",),
    ),
    (
        broken("learnable_sink", torch.zeros(NHEADS, dtype=torch.float16)),
        TypeError,
        ("learnable_sink must have dtype torch.float32",),
    ),
    # Paged caches
    (
        paged_args(block_table=torch.zeros(BATCH, 3, dtype=torch.int64)),
        TypeError,
        ("block_table must have dtype torch.int32",),
    ),
    (
        paged_args(block_table=torch.zeros(BATCH + 1, 3, dtype=torch.int32)),
        ValueError,
        ("block_table must have shape (batch, max_pages) with batch = q.shape[0] = 3",),
    ),
    (
        paged_args(cache_batch_idx=int32([0, 1, 2])),
        ValueError,
        ("cache_batch_idx cannot be combined with block_table",),
    ),
    (
        paged_args(cache_leftpad=int32([0, 0, 0])),
        ValueError,
        ("cache_leftpad cannot be combined with block_table",),
    ),
    (
        paged_args(k_cache=randn(10, 8, HEAD_DIM), v_cache=randn(10, 8, HEAD_DIM)),
        ValueError,
        ("k_cache must have 4 dims (num_pages, page_size, nheads_k, headdim)",),
    ),
    (paged_args(cache_seqlens=23), ValueError, ("cache_seqlens = 23 must be in [0, 22]",)),
]


@pytest.mark.parametrize(("args", "kind", "fragments"), VALIDATION_CASES)
def test_validation_errors(args: dict, kind: type[Exception], fragments: tuple[str, ...]) -> None:
    with raises(kind, *fragments):
        flash_varlen.flash_attn_with_kvcache(**args)


def test_valid_cpu_call_reaches_the_device_check() -> None:
    """Every other rule passes: what remains is the device."""
    with raises(ValueError, "q must be a CUDA tensor"):
        flash_varlen.flash_attn_with_kvcache(**call_args())


def test_valid_paged_cpu_call_reaches_the_device_check() -> None:
    """A paged cache passes every other rule too (the decode kernels read it)."""
    with raises(ValueError, "q must be a CUDA tensor"):
        flash_varlen.flash_attn_with_kvcache(**paged_args())


def test_nothing_is_written_before_an_error() -> None:
    args = call_args(num_splits=-1)
    before = args["k_cache"].clone()
    with pytest.raises(ValueError):
        flash_varlen.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before)


def checked(**args):
    """The checked call of ``args`` (keyword form of the public function's arguments)."""
    shared = {
        "softmax_scale": args.pop("softmax_scale", None),
        "causal": args.pop("causal", False),
        "window_size": args.pop("window_size", (-1, -1)),
        "softcap": args.pop("softcap", 0.0),
        "alibi_slopes": args.pop("alibi_slopes", None),
        "learnable_sink": args.pop("learnable_sink", None),
    }
    names = (
        "q",
        "k_cache",
        "v_cache",
        "k",
        "v",
        "rotary_cos",
        "rotary_sin",
        "cache_seqlens",
        "cache_batch_idx",
        "cache_leftpad",
        "block_table",
    )
    values = [args.pop(name, None) for name in names]
    flags = [
        args.pop("rotary_interleaved", True),
        args.pop("num_splits", 0),
        args.pop("return_softmax_lse", False),
    ]
    assert not args, args
    return check_kvcache_inputs(*values, *flags, shared)


DEBUG_CASES = [
    (call_args(cache_seqlens=int32([3, 23, 0])), ("cache_seqlens[1] = 23 must be in [0, 22]",)),
    (call_args(cache_seqlens=int32([3, -1, 0])), ("cache_seqlens[1] = -1 must be in [0, 22]",)),
    (
        call_args(cache_batch_idx=int32([0, 3, 1])),
        ("cache_batch_idx[1] = 3 must be in [0, 3) (k_cache.shape[0], batch_cache)",),
    ),
    (call_args(cache_leftpad=int32([4, 0, 0])), ("cache_leftpad[0] = 4 must be in [0, 3]",)),
    (call_args(cache_leftpad=int32([0, 0, -1])), ("cache_leftpad[2] = -1 must be in [0, 10]",)),
    # Sequence 2 holds 10 + 2 keys: pages 0 and 1 of 8 slots.
    (
        paged_args(block_table=int32([[0, 1, 2], [3, 4, 5], [6, 10, 7]])),
        ("block_table[2, 1] = 10 must be in [0, 10)", "its first 2 pages"),
    ),
    (
        paged_args(block_table=int32([[-1, 1, 2], [3, 4, 5], [6, 7, 8]])),
        ("block_table[0, 0] = -1 must be in [0, 10)",),
    ),
    # Causal: q row 1 of sequence 2 is rotated at 10 + 1; the tables have 11 positions.
    (
        call_args(
            rotary_cos=rotary_tables(SEQLEN_CACHE)[0][:11],
            rotary_sin=rotary_tables(SEQLEN_CACHE)[1][:11],
            k_cache=randn(BATCH, 11, NHEADS_K, HEAD_DIM),
            v_cache=randn(BATCH, 11, NHEADS_K, HEAD_DIM),
            cache_seqlens=int32([3, 0, 9]),
            k=randn(BATCH, 1, NHEADS_K, HEAD_DIM),
            v=randn(BATCH, 1, NHEADS_K, HEAD_DIM),
            q=randn(BATCH, 3, NHEADS, HEAD_DIM),
            causal=True,
        ),
        (
            (
                "rotary_cos has 11 positions, but query 2 of sequence 2 is rotated at position "
                "cache_seqlens[2] + 2 = 11"
            ),
        ),
    ),
]


@pytest.mark.parametrize(("args", "fragments"), DEBUG_CASES)
def test_debug_value_checks(args: dict, fragments: tuple[str, ...]) -> None:
    with raises(ValueError, *fragments):
        check_kvcache_values(checked(**args))


@pytest.mark.parametrize(
    "args",
    [
        call_args(),
        call_args(
            cache_seqlens=None,
            k=None,
            v=None,
            rotary_cos=None,
            rotary_sin=None,
            cache_leftpad=int32([SEQLEN_CACHE, 0, 5]),
        ),
        call_args(
            cache_seqlens=int32([22, 0, 0]),
            cache_leftpad=int32([22, 0, 0]),
            cache_batch_idx=int32([2, 2, 0]),
        ),
        # Sequence 0 holds 3 + 2 keys (page 0 only): its unused entries may be anything.
        paged_args(block_table=int32([[0, -1, 99], [1, -1, -1], [2, 3, -1]])),
    ],
)
def test_debug_value_checks_accept_valid_values(args: dict) -> None:
    check_kvcache_values(checked(**args))


@pytest.mark.parametrize("debug", [False, True])
def test_value_checks_run_only_in_debug_mode(monkeypatch, debug: bool) -> None:
    """Value checks read the device: they run only with FLASH_VARLEN_DEBUG=1, before the device
    check (so the bad value is what is reported)."""
    if debug:
        monkeypatch.setenv(validation.DEBUG_ENV_VAR, "1")
    else:
        monkeypatch.delenv(validation.DEBUG_ENV_VAR, raising=False)
    args = call_args(cache_seqlens=int32([3, 23, 0]))
    expected = "cache_seqlens[1] = 23" if debug else "q must be a CUDA tensor"
    with raises(ValueError, expected):
        flash_varlen.flash_attn_with_kvcache(**args)


# ----------------------------------------------------------------------------------------------
# Rotary embedding: the textbook formula, one element at a time
# ----------------------------------------------------------------------------------------------


def rotary_explicit(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[int], interleaved: bool
) -> torch.Tensor:
    """x (seqlen, nheads, d) in float64: for each pair (a, b) of dims with angle index i,
    a' = a cos - b sin, b' = a sin + b cos, with cos = cos[position, i]."""
    half = cos.shape[1]
    result = x.double().clone()
    for s, position in enumerate(positions):
        for h in range(x.shape[1]):
            for i in range(half):
                a_dim, b_dim = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                a, b = float(x[s, h, a_dim]), float(x[s, h, b_dim])
                c, n = float(cos[position, i]), float(sin[position, i])
                result[s, h, a_dim] = a * c - b * n
                result[s, h, b_dim] = a * n + b * c
    return result


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_reference_matches_the_formula(interleaved: bool) -> None:
    x = randn(5, 3, HEAD_DIM, dtype=torch.float32)
    cos, sin = rotary_tables(20)
    positions = [0, 7, 7, 19, 2]
    expected = rotary_explicit(x, cos, sin, positions, interleaved)
    actual = reference.rotary_ref(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(actual[..., 2 * ROTARY_HALF :], x[..., 2 * ROTARY_HALF :])


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_of_the_implementation_matches_the_formula(interleaved: bool) -> None:
    x = randn(2, 4, 3, HEAD_DIM, dtype=torch.float32)
    cos, sin = rotary_tables(20)
    positions = torch.tensor([[0, 1, 2, 3], [9, 9, 9, 19]])
    actual = kvcache.apply_rotary(x, kvcache.RotaryTables(cos, sin, interleaved), positions)
    for b in range(2):
        expected = rotary_explicit(x[b], cos, sin, positions[b].tolist(), interleaved)
        torch.testing.assert_close(actual[b].double(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The reference against a naive computation
# ----------------------------------------------------------------------------------------------


def naive_kvcache_attention(
    args: dict,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi: torch.Tensor | None = None,
    interleaved: bool = True,
):
    """out (batch, seqlen_q, nheads, d) float64 and lse (batch, nheads, seqlen_q), from the
    definitions: keys gathered position by position (contiguous caches only), scores one pair
    at a time, masks by their formulas."""
    q, k_cache, v_cache = args["q"], args["k_cache"].double(), args["v_cache"].double()
    cache_dtype = args["k_cache"].dtype
    k, v, cos, sin = args.get("k"), args.get("v"), args.get("rotary_cos"), args.get("rotary_sin")
    batch, seqlen_q, nheads, head_dim = q.shape
    group = nheads // k_cache.shape[2]
    seqlens = args.get("cache_seqlens")
    seqlen_new = 0 if k is None else k.shape[1]
    idx = args.get("cache_batch_idx")
    leftpad = args.get("cache_leftpad")
    out = torch.zeros(batch, seqlen_q, nheads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, nheads, seqlen_q), -math.inf, dtype=torch.float64)
    consecutive = causal or window != (-1, -1)
    for b in range(batch):
        entry = b if idx is None else int(idx[b])
        length = k_cache.shape[1] if seqlens is None else int(seqlens[b])
        keys, values = k_cache[entry].clone(), v_cache[entry].clone()
        if k is not None:
            new_k = k[b].double()
            if cos is not None:
                new_k = rotary_explicit(
                    k[b], cos, sin, list(range(length, length + seqlen_new)), interleaved
                )
            # Stored in the cache's dtype, then attended to as stored.
            keys[length : length + seqlen_new] = new_k.to(cache_dtype).double()
            values[length : length + seqlen_new] = v[b].double()
        start = 0 if leftpad is None else int(leftpad[b])
        keys, values = keys[start : length + seqlen_new], values[start : length + seqlen_new]
        seqlen_k = keys.shape[0]
        queries = q[b].double()
        if cos is not None:
            positions = [length + (i if consecutive else 0) for i in range(seqlen_q)]
            queries = rotary_explicit(q[b], cos, sin, positions, interleaved)
        left, right = window[0], 0 if causal else window[1]
        for h in range(nheads):
            for i in range(seqlen_q):
                diagonal = i + seqlen_k - seqlen_q
                scores = {}
                for j in range(seqlen_k):
                    if (right != -1 and j > diagonal + right) or (
                        left != -1 and j < diagonal - left
                    ):
                        continue
                    s = float(queries[i, h] @ keys[j, h // group]) / math.sqrt(head_dim)
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        s -= float(alibi[h]) * abs(diagonal - j)
                    scores[j] = s
                if not scores:
                    continue
                top = max(scores.values())
                total = sum(math.exp(s - top) for s in scores.values())
                lse[b, h, i] = top + math.log(total)
                for j, s in scores.items():
                    out[b, i, h] += math.exp(s - top) / total * values[j, h // group]
    return out, lse


NAIVE_CASES = {
    "plain": ({}, {}),
    "causal_rotary_gqa": ({}, {"causal": True}),
    "window_not_interleaved": ({}, {"window": (3, 1), "interleaved": False}),
    "softcap_alibi": ({}, {"softcap": 2.0, "alibi": torch.tensor([0.5, 0.25, 0.1, 0.0])}),
    "batch_idx_leftpad": (
        {
            "k_cache": randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=2),
            "v_cache": randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=3),
            "cache_batch_idx": int32([4, 0, 2]),
            "cache_leftpad": int32([2, 0, 7]),
        },
        {"causal": True},
    ),
    "mqa_no_new_keys": (
        {
            "k_cache": randn(BATCH, SEQLEN_CACHE, 1, HEAD_DIM, seed=2),
            "v_cache": randn(BATCH, SEQLEN_CACHE, 1, HEAD_DIM, seed=3),
            "k": None,
            "v": None,
            "rotary_cos": None,
            "rotary_sin": None,
        },
        {"causal": True},
    ),
    "full_caches": (
        {"k": None, "v": None, "rotary_cos": None, "rotary_sin": None, "cache_seqlens": None},
        {"window": (5, 0)},
    ),
}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_reference_matches_the_naive_computation(case: str) -> None:
    changes, options = NAIVE_CASES[case]
    args = call_args(**changes)
    expected_out, expected_lse = naive_kvcache_attention(args, **options)
    result = reference.attention_ref_kvcache(
        **args,
        causal=options.get("causal", False),
        window_size=options.get("window", (-1, -1)),
        softcap=options.get("softcap", 0.0),
        alibi_slopes=options.get("alibi"),
        rotary_interleaved=options.get("interleaved", True),
    )
    torch.testing.assert_close(result.out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.softmax_lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqlen_q", [1, 2, 5, 16])
def test_reference_seqlen_q_1_to_16_causal(seqlen_q: int) -> None:
    """Speculative decoding: seqlen_q new queries with seqlen_q new keys, causal, rotary."""
    args = call_args(
        seqlen_q=seqlen_q, seqlen_new=seqlen_q, cache_seqlens=int32([0, 3, SEQLEN_CACHE - seqlen_q])
    )
    expected_out, expected_lse = naive_kvcache_attention(args, causal=True)
    result = reference.attention_ref_kvcache(**args, causal=True)
    torch.testing.assert_close(result.out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.softmax_lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_reference_empty_caches() -> None:
    """No key at all (empty caches, nothing appended): out 0 and LSE -inf, or the sink."""
    args = call_args(k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=0)
    result = reference.attention_ref_kvcache(**args)
    assert torch.equal(result.out, torch.zeros_like(result.out))
    assert bool(torch.isneginf(result.softmax_lse).all())
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with_sink = reference.attention_ref_kvcache(**args, learnable_sink=sink)
    assert torch.equal(with_sink.out, torch.zeros_like(with_sink.out))
    assert torch.equal(with_sink.softmax_lse, sink.view(1, NHEADS, 1).expand(BATCH, -1, SEQLEN_Q))


def test_reference_does_not_modify_its_inputs() -> None:
    args = call_args()
    before = {
        name: value.clone() for name, value in args.items() if isinstance(value, torch.Tensor)
    }
    reference.attention_ref_kvcache(**args)
    for name, value in before.items():
        assert torch.equal(args[name], value), name


# ----------------------------------------------------------------------------------------------
# Paged caches: the reference and the append
# ----------------------------------------------------------------------------------------------


def paginate(cache: torch.Tensor, page_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged copy of a contiguous cache (batch, capacity, ...), capacity a multiple of
    page_size: (pages, block_table) with every page at a random place in a pool that also holds
    unused pages of noise."""
    batch, capacity = cache.shape[:2]
    max_pages = capacity // page_size
    num_pages = batch * max_pages + 3
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_pages, generator=generator)[: batch * max_pages]
    block_table = order.view(batch, max_pages).to(torch.int32)
    pages = randn(num_pages, page_size, *cache.shape[2:], seed=seed + 1)
    pages[block_table.long()] = cache.view(batch, max_pages, page_size, *cache.shape[2:])
    return pages, block_table


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The contiguous (batch, max_pages * page_size, ...) view of what the block table names."""
    return pages[block_table.long()].flatten(1, 2)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_paged_reference_equals_contiguous(page_size: int, interleaved: bool) -> None:
    """Same keys through a random block table: same out and LSE; the appended pages gather to
    the appended contiguous cache (appends cross page boundaries: lengths 0, 15, 63 + 3 new)."""
    capacity = 2 * max(PAGE_SIZES)
    seqlen_new = 3
    contiguous = call_args(
        seqlen_q=3,
        seqlen_cache=capacity,
        seqlen_new=seqlen_new,
        cache_seqlens=int32([0, 15, 63]),
        causal=True,
        rotary_interleaved=interleaved,
    )
    k_pages, block_table = paginate(contiguous["k_cache"], page_size, seed=10)
    v_pages, _ = paginate(contiguous["v_cache"], page_size, seed=10)
    paged = {**contiguous, "k_cache": k_pages, "v_cache": v_pages, "block_table": block_table}
    expected = reference.attention_ref_kvcache(**contiguous)
    actual = reference.attention_ref_kvcache(**paged)
    torch.testing.assert_close(actual.out, expected.out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual.softmax_lse, expected.softmax_lse, atol=1e-6, rtol=1e-6)
    assert torch.equal(gather_pages(actual.k_cache, block_table), expected.k_cache)
    assert torch.equal(gather_pages(actual.v_cache, block_table), expected.v_cache)
    unused = torch.ones(k_pages.shape[0], dtype=torch.bool)
    unused[block_table.flatten().long()] = False
    assert torch.equal(actual.k_cache[unused], k_pages[unused])


def test_reference_cache_batch_idx_equals_indexing_the_cache() -> None:
    args = call_args(
        k_cache=randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=2),
        v_cache=randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=3),
        cache_batch_idx=int32([3, 0, 4]),
    )
    rows = args["cache_batch_idx"].long()
    direct = {
        **args,
        "cache_batch_idx": None,
        "k_cache": args["k_cache"][rows],
        "v_cache": args["v_cache"][rows],
    }
    expected = reference.attention_ref_kvcache(**direct, causal=True)
    actual = reference.attention_ref_kvcache(**args, causal=True)
    torch.testing.assert_close(actual.out, expected.out, atol=0, rtol=0)
    assert torch.equal(actual.k_cache[rows], expected.k_cache)
    untouched = torch.tensor([1, 2])
    assert torch.equal(actual.k_cache[untouched], args["k_cache"][untouched])


def test_reference_leftpad_equals_a_cache_shifted_left() -> None:
    """Without rotary (whose positions leftpad does not shift), left padding p is the cache
    moved p positions left with p fewer keys."""
    pads = [2, 0, 9]
    args = call_args(
        rotary_cos=None, rotary_sin=None, cache_leftpad=int32(pads), cache_seqlens=int32([3, 0, 10])
    )
    shifted = {
        **args,
        "cache_leftpad": None,
        "k_cache": args["k_cache"].clone(),
        "v_cache": args["v_cache"].clone(),
        "cache_seqlens": args["cache_seqlens"] - int32(pads),
    }
    for b, pad in enumerate(pads):
        for name in ("k_cache", "v_cache"):
            shifted[name][b, : SEQLEN_CACHE - pad] = args[name][b, pad:]
    for causal in (False, True):
        expected = reference.attention_ref_kvcache(**shifted, causal=causal)
        actual = reference.attention_ref_kvcache(**args, causal=causal)
        torch.testing.assert_close(actual.out, expected.out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(actual.softmax_lse, expected.softmax_lse, atol=1e-6, rtol=1e-6)


def test_reference_rotary_positions_ignore_leftpad() -> None:
    """flash-attn's convention: the new keys are rotated at cache_seqlens + i, counted from the
    start of the cache entry whatever cache_leftpad is."""
    args = call_args(cache_leftpad=int32([1, 0, 6]), rotary_interleaved=False)
    result = reference.attention_ref_kvcache(**args)
    for b, length in enumerate(args["cache_seqlens"].tolist()):
        positions = list(range(length, length + SEQLEN_NEW))
        expected = rotary_explicit(
            args["k"][b], args["rotary_cos"], args["rotary_sin"], positions, interleaved=False
        ).to(DTYPE)
        assert torch.equal(result.k_cache[b, length : length + SEQLEN_NEW], expected)


# ----------------------------------------------------------------------------------------------
# append_to_cache
# ----------------------------------------------------------------------------------------------


def expected_append(
    cache: torch.Tensor, new: torch.Tensor, lengths: list[int], cells
) -> torch.Tensor:
    """``cache`` with new[b, i] at cells(b, lengths[b] + i), written one cell at a time."""
    result = cache.clone()
    for b, length in enumerate(lengths):
        for i in range(new.shape[1]):
            result[cells(b, length + i)] = new[b, i]
    return result


@pytest.mark.parametrize("with_rotary", [False, True])
def test_append_contiguous_writes_exactly_the_new_cells(with_rotary: bool) -> None:
    args = call_args(
        k_cache=randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=2),
        v_cache=randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, seed=3),
    )
    idx = int32([4, 0, 2])
    lengths = [0, 5, SEQLEN_CACHE - SEQLEN_NEW]
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    rotary = (
        kvcache.RotaryTables(args["rotary_cos"], args["rotary_sin"], True) if with_rotary else None
    )
    kvcache.append_to_cache(
        k_cache, v_cache, args["k"], args["v"], int32(lengths), cache_batch_idx=idx, rotary=rotary
    )
    new_k = args["k"]
    if with_rotary:
        new_k = torch.stack(
            [
                rotary_explicit(
                    args["k"][b],
                    args["rotary_cos"],
                    args["rotary_sin"],
                    list(range(length, length + SEQLEN_NEW)),
                    True,
                ).to(DTYPE)
                for b, length in enumerate(lengths)
            ]
        )

    def cell(b: int, position: int) -> tuple[int, int]:
        return int(idx[b]), position

    assert torch.equal(k_cache, expected_append(args["k_cache"], new_k, lengths, cell))
    assert torch.equal(v_cache, expected_append(args["v_cache"], args["v"], lengths, cell))


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_append_paged_writes_exactly_the_new_cells(page_size: int) -> None:
    """Appends that start at and cross page boundaries, into pages at random places."""
    seqlen_new = 5
    # Room for 3 pages and the new keys; the appends start on a page boundary (0), and end
    # two slots into the next page or cross from one slot before the end of page 1.
    max_pages = 3 + -(-seqlen_new // page_size)
    num_pages = BATCH * max_pages + 2
    generator = torch.Generator().manual_seed(page_size)
    table = torch.randperm(num_pages, generator=generator)[: BATCH * max_pages]
    table = table.view(BATCH, max_pages).to(torch.int32)
    lengths = [0, 3 * page_size - seqlen_new + 2, 2 * page_size - 1]
    pages_k = randn(num_pages, page_size, NHEADS_K, HEAD_DIM, seed=2)
    pages_v = randn(num_pages, page_size, NHEADS_K, HEAD_DIM, seed=3)
    new_k = randn(BATCH, seqlen_new, NHEADS_K, HEAD_DIM, seed=4)
    new_v = randn(BATCH, seqlen_new, NHEADS_K, HEAD_DIM, seed=5)
    k_cache, v_cache = pages_k.clone(), pages_v.clone()
    kvcache.append_to_cache(k_cache, v_cache, new_k, new_v, int32(lengths), block_table=table)

    def cell(b: int, position: int) -> tuple[int, int]:
        return int(table[b, position // page_size]), position % page_size

    assert torch.equal(k_cache, expected_append(pages_k, new_k, lengths, cell))
    assert torch.equal(v_cache, expected_append(pages_v, new_v, lengths, cell))


@pytest.mark.parametrize(
    ("lengths", "idx", "table"),
    [
        ([0, 0, SEQLEN_CACHE - 1], None, None),  # past the end of the entry
        ([0, -1, 0], None, None),  # negative: must not wrap to the end of the entry
        ([0, 0, 0], [0, -1, 1], None),  # negative entry
        ([0, 0, 0], [0, 3, 1], None),  # entry past the cache
        ([0, 0, 7], None, [[0, 1], [2, 3], [4, 5]]),  # past the block table's pages
        ([0, 0, 0], None, [[0, 1], [-1, 3], [4, 5]]),  # negative page
        ([0, 0, 0], None, [[0, 1], [6, 3], [4, 5]]),  # page past the pool
    ],
)
def test_append_outside_the_cache_raises(lengths, idx, table) -> None:
    paged = table is not None
    shape = (6, 4) if paged else (BATCH, SEQLEN_CACHE)
    k_cache = randn(*shape, NHEADS_K, HEAD_DIM)
    v_cache = randn(*shape, NHEADS_K, HEAD_DIM)
    k = randn(BATCH, SEQLEN_NEW, NHEADS_K, HEAD_DIM)
    # IndexError from indexing, RuntimeError from gather (the block table), on the CPU.
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        kvcache.append_to_cache(
            k_cache,
            v_cache,
            k,
            k,
            int32(lengths),
            cache_batch_idx=None if idx is None else int32(idx),
            block_table=None if table is None else int32(table),
        )


# ----------------------------------------------------------------------------------------------
# The public function, with the kernel replaced by the reference
# ----------------------------------------------------------------------------------------------


def reference_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, options: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b of a kernel call in float32: q (seqlen_q, nheads, d), its keys and values
    (seqlen_k, nheads_k, d), the options as the ops name them. Returns out (seqlen_q, nheads,
    d) and softmax_lse (nheads, seqlen_q)."""
    return reference.attention_one_sequence(
        q,
        k,
        v,
        options["softmax_scale"],
        options["causal"],
        torch.float32,
        window_size=(options["window_left"], options["window_right"]),
        softcap=options["softcap"],
        alibi_slopes=reference._slopes_of(options["alibi_slopes"], b),
        learnable_sink=options["learnable_sink"],
    )


class ReferenceKernel:
    """Stands in for the varlen forward op: checks what it is handed, as the kernel's
    SeqlenInfo reads it, and computes each sequence with the float32 reference."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.caches = (k_cache, v_cache)
        self.calls = 0

    def __call__(self, view: kvcache.VarlenView, options: dict):
        self.calls += 1
        batch = view.cu_seqlens_q.shape[0] - 1
        for tensor in (view.cu_seqlens_q, view.cu_seqlens_k, view.seqused_k):
            assert tensor.dtype == torch.int32 and tensor.is_contiguous()
        assert view.cu_seqlens_k.shape == (batch + 1,) and view.seqused_k.shape == (batch,)
        assert type(view.max_seqlen_q) is int and type(view.max_seqlen_k) is int
        # The cache is read in place: the row views share the caches' first element.
        for rows, cache in zip((view.k, view.v), self.caches):
            assert rows.data_ptr() == cache.data_ptr() and rows.dim() == 3
            assert validation.has_kernel_layout(rows)
        outs, lses = [], []
        for b in range(batch):
            rows_q = slice(int(view.cu_seqlens_q[b]), int(view.cu_seqlens_q[b + 1]))
            start, used = int(view.cu_seqlens_k[b]), int(view.seqused_k[b])
            assert used <= view.max_seqlen_k and start + used <= view.k.shape[0]
            out, lse = reference_sequence(
                view.q[rows_q],
                view.k[start : start + used],
                view.v[start : start + used],
                b,
                options,
            )
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs).to(view.q.dtype), torch.cat(lses, dim=1)


@pytest.fixture
def on_reference(monkeypatch):
    """Lets CPU tensors past the device check and returns a function that installs a
    ReferenceKernel for the given caches."""
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)

    def install(k_cache: torch.Tensor, v_cache: torch.Tensor) -> ReferenceKernel:
        kernel = ReferenceKernel(k_cache, v_cache)
        monkeypatch.setattr(kvcache, "_varlen_forward", kernel)
        return kernel

    return install


PUBLIC_CASES = {
    "decode_rotary_causal": ({}, {"causal": True}),
    "rotary_not_interleaved_non_causal": ({}, {"rotary_interleaved": False}),
    "rotary_float16_tables_window": (
        {
            "rotary_cos": rotary_tables(SEQLEN_CACHE)[0].to(DTYPE),
            "rotary_sin": rotary_tables(SEQLEN_CACHE)[1].to(DTYPE),
        },
        {"window_size": (4, 0)},
    ),
    "batch_idx_leftpad_bf16": (
        {
            "q": randn(BATCH, SEQLEN_Q, NHEADS, HEAD_DIM, dtype=torch.bfloat16, seed=1),
            "k_cache": randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, seed=2),
            "v_cache": randn(5, SEQLEN_CACHE, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, seed=3),
            "k": randn(BATCH, SEQLEN_NEW, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, seed=4),
            "v": randn(BATCH, SEQLEN_NEW, NHEADS_K, HEAD_DIM, dtype=torch.bfloat16, seed=5),
            "cache_batch_idx": int32([4, 1, 2]),
            "cache_leftpad": int32([2, 0, 10]),
        },
        {"causal": True},
    ),
    "int_seqlens_softcap_alibi_sink": (
        {"cache_seqlens": 7},
        {
            "softcap": 3.0,
            "alibi_slopes": torch.tensor([[0.1, 0.2, 0.3, 0.4]] * BATCH),
            "learnable_sink": torch.tensor([0.0, 1.0, -1.0, 2.0]),
            "softmax_scale": 0.4,
        },
    ),
    "full_caches_no_append": (
        {
            "k": None,
            "v": None,
            "rotary_cos": None,
            "rotary_sin": None,
            "cache_seqlens": None,
            "cache_leftpad": int32([0, 20, 24]),
        },
        {"causal": True},
    ),
    "empty_caches": (
        {"k": None, "v": None, "rotary_cos": None, "rotary_sin": None, "cache_seqlens": 0},
        {},
    ),
    # A slice of a longer buffer: read in place with entries 40 rows apart.
    "sliced_cache_mqa": (
        {
            "k_cache": randn(BATCH, 40, 1, HEAD_DIM, seed=2)[:, :SEQLEN_CACHE],
            "v_cache": randn(BATCH, 40, 1, HEAD_DIM, seed=3)[:, :SEQLEN_CACHE],
            "k": randn(BATCH, SEQLEN_NEW, 1, HEAD_DIM, seed=4),
            "v": randn(BATCH, SEQLEN_NEW, 1, HEAD_DIM, seed=5),
        },
        {"causal": True, "num_splits": 4},
    ),
}


@pytest.mark.parametrize("case", list(PUBLIC_CASES))
def test_public_function_matches_the_reference(on_reference, case: str) -> None:
    changes, options = PUBLIC_CASES[case]
    args = call_args(**changes)
    reference_options = {name: value for name, value in options.items() if name != "num_splits"}
    window = reference_options.pop("window_size", (-1, -1))
    expected = reference.attention_ref_kvcache(**args, window_size=window, **reference_options)
    lowp = reference.attention_ref_kvcache(
        **args, window_size=window, compute_dtype=args["q"].dtype, **reference_options
    )
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    if case == "sliced_cache_mqa":  # keep the slices' strides
        k_cache, v_cache = args["k_cache"], args["v_cache"]
    kernel = on_reference(k_cache, v_cache)
    out, lse = flash_varlen.flash_attn_with_kvcache(
        **{**args, "k_cache": k_cache, "v_cache": v_cache}, return_softmax_lse=True, **options
    )
    assert kernel.calls == 1
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert lse.shape == (BATCH, NHEADS, SEQLEN_Q) and lse.dtype == torch.float32
    assert_within_tolerance(out, expected.out, lowp.out, FORWARD_FACTOR, case)
    assert_lse_within_tolerance(lse, expected.softmax_lse, lowp.softmax_lse, FORWARD_FACTOR, case)
    # The appended values are stored exactly; the rotated keys within one rounding.
    assert torch.equal(v_cache, expected.v_cache)
    torch.testing.assert_close(k_cache, expected.k_cache, atol=0, rtol=2 * torch.finfo(DTYPE).eps)


def test_public_function_returns_out_alone_by_default(on_reference) -> None:
    args = call_args()
    on_reference(args["k_cache"], args["v_cache"])
    out = flash_varlen.flash_attn_with_kvcache(**args)
    assert isinstance(out, torch.Tensor) and out.shape == args["q"].shape


def test_public_function_is_forward_only(on_reference) -> None:
    args = call_args(q=call_args()["q"].requires_grad_())
    on_reference(args["k_cache"], args["v_cache"])
    out = flash_varlen.flash_attn_with_kvcache(**args)
    assert not out.requires_grad


def test_public_function_leaves_q_unrotated(on_reference) -> None:
    """Rotary applies to a copy of q; the caller's q is unchanged."""
    args = call_args()
    before = args["q"].clone()
    on_reference(args["k_cache"], args["v_cache"])
    flash_varlen.flash_attn_with_kvcache(**args, causal=True)
    assert torch.equal(args["q"], before)


def test_varlen_view_clamps_reads_into_the_cache() -> None:
    """Out-of-range values (a caller error that debug mode reports) never make the kernel read
    outside the cache: lengths, entries and left padding are clamped into it."""
    q = randn(BATCH, 1, NHEADS, HEAD_DIM)
    cache = randn(BATCH, SEQLEN_CACHE, NHEADS_K, HEAD_DIM)
    view = kvcache.contiguous_cache_as_varlen(
        q, cache, cache, int32([SEQLEN_CACHE + 5, -3, 4]), int32([7, -1, 2]), int32([0, 2, 9])
    )
    assert view.cu_seqlens_k.tolist() == [
        2 * SEQLEN_CACHE,
        0,
        2 * SEQLEN_CACHE + 4,
        BATCH * SEQLEN_CACHE,
    ]
    assert view.seqused_k.tolist() == [SEQLEN_CACHE, 0, 0]
