"""Tables (console text and Markdown) and the JSON file of a forward benchmark run.

A row is the dict that bench_forward.py builds: workload, layout, causal, and per implementation
a result with "status" ("ok", "n/a" or "wrong"), "tflops" when ok, "reason"/"note" when any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATIO_PEERS = ("varlen_attn", "flex")


def row_label(row: dict[str, Any]) -> str:
    causal = "causal" if row["causal"] else "full"
    return f"{row['workload']}/{row['layout']}/{causal}"


def _number(value: float | str) -> str:
    """Floats to three significant digits; strings (a non-finite error, "nan") as they are."""
    return f"{value:.3g}" if isinstance(value, float) else value


def _impl_cell(result: dict[str, Any]) -> str:
    if result["status"] == "ok":
        cell = f"{result['tflops']:.1f}"
        return f"{cell}*" if result.get("note") else cell
    if result["status"] == "wrong":
        return "WRONG"
    return "n/a"


def progress_line(row: dict[str, Any], impls: list[str]) -> str:
    """One line per finished row, printed while the benchmark runs."""
    cells = ", ".join(f"{impl} {_impl_cell(row['results'][impl])}" for impl in impls)
    return f"{row_label(row)}: {cells}"


def _ratio_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _ratio_columns(impls: list[str]) -> list[str]:
    if "ours" not in impls:
        return []
    return [peer for peer in RATIO_PEERS if peer in impls]


def table(rows: list[dict[str, Any]], impls: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and body: one line per row, TFLOP/s per implementation, then ours/peer ratios."""
    peers = _ratio_columns(impls)
    header = ["workload", "layout", "causal"]
    header += [f"{impl} TFLOP/s" for impl in impls]
    header += [f"ours/{peer}" for peer in peers]
    body = []
    for row in rows:
        line = [row["workload"], row["layout"], "yes" if row["causal"] else "no"]
        line += [_impl_cell(row["results"][impl]) for impl in impls]
        line += [_ratio_cell(row["ratios"].get(f"ours/{peer}")) for peer in peers]
        body.append(line)
    return header, body


def notes(rows: list[dict[str, Any]], impls: list[str]) -> list[str]:
    """One line per result that is not a plain number: why n/a or WRONG, or what `*` means."""
    lines = []
    for row in rows:
        for impl in impls:
            result = row["results"][impl]
            if result["status"] == "n/a":
                lines.append(f"{row_label(row)} {impl}: n/a, {result['reason']}")
            elif result["status"] == "wrong":
                check = result["check"]
                lines.append(
                    f"{row_label(row)} {impl}: WRONG, max abs error "
                    f"{_number(check['max_abs_err'])} > tolerance {_number(check['tolerance'])}; "
                    "not timed"
                )
            elif result.get("note"):
                lines.append(f"{row_label(row)} {impl}*: {result['note']}")
    return lines


def format_text(header: list[str], body: list[list[str]]) -> str:
    """Aligned plain-text table for the console."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(line, widths))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def format_markdown(meta: dict[str, Any], header: list[str], body: list[list[str]],
                    note_lines: list[str]) -> str:
    """A Markdown page ready to commit under benchmarks/results/."""
    dirty = " (with uncommitted changes)" if meta["git_dirty"] else ""
    lines = [
        f"# Forward benchmark, {meta['date']}",
        "",
        f"- GPU: {meta['gpu']}",
        f"- torch {meta['torch']}, triton {meta['triton']}",
        f"- commit: {meta['git_commit']}{dirty}",
        f"- command: `{meta['command']}`",
        "- bf16, 32,768 packed tokens; mha = 16/16 heads d = 128, gqa = 32/8 heads d = 128, "
        "mha_dN = 16/16 heads d = N; TFLOP/s of useful work (targets.md), median of "
        "triton.testing.do_bench after a warm-up; every output checked against a float64 "
        "reference before timing.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(line) + " |" for line in body),
    ]
    if note_lines:
        lines += ["", "Notes:", "", *(f"- {line}" for line in note_lines)]
    return "\n".join(lines) + "\n"


def write_outputs(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                  impls: list[str]) -> Path:
    """Writes the JSON to `path` and the Markdown table next to it (same stem, .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: bench_forward stores non-finite errors as strings, so the JSON stays valid.
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, allow_nan=False) + "\n")
    header, body = table(rows, impls)
    markdown_path = path.with_suffix(".md")
    markdown_path.write_text(format_markdown(meta, header, body, notes(rows, impls)))
    return markdown_path
