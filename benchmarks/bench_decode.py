"""Decode bandwidth: how fast flash_attn_with_kvcache reads a KV cache (issue 16's target).

    python benchmarks/bench_decode.py [--out results.json] [--seqlen-q 1] [--splits 0] [--append]

The decode rows of shared/targets.md: GQA 32/8, d = 128, bf16, one query token per request
(``--seqlen-q`` for speculative decoding), batch x cache length 64 x 2048, 128 x 8192 and
16 x 32768, each with a contiguous cache and with 16- and 128-token pages (each request's pages
drawn at random from the pool, as a serving engine's allocator leaves them). Every request's
cache holds exactly its length; nothing is appended (the attention alone, as the targets
count it). Before timing, the output of the first CHECKED_REQUESTS requests is checked against
flash_varlen.reference within the tolerance rule of benchmarks/checks.py. Reported: the median
time of triton.testing.do_bench and the achieved K/V read bandwidth, bytes of K and V read
(2 * cache length * nheads_k * d * 2 bytes per request) / time, in TB/s; ``--splits 0,1,2,4``
times each split count (0: the heuristic) to tune the rule. Each row is timed twice: as eager
calls, and as the replay of the call captured once in a CUDA graph (what a server that captures
its decode step pays; the difference is the host's share: the Python checks, the op dispatch
and the launches, which a short call cannot hide behind the GPU's work). ``--append`` also
times each row as a full decode step: the cache holds seqlen_q keys fewer, and the call appends
seqlen_q new keys and values rotated with rotary tables of the whole head dim (its queries
rotated too), so that it reads the same cache; the columns "append ms" and "append / plain"
(graph replays) give issue 16's "append + rotary fused" target, at most 1.05. Prints a Markdown
table; with --out also writes the JSON. Needs a CUDA GPU and a build with the decode kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable (appended: an installed package wins).
    sys.path.append(str(REPO_ROOT))

from benchmarks.bench_forward import EXIT_NO_GPU, REP_MS, WARMUP_MS  # noqa: E402
from benchmarks.checks import LOWP_ERROR_FACTOR, TOLERANCE_FLOOR, max_abs_diff  # noqa: E402

NHEADS, NHEADS_K, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
# (batch, cache length) of targets.md's decode rows.
WORKLOADS = ((64, 2048), (128, 8192), (16, 32768))
# None: a contiguous cache.
PAGE_SIZES = (None, 16, 128)
CHECKED_REQUESTS = 2
BYTES_PER_ELEMENT = 2
TERA = 1e12
SEED = 0
# Calls on a side stream before the capture (PyTorch's CUDA-graph guidance: the first calls may
# allocate or pick kernels).
GRAPH_WARMUP_CALLS = 3


def make_call(batch: int, length: int, page_size: int | None, seqlen_q: int) -> dict:
    """Arguments of flash_attn_with_kvcache for one row: caches holding ``length`` keys."""
    generator = torch.Generator(device="cuda").manual_seed(SEED)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)

    args = {
        "q": randn(batch, seqlen_q, NHEADS, HEAD_DIM),
        "cache_seqlens": torch.full((batch,), length, dtype=torch.int32, device="cuda"),
    }
    if page_size is None:
        args["k_cache"] = randn(batch, length, NHEADS_K, HEAD_DIM)
        args["v_cache"] = randn(batch, length, NHEADS_K, HEAD_DIM)
        return args
    pages_per_request = -(-length // page_size)
    num_pages = batch * pages_per_request
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(SEED))
    args["block_table"] = order.view(batch, pages_per_request).to("cuda", torch.int32)
    args["k_cache"] = randn(num_pages, page_size, NHEADS_K, HEAD_DIM)
    args["v_cache"] = randn(num_pages, page_size, NHEADS_K, HEAD_DIM)
    return args


def check(args: dict, out: torch.Tensor) -> None:
    """The first CHECKED_REQUESTS requests' output against the float32 reference."""
    from flash_varlen import reference

    head = {
        name: value[:CHECKED_REQUESTS] if name in ("q", "cache_seqlens", "block_table") else value
        for name, value in args.items()
    }
    if "block_table" not in args:
        head["k_cache"] = args["k_cache"][:CHECKED_REQUESTS]
        head["v_cache"] = args["v_cache"][:CHECKED_REQUESTS]
    expected = reference.attention_ref_kvcache(**head).out
    lowp = reference.attention_ref_kvcache(**head, compute_dtype=DTYPE).out
    error = max_abs_diff(out[:CHECKED_REQUESTS], expected)
    bound = LOWP_ERROR_FACTOR * max_abs_diff(lowp, expected) + TOLERANCE_FLOOR
    if not error <= bound:
        raise AssertionError(f"decode output off the reference: {error:.3g} > {bound:.3g}")


