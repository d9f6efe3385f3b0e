"""Backward attention benchmark: flash_varlen vs PyTorch varlen_attn vs FlexAttention.

    python benchmarks/bench_backward.py --out results.json
        [--workloads docs,short,equal2k,skewed] [--layouts mha,gqa,mha_32x64,mha_8x256]
        [--causal both|on|off] [--impl ours,ours_det,varlen_attn,flex,fa4,fa4_det]

For every workload x head layout x causal row (the rows of targets.md by default, as in
bench_forward.py; --layouts measures the named layouts on every selected workload): fresh bf16
randn q/k/v and output gradient dout, one float64 reference for the output and the gradients. Per
implementation, the forward exactly as bench_forward.py measures it (checked, then timed), then
the backward alone: one forward with q/k/v requiring grad, a warm-up backward, two checked
backward calls on a NaN-poisoned allocator (dq, dk, dv against the reference; the two compared
bitwise); then the implementations that passed have
`torch.autograd.grad(out, inputs, dout, retain_graph=True)` timed under triton.testing.do_bench
in rounds of rotating order (timing_rounds.py; the median of the rounds).
`ours_det` is ours with deterministic=True: backward only (its forward is ours'), and its
gradients must be bitwise reproducible; `fa4` is FlashAttention-4 (skipped with a note when it
does not import) and `fa4_det` its deterministic backward, likewise. Writes the JSON to --out,
a Markdown table next to it (same stem, .md) and prints the table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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

from benchmarks import bench_forward, chart, report  # noqa: E402
from benchmarks.bench_forward import (  # noqa: E402
    EXIT_NO_GPU,
    failure_record,
    json_float,
    row_cases,
    synchronize,
)
from benchmarks.checks import (  # noqa: E402
    GRAD_NAMES,
    GradReference,
    build_references,
    max_abs_diff,
    poison_allocator,
)
from benchmarks.impls import (  # noqa: E402
    BACKWARD_IMPL_NAMES,
    DETERMINISTIC_IMPL,
    DETERMINISTIC_VARIANT_OF,
    FA4_DETERMINISTIC_IMPL,
    FA4_IMPL,
    FA4_MODULE,
    IMPL_NAMES,
    Case,
    FlexRunner,
    Prepared,
    environment_set,
    prepare_fa4_deterministic,
    prepare_ours_deterministic,
)
from benchmarks.timing_rounds import Timer, time_in_rounds  # noqa: E402

SCRIPT = "benchmarks/bench_backward.py"
DOUT_SEED = 4321
Grads = tuple[torch.Tensor, ...]  # dq, dk, dv in the packed layout (GRAD_NAMES order)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_forward.build_parser(
        "Backward (and forward) attention TFLOP/s of flash_varlen and its peers on the fixed "
        f"workloads of targets.md (needs a CUDA GPU). {DETERMINISTIC_IMPL} is ours with "
        f"deterministic=True, timed for the backward only; {FA4_IMPL} is FlashAttention-4 "
        f"({FA4_MODULE}, skipped with a note when it does not import), {FA4_DETERMINISTIC_IMPL} "
        "its deterministic backward.",
        BACKWARD_IMPL_NAMES,
    )
    return parser.parse_args(argv)


def run_metadata(argv: list[str]) -> dict[str, Any]:
    meta = bench_forward.run_metadata(argv, SCRIPT)
    meta["timing"]["backward"] = (
        "torch.autograd.grad(out, inputs, dout, retain_graph=True) alone, on the graph of one "
        "forward; inputs are q, k, v in the implementation's own layout"
    )
    meta["dout_seed"] = DOUT_SEED
    return meta


def backward_preparers(flex: FlexRunner) -> dict[str, Callable[[Case], Prepared]]:
    """How to set up each implementation of BACKWARD_IMPL_NAMES."""
    return {**bench_forward.forward_preparers(flex),
            DETERMINISTIC_IMPL: prepare_ours_deterministic,
            FA4_DETERMINISTIC_IMPL: prepare_fa4_deterministic}


def make_dout(case: Case) -> torch.Tensor:
    """The output gradient of a row: (total, nheads_q, d) randn in q's dtype, seeded."""
    generator = torch.Generator(device=case.q.device).manual_seed(DOUT_SEED)
    return torch.randn(case.q.shape, generator=generator, device=case.q.device,
                       dtype=case.q.dtype)


