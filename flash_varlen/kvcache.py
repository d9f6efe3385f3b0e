"""Attention over a KV cache: ``flash_attn_with_kvcache``, call-compatible with flash-attn 2.x.

A call runs three steps, all on the device and none of which reads a value back to the host (so
a decode step can be captured in a CUDA graph and replayed with new cache lengths):

1. :func:`append_to_cache`: the new keys and values ``k, v`` are written into the cache in place
   at positions ``cache_seqlens[b] + i``, after the rotary embedding is applied to the keys. The
   cells are found by index arithmetic (contiguous cache: entry and position; paged cache: page
   ``block_table[b, p // page_size]`` and slot ``p % page_size``) and written with one indexed
   store per cache, which refuses an index outside the cache (an "out of bounds" IndexError
   or RuntimeError on the CPU, a device-side assertion on the GPU) rather than write out of
   bounds.
2. The queries are rotated (:func:`apply_rotary`) at positions ``cache_seqlens[b] + i`` for
   causal or local attention, else all at ``cache_seqlens[b]`` (flash-attn's rule).
3. The attention, by one of two kernels (:mod:`flash_varlen.kvcache_decode` decides which):
   the decode kernel family reads the cache in place, contiguous or paged, with split-KV
   (``num_splits``) for long caches; it serves every paged cache and contiguous calls of up to
   16 query tokens. Other contiguous calls go to the varlen forward kernel:
   :func:`contiguous_cache_as_varlen` describes the cache to it without copying it: the cache is
   read in place as rows of keys, sequence b's keys start at row ``entry * rows_per_entry +
   cache_leftpad[b]`` (``cu_seqlens_k[b]``) and number ``cache_seqlens[b] + seqlen_new -
   cache_leftpad[b]`` (``seqused_k[b]``).

Calls the decode kernels serve run all three steps in one op: its first kernel appends and
rotates (csrc/kernels/decode/cache_append_kernel.h), with the same results bit for bit as the
torch functions here, which run the steps of the other calls (and of the CPU tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen import ops, validation
from flash_varlen.contract import UNBOUNDED_WINDOW_SIDE
from flash_varlen.errors import error
from flash_varlen.kvcache_decode import build_kernel_check, decode_attention, decode_kernel_refusal
from flash_varlen.kvcache_validation import (
    KVCacheCall,
    cache_capacity,
    cache_row_layout,
    cache_rows,
    check_kvcache_devices,
    check_kvcache_inputs,
    check_kvcache_values,
    rotates_q_consecutively,
)
from flash_varlen.signatures import FORWARD_OPS, Layout

CacheSeqlens = int | torch.Tensor | None
KVCacheResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

INDEX_DTYPE = torch.int32  # cu_seqlens and seqused, as the kernels take them
# The varlen forward op's parameters with their defaults, in order.
_VARLEN_OP_PARAMETERS = tuple(
    (parameter.name, parameter.default) for parameter in FORWARD_OPS[Layout.VARLEN].parameters
)


@dataclass(frozen=True)
class RotaryTables:
    """Rotary embedding tables: cos, sin (seqlen_ro, rotary_dim / 2); the first rotary_dim
    dims of a head are rotated in pairs, (2i, 2i + 1) when ``interleaved`` (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX)."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]


