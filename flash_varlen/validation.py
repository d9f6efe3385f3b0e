"""Input checks run by the public functions before any kernel.

Every rule raises an exception whose message names the argument and states the rule:
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, layout, device or value,
``NotImplementedError`` for an option that flash_varlen does not support yet.

The default path looks only at Python values and tensor metadata (shape, dtype, strides,
device): it never reads device memory, so it adds no host-device synchronization and
``torch.compile`` traces it into guards. Checks of the *contents* of ``cu_seqlens`` read device
memory and therefore run only in debug mode (environment variable ``FLASH_VARLEN_DEBUG=1``,
read at call time; under ``torch.compile`` the value seen while tracing is baked into the graph,
and the value checks break the graph).

Device checks come last on purpose: every other rule can then be exercised with CPU tensors on
machines without a GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
# The kernels move rows with 16-byte vector loads, so every stride and the storage offset must
# be a whole number of 16-byte vectors (8 elements of a 2-byte dtype). Base pointers of torch
# allocations are at least 16-byte aligned, so the storage offset covers the pointer alignment.
VECTOR_BYTES = 16
CU_SEQLENS_DTYPE = torch.int32
DEBUG_ENV_VAR = "FLASH_VARLEN_DEBUG"
_DEBUG_ON_VALUES = frozenset({"1", "true", "yes", "on"})

IntLike = int | torch.SymInt


@dataclass(frozen=True)
class ArgNames:
    """Argument names used in messages; the packed variants name views such as ``qkv[:, 0]``."""

    q: str = "q"
    k: str = "k"
    v: str = "v"
    cu_seqlens_q: str = "cu_seqlens_q"
    cu_seqlens_k: str = "cu_seqlens_k"
    max_seqlen_q: str = "max_seqlen_q"
    max_seqlen_k: str = "max_seqlen_k"


DEFAULT_NAMES = ArgNames()


def _error(message: str) -> str:
    return f"flash_varlen: {message}"


# --------------------------------------------------------------------------------------------
# Options


def check_options(
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool = False,
    block_table: torch.Tensor | None = None,
) -> bool:
    """Checks the keyword options; returns the effective ``causal`` flag.

    ``window_size=(-1, 0)`` is causal attention spelled as a window (in flash-attn,
    ``causal=True`` means right = 0 with left = -1), so it is accepted with either value of
    ``causal`` and normalized to ``causal=True``.

    Raises:
        NotImplementedError: dropout_p != 0, softcap != 0, alibi_slopes or block_table given, or a
            sliding window (any window other than (-1, -1) and (-1, 0)).
        TypeError / ValueError: softmax_scale not a finite positive number, causal or
            deterministic not a bool, window_size not a pair of ints.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(
            _error(f"dropout_p={dropout_p} is not supported yet; only dropout_p=0.0 is.")
        )
    if softcap != 0.0:
        raise NotImplementedError(
            _error(f"softcap={softcap} (logit soft-capping) is not supported yet; use 0.0.")
        )
    if alibi_slopes is not None:
        raise NotImplementedError(_error("alibi_slopes is not supported yet; pass None."))
    if block_table is not None:
        raise NotImplementedError(
            _error("block_table (paged KV cache) is not supported yet; pass None.")
        )
    _check_softmax_scale(softmax_scale)
    for flag_name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(_error(f"{flag_name} must be a bool, got {type(flag).__name__}."))
    return _causal_from_window(window_size, causal)


def _check_softmax_scale(softmax_scale: float | None) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            _error(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}.")
        )
    # The kernels take the row maximum of the unscaled scores, which is only the maximum of
    # the scaled scores for a positive scale.
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(
            _error(f"softmax_scale must be finite and positive, got {softmax_scale}.")
        )


def _causal_from_window(window_size: Sequence[int], causal: bool) -> bool:
    if not isinstance(window_size, Sequence) or len(window_size) != 2:
        raise ValueError(
            _error(f"window_size must be a pair (left, right) of ints, got {window_size!r}.")
        )
    for bound in window_size:
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(_error(f"window_size must be a pair of ints, got {window_size!r}."))
    # As in flash-attn, a negative bound is unbounded and causal forces right = 0.
    left_unbounded = window_size[0] < 0
    right = 0 if causal else window_size[1]
    if left_unbounded and right < 0:
        return False
    if left_unbounded and right == 0:
        return True
    raise NotImplementedError(
        _error(
            f"window_size={tuple(window_size)} with causal={causal} is a sliding window, which "
            "is not supported yet; use window_size=(-1, -1) (optionally with causal=True) or "
            "(-1, 0), which means causal."
        )
    )


