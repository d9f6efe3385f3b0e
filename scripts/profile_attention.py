"""A few forward (or backward) calls of one targets.md workload, for a profiler to pick one from
(needs a GPU):

    ncu --clock-control none --kernel-name regex:flash_fwd_kernel --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        python3 scripts/profile_attention.py --workload equal2k --layout mha

(`--clock-control none`: the device README asks that the clocks be left alone.) The calls are
the benchmark's (benchmarks/workloads.py: the same lengths, heads and dtype);
FLASH_VARLEN_KERNEL_FAMILY picks the family as everywhere else. Prints the median time of the
calls, so that a run without a profiler says what one call costs.

`--direction backward` times and profiles the backward alone, as benchmarks/bench_backward.py
does: torch.autograd.grad of one forward's output (retain_graph, a seeded dout) per call; ncu's
filter for our backward kernels `regex:flash_bwd` (the sm90 family's row statistics, main
kernel and dQ conversion), FA4's `regex:FlashAttentionBackwardSm90`.

`--impl fa4` makes the same calls through FlashAttention-4 (benchmarks/impls.py's peer; ncu's
filter for its Hopper forward kernel: `--kernel-name regex:FlashAttentionForwardSm90`), so that
the two kernels' profiles on one workload can be set side by side.

`--breakdown` (no outside profiler) says where a call's time goes: the calls back to back as
benchmarks/bench_forward.py times them (triton.testing.do_bench: L2 flushed before each, no
host sync between), each GPU kernel's time per call under torch.profiler, and the SM clock and
power that nvidia-smi samples meanwhile. The first ncu profile of the sm90 forward (equal2k, MHA,
H100) timed its kernel at 629 TFLOP/s of useful work at 1.74 GHz where the benchmark's median
call gives 540: this tells launch gaps, other kernels and clocks apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.impls import FA4_IMPL, Case, prepare_fa4  # noqa: E402
from benchmarks.workloads import HEAD_LAYOUTS, WORKLOAD_NAMES, make_workload  # noqa: E402
from flash_varlen import flash_attn_varlen_func  # noqa: E402

DTYPE = torch.bfloat16
# The profiler skips the first calls (warm-up: the extension loads, caches fill) and takes one.
DEFAULT_CALLS = 5
DOUT_SEED = 0  # the backward's output gradient: seeded randn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, default="equal2k")
    parser.add_argument("--layout", choices=sorted(HEAD_LAYOUTS), default="mha")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--direction", choices=("forward", "backward"), default="forward",
                        help="backward: torch.autograd.grad of one forward's output per call")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    parser.add_argument("--impl", choices=("ours", FA4_IMPL), default="ours",
                        help="whose forward to call (fa4: FlashAttention-4, if it imports)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the calls as the benchmark does and list their kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_attention.py: needs a CUDA GPU", file=sys.stderr)
        return 2

    workload = make_workload(args.workload)
    layout = HEAD_LAYOUTS[args.layout]
    total = workload.total_tokens
    backward = args.direction == "backward"
    q, k, v = (
        torch.randn(total, heads, layout.head_dim, device="cuda", dtype=DTYPE,
                    requires_grad=backward)
        for heads in (layout.nheads_q, layout.nheads_kv, layout.nheads_kv)
    )
    cu_seqlens = workload.cu_seqlens("cuda")

    def forward() -> torch.Tensor:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, workload.max_seqlen,
                                      workload.max_seqlen, causal=args.causal)

    if args.impl == FA4_IMPL:
        forward = prepare_fa4(Case(workload, layout, args.causal, q, k, v, cu_seqlens)).run
    call = forward
    flops = workload.forward_flops(layout, args.causal)
    if backward:
        out = forward()
        dout = torch.randn(out.shape, device="cuda", dtype=DTYPE,
                           generator=torch.Generator("cuda").manual_seed(DOUT_SEED))

        def call() -> None:
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        flops = workload.backward_flops(layout, args.causal)
    times = []
    for _ in range(args.calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = sorted(times)[len(times) // 2]
    print(f"{args.impl} {args.direction}: {args.workload} {args.layout} causal={args.causal}: "
          f"median {median:.3f} ms over "
          f"{args.calls} calls, {flops / (median * 1e-3) / 1e12:.1f} TFLOP/s")
    if args.breakdown:
        print_breakdown(call, flops)
    return 0


# Calls under torch.profiler, back to back.
BREAKDOWN_CALLS = 200


def print_breakdown(call, flops: float) -> None:
    """Benchmark-style median per call, GPU kernel time per call, SM clock and power."""
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from benchmarks.bench_forward import REP_MS, WARMUP_MS
    from benchmarks.gpu_clocks import ClockSampler

    with ClockSampler() as clocks:
        bench_ms = do_bench(call, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    if clocks.summary is None:
        print("nvidia-smi gave no clock samples")
    else:
        clock, power = clocks.summary["sm_clock_mhz"], clocks.summary["power_w"]
        print(f"during do_bench: SM clock median {clock['median']:.0f} MHz (min {clock['min']:.0f}, "
              f"max {clock['max']:.0f}), power median {power['median']:.0f} W, "
              f"{clocks.summary['samples']} samples")
    print(f"do_bench median per call: {bench_ms:.3f} ms, {flops / (bench_ms * 1e-3) / 1e12:.1f} "
          "TFLOP/s")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(BREAKDOWN_CALLS):
            call()
        torch.cuda.synchronize()
    kernel_ms = 0.0
    for item in sorted(prof.key_averages(), key=lambda item: -item.device_time_total):
        if item.device_time_total <= 0:
            continue
        per_call_ms = item.device_time_total / BREAKDOWN_CALLS / 1e3
        kernel_ms += per_call_ms
        print(f"  {per_call_ms:8.4f} ms per call, {item.count / BREAKDOWN_CALLS:g} per call: "
              f"{item.key[:100]}")
    print(f"GPU kernels per call: {kernel_ms:.3f} ms ({flops / (kernel_ms * 1e-3) / 1e12:.1f} "
          f"TFLOP/s); the rest of do_bench's median: {bench_ms - kernel_ms:+.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
