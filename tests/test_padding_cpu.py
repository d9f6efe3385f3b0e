"""unpad_input / pad_input (flash-attn 2.7 conventions) and the cu_seqlens helpers on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flash_varlen import pad_input, unpad_input
from flash_varlen.padding import (
    cu_seqlens_from_attention_mask,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
)

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


# --------------------------------------------------------------------------------------------
# cu_seqlens helpers
#
# "No host synchronization" is checked with meta tensors: they have a shape and a dtype but no
# data, so every read of values (.item(), .tolist(), bool(), torch.nonzero, boolean indexing)
# raises on them. A call that completes on meta inputs therefore read nothing back, which on a
# GPU means it did not wait for the device; the synchronizing variants are shown to raise there.

META = torch.device("meta")
INT32_MAX = torch.iinfo(torch.int32).max
# Position ids of three packed documents of lengths 3, 2 and 4 (the padding-free HF layout).
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
PACKED_CU_SEQLENS = [0, 3, 5, 9]


def assert_cu_seqlens(result: tuple[torch.Tensor, int], expected: list[int], longest: int) -> None:
    cu_seqlens, max_seqlen = result
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.device.type == "cpu"
    assert cu_seqlens.tolist() == expected
    assert type(max_seqlen) is int and max_seqlen == longest


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_cu_seqlens_from_length_tensor(dtype: torch.dtype) -> None:
    lengths = torch.tensor([3, 0, 5, 2], dtype=dtype)
    assert_cu_seqlens(cu_seqlens_from_lengths(lengths), [0, 3, 3, 8, 10], 5)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize(
    ("lengths", "expected", "longest"),
    [
        ([3, 0, 5, 2], [0, 3, 3, 8, 10], 5),
        ([7], [0, 7], 7),  # a single sequence
        ([0, 0], [0, 0, 0], 0),  # only empty sequences: max_seqlen 0, as unpad_input
        ([], [0], 0),  # an empty batch
    ],
)
def test_cu_seqlens_from_lengths_cases(
    lengths: list[int], expected: list[int], longest: int, as_tensor: bool
) -> None:
    given = torch.tensor(lengths, dtype=torch.int64) if as_tensor else lengths
    assert_cu_seqlens(cu_seqlens_from_lengths(given), expected, longest)


def test_cu_seqlens_from_lengths_python_sequence_device() -> None:
    """A Python sequence is built on CPU unless `device` says otherwise; a tuple works too."""
    assert cu_seqlens_from_lengths((2, 1))[0].device.type == "cpu"
    cu_seqlens, max_seqlen = cu_seqlens_from_lengths([2, 1], device=META)
    assert cu_seqlens.device == META and cu_seqlens.dtype == torch.int32
    assert cu_seqlens.shape == (3,) and max_seqlen == 2


def test_cu_seqlens_from_lengths_given_max_seqlen_reads_nothing() -> None:
    lengths = torch.tensor([3, 0, 5, 2])
    assert_cu_seqlens(cu_seqlens_from_lengths(lengths, max_seqlen=64), [0, 3, 3, 8, 10], 64)
    assert_cu_seqlens(cu_seqlens_from_lengths([3, 0, 5], max_seqlen=5), [0, 3, 3, 8], 5)

    cu_seqlens, max_seqlen = cu_seqlens_from_lengths(lengths.to(META), max_seqlen=64)
    assert cu_seqlens.device == META and cu_seqlens.dtype == torch.int32
    assert cu_seqlens.shape == (5,) and max_seqlen == 64
    with pytest.raises((RuntimeError, NotImplementedError)):
        cu_seqlens_from_lengths(lengths.to(META))  # computing max_seqlen reads the lengths


@pytest.mark.parametrize("max_seqlen", [np.int64(6), torch.tensor(6), torch.tensor([6])])
def test_given_max_seqlen_may_be_any_host_integer(max_seqlen: object) -> None:
    """As flash-attn's integer arguments: numpy ints and one-element CPU integer tensors are
    read on the host and returned as a Python int."""
    _, returned = cu_seqlens_from_lengths([3, 6], max_seqlen=max_seqlen)
    assert returned == 6 and type(returned) is int


def test_cu_seqlens_from_lengths_given_max_seqlen_cannot_see_negative_tensor_lengths() -> None:
    """The documented limit: without a read-back a negative length goes through unchecked."""
    cu_seqlens, _ = cu_seqlens_from_lengths(torch.tensor([2, -1]), max_seqlen=4)
    assert cu_seqlens.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("lengths", "kwargs", "error", "match"),
    [
        (torch.tensor([1.0, 2.0]), {}, TypeError, "lengths must have an integer dtype"),
        (torch.tensor([True]), {}, TypeError, "lengths must have an integer dtype"),
        (torch.ones(2, 2, dtype=torch.int64), {}, ValueError, r"lengths must have shape"),
        (torch.tensor([2, -1]), {}, ValueError, "lengths must be non-negative"),
        (torch.tensor([INT32_MAX, 1]), {}, ValueError, "lengths must sum to at most"),
        ([INT32_MAX, 1], {}, ValueError, "lengths must sum to at most"),
        ([2, -1], {}, ValueError, r"lengths\[1\] must be non-negative"),
        ([2, True], {}, TypeError, r"lengths\[1\] must be an int"),
        ([2, 1.0], {}, TypeError, r"lengths\[1\] must be an int"),
        ("12", {}, TypeError, "lengths must be a 1-D integer tensor or a sequence"),
        (3, {}, TypeError, "lengths must be a 1-D integer tensor or a sequence"),
        ([4, 9], {"max_seqlen": 8}, ValueError, "max_seqlen must be at least the longest"),
        ([1], {"max_seqlen": 0}, ValueError, "max_seqlen must be positive"),
        ([1], {"max_seqlen": True}, TypeError, "max_seqlen must be a Python int"),
        ([1], {"max_seqlen": 2.0}, TypeError, "max_seqlen must be a Python int"),
        ([1], {"max_seqlen": torch.tensor(2, device="meta")}, TypeError, "a meta tensor would"),
        (torch.tensor([1]), {"device": "cpu"}, ValueError, "device applies only when lengths"),
    ],
)
def test_cu_seqlens_from_lengths_rejects(
    lengths: object, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cu_seqlens_from_lengths(lengths, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_cu_seqlens_from_attention_mask(dtype: torch.dtype) -> None:
    assert_cu_seqlens(cu_seqlens_from_attention_mask(MASK.to(dtype)), [0, 3, 8, 8, 10], 5)


def test_cu_seqlens_from_attention_mask_edge_cases() -> None:
    assert_cu_seqlens(cu_seqlens_from_attention_mask(torch.zeros_like(MASK)), [0] * 5, 0)
    assert_cu_seqlens(cu_seqlens_from_attention_mask(torch.ones(1, 4, dtype=torch.bool)), [0, 4], 4)
    assert_cu_seqlens(cu_seqlens_from_attention_mask(torch.zeros(0, 6, dtype=torch.bool)), [0], 0)


def test_cu_seqlens_from_attention_mask_given_max_seqlen_reads_nothing() -> None:
    assert_cu_seqlens(cu_seqlens_from_attention_mask(MASK, max_seqlen=6), [0, 3, 8, 8, 10], 6)

    cu_seqlens, max_seqlen = cu_seqlens_from_attention_mask(MASK.to(META), max_seqlen=6)
    assert cu_seqlens.device == META and cu_seqlens.dtype == torch.int32
    assert cu_seqlens.shape == (BATCH + 1,) and max_seqlen == 6
    with pytest.raises((RuntimeError, NotImplementedError)):
        cu_seqlens_from_attention_mask(MASK.to(META))


@pytest.mark.parametrize("seed", range(8))
def test_cu_seqlens_from_attention_mask_agrees_with_unpad_input(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch, seqlen = torch.randint(1, 9, (2,), generator=generator).tolist()
    density = torch.rand((), generator=generator)
    mask = torch.rand(batch, seqlen, generator=generator) < density
    mask[0] = False  # always include an empty sequence
    _, _, expected_cu_seqlens, expected_max_seqlen, _ = unpad_input(
        torch.zeros(batch, seqlen, 1), mask
    )
    cu_seqlens, max_seqlen = cu_seqlens_from_attention_mask(mask)
    assert torch.equal(cu_seqlens, expected_cu_seqlens)
    assert max_seqlen == expected_max_seqlen


@pytest.mark.parametrize(
    ("mask", "kwargs", "error", "match"),
    [
        (MASK.float(), {}, TypeError, "attention_mask must have a bool or integer dtype"),
        (MASK[0], {}, ValueError, r"attention_mask must have shape \(batch, seqlen\)"),
        (MASK.tolist(), {}, TypeError, "attention_mask must be a torch.Tensor"),
        (MASK, {"max_seqlen": -1}, ValueError, "max_seqlen must be positive"),
    ],
)
def test_cu_seqlens_from_attention_mask_rejects(
    mask: object, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cu_seqlens_from_attention_mask(mask, **kwargs)


@pytest.mark.parametrize(
    ("position_ids", "expected", "longest"),
    [
        (PACKED_POSITIONS, PACKED_CU_SEQLENS, 4),  # (1, total), as DataCollatorWithFlattening
        (PACKED_POSITIONS[0], PACKED_CU_SEQLENS, 4),  # (total,)
        (PACKED_POSITIONS.int(), PACKED_CU_SEQLENS, 4),
        ([[5]], [0, 1], 1),  # a single token
        ([[0, 1, 2, 3]], [0, 4], 4),  # a single sequence
        ([[2, 3, 0, 1, 0]], [0, 2, 4, 5], 2),  # not starting at 0: index 0 starts a sequence
        ([0, 0, 0], [0, 1, 2, 3], 1),  # one-token documents
        # (batch, seqlen): row 1 starts a sequence although its first position is 5.
        ([[0, 1, 2, 0], [5, 6, 0, 1]], [0, 3, 4, 6, 8], 3),
        ([[0, 1, 0, 1], [0, 1, 2, 3]], [0, 2, 4, 8], 4),
    ],
)
def test_cu_seqlens_from_position_ids(
    position_ids: torch.Tensor | list, expected: list[int], longest: int
) -> None:
    position_ids = torch.as_tensor(position_ids)
    assert_cu_seqlens(cu_seqlens_from_position_ids(position_ids), expected, longest)


def test_cu_seqlens_from_position_ids_reads_rows_in_logical_order() -> None:
    """A non-contiguous (batch, seqlen) view is read row-major like its contiguous copy."""
    position_ids = torch.tensor([[0, 7], [1, 0], [2, 1]]).t()  # rows [0, 1, 2] and [7, 0, 1]
    assert not position_ids.is_contiguous()
    assert_cu_seqlens(cu_seqlens_from_position_ids(position_ids), [0, 3, 4, 6], 3)


@pytest.mark.parametrize("shape", [(0,), (1, 0), (3, 0)])
def test_cu_seqlens_from_position_ids_without_tokens(shape: tuple[int, ...]) -> None:
    position_ids = torch.zeros(shape, dtype=torch.int64)
    assert_cu_seqlens(cu_seqlens_from_position_ids(position_ids), [0], 0)
    assert_cu_seqlens(cu_seqlens_from_position_ids(position_ids, max_sequences=2), [0, 0, 0], 0)


@pytest.mark.parametrize("seed", range(4))
def test_cu_seqlens_from_position_ids_recovers_packed_lengths(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 10, (), generator=generator))
    # Documents have at least one token: an empty one has no position 0 to mark its start.
    lengths = torch.randint(1, 12, (batch,), generator=generator).tolist()
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(position_ids)
    assert cu_seqlens.diff().tolist() == lengths
    assert torch.equal(cu_seqlens, cu_seqlens_from_lengths(lengths)[0])
    assert max_seqlen == max(lengths)


def test_cu_seqlens_from_position_ids_max_sequences_pads_with_total() -> None:
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(PACKED_POSITIONS, max_sequences=5)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == PACKED_CU_SEQLENS + [9, 9]  # two empty trailing sequences
    assert max_seqlen == 4  # still computed, because max_seqlen was not given
    exact, _ = cu_seqlens_from_position_ids(PACKED_POSITIONS, max_sequences=3)
    assert exact.tolist() == PACKED_CU_SEQLENS


def test_cu_seqlens_from_position_ids_too_few_max_sequences_merges_the_rest() -> None:
    """Past max_sequences the remaining documents are merged into the last kept sequence."""
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(PACKED_POSITIONS, max_sequences=2)
    assert cu_seqlens.tolist() == [0, 3, 9]
    assert max_seqlen == 6
    position_ids = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])
    cu_seqlens, _ = cu_seqlens_from_position_ids(position_ids, max_sequences=1)
    assert cu_seqlens.tolist() == [0, 8]


def test_cu_seqlens_from_position_ids_with_both_bounds_reads_nothing() -> None:
    assert_cu_seqlens(
        cu_seqlens_from_position_ids(PACKED_POSITIONS, max_seqlen=16, max_sequences=4),
        PACKED_CU_SEQLENS + [9],
        16,
    )
    for position_ids in (PACKED_POSITIONS, torch.zeros(2, 5, dtype=torch.int64)):
        cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(
            position_ids.to(META), max_seqlen=16, max_sequences=4
        )
        assert cu_seqlens.device == META and cu_seqlens.dtype == torch.int32
        assert cu_seqlens.shape == (5,) and max_seqlen == 16
    # Either bound missing needs a read: nonzero for the count, .item() for the longest.
    with pytest.raises((RuntimeError, NotImplementedError)):
        cu_seqlens_from_position_ids(PACKED_POSITIONS.to(META), max_seqlen=16)
    with pytest.raises((RuntimeError, NotImplementedError)):
        cu_seqlens_from_position_ids(PACKED_POSITIONS.to(META), max_sequences=4)


@pytest.mark.parametrize(
    ("position_ids", "kwargs", "error", "match"),
    [
        (PACKED_POSITIONS.float(), {}, TypeError, "position_ids must have an integer dtype"),
        (PACKED_POSITIONS == 0, {}, TypeError, "position_ids must have an integer dtype"),
        (PACKED_POSITIONS[None], {}, ValueError, r"position_ids must have shape \(total,\)"),
        (torch.tensor(0), {}, ValueError, r"position_ids must have shape \(total,\)"),
        ([0, 1], {}, TypeError, "position_ids must be a torch.Tensor"),
        # An expanded view has the shape without the memory; the check reads only the shape.
        (
            torch.zeros(1, dtype=torch.int64).expand(INT32_MAX + 1),
            {},
            ValueError,
            "position_ids must hold at most",
        ),
        (PACKED_POSITIONS, {"max_sequences": 0}, ValueError, "max_sequences must be positive"),
        (PACKED_POSITIONS, {"max_sequences": True}, TypeError, "max_sequences must be a Python"),
        (PACKED_POSITIONS, {"max_sequences": 2.0}, TypeError, "max_sequences must be a Python"),
        (PACKED_POSITIONS, {"max_seqlen": 0}, ValueError, "max_seqlen must be positive"),
    ],
)
def test_cu_seqlens_from_position_ids_rejects(
    position_ids: object, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cu_seqlens_from_position_ids(position_ids, **kwargs)
