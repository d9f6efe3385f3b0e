"""The block ranges every kernel family derives from the mask (csrc/kernels/common/visible_keys.h),
compiled with the host C++ compiler and compared with the visible pairs counted one by one (CPU).

The main loops trust these ranges: a key block the forward's range leaves out is never read, a
row block the backward's range leaves out never gets that key block's gradient, and a tile called
free of hidden pairs is not masked at all (the sm90 forward's unmasked blocks, the backward's
tile_has_hidden_pair). So each range must be exact: every block it names has a visible pair (or,
for the unmasked ranges and the hidden-pair test, none hidden), and every block it leaves out has
none. The deterministic sm90 backward's turn count (later_key_blocks_visiting) must match the
ranges exactly too: one too many and a key block waits forever for its turn."""

import subprocess

import numpy as np
import pytest
import torch
from host_cpp import compile_host_driver

# (rows, keys) per block: the sm90 backward's 64 x 128, the forward's 128 x 128, shapes that are
# not powers of two (the 80-row backward tile, the forward's 176-key tile), and the token
# intervals of GQA-packed forward tiles (sm90/query_rows.h: 128 // G tokens, here G = 6 and 8).
TILES = [(64, 128), (128, 128), (80, 128), (128, 176), (21, 128), (16, 176)]

DRIVER = r"""
#include <cstdio>
#include "kernels/common/visible_keys.h"
using namespace flash_varlen;

template <int kBlockM, int kBlockN, bool kIsLocal>
void print_ranges(const VisibleKeys<kIsLocal>& keys) {
    const int row_blocks = (keys.seqlen_q + kBlockM - 1) / kBlockM;
    const int key_blocks = (keys.seqlen_k + kBlockN - 1) / kBlockN;
    std::printf("%d %d", kBlockM, kBlockN);
    for (int m = 0; m < row_blocks; ++m) {
        std::printf(" %d %d %d %d", keys.template key_block_begin<kBlockM, kBlockN>(m),
                    keys.template key_block_end<kBlockM, kBlockN>(m),
                    keys.template unmasked_block_begin<kBlockM, kBlockN>(m),
                    keys.template unmasked_block_end<kBlockM, kBlockN>(m));
    }
    for (int n = 0; n < key_blocks; ++n) {
        std::printf(" %d %d", keys.template row_block_begin<kBlockM, kBlockN>(n),
                    keys.template row_block_end<kBlockM, kBlockN>(n));
    }
    for (int m = 0; m < row_blocks; ++m) {
        for (int n = 0; n < key_blocks; ++n) {
            std::printf(" %d", int(keys.template tile_has_hidden_pair<kBlockM, kBlockN>(
                                   m * kBlockM, n * kBlockN)));
        }
    }
    for (int n = 0; n < key_blocks; ++n) {
        const int m_end = keys.template row_block_end<kBlockM, kBlockN>(n);
        for (int m = keys.template row_block_begin<kBlockM, kBlockN>(n); m < m_end; ++m) {
            std::printf(" %d", keys.template later_key_blocks_visiting<kBlockM, kBlockN>(n, m));
        }
    }
    std::printf("\n");
}

template <bool kIsLocal>
void print_all(const VisibleKeys<kIsLocal>& keys) {
    print_ranges<64, 128>(keys);
    print_ranges<128, 128>(keys);
    print_ranges<80, 128>(keys);
    print_ranges<128, 176>(keys);
    print_ranges<21, 128>(keys);
    print_ranges<16, 176>(keys);
}

// Input: lines "local seqlen_q seqlen_k diagonal window_left window_right". Output: per line, one
// line per tile shape: kBlockM kBlockN, then per row block its key block range and unmasked
// range, per key block its row block range, per (row block, key block) whether the tile holds a
// hidden pair, and per key block and row block it visits the later key blocks visiting it.
int main() {
    int local, seqlen_q, seqlen_k, diagonal, window_left, window_right;
    while (std::scanf("%d %d %d %d %d %d", &local, &seqlen_q, &seqlen_k, &diagonal, &window_left,
                      &window_right) == 6) {
        if (local) {
            print_all(VisibleKeys<true>{seqlen_q, seqlen_k, diagonal, window_left, window_right});
        } else {
            print_all(VisibleKeys<false>{seqlen_q, seqlen_k, diagonal, 0, 0});
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def ranges(tmp_path_factory):
    """[(local, seqlen_q, seqlen_k, diagonal, window_left, window_right)] -> per case, per tile
    shape, the driver's numbers."""
    binary = compile_host_driver(tmp_path_factory, "visible_keys", DRIVER)

    def run(cases: list[tuple[int, ...]]) -> list[list[list[int]]]:
        lines = "".join(" ".join(map(str, case)) + "\n" for case in cases)
        result = subprocess.run([binary], input=lines, capture_output=True, text=True, check=True)
        rows = [list(map(int, line.split())) for line in result.stdout.splitlines()]
        assert len(rows) == len(cases) * len(TILES)
        return [rows[i * len(TILES):(i + 1) * len(TILES)] for i in range(len(cases))]

    return run


