"""Input checks of ``flash_attn_with_kvcache``, run before anything is written or launched.

The same rules as ``validation.py``: every broken rule raises an exception that names the argument
and states the rule (``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape,
layout, device or value, ``NotImplementedError`` for what is not built yet); the default checks
read only Python values and tensor metadata, never device memory; the checks of values held in
tensors (cache lengths against the capacity, page numbers, cache indices) run only in debug mode
(``FLASH_VARLEN_DEBUG=1``, :func:`check_kvcache_values`); the device check comes last
(:func:`check_kvcache_devices`), so that every other rule can be exercised with CPU tensors.

The two cache layouts, as flash-attn 2.x names them:

- contiguous: ``k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, d)``; sequence b uses
  cache entry ``cache_batch_idx[b]`` (default b), whose capacity is seqlen_cache keys;
- paged: ``k_cache, v_cache: (num_pages, page_size, nheads_k, d)`` with
  ``block_table: (batch, max_pages)`` int32; sequence b's key at position p lives in page
  ``block_table[b, p // page_size]``, slot ``p % page_size``; the capacity is
  max_pages * page_size keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen import validation
from flash_varlen.contract import INDEX_DTYPE, UNBOUNDED_WINDOW_SIDE
from flash_varlen.errors import error
from flash_varlen.options import PUBLIC_OPTIONS, host_int
from flash_varlen.validation import (
    PAGED_KV_LAYOUT,
    ArgNames,
    _check_head_dims,
    _check_heads,
    _check_int32_vector,
    _check_is_tensor,
    _check_layouts,
    _check_qkv_dtypes,
    _check_rank,
    _check_tensor_options,
    check_block_table,
    check_page_numbers,
    option_arguments,
    resolve_softmax_scale,
)

CACHE_NAMES = ArgNames(q="q", k="k_cache", v="v_cache")
CONTIGUOUS_CACHE_LAYOUT = "(batch_cache, seqlen_cache, nheads_k, headdim)"
# The varlen kernels take each sequence's first cache row as an int32 entry of cu_seqlens_k.
MAX_CACHE_ROWS = torch.iinfo(getattr(torch, INDEX_DTYPE)).max
# Rotary tables may be in q's dtype (flash-attn's rule) or in float32 (more precise; the
# rotation is computed in float32 either way).
ROTARY_TABLE_DTYPE = torch.float32
# The attention options flash_attn_with_kvcache shares with the other public functions, checked
# and converted by their declared converters (options.PUBLIC_OPTIONS).
SHARED_OPTION_NAMES = (
    "softmax_scale",
    "causal",
    "window_size",
    "softcap",
    "alibi_slopes",
    "learnable_sink",
)
SHARED_OPTIONS = tuple(option for option in PUBLIC_OPTIONS if option.name in SHARED_OPTION_NAMES)


@dataclass(frozen=True)
class KVCacheCall:
    """A checked call of ``flash_attn_with_kvcache``.

    ``cache_seqlens`` is None (every sequence uses its whole capacity), a Python int (the same
    length for every sequence) or an int32 (batch,) tensor. ``options``: the attention options
    as the registered forward ops take them (softmax_scale resolved, causal, window_left,
    window_right, softcap, alibi_slopes, learnable_sink).
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    rotary_cos: torch.Tensor | None
    rotary_sin: torch.Tensor | None
    cache_seqlens: int | torch.Tensor | None
    cache_batch_idx: torch.Tensor | None
    cache_leftpad: torch.Tensor | None
    block_table: torch.Tensor | None
    rotary_interleaved: bool
    num_splits: int
    return_softmax_lse: bool
    options: Mapping[str, Any]

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def capacity(self) -> int:
        """Keys one sequence can hold: seqlen_cache, or max_pages * page_size when paged."""
        return cache_capacity(self.k_cache, self.block_table)

    @property
    def seqlen_new(self) -> int:
        """Keys appended per sequence (0 without k and v)."""
        return 0 if self.k is None else self.k.shape[1]


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Keys one sequence can hold: seqlen_cache, or max_pages * page_size with a block table."""
    if block_table is None:
        return k_cache.shape[1]
    return block_table.shape[1] * k_cache.shape[1]


def cache_row_layout(cache: torch.Tensor) -> tuple[int, int] | None:
    """How a contiguous cache (batch_cache, seqlen_cache, nheads_k, d) reads as rows of keys.

    Returns (row stride, rows per entry): key p of entry e is row ``e * rows_per_entry + p`` of
    a (rows, nheads_k, d) view with that row stride (for the varlen kernels, which address a
    sequence by its first row). None when the entry stride is not a whole number of rows, or
    entries would overlap. A dim of size 1 has no meaningful stride, hence the cases.
    """
    entries, seqlen_cache = cache.shape[:2]
    if seqlen_cache == 1:
        # Each entry is one row: the entry stride is the row stride.
        return cache.stride(0 if entries > 1 else 1), 1
    row_stride = cache.stride(1)
    if entries == 1:
        return row_stride, seqlen_cache
    entry_stride = cache.stride(0)
    if entry_stride % row_stride != 0 or entry_stride // row_stride < seqlen_cache:
        return None
    return row_stride, entry_stride // row_stride


def cache_rows(cache: torch.Tensor, rows_per_entry: int) -> int:
    """Rows of the row view of a contiguous cache: every entry's rows up to the last key."""
    entries, seqlen_cache = cache.shape[:2]
    return (entries - 1) * rows_per_entry + seqlen_cache


