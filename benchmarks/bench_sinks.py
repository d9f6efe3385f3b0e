"""Time with attention sinks relative to plain attention (issue 12).

    python benchmarks/bench_sinks.py [--workloads docs] [--layouts mha,gqa] [--repeats 3]

Per workload of workloads.py, head layout and causal flag: the forward
(``flash_attn_varlen_func``) and the backward alone (``torch.autograd.grad`` of a recorded
forward, with the sink's gradient when there is a sink) of plain attention and of attention with
``learnable_sink``, timed with ``triton.testing.do_bench`` (median). The two runs alternate
``--repeats`` times and each keeps its fastest median, so that clock drift during the run
affects both alike. Printed as a Markdown table with the ratio sink / plain. Correctness is
tests/test_sinks_gpu.py's job; this only times.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable (appended: an installed flash_varlen wins).
    sys.path.append(str(REPO_ROOT))

import flash_varlen  # noqa: E402
from benchmarks.bench_forward import name_list  # noqa: E402
from benchmarks.workloads import HEAD_LAYOUTS, WORKLOAD_NAMES, make_workload  # noqa: E402

WARMUP_MS, REP_MS = 50, 300
SEED = 0
# gpt-oss's sinks are learned logits of order one; their size does not change the work.
SINK_STD = 1.0


def median_ms(run: Callable[[], object]) -> float:
    return do_bench(run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def measure_row(workload_name: str, layout_name: str, causal: bool, repeats: int) -> list[str]:
    """The table cells of one row: forward and backward ms, plain then with sinks, and ratios."""
    workload = make_workload(workload_name)
    layout = HEAD_LAYOUTS[layout_name]
    cu_seqlens = workload.cu_seqlens("cuda")
    generator = torch.Generator(device="cuda").manual_seed(SEED)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device="cuda", dtype=dtype)

    total = workload.total_tokens
    q = randn(total, layout.nheads_q, layout.head_dim).requires_grad_()
    k = randn(total, layout.nheads_kv, layout.head_dim).requires_grad_()
    v = randn(total, layout.nheads_kv, layout.head_dim).requires_grad_()
    dout = randn(total, layout.nheads_q, layout.head_dim)
    sink = (randn(layout.nheads_q, dtype=torch.float32) * SINK_STD).requires_grad_()
    max_seqlen = workload.max_seqlen

    def forward(learnable_sink: torch.Tensor | None) -> torch.Tensor:
        return flash_varlen.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
            learnable_sink=learnable_sink,
        )

    runs = {}
    for name, learnable_sink in (("plain", None), ("sink", sink)):
        inputs = (q, k, v) if learnable_sink is None else (q, k, v, learnable_sink)
        out = forward(learnable_sink)
        runs[name] = (
            lambda learnable_sink=learnable_sink: forward(learnable_sink),
            lambda out=out, inputs=inputs: torch.autograd.grad(
                out, inputs, dout, retain_graph=True
            ),
        )
    best = {(name, direction): float("inf") for name in runs for direction in (0, 1)}
    for _ in range(repeats):
        for name, (fwd, bwd) in runs.items():
            best[name, 0] = min(best[name, 0], median_ms(fwd))
            best[name, 1] = min(best[name, 1], median_ms(bwd))
    cells = [workload_name, layout_name, "yes" if causal else "no"]
    for direction in (0, 1):
        plain, with_sink = best["plain", direction], best["sink", direction]
        cells += [f"{plain:.3f}", f"{with_sink:.3f}", f"{with_sink / plain:.3f}"]
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=name_list(WORKLOAD_NAMES), default=["docs"])
    parser.add_argument("--layouts", type=name_list(tuple(HEAD_LAYOUTS)), default=["mha", "gqa"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"GPU: {torch.cuda.get_device_name()}, bf16, repeats {args.repeats}\n")
    print("| workload | heads | causal | fwd plain ms | fwd sink ms | fwd sink/plain "
          "| bwd plain ms | bwd sink ms | bwd sink/plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload_name in args.workloads:
        for layout_name in args.layouts:
            for causal in (False, True):
                cells = measure_row(workload_name, layout_name, causal, args.repeats)
                print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