def visible_pairs(case: tuple[int, ...]) -> np.ndarray:
    """(seqlen_q, seqlen_k) booleans: query i sees key j (visible_keys.h's rule, pair by pair)."""
    local, seqlen_q, seqlen_k, diagonal, window_left, window_right = case
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k)[None, :]
    if not local:
        return np.ones((len(rows), seqlen_k), dtype=bool)
    return (cols >= rows + diagonal - window_left) & (cols <= rows + diagonal + window_right)


def check_visit_range(begin: int, end: int, blocks: set[int], where: str) -> None:
    """The visited range: exactly the blocks with a visible pair; where there is none (the
    interval of keys or rows the formula reaches lies past the sequence end), empty or one block,
    which is then visited fully masked (visible_keys.h)."""
    visited = set(range(begin, end))
    if blocks:
        assert visited == blocks, where
    else:
        assert len(visited) <= 1, where


def check_case(case: tuple[int, ...], per_tile: list[list[int]]) -> None:
    for (block_m, block_n), numbers in zip(TILES, per_tile, strict=True):
        check_tile(case, block_m, block_n, numbers)


def check_tile(case: tuple[int, ...], block_m: int, block_n: int, numbers: list[int]) -> None:
    """One tile shape's driver output against the pairs counted one by one."""
    _, seqlen_q, seqlen_k, *_ = case
    visible = visible_pairs(case)
    assert numbers[:2] == [block_m, block_n]
    row_blocks = -(-seqlen_q // block_m)
    key_blocks = -(-seqlen_k // block_n)
    # Padded to whole tiles: padding rows are no query (nothing visible, nothing hidden);
    # padding keys are past the sequence end (never visible, hidden from every real row).
    padded = np.zeros((row_blocks * block_m, key_blocks * block_n), dtype=bool)
    padded[:seqlen_q, :seqlen_k] = visible
    real_row = np.zeros((row_blocks * block_m, 1), dtype=bool)
    real_row[:seqlen_q] = True
    tiles_shape = (row_blocks, block_m, key_blocks, block_n)
    any_visible = padded.reshape(tiles_shape).any(axis=(1, 3))
    any_hidden = (real_row & ~padded).reshape(tiles_shape).any(axis=(1, 3))

    values = numbers[2:]
    per_row_block = values[:4 * row_blocks]
    per_key_block = values[4 * row_blocks:4 * row_blocks + 2 * key_blocks]
    first_flag = 4 * row_blocks + 2 * key_blocks
    hidden_flags = values[first_flag:first_flag + row_blocks * key_blocks]
    later_counts = values[first_flag + row_blocks * key_blocks:]
    assert len(hidden_flags) == row_blocks * key_blocks
    where = f"case {case}, tile {block_m} x {block_n}"
    for m in range(row_blocks):
        begin, end, unmasked_begin, unmasked_end = per_row_block[4 * m:4 * m + 4]
        visible_in = set(np.flatnonzero(any_visible[m]).tolist())
        check_visit_range(begin, end, visible_in, f"{where}: key blocks of row block {m}")
        full = set(np.flatnonzero(~any_hidden[m]).tolist())
        assert set(range(unmasked_begin, unmasked_end)) == full, (
            f"{where}: unmasked key blocks of row block {m}")
    for n in range(key_blocks):
        begin, end = per_key_block[2 * n:2 * n + 2]
        seen_by = set(np.flatnonzero(any_visible[:, n]).tolist())
        check_visit_range(begin, end, seen_by, f"{where}: row blocks of key block {n}")
    flags = np.array(hidden_flags, dtype=bool).reshape(row_blocks, key_blocks)
    assert (flags == any_hidden).all(), f"{where}: tiles with a hidden pair"
    # The deterministic backward's turn count (local mask, key blocks in descending order): for
    # each row block a key block visits, the later key blocks whose ranges hold it.
    visits = [range(per_key_block[2 * n], per_key_block[2 * n + 1]) for n in range(key_blocks)]
    expected_counts = [sum(m in visits[later] for later in range(n + 1, key_blocks))
                       for n in range(key_blocks) for m in visits[n]]
    assert later_counts == expected_counts, f"{where}: later key blocks visiting a row block"


def mask_cases(seqlen_q: int, seqlen_k: int) -> list[tuple[int, ...]]:
    """The masks the bindings pass for one pair of lengths: none; causal in both alignments;
    sliding windows (left only, both sides, right only), the unbounded side as the bindings
    write it (seqlen_q + seqlen_k + 1, kernel_params.cpp)."""
    unbounded = seqlen_q + seqlen_k + 1
    bottom_right = seqlen_k - seqlen_q
    cases = [(0, seqlen_q, seqlen_k, bottom_right, 0, 0)]
    for diagonal in (bottom_right, 0):
        for window_left, window_right in [(unbounded, 0), (0, 0), (1, 0), (100, 0), (7, 130),
                                          (unbounded, 65), (0, unbounded), (200, unbounded)]:
            cases.append((1, seqlen_q, seqlen_k, diagonal, window_left, window_right))
    return cases


EDGE_LENGTHS = [0, 1, 2, 63, 64, 65, 79, 80, 81, 127, 128, 129, 175, 176, 177, 255, 256, 257, 300]


@pytest.mark.parametrize("seqlen_q", EDGE_LENGTHS)
def test_ranges_are_exact_for_block_edge_lengths(ranges, seqlen_q: int) -> None:
    cases = [case for seqlen_k in EDGE_LENGTHS for case in mask_cases(seqlen_q, seqlen_k)]
    for case, per_tile in zip(cases, ranges(cases)):
        check_case(case, per_tile)


def test_ranges_are_exact_for_random_lengths_and_windows(ranges) -> None:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(400):
        seqlen_q, seqlen_k, window_left, window_right = torch.randint(
            0, 700, (4,), generator=generator).tolist()
        diagonal = seqlen_k - seqlen_q if window_right % 2 else 0
        cases.append((1, seqlen_q, seqlen_k, diagonal, window_left, window_right))
    for case, per_tile in zip(cases, ranges(cases)):
        check_case(case, per_tile)


def test_a_wrong_range_is_caught(ranges) -> None:
    """The checker itself: the driver's numbers for a causal case pass, and each of them changed
    fails (a range bound or a count moved by one in at least one direction: an empty range stays
    empty one way; a hidden-pair flag flipped), so that the tests above cannot pass by checking
    nothing."""
    case = (1, 200, 300, 100, 200 + 300 + 1, 0)  # causal, bottom-right
    block_m, block_n = TILES[0]
    numbers = ranges([case])[0][0]
    check_tile(case, block_m, block_n, numbers)
    row_blocks, key_blocks = -(-200 // block_m), -(-300 // block_n)
    first_flag = 2 + 4 * row_blocks + 2 * key_blocks
    last_flag = first_flag + row_blocks * key_blocks - 1
    for index in range(2, len(numbers)):
        is_flag = first_flag <= index <= last_flag
        changes = [1 - numbers[index]] if is_flag else [numbers[index] + 1, numbers[index] - 1]
        failures = 0
        for changed in changes:
            wrong = list(numbers)
            wrong[index] = changed
            try:
                check_tile(case, block_m, block_n, wrong)
            except AssertionError:
                failures += 1
        assert failures > 0, f"number {index} of {numbers} changed and still passed"
