"""The benchmarks' clock sampling (benchmarks/gpu_clocks.py) and where its numbers appear, on the
CPU: nvidia-smi's output parsed, a stand-in nvidia-smi on PATH sampled for real, a machine
without nvidia-smi, and the report lines that show the clocks."""

import os
import stat
import time
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.gpu_clocks import (
    QUERY,
    ClockSampler,
    nvidia_smi_id,
    parse_samples,
    summarize,
)

# How long a test waits for the stand-in nvidia-smi to have printed its samples.
STAND_IN_TIMEOUT_S = 20.0


def test_parse_samples_takes_pairs_of_numbers_and_skips_the_rest() -> None:
    text = "1755, 650.25\n\n[N/A], [N/A]\nWarning: something\n1740,640\n1980, 700, 3\n"
    assert parse_samples(text) == [(1755.0, 650.25), (1740.0, 640.0)]


def test_summarize_gives_median_min_max_and_none_without_samples() -> None:
    summary = summarize([(1700.0, 600.0), (1800.0, 650.0), (1750.0, 700.0)])
    assert summary == {
        "sm_clock_mhz": {"median": 1750.0, "min": 1700.0, "max": 1800.0},
        "power_w": {"median": 650.0, "min": 600.0, "max": 700.0},
        "samples": 3,
    }
    assert summarize([]) is None


def write_stand_in(folder: Path, lines: list[str]) -> Path:
    """An executable `nvidia-smi` in `folder` that records its arguments, prints `lines`, marks
    that it did, and then keeps running like `nvidia-smi -lms` until it is terminated."""
    args_file = folder / "args.txt"
    printed = folder / "printed"
    script = folder / "nvidia-smi"
    echo = "".join(f"echo '{line}'\n" for line in lines)
    script.write_text(f'#!/bin/sh\necho "$@" > {args_file}\n{echo}touch {printed}\nexec sleep 60\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return printed


def test_sampler_reads_a_running_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = write_stand_in(tmp_path, ["1755, 650", "1745, 640", "[N/A], [N/A]", "1765, 660"])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with ClockSampler(period_ms=5, gpu="GPU-test") as clocks:
        deadline = time.monotonic() + STAND_IN_TIMEOUT_S
        while not printed.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert clocks.summary == {
        "sm_clock_mhz": {"median": 1755.0, "min": 1745.0, "max": 1765.0},
        "power_w": {"median": 650.0, "min": 640.0, "max": 660.0},
        "samples": 3,
    }
    args = (tmp_path / "args.txt").read_text().split()
    assert args == ["--id=GPU-test", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                    "-lms=5"]


def test_sampler_without_nvidia_smi_leaves_no_summary(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    with ClockSampler(gpu="0") as clocks:
        pass
    assert clocks.summary is None


def test_report_shows_the_clocks_of_a_row_and_of_the_dense_rate() -> None:
    clock = summarize([(1755.0, 650.0)])
    row = {"workload": "docs", "layout": "mha", "causal": True,
           "results": {"ours": {"status": "ok", "tflops": 500.0, "gpu_clocks": clock},
                       "fa4": {"status": "ok", "tflops": 510.0}}}
    assert report.clock_note("docs/mha/causal", row["results"], ["ours", "fa4"]) == (
        "docs/mha/causal SM clock while timed (median MHz): ours 1755")
    assert report.clock_note("docs/mha/causal", {"fa4": {"status": "ok"}}, ["fa4"]) is None
    assert report.notes([row], ["ours", "fa4"]) == [
        "docs/mha/causal SM clock while timed (median MHz): ours 1755"]
    backward_row = {**row, "forward": {"results": row["results"]},
                    "backward": {"results": {"ours": {"status": "ok", "gpu_clocks": clock}}}}
    assert report.backward_notes([backward_row], ["ours"]) == [
        "docs/mha/causal forward SM clock while timed (median MHz): ours 1755",
        "docs/mha/causal backward SM clock while timed (median MHz): ours 1755",
    ]
    dense = {"op": "torch.mm", "dtype": "bfloat16", "m_n_k": [8, 8, 8], "time_ms": 1.0,
             "tflops": 700.0}
    assert "SM clock" not in report.dense_line(dense)
    assert "at an SM clock of 1755 MHz" in report.dense_line({**dense, "gpu_clocks": clock})


@pytest.mark.parametrize(
    ("visible", "index", "expected"),
    [(None, 0, "0"), (None, 2, "2"), ("3,5", 1, "5"), (" 3 , 5 ", 0, "3"),
     ("GPU-0a1b,GPU-2c3d", 1, "GPU-2c3d"), ("", 1, "1")],
)
def test_nvidia_smi_id_follows_cuda_visible_devices(
    visible: str | None, index: int, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvidia-smi numbers every GPU of the machine; torch only the visible ones, in their order."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvidia_smi_id(index) == expected
