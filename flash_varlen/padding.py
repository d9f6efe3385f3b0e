"""Conversions between padded batches and the packed variable-length layout.

Same names, arguments and returns as ``flash_attn.bert_padding`` (flash-attn 2.7). These are
convenience helpers, not kernels: ``unpad_input`` reads the mask's row lengths back to the host
(one device synchronization) to return ``max_seqlen`` as a Python int, and the gathers are
ordinary differentiable PyTorch indexing.
"""

from __future__ import annotations

import torch

CU_SEQLENS_DTYPE = torch.int32


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
