"""unpad_input / pad_input (flash-attn 2.7 conventions) on CPU."""

from __future__ import annotations

import torch

from flash_varlen import pad_input, unpad_input

BATCH, SEQLEN, HIDDEN = 4, 6, 5
# Row 2 is all padding (an empty sequence); row 1 has a hole (masks need not be left-aligned).
MASK = torch.tensor(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def hidden() -> torch.Tensor:
    return torch.randn(BATCH, SEQLEN, HIDDEN, generator=torch.Generator().manual_seed(0))


def test_unpad_returns_flash_attn_tuple() -> None:
    states = hidden()
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(states, MASK)

    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 8, 8, 10]
    assert isinstance(max_seqlen, int) and max_seqlen == 5
    assert seqused.dtype == torch.int32 and seqused.tolist() == [3, 5, 0, 2]
    assert indices.tolist() == [0, 1, 2, 6, 8, 9, 10, 11, 18, 19]
    assert packed.shape == (10, HIDDEN)
    assert torch.equal(packed, states[MASK])


def test_round_trip_restores_tokens_and_zeroes_padding() -> None:
    states = hidden()
    packed, indices, *_ = unpad_input(states, MASK)
    restored = pad_input(packed, indices, BATCH, SEQLEN)
    assert restored.shape == states.shape
    assert torch.equal(restored[MASK], states[MASK])
    assert torch.equal(restored[~MASK], torch.zeros_like(restored[~MASK]))


def test_integer_mask_and_extra_dims() -> None:
    """A 0/1 int mask works like a bool one; trailing dims (heads, d) are carried along."""
    states = torch.randn(BATCH, SEQLEN, 3, 8)
    packed, indices, cu_seqlens, _, _ = unpad_input(states, MASK.to(torch.int64))
    assert packed.shape == (10, 3, 8)
    assert cu_seqlens.tolist() == [0, 3, 8, 8, 10]
    assert torch.equal(pad_input(packed, indices, BATCH, SEQLEN)[MASK], states[MASK])


def test_unused_mask_is_packed_but_not_counted_as_used() -> None:
    unused = torch.zeros_like(MASK)
    unused[0, 3] = True  # allocated slot right after sequence 0's tokens
    unused[2, 0] = True  # the padding row gets one allocated slot
    _, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden(), MASK, unused)
    assert cu_seqlens.tolist() == [0, 4, 9, 10, 12]
    assert seqused.tolist() == [3, 5, 0, 2]
    assert max_seqlen == 5
    assert 3 in indices.tolist() and 12 in indices.tolist()


def test_all_padding_batch() -> None:
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(
        hidden(), torch.zeros_like(MASK)
    )
    assert packed.shape == (0, HIDDEN) and indices.numel() == 0
    assert cu_seqlens.tolist() == [0] * (BATCH + 1)
    assert max_seqlen == 0 and seqused.tolist() == [0] * BATCH
    restored = pad_input(packed, indices, BATCH, SEQLEN)
    assert torch.equal(restored, torch.zeros(BATCH, SEQLEN, HIDDEN))


def test_gradients_flow_through_unpad_and_pad() -> None:
    states = hidden().requires_grad_()
    packed, indices, *_ = unpad_input(states, MASK)
    pad_input(packed * 2, indices, BATCH, SEQLEN).sum().backward()
    assert torch.equal(states.grad, 2 * MASK.unsqueeze(-1).expand_as(states).float())
