"""Timing in rounds of rotating order (benchmarks/timing_rounds.py) and how the forward and
backward benchmarks use it, with a stand-in do_bench (CPU)."""

import os

import pytest
import triton.testing

from benchmarks import timing_rounds
from benchmarks.timing_rounds import Timer, rotated_orders, time_in_rounds

VARIABLE = "FLASH_VARLEN_TIMING_ROUNDS_TEST"


# Benchmark rows on CPU stand-ins: no GPU clocks (conftest.py).
pytestmark = pytest.mark.usefixtures("no_clock_sampling")


class FakeBench:
    """do_bench stand-in: logs which timer ran (by the name its run returns) and the variable's
    value during the call, and answers from a per-name list of times, one per call."""

    def __init__(self, times: dict[str, list[float]]) -> None:
        self.times = {name: list(values) for name, values in times.items()}
        self.calls: list[str] = []
        self.environment: list[str | None] = []

    def __call__(self, fn, warmup, rep, return_mode):
        assert (warmup, rep, return_mode) == (timing_rounds.WARMUP_MS, timing_rounds.REP_MS,
                                              "median")
        name = fn()
        self.calls.append(name)
        self.environment.append(os.environ.get(VARIABLE))
        return self.times[name].pop(0)


def named(name: str) -> Timer:
    return Timer(lambda: name)


def test_rounds_rotate_the_order() -> None:
    assert rotated_orders(["a", "b", "c"], 4) == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert rotated_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert rotated_orders([], 3) == []


def test_each_timer_gets_the_median_of_its_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = FakeBench({"ours": [1.0, 3.0, 2.0], "fa4": [5.0, 4.0, 9.0]})
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    results = time_in_rounds({"ours": named("ours"), "fa4": named("fa4")}, rounds=3)
    assert bench.calls == ["ours", "fa4", "fa4", "ours", "ours", "fa4"]
    assert results == {
        "ours": {"time_ms": 2.0, "time_ms_rounds": [1.0, 3.0, 2.0]},
        "fa4": {"time_ms": 5.0, "time_ms_rounds": [5.0, 4.0, 9.0]},
    }


def test_a_timer_that_raises_is_reported_and_not_timed_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench = FakeBench({"ours": [1.0, 1.0, 1.0]})

    def broken() -> str:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    results = time_in_rounds({"flex": Timer(broken), "ours": named("ours")}, rounds=3)
    assert isinstance(results["flex"]["error"], RuntimeError)
    assert results["ours"]["time_ms"] == 1.0
    assert bench.calls == ["ours", "ours", "ours"]


def test_each_timer_runs_in_its_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = FakeBench({"ours_sm90": [1.0, 1.0], "fa4": [2.0, 2.0]})
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    monkeypatch.delenv(VARIABLE, raising=False)
    timers = {"ours_sm90": Timer(lambda: "ours_sm90", {VARIABLE: "sm90"}), "fa4": named("fa4")}
    time_in_rounds(timers, rounds=2)
    assert list(zip(bench.calls, bench.environment)) == [
        ("ours_sm90", "sm90"), ("fa4", None), ("fa4", None), ("ours_sm90", "sm90")]
    assert VARIABLE not in os.environ
