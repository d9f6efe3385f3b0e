"""Small forward calls whose tiles hang past the ends of their tensors, meant to run under
compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/memcheck_forward.py

On a Hopper GPU the sm90 family runs them (TMA loads of whole tiles, warp specialization, named
barriers; the query heads of a GQA group share a tile), elsewhere the sm80 family;
FLASH_VARLEN_KERNEL_FAMILY forces one.

The kernels never read rows past a sequence's end or columns past the head dim (the sm80
family issues those copies with a zero source size; the sm90 family's TMA boxes stop at the
buffer's end). Each tensor here is allocated exactly,
with lengths and head dims that are not tile multiples, so any stray access leaves the
allocation and the sanitizer reports it. Exits non-zero if an output is wrong or not finite.
A case whose kernel a narrowed build lacks (FLASH_VARLEN_HEAD_DIMS and the like) is skipped and
counted; the script fails if it skipped every case. `--cases 0,3-5` runs only those entries of
CASES (scripts/sanitizer_cases.py: racecheck over every case outlasts one device call).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_varlen import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flash_varlen.reference import attention_ref_varlen  # noqa: E402
from sanitizer_cases import selected_cases  # noqa: E402

# (seqlens_q, seqlens_k, nheads, nheads_k, head_dim): tails of every size, empty sequences, and
# a head dim below its bucket so the column predicate is exercised.
CASES = [
    ([1, 70, 0, 129], [65, 3, 9, 0], 2, 1, 72),
    ([200], [131], 3, 3, 40),
    ([5, 77], [300, 1], 4, 2, 256),
    ([130, 1, 64], [257, 77, 0], 2, 2, 128),
    ([193, 7], [129, 450], 3, 1, 64),
    # Large GQA groups: packed tiles of 16 tokens of 8 heads (d128), 6 tokens of 32 (d64), and
    # 25 tokens of 5 heads with 3 padding rows (d128).
    ([3, 40, 17], [50, 8, 0], 16, 2, 128),
    ([5, 33], [9, 70], 32, 1, 64),
    ([26, 51], [30, 120], 10, 2, 128),
]
# More tiles than a GPU has SMs, so that each thread block of a persistent grid (the sm90 family)
# runs several and reuses its Q buffer and K/V stages from one tile to the next; every seventh
# sequence has no key.
MANY_TILES_SEQUENCES = 160
MANY_TILES_LENGTHS = torch.randint(1, 260, (MANY_TILES_SEQUENCES,),
                                   generator=torch.Generator().manual_seed(0)).tolist()
CASES.append((MANY_TILES_LENGTHS,
              [0 if i % 7 == 0 else n for i, n in enumerate(MANY_TILES_LENGTHS)], 2, 1, 128))
TOLERANCE = 5e-2  # bf16 outputs of randn inputs; this script hunts memory errors, not ulps


def not_in_this_build(error: NotImplementedError) -> bool:
    """Whether the dispatcher refused the call because the build lacks its kernel."""
    return "not in this build" in str(error)


def run_case(seqlens_q: list[int], seqlens_k: list[int], nheads: int, nheads_k: int, d: int,
             causal: bool) -> bool:
    device = "cuda"
    cu_q = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(seqlens_q), nheads, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(sum(seqlens_k), nheads_k, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), causal=causal)
    ref, _ = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal)
    error = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    ok = bool(torch.isfinite(out).all()) and error < TOLERANCE
    print(f"{'ok ' if ok else 'BAD'} varlen q={seqlens_q} k={seqlens_k} d={d} causal={causal} err={error:.3g}")
    return ok


def run_fixed_length(head_dim: int, causal: bool) -> bool:
    q = torch.randn(2, 33, 2, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 17, 1, head_dim, device="cuda", dtype=torch.float16)
    out = flash_attn_func(q, k, k, causal=causal)
    ok = bool(torch.isfinite(out).all())
    print(f"{'ok ' if ok else 'BAD'} fixed-length q=2x33 k=2x17 d={head_dim} causal={causal}")
    return ok


def main() -> int:
    chosen = selected_cases(" ".join(__doc__.split("\n\n")[0].split()), len(CASES))
    torch.manual_seed(0)
    if chosen is None:
        calls = [(run_case, case) for case in CASES]
        calls += [(run_fixed_length, (head_dim,)) for head_dim in (64, 96, 128, 192, 256)]
    else:
        calls = [(run_case, CASES[index]) for index in chosen]
    ok, ran, skipped = True, 0, 0
    for run, args in calls:
        for causal in (False, True):
            try:
                ok &= run(*args, causal=causal)
                ran += 1
            except NotImplementedError as error:
                if not not_in_this_build(error):
                    raise
                skipped += 1
                print(f"skip {run.__name__} d={args[-1]} causal={causal}: kernel not in this build")
    torch.cuda.synchronize()
    ok &= ran > 0
    print(f"memcheck cases {'passed' if ok else 'FAILED'}: {ran} ran, {skipped} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
