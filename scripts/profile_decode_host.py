"""Where the host time of eager flash_attn_with_kvcache calls goes (needs a GPU):

    python scripts/profile_decode_host.py --batch 64 --length 2048 [--page-size 16]

Builds one row of benchmarks/bench_decode.py, prints the host time per call (the loop of
--calls calls, before and after waiting for the GPU: when the two agree the calls are
host-bound) and then cProfile's top functions over the same number of calls (cProfile roughly
doubles the time of Python code; compare its shares, not its totals, with the first line).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import make_call  # noqa: E402
from flash_varlen import flash_attn_with_kvcache  # noqa: E402

WARMUP_CALLS = 20
PROFILE_ROWS = 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=2048, help="cached keys per request")
    parser.add_argument("--page-size", type=int, default=None,
                        help="paged cache (default: contiguous)")
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode_host.py: needs a CUDA GPU", file=sys.stderr)
        return 2

    call = make_call(args.batch, args.length, args.page_size, seqlen_q=1)
    for _ in range(WARMUP_CALLS):
        flash_attn_with_kvcache(**call)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        flash_attn_with_kvcache(**call)
    host = (time.perf_counter() - start) / args.calls
    torch.cuda.synchronize()
    drained = (time.perf_counter() - start) / args.calls
    print(f"us per call: {host * 1e6:.1f} issued, {drained * 1e6:.1f} with the GPU drained")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        flash_attn_with_kvcache(**call)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(PROFILE_ROWS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
