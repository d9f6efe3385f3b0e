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

Paged K/V (``block_table``, in ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``): the
rules of the block table and of the page pools are here, shared by both; the page numbers are
values in a tensor, checked in debug mode (``check_page_numbers``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flash_varlen import contract
from flash_varlen.errors import error as _error
from flash_varlen.options import (
    OPTIONS,
    Kind,
    Option,
    PublicOption,
    TensorRule,
    host_int,
)

SUPPORTED_DTYPES = tuple(getattr(torch, name) for name in contract.DTYPES)
HEAD_DIM_MULTIPLE = contract.HEAD_DIM_MULTIPLE
MAX_HEAD_DIM = contract.MAX_HEAD_DIM
# Base pointers of torch allocations are at least 16-byte aligned, so the storage offset covers
# the pointer alignment (contract.VECTOR_BYTES).
VECTOR_BYTES = contract.VECTOR_BYTES
CU_SEQLENS_DTYPE = getattr(torch, contract.INDEX_DTYPE)
DEBUG_ENV_VAR = "FLASH_VARLEN_DEBUG"
PAGED_KV_LAYOUT = "(num_pages, page_size, nheads_k, headdim)"
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


# --------------------------------------------------------------------------------------------
# Options


def option_arguments(
    public_values: Mapping[str, Any], public_options: Sequence[PublicOption]
) -> dict[str, Any]:
    """The op arguments of a public call: each public option's value checked and converted
    (``PublicOption.convert``), in declaration order. Tensor options are checked later, with
    the tensors whose sizes they depend on (check_varlen_inputs / check_fixed_inputs).

    Raises what the converters raise: TypeError (wrong type), ValueError (a rule broken),
    NotImplementedError (an option not supported yet); each message names the parameter.
    """
    arguments: dict[str, Any] = {}
    for option in public_options:
        converted = option.convert(public_values[option.name], public_values)
        for name, value in zip(option.sets, converted):
            arguments[name] = value
    return arguments


def resolve_softmax_scale(softmax_scale: float | None, head_dim: IntLike) -> float:
    """Returns ``softmax_scale`` (checked by its converter), defaulting to 1 / sqrt(head_dim)."""
    if softmax_scale is None:
        return 1.0 / head_dim**0.5
    return float(softmax_scale)


def check_tensor_option(
    option: Option, tensor: Any, sizes: Mapping[str, IntLike], name: str | None = None
) -> None:
    """A tensor option (None is always valid): a torch.Tensor of the rule's dtype and of one of
    its shapes, the named sizes taken from ``sizes`` ("batch", "nheads"). Any strides."""
    if tensor is None:
        return
    name = name or option.name
    rule = option.rule
    assert isinstance(rule, TensorRule), option
    _check_is_tensor(tensor, name)
    dtype = getattr(torch, rule.dtype)
    if tensor.dtype != dtype:
        raise TypeError(_error(f"{name} must have dtype {dtype}, got {tensor.dtype}."))
    shapes = [tuple(sizes[dim] for dim in shape) for shape in rule.shapes]
    if tuple(tensor.shape) in shapes:
        return
    described = " or ".join(
        f"({', '.join(shape)}{',' if len(shape) == 1 else ''}) = {values}"
        for shape, values in zip(rule.shapes, shapes)
    )
    note = f", {rule.note}" if rule.note else ""
    ranks = {len(shape) for shape in rule.shapes}
    if len(ranks) == 1 and tensor.dim() not in ranks:
        (rank,) = ranks
        raise ValueError(
            _error(f"{name} must be {rank}-D {described}{note}, got shape {tuple(tensor.shape)}.")
        )
    raise ValueError(
        _error(f"{name} must have shape {described}{note}, got {tuple(tensor.shape)}.")
    )


# The tensor options of each layout (the fixed-length one has no varlen-only option).
_TENSOR_OPTIONS = {
    varlen: tuple(
        option
        for option in OPTIONS
        if option.kind is Kind.OPTIONAL_TENSOR and (varlen or not option.varlen_only)
    )
    for varlen in (False, True)
}


def _check_tensor_options(
    options: Mapping[str, Any], sizes: Mapping[str, IntLike], varlen: bool
) -> list[tuple[torch.Tensor | None, str]]:
    """Checks every tensor option the layout has; returns them with their names for the device
    check."""
    checked = []
    for option in _TENSOR_OPTIONS[varlen]:
        tensor = options.get(option.name)
        check_tensor_option(option, tensor, sizes)
        checked.append((tensor, option.name))
    return checked


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
    max_seqlen_q: Any,
    max_seqlen_k: Any,
    names: ArgNames = DEFAULT_NAMES,
    options: Mapping[str, Any] | None = None,
) -> tuple[IntLike, IntLike]:
    """Checks the packed variable-length layout (metadata only, no device read).

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q, cu_seqlens_k:
    (batch + 1,) int32, contiguous; max_seqlen_q, max_seqlen_k: positive ints read on the host
    (``options.host_int``); ``options``: op arguments whose tensor options (alibi_slopes,
    seqused_q/k) are checked against their rules. With ``options["block_table"]`` (paged K/V:
    :func:`check_page_pools`, :func:`check_block_table`) k and v are page pools instead. All
    tensors on q's (CUDA) device. Returns (max_seqlen_q, max_seqlen_k) as ints.
    """
    options = options or {}
    block_table = options.get("block_table")
    _check_qkv_dtypes(q, k, v, names)
    _check_rank(q, names.q, "(total_q, nheads, headdim)")
    kv_layout = "(total_k, nheads_k, headdim)" if block_table is None else PAGED_KV_LAYOUT
    _check_rank(k, names.k, kv_layout)
    _check_rank(v, names.v, kv_layout)
    _check_head_dims(q, k, v, names)
    _check_heads(q, k, v, names)
    if block_table is None:
        _check_same_size(k, v, dim=0, names=(names.k, names.v), what="total_k")
    else:
        check_page_pools(k, v, (names.k, names.v))
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
    max_seqlens = (
        check_max_seqlen(max_seqlen_q, names.max_seqlen_q),
        check_max_seqlen(max_seqlen_k, names.max_seqlen_k),
    )
    batch = cu_seqlens_q.shape[0] - 1
    sizes = {"batch": batch, "nheads": q.shape[1]}
    tensor_options = _check_tensor_options(options, sizes, varlen=True)
    if block_table is not None:
        check_block_table(block_table, batch, f"len({names.cu_seqlens_k}) - 1")
        _check_paged_capacity(block_table, k, max_seqlens[1], names)
        _check_forward_only(q, k, v, options, names)
    _check_devices(
        q,
        names.q,
        [
            (k, names.k),
            (v, names.v),
            (cu_seqlens_q, names.cu_seqlens_q),
            (cu_seqlens_k, names.cu_seqlens_k),
            *tensor_options,
            (block_table, "block_table"),
        ],
    )
    return max_seqlens


