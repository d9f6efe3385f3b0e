"""Test configuration shared by every test file: the ``gpu`` marker, what a run under a forced
kernel family skips, and the repository root on sys.path for ``benchmarks`` (not installed with
the package)."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Appended, not prepended: `benchmarks` becomes importable while an installed flash_varlen (CI
# tests the installed wheel) still wins over the checkout's.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from accuracy import UNIMPLEMENTED_OPTION  # noqa: E402

FAMILY_OVERRIDE = "FLASH_VARLEN_KERNEL_FAMILY"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU; skipped automatically when none is available"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Under FLASH_VARLEN_KERNEL_FAMILY=<family>, a test whose call needs an option that the family
    does not implement (a direction's unsupported_option in csrc/kernel_families.py names it) is
    skipped with dispatch's message, so that a forced run checks the family on everything it does
    implement. Without the override dispatch falls back to the next family and never raises
    this."""
    try:
        return (yield)
    except NotImplementedError as error:
        forced = os.environ.get(FAMILY_OVERRIDE)
        if forced and UNIMPLEMENTED_OPTION in str(error):
            pytest.skip(f"{FAMILY_OVERRIDE}={forced}: {error}")
        raise


@pytest.fixture
def no_clock_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmark code run on CPU stand-ins samples no GPU clocks: on a machine with nvidia-smi
    the real sampler would add clock notes for a GPU the stand-ins never used
    (tests/test_gpu_clocks_cpu.py tests the sampler itself)."""
    from benchmarks.gpu_clocks import ClockSampler

    monkeypatch.setattr(ClockSampler, "__enter__", lambda sampler: sampler)