@dataclass(frozen=True)
class VarlenView:
    """A KV-cache call as the varlen forward op takes it; every tensor a view of the caller's
    or a small (batch + 1,) index tensor.

    q: (batch * seqlen_q, nheads, d); k, v: (cache rows, nheads_k, d), the cache read in place;
    cu_seqlens_q: (batch + 1,) multiples of seqlen_q; cu_seqlens_k: (batch + 1,) each
    sequence's first key row (not monotonic with cache_batch_idx: the kernels read only entry b
    for sequence b when seqused_k is given); seqused_k: (batch,) used keys.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqused_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (UNBOUNDED_WINDOW_SIDE, UNBOUNDED_WINDOW_SIDE),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    learnable_sink: torch.Tensor | None = None,
) -> KVCacheResult:
    """Attention of new queries over a KV cache, appending new keys and values to it in place.

    Sequence b's keys are positions ``cache_leftpad[b]`` to ``cache_seqlens[b] + seqlen_new - 1``
    of its cache (after the append). The mask, the window and ALiBi are those of
    ``flash_attn_func`` with seqlen_k = that number of keys: causal aligns bottom-right (the last
    query sees every key), so query i sees key j iff ``j <= i + seqlen_k - seqlen_q``. A query
    that sees no key (an empty cache, say) gets out = 0 and softmax_lse = -inf (= sink[h] with
    learnable_sink); nothing is NaN. Forward only: no gradient flows. Query head h attends with
    key/value head h // (nheads // nheads_k).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 or bfloat16, on a CUDA device.
        k_cache, v_cache: the cache, dtype of q. Contiguous: (batch_cache, seqlen_cache,
            nheads_k, headdim), read in place; its entry stride must be a whole number of rows
            (stride(0) a multiple of stride(1)), the same for k_cache and v_cache, as for any
            slice of a (batch_cache, max_seqlen, ...) buffer. Paged: (num_pages, page_size,
            nheads_k, headdim) with block_table, any page size >= 1.
        k, v: None, or (batch, seqlen_new, nheads_k, headdim) new keys and values, written into
            the cache in place at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new
            - 1 before attending (k rotated first when rotary tables are given). With duplicate
            cache_batch_idx entries the written values come from any of the duplicates.
        rotary_cos, rotary_sin: None, or (seqlen_ro, rotary_dim / 2) in q's dtype or float32,
            seqlen_ro >= the capacity, rotary_dim <= headdim; only with k and v. The new keys
            are rotated at positions cache_seqlens[b] + i; the queries at cache_seqlens[b] + i
            with causal or local attention (window_size != (-1, -1)), otherwise all at
            cache_seqlens[b]. Positions count from the start of the cache entry (cache_leftpad
            does not shift them), as in flash-attn. Computed in float32, rounded to q's dtype.
        cache_seqlens: None (every cache is full: seqlen_cache, or max_pages * page_size keys),
            an int (the same for every sequence), or int32 (batch,) on q's device: the keys
            already in each cache, before the append.
        cache_batch_idx: None, or int32 (batch,): sequence b uses cache entry
            cache_batch_idx[b] (default b). Not with block_table.
        cache_leftpad: None, or int32 (batch,): sequence b's keys start at position
            cache_leftpad[b] of its cache (left padding). Not with block_table.
        block_table: None, or int32 (batch, max_pages): sequence b's key at position p is in
            page block_table[b, p // page_size], slot p % page_size.
        softmax_scale: float > 0, default 1 / sqrt(headdim).
        causal: bool. window_size: (left, right), -1 unbounded; causal forces right = 0.
        softcap: float >= 0; 0 disables it, else scores become softcap * tanh(s / softcap).
        rotary_interleaved: bool. Pairs (2i, 2i + 1) (True) or (i, i + rotary_dim / 2).
        alibi_slopes: None, or float32 (nheads,) or (batch, nheads): bias
            -slope * |i + seqlen_k - seqlen_q - j|.
        num_splits: int >= 0: how many parts each sequence's keys are split into, computed in
            parallel and merged by their LSE (0: a heuristic from the batch, the KV heads, the
            cache capacity and the SM count). Read by the decode kernels; the varlen path
            (contiguous caches with more than 16 query tokens) ignores it.
        return_softmax_lse: bool. Also return softmax_lse.
        learnable_sink: None, or float32 (nheads,), keyword-only: one more logit per row
            without a value vector (as in ``flash_attn_varlen_func``).

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q. With return_softmax_lse=True the
        tuple (out, softmax_lse), softmax_lse (batch, nheads, seqlen_q) float32, the natural
        log of sum_j exp(score_ij) over the keys row i sees.

    Bad values held in tensors (cache_seqlens beyond the capacity, a page or cache index out of
    range) are caller errors that FLASH_VARLEN_DEBUG=1 reports by name (it reads them from the
    device). Without it, an append outside the cache still fails (an index error on the CPU; on
    the GPU a device-side assertion, or a CUDA error from the decode op's append kernel, which
    stops) and never writes out of bounds, and the kernel never reads outside the cache: its
    lengths and cache indices are clamped into it.

    Raises:
        TypeError, ValueError: invalid inputs; the message names the argument and the rule.
        NotImplementedError: a (dtype, headdim) this build lacks (for a paged cache: one the
            decode kernels lack, they have head-dim buckets 64 and 128).
        RuntimeError: the compiled extension is not available (the message says why).
    """
    call = check_kvcache_inputs(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        block_table,
        rotary_interleaved,
        num_splits,
        return_softmax_lse,
        {
            "softmax_scale": softmax_scale,
            "causal": causal,
            "window_size": window_size,
            "softcap": softcap,
            "alibi_slopes": alibi_slopes,
            "learnable_sink": learnable_sink,
        },
    )
    if validation.debug_enabled():
        check_kvcache_values(call)
    check_kvcache_devices(call)
    decode_refusal = decode_kernel_refusal(call, build_kernel_check)
    if call.paged and decode_refusal is not None:
        # Before the append: nothing is written when the call cannot run.
        raise NotImplementedError(
            error(f"block_table (a paged KV cache) cannot be served here: {decode_refusal}.")
        )
    # Inference only, as flash-attn's: the cache is written in place, which autograd could not
    # differentiate through anyway.
    with torch.no_grad():
        return _attend_cache(call, use_decode_kernel=decode_refusal is None)


def _attend_cache(call: KVCacheCall, *, use_decode_kernel: bool) -> KVCacheResult:
    q = call.q
    batch, seqlen_q, nheads, _ = q.shape
    cache_seqlens = cache_seqlens_tensor(call.cache_seqlens, batch, q.device)
    if use_decode_kernel:
        # One op: the append and the rotary embedding run in its first kernel.
        out, softmax_lse = _decode_attention(
            call, decode_cache_lengths(cache_seqlens, batch, call.capacity, q.device)
        )
        return (out, softmax_lse) if call.return_softmax_lse else out
    q, key_ends = append_and_rotate(call, cache_seqlens)
    view = contiguous_cache_as_varlen(
        q, call.k_cache, call.v_cache, key_ends, call.cache_batch_idx, call.cache_leftpad
    )
    out, softmax_lse = _varlen_forward(view, call.options)
    out = out.view(q.shape)
    if not call.return_softmax_lse:
        return out
    # (nheads, batch * seqlen_q) -> (batch, nheads, seqlen_q), flash-attn's layout (a copy of
    # batch * nheads * seqlen_q floats).
    softmax_lse = softmax_lse.view(nheads, batch, seqlen_q).transpose(0, 1).contiguous()
    return out, softmax_lse


# The decode kernel call (a module attribute, so that CPU tests can put the reference in its place).
_decode_attention = decode_attention


def append_and_rotate(
    call: KVCacheCall, cache_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The append and rotary steps as torch operations (what the decode op's first kernel does):
    writes the call's new keys (rotated) and values into its cache at cache_seqlens[b] + i and
    returns its queries, rotated when it has rotary tables, and the key ends, cache_seqlens +
    seqlen_new (None when cache_seqlens is None: full caches)."""
    q = call.q
    rotary = (
        None
        if call.rotary_cos is None
        else RotaryTables(call.rotary_cos, call.rotary_sin, call.rotary_interleaved)
    )
    if call.k is not None:
        append_to_cache(
            call.k_cache,
            call.v_cache,
            call.k,
            call.v,
            cache_seqlens,
            cache_batch_idx=call.cache_batch_idx,
            block_table=call.block_table,
            rotary=rotary,
        )
    if rotary is not None:
        q = apply_rotary(q, rotary, query_positions(cache_seqlens, q.shape[1], call.options))
    # Without new keys the lengths are the key ends as they are (no elementwise launch).
    if cache_seqlens is None or call.seqlen_new == 0:
        return q, cache_seqlens
    return q, cache_seqlens + call.seqlen_new


def decode_cache_lengths(
    cache_seqlens: torch.Tensor | None, batch: int, capacity: int, device: torch.device
) -> torch.Tensor:
    """int32 (batch,) cache lengths before the append, as the decode op takes them:
    ``cache_seqlens``, or the capacity for full caches (None; they take no new keys)."""
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=INDEX_DTYPE, device=device)
    return cache_seqlens.to(INDEX_DTYPE)