def check_page_pools(k: torch.Tensor, v: torch.Tensor, names: tuple[str, str]) -> None:
    """Paged K/V: k and v are pools of the same shape (num_pages, page_size, nheads_k, d) with at
    least one page of at least one row (``PAGED_KV_LAYOUT``; ranks checked before)."""
    k_name, v_name = names
    if v.shape != k.shape:
        raise ValueError(
            _error(
                f"{v_name} must have the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}."
            )
        )
    for dim, what in ((0, "num_pages"), (1, "page_size")):
        if k.shape[dim] < 1:
            raise ValueError(
                _error(f"{k_name}.shape[{dim}] ({what}) must be positive, got {k.shape[dim]}.")
            )


def check_block_table(block_table: Any, batch: IntLike, batch_source: str) -> None:
    """An int32 (batch, max_pages) tensor with max_pages >= 1 and a contiguous last dim (the
    kernels read a sequence's pages as one row). ``batch_source`` says where batch comes from
    ("q.shape[0]")."""
    _check_is_tensor(block_table, "block_table")
    if block_table.dtype != CU_SEQLENS_DTYPE:
        raise TypeError(
            _error(f"block_table must have dtype torch.int32, got {block_table.dtype}.")
        )
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(
            _error(
                f"block_table must have shape (batch, max_pages) with batch = {batch_source} = "
                f"{batch} and max_pages >= 1, got {tuple(block_table.shape)}."
            )
        )
    if block_table.stride(1) != 1 and block_table.shape[1] > 1:
        raise ValueError(
            _error(
                f"block_table must be contiguous in its last dim (stride(-1) == 1), got strides "
                f"{tuple(block_table.stride())}."
            )
        )


def _check_paged_capacity(
    block_table: torch.Tensor, k: torch.Tensor, max_seqlen_k: IntLike, names: ArgNames
) -> None:
    """A sequence's table holds max_pages * page_size keys, at least max_seqlen_k."""
    max_pages, page_size = block_table.shape[1], k.shape[1]
    if max_pages * page_size < max_seqlen_k:
        raise ValueError(
            _error(
                f"block_table holds max_pages * page_size = {max_pages} * {page_size} = "
                f"{max_pages * page_size} keys per sequence (block_table.shape[1] * "
                f"{names.k}.shape[1]), fewer than {names.max_seqlen_k} = {max_seqlen_k}."
            )
        )


