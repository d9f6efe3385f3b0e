"""How many compile jobs the build runs at once, chosen so that it fits the machine's memory.

Every kernel file is compiled by one nvcc job that runs NVCC_THREADS device compilations
(cicc + ptxas, one per target architecture) at once. The heaviest instantiation file needs
PEAK_GIB_PER_NVCC_THREAD of memory per such thread at its peak; ninja's default parallelism
(cores + 2 jobs) ignores memory, and on a 2-core / 24 GB machine three jobs of two threads ran
out of memory. The default here is the most jobs such that jobs x threads x the peak, with a
margin, fits the memory available when the build starts, and no more jobs than cores.
MAX_JOBS and NVCC_THREADS, when set, are taken as they are.

setup.py loads this module by path (no torch or package import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Peak resident memory of one device compilation of the heaviest file, with nvcc 13.0 and the
# build's flags, one architecture, --threads=1 (/usr/bin/time -v): the d256 local-mask backward,
# csrc/instantiations/sm80/bwd_bf16_hdim256_local.cu, 3.54 GiB; the d128 backward,
# bwd_bf16_hdim128.cu, 3.79 GiB (both 2026-12-04); rounded up here.
PEAK_GIB_PER_NVCC_THREAD = 3.8
# Memory the rest of the machine may claim while the build runs (the linker, the desktop, other
# jobs): the estimate must fit in this fraction of what is available at the start.
MEMORY_MARGIN = 0.8
DEFAULT_NVCC_THREADS = 2
MEMINFO = Path("/proc/meminfo")
GIB = 1024**3


@dataclass(frozen=True)
class Parallelism:
    jobs: int
    nvcc_threads: int
    reason: str  # how the numbers were chosen, for the line the build prints


def available_memory_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None where
    the file or the field is missing (not Linux)."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def choose(
    cores: int, available_bytes: int | None, environ: dict[str, str] | os._Environ = os.environ
) -> Parallelism:
    """The jobs and nvcc threads for a machine with ``cores`` and ``available_bytes`` of free
    memory (None: unknown), unless MAX_JOBS / NVCC_THREADS in ``environ`` set them."""
    threads_set = environ.get("NVCC_THREADS", "").strip()
    jobs_set = environ.get("MAX_JOBS", "").strip()
    nvcc_threads = int(threads_set) if threads_set else DEFAULT_NVCC_THREADS
    if nvcc_threads < 1:
        raise ValueError(f"NVCC_THREADS must be >= 1, got {threads_set!r}")
    if jobs_set:
        jobs = int(jobs_set)
        if jobs < 1:
            raise ValueError(f"MAX_JOBS must be >= 1, got {jobs_set!r}")
        return Parallelism(jobs, nvcc_threads, "MAX_JOBS set")
    if available_bytes is None:
        return Parallelism(max(1, cores), nvcc_threads, f"{cores} cores, memory unknown")
    per_job = PEAK_GIB_PER_NVCC_THREAD * GIB * nvcc_threads
    fit = int(available_bytes * MEMORY_MARGIN // per_job)
    jobs = max(1, min(cores, fit))
    reason = (
        f"{cores} cores, {available_bytes / GIB:.1f} GiB available, "
        f"~{PEAK_GIB_PER_NVCC_THREAD:g} GiB per nvcc thread at peak"
    )
    if fit < 1:
        reason += "; even one job may not fit: close other programs or add swap"
    return Parallelism(jobs, nvcc_threads, reason)


def describe(parallelism: Parallelism) -> str:
    return (
        f"{parallelism.jobs} parallel jobs x {parallelism.nvcc_threads} nvcc threads "
        f"({parallelism.reason}; MAX_JOBS / NVCC_THREADS override)"
    )