def _varlen_forward(
    view: VarlenView, options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The varlen forward op on ``view``: out (batch * seqlen_q, nheads, d) and softmax_lse
    (nheads, batch * seqlen_q). The one kernel call of flash_attn_with_kvcache."""
    arguments = {
        **options,
        "q": view.q,
        "k": view.k,
        "v": view.v,
        "cu_seqlens_q": view.cu_seqlens_q,
        "cu_seqlens_k": view.cu_seqlens_k,
        "seqused_k": view.seqused_k,
        "max_seqlen_q": view.max_seqlen_q,
        "max_seqlen_k": view.max_seqlen_k,
    }
    out, softmax_lse, _, _ = ops.varlen_fwd(
        *[arguments.get(name, default) for name, default in _VARLEN_OP_PARAMETERS]
    )
    return out, softmax_lse


# --------------------------------------------------------------------------------------------
# Steps (plain torch: they run on any device, and tests run them on the CPU)


def cache_seqlens_tensor(
    cache_seqlens: CacheSeqlens, batch: int, device: torch.device
) -> torch.Tensor | None:
    """cache_seqlens as an int32 (batch,) tensor on ``device`` (None stays None: full caches)."""
    if cache_seqlens is None or isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    return torch.full((batch,), cache_seqlens, dtype=INDEX_DTYPE, device=device)


def query_positions(
    cache_seqlens: torch.Tensor, seqlen_q: int, options: Mapping[str, Any]
) -> torch.Tensor:
    """(batch, seqlen_q) int64 rotary positions of the queries: cache_seqlens[b] + i with causal
    or local attention, else cache_seqlens[b] for every query (flash-attn's rule)."""
    steps = torch.arange(seqlen_q, device=cache_seqlens.device)
    if not rotates_q_consecutively(options):
        steps = torch.zeros_like(steps)
    return cache_seqlens.long()[:, None] + steps


def new_key_positions(cache_seqlens: torch.Tensor, seqlen_new: int) -> torch.Tensor:
    """(batch, seqlen_new) int64: where the new keys go, cache_seqlens[b] + i."""
    return cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=cache_seqlens.device)


def apply_rotary(x: torch.Tensor, rotary: RotaryTables, positions: torch.Tensor) -> torch.Tensor:
    """x (batch, seqlen, heads, d) rotated at ``positions`` (batch, seqlen); a new tensor in
    x's dtype. Computed in float32; dims past rotary_dim are copied unchanged."""
    half = rotary.rotary_dim // 2
    index = _without_wraparound(positions, rotary.cos.shape[0])
    cos = rotary.cos[index].float().unsqueeze(2)  # (batch, seqlen, 1, half)
    sin = rotary.sin[index].float().unsqueeze(2)
    rotated = x[..., : rotary.rotary_dim].float()
    if rotary.interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    else:
        first, second = rotated[..., :half], rotated[..., half:]
    new_first = first * cos - second * sin
    new_second = first * sin + second * cos
    if rotary.interleaved:
        rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((new_first, new_second), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary.rotary_dim :]), dim=-1)


