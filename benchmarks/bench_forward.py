"""Forward attention benchmark: flash_varlen vs FlashAttention-4, PyTorch varlen_attn and
FlexAttention.

    python benchmarks/bench_forward.py --out results.json
        [--workloads docs,short,equal2k,skewed] [--layouts mha,gqa,mha_32x64,mha_8x256]
        [--causal both|on|off] [--impl ours,varlen_attn,flex,fa4] [--families auto,sm80,sm90]

Rows: every workload x head layout x causal of targets.md (workloads.py: MHA and GQA on every
workload, mha_32x64 and mha_8x256 on docs and skewed); --layouts measures the named layouts on
every selected workload instead. Per row: fresh bf16 randn q/k/v, one float64 reference; per
implementation a warm-up call (FA4 compiles there) and one checked call on a NaN-poisoned
allocator; then those that passed are timed in rounds of rotating order (timing_rounds.py: the
median of each round's triton.testing.do_bench median). "ours" is timed once per
--families entry: `auto` lets flash_varlen pick its kernel family per call, a family name forces
it (FLASH_VARLEN_KERNEL_FAMILY, set around that implementation's calls only); a family that
cannot serve a row shows "—". FA4 (`flash_attn.cute`) is skipped with a note when it does not
import. Once per run, the dense bf16 matrix-product rate (torch.mm, 8192^3) is measured as the
ceiling of targets.md's rule. Writes the JSON to --out and a Markdown table next to it (same stem,
.md) after every row, then prints the table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
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
from benchmarks.gpu_clocks import ClockSampler  # noqa: E402
from benchmarks.impls import (  # noqa: E402
    AUTO_FAMILY,
    FA4_DETERMINISTIC_IMPL,
    FA4_IMPL,
    FA4_MODULE,
    FAMILY_OVERRIDE_VARIABLE,
    IMPL_NAMES,
    Case,
    FlexRunner,
    Prepared,
    environment_set,
    fa4_import_error,
    ours_family_preparers,
    prepare_fa4,
    prepare_varlen_attn,
    with_families,
)
from benchmarks.timing_rounds import (  # noqa: E402
    REP_MS,
    TIMING_ROUNDS,
    WARMUP_MS,
    Timer,
    time_in_rounds,
)
from benchmarks.workloads import (  # noqa: E402
    HEAD_LAYOUTS,
    TARGET_LAYOUT_WORKLOADS,
    WORKLOAD_NAMES,
    Workload,
    layouts_for,
    make_workload,
)

EXIT_NO_GPU = 2
EXIT_USAGE = 2  # argparse's status for a bad command line
INPUT_SEED = 1234
# Compile errors can run to pages; the table only needs the gist.
REASON_MAX_CHARS = 300
CAUSAL_CHOICES = {"both": (False, True), "on": (True,), "off": (False,)}
# The dense ceiling of targets.md: a bf16 matrix product of DENSE_MATMUL_SIZE^3, large enough to
# run at the GPU's peak tensor-core rate (targets.md measured 769-798 TFLOP/s on an H200 so).
DENSE_MATMUL_SIZE = 8192
FLOPS_PER_MULTIPLY_ADD = 2


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
    target_rows = "; ".join(f"{layout} on {','.join(workloads)}"
                            for layout, workloads in TARGET_LAYOUT_WORKLOADS.items())
    parser.add_argument("--layouts", type=name_list(tuple(HEAD_LAYOUTS)), default=None,
                        help=f"comma-separated subset of {','.join(HEAD_LAYOUTS)}, each measured "
                        "on every selected workload (default: the rows of targets.md: "
                        f"{target_rows}; intersected with --workloads)")
    parser.add_argument("--causal", choices=tuple(CAUSAL_CHOICES), default="both",
                        help="causal masking: both (default), on or off")
    parser.add_argument("--impl", type=name_list(impl_names), default=list(impl_names),
                        help=f"comma-separated subset of {','.join(impl_names)} (default: all)")
    return parser


def family_list(text: str) -> list[str]:
    """argparse type of --families: comma-separated kernel family names and/or AUTO_FAMILY, the
    first occurrence kept, in the order given. Whether a name is a family of this build is
    checked against the extension in main (the names are not known without it)."""
    families: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name.isidentifier():
            raise argparse.ArgumentTypeError(
                f"comma-separated kernel family names (e.g. sm80) or {AUTO_FAMILY}; got {text!r}"
            )
        if name not in families:
            families.append(name)
    return families


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser(
        "Forward attention TFLOP/s of flash_varlen and its peers on the fixed workloads of "
        f"targets.md, with the dense bf16 matrix-product rate of the same run (needs a CUDA GPU). "
        f"{FA4_IMPL} is FlashAttention-4 ({FA4_MODULE}), skipped with a note when it does not "
        "import.",
        IMPL_NAMES,
    )
    parser.add_argument("--families", type=family_list, default=None,
                        help="kernel families to time ours with, comma-separated, one column "
                        f"each: {AUTO_FAMILY} (flash_varlen picks per call; column 'ours') or a "
                        f"family name such as sm80 or sm90 ({FAMILY_OVERRIDE_VARIABLE} set during "
                        "that column's calls; column 'ours_<family>'; a row the family cannot "
                        f"serve shows '—') (default: {AUTO_FAMILY} and every family this build "
                        "compiled for the GPU)")
    return parser.parse_args(argv)


def row_cases(args: argparse.Namespace) -> Iterator[Case]:
    """The cases of the selected rows: workload by workload (its lengths built once), its head
    layouts (workloads.layouts_for), then causal off / on. Each case is yielded without a name
    kept here, so the caller's `del` frees its inputs before the next case allocates."""
    for workload_name in args.workloads:
        workload = make_workload(workload_name)
        cu_seqlens = workload.cu_seqlens("cuda")
        for layout_name in layouts_for(workload_name, args.layouts):
            for causal in CAUSAL_CHOICES[args.causal]:
                yield make_case(workload, layout_name, causal, cu_seqlens)


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
                   "return_mode": "median", "rounds": TIMING_ROUNDS,
                   "round_order": "rotating; the median of the rounds is reported"},
    }