def with_grad(case: Case) -> Case:
    """The same inputs (shared storage) as new leaves that require grad."""
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    return dataclasses.replace(case, q=q, k=k, v=v)


def grad_check_record(checked: dict[str, tuple[bool, float]], reference: GradReference,
                      repeatable: bool, require_repeatable: bool) -> dict[str, Any]:
    """The "check" record of a backward result.

    checked: GradReference.check's name -> (passed, max abs error). Passed means every gradient
    is within its tolerance and, when `require_repeatable`, two identical calls agreed bitwise.
    """
    record: dict[str, Any] = {
        name: {"max_abs_err": json_float(err), "tolerance": tolerance, "passed": passed}
        for (name, (passed, err)), tolerance in zip(checked.items(), reference.tolerances)
    }
    record["bitwise_repeatable"] = repeatable
    record["repeatable_required"] = require_repeatable
    within = all(passed for passed, _ in checked.values())
    record["passed"] = within and (repeatable or not require_repeatable)
    return record


def _check_backward(prepare: Callable[[Case], Prepared], case: Case, dout: torch.Tensor,
                    reference: GradReference,
                    require_repeatable: bool) -> tuple[dict[str, Any], Grads, Timer | None]:
    """check_backward without the error handling: raises on any failure. The implementation's
    environment (Prepared.environment) is set around all its calls."""
    prepared = prepare(case)
    with environment_set(prepared.environment):
        out = prepared.run()
        # dout in out's own layout and strides: a compiled backward (Flex) would otherwise copy
        # it to the strides it was traced with, inside the timed region.
        dout_own = torch.empty_like(out).copy_(prepared.from_packed(dout))

        def backward() -> Grads:
            return torch.autograd.grad(out, prepared.inputs, dout_own, retain_graph=True)

        def packed(grads: Grads) -> Grads:
            return tuple(prepared.to_packed(grad) for grad in grads)

        # Warm-up: compilation (Flex compiles its backward on first use), lazy set-up.
        backward()
        synchronize(out.device)
        poison_allocator(*prepared.inputs)  # the gradients have the inputs' shapes and dtypes
        grads = packed(backward())
        again = packed(backward())
        synchronize(out.device)
    repeatable = all(torch.equal(first, second) for first, second in zip(grads, again))
    del again
    check = grad_check_record(reference.check(grads), reference, repeatable, require_repeatable)
    record: dict[str, Any] = {"check": check}
    if prepared.note:
        record["note"] = prepared.note
    if not check["passed"]:
        return {"status": "wrong", **record}, grads, None
    # The timer keeps the forward's graph (and so `out`) alive until the row is timed.
    return record, grads, Timer(backward, prepared.environment)


def check_backward(prepare: Callable[[Case], Prepared], case: Case, dout: torch.Tensor,
                   reference: GradReference,
                   require_repeatable: bool) -> tuple[dict[str, Any], Grads | None, Timer | None]:
    """Checks one implementation's gradients on `case`; what to time if they are right.

    case: q, k, v require grad; dout: (total, nheads_q, d), packed. Returns the result record so
    far, the checked gradients (packed, GRAD_NAMES order) or None if it did not run, and the
    backward to time (timing_rounds.Timer) or None. Any exception becomes a failure_record
    ("n/a" or "unsupported") with its reason: a peer that cannot run this case (missing,
    unsupported, out of memory) must not stop the benchmark.
    """
    try:
        return _check_backward(prepare, case, dout, reference, require_repeatable)
    except Exception as error:  # noqa: BLE001 - reported per implementation, see docstring
        failure = failure_record(error)
    # Out here the traceback is gone; collect the graph and tensors its frames held, so that
    # the next implementation gets the memory back.
    gc.collect()
    torch.cuda.empty_cache()
    return failure, None, None


