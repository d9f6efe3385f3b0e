"""The SM clock and power that nvidia-smi samples while a benchmark times a call.

Two benchmark runs of the same tree on one machine differed by up to 6% on single rows
(benchmarks/results/2026-12-05_h100_softmax_experiments.md) and the dense matrix-product rate of
one call moved by up to 9% between trees (2026-12-05_h100_gqa_packing.md): with the clocks of
each timing recorded, a row's difference can be told apart from the clock it ran at.

    with ClockSampler() as clocks:
        ms = do_bench(...)
    clocks.summary  # {"sm_clock_mhz": {...}, "power_w": {...}, "samples": n} or None

nvidia-smi runs beside the benchmark with `-lms` (one sample every `period_ms`); where it is
missing or prints nothing usable, summary is None and the benchmark runs as before.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from typing import Any

# nvidia-smi's sampling period (ms): tens of samples during one do_bench timing (REP_MS).
DEFAULT_PERIOD_MS = 20
QUERY = "clocks.sm,power.draw"


def parse_samples(text: str) -> list[tuple[float, float]]:
    """(SM clock in MHz, power in W) of each line "clock, power" of nvidia-smi's CSV output
    (noheader, nounits); lines that are not two numbers ("[N/A]", warnings) are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2:
            continue
        try:
            samples.append((float(fields[0]), float(fields[1])))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float]]) -> dict[str, Any] | None:
    """Median, min and max of the clocks and the power, or None without samples."""
    if not samples:
        return None
    clocks = [clock for clock, _ in samples]
    powers = [power for _, power in samples]

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"sm_clock_mhz": spread(clocks), "power_w": spread(powers), "samples": len(samples)}


def nvidia_smi_id(device_index: int | None = None) -> str:
    """nvidia-smi's id of torch's CUDA device `device_index` (default: the current one, 0 if
    torch has none). nvidia-smi ignores CUDA_VISIBLE_DEVICES: where it is set, its entry for the
    device (an index or a UUID, both of which nvidia-smi's --id takes) names the GPU."""
    if device_index is None:
        import torch

        try:
            device_index = torch.cuda.current_device()
        except (AssertionError, RuntimeError):
            device_index = 0
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [entry for entry in visible if entry]
    if device_index < len(visible):
        return visible[device_index]
    return str(device_index)


class ClockSampler:
    """Context manager: nvidia-smi samples the GPU's clock and power for the duration of the
    block; `summary` holds the result after it (None if nvidia-smi is missing or silent).

    `gpu`: nvidia-smi's id of the GPU to sample (nvidia_smi_id: torch's current device)."""

    def __init__(self, period_ms: int = DEFAULT_PERIOD_MS, gpu: str | None = None) -> None:
        self.period_ms = period_ms
        self.gpu = nvidia_smi_id() if gpu is None else gpu
        self.summary: dict[str, Any] | None = None
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ClockSampler:
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--id={self.gpu}", f"--query-gpu={QUERY}",
                 "--format=csv,noheader,nounits", f"-lms={self.period_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._process = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        output, _ = self._process.communicate()
        self.summary = summarize(parse_samples(output))
