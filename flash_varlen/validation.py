"""Input checks run by the public functions before any kernel.

Every rule raises an exception whose message names the argument and states the rule:
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, layout, device or value,
``NotImplementedError`` for an option that flash_varlen does not support yet.

The default path looks only at Python values and tensor metadata (shape, dtype, strides,
device): it never reads device memory, so it adds no host-device synchronization and
``torch.compile`` traces it into guards. Checks of the *contents* of ``cu_seqlens`` and
``seqused_q/k`` read device memory and therefore run only in debug mode (environment variable
``FLASH_VARLEN_DEBUG=1``, read at call time; under ``torch.compile`` the value seen while
tracing is baked into the graph, and the value checks break the graph).

Device checks come last on purpose: every other rule can then be exercised with CPU tensors on
machines without a GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen.reference import BOTTOM_RIGHT, CAUSAL_ALIGNMENTS, TOP_LEFT, UNBOUNDED

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
# The kernels move rows with 16-byte vector loads, so every stride and the storage offset must
# be a whole number of 16-byte vectors (8 elements of a 2-byte dtype). Base pointers of torch
# allocations are at least 16-byte aligned, so the storage offset covers the pointer alignment.
VECTOR_BYTES = 16
CU_SEQLENS_DTYPE = torch.int32
ALIBI_SLOPES_DTYPE = torch.float32
# Unbounded on the left, nothing to the right of the diagonal: the causal mask as a window.
CAUSAL_WINDOW = (UNBOUNDED, 0)
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


@dataclass(frozen=True)
class Options:
    """The checked keyword options, in the form the registered ops take them.

    ``window_left`` and ``window_right`` are the effective window sides (-1 unbounded) after
    ``causal`` forced right = 0. ``causal`` is also True for the window (-1, 0) given without
    it: that window is exactly the causal mask, and the flag lets the kernels treat it as one.
    ``causal_top_left`` is ``causal_alignment == "top_left"``.
    """

    causal: bool
    deterministic: bool
    window_left: int
    window_right: int
    softcap: float
    causal_top_left: bool
    dropout_p: float

    def variant_kwargs(self) -> dict[str, Any]:
        """The options that the forward ops take by keyword, under the ops' parameter names."""
        return {
            "window_left": self.window_left,
            "window_right": self.window_right,
            "softcap": self.softcap,
            "causal_top_left": self.causal_top_left,
            "dropout_p": self.dropout_p,
        }


def check_options(
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
    deterministic: bool = False,
    causal_alignment: str = BOTTOM_RIGHT,
    block_table: torch.Tensor | None = None,
) -> Options:
    """Checks the keyword options that are not tensors; returns them as the ops take them.

    ``alibi_slopes`` and ``seqused_q/k`` are tensors whose shapes depend on q and cu_seqlens:
    ``check_varlen_inputs`` and ``check_fixed_inputs`` check them.

    Raises:
        NotImplementedError: block_table given.
        TypeError: dropout_p, softcap or softmax_scale not a number, causal or deterministic
            not a bool, window_size not a pair of ints.
        ValueError: dropout_p outside [0, 1); softcap negative or not finite; softmax_scale not
            finite and positive; window_size not a pair, or a side below -1; causal_alignment
            not "bottom_right" or "top_left".
    """
    if block_table is not None:
        raise NotImplementedError(
            _error("block_table (paged KV cache) is not supported yet; pass None.")
        )
    _check_number(dropout_p, "dropout_p", "a float")
    # Written so that NaN fails too.
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(_error(f"dropout_p must be in [0, 1), got {dropout_p}."))
    _check_number(softcap, "softcap", "a float")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(
            _error(f"softcap must be finite and >= 0 (0 disables it), got {softcap}.")
        )
    _check_softmax_scale(softmax_scale)
    for flag_name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(_error(f"{flag_name} must be a bool, got {type(flag).__name__}."))
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(
            _error(
                f"causal_alignment must be {BOTTOM_RIGHT!r} or {TOP_LEFT!r}, got "
                f"{causal_alignment!r}."
            )
        )
    window_left, window_right = _effective_window(window_size, causal)
    return Options(
        causal=causal or (window_left, window_right) == CAUSAL_WINDOW,
        deterministic=deterministic,
        window_left=window_left,
        window_right=window_right,
        softcap=float(softcap),
        causal_top_left=causal_alignment == TOP_LEFT,
        dropout_p=float(dropout_p),
    )


