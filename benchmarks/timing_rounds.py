"""Times the implementations of one benchmark row in rounds of rotating order.

Each implementation that passed its check is timed TIMING_ROUNDS times with
triton.testing.do_bench (median of REP_MS of calls after WARMUP_MS of warm-up); round r starts
with the r-th implementation and goes round the list, so that none is always timed first, and the
row reports the median of each implementation's rounds (and the rounds themselves).

Why: a GPU's speed depends on its recent load. On an H100 (2026-12-05,
results/2026-12-05_h100_9d66c26_forward_sm90.md) single rows of one implementation moved by up to
9% between two calls, and in the one-pass order (every implementation timed once, in --impl
order, right after the float64 reference) our forward ran 9-13% above its own ncu kernel time on
docs d64 / d256 while FA4, timed second, matched its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.gpu_clocks import ClockSampler
from benchmarks.impls import environment_set

TIMING_ROUNDS = 3
WARMUP_MS = 25
REP_MS = 100


@dataclass
class Timer:
    """What to time for one implementation: `run` (one call, as the benchmark times it) under
    `environment` (Prepared.environment: variables set only around its calls)."""

    run: Callable[[], object]
    environment: Mapping[str, str | None] = field(default_factory=dict)


def rotated_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: round r starts at names[r % len(names)] and wraps around."""
    if not names:
        return []
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def time_in_rounds(timers: dict[str, Timer], rounds: int = TIMING_ROUNDS) -> dict[str, Any]:
    """Times every timer `rounds` times in rotating order.

    Returns, per name: {"time_ms": median of the rounds, "time_ms_rounds": [ms per round, in
    round order], "gpu_clocks": the clock summary of the round whose time is the median (absent
    where nvidia-smi gave none)}, or {"error": the exception} for a timer that raised (it is not
    timed again; a peer that fails mid-run must not stop the benchmark).
    """
    from triton.testing import do_bench

    times: dict[str, list[float]] = {name: [] for name in timers}
    clocks: dict[str, list[dict[str, Any] | None]] = {name: [] for name in timers}
    errors: dict[str, Exception] = {}
    for order in rotated_orders(list(timers), rounds):
        for name in order:
            if name in errors:
                continue
            timer = timers[name]
            try:
                with environment_set(timer.environment), ClockSampler() as sampler:
                    ms = do_bench(timer.run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
            except Exception as error:  # noqa: BLE001 - returned: reported for this name
                errors[name] = error
                continue
            times[name].append(ms)
            clocks[name].append(sampler.summary)
    results: dict[str, Any] = {}
    for name in timers:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        median = statistics.median(times[name])
        result: dict[str, Any] = {"time_ms": median, "time_ms_rounds": times[name]}
        # The round nearest the median (the median itself for an odd count) gives the clocks.
        nearest = min(range(len(times[name])), key=lambda i: abs(times[name][i] - median))
        if clocks[name][nearest] is not None:
            result["gpu_clocks"] = clocks[name][nearest]
        results[name] = result
    return results
