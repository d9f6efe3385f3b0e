"""Tables (console text and Markdown) and the JSON files of the forward and backward benchmarks.

A forward row is the dict that bench_forward.py builds: workload, layout, causal, and per
implementation a result with "status" ("ok", "n/a", UNSUPPORTED or "wrong"), "tflops" when ok,
"reason"/"note" when any. A backward row (bench_backward.py) has the same keys, except that the
results and ratios sit under "forward" and "backward", one {"results", "ratios"} dict per
direction. The forward table also derives, from FA4's TFLOP/s and the dense bf16 matrix-product
rate of the run's metadata, the speed-up over FA4 that targets.md asks of the sm90 family.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.impls import (
    DETERMINISTIC_IMPL,
    DETERMINISTIC_VARIANT_OF,
    FA4_DETERMINISTIC_IMPL,
    FA4_IMPL,
    FAMILY_OVERRIDE_VARIABLE,
)
from benchmarks.timing_rounds import TIMING_ROUNDS

# The peers; every other implementation of a forward run is ours (one per kernel family).
RATIO_PEERS = ("varlen_attn", "flex", FA4_IMPL)
# (numerator, denominator) of the TFLOP/s ratios: how ours compares with each peer, and (backward
# only) what bitwise reproducible dq costs.
FORWARD_RATIO_PAIRS = tuple(("ours", peer) for peer in RATIO_PEERS)
# Backward: ours against each peer, each deterministic backward against its own default one
# (targets.md: ours_det at most 1.15 x ours' time), and the two deterministic backwards.
BACKWARD_RATIO_PAIRS = (*FORWARD_RATIO_PAIRS,
                        *((variant, base) for variant, base in DETERMINISTIC_VARIANT_OF.items()),
                        (DETERMINISTIC_IMPL, FA4_DETERMINISTIC_IMPL))
DIRECTIONS = ("forward", "backward")
MISSING_CELL = "-"  # not measured in this direction (ours_det's forward) or ratio not available
# The status of an implementation that raised NotImplementedError (it does not serve the case,
# e.g. a forced kernel family without this head dim), and its cell.
UNSUPPORTED = "unsupported"
UNSUPPORTED_CELL = "—"

# targets.md, target 2 (sm90 family, forward): at least FA4 on every row, at least FA4_MARGIN x
# FA4 wherever that stays under DENSE_CEILING_FRACTION of the dense bf16 matrix-product rate
# measured in the same run, and SHORT_FA4_MARGIN x FA4 on the `short` workload.
FA4_MARGIN = 1.1
DENSE_CEILING_FRACTION = 0.95
SHORT_FA4_MARGIN = 1.5
SHORT_WORKLOAD = "short"

LAYOUTS_METHOD = (
    "- bf16, 32,768 packed tokens; mha = 16/16 heads d = 128, gqa = 32/8 heads d = 128, "
    "mha_HxD = H/H heads d = D, mha_dN = 16/16 heads d = N; TFLOP/s of useful work (targets.md"
)
TIMING_METHOD = (
    f"each implementation timed in {TIMING_ROUNDS} rounds of rotating order after all were "
    "checked (timing_rounds.py), the median of its rounds' triton.testing.do_bench medians"
)
FORWARD_TITLE = "Forward benchmark"
FORWARD_METHOD = (
    f"{LAYOUTS_METHOD}), {TIMING_METHOD}; every output "
    "checked against a float64 reference before timing. ours = flash_varlen's own kernel-family "
    "choice (its family in 'ours family'), ours_<family> = that family forced; "
    f"{UNSUPPORTED_CELL} = the family does not serve the row. 'target ours/fa4' is what "
    f"targets.md asks of the sm90 family: {FA4_MARGIN:.2f} where {FA4_MARGIN} x FA4 stays under "
    f"{DENSE_CEILING_FRACTION:.0%} of the dense rate (column '{FA4_MARGIN}x fa4 / dense'), else "
    f"1.00; {SHORT_FA4_MARGIN:.2f} on {SHORT_WORKLOAD}."
)
BACKWARD_TITLE = "Backward benchmark"
BACKWARD_METHOD = (
    f"{LAYOUTS_METHOD}; backward = 2.5x the "
    f"forward count), {TIMING_METHOD}. Forward timed as in "
    "the forward benchmark; backward timed alone: torch.autograd.grad(out, (q, k, v), dout, "
    "retain_graph=True) on one forward's graph, dout = seeded randn. Every output and every "
    "gradient (dq, dk, dv) checked against a float64 reference before timing. ours_det is ours "
    "with deterministic=True, fa4_det FlashAttention-4 with deterministic=True (backward only; "
    "their gradients must be bitwise reproducible)."
)


def row_label(row: dict[str, Any]) -> str:
    causal = "causal" if row["causal"] else "full"
    return f"{row['workload']}/{row['layout']}/{causal}"


def _number(value: float | str) -> str:
    """Floats to three significant digits; strings (a non-finite error, "nan") as they are."""
    return f"{value:.3g}" if isinstance(value, float) else value


def _impl_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return MISSING_CELL
    if result["status"] == "ok":
        cell = f"{result['tflops']:.1f}"
        return f"{cell}*" if result.get("note") else cell
    if result["status"] == "wrong":
        return "WRONG"
    if result["status"] == UNSUPPORTED:
        return UNSUPPORTED_CELL
    return "n/a"


def _pair_cell(row: dict[str, Any], impl: str) -> str:
    """'forward / backward' TFLOP/s of `impl` in a backward row, as in targets.md."""
    forward = row["forward"]["results"].get(impl)
    backward = row["backward"]["results"].get(impl)
    return f"{_impl_cell(forward)} / {_impl_cell(backward)}"


def progress_line(row: dict[str, Any], impls: list[str]) -> str:
    """One line per finished row, printed while the benchmark runs."""
    cells = ", ".join(f"{impl} {_impl_cell(row['results'][impl])}" for impl in impls)
    return f"{row_label(row)}: {cells}"


def backward_progress_line(row: dict[str, Any], impls: list[str]) -> str:
    """One line per finished backward row: forward / backward TFLOP/s per implementation."""
    cells = ", ".join(f"{impl} {_pair_cell(row, impl)}" for impl in impls)
    return f"{row_label(row)}: {cells}"


def speed_ratios(results: dict[str, dict[str, Any]],
                 pairs: tuple[tuple[str, str], ...]) -> dict[str, float | None]:
    """TFLOP/s of the numerator divided by the denominator's, keyed "num/den", for every pair
    whose two implementations are both in `results`; None where either was not timed."""
    ratios: dict[str, float | None] = {}
    for numerator, denominator in pairs:
        if numerator not in results or denominator not in results:
            continue
        top, bottom = results[numerator], results[denominator]
        both_ok = top["status"] == "ok" and bottom["status"] == "ok"
        ratios[f"{numerator}/{denominator}"] = top["tflops"] / bottom["tflops"] if both_ok else None
    return ratios


def _ratio_cell(ratio: float | None) -> str:
    return MISSING_CELL if ratio is None else f"{ratio:.2f}"


def forward_ratio_pairs(impls: list[str]) -> tuple[tuple[str, str], ...]:
    """(ours, peer) for every implementation of `impls` that is ours (any kernel family: every
    one not in RATIO_PEERS) and every peer of RATIO_PEERS in `impls`, in `impls` order."""
    ours = [impl for impl in impls if impl not in RATIO_PEERS]
    return tuple((mine, peer) for mine in ours for peer in RATIO_PEERS if peer in impls)


def _forward_ratio_columns(impls: list[str]) -> list[str]:
    """The "num/den" ratio keys the forward table shows: ours (flash_varlen's own family
    choice) against every peer, and every ours_<family> against FA4, the peer of targets.md's
    sm90 rule. The JSON keeps every pair of forward_ratio_pairs."""
    return [f"{mine}/{peer}" for mine, peer in forward_ratio_pairs(impls)
            if mine == "ours" or peer == FA4_IMPL]


def _backward_ratio_columns(impls: list[str]) -> list[str]:
    """The "num/den" keys of BACKWARD_RATIO_PAIRS whose two implementations were both run."""
    return [f"{num}/{den}" for num, den in BACKWARD_RATIO_PAIRS if num in impls and den in impls]


def _row_start(row: dict[str, Any]) -> list[str]:
    return [row["workload"], row["layout"], "yes" if row["causal"] else "no"]


def fa4_target(row: dict[str, Any], dense_tflops: float | None) -> tuple[float, float] | None:
    """What targets.md asks of the sm90 family's forward on this row, against FA4: (FA4_MARGIN
    x FA4's TFLOP/s as a share of the dense matrix-product rate, the ours/FA4 ratio required).
    The ratio is SHORT_FA4_MARGIN on SHORT_WORKLOAD, else FA4_MARGIN where that share is under
    DENSE_CEILING_FRACTION, else 1 (at least FA4). None when FA4 was not timed or no dense rate
    was measured."""
    fa4 = row["results"].get(FA4_IMPL)
    if fa4 is None or fa4["status"] != "ok" or dense_tflops is None:
        return None
    share = FA4_MARGIN * fa4["tflops"] / dense_tflops
    if row["workload"] == SHORT_WORKLOAD:
        return share, SHORT_FA4_MARGIN
    return share, FA4_MARGIN if share < DENSE_CEILING_FRACTION else 1.0


def table(rows: list[dict[str, Any]], impls: list[str],
          dense_tflops: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and body: one line per row; the family ours ran (when recorded), TFLOP/s per
    implementation, the ratios of _forward_ratio_columns, then (with FA4 and a dense rate) the
    columns of fa4_target."""
    ratio_keys = _forward_ratio_columns(impls)
    with_family = any("ours_family" in row for row in rows)
    with_target = FA4_IMPL in impls and dense_tflops is not None
    header = ["workload", "layout", "causal"] + (["ours family"] if with_family else [])
    header += [f"{impl} TFLOP/s" for impl in impls]
    header += ratio_keys
    if with_target:
        header += [f"{FA4_MARGIN}x {FA4_IMPL} / dense", f"target ours/{FA4_IMPL}"]
    body = []
    for row in rows:
        line = _row_start(row)
        if with_family:
            line.append(row.get("ours_family") or MISSING_CELL)
        line += [_impl_cell(row["results"][impl]) for impl in impls]
        line += [_ratio_cell(row["ratios"].get(key)) for key in ratio_keys]
        if with_target:
            target = fa4_target(row, dense_tflops)
            line += ([MISSING_CELL] * 2 if target is None
                     else [f"{target[0]:.0%}", f"{target[1]:.2f}"])
        body.append(line)
    return header, body


