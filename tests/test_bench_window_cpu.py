"""The sliding-window benchmark's pure logic (CPU): the visible-pair count, its ratios, the table.

The closed form of benchmarks/bench_window.py is checked against a brute-force count of
flash_varlen.reference.visible_keys, the mask the kernels are tested against, so that the
TFLOP/s and ideal ratios the benchmark reports count exactly the pairs the kernels compute.
"""


import pytest

from benchmarks.bench_window import (
    DEFAULT_WINDOWS,
    DIRECTIONS,
    UNBOUNDED,
    add_ratios,
    causal_band_pairs,
    forward_flops,
    ideal_ratio,
    table,
    visible_pairs,
    window_list,
)
from benchmarks.workloads import unmasked_pairs
from flash_varlen import reference

# Lengths around the edge cases: empty, one token, a window exactly as long as the sequence
# (left = seqlen - 1), and lengths that are not multiples of anything.
SEQLENS = [0, 1, 2, 7, 64, 129]
LEFTS = [UNBOUNDED, 0, 1, 5, 6, 63, 64, 128, 1000]
# The case: a 1024-key window on a 16k-token sequence.
LONG_SEQLEN = 16_384
LONG_WINDOW = 1024


def brute_force_pairs(seqlen: int, left: int) -> int:
    """True entries of the reference's causal mask with window (left, 0)."""
    visible = reference.visible_keys(seqlen, seqlen, True, window_size=(left, 0))
    return int(visible.sum())


@pytest.mark.parametrize("left", LEFTS)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_causal_band_pairs_matches_the_reference_mask(seqlen: int, left: int) -> None:
    assert causal_band_pairs(seqlen, left) == brute_force_pairs(seqlen, left)


def test_unbounded_is_the_causal_count_of_workloads() -> None:
    """left = -1 counts what workloads.unmasked_pairs counts for causal, so the plain causal row
    has the TFLOP/s the forward and backward benchmarks would report."""
    lengths = (300, 1, 0, 4096)
    assert visible_pairs(lengths, UNBOUNDED) == unmasked_pairs(lengths, causal=True)
    assert ideal_ratio(lengths, UNBOUNDED) == 1.0


def test_long_sequence_window_count() -> None:
    """1024 keys on 16k tokens: the first 1025 queries see 1 .. 1025 keys, the others 1025, so
    the work is about 1025 / 8192 of causal (each causal query sees 8192 keys on average)."""
    expected = 1025 * 1026 // 2 + (LONG_SEQLEN - 1025) * 1025
    assert causal_band_pairs(LONG_SEQLEN, LONG_WINDOW) == expected
    assert visible_pairs((LONG_SEQLEN,), LONG_WINDOW) == expected
    assert ideal_ratio((LONG_SEQLEN,), LONG_WINDOW) == pytest.approx(
        expected / (LONG_SEQLEN * (LONG_SEQLEN + 1) // 2)
    )


def test_visible_pairs_sums_sequences_and_flops_scale() -> None:
    lengths = (129, 0, 64, 7)
    left = 5
    assert visible_pairs(lengths, left) == sum(brute_force_pairs(s, left) for s in lengths)
    nheads, head_dim = 16, 128
    flops_per_pair = 4 * head_dim * nheads
    assert forward_flops(lengths, left, nheads, head_dim) == (
        flops_per_pair * visible_pairs(lengths, left)
    )


def test_negative_window_below_unbounded_is_rejected() -> None:
    with pytest.raises(ValueError, match="left"):
        causal_band_pairs(10, UNBOUNDED - 1)


def test_window_list_puts_the_causal_baseline_first() -> None:
    assert window_list("1024,256") == [UNBOUNDED, 1024, 256]
    assert window_list("256,-1,256") == [UNBOUNDED, 256]
    assert list(DEFAULT_WINDOWS)[0] == UNBOUNDED


def _row(left: int, forward_ms: float | None, both_ms: float | None) -> dict:
    def result(ms: float | None) -> dict:
        if ms is None:
            return {"status": "n/a", "reason": "test"}
        return {"status": "ok", "time_ms": ms, "tflops": 1.0}

    lengths = (LONG_SEQLEN,)
    return {
        "workload": "16k",
        "window_left": left,
        "visible_pairs": visible_pairs(lengths, left),
        "ideal_ratio": ideal_ratio(lengths, left),
        "forward": result(forward_ms),
        "forward_backward": result(both_ms),
    }


def test_ratios_are_relative_to_the_causal_row_per_direction() -> None:
    rows = [_row(UNBOUNDED, 4.0, 10.0), _row(LONG_WINDOW, 1.0, None), _row(256, 0.5, 2.0)]
    add_ratios(rows)
    assert rows[0]["forward"]["ratio_to_causal"] == 1.0
    assert rows[1]["forward"]["ratio_to_causal"] == 0.25
    assert rows[1]["forward_backward"]["ratio_to_causal"] is None
    assert rows[2]["forward_backward"]["ratio_to_causal"] == 0.2
    header, body = table(rows)
    assert len(body) == len(rows) and all(len(line) == len(header) for line in body)
    assert body[0][1] == "none" and body[1][1] == str(LONG_WINDOW)
    assert body[1][len(header) - 3 :] == ["n/a", "-", "-"]


def test_ratios_without_a_causal_row_are_missing() -> None:
    rows = [_row(UNBOUNDED, None, None), _row(256, 0.5, 2.0)]
    add_ratios(rows)
    for direction in DIRECTIONS:
        assert rows[1][direction]["ratio_to_causal"] is None
