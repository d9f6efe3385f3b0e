"""The decode kernel family's side of ``flash_attn_with_kvcache``: which calls it serves and the
call itself.

The decode kernels (``csrc/kernels/decode/``) read a cache in place, contiguous or paged, with all
query heads of a KV group sharing one read of K/V and long caches split across CTAs
(``num_splits``, 0: the launcher's heuristic). Which kernel serves a call:

- a paged cache: always the decode kernels (nothing else reads pages); a call they cannot serve
  raises NotImplementedError saying why;
- a contiguous cache: the decode kernels for up to ``MAX_DECODE_SEQLEN_Q`` query tokens, the
  range they are built for (decode and speculative decoding); longer query chunks (prefill over
  a cache) go to the varlen forward, whose 128-row tiles suit them;
- either way only when the build has a decode kernel for the call's (dtype, head-dim bucket)
  that runs on the device, and the two caches share their strides (one row offset serves both).

Nothing here reads device memory: the lengths and the block table stay on the device, so a
decode step can be captured in a CUDA graph and replayed with new lengths and tables. The call
goes through the registered op ``flash_varlen::kvcache_fwd`` (``ops.py``), whose fake lets
``torch.compile`` trace it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from flash_varlen import ops
from flash_varlen._extension import load_extension
from flash_varlen.kvcache_validation import KVCacheCall
from flash_varlen.signatures import EXTENSION_ENTRY_POINT_BY_NAME

# Query tokens per request the decode kernels are built for (issue 16: decode and speculative
# decoding up to 16 tokens). They compute longer chunks correctly too (more row blocks, each
# reading the same K/V), which paged caches rely on until a paged prefill path exists.
MAX_DECODE_SEQLEN_Q = 16
DECODE_ENTRY = EXTENSION_ENTRY_POINT_BY_NAME["kvcache_fwd"]
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# (q, head dim) -> why this build cannot run the decode kernel for them here, or None.
KernelCheck = Callable[[torch.Tensor], str | None]


def decode_kernel_refusal(call: KVCacheCall, kernel_check: KernelCheck) -> str | None:
    """Why the decode kernels do not serve ``call`` (a sentence), or None when they do.

    ``kernel_check(q)`` says whether this build has a decode kernel for q's dtype and head dim
    that runs on q's device (:func:`build_kernel_check`; tests pass their own).
    """
    if not call.paged and call.q.shape[1] > MAX_DECODE_SEQLEN_Q:
        return (
            f"seqlen_q = {call.q.shape[1]} is above the {MAX_DECODE_SEQLEN_Q} query tokens the "
            "decode kernels are built for"
        )
    if call.k_cache.stride() != call.v_cache.stride():
        return (
            f"k_cache and v_cache have different strides ({call.k_cache.stride()} and "
            f"{call.v_cache.stride()}); the decode kernels address both with one row offset"
        )
    return kernel_check(call.q)


def build_kernel_check(q: torch.Tensor) -> str | None:
    """Whether the compiled extension has a decode kernel for q's dtype and head dim that runs on
    q's device: None, or why not (dispatch's own message). A host-side query: no sync."""
    if q.device.type != "cuda":
        return f"q is on {q.device}, and the decode kernels run on CUDA devices"
    extension = load_extension()
    if not hasattr(extension, DECODE_ENTRY.name):
        return "this build of the extension predates the decode kernels"
    major, minor = _device_capability(q.device.index)
    try:
        extension.select_kernel_family(
            "decode", _DTYPE_NAMES[q.dtype], q.shape[-1], False, major * 10 + minor
        )
    except NotImplementedError as refusal:
        return str(refusal)
    return None


@functools.lru_cache(maxsize=None)
def _device_capability(index: int | None) -> tuple[int, int]:
    """torch.cuda.get_device_capability, asked once per device: it cannot change, and asking on
    every decode step cost a few microseconds of host time."""
    return torch.cuda.get_device_capability(index)


def decode_attention(
    call: KVCacheCall, cache_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode op on ``call``: appends its new keys and values to the cache (rotated with its
    rotary tables), rotates its queries, attends; returns out (batch, seqlen_q, nheads, d) and
    softmax_lse (batch, nheads, seqlen_q) float32.

    cache_lengths: int32 (batch,) each request's cache length before the append (the capacity
    for full caches); keys start at cache_leftpad.
    """
    rotary = call.rotary_cos is not None
    arguments = {
        **{name: value for name, value in call.options.items() if name in DECODE_ENTRY.names},
        "block_table": call.block_table,
        "cache_batch_idx": call.cache_batch_idx,
        "cache_leftpad": call.cache_leftpad,
        "num_splits": call.num_splits,
        "k_new": _last_dim_contiguous(call.k),
        "v_new": _last_dim_contiguous(call.v),
        "rotary_cos": _last_dim_contiguous(call.rotary_cos) if rotary else None,
        "rotary_sin": _last_dim_contiguous(call.rotary_sin) if rotary else None,
        "rotary_interleaved": call.rotary_interleaved,
    }
    appends = call.k is not None
    tensors = [call.q, call.k_cache, call.v_cache, cache_lengths, *arguments.values()]
    if ops.op_dispatch_needed(tensors, differentiable=False):
        # The registered op (while tracing, its fake gives the shapes); only a call that appends
        # declares that it writes the caches (ops.py).
        kernel = ops.kvcache_append_fwd if appends else ops.kvcache_fwd
        out, softmax_lse, _, _ = kernel(
            call.q, call.k_cache, call.v_cache, cache_lengths, **arguments
        )
        return out, softmax_lse
    # Otherwise the same call without the op's dispatch layers, which would also have told
    # autograd that the caches changed: said here, as an in-place torch write would.
    out, softmax_lse, _, _ = ops.kvcache_fwd_eager(
        call.q, call.k_cache, call.v_cache, cache_lengths, **arguments
    )
    if appends:
        torch.autograd.graph.increment_version((call.k_cache, call.v_cache))
    return out, softmax_lse


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, copied only when its last dim is strided (the append kernel reads rows of d)."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()
