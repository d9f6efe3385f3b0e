"""A load-balance model of the sm90 backward's key-block tiles (no GPU needed).

Each tile (one key block of one key/value head of one sequence) costs its steps (the query row
blocks it visits times the query heads of its group) plus a fixed overhead; the tiles go, in a
given order, to whichever of the GPU's SMs frees first (one tile per SM at a time: the hardware's
block scheduler for main's grid, the tile counter for the persistent grid). Prints, for the
targets.md workloads, each order's efficiency: the total steps over (SMs x makespan), 1.0 being
perfect balance with no overhead (the per-tile overhead counts as lost time, alike in every
order). The orders:

- main: main's launch grid (key blocks, key/value heads, sequences), key blocks fastest;
- grid: the persistent branch's grid order (key blocks, sequences, heads), heads slowest;
- schedule: the varlen schedule's (sequences by decreasing work class, then heads, then key
  blocks ascending);
- schedule_keys_outer: the same with the heads inside the key blocks.

With --claim-ahead k each SM of the persistent orders claims tiles k ahead of the one it
computes (makespan's docstring; main's launch keeps no reserve). It models balance only: not memory traffic, L2 reuse or the cost of a step, which do differ
between orders. python3 scripts/model_bwd_tile_orders.py [--sms 132] [--overhead 1.0] [--claim-ahead 0]
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import make_workload

ROWS_PER_STEP = 64  # the sm90 backward's query rows per step (bwd_kernel_traits.h, d = 128)
KEYS_PER_TILE = 128
# (name, key/value heads, query heads per key/value head): targets.md's MHA 16 x 128, GQA 32/8.
LAYOUTS = (("mha", 16, 1), ("gqa", 8, 4))
# A grid index past its sequence's keys: the block exits (main) or the producer skips it.
EMPTY_TILE_COST = 0.05


def tile_steps(length: int, key_block: int, group: int, causal: bool) -> int:
    """Steps of one tile (bottom-right causal with seqlen_q == seqlen_k: the diagonal's row
    block first)."""
    row_blocks = -(-length // ROWS_PER_STEP)
    first = key_block * KEYS_PER_TILE // ROWS_PER_STEP if causal else 0
    return group * max(row_blocks - first, 0)


def makespan(costs: list[float], sms: int, claim_ahead: int) -> float:
    """List scheduling in the given order. claim_ahead = 0: each tile goes to the SM that frees
    first (greedy). claim_ahead = k: an SM claims the next tile of the order as it starts one,
    so it holds k tiles in reserve behind the one it computes (a producer that draws its next
    index before issuing the current tile's loads holds one)."""
    order = iter(costs)
    running = []  # (end time, SM)
    for sm in range(sms):  # the first tile of block i is index i
        first = next(order, None)
        if first is not None:
            heapq.heappush(running, (first, sm))
    reserves = [
        [c for c in (next(order, None) for _ in range(claim_ahead)) if c is not None]
        for _ in range(sms)
    ]
    end = 0.0
    while running:
        now, sm = heapq.heappop(running)
        end = max(end, now)
        claimed = next(order, None)
        if claimed is not None:
            reserves[sm].append(claimed)
        if reserves[sm]:
            heapq.heappush(running, (now + reserves[sm].pop(0), sm))
    return end


def orders(lengths: tuple[int, ...], heads_k: int, group: int, causal: bool, overhead: float):
    key_blocks = -(-max(lengths) // KEYS_PER_TILE)
    batch = len(lengths)

    def cost(b: int, n: int) -> float:
        if n * KEYS_PER_TILE >= lengths[b]:
            return EMPTY_TILE_COST
        return tile_steps(lengths[b], n, group, causal) + overhead

    def blocks(b: int) -> range:
        return range(-(-lengths[b] // KEYS_PER_TILE))

    # Work classes as the schedule's prepare kernel forms them: bit length of rows x keys.
    by_work = sorted(range(batch), key=lambda b: -(lengths[b] ** 2).bit_length())
    return {
        "main": [cost(b, n) for b in range(batch) for _ in range(heads_k) for n in range(key_blocks)],
        "grid": [cost(b, n) for _ in range(heads_k) for b in range(batch) for n in range(key_blocks)],
        "schedule": [cost(b, n) for b in by_work for _ in range(heads_k) for n in blocks(b)],
        "schedule_keys_outer": [cost(b, n) for b in by_work for n in blocks(b) for _ in range(heads_k)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM and H200: 132)")
    parser.add_argument("--overhead", type=float, default=1.0, help="per-tile cost, in steps")
    parser.add_argument(
        "--claim-ahead", type=int, default=0, help="tiles an SM holds in reserve (makespan)"
    )
    args = parser.parse_args()

    def ahead(order_name: str) -> int:  # the hardware's block scheduler keeps no reserve
        return 0 if order_name == "main" else args.claim_ahead

    for workload in ("docs", "short"):
        lengths = make_workload(workload).lengths
        for layout, heads_k, group in LAYOUTS:
            for causal in (False, True):
                costs = orders(lengths, heads_k, group, causal, args.overhead)
                steps = sum(
                    tile_steps(length, n, group, causal) * heads_k
                    for length in lengths
                    for n in range(-(-length // KEYS_PER_TILE))
                )
                cells = ", ".join(
                    f"{name} {steps / (args.sms * makespan(order, args.sms, ahead(name))):.3f}"
                    for name, order in costs.items()
                )
                mask = "causal" if causal else "full"
                print(f"{workload}/{layout}/{mask}: {steps / args.sms:.0f} steps per SM; {cells}")


if __name__ == "__main__":
    main()
