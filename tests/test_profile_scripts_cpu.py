"""The profiling scripts without a GPU (scripts/profile_attention.py, profile_decode_host.py): they
say so and exit 2, and profile_attention.py's options name only the benchmark's workloads,
implementations and directions (the profiler's calls are the benchmark's)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *arguments],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour without a GPU")
@pytest.mark.parametrize(
    "command",
    [
        ("profile_attention.py", "--workload", "short", "--layout", "gqa", "--causal"),
        ("profile_attention.py", "--workload", "equal2k", "--breakdown"),
        ("profile_attention.py", "--workload", "short", "--impl", "fa4"),
        ("profile_attention.py", "--workload", "docs", "--direction", "backward", "--causal"),
        ("profile_attention.py", "--direction", "backward", "--impl", "fa4", "--breakdown"),
        ("profile_decode_host.py", "--batch", "4", "--length", "100", "--page-size", "16"),
    ],
    ids=["forward", "forward_breakdown", "forward_fa4", "backward", "backward_fa4_breakdown",
         "decode"],
)
def test_without_a_gpu_they_say_so_and_exit_2(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("option, value", [
    ("--workload", "long"), ("--impl", "fa3"), ("--direction", "both"),
])
def test_an_unknown_choice_is_refused(option: str, value: str) -> None:
    result = run("profile_attention.py", option, value)
    assert result.returncode == 2
    assert f"invalid choice: '{value}'" in result.stderr
