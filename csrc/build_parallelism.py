"""How many compile jobs the build runs at once, chosen so that it fits the machine's memory.

Every kernel file is compiled by one nvcc job that runs NVCC_THREADS device compilations
(cicc + ptxas, one per target architecture) at once. The heaviest instantiation file needs
PEAK_GIB_PER_NVCC_THREAD of memory per such thread at its peak; ninja's default parallelism
(cores + 2 jobs) ignores memory, and on a 2-core / 24 GB machine three jobs of two threads ran
out of memory. The default here is the most jobs such that jobs x threads x the peak, with a
margin, fits the memory available when the build starts, and no more jobs than cores; each job
gets one nvcc thread when the jobs alone keep every core busy, and more (up to one per
architecture a file compiles for) only to use cores that memory leaves without a job.
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
# More nvcc threads than the architectures a file compiles for (two at most: the sm80 family's
# sm_80 and sm_90) have nothing to do.
MAX_USEFUL_NVCC_THREADS = 2
# Why one thread per job when jobs fill the cores: the README's install command on the 2-core
# machine (full default build, fresh clone of commit 2abcca9) took 1578 s with 2 jobs x 2
# threads and 1459 s with 2 jobs x 1 thread (at most 17.1 against 9.4 GiB used): a second
# thread per job only time-shares the cores, at a cost.
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
    threads_set = _positive(environ, "NVCC_THREADS")
    jobs_set = _positive(environ, "MAX_JOBS")
    per_thread = PEAK_GIB_PER_NVCC_THREAD * GIB
    budget = None if available_bytes is None else available_bytes * MEMORY_MARGIN
    if jobs_set is not None:
        jobs, reason = jobs_set, "MAX_JOBS set"
    elif budget is None:
        jobs, reason = max(1, cores), f"{cores} cores, memory unknown"
    else:
        fit = int(budget // (per_thread * (threads_set or 1)))
        jobs = max(1, min(cores, fit))
        reason = (
            f"{cores} cores, {available_bytes / GIB:.1f} GiB available, "
            f"~{PEAK_GIB_PER_NVCC_THREAD:g} GiB per nvcc thread at peak"
        )
        if fit < 1:
            reason += "; even one job may not fit: close other programs or add swap"
    if threads_set is not None:
        return Parallelism(jobs, threads_set, reason)
    # Threads only for cores the jobs leave idle, within the memory left for them.
    threads = min(MAX_USEFUL_NVCC_THREADS, max(1, cores // jobs))
    if budget is not None:
        threads = max(1, min(threads, int(budget // (per_thread * jobs))))
    return Parallelism(jobs, threads, reason)


def _positive(environ: dict[str, str] | os._Environ, name: str) -> int | None:
    """The variable as a positive int, or None when it is not set."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    value = int(raw)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {raw!r}")
    return value


def describe(parallelism: Parallelism) -> str:
    return (
        f"{parallelism.jobs} parallel jobs x {parallelism.nvcc_threads} nvcc threads "
        f"({parallelism.reason}; MAX_JOBS / NVCC_THREADS override)"
    )