def check_kvcache_inputs(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any,
    v: Any,
    rotary_cos: Any,
    rotary_sin: Any,
    cache_seqlens: Any,
    cache_batch_idx: Any,
    cache_leftpad: Any,
    block_table: Any,
    rotary_interleaved: Any,
    num_splits: Any,
    return_softmax_lse: Any,
    shared_options: Mapping[str, Any],
) -> KVCacheCall:
    """Checks every argument of a ``flash_attn_with_kvcache`` call except devices (metadata
    only: nothing reads device memory). ``shared_options``: the public values of
    SHARED_OPTION_NAMES. Returns the checked call."""
    arguments = option_arguments(shared_options, SHARED_OPTIONS)
    _check_qkv_dtypes(q, k_cache, v_cache, CACHE_NAMES)
    _check_rank(q, "q", "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    if paged:
        check_block_table(block_table, q.shape[0], "q.shape[0]")
    cache_layout = PAGED_KV_LAYOUT if paged else CONTIGUOUS_CACHE_LAYOUT
    _check_rank(k_cache, "k_cache", cache_layout)
    _check_rank(v_cache, "v_cache", cache_layout)
    _check_head_dims(q, k_cache, v_cache, CACHE_NAMES)
    _check_heads(q, k_cache, v_cache, CACHE_NAMES)
    _check_positive(q, 0, "q", "batch")
    _check_positive(q, 1, "q", "seqlen_q")
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise ValueError(
            error(
                f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                f"got {tuple(v_cache.shape)}."
            )
        )
    _check_positive(k_cache, 0, "k_cache", "num_pages" if paged else "batch_cache")
    _check_positive(k_cache, 1, "k_cache", "page_size" if paged else "seqlen_cache")
    _check_layouts(q, k_cache, v_cache, CACHE_NAMES)
    if not paged:
        _check_contiguous_cache_rows(k_cache, v_cache)
    batch = q.shape[0]
    _check_index_vector(cache_batch_idx, "cache_batch_idx", batch)
    _check_index_vector(cache_leftpad, "cache_leftpad", batch)
    if paged:
        for tensor, name in (
            (cache_batch_idx, "cache_batch_idx"),
            (cache_leftpad, "cache_leftpad"),
        ):
            if tensor is not None:
                raise ValueError(
                    error(
                        f"{name} cannot be combined with block_table (as in flash-attn): a paged "
                        f"cache names each sequence's pages in block_table; pass {name}=None."
                    )
                )
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise ValueError(
            error(
                f"k_cache.shape[0] (batch_cache) = {k_cache.shape[0]} must be at least "
                f"q.shape[0] (batch) = {batch} without cache_batch_idx (sequence b uses cache "
                f"entry b)."
            )
        )
    capacity = cache_capacity(k_cache, block_table)
    seqlen_new = _check_new_keys(k, v, q, k_cache)
    cache_seqlens = _check_cache_seqlens(cache_seqlens, batch, seqlen_new, capacity)
    if k is not None and cache_seqlens is None:
        raise ValueError(
            error(
                "cache_seqlens must be given with k and v: the new keys are written at "
                "positions cache_seqlens, cache_seqlens + 1, ... of each sequence."
            )
        )
    _check_rotary(rotary_cos, rotary_sin, q, k, capacity)
    num_splits = host_int(num_splits, "num_splits", "an int (0: heuristic)")
    if num_splits < 0:
        raise ValueError(error(f"num_splits must be >= 0 (0: heuristic), got {num_splits}."))
    sizes = {"batch": batch, "nheads": q.shape[2]}
    _check_tensor_options(arguments, sizes, varlen=True)
    arguments["softmax_scale"] = resolve_softmax_scale(arguments["softmax_scale"], q.shape[-1])
    return KVCacheCall(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k,
        v=v,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        rotary_interleaved=_check_flag(rotary_interleaved, "rotary_interleaved"),
        num_splits=num_splits,
        return_softmax_lse=_check_flag(return_softmax_lse, "return_softmax_lse"),
        options=arguments,
    )


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(error(f"{name} must be a bool, got {type(value).__name__}."))
    return value


def _check_positive(tensor: torch.Tensor, dim: int, name: str, what: str) -> None:
    if tensor.shape[dim] < 1:
        raise ValueError(
            error(f"{name}.shape[{dim}] ({what}) must be positive, got {tensor.shape[dim]}.")
        )


def _check_contiguous_cache_rows(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernels read a contiguous cache in place as rows of keys (``cache_row_layout``), with
    one first-row offset per sequence shared by k and v, as int32."""
    layouts = []
    for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        layout = cache_row_layout(cache)
        if layout is None:
            raise ValueError(
                error(
                    f"{name}.stride(0) must be a whole number (>= seqlen_cache) of rows "
                    f"({name}.stride(1) = {cache.stride(1)} elements each), got "
                    f"{cache.stride(0)}: the cache is read in place as rows of keys."
                )
            )
        layouts.append(layout)
    (_, k_rows_per_entry), (_, v_rows_per_entry) = layouts
    if k_rows_per_entry != v_rows_per_entry:
        raise ValueError(
            error(
                f"v_cache's entries must be as many rows apart as k_cache's ({k_rows_per_entry}"
                f" rows: stride(0) / stride(1)), got {v_rows_per_entry}."
            )
        )
    rows = cache_rows(k_cache, k_rows_per_entry)
    if rows > MAX_CACHE_ROWS:
        raise ValueError(
            error(
                f"k_cache spans {rows} rows of keys (batch_cache x rows per entry); at most "
                f"{MAX_CACHE_ROWS} fit the kernels' int32 sequence offsets."
            )
        )


def _check_index_vector(tensor: Any, name: str, batch: int) -> None:
    """None, or an int32 (batch,) tensor."""
    if tensor is None:
        return
    _check_int32_vector(tensor, name, "(batch,)")
    if tensor.shape[0] != batch:
        raise ValueError(
            error(
                f"{name} must have one entry per sequence, shape (batch,) = ({batch},), "
                f"got {tuple(tensor.shape)}."
            )
        )


def _check_new_keys(k: Any, v: Any, q: torch.Tensor, k_cache: torch.Tensor) -> int:
    """k and v: both None, or both (batch, seqlen_new, nheads_k, d) in q's dtype. Returns
    seqlen_new (0 without them)."""
    _check_given_together(k, v, ("k", "v"))
    if k is None:
        return 0
    expected = (q.shape[0], None, k_cache.shape[2], q.shape[3])
    for tensor, name in ((k, "k"), (v, "v")):
        _check_is_tensor(tensor, name)
        if tensor.dtype != q.dtype:
            raise TypeError(
                error(f"{name} must have the dtype of q ({q.dtype}), got {tensor.dtype}.")
            )
        _check_rank(tensor, name, "(batch, seqlen_new, nheads_k, headdim)")
        if any(want is not None and got != want for got, want in zip(tensor.shape, expected)):
            raise ValueError(
                error(
                    f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = "
                    f"({expected[0]}, seqlen_new, {expected[2]}, {expected[3]}), "
                    f"got {tuple(tensor.shape)}."
                )
            )
    if v.shape != k.shape:
        raise ValueError(
            error(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}.")
        )
    return k.shape[1]


def _check_given_together(first: Any, second: Any, names: tuple[str, str]) -> None:
    """Both None, or neither."""
    if (first is None) != (second is None):
        given, missing = names if second is None else names[::-1]
        raise ValueError(
            error(
                f"{names[0]} and {names[1]} must be given together: got {given} but {missing} "
                f"is None."
            )
        )


def _check_cache_seqlens(
    cache_seqlens: Any, batch: int, seqlen_new: int, capacity: int
) -> int | torch.Tensor | None:
    """None, an int32 (batch,) tensor (its values are checked in debug mode), or an int in
    [0, capacity - seqlen_new] (checked here: it is on the host)."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index_vector(cache_seqlens, "cache_seqlens", batch)
        return cache_seqlens
    value = host_int(cache_seqlens, "cache_seqlens", "an int or an int32 tensor of shape (batch,)")
    _check_room(value, "cache_seqlens", capacity, seqlen_new)
    return value


def _check_room(length: int, name: str, capacity: int, seqlen_new: int) -> None:
    """A cache length that leaves room for the new keys: in [0, capacity - seqlen_new]."""
    if not 0 <= length <= capacity - seqlen_new:
        raise ValueError(
            error(
                f"{name} = {length} must be in [0, {capacity - seqlen_new}]: the cache holds "
                f"{capacity} keys per sequence and {seqlen_new} new ones are appended."
            )
        )


def _check_rotary(rotary_cos: Any, rotary_sin: Any, q: torch.Tensor, k: Any, capacity: int) -> None:
    """rotary_cos, rotary_sin: both None, or both (seqlen_ro, rotary_dim / 2) with
    rotary_dim <= headdim and seqlen_ro >= the cache capacity, in q's dtype or float32; only
    with new keys (flash-attn's rules, except that rotary_dim need only be even)."""
    if rotary_cos is None and rotary_sin is None:
        return
    _check_given_together(rotary_cos, rotary_sin, ("rotary_cos", "rotary_sin"))
    if k is None:
        raise ValueError(
            error(
                "rotary_cos and rotary_sin need k and v (as in flash-attn): the rotary "
                "embedding is applied to q and to the new keys before they are appended."
            )
        )
    for table, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
        _check_is_tensor(table, name)
        if table.dtype not in (q.dtype, ROTARY_TABLE_DTYPE):
            raise TypeError(
                error(
                    f"{name} must have the dtype of q ({q.dtype}) or {ROTARY_TABLE_DTYPE}, "
                    f"got {table.dtype}."
                )
            )
        _check_rank(table, name, "(seqlen_ro, rotary_dim / 2)")
    if rotary_sin.dtype != rotary_cos.dtype or rotary_sin.shape != rotary_cos.shape:
        raise ValueError(
            error(
                f"rotary_sin must have the shape and dtype of rotary_cos "
                f"({tuple(rotary_cos.shape)}, {rotary_cos.dtype}), got "
                f"({tuple(rotary_sin.shape)}, {rotary_sin.dtype})."
            )
        )
    seqlen_ro, half_rotary_dim = rotary_cos.shape
    head_dim = q.shape[-1]
    if not 1 <= half_rotary_dim <= head_dim // 2:
        raise ValueError(
            error(
                f"rotary_cos.shape[1] (rotary_dim / 2) must be in [1, headdim / 2 = "
                f"{head_dim // 2}], got {half_rotary_dim}."
            )
        )
    if seqlen_ro < capacity:
        raise ValueError(
            error(
                f"rotary_cos.shape[0] (seqlen_ro) must be at least the cache capacity "
                f"({capacity} keys per sequence), got {seqlen_ro}."
            )
        )


# --------------------------------------------------------------------------------------------
# Devices (last) and debug-mode value checks


def check_kvcache_devices(call: KVCacheCall) -> None:
    """q on a CUDA device and every tensor of the call on q's device."""
    named = (
        (call.k_cache, "k_cache"),
        (call.v_cache, "v_cache"),
        (call.k, "k"),
        (call.v, "v"),
        (call.rotary_cos, "rotary_cos"),
        (call.rotary_sin, "rotary_sin"),
        (
            call.cache_seqlens if isinstance(call.cache_seqlens, torch.Tensor) else None,
            "cache_seqlens",
        ),
        (call.cache_batch_idx, "cache_batch_idx"),
        (call.cache_leftpad, "cache_leftpad"),
        (call.block_table, "block_table"),
        (call.options["alibi_slopes"], "alibi_slopes"),
        (call.options["learnable_sink"], "learnable_sink"),
    )
    # Looked up at call time, as the other public functions do: the CPU tests of the API layer
    # let CPU tensors past it.
    validation._check_devices(call.q, "q", list(named))


def check_kvcache_values(call: KVCacheCall) -> None:
    """Debug mode only (copies the index tensors to the host): every value the cache writes and
    reads are addressed by lies within the cache.

    Rules: 0 <= cache_seqlens[b] and cache_seqlens[b] + seqlen_new <= capacity;
    cache_batch_idx[b] in [0, batch_cache); cache_leftpad[b] in [0, cache_seqlens[b]] (the
    capacity without cache_seqlens); the block_table entries of the pages that hold positions
    0 .. cache_seqlens[b] + seqlen_new - 1 in [0, num_pages) (entries past them are never
    read); with rotary tables and causal or local attention (q rotated at consecutive
    positions), cache_seqlens[b] + seqlen_q <= seqlen_ro.
    """
    batch, capacity, seqlen_new = call.batch, call.capacity, call.seqlen_new
    if call.cache_seqlens is None:
        lengths = [capacity] * batch
    elif isinstance(call.cache_seqlens, int):
        lengths = [call.cache_seqlens] * batch
    else:
        lengths = [int(value) for value in call.cache_seqlens.tolist()]
        for b, length in enumerate(lengths):
            _check_room(length, f"cache_seqlens[{b}]", capacity, seqlen_new)
    if call.cache_batch_idx is not None:
        entries = call.k_cache.shape[0]
        for b, entry in enumerate(call.cache_batch_idx.tolist()):
            if not 0 <= entry < entries:
                raise ValueError(
                    error(
                        f"cache_batch_idx[{b}] = {entry} must be in [0, {entries}) "
                        f"(k_cache.shape[0], batch_cache)."
                    )
                )
    if call.cache_leftpad is not None:
        for b, (pad, length) in enumerate(zip(call.cache_leftpad.tolist(), lengths)):
            if not 0 <= pad <= length:
                raise ValueError(
                    error(
                        f"cache_leftpad[{b}] = {pad} must be in [0, {length}] (the cache "
                        f"length of sequence {b}: its keys are positions cache_leftpad to "
                        f"cache_seqlens + seqlen_new - 1)."
                    )
                )
    if call.block_table is not None:
        keys = [length + seqlen_new for length in lengths]
        check_page_numbers(call.block_table, call.k_cache, keys, "k_cache")
    if call.rotary_cos is not None and rotates_q_consecutively(call.options):
        seqlen_q, seqlen_ro = call.q.shape[1], call.rotary_cos.shape[0]
        for b, length in enumerate(lengths):
            if length + seqlen_q > seqlen_ro:
                raise ValueError(
                    error(
                        f"rotary_cos has {seqlen_ro} positions, but query {seqlen_q - 1} of "
                        f"sequence {b} is rotated at position cache_seqlens[{b}] + "
                        f"{seqlen_q - 1} = {length + seqlen_q - 1} (causal or local attention)."
                    )
                )


def rotates_q_consecutively(options: Mapping[str, Any]) -> bool:
    """Whether q is rotated at positions cache_seqlens + i (causal or local attention) rather
    than all at cache_seqlens (flash-attn's rule)."""
    unbounded = (UNBOUNDED_WINDOW_SIDE, UNBOUNDED_WINDOW_SIDE)
    bounded = (options["window_left"], options["window_right"]) != unbounded
    return bool(options["causal"]) or bounded