def append_to_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary: RotaryTables | None = None,
) -> None:
    """Writes k, v (batch, seqlen_new, nheads_k, d) into the caches in place at positions
    cache_seqlens[b] + i of sequence b; k is rotated at those positions first when ``rotary``
    is given.

    Caches and indices as ``flash_attn_with_kvcache`` takes them (cache_seqlens an int32 or
    int64 (batch,) tensor). Nothing is read back to the host and every shape is fixed by the
    arguments' shapes, so the append can be captured in a CUDA graph. An index outside the cache
    fails (an index error on the CPU, a device-side assertion on the GPU) instead of writing
    elsewhere.
    """
    positions = new_key_positions(cache_seqlens, k.shape[1])
    dim0, dim1 = cache_cells(positions, k_cache, cache_batch_idx, block_table)
    if rotary is not None:
        k = apply_rotary(k, rotary, positions)
    k_cache.index_put_((dim0, dim1), k)
    v_cache.index_put_((dim0, dim1), v)


def cache_cells(
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where positions (batch, n) of each sequence live in the cache: int64 indices of its
    dims 0 and 1, each (batch, n). Contiguous: (entry, position); paged: (page, slot)."""
    capacity = cache_capacity(k_cache, block_table)
    positions = _without_wraparound(positions, capacity)
    if block_table is None:
        batch = positions.shape[0]
        if cache_batch_idx is None:
            entries = torch.arange(batch, device=positions.device)
        else:
            entries = _without_wraparound(cache_batch_idx.long(), k_cache.shape[0])
        return entries[:, None].expand_as(positions), positions
    page_size = k_cache.shape[1]
    pages = block_table.long().gather(1, positions // page_size)
    return _without_wraparound(pages, k_cache.shape[0]), positions % page_size


def _without_wraparound(index: torch.Tensor, size: int) -> torch.Tensor:
    """``index`` with negative entries replaced by ``size``. Torch reads a negative index from
    the end of the dim; here one is a caller error that indexing must report (as it reports
    ``size``) rather than a write into another sequence's cells."""
    return index.masked_fill(index < 0, size)


def contiguous_cache_as_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_ends: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
) -> VarlenView:
    """A contiguous-cache call as the varlen forward op takes it, without copying the cache.

    q: (batch, seqlen_q, nheads, d) (reshaped to rows: a view when its strides allow, else a
    copy of q, which is small); caches (batch_cache, seqlen_cache, nheads_k, d) whose rows
    ``cache_row_layout`` describes; key_ends: (batch,) int32 end of each sequence's keys
    (cache_seqlens + seqlen_new), None for full caches; cache_batch_idx, cache_leftpad: (batch,)
    int32 or None. Sequence b reads keys cache_leftpad[b] .. key_ends[b] - 1 of entry
    cache_batch_idx[b]. Out-of-range values are clamped into the cache (entries into
    [0, batch_cache), positions into [0, seqlen_cache], leftpad into [0, key_ends]), so that the
    kernel never reads outside it; debug mode reports such values instead.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    entries_total, capacity = k_cache.shape[:2]
    device = q.device
    layout = cache_row_layout(k_cache)
    assert layout is not None, "check_kvcache_inputs refuses such a cache"
    _, rows_per_entry = layout
    rows = cache_rows(k_cache, rows_per_entry)
    if cache_batch_idx is None:
        entries = torch.arange(batch, dtype=INDEX_DTYPE, device=device)
    else:
        entries = cache_batch_idx.clamp(0, entries_total - 1)
    if key_ends is None:
        ends = torch.full((batch,), capacity, dtype=INDEX_DTYPE, device=device)
    else:
        ends = key_ends.to(INDEX_DTYPE).clamp(0, capacity)
    if cache_leftpad is None:
        starts = torch.zeros_like(ends)
    else:
        starts = torch.minimum(cache_leftpad.clamp(min=0), ends)
    # The last entry is never read when seqused_k is given; the row count keeps it meaningful.
    cu_seqlens_k = torch.full((batch + 1,), rows, dtype=INDEX_DTYPE, device=device)
    cu_seqlens_k[:batch] = entries * rows_per_entry + starts
    return VarlenView(
        q=q.reshape(batch * seqlen_q, nheads, head_dim),
        k=_cache_as_rows(k_cache, rows),
        v=_cache_as_rows(v_cache, rows),
        cu_seqlens_q=torch.arange(batch + 1, dtype=INDEX_DTYPE, device=device) * seqlen_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=ends - starts,
        max_seqlen_q=seqlen_q,
        max_seqlen_k=capacity,
    )


def _cache_as_rows(cache: torch.Tensor, rows: int) -> torch.Tensor:
    """The (rows, nheads_k, d) view of a contiguous cache whose entries are a whole number of
    rows apart: the same memory, ending at the last key of the last entry."""
    row_stride, _ = cache_row_layout(cache)
    _, _, nheads_k, head_dim = cache.shape
    return cache.as_strided(
        (rows, nheads_k, head_dim),
        (row_stride, cache.stride(2), cache.stride(3)),
        cache.storage_offset(),
    )