def backward_results(case: Case, impls: list[str],
                     preparers: dict[str, Callable[[Case], Prepared]], dout: torch.Tensor,
                     reference: GradReference) -> dict[str, dict[str, Any]]:
    """The backward of every implementation on one row (case without grad; leaves are made
    here): all checked first (peers' gradients also compared with ours), then the ones that
    passed timed in rounds of rotating order (timing_rounds.py)."""
    grad_case = with_grad(case)
    flops = case.workload.backward_flops(case.layout, case.causal)
    results: dict[str, dict[str, Any]] = {}
    timers: dict[str, Timer] = {}
    ours_grads = None
    for impl in impls:
        result, grads, timer = check_backward(preparers[impl], grad_case, dout, reference,
                                              require_repeatable=impl in DETERMINISTIC_VARIANT_OF)
        if impl == "ours":
            ours_grads = grads
        elif grads is not None and ours_grads is not None:
            result["check"]["max_abs_diff_vs_ours"] = {
                name: json_float(max_abs_diff(grad, ours))
                for name, grad, ours in zip(GRAD_NAMES, grads, ours_grads)
            }
        results[impl] = result
        if timer is not None:
            timers[impl] = timer
        del grads  # ours' stay referenced through ours_grads; a peer's are freed here
    del ours_grads
    for impl, timing in time_in_rounds(timers).items():
        results[impl] = bench_forward.timed_result(results[impl], timing, flops)
    return results


def bench_row(case: Case, impls: list[str],
              preparers: dict[str, Callable[[Case], Prepared]]) -> dict[str, Any]:
    """Forward and backward of all implementations on one row."""
    workload, layout = case.workload, case.layout
    dout = make_dout(case)
    forward_reference, grad_reference = build_references(
        case.q, case.k, case.v, dout, workload.lengths, case.causal, case.scale
    )
    forward_impls = [impl for impl in impls if impl in IMPL_NAMES]
    forward_row = bench_forward.bench_row(case, forward_impls, preparers, forward_reference)
    del forward_reference
    results = backward_results(case, impls, preparers, dout, grad_reference)
    return {
        **{key: forward_row[key] for key in ("workload", "layout", "nheads_q", "nheads_kv",
                                             "head_dim", "causal", "num_sequences",
                                             "max_seqlen", "forward_flops")},
        "backward_flops": workload.backward_flops(layout, case.causal),
        "reference": {
            "forward": forward_row["reference"],
            "backward": {
                name: {"lowp_max_abs_err": err, "tolerance": tolerance}
                for name, err, tolerance in zip(GRAD_NAMES, grad_reference.lowp_max_abs_errs,
                                                grad_reference.tolerances)
            },
        },
        "forward": {"results": forward_row["results"], "ratios": forward_row["ratios"]},
        "backward": {
            "results": results,
            "ratios": report.speed_ratios(results, report.BACKWARD_RATIO_PAIRS),
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backward.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "this benchmark runs only on the GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    meta = run_metadata(argv)
    impls = bench_forward.without_missing_fa4(args.impl, meta)
    preparers = backward_preparers(FlexRunner())
    rows = []
    for case in row_cases(args):
        row = bench_row(case, impls, preparers)
        del case  # free this row's inputs before the next row allocates its own
        torch.cuda.empty_cache()
        rows.append(row)
        print(report.backward_progress_line(row, impls), file=sys.stderr, flush=True)
    markdown_path = report.write_backward_outputs(args.out, meta, rows, impls)
    print(chart.chart_beside(args.out, meta, rows))
    header, body = report.backward_table(rows, impls)
    print(report.format_text(header, body))
    for line in report.run_notes(meta) + report.backward_notes(rows, impls):
        print(line)
    print(f"wrote {args.out} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