def with_append(args: dict, seqlen_new: int) -> dict:
    """``args`` as a decode step that appends: seqlen_new keys fewer in the cache, that many new
    keys and values, rotary tables (cos, sin of random angles) over the whole head dim."""
    batch = args["q"].shape[0]
    generator = torch.Generator(device="cuda").manual_seed(SEED + 1)
    shape = (batch, seqlen_new, NHEADS_K, HEAD_DIM)
    capacity = args["k_cache"].shape[1] * (
        args["block_table"].shape[1] if "block_table" in args else 1
    )
    angles = torch.rand(capacity, HEAD_DIM // 2, generator=generator, device="cuda")
    return {
        **args,
        "cache_seqlens": args["cache_seqlens"] - seqlen_new,
        "k": torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE),
        "v": torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE),
        "rotary_cos": torch.cos(angles).to(DTYPE),
        "rotary_sin": torch.sin(angles).to(DTYPE),
    }


def kv_bytes(batch: int, length: int) -> int:
    return 2 * batch * length * NHEADS_K * HEAD_DIM * BYTES_PER_ELEMENT


def decode_step(function: Callable[..., torch.Tensor], args: dict, num_splits: int):
    """One timed call: the attention over the cache with this split count."""
    return lambda: function(**args, num_splits=num_splits)


def graph_replay(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after warm-up calls on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_CALLS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run(seqlen_q: int, splits: list[int], append: bool) -> list[dict]:
    from triton.testing import do_bench

    from flash_varlen import flash_attn_with_kvcache

    def median_ms(function: Callable[[], object]) -> float:
        return do_bench(function, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")

    rows = []
    for batch, length in WORKLOADS:
        for page_size in PAGE_SIZES:
            args = make_call(batch, length, page_size, seqlen_q)
            check(args, flash_attn_with_kvcache(**args))
            for num_splits in splits:
                step = decode_step(flash_attn_with_kvcache, args, num_splits)
                ms = median_ms(step)
                graph_ms = median_ms(graph_replay(step))
                timed_append = {}
                if append:
                    append_step = decode_step(
                        flash_attn_with_kvcache, with_append(args, seqlen_q), num_splits
                    )
                    timed_append = {
                        "append_ms": median_ms(append_step),
                        "append_graph_ms": median_ms(graph_replay(append_step)),
                    }
                rows.append(
                    {
                        **timed_append,
                        "batch": batch,
                        "cache_length": length,
                        "page_size": page_size,
                        "seqlen_q": seqlen_q,
                        "num_splits": num_splits,
                        "ms": ms,
                        "tb_per_s": kv_bytes(batch, length) / (ms * 1e-3) / TERA,
                        "graph_ms": graph_ms,
                        "graph_tb_per_s": kv_bytes(batch, length) / (graph_ms * 1e-3) / TERA,
                    }
                )
    return rows


def table(rows: list[dict]) -> str:
    append = bool(rows) and "append_ms" in rows[0]
    header = (
        "| batch x cache | pages | seqlen_q | num_splits | ms | K/V TB/s | graph ms | graph TB/s |"
    )
    if append:
        header += " append ms | append graph ms | append / plain (graph) |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for row in rows:
        pages = "contiguous" if row["page_size"] is None else str(row["page_size"])
        splits = "heuristic" if row["num_splits"] == 0 else str(row["num_splits"])
        line = (
            f"| {row['batch']} x {row['cache_length']} | {pages} | {row['seqlen_q']} | {splits} "
            f"| {row['ms']:.4f} | {row['tb_per_s']:.2f} | {row['graph_ms']:.4f} "
            f"| {row['graph_tb_per_s']:.2f} |"
        )
        if append:
            line += (
                f" {row['append_ms']:.4f} | {row['append_graph_ms']:.4f} "
                f"| {row['append_graph_ms'] / row['graph_ms']:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--seqlen-q", type=int, default=1, help="query tokens per request")
    parser.add_argument("--splits", default="0", help="comma list of num_splits (0: heuristic)")
    parser.add_argument(
        "--append", action="store_true", help="also time decode steps that append and rotate"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU", file=sys.stderr)
        return EXIT_NO_GPU
    rows = run(args.seqlen_q, [int(s) for s in args.splits.split(",")], args.append)
    print(f"{torch.cuda.get_device_name()}, GQA {NHEADS}/{NHEADS_K}, d = {HEAD_DIM}, bf16\n")
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
