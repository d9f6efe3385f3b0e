"""A few forward calls of one targets.md workload, for a profiler to pick one from (needs a GPU):

    ncu --clock-control none --kernel-name regex:flash_fwd_kernel --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        python3 scripts/profile_forward.py --workload equal2k --layout mha

(`--clock-control none`: the device README asks that the clocks be left alone.) The calls are
the benchmark's (benchmarks/workloads.py: the same lengths, heads and dtype);
FLASH_VARLEN_KERNEL_FAMILY picks the family as everywhere else. Prints the median time of the calls, so that a run without a
profiler says what one call costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import HEAD_LAYOUTS, WORKLOAD_NAMES, make_workload  # noqa: E402
from flash_varlen import flash_attn_varlen_func  # noqa: E402

DTYPE = torch.bfloat16
# The profiler skips the first calls (warm-up: the extension loads, caches fill) and takes one.
DEFAULT_CALLS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, default="equal2k")
    parser.add_argument("--layout", choices=sorted(HEAD_LAYOUTS), default="mha")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_forward.py: needs a CUDA GPU", file=sys.stderr)
        return 2

    workload = make_workload(args.workload)
    layout = HEAD_LAYOUTS[args.layout]
    total = workload.total_tokens
    q = torch.randn(total, layout.nheads_q, layout.head_dim, device="cuda", dtype=DTYPE)
    k = torch.randn(total, layout.nheads_kv, layout.head_dim, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    cu_seqlens = workload.cu_seqlens("cuda")
    times = []
    for _ in range(args.calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, workload.max_seqlen,
                               workload.max_seqlen, causal=args.causal)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = sorted(times)[len(times) // 2]
    tflops = workload.forward_flops(layout, args.causal) / (median * 1e-3) / 1e12
    print(f"{args.workload} {args.layout} causal={args.causal}: median {median:.3f} ms over "
          f"{args.calls} calls, {tflops:.1f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