def _check_number(value: object, name: str, expected: str) -> None:
    """TypeError unless ``value`` is an int or a float (a bool is neither here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_error(f"{name} must be {expected}, got {type(value).__name__}."))


def _check_softmax_scale(softmax_scale: float | None) -> None:
    if softmax_scale is None:
        return
    _check_number(softmax_scale, "softmax_scale", "a float or None")
    # The kernels take the row maximum of the unscaled scores, which is only the maximum of
    # the scaled scores for a positive scale.
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(
            _error(f"softmax_scale must be finite and positive, got {softmax_scale}.")
        )


def _effective_window(window_size: Sequence[int], causal: bool) -> tuple[int, int]:
    """(left, right) of ``window_size`` after ``causal`` forced right = 0 (as in flash-attn)."""
    if not isinstance(window_size, Sequence) or len(window_size) != 2:
        raise ValueError(
            _error(f"window_size must be a pair (left, right) of ints, got {window_size!r}.")
        )
    for bound in window_size:
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(_error(f"window_size must be a pair of ints, got {window_size!r}."))
    left, right = window_size
    if left < UNBOUNDED or right < UNBOUNDED:
        raise ValueError(
            _error(
                f"window_size sides must be -1 (unbounded) or >= 0, got {tuple(window_size)}."
            )
        )
    return left, 0 if causal else right


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
    *,
    alibi_slopes: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> None:
    """Checks the packed variable-length layout (metadata only, no device read).

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32, contiguous; max_seqlen_q, max_seqlen_k: positive Python ints;
    alibi_slopes: None or float32 (nheads,) or (batch, nheads); seqused_q, seqused_k: None or
    (batch,) int32. All on q's (CUDA) device.
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
    batch = cu_seqlens_q.shape[0] - 1
    _check_alibi_slopes(alibi_slopes, batch, q.shape[1])
    for seqused, name in ((seqused_q, "seqused_q"), (seqused_k, "seqused_k")):
        _check_seqused(seqused, name, batch)
    _check_devices(
        q,
        names.q,
        [
            (k, names.k),
            (v, names.v),
            (cu_seqlens_q, names.cu_seqlens_q),
            (cu_seqlens_k, names.cu_seqlens_k),
            (alibi_slopes, "alibi_slopes"),
            (seqused_q, "seqused_q"),
            (seqused_k, "seqused_k"),
        ],
    )


def check_fixed_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    names: ArgNames = DEFAULT_NAMES,
    *,
    alibi_slopes: torch.Tensor | None = None,
) -> None:
    """Checks the fixed-length layout (metadata only, no device read).

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d); alibi_slopes: None
    or float32 (nheads,) or (batch, nheads) on q's device.
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
    _check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[2])
    _check_devices(q, names.q, [(k, names.k), (v, names.v), (alibi_slopes, "alibi_slopes")])


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
    _check_int32_vector(cu_seqlens, name, "(batch + 1,)")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(
            _error(f"{name} must have batch + 1 >= 2 entries, got {cu_seqlens.shape[0]}.")
        )
    if cu_seqlens.stride(0) != 1:
        raise ValueError(_error(f"{name} must be contiguous, got stride {cu_seqlens.stride(0)}."))


def _check_seqused(seqused: torch.Tensor | None, name: str, batch: IntLike) -> None:
    """int32 (batch,); any stride (the extension makes it contiguous)."""
    if seqused is None:
        return
    _check_int32_vector(seqused, name, "(batch,)")
    if seqused.shape[0] != batch:
        raise ValueError(
            _error(
                f"{name} must have shape (batch,) = ({batch},), one entry per sequence, got "
                f"{tuple(seqused.shape)}."
            )
        )


def _check_int32_vector(tensor: torch.Tensor, name: str, shape: str) -> None:
    _check_is_tensor(tensor, name)
    if tensor.dtype != CU_SEQLENS_DTYPE:
        raise TypeError(_error(f"{name} must have dtype torch.int32, got {tensor.dtype}."))
    if tensor.dim() != 1:
        raise ValueError(_error(f"{name} must be 1-D {shape}, got shape {tuple(tensor.shape)}."))


def _check_alibi_slopes(alibi_slopes: torch.Tensor | None, batch: IntLike, nheads: IntLike) -> None:
    """float32 (nheads,) or (batch, nheads); any strides (the extension makes it contiguous)."""
    if alibi_slopes is None:
        return
    _check_is_tensor(alibi_slopes, "alibi_slopes")
    if alibi_slopes.dtype != ALIBI_SLOPES_DTYPE:
        raise TypeError(
            _error(f"alibi_slopes must have dtype torch.float32, got {alibi_slopes.dtype}.")
        )
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(
            _error(
                f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}."
            )
        )


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


def _check_devices(
    q: torch.Tensor, q_name: str, others: list[tuple[torch.Tensor | None, str]]
) -> None:
    """q on a CUDA device, and every other tensor given (None is skipped) on q's."""
    if q.device.type != "cuda":
        raise ValueError(_error(f"{q_name} must be a CUDA tensor, got device {q.device}."))
    for tensor, name in others:
        if tensor is not None and tensor.device != q.device:
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


def check_seqused_values(
    seqused: torch.Tensor, *, name: str, cu_seqlens: torch.Tensor, cu_seqlens_name: str
) -> None:
    """Checks that 0 <= seqused[b] <= the length of slot b of ``cu_seqlens`` (debug mode only:
    copies both to the host). Works on any device."""
    bounds = cu_seqlens.tolist()
    for index, used in enumerate(seqused.tolist()):
        slot = bounds[index + 1] - bounds[index]
        if not 0 <= used <= slot:
            raise ValueError(
                _error(
                    f"{name}[{index}] = {used} must be in [0, {slot}], the length of sequence "
                    f"{index}'s slot in {cu_seqlens_name}."
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
    *,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> None:
    """Debug-mode value checks of both ``cu_seqlens`` against the packed q and k, and of
    ``seqused_q/k`` (when given) against the slots of their ``cu_seqlens``."""
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
    for seqused, name, cu_seqlens, cu_seqlens_name in (
        (seqused_q, "seqused_q", cu_seqlens_q, names.cu_seqlens_q),
        (seqused_k, "seqused_k", cu_seqlens_k, names.cu_seqlens_k),
    ):
        if seqused is not None:
            check_seqused_values(
                seqused, name=name, cu_seqlens=cu_seqlens, cu_seqlens_name=cu_seqlens_name
            )