def _check_forward_only(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Mapping[str, Any], names: ArgNames
) -> None:
    """Paged K/V has no backward: refuse a call whose result would need one (an input that
    requires grad, with grad mode on), instead of running a backward on the wrong layout."""
    if not torch.is_grad_enabled():
        return
    differentiable = [(q, names.q), (k, names.k), (v, names.v)]
    differentiable += [
        (options.get(option.name), option.name) for option in OPTIONS if option.differentiable
    ]
    needing = [
        name for tensor, name in differentiable if tensor is not None and tensor.requires_grad
    ]
    if needing:
        raise NotImplementedError(
            _error(
                f"block_table (paged K/V) is forward only, but {', '.join(needing)} "
                f"require{'s' if len(needing) == 1 else ''} grad: pass tensors that do not "
                f"require grad, or run under torch.no_grad() / torch.inference_mode()."
            )
        )


def check_fixed_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    names: ArgNames = DEFAULT_NAMES,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Checks the fixed-length layout (metadata only, no device read).

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d); ``options``' tensor
    options (alibi_slopes) against their rules; all on q's device.
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
    sizes = {"batch": q.shape[0], "nheads": q.shape[2]}
    tensor_options = _check_tensor_options(options or {}, sizes, varlen=False)
    _check_devices(q, names.q, [(k, names.k), (v, names.v), *tensor_options])


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


def _check_int32_vector(tensor: torch.Tensor, name: str, shape: str) -> None:
    _check_is_tensor(tensor, name)
    if tensor.dtype != CU_SEQLENS_DTYPE:
        raise TypeError(_error(f"{name} must have dtype torch.int32, got {tensor.dtype}."))
    if tensor.dim() != 1:
        raise ValueError(_error(f"{name} must be 1-D {shape}, got shape {tuple(tensor.shape)}."))


def check_max_seqlen(value: Any, name: str) -> IntLike:
    """A positive int read on the host (a SymInt under torch.compile stays one)."""
    if not isinstance(value, torch.SymInt):
        value = host_int(value, name, "a Python int (or a CPU integer tensor)")
    if value < 1:
        raise ValueError(_error(f"{name} must be positive, got {value}."))
    return value


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
    total: int | None,
    total_name: str,
    max_seqlen: int,
    max_seqlen_name: str,
) -> None:
    """Checks the contents of ``cu_seqlens`` (debug mode only: copies it to the host).

    Rules: starts at 0, non-decreasing, ends at ``total`` (the packed tensor's dim 0; None when
    nothing is packed: paged keys), and no sequence is longer than ``max_seqlen``. Works on any
    device.
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
    if total is not None and bounds[-1] != total:
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
    block_table: torch.Tensor | None = None,
) -> None:
    """Debug-mode value checks of both ``cu_seqlens`` against the packed q and k, of
    ``seqused_q/k`` (when given) against the slots of their ``cu_seqlens``, and, with a
    ``block_table`` (k a page pool, so cu_seqlens_k only counts keys), of the page numbers of
    each sequence's used keys (``check_page_numbers``)."""
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
        total=k.shape[0] if block_table is None else None,
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
    if block_table is not None:
        bounds = cu_seqlens_k.tolist()
        slots = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        used = slots if seqused_k is None else seqused_k.tolist()
        check_page_numbers(block_table, k, used, names.k)


def check_page_numbers(
    block_table: torch.Tensor, pool: torch.Tensor, keys: Sequence[int], pool_name: str
) -> None:
    """Debug mode only (copies the table to the host): the entries of ``block_table`` that hold
    sequence b's first keys[b] keys lie in [0, num_pages) of ``pool`` (num_pages, page_size,
    ...); entries past them are never read and may hold anything."""
    num_pages, page_size = pool.shape[:2]
    for b, (row, count) in enumerate(zip(block_table.tolist(), keys)):
        used_pages = -(-count // page_size)  # ceiling division
        for index, page in enumerate(row[:used_pages]):
            if not 0 <= page < num_pages:
                raise ValueError(
                    _error(
                        f"block_table[{b}, {index}] = {page} must be in [0, {num_pages}) "
                        f"({pool_name}.shape[0], num_pages): sequence {b} uses its first "
                        f"{used_pages} pages."
                    )
                )
