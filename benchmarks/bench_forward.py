"""Forward attention benchmark: flash_varlen vs PyTorch varlen_attn vs FlexAttention.

    python benchmarks/bench_forward.py --out results.json [--workloads docs,short,equal2k]
        [--layouts mha,gqa] [--causal both|on|off] [--impl ours,varlen_attn,flex]

For every workload x head layout x causal row (workloads.py, targets.md): fresh bf16 randn
q/k/v, one float64 reference; per implementation a warm-up call, one checked call on a NaN-poisoned
allocator, and only if that passes, the median time of triton.testing.do_bench. Writes the JSON to
--out, a Markdown table next to it (same stem, .md) and prints the table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable. Appended, not prepended, so an installed
    # flash_varlen (with its compiled extension) wins over the source tree.
    sys.path.append(str(REPO_ROOT))

from benchmarks import chart, report  # noqa: E402
from benchmarks.checks import (  # noqa: E402
    Reference,
    build_reference,
    max_abs_diff,
    poison_allocator,
)
from benchmarks.impls import (  # noqa: E402
    IMPL_NAMES,
    Case,
    FlexRunner,
    Prepared,
    prepare_ours,
    prepare_varlen_attn,
)
from benchmarks.workloads import (  # noqa: E402
    HEAD_LAYOUTS,
    TARGET_LAYOUTS,
    WORKLOAD_NAMES,
    Workload,
    make_workload,
)

EXIT_NO_GPU = 2
INPUT_SEED = 1234
WARMUP_MS = 25
REP_MS = 100
# Compile errors can run to pages; the table only needs the gist.
REASON_MAX_CHARS = 300
CAUSAL_CHOICES = {"both": (False, True), "on": (True,), "off": (False,)}


def name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of `choices`, kept in the order of `choices`."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return [name for name in choices if name in names]

    return parse


def build_parser(description: str, impl_names: tuple[str, ...]) -> argparse.ArgumentParser:
    """The command line shared by the forward and backward benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True,
                        help="JSON file to write; the Markdown table goes next to it (.md)")
    parser.add_argument("--workloads", type=name_list(WORKLOAD_NAMES),
                        default=list(WORKLOAD_NAMES),
                        help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)} (default: all)")
    parser.add_argument("--layouts", type=name_list(tuple(HEAD_LAYOUTS)),
                        default=list(TARGET_LAYOUTS),
                        help=f"comma-separated subset of {','.join(HEAD_LAYOUTS)} "
                        f"(default: {','.join(TARGET_LAYOUTS)}, the layouts of targets.md)")
    parser.add_argument("--causal", choices=tuple(CAUSAL_CHOICES), default="both",
                        help="causal masking: both (default), on or off")
    parser.add_argument("--impl", type=name_list(impl_names), default=list(impl_names),
                        help=f"comma-separated subset of {','.join(impl_names)} (default: all)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser(
        "Forward attention TFLOP/s of flash_varlen and its peers on the fixed workloads of "
        "targets.md (needs a CUDA GPU).",
        IMPL_NAMES,
    )
    return parser.parse_args(argv)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def run_metadata(argv: list[str], script: str = "benchmarks/bench_forward.py") -> dict[str, Any]:
    """Where and how the numbers were taken: date, GPU, versions, commit, command, timing."""
    import triton

    # The GPU machine gets a copy of the working tree whose git metadata may not resolve HEAD;
    # scripts/gpu_check.sh passes the commit measured from the checkout it was sent from.
    commit_override = os.environ.get("FLASH_VARLEN_COMMIT")
    status = None if commit_override else _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": commit_override or _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
        "command": shlex.join(["python", script, *argv]),
        "timing": {"do_bench_warmup_ms": WARMUP_MS, "do_bench_rep_ms": REP_MS,
                   "return_mode": "median"},
    }


def json_float(value: float) -> float | str:
    """JSON has no NaN or inf: those are stored as strings."""
    return value if math.isfinite(value) else str(value)