def json_float(value: float) -> float | str:
    """JSON has no NaN or inf: those are stored as strings."""
    return value if math.isfinite(value) else str(value)


def failure_reason(error: BaseException) -> str:
    """The exception as one line of at most REASON_MAX_CHARS characters, for the table notes."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


def failure_record(error: BaseException) -> dict[str, str]:
    """The result of an implementation that raised: status report.UNSUPPORTED for
    NotImplementedError (it does not serve this case, e.g. a forced kernel family without this
    head dim), "n/a" for anything else; the reason either way."""
    status = report.UNSUPPORTED if isinstance(error, NotImplementedError) else "n/a"
    return {"status": status, "reason": failure_reason(error)}


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of `flops` done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


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


def check(prepare: Callable[[Case], Prepared], case: Case,
          reference: Reference) -> tuple[dict[str, Any], torch.Tensor | None, Timer | None]:
    """Sets one implementation up on `case` and checks its output against the reference.

    Returns the result record so far, the checked output (total, nheads_q, d) or None if it did
    not run, and what to time (timing_rounds.Timer) if the output passed, else None. Any
    exception becomes a failure_record ("n/a" or unsupported) with its reason: a peer that cannot
    run this case (missing, unsupported, out of memory) must not stop the benchmark. The
    implementation's environment (Prepared.environment) is set around all its calls.
    """
    try:
        prepared = prepare(case)
        with environment_set(prepared.environment):
            prepared.run()  # warm-up: compilation, lazy initialization
            synchronize(case.q.device)
            poison_allocator(case.q)  # the output has q's shape and dtype
            out = prepared.to_packed(prepared.run())
            synchronize(case.q.device)
            passed, err = reference.passes(out)
    except Exception as error:  # noqa: BLE001 - reported per implementation, see docstring
        torch.cuda.empty_cache()
        return failure_record(error), None, None
    record: dict[str, Any] = {
        "check": {"max_abs_err": json_float(err), "tolerance": reference.tolerance,
                  "passed": passed},
    }
    if prepared.note:
        record["note"] = prepared.note
    if not passed:
        return {"status": "wrong", **record}, out, None
    return record, out, Timer(prepared.run, prepared.environment)


def timed_result(record: dict[str, Any], timing: dict[str, Any],
                 flops: float) -> dict[str, Any]:
    """A checked result record completed with its timing (timing_rounds.time_in_rounds' entry):
    status "ok", the median time, its TFLOP/s, every round's time and the clocks; or the
    failure record of an implementation whose timing raised."""
    if "error" in timing:
        torch.cuda.empty_cache()
        return {**failure_record(timing["error"]), **record}
    result = {"status": "ok", "time_ms": timing["time_ms"],
              "tflops": tflops(flops, timing["time_ms"]),
              "time_ms_rounds": timing["time_ms_rounds"], **record}
    if "gpu_clocks" in timing:
        result["gpu_clocks"] = timing["gpu_clocks"]
    return result


def forward_preparers(flex: FlexRunner,
                      families: tuple[str, ...] = (AUTO_FAMILY,)
                      ) -> dict[str, Callable[[Case], Prepared]]:
    """How to set up each implementation: ours once per kernel family of `families` (keyed by
    impls.family_impl), and the peers of IMPL_NAMES."""
    return {**ours_family_preparers(families), "varlen_attn": prepare_varlen_attn,
            "flex": flex.prepare, FA4_IMPL: prepare_fa4}


def dense_matmul_rate(device: torch.device | str = "cuda",
                      size: int = DENSE_MATMUL_SIZE) -> dict[str, Any]:
    """The dense bf16 matrix-product rate: median do_bench time of torch.mm on (size x size)
    randn operands into a preallocated output, as TFLOP/s (2 * size^3 FLOPs per product)."""
    from triton.testing import do_bench

    generator = torch.Generator(device=device).manual_seed(INPUT_SEED)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    with ClockSampler() as clocks:
        ms = do_bench(lambda: torch.mm(a, b, out=out), warmup=WARMUP_MS, rep=REP_MS,
                      return_mode="median")
    rate = {"op": "torch.mm", "dtype": "bfloat16", "m_n_k": [size, size, size], "time_ms": ms,
            "tflops": tflops(FLOPS_PER_MULTIPLY_ADD * size**3, ms)}
    if clocks.summary is not None:
        rate["gpu_clocks"] = clocks.summary
    return rate


def resolve_families(requested: list[str] | None,
                     extension: Any | None) -> tuple[list[str], str | None]:
    """The --families to run and an error message (None when fine).

    `extension`: flash_varlen's compiled module, or None when it does not load. Default (None
    requested): AUTO_FAMILY and every family the build compiled for this GPU's compute
    capability. Names the extension does not know are an error; without the extension nothing
    can be checked, and ours fails in every row with the load error.
    """
    if extension is None:
        return requested or [AUTO_FAMILY], None
    families = extension.kernel_families()
    if requested is None:
        major, minor = torch.cuda.get_device_capability()
        capability = major * 10 + minor
        return [AUTO_FAMILY] + [f["name"] for f in families if capability in f["built_for"]], None
    known = [f["name"] for f in families]
    unknown = [name for name in requested if name != AUTO_FAMILY and name not in known]
    if unknown:
        return requested, (f"--families: {','.join(unknown)} is no kernel family of this build; "
                           f"known: {AUTO_FAMILY},{','.join(known)}")
    return requested, None


def auto_family(extension: Any | None, head_dim: int) -> str | None:
    """The kernel family flash_varlen picks for a bf16 forward of `head_dim` on this GPU (what
    the column 'ours' runs), or None where it picks none (the ours cell says why)."""
    if extension is None:
        return None
    major, minor = torch.cuda.get_device_capability()
    try:
        return extension.select_kernel_family("forward", "bfloat16", head_dim, False,
                                              major * 10 + minor)
    except (NotImplementedError, ValueError):
        return None


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
    timers: dict[str, Timer] = {}
    ours_out = None
    for impl in impls:
        result, out, timer = check(preparers[impl], case, reference)
        if impl == "ours":
            ours_out = out
        elif out is not None and ours_out is not None:
            result["check"]["max_abs_diff_vs_ours"] = json_float(max_abs_diff(out, ours_out))
        results[impl] = result
        if timer is not None:
            timers[impl] = timer
        del out  # ours' stays referenced through ours_out; a peer's is freed here
    del ours_out
    # All checked first, then timed in rounds of rotating order (timing_rounds.py).
    for impl, timing in time_in_rounds(timers).items():
        results[impl] = timed_result(results[impl], timing, flops)
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
        "ratios": report.speed_ratios(results, report.forward_ratio_pairs(impls)),
    }


def without_missing_fa4(impls: list[str], meta: dict[str, Any]) -> list[str]:
    """`impls` without FA4's columns (fa4, and the backward's fa4_det) when FlashAttention-4
    does not import; the reason goes into meta["skipped"] and onto stderr (a missing peer must not
    stop the benchmark)."""
    fa4_impls = [impl for impl in impls if impl in (FA4_IMPL, FA4_DETERMINISTIC_IMPL)]
    if not fa4_impls or (error := fa4_import_error()) is None:
        return impls
    reason = f"{FA4_MODULE} does not import ({failure_reason(error)})"
    meta["skipped"] = {impl: reason for impl in fa4_impls}
    for impl in fa4_impls:
        print(f"{impl} skipped: {reason}", file=sys.stderr)
    return [impl for impl in impls if impl not in fa4_impls]


def _load_extension() -> Any | None:
    """flash_varlen's compiled module, or None when it does not load (ours is then n/a)."""
    try:
        from flash_varlen._extension import load_extension

        return load_extension()
    except Exception:  # noqa: BLE001 - measure() reports the same error in every ours cell
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_forward.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "this benchmark runs only on the GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    extension = _load_extension()
    families, error = resolve_families(args.families, extension)
    if error is not None:
        print(f"bench_forward.py: {error}", file=sys.stderr)
        return EXIT_USAGE
    meta = run_metadata(argv)
    meta["families"] = families
    meta["family_override_in_environment"] = os.environ.get(FAMILY_OVERRIDE_VARIABLE)
    impls = with_families(args.impl, families)
    impls = without_missing_fa4(impls, meta)
    meta["dense_matmul"] = dense_matmul_rate()
    print(report.dense_line(meta["dense_matmul"]), file=sys.stderr, flush=True)
    preparers = forward_preparers(FlexRunner(), tuple(families))
    rows = []
    for case in row_cases(args):
        row = bench_row(case, impls, preparers)
        if "ours" in impls:
            row["ours_family"] = auto_family(extension, case.layout.head_dim)
        del case  # free this row's inputs before the next row allocates its own
        rows.append(row)
        print(report.progress_line(row, impls), file=sys.stderr, flush=True)
        # Written after every row, so that a run stopped early leaves its finished rows.
        markdown_path = report.write_outputs(args.out, meta, rows, impls)
    print(chart.chart_beside(args.out, meta, rows))
    header, body = report.table(rows, impls, report.measured_dense_tflops(meta))
    print(report.format_text(header, body))
    for line in report.run_notes(meta) + report.notes(rows, impls):
        print(line)
    print(f"wrote {args.out} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