def backward_table(rows: list[dict[str, Any]],
                   impls: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and body of a backward run: one line per row, "forward / backward" TFLOP/s per
    implementation (as in targets.md), then the backward ratios (ours/peer, ours_det/ours)."""
    ratio_keys = _backward_ratio_columns(impls)
    header = ["workload", "layout", "causal"]
    header += [f"{impl} TFLOP/s fwd / bwd" for impl in impls]
    header += [f"bwd {key}" for key in ratio_keys]
    body = []
    for row in rows:
        line = _row_start(row)
        line += [_pair_cell(row, impl) for impl in impls]
        line += [_ratio_cell(row["backward"]["ratios"].get(key)) for key in ratio_keys]
        body.append(line)
    return header, body


def _forward_wrong_detail(check: dict[str, Any]) -> str:
    return (f"max abs error {_number(check['max_abs_err'])} > tolerance "
            f"{_number(check['tolerance'])}")


def _backward_wrong_detail(check: dict[str, Any]) -> str:
    """Which gradients missed their tolerance, and whether required reproducibility failed."""
    parts = [
        f"{name} max abs error {_number(check[name]['max_abs_err'])} > tolerance "
        f"{_number(check[name]['tolerance'])}"
        for name in ("dq", "dk", "dv")
        if not check[name]["passed"]
    ]
    if check["repeatable_required"] and not check["bitwise_repeatable"]:
        parts.append("gradients differ bitwise between two identical backward calls")
    return "; ".join(parts)


def _result_note(label: str, result: dict[str, Any],
                 wrong_detail: Callable[[dict[str, Any]], str]) -> str | None:
    """The note line of one result that is not a plain number (n/a, unsupported, WRONG, `*`), or
    None."""
    if result["status"] == "n/a":
        return f"{label}: n/a, {result['reason']}"
    if result["status"] == UNSUPPORTED:
        return f"{label}: {UNSUPPORTED_CELL} ({UNSUPPORTED}), {result['reason']}"
    if result["status"] == "wrong":
        return f"{label}: WRONG, {wrong_detail(result['check'])}; not timed"
    if result.get("note"):
        return f"{label}*: {result['note']}"
    return None


def measured_dense_tflops(meta: dict[str, Any]) -> float | None:
    """The dense bf16 matrix-product rate a forward run measured, or None (older JSON files)."""
    return meta.get("dense_matmul", {}).get("tflops")


def dense_line(dense: dict[str, Any]) -> str:
    """The run's dense matrix-product ceiling (bench_forward.dense_matmul_rate) in one line."""
    shape = " x ".join(map(str, dense["m_n_k"]))
    clock = dense.get("gpu_clocks")
    at = f" at an SM clock of {clock['sm_clock_mhz']['median']:.0f} MHz" if clock else ""
    return (f"dense {dense['dtype']} matrix product ({dense['op']}, {shape}): "
            f"{dense['tflops']:.1f} TFLOP/s ({dense['time_ms']:.3f} ms, median){at}, this run")


def run_notes(meta: dict[str, Any]) -> list[str]:
    """Notes on the run as a whole: implementations skipped (and why), and a kernel-family
    override found in the environment (then 'ours' ran that family, not its own choice)."""
    lines = [f"{impl} skipped: {reason}" for impl, reason in meta.get("skipped", {}).items()]
    override = meta.get("family_override_in_environment")
    if override:
        lines.append(f"{FAMILY_OVERRIDE_VARIABLE}={override} was set for the whole run: "
                     "'ours' ran that family")
    return lines


def clock_note(label: str, results: dict[str, Any], impls: list[str]) -> str | None:
    """The median SM clock during each implementation's timing (gpu_clocks.py) of the results
    of one row (and direction), or None where nvidia-smi gave none: two rows or two runs compare
    fairly only at similar clocks."""
    cells = []
    for impl in impls:
        clock = (results.get(impl) or {}).get("gpu_clocks")
        if clock:
            cells.append(f"{impl} {clock['sm_clock_mhz']['median']:.0f}")
    if not cells:
        return None
    return f"{label} SM clock while timed (median MHz): " + ", ".join(cells)


def notes(rows: list[dict[str, Any]], impls: list[str]) -> list[str]:
    """One line per result that is not a plain number: why n/a, unsupported or WRONG, or what `*`
    means; then each row's clocks (clock_note)."""
    lines = []
    for row in rows:
        for impl in impls:
            line = _result_note(f"{row_label(row)} {impl}", row["results"][impl],
                                _forward_wrong_detail)
            if line is not None:
                lines.append(line)
    clocks = (clock_note(row_label(row), row["results"], impls) for row in rows)
    lines.extend(line for line in clocks if line is not None)
    return lines


def backward_notes(rows: list[dict[str, Any]], impls: list[str]) -> list[str]:
    """notes() for backward rows: a line per direction for n/a and WRONG, and a `*` note once
    per implementation (it describes the set-up, which both directions share); then each row's
    clocks per direction (clock_note)."""
    wrong_details = {"forward": _forward_wrong_detail, "backward": _backward_wrong_detail}
    lines = []
    for row in rows:
        for impl in impls:
            noted = False
            for direction in DIRECTIONS:
                result = row[direction]["results"].get(impl)
                if result is None:
                    continue
                if result["status"] != "ok":
                    label = f"{row_label(row)} {impl} {direction}"
                    lines.append(_result_note(label, result, wrong_details[direction]))
                elif result.get("note") and not noted:
                    lines.append(f"{row_label(row)} {impl}*: {result['note']}")
                    noted = True
    for row in rows:
        for direction in DIRECTIONS:
            line = clock_note(f"{row_label(row)} {direction}", row[direction]["results"], impls)
            if line is not None:
                lines.append(line)
    return lines


def format_text(header: list[str], body: list[list[str]]) -> str:
    """Aligned plain-text table for the console."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(line, widths))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def format_markdown(meta: dict[str, Any], header: list[str], body: list[list[str]],
                    note_lines: list[str], title: str = FORWARD_TITLE,
                    method: str = FORWARD_METHOD) -> str:
    """A Markdown page ready to commit under benchmarks/results/."""
    dirty = " (with uncommitted changes)" if meta["git_dirty"] else ""
    lines = [
        f"# {title}, {meta['date']}",
        "",
        f"- GPU: {meta['gpu']}",
        f"- torch {meta['torch']}, triton {meta['triton']}",
        f"- commit: {meta['git_commit']}{dirty}",
        f"- command: `{meta['command']}`",
        *([f"- {dense_line(meta['dense_matmul'])}"] if "dense_matmul" in meta else []),
        method,
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(line) + " |" for line in body),
    ]
    if note_lines:
        lines += ["", "Notes:", "", *(f"- {line}" for line in note_lines)]
    return "\n".join(lines) + "\n"


def _write(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], markdown: str) -> Path:
    """Writes the JSON to `path` and `markdown` next to it (same stem, .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the benchmarks store non-finite errors as strings, so the JSON stays valid.
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, allow_nan=False) + "\n")
    markdown_path = path.with_suffix(".md")
    markdown_path.write_text(markdown)
    return markdown_path


def write_outputs(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                  impls: list[str]) -> Path:
    """Writes the JSON of a forward run to `path` and the Markdown table next to it (.md)."""
    header, body = table(rows, impls, measured_dense_tflops(meta))
    note_lines = run_notes(meta) + notes(rows, impls)
    return _write(path, meta, rows, format_markdown(meta, header, body, note_lines))


def write_backward_outputs(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                           impls: list[str]) -> Path:
    """Writes the JSON of a backward run to `path` and the Markdown table next to it (.md)."""
    header, body = backward_table(rows, impls)
    markdown = format_markdown(meta, header, body, run_notes(meta) + backward_notes(rows, impls),
                               title=BACKWARD_TITLE, method=BACKWARD_METHOD)
    return _write(path, meta, rows, markdown)
