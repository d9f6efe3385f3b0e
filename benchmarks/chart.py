"""Bar charts (PNG) of a benchmark's TFLOP/s: one bar per implementation, grouped by row.

The forward and backward benchmarks call `write_chart` after their JSON and Markdown; a saved
JSON can be charted again with

    python -m benchmarks.chart benchmarks/results/<file>.json [--out chart.png]

matplotlib is optional: without it the benchmarks skip the chart and say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Implementations in a fixed order and colour, so charts of different runs read the same way.
IMPL_STYLE = {
    "ours": ("flash_varlen", "#1f77b4"),
    "ours_sm80": ("flash_varlen, sm80 family", "#9467bd"),
    "ours_sm90": ("flash_varlen, sm90 family", "#17becf"),
    "ours_det": ("flash_varlen deterministic", "#aec7e8"),
    "varlen_attn": ("PyTorch varlen_attn", "#ff7f0e"),
    "flex": ("FlexAttention", "#2ca02c"),
    "fa4": ("FlashAttention-4", "#d62728"),
    "fa4_det": ("FlashAttention-4 deterministic", "#ff9896"),
}
FIGURE_WIDTH_PER_ROW = 0.9  # inches per group of bars
FIGURE_HEIGHT_PER_PANEL = 3.2
MIN_FIGURE_WIDTH = 6.0
GROUP_WIDTH = 0.8  # of the unit spacing between groups; the rest is the gap
DPI = 120


def _row_label(row: dict[str, Any]) -> str:
    mask = "causal" if row["causal"] else "full"
    return f"{row['workload']}\n{row['layout']} {mask}"


def panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, per-row results) for each direction a benchmark JSON holds: one panel for the
    forward benchmark, forward and backward for the backward one."""
    if rows and "backward" in rows[0]:
        return [
            (direction, [row[direction]["results"] for row in rows])
            for direction in ("forward", "backward")
        ]
    return [("forward", [row["results"] for row in rows])]


def tflops_table(results: list[dict[str, Any]], impls: list[str]) -> dict[str, list[float]]:
    """TFLOP/s per implementation and row; 0.0 where a result is missing, failed or n/a (drawn
    as no bar)."""
    table = {}
    for impl in impls:
        values = []
        for row_results in results:
            result = row_results.get(impl)
            ok = result is not None and result.get("status") == "ok"
            values.append(float(result["tflops"]) if ok else 0.0)
        table[impl] = values
    return table


def chart_impls(rows: list[dict[str, Any]]) -> list[str]:
    """The implementations present in any row, in IMPL_STYLE order."""
    present = set()
    for _, results in panels(rows):
        for row_results in results:
            present.update(row_results)
    return [impl for impl in IMPL_STYLE if impl in present]


def write_chart(png_path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Draws the chart; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    impls = chart_impls(rows)
    directions = panels(rows)
    labels = [_row_label(row) for row in rows]
    width = max(MIN_FIGURE_WIDTH, FIGURE_WIDTH_PER_ROW * len(rows))
    figure, axes = plt.subplots(
        len(directions), 1, figsize=(width, FIGURE_HEIGHT_PER_PANEL * len(directions)),
        squeeze=False,
    )
    for axis, (direction, results) in zip(axes[:, 0], directions):
        table = tflops_table(results, impls)
        # Only implementations measured in this direction (ours_det has no forward).
        drawn = [impl for impl in impls if any(table[impl])]
        bar_width = GROUP_WIDTH / max(1, len(drawn))
        for index, impl in enumerate(drawn):
            name, colour = IMPL_STYLE[impl]
            offsets = [
                position - GROUP_WIDTH / 2 + (index + 0.5) * bar_width
                for position in range(len(rows))
            ]
            axis.bar(offsets, table[impl], bar_width, label=name, color=colour)
        axis.set_title(f"{direction} TFLOP/s")
        axis.set_xticks(range(len(rows)), labels, fontsize="small")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize="small", ncols=max(1, len(drawn)))
    figure.suptitle(f"{meta.get('gpu', '?')}, commit {meta.get('git_commit', '?')}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=DPI)
    plt.close(figure)
    return True


def chart_beside(json_path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Writes <json stem>.png next to the JSON; returns a line saying what happened."""
    png_path = Path(json_path).with_suffix(".png")
    if write_chart(png_path, meta, rows):
        return f"wrote {png_path}"
    return "matplotlib is not installed: no chart (pip install matplotlib)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a benchmark JSON (forward or backward)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: beside the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    rows = data["rows"]
    if args.out is None:
        print(chart_beside(args.json, data, rows))
        return 0
    if not write_chart(args.out, data, rows):
        print("matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
