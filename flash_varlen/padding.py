"""Conversions between padded batches and the packed variable-length layout.

Same names, arguments and returns as ``flash_attn.bert_padding`` (flash-attn 2.7). These are
convenience helpers, not kernels: ``unpad_input`` reads the mask's row lengths back to the host
(one device synchronization) to return ``max_seqlen`` as a Python int, and the gathers are
ordinary differentiable PyTorch indexing.

The ``cu_seqlens_from_*`` helpers build only the ``(cu_seqlens, max_seqlen)`` pair that the
varlen attention functions take, from per-sequence lengths, a padding mask or packed
``position_ids``. Each states in its docstring when it reads device memory back to the host; given
``max_seqlen`` (and, for ``position_ids``, ``max_sequences``) they read nothing back.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from flash_varlen.validation import _check_is_tensor, _error, check_max_seqlen

CU_SEQLENS_DTYPE = torch.int32
# cu_seqlens is int32, so the total number of tokens must fit in it.
CU_SEQLENS_MAX_TOTAL = torch.iinfo(CU_SEQLENS_DTYPE).max
# Integer dtypes accepted for lengths and position_ids (bool is a mask, not a count).
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def unpad_input(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    unused_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Packs the tokens kept by the masks, sequence after sequence.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen), bool or 0/1 integers; nonzero marks a real token.
        unused_mask: optional (batch, seqlen); nonzero marks a slot that is allocated but unused
            (kept in the packed tensor and counted in cu_seqlens, but not in seqused).

    Returns:
        hidden_unpadded: (total, ...), the kept tokens; total = number of kept slots.
        indices: (total,) int64, the kept positions in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1,) int32 prefix sums of the kept lengths, starting at 0.
        max_seqlen: Python int, the longest kept length (0 when nothing is kept); synchronizes.
        seqused: (batch,) int32, the number of real tokens (attention_mask only) per sequence.

    A row of the mask that is all zero gives an empty sequence (two equal cu_seqlens entries).
    """
    kept = attention_mask.bool()
    if unused_mask is not None:
        kept = kept | unused_mask.bool()
    seqlens = kept.sum(dim=-1, dtype=CU_SEQLENS_DTYPE)
    seqused = attention_mask.bool().sum(dim=-1, dtype=CU_SEQLENS_DTYPE)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() > 0 else 0
    cu_seqlens = torch.nn.functional.pad(
        torch.cumsum(seqlens, dim=0, dtype=CU_SEQLENS_DTYPE), (1, 0)
    )
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, max_seqlen, seqused


def pad_input(
    hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int
) -> torch.Tensor:
    """Scatters packed tokens back into a zero-padded batch (inverse of ``unpad_input``).

    Args:
        hidden_states: (total, ...), packed tokens.
        indices: (total,), their positions in the flattened (batch * seqlen) output.
        batch, seqlen: the padded shape.

    Returns:
        (batch, seqlen, ...) with zeros at positions not listed in ``indices``.
    """
    rest = hidden_states.shape[1:]
    padded = hidden_states.new_zeros(batch * seqlen, *rest)
    padded = padded.index_copy(0, indices, hidden_states)
    return padded.reshape(batch, seqlen, *rest)


# --------------------------------------------------------------------------------------------
# cu_seqlens helpers