def resolve_softmax_scale(softmax_scale: float | None, head_dim: IntLike) -> float:
    """Returns ``softmax_scale`` (checked by check_options), defaulting to 1 / sqrt(head_dim)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return float(softmax_scale)


# --------------------------------------------------------------------------------------------
# Tensors


def check_packed(packed: torch.Tensor, name: str, *, layout: str, count: int) -> None:
    """Checks a packed qkv / kv tensor: the layout string's rank, with ``count`` at dim -3."""
    _check_is_tensor(packed, name)
    rank = len(layout.split(","))  # the layout string lists one name per dim
    if packed.dim() != rank or packed.shape[-3] != count:
        raise ValueError(_error(f"{name} must have shape {layout}, got {tuple(packed.shape)}."))


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: IntLike,
    max_seqlen_k: IntLike,
    names: ArgNames = DEFAULT_NAMES,
) -> None:
    """Checks the packed variable-length layout (metadata only, no device read).

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32, contiguous; max_seqlen_q, max_seqlen_k: positive Python ints.
    """
    _check_qkv_dtypes(q, k, v, names)
    _check_rank(q, names.q, "(total_q, nheads, headdim)")
    _check_rank(k, names.k, "(total_k, nheads_k, headdim)")
    _check_rank(v, names.v, "(total_k, nheads_k, headdim)")
    _check_head_dims(q, k, v, names)
    _check_heads(q, k, v, names)
    _check_same_size(k, v, dim=0, names=(names.k, names.v), what="total_k")
    _check_layouts(q, k, v, names)
    _check_cu_seqlens(cu_seqlens_q, names.cu_seqlens_q)
    _check_cu_seqlens(cu_seqlens_k, names.cu_seqlens_k)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            _error(
                f"{names.cu_seqlens_k} must have the same length (batch + 1) as "
                f"{names.cu_seqlens_q} ({cu_seqlens_q.shape[0]}), got {cu_seqlens_k.shape[0]}."
            )
        )
    _check_max_seqlen(max_seqlen_q, names.max_seqlen_q)
    _check_max_seqlen(max_seqlen_k, names.max_seqlen_k)
    _check_devices(
        q,
        names.q,
        [
            (k, names.k),
            (v, names.v),
            (cu_seqlens_q, names.cu_seqlens_q),
            (cu_seqlens_k, names.cu_seqlens_k),
        ],
    )


def check_fixed_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    names: ArgNames = DEFAULT_NAMES,
) -> None:
    """Checks the fixed-length layout (metadata only, no device read).

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
    """
    _check_qkv_dtypes(q, k, v, names)
    _check_rank(q, names.q, "(batch, seqlen_q, nheads, headdim)")
    _check_rank(k, names.k, "(batch, seqlen_k, nheads_k, headdim)")
    _check_rank(v, names.v, "(batch, seqlen_k, nheads_k, headdim)")
    _check_head_dims(q, k, v, names)
    _check_heads(q, k, v, names)
    _check_same_size(q, k, dim=0, names=(names.q, names.k), what="batch")
    _check_same_size(q, v, dim=0, names=(names.q, names.v), what="batch")
    _check_same_size(k, v, dim=1, names=(names.k, names.v), what="seqlen_k")
    _check_layouts(q, k, v, names)
    _check_devices(q, names.q, [(k, names.k), (v, names.v)])


def _check_is_tensor(value: object, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(_error(f"{name} must be a torch.Tensor, got {type(value).__name__}."))


def _check_qkv_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: ArgNames) -> None:
    for tensor, name in ((q, names.q), (k, names.k), (v, names.v)):
        _check_is_tensor(tensor, name)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            _error(f"{names.q} must have dtype torch.float16 or torch.bfloat16, got {q.dtype}.")
        )
    for tensor, name in ((k, names.k), (v, names.v)):
        if tensor.dtype != q.dtype:
            raise TypeError(
                _error(
                    f"{name} must have the same dtype as {names.q} ({q.dtype}), "
                    f"got {tensor.dtype}."
                )
            )


