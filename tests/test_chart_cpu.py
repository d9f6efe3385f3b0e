"""CPU tests of the benchmark chart (benchmarks/chart.py): which numbers it draws, and that it
writes a PNG when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import chart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(tflops: float | None, status: str = "ok") -> dict:
    return {"status": status, "tflops": tflops} if status == "ok" else {"status": status}


def _forward_row(workload: str, causal: bool, results: dict) -> dict:
    return {"workload": workload, "layout": "mha", "causal": causal, "results": results}


def _backward_row(forward: dict, backward: dict) -> dict:
    return {
        "workload": "docs", "layout": "gqa", "causal": True,
        "forward": {"results": forward, "ratios": {}},
        "backward": {"results": backward, "ratios": {}},
    }


def test_forward_json_gives_one_panel_with_missing_results_as_zero() -> None:
    """A failed ('wrong') or unavailable result draws no bar (0.0), never a stale number."""
    rows = [
        _forward_row("docs", False, {"ours": _result(300.0), "flex": _result(None, "wrong")}),
        _forward_row("short", True, {"ours": _result(150.0), "flex": _result(110.0)}),
    ]
    panels = chart.panels(rows)
    assert [title for title, _ in panels] == ["forward"]
    impls = chart.chart_impls(rows)
    assert impls == ["ours", "flex"]  # IMPL_STYLE order, only those present
    assert chart.tflops_table(panels[0][1], impls) == {
        "ours": [300.0, 150.0],
        "flex": [0.0, 110.0],
    }


def test_backward_json_gives_forward_and_backward_panels() -> None:
    """ours_det has no forward result: 0.0 there, its TFLOP/s in the backward panel."""
    rows = [
        _backward_row(
            forward={"ours": _result(290.0), "varlen_attn": _result(260.0)},
            backward={
                "ours": _result(250.0),
                "ours_det": _result(120.0),
                "varlen_attn": _result(230.0),
            },
        )
    ]
    panels = dict(chart.panels(rows))
    assert list(panels) == ["forward", "backward"]
    impls = chart.chart_impls(rows)
    assert impls == ["ours", "ours_det", "varlen_attn"]
    assert chart.tflops_table(panels["forward"], impls)["ours_det"] == [0.0]
    assert chart.tflops_table(panels["backward"], impls) == {
        "ours": [250.0],
        "ours_det": [120.0],
        "varlen_attn": [230.0],
    }


def test_write_chart_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [_backward_row({"ours": _result(290.0)}, {"ours": _result(250.0)})]
    png = tmp_path / "bench.png"
    assert chart.write_chart(png, {"gpu": "test GPU", "git_commit": "abc1234"}, rows)
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    line = chart.chart_beside(tmp_path / "bench.json", {}, rows)
    assert line == f"wrote {tmp_path / 'bench.png'}"