def cu_seqlens_from_lengths(
    lengths: torch.Tensor | Sequence[int],
    max_seqlen: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """Builds ``cu_seqlens`` from per-sequence lengths.

    Args:
        lengths: the length of each sequence, either a 1-D integer tensor (batch,) (uint8, int8,
            int16, int32 or int64) or a Python sequence (list, tuple) of ints. Zeros are allowed
            and give empty sequences.
        max_seqlen: None to compute the longest length, or an upper bound (a Python int >= 1)
            that the attention kernels only use to size their grids; it is returned unchanged.
        device: only for a Python sequence: where to build ``cu_seqlens`` (default CPU). A
            tensor's ``cu_seqlens`` stays on the tensor's device, so ``device`` must then be None
            (move the tensor yourself; this function makes no hidden copies).

    Returns:
        cu_seqlens: (batch + 1,) int32 prefix sums of ``lengths``, starting at 0, on the tensor's
            device (or ``device`` for a Python sequence).
        max_seqlen: Python int, the longest length (0 for an empty batch or all-zero lengths, as
            in ``unpad_input``; the attention functions need >= 1), or the given bound.

    Synchronization and checks:
        A Python sequence is checked on the host (ints, non-negative, total fits in int32, and
        a given ``max_seqlen`` not below the longest length) and reads nothing back; building
        ``cu_seqlens`` on ``device`` is an ordinary blocking copy of batch + 1 ints (on CUDA it
        waits for the current stream), so in a loop that must not wait, pass a device tensor.
        A tensor with ``max_seqlen=None`` is read back once (its minimum, maximum and total in a
        single transfer), which also checks that no length is negative and that the total fits
        in int32. A tensor with ``max_seqlen`` given is not read at all, so those two rules
        cannot be checked: a negative length or an int32 overflow gives a wrong ``cu_seqlens``.

    Raises:
        TypeError: lengths neither an integer tensor nor a sequence of ints; max_seqlen not an int.
        ValueError: lengths not 1-D, negative, or summing past int32; max_seqlen < 1 or below the
            longest length of a Python sequence; device given with a tensor.
    """
    if max_seqlen is not None:
        max_seqlen = check_max_seqlen(max_seqlen, "max_seqlen")
    if isinstance(lengths, torch.Tensor):
        if device is not None:
            raise ValueError(
                _error(
                    f"device applies only when lengths is a Python sequence, got device={device} "
                    "with a tensor; move the tensor instead (lengths.to(device))."
                )
            )
        _check_integer_tensor(lengths, "lengths", dims=(1,), shape="(batch,)")
        return _cu_seqlens_from_seqlens(lengths, max_seqlen, "lengths")
    return _cu_seqlens_from_python_lengths(lengths, max_seqlen, device)


def cu_seqlens_from_attention_mask(
    attention_mask: torch.Tensor, max_seqlen: int | None = None
) -> tuple[torch.Tensor, int]:
    """Builds ``cu_seqlens`` from a padding mask, with the convention of ``unpad_input``.

    Args:
        attention_mask: (batch, seqlen), bool or integer; nonzero marks a real token. A row's
            length is its number of real tokens, wherever they are in the row (``unpad_input``
            keeps them in order), so an all-zero row is an empty sequence.
        max_seqlen: None to compute the longest length, or an upper bound (a Python int >= 1)
            that the attention kernels only use to size their grids; it is returned unchanged.

    Returns:
        cu_seqlens: (batch + 1,) int32 on the mask's device, equal to ``unpad_input``'s.
        max_seqlen: Python int, the most real tokens in a row (0 when there are none, as in
            ``unpad_input``; the attention functions need >= 1), or the given bound.

    Synchronization: with ``max_seqlen=None`` the row lengths are read back once (their
    maximum, with their minimum and total in the same transfer); with ``max_seqlen`` given
    nothing is read back.

    Raises:
        TypeError: attention_mask not a bool or integer tensor; max_seqlen not an int.
        ValueError: attention_mask not 2-D; max_seqlen < 1.
    """
    if max_seqlen is not None:
        max_seqlen = check_max_seqlen(max_seqlen, "max_seqlen")
    _check_integer_tensor(
        attention_mask, "attention_mask", dims=(2,), shape="(batch, seqlen)", allow_bool=True
    )
    seqlens = (attention_mask != 0).sum(dim=-1)
    return _cu_seqlens_from_seqlens(seqlens, max_seqlen, "attention_mask")


def cu_seqlens_from_position_ids(
    position_ids: torch.Tensor,
    max_seqlen: int | None = None,
    max_sequences: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Builds ``cu_seqlens`` from the position ids of a padding-free packed batch.

    This is the convention of Hugging Face's ``DataCollatorWithFlattening``: the documents are
    concatenated into one (1, total) row with no padding, and every document's positions restart
    at 0, so a document begins wherever ``position_ids == 0`` (the rule of
    ``modeling_flash_attention_utils.py`` in huggingface/transformers).

    Sequence starts: every index where ``position_ids == 0``, and the first token of every row,
    even when its position is not 0 (for instance a packed chunk that begins in the middle of a
    document). A (batch, seqlen) input is read row-major as one packed row, and since its rows
    are separate examples a sequence never spans two rows. Every token belongs to a sequence: this
    is not the tool for padded batches (use ``cu_seqlens_from_attention_mask``). An input with no
    tokens has no sequences.

    Args:
        position_ids: (total,), (1, total) or (batch, seqlen), integer (uint8, int8, int16,
            int32 or int64); at most 2**31 - 1 tokens, as cu_seqlens is int32.
        max_seqlen: None to compute the longest sequence, or an upper bound (a Python int >= 1)
            that the attention kernels only use to size their grids; it is returned unchanged.
        max_sequences: None to return exactly one entry per sequence, or a Python int N >= 1
            (an upper bound on the number of sequences) to return exactly N + 1 entries without
            a device read: the entries after the last real sequence equal ``total``
            (empty trailing sequences, which the attention kernels accept).

    Returns:
        cu_seqlens: (batch + 1,) int32 on the input's device, where batch is the number of
            sequences, or N when ``max_sequences=N``.
        max_seqlen: Python int, the longest sequence (0 when there are no tokens), or the given
            bound.

    Synchronization: with ``max_sequences=None`` the number of sequences is found with
    ``torch.nonzero`` (one synchronization); with ``max_seqlen=None`` the longest sequence is read
    back (one more). With both given nothing is read back.

    More than ``max_sequences`` sequences is the caller's error, which cannot be detected without
    a device read: only the first N starts are kept (``torch.nonzero_static`` truncates), so the
    sequences past the N-th are merged into the N-th one, which then runs to ``total``. The result
    is still a well-formed cu_seqlens, but those documents attend to each other, and a given
    ``max_seqlen`` may be below the merged length.

    Raises:
        TypeError: position_ids not an integer tensor; max_seqlen or max_sequences not an int.
        ValueError: position_ids not 1-D or 2-D or longer than 2**31 - 1 tokens; max_seqlen or
            max_sequences < 1.
    """
    if max_seqlen is not None:
        max_seqlen = check_max_seqlen(max_seqlen, "max_seqlen")
    if max_sequences is not None:
        _check_positive_int(max_sequences, "max_sequences")
    _check_integer_tensor(
        position_ids, "position_ids", dims=(1, 2), shape="(total,), (1, total) or (batch, seqlen)"
    )
    total = position_ids.numel()
    if total > CU_SEQLENS_MAX_TOTAL:
        raise ValueError(
            _error(
                f"position_ids must hold at most {CU_SEQLENS_MAX_TOTAL} tokens (cu_seqlens is "
                f"int32), got {total}."
            )
        )
    is_start = (position_ids == 0).reshape(-1)
    if total > 0:
        # The first token of each row starts a sequence: rows are separate examples, and a
        # packed row whose first position is not 0 would otherwise lose its leading tokens.
        is_start[:: position_ids.shape[-1]] = True
    if max_sequences is None:
        starts = torch.nonzero(is_start).reshape(-1)
    else:
        # Pads with `total` (empty trailing sequences) and truncates past max_sequences; both
        # keep the output shape independent of the data, so nothing is read back.
        starts = torch.nonzero_static(is_start, size=max_sequences, fill_value=total).reshape(-1)
    end = torch.full((1,), total, dtype=CU_SEQLENS_DTYPE, device=position_ids.device)
    cu_seqlens = torch.cat((starts.to(CU_SEQLENS_DTYPE), end))
    if max_seqlen is None:
        # An input with no tokens and no max_sequences gives cu_seqlens = [0]: no sequences.
        max_seqlen = int(cu_seqlens.diff().max().item()) if cu_seqlens.numel() > 1 else 0
    return cu_seqlens, max_seqlen


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(_error(f"{name} must be a Python int, got {type(value).__name__}."))
    if value < 1:
        raise ValueError(_error(f"{name} must be positive, got {value}."))


def _check_integer_tensor(
    tensor: object,
    name: str,
    *,
    dims: tuple[int, ...],
    shape: str,
    allow_bool: bool = False,
) -> None:
    """Checks type, dtype (integer, or also bool) and rank; reads no device memory."""
    _check_is_tensor(tensor, name)
    allowed = INTEGER_DTYPES + ((torch.bool,) if allow_bool else ())
    if tensor.dtype not in allowed:
        kinds = "a bool or integer" if allow_bool else "an integer"
        raise TypeError(_error(f"{name} must have {kinds} dtype, got {tensor.dtype}."))
    if tensor.dim() not in dims:
        raise ValueError(_error(f"{name} must have shape {shape}, got {tuple(tensor.shape)}."))


def _cu_seqlens_from_python_lengths(
    lengths: object, max_seqlen: int | None, device: torch.device | str | None
) -> tuple[torch.Tensor, int]:
    """cu_seqlens_from_lengths for a Python sequence: every check on the host, no device read."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(
            _error(
                "lengths must be a 1-D integer tensor or a sequence of Python ints, got "
                f"{type(lengths).__name__}."
            )
        )
    for index, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(
                _error(f"lengths[{index}] must be an int, got {type(length).__name__}.")
            )
        if length < 0:
            raise ValueError(_error(f"lengths[{index}] must be non-negative, got {length}."))
    cumulative = list(itertools.accumulate(lengths, initial=0))
    _check_total_fits(cumulative[-1], "lengths")
    longest = max(lengths, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(
            _error(
                f"max_seqlen must be at least the longest length ({longest}), got {max_seqlen}."
            )
        )
    cu_seqlens = torch.tensor(cumulative, dtype=CU_SEQLENS_DTYPE, device=device)
    return cu_seqlens, longest if max_seqlen is None else max_seqlen


def _cu_seqlens_from_seqlens(
    seqlens: torch.Tensor, max_seqlen: int | None, name: str
) -> tuple[torch.Tensor, int]:
    """Prefix sums of a (batch,) integer tensor; reads back once only when max_seqlen is None.

    ``name`` is the caller's argument, for messages.
    """
    # Summed in int64 so that an overflow of int32 shows in the total instead of wrapping.
    cumulative = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int64), (1, 0))
    cu_seqlens = cumulative.to(CU_SEQLENS_DTYPE)
    if max_seqlen is not None:
        return cu_seqlens, max_seqlen
    if seqlens.numel() == 0:
        return cu_seqlens, 0  # known from the shape, so no read
    # One transfer for the three numbers, instead of one synchronization per number.
    summary = torch.stack((seqlens.min().long(), seqlens.max().long(), cumulative[-1]))
    shortest, longest, total = summary.tolist()
    if shortest < 0:
        raise ValueError(_error(f"{name} must be non-negative, got a length of {shortest}."))
    _check_total_fits(total, name)
    return cu_seqlens, longest


def _check_total_fits(total: int, name: str) -> None:
    if total > CU_SEQLENS_MAX_TOTAL:
        raise ValueError(
            _error(
                f"{name} must sum to at most {CU_SEQLENS_MAX_TOTAL} tokens (cu_seqlens is "
                f"int32), got {total}."
            )
        )