def failure_reason(error: BaseException) -> str:
    """The exception as one line of at most REASON_MAX_CHARS characters, for the table notes."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


def make_case(workload: Workload, layout_name: str, causal: bool,
              cu_seqlens: torch.Tensor) -> Case:
    """Fresh randn bf16 inputs for one row (never zeros: zeros would hide softmax errors)."""
    layout = HEAD_LAYOUTS[layout_name]
    generator = torch.Generator(device="cuda").manual_seed(INPUT_SEED)

    def randn(nheads: int) -> torch.Tensor:
        shape = (workload.total_tokens, nheads, layout.head_dim)
        return torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(layout.nheads_q), randn(layout.nheads_kv), randn(layout.nheads_kv)
    return Case(workload, layout, causal, q, k, v, cu_seqlens)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA is asynchronous; CPU tensors need nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(prepare: Callable[[Case], Prepared], case: Case, reference: Reference,
            flops: int) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Checks one implementation on `case` and, only if its output is right, times it.

    Returns the result record and the checked output (total, nheads_q, d), or None if it did not
    run. Any exception becomes status "n/a" with its reason: a peer that cannot run this case
    (missing, unsupported, out of memory) must not stop the benchmark.
    """
    from triton.testing import do_bench

    try:
        prepared = prepare(case)
        prepared.run()  # warm-up: compilation, lazy initialization
        synchronize(case.q.device)
        poison_allocator(case.q)  # the output has q's shape and dtype
        out = prepared.to_packed(prepared.run())
        synchronize(case.q.device)
        passed, err = reference.passes(out)
        record: dict[str, Any] = {
            "check": {"max_abs_err": json_float(err), "tolerance": reference.tolerance,
                      "passed": passed},
        }
        if prepared.note:
            record["note"] = prepared.note
        if not passed:
            return {"status": "wrong", **record}, out
        ms = do_bench(prepared.run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    except Exception as error:  # noqa: BLE001 - reported per implementation, see docstring
        torch.cuda.empty_cache()
        return {"status": "n/a", "reason": failure_reason(error)}, None
    return {"status": "ok", "time_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, **record}, out


def forward_preparers(flex: FlexRunner) -> dict[str, Callable[[Case], Prepared]]:
    """How to set up each implementation of IMPL_NAMES."""
    return {"ours": prepare_ours, "varlen_attn": prepare_varlen_attn, "flex": flex.prepare}


def bench_row(case: Case, impls: list[str], preparers: dict[str, Callable[[Case], Prepared]],
              reference: Reference | None = None) -> dict[str, Any]:
    """All implementations on one row; peers' outputs are also compared with ours.

    `reference` is built here unless given (the backward benchmark builds it with its gradients).
    """
    workload, layout = case.workload, case.layout
    flops = workload.forward_flops(layout, case.causal)
    if reference is None:
        reference = build_reference(
            case.q, case.k, case.v, workload.lengths, case.causal, case.scale
        )
    results: dict[str, dict[str, Any]] = {}
    ours_out = None
    for impl in impls:
        result, out = measure(preparers[impl], case, reference, flops)
        if impl == "ours":
            ours_out = out
        elif out is not None and ours_out is not None:
            result["check"]["max_abs_diff_vs_ours"] = json_float(max_abs_diff(out, ours_out))
        results[impl] = result
    return {
        "workload": workload.name,
        "layout": layout.name,
        "nheads_q": layout.nheads_q,
        "nheads_kv": layout.nheads_kv,
        "head_dim": layout.head_dim,
        "causal": case.causal,
        "num_sequences": workload.num_sequences,
        "max_seqlen": workload.max_seqlen,
        "forward_flops": flops,
        "reference": {"lowp_max_abs_err": reference.lowp_max_abs_err,
                      "tolerance": reference.tolerance},
        "results": results,
        "ratios": _ratios(results),
    }


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """ours TFLOP/s divided by each peer's; None where either was not timed."""
    return report.speed_ratios(results, report.FORWARD_RATIO_PAIRS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_forward.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "this benchmark runs only on the GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    meta = run_metadata(argv)
    preparers = forward_preparers(FlexRunner())
    rows = []
    for workload_name in args.workloads:
        workload = make_workload(workload_name)
        cu_seqlens = workload.cu_seqlens("cuda")
        for layout_name in args.layouts:
            for causal in CAUSAL_CHOICES[args.causal]:
                case = make_case(workload, layout_name, causal, cu_seqlens)
                row = bench_row(case, args.impl, preparers)
                del case  # free this row's inputs before the next row allocates its own
                rows.append(row)
                print(report.progress_line(row, args.impl), file=sys.stderr, flush=True)
    markdown_path = report.write_outputs(args.out, meta, rows, args.impl)
    print(chart.chart_beside(args.out, meta, rows))
    header, body = report.table(rows, args.impl)
    print(report.format_text(header, body))
    for line in report.notes(rows, args.impl):
        print(line)
    print(f"wrote {args.out} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
