"""scripts/profile_forward.py without a GPU: it says so and exits 2, and its options name only
the benchmark's workloads and head layouts (the profiler's calls are the benchmark's)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_forward.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    result = run("--workload", "short", "--layout", "gqa", "--causal")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


def test_an_unknown_workload_is_refused() -> None:
    result = run("--workload", "long")
    assert result.returncode == 2
    assert "invalid choice: 'long'" in result.stderr