def _check_rank(tensor: torch.Tensor, name: str, layout: str) -> None:
    rank = len(layout.split(","))  # the layout string lists one name per dim
    if tensor.dim() != rank:
        raise ValueError(
            _error(f"{name} must have {rank} dims {layout}, got shape {tuple(tensor.shape)}.")
        )


def _check_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: ArgNames) -> None:
    head_dim = q.shape[-1]
    if head_dim % HEAD_DIM_MULTIPLE != 0 or not HEAD_DIM_MULTIPLE <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            _error(
                f"{names.q}.shape[-1] (head dim) must be a multiple of {HEAD_DIM_MULTIPLE} "
                f"between {HEAD_DIM_MULTIPLE} and {MAX_HEAD_DIM}, got {head_dim}."
            )
        )
    for tensor, name in ((k, names.k), (v, names.v)):
        if tensor.shape[-1] != head_dim:
            raise ValueError(
                _error(
                    f"{name}.shape[-1] (head dim) must equal {names.q}.shape[-1] ({head_dim}), "
                    f"got {tensor.shape[-1]}."
                )
            )


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: ArgNames) -> None:
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads < 1:
        raise ValueError(_error(f"{names.q}.shape[-2] (nheads) must be positive, got {nheads}."))
    if nheads_k < 1:
        raise ValueError(
            _error(f"{names.k}.shape[-2] (nheads_k) must be positive, got {nheads_k}.")
        )
    _check_same_size(k, v, dim=-2, names=(names.k, names.v), what="nheads_k")
    if nheads % nheads_k != 0:
        raise ValueError(
            _error(
                f"nheads ({names.q}.shape[-2] = {nheads}) must be a multiple of nheads_k "
                f"({names.k}.shape[-2] = {nheads_k}) for grouped-query attention."
            )
        )


def _check_same_size(
    a: torch.Tensor, b: torch.Tensor, *, dim: int, names: tuple[str, str], what: str
) -> None:
    if a.shape[dim] != b.shape[dim]:
        raise ValueError(
            _error(
                f"{names[1]}.shape[{dim}] ({what}) must equal {names[0]}.shape[{dim}] "
                f"({a.shape[dim]}), got {b.shape[dim]}."
            )
        )


def _check_layouts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: ArgNames) -> None:
    for tensor, name in ((q, names.q), (k, names.k), (v, names.v)):
        _check_layout(tensor, name)


def _check_layout(tensor: torch.Tensor, name: str) -> None:
    problem = layout_problem(tensor, name)
    if problem is not None:
        raise ValueError(problem)


def has_kernel_layout(tensor: torch.Tensor) -> bool:
    """Whether the kernels can read ``tensor`` as it is (the rules of :func:`layout_problem`)."""
    return layout_problem(tensor, "tensor") is None


def layout_problem(tensor: torch.Tensor, name: str) -> str | None:
    """The first memory-layout rule of the kernels that ``tensor`` breaks, or None.

    Rules (metadata only): stride(-1) == 1; every other stride of a dim of size > 1 a multiple
    of 16 bytes; storage offset a multiple of 16 bytes. The message names ``name``.
    """
    if tensor.stride(-1) != 1:
        return _error(
            f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides "
            f"{tuple(tensor.stride())}; call .contiguous() first."
        )
    alignment = VECTOR_BYTES // tensor.element_size()
    for dim in range(tensor.dim() - 1):
        # The stride of a dim of size 0 or 1 is never multiplied by a nonzero index.
        if tensor.shape[dim] > 1 and tensor.stride(dim) % alignment != 0:
            return _error(
                f"{name}.stride({dim}) must be a multiple of {alignment} elements "
                f"({VECTOR_BYTES}-byte aligned rows), got {tensor.stride(dim)}."
            )
    # Dynamo cannot trace storage_offset(); under torch.compile the extension's own check of
    # the data pointer's alignment applies instead. (data_ptr() itself is no alternative:
    # traced tensors have none.)
    if not torch.compiler.is_compiling() and tensor.storage_offset() % alignment != 0:
        return _error(
            f"{name}.storage_offset() must be a multiple of {alignment} elements "
            f"({VECTOR_BYTES}-byte aligned start), got {tensor.storage_offset()}."
        )
    return None


