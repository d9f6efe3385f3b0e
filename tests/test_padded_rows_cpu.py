"""The backward's padded row layout (csrc/kernels/common/padded_rows.h), compiled with the host
C++ compiler: every sequence's padded rows start on a row block, lie inside the head's rows and
never overlap another sequence's, and the row kernels' search finds each row block's sequence
(CPU). Both families' row blocks: 64 rows (the sm90 backward, the sm80 one above d = 64) and 128
(the sm80 backward at d <= 64, sm80/bwd_tile_shape.h)."""

import subprocess

import pytest
import torch

from host_cpp import compile_host_driver

BLOCK_ROWS = (64, 128)  # the backward's kBlockM values

DRIVER = r"""
#include <cstdio>
#include "kernels/common/padded_rows.h"
using namespace flash_varlen;
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
def driver(tmp_path_factory):
    return compile_host_driver(tmp_path_factory, "padded_rows", DRIVER)


@pytest.fixture(params=BLOCK_ROWS)
def block_rows(request) -> int:
    return request.param


@pytest.fixture
def layout(driver, block_rows):
    """(is_varlen, lengths) -> (rows per head, first padded row of each sequence)."""

    def run(is_varlen: bool, lengths: list[int]) -> tuple[int, list[int]]:
        seqlen_q = max(lengths, default=0)
        line = f"{int(is_varlen)} {block_rows} {len(lengths)} {seqlen_q} "
        line += " ".join(map(str, lengths)) + "\n"
        result = subprocess.run([driver], input=line, capture_output=True, text=True, check=True)
        layout_line, sequence_line = result.stdout.split("\n")[:2]
        rows, *starts = map(int, layout_line.split())
        check_row_block_sequences(rows, starts, list(map(int, sequence_line.split())), block_rows)
        return rows, starts

    return run


def check_row_block_sequences(rows: int, starts: list[int], sequences: list[int],
                              block_rows: int) -> None:
    """padded_row_sequence, the row kernels' search: each padded row block maps to the last
    sequence starting at or before it."""
    assert len(sequences) == rows // block_rows
    for block, sequence in enumerate(sequences):
        row = block * block_rows
        expected = max(b for b, start in enumerate(starts) if start <= row)
        assert sequence == expected, f"row {row}: sequence {sequence}, expected {expected}"


def check_layout(rows: int, starts: list[int], lengths: list[int], block_rows: int) -> None:
    assert rows % block_rows == 0  # every head starts 16-byte aligned
    end = 0
    for start, length in zip(starts, lengths):
        assert start % block_rows == 0
        assert start >= end, "overlaps the previous sequence's padded rows"
        end = start + -(-length // block_rows) * block_rows  # the length rounded up
        assert end <= rows


@pytest.mark.parametrize("lengths", [
    [1], [64], [65], [0, 0, 0], [63, 1, 64, 65, 0, 127, 128, 129],
    [1] * 200, [5, 0, 300, 0, 0, 64],
])
def test_varlen_sequences_start_on_a_row_block_and_never_overlap(layout, block_rows,
                                                                 lengths) -> None:
    rows, starts = layout(True, lengths)
    check_layout(rows, starts, lengths, block_rows)
    assert rows <= sum(lengths) + (len(lengths) + 1) * block_rows


def test_random_packed_batches(layout, block_rows) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = int(torch.randint(1, 300, (1,), generator=generator))
        lengths = torch.randint(0, 400, (batch,), generator=generator).tolist()
        rows, starts = layout(True, lengths)
        check_layout(rows, starts, lengths, block_rows)


@pytest.mark.parametrize("batch, seqlen", [(1, 1), (3, 64), (4, 77), (2, 0)])
def test_fixed_length_batches(layout, block_rows, batch: int, seqlen: int) -> None:
    lengths = [seqlen] * batch
    rows, starts = layout(False, lengths)
    check_layout(rows, starts, lengths, block_rows)
    assert starts == [b * (-(-seqlen // block_rows) * block_rows) for b in range(batch)]
