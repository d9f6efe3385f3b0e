"""The attention backend the paged engine calls: anything with ``flash_attn_with_kvcache``'s
signature (the arguments the engine passes are those of ``KVCacheAttention``).

``flash_attn_with_kvcache`` itself is the GPU backend. ``reference_attention`` wraps the float32
reference (``flash_varlen.reference.attention_ref_kvcache``) in the same contract, so that the
CPU tests run the engine unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch

from flash_varlen.reference import attention_ref_kvcache


class KVCacheAttention(Protocol):
    """Appends k, v (batch, seqlen_new, nheads_k, d) to the paged caches in place at positions
    cache_seqlens[b] + i (keys rotated first), then returns the attention of q (batch, seqlen_q,
    nheads, d), rotated at cache_seqlens[b] + i, over each sequence's cached keys: out (batch,
    seqlen_q, nheads, d) in q's dtype. flash_attn_with_kvcache's semantics."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor,
        causal: bool,
        rotary_interleaved: bool,
    ) -> torch.Tensor: ...


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **options,
) -> torch.Tensor:
    """``attention_ref_kvcache`` as a KVCacheAttention. The reference returns updated copies
    of the caches rather than writing them; they are copied back, which makes the append in
    place as the engine expects (the whole pool per call: fine for the tests' small pools)."""
    result = attention_ref_kvcache(q, k_cache, v_cache, k, v, **options)
    k_cache.copy_(result.k_cache)
    v_cache.copy_(result.v_cache)
    return result.out.to(q.dtype)