def _check_cu_seqlens(cu_seqlens: torch.Tensor, name: str) -> None:
    _check_is_tensor(cu_seqlens, name)
    if cu_seqlens.dtype != CU_SEQLENS_DTYPE:
        raise TypeError(_error(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}."))
    if cu_seqlens.dim() != 1:
        raise ValueError(
            _error(f"{name} must be 1-D (batch + 1,), got shape {tuple(cu_seqlens.shape)}.")
        )
    if cu_seqlens.shape[0] < 2:
        raise ValueError(
            _error(f"{name} must have batch + 1 >= 2 entries, got {cu_seqlens.shape[0]}.")
        )
    if cu_seqlens.stride(0) != 1:
        raise ValueError(_error(f"{name} must be contiguous, got stride {cu_seqlens.stride(0)}."))


def _check_max_seqlen(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(
            _error(
                f"{name} must be a Python int (a tensor would need a device read), "
                f"got {type(value).__name__}."
            )
        )
    if value < 1:
        raise ValueError(_error(f"{name} must be positive, got {value}."))


def _check_devices(q: torch.Tensor, q_name: str, others: list[tuple[torch.Tensor, str]]) -> None:
    if q.device.type != "cuda":
        raise ValueError(_error(f"{q_name} must be a CUDA tensor, got device {q.device}."))
    for tensor, name in others:
        if tensor.device != q.device:
            raise ValueError(
                _error(
                    f"{name} must be on the same device as {q_name} ({q.device}), "
                    f"got {tensor.device}."
                )
            )


# --------------------------------------------------------------------------------------------
# Debug mode: value checks that read device memory


def debug_enabled() -> bool:
    """Whether FLASH_VARLEN_DEBUG asks for value checks (read at every call)."""
    return os.environ.get(DEBUG_ENV_VAR, "").strip().lower() in _DEBUG_ON_VALUES


def check_cu_seqlens_values(
    cu_seqlens: torch.Tensor,
    *,
    name: str,
    total: int,
    total_name: str,
    max_seqlen: int,
    max_seqlen_name: str,
) -> None:
    """Checks the contents of ``cu_seqlens`` (debug mode only: copies it to the host).

    Rules: starts at 0, non-decreasing, ends at ``total`` (the packed tensor's dim 0), and no
    sequence is longer than ``max_seqlen``. Works on any device.
    """
    bounds = [int(value) for value in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(_error(f"{name}[0] must be 0, got {bounds[0]}."))
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    for index, length in enumerate(lengths):
        if length < 0:
            raise ValueError(
                _error(
                    f"{name} must be non-decreasing, but {name}[{index + 1}] = "
                    f"{bounds[index + 1]} < {name}[{index}] = {bounds[index]}."
                )
            )
    if bounds[-1] != total:
        raise ValueError(_error(f"{name}[-1] must equal {total_name} = {total}, got {bounds[-1]}."))
    longest = max(lengths)
    if longest > max_seqlen:
        raise ValueError(
            _error(
                f"{max_seqlen_name} = {max_seqlen} is smaller than the longest sequence in "
                f"{name} (sequence {lengths.index(longest)} has length {longest})."
            )
        )


def check_varlen_values(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    names: ArgNames = DEFAULT_NAMES,
) -> None:
    """Debug-mode value checks of both ``cu_seqlens`` against the packed q and k."""
    check_cu_seqlens_values(
        cu_seqlens_q,
        name=names.cu_seqlens_q,
        total=q.shape[0],
        total_name=f"{names.q}.shape[0]",
        max_seqlen=max_seqlen_q,
        max_seqlen_name=names.max_seqlen_q,
    )
    check_cu_seqlens_values(
        cu_seqlens_k,
        name=names.cu_seqlens_k,
        total=k.shape[0],
        total_name=f"{names.k}.shape[0]",
        max_seqlen=max_seqlen_k,
        max_seqlen_name=names.max_seqlen_k,
    )
