"""The sm90 backward's padded row layout (csrc/kernels/sm90/padded_rows.h), compiled with the host
C++ compiler: every sequence's padded rows start on a row block, lie inside the head's rows and
never overlap another sequence's, and the row kernels' search finds each row block's sequence
(CPU)."""

import subprocess

import pytest
import torch

from host_cpp import compile_host_driver

BLOCK_ROWS = 64  # the backward's kBlockM (flash_bwd_launch.h, BwdTileConfig)

DRIVER = r"""
#include <cstdio>
#include "kernels/sm90/padded_rows.h"
using namespace flash_varlen::sm90;
// Input: is_varlen block_rows batch seqlen_q, then `batch` lengths. Output, one line each: rows
// per head, then each sequence's first padded row; the sequence of each padded row block.
int main() {
    int is_varlen;
    long long block_rows, batch, seqlen_q;
    while (std::scanf("%d %lld %lld %lld", &is_varlen, &block_rows, &batch, &seqlen_q) == 4) {
        long long first_query_row = 0;
        long long starts[4096];
        int cu_seqlens[4097] = {0};
        for (long long b = 0; b < batch; ++b) {
            long long length;
            if (std::scanf("%lld", &length) != 1) return 1;
            starts[b] = padded_first_row(is_varlen, first_query_row, b, seqlen_q, block_rows);
            first_query_row += length;
            cu_seqlens[b + 1] = int(first_query_row);
        }
        const long long rows = padded_rows_per_head(is_varlen, first_query_row, batch, seqlen_q,
                                                    block_rows);
        std::printf("%lld", rows);
        for (long long b = 0; b < batch; ++b) std::printf(" %lld", starts[b]);
        std::printf("\n");
        for (long long row = 0; row < rows; row += block_rows) {
            std::printf("%d ", padded_row_sequence(is_varlen, cu_seqlens, int(batch), seqlen_q,
                                                   row, block_rows));
        }
        std::printf("\n");
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """(is_varlen, lengths) -> (rows per head, first padded row of each sequence)."""
    binary = compile_host_driver(tmp_path_factory, "padded_rows", DRIVER)

    def run(is_varlen: bool, lengths: list[int]) -> tuple[int, list[int]]:
        seqlen_q = max(lengths, default=0)
        line = f"{int(is_varlen)} {BLOCK_ROWS} {len(lengths)} {seqlen_q} "
        line += " ".join(map(str, lengths)) + "\n"
        result = subprocess.run([binary], input=line, capture_output=True, text=True, check=True)
        layout_line, sequence_line = result.stdout.split("\n")[:2]
        rows, *starts = map(int, layout_line.split())
        check_row_block_sequences(rows, starts, list(map(int, sequence_line.split())))
        return rows, starts

    return run


def check_row_block_sequences(rows: int, starts: list[int], sequences: list[int]) -> None:
    """padded_row_sequence, the row kernels' search: each padded row block maps to the last
    sequence starting at or before it."""
    assert len(sequences) == rows // BLOCK_ROWS
    for block, sequence in enumerate(sequences):
        row = block * BLOCK_ROWS
        expected = max(b for b, start in enumerate(starts) if start <= row)
        assert sequence == expected, f"row {row}: sequence {sequence}, expected {expected}"


def check_layout(rows: int, starts: list[int], lengths: list[int]) -> None:
    assert rows % BLOCK_ROWS == 0  # every head starts 16-byte aligned
    end = 0
    for start, length in zip(starts, lengths):
        assert start % BLOCK_ROWS == 0
        assert start >= end, "overlaps the previous sequence's padded rows"
        end = start + -(-length // BLOCK_ROWS) * BLOCK_ROWS  # the length rounded up
        assert end <= rows


@pytest.mark.parametrize("lengths", [
    [1], [64], [65], [0, 0, 0], [63, 1, 64, 65, 0, 127, 128, 129],
    [1] * 200, [5, 0, 300, 0, 0, 64],
])
def test_varlen_sequences_start_on_a_row_block_and_never_overlap(layout, lengths) -> None:
    rows, starts = layout(True, lengths)
    check_layout(rows, starts, lengths)
    assert rows <= sum(lengths) + (len(lengths) + 1) * BLOCK_ROWS


def test_random_packed_batches(layout) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = int(torch.randint(1, 300, (1,), generator=generator))
        lengths = torch.randint(0, 400, (batch,), generator=generator).tolist()
        rows, starts = layout(True, lengths)
        check_layout(rows, starts, lengths)


@pytest.mark.parametrize("batch, seqlen", [(1, 1), (3, 64), (4, 77), (2, 0)])
def test_fixed_length_batches(layout, batch: int, seqlen: int) -> None:
    lengths = [seqlen] * batch
    rows, starts = layout(False, lengths)
    check_layout(rows, starts, lengths)
    assert starts == [b * (-(-seqlen // BLOCK_ROWS) * BLOCK_ROWS) for b in range(batch)]
