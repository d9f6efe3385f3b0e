"""Sliding-window cost scaling: does a causal window of w keys cost about w / seqlen of the work?

    python benchmarks/bench_window.py [--out results.json] [--workloads 16k,4x4k]
        [--windows -1,8192,4096,2048,1024,512,256]

For every workload x window left (-1: no window, plain causal), bf16, 16/16 heads, d = 128,
causal=True with window_size=(left, 0): the forward alone and forward + backward
(torch.autograd.grad of the output with a seeded dout), each timed as the other benchmarks time
(median of triton.testing.do_bench after a warm-up). Before timing, the forward output of the
last CHECK_ROWS query rows of every sequence is checked against flash_varlen.reference (the
gradients are checked by tests/test_variants_gpu.py). TFLOP/s count the visible (query, key)
pairs only, exactly (`causal_band_pairs`); each row reports its time relative to the plain
causal run of its workload next to the ideal ratio, visible pairs / causal pairs. Prints a
Markdown table; with --out also writes the JSON and the table next to it (same stem, .md), as
the forward and backward benchmarks do. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable. Appended, not prepended, so an installed
    # flash_varlen (with its compiled extension) wins over the source tree.
    sys.path.append(str(REPO_ROOT))

from benchmarks import bench_forward, report  # noqa: E402
from benchmarks.bench_backward import make_dout, with_grad  # noqa: E402
from benchmarks.bench_forward import (  # noqa: E402
    EXIT_NO_GPU,
    REP_MS,
    WARMUP_MS,
    failure_reason,
    json_float,
    name_list,
    synchronize,
)
from benchmarks.checks import LOWP_ERROR_FACTOR, TOLERANCE_FLOOR, max_abs_diff  # noqa: E402
from benchmarks.impls import Case, Prepared  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    BACKWARD_FLOP_FACTOR,
    FLOPS_PER_PAIR_AND_DIM,
    Workload,
)
from flash_varlen.reference import UNBOUNDED  # noqa: E402

SCRIPT = "benchmarks/bench_window.py"
LAYOUT = "mha"  # 16 query and 16 kv heads, d = 128 (workloads.HEAD_LAYOUTS)
TOKENS = 16_384
# One 16k-token sequence (the case of the issue), and the same tokens as four 4k sequences.
WINDOW_WORKLOADS = {
    "16k": (TOKENS,),
    "4x4k": (TOKENS // 4,) * 4,
}
WINDOW_WORKLOAD_NAMES = tuple(WINDOW_WORKLOADS)
DEFAULT_WORKLOADS = ("16k",)
DEFAULT_WINDOWS = (UNBOUNDED, 8192, 4096, 2048, 1024, 512, 256)
DIRECTIONS = ("forward", "forward_backward")
# Forward + backward work: the forward count plus the backward convention (2.5x the forward).
FORWARD_BACKWARD_FLOP_FACTOR = 1.0 + BACKWARD_FLOP_FACTOR
# Query rows at the end of every sequence whose output is checked before timing: the window's
# lower edge cuts through all of them, and a float32 reference over them stays small (128 rows
# x 16k keys x 16 heads).
CHECK_ROWS = 128
NO_WINDOW_LABEL = "none"
MISSING_CELL = report.MISSING_CELL

WINDOW_TITLE = "Sliding-window benchmark"
WINDOW_METHOD = (
    "- bf16, 16/16 heads, d = 128, causal with window_size = (left, 0); left = none is plain "
    "causal. TFLOP/s of the visible (query, key) pairs only (4 x d x heads per pair; forward + "
    "backward counts 3.5x the forward). Median of triton.testing.do_bench after a warm-up; "
    "forward + backward = one forward and torch.autograd.grad(out, (q, k, v), dout). "
    "'x causal' is the time relative to the plain causal run of the workload, 'ideal' the ratio "
    f"of visible pairs. The last {CHECK_ROWS} query rows of every sequence checked against the "
    "float32 reference before timing."
)


# ----------------------------------------------------------------------------------------------
# Counting (pure Python, tested in tests/test_bench_window_cpu.py)
# ----------------------------------------------------------------------------------------------


def causal_band_pairs(seqlen: int, left: int) -> int:
    """Visible (query, key) pairs of one sequence (seqlen_q == seqlen_k) under causal masking
    with window_size = (left, 0); left = -1 (UNBOUNDED) is plain causal.

    Query i sees keys max(0, i - left) .. i, i.e. min(i, left) + 1 keys. With
    w = min(left, seqlen - 1) (seqlen - 1 when unbounded), queries 0 .. w see 1 .. w + 1 keys,
    (w + 1)(w + 2) / 2 in all, and each of the other seqlen - w - 1 queries sees w + 1.
    """
    if left < UNBOUNDED:
        raise ValueError(f"left must be >= 0 or {UNBOUNDED} (unbounded), got {left}")
    if seqlen <= 0:
        return 0
    width = seqlen - 1 if left == UNBOUNDED else min(left, seqlen - 1)
    return (width + 1) * (width + 2) // 2 + (seqlen - width - 1) * (width + 1)


def visible_pairs(lengths: Sequence[int], left: int) -> int:
    """`causal_band_pairs` summed over the sequences of a packed batch."""
    return sum(causal_band_pairs(length, left) for length in lengths)


def ideal_ratio(lengths: Sequence[int], left: int) -> float:
    """The fraction of the plain causal work that a window of `left` keys leaves."""
    return visible_pairs(lengths, left) / visible_pairs(lengths, UNBOUNDED)


def forward_flops(lengths: Sequence[int], left: int, nheads: int, head_dim: int) -> int:
    """Useful forward FLOPs of the visible pairs (workloads.py's rule: 4 * d * heads per pair)."""
    return FLOPS_PER_PAIR_AND_DIM * head_dim * nheads * visible_pairs(lengths, left)


def window_label(left: int) -> str:
    """'none' for the plain causal row, else the window's left size."""
    return NO_WINDOW_LABEL if left == UNBOUNDED else str(left)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Sets "ratio_to_causal" of every ok result: its time over the time of the same workload's
    plain causal row in the same direction (None where either was not timed)."""
    baselines: dict[tuple[str, str], float] = {}
    for row in rows:
        for direction in DIRECTIONS:
            result = row[direction]
            if row["window_left"] == UNBOUNDED and result["status"] == "ok":
                baselines[(row["workload"], direction)] = result["time_ms"]
    for row in rows:
        for direction in DIRECTIONS:
            result = row[direction]
            baseline = baselines.get((row["workload"], direction))
            ok = result["status"] == "ok" and baseline is not None
            result["ratio_to_causal"] = result["time_ms"] / baseline if ok else None


def _result_cells(result: dict[str, Any]) -> list[str]:
    """ms, TFLOP/s and ratio cells of one direction ('n/a' / 'WRONG' when not timed)."""
    if result["status"] != "ok":
        label = "WRONG" if result["status"] == "wrong" else "n/a"
        return [label, MISSING_CELL, MISSING_CELL]
    ratio = result.get("ratio_to_causal")
    ratio_cell = MISSING_CELL if ratio is None else f"{ratio:.3f}"
    return [f"{result['time_ms']:.3f}", f"{result['tflops']:.1f}", ratio_cell]


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body: one line per workload x window."""
    header = ["workload", "window left", "visible pairs", "ideal",
              "fwd ms", "fwd TFLOP/s", "fwd x causal",
              "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd x causal"]
    body = []
    for row in rows:
        line = [row["workload"], window_label(row["window_left"]), f"{row['visible_pairs']:,}",
                f"{row['ideal_ratio']:.3f}"]
        for direction in DIRECTIONS:
            line += _result_cells(row[direction])
        body.append(line)
    return header, body


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per result that was not timed: why."""
    lines = []
    for row in rows:
        label = f"{row['workload']}/window {window_label(row['window_left'])}"
        for direction in DIRECTIONS:
            result = row[direction]
            if result["status"] == "n/a":
                lines.append(f"{label} {direction}: n/a, {result['reason']}")
            elif result["status"] == "wrong":
                check = result["check"]
                lines.append(
                    f"{label} {direction}: WRONG, max abs error "
                    f"{report._number(check['max_abs_err'])} > tolerance "
                    f"{report._number(check['tolerance'])} on the checked rows; not timed"
                )
    return lines


# ----------------------------------------------------------------------------------------------
# Measuring (GPU)
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time of causal sliding-window attention against plain causal, forward and "
        "forward + backward (needs a CUDA GPU)."
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file to write; the Markdown table goes next to it (.md)")
    parser.add_argument("--workloads", type=name_list(WINDOW_WORKLOAD_NAMES),
                        default=list(DEFAULT_WORKLOADS),
                        help=f"comma-separated subset of {','.join(WINDOW_WORKLOAD_NAMES)} "
                        f"(default: {','.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--windows", type=window_list,
                        default=list(DEFAULT_WINDOWS),
                        help="comma-separated window left sizes, -1 for none (default: "
                        f"{','.join(map(str, DEFAULT_WINDOWS))}); the plain causal row is "
                        "always measured, as the base of the ratios")
    return parser.parse_args(argv)


def window_list(text: str) -> list[int]:
    """argparse type: comma-separated window sizes (-1 or >= 0); -1 first, added if absent."""
    try:
        lefts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {error}") from None
    if not lefts or any(left < UNBOUNDED for left in lefts):
        raise argparse.ArgumentTypeError(f"window sizes must be -1 or >= 0; got {text!r}")
    rest = [left for left in dict.fromkeys(lefts) if left != UNBOUNDED]
    return [UNBOUNDED, *rest]


def prepare_windowed(case: Case, left: int) -> Prepared:
    """flash_varlen.flash_attn_varlen_func, causal with window_size = (left, 0)."""
    import flash_varlen

    max_seqlen = case.workload.max_seqlen

    def run() -> torch.Tensor:
        return flash_varlen.flash_attn_varlen_func(
            case.q, case.k, case.v, case.cu_seqlens, case.cu_seqlens, max_seqlen, max_seqlen,
            softmax_scale=case.scale, causal=True, window_size=(left, 0),
        )

    return Prepared(run, inputs=(case.q, case.k, case.v))


def _tail_rows(
    lengths: Sequence[int], left: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """The packed rows of the last CHECK_ROWS queries of every sequence, the packed rows of the
    keys they can see (from the window's lower edge to the sequence's end), and the per-sequence
    counts of both (the lengths of the check's own packed batch)."""
    query_rows: list[int] = []
    key_rows: list[int] = []
    counts_q, counts_k = [], []
    start = 0
    for length in lengths:
        count_q = min(CHECK_ROWS, length)
        first_key = 0 if left == UNBOUNDED else max(0, length - count_q - left)
        query_rows += range(start + length - count_q, start + length)
        key_rows += range(start + first_key, start + length)
        counts_q.append(count_q)
        counts_k.append(length - first_key)
        start += length
    return query_rows, key_rows, counts_q, counts_k


def check_tail_rows(case: Case, left: int, out: torch.Tensor) -> dict[str, Any]:
    """The forward output's last CHECK_ROWS rows of every sequence against flash_varlen's float32
    reference; tolerance as in benchmarks/checks.py (LOWP_ERROR_FACTOR x the bf16 reference's
    error + TOLERANCE_FLOOR). The key slices end where the sequences end, so the reference's
    bottom-right causal alignment puts the diagonal where the full sequence has it."""
    from flash_varlen import reference

    query_rows, key_rows, counts_q, counts_k = _tail_rows(case.workload.lengths, left)
    device = case.q.device
    q_index = torch.tensor(query_rows, device=device)
    k_index = torch.tensor(key_rows, device=device)
    q, k, v = case.q[q_index], case.k[k_index], case.v[k_index]
    cu_q = Workload("check_queries", tuple(counts_q)).cu_seqlens(device)
    cu_k = Workload("check_keys", tuple(counts_k)).cu_seqlens(device)
    options = {"causal": True, "window_size": (left, 0)}
    with torch.no_grad():
        exact, _ = reference.attention_ref_varlen(q, k, v, cu_q, cu_k, case.scale, **options)
        lowp, _ = reference.attention_ref_varlen(
            q, k, v, cu_q, cu_k, case.scale, compute_dtype=q.dtype, **options
        )
    tolerance = LOWP_ERROR_FACTOR * max_abs_diff(lowp, exact) + TOLERANCE_FLOOR
    err = max_abs_diff(out[q_index], exact)
    return {"rows_checked": len(query_rows), "max_abs_err": json_float(err),
            "tolerance": tolerance, "passed": err <= tolerance}


def time_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of `fn` under triton.testing.do_bench (the benchmarks' timing)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def forward_run(case: Case, left: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The forward to time, after a warm-up call whose output is checked (the check record)."""
    prepared = prepare_windowed(case, left)
    out = prepared.run()
    synchronize(case.q.device)
    return prepared.run, check_tail_rows(case, left, out)


def forward_backward_run(case: Case, left: int, dout: torch.Tensor) -> Callable[[], Any]:
    """One forward and the gradients of q, k, v for `dout`, after a warm-up call."""
    prepared = prepare_windowed(with_grad(case), left)

    def run() -> Any:
        out = prepared.run()
        return torch.autograd.grad(out, prepared.inputs, dout)

    run()
    return run


def timed(run: Callable[[], Any], check: dict[str, Any], flops: float) -> dict[str, Any]:
    """The result record: timed only if the check passed."""
    if not check["passed"]:
        return {"status": "wrong", "check": check}
    ms = time_ms(run)
    return {"status": "ok", "time_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "check": check}


def failed(error: BaseException) -> dict[str, Any]:
    """The "n/a" record of a direction that raised; frees what its frames held."""
    reason = failure_reason(error)
    gc.collect()
    torch.cuda.empty_cache()
    return {"status": "n/a", "reason": reason}


def measure(case: Case, left: int, dout: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Both directions of one row. The forward output is checked before anything is timed;
    forward + backward relies on that check (a failed forward leaves it n/a)."""
    layout = case.layout
    flops = forward_flops(case.workload.lengths, left, layout.nheads_q, layout.head_dim)
    try:
        run, check = forward_run(case, left)
        forward = timed(run, check, flops)
    except Exception as error:  # noqa: BLE001 - reported per row, as in the other benchmarks
        unchecked = {"status": "n/a", "reason": "not run: the forward failed, nothing is checked"}
        return {"forward": failed(error), "forward_backward": unchecked}
    try:
        run = forward_backward_run(case, left, dout)
        both = timed(run, check, FORWARD_BACKWARD_FLOP_FACTOR * flops)
    except Exception as error:  # noqa: BLE001 - reported per row, as in the other benchmarks
        both = failed(error)
    return {"forward": forward, "forward_backward": both}


def bench_workload(name: str, windows: list[int]) -> list[dict[str, Any]]:
    """All windows of one workload (plain causal first), inputs made once."""
    workload = Workload(name, WINDOW_WORKLOADS[name])
    case = bench_forward.make_case(workload, LAYOUT, True, workload.cu_seqlens("cuda"))
    dout = make_dout(case)
    rows = []
    for left in windows:
        results = measure(case, left, dout)
        rows.append({
            "workload": name,
            "lengths": list(workload.lengths),
            "nheads_q": case.layout.nheads_q,
            "nheads_kv": case.layout.nheads_kv,
            "head_dim": case.layout.head_dim,
            "window_left": left,
            "visible_pairs": visible_pairs(workload.lengths, left),
            "causal_pairs": visible_pairs(workload.lengths, UNBOUNDED),
            "ideal_ratio": ideal_ratio(workload.lengths, left),
            **results,
        })
        cells = ", ".join(
            f"{direction} {_result_cells(results[direction])[0]} ms" for direction in DIRECTIONS
        )
        print(f"{name}/window {window_label(left)}: {cells}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_window.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "this benchmark runs only on the GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    meta = bench_forward.run_metadata(argv, SCRIPT)
    meta["check_rows"] = CHECK_ROWS
    rows = []
    for name in args.workloads:
        rows += bench_workload(name, args.windows)
        torch.cuda.empty_cache()
    add_ratios(rows)
    header, body = table(rows)
    markdown = report.format_markdown(meta, header, body, notes(rows), title=WINDOW_TITLE,
                                      method=WINDOW_METHOD)
    print(markdown, end="")
    if args.out is not None:
        markdown_path = report._write(args.out, meta, rows, markdown)
        print(f"wrote {args.out} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
