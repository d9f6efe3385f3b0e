"""The decode benchmark's pure logic (CPU): the bytes it counts and its table.

The bandwidth the benchmark reports is K and V bytes over time, so kv_bytes must count both
caches of every request; the table shows the eager and the CUDA-graph timing of each row side by
side (their difference is the host's share of a call).
"""


from benchmarks.bench_decode import HEAD_DIM, NHEADS_K, kv_bytes, table


def test_kv_bytes_counts_keys_and_values_of_every_request():
    bf16_bytes = 2
    assert kv_bytes(3, 100) == 2 * 3 * 100 * NHEADS_K * HEAD_DIM * bf16_bytes


def test_table_shows_eager_and_graph_timings_per_row():
    row = {
        "batch": 64,
        "cache_length": 2048,
        "page_size": 16,
        "seqlen_q": 1,
        "num_splits": 0,
        "ms": 0.4,
        "tb_per_s": 1.25,
        "graph_ms": 0.125,
        "graph_tb_per_s": 4.0,
    }
    contiguous = {**row, "page_size": None, "num_splits": 4}
    lines = table([row, contiguous]).splitlines()
    assert lines[0].split("|")[5:9] == [" ms ", " K/V TB/s ", " graph ms ", " graph TB/s "]
    assert lines[2] == "| 64 x 2048 | 16 | 1 | heuristic | 0.4000 | 1.25 | 0.1250 | 4.00 |"
    assert lines[3] == "| 64 x 2048 | contiguous | 1 | 4 | 0.4000 | 1.25 | 0.1250 | 4.00 |"
