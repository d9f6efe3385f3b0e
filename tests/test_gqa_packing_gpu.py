"""GPU tests of GQA packing: the sm90 forward puts the G query heads that share a key/value head
into one tile, kBlockM / G tokens of each, token-major (csrc/kernels/sm90/query_rows.h).

The accuracy matrices of test_forward_gpu.py and test_variants_gpu.py run groups of 3 and 6
heads; these cases add the groups where a tile holds few tokens of each head (G = 8: 16 tokens
of 128-row tiles, 24 of the 192-row tiles of d64; G = 32: 4 and 6 tokens; G = 128: one token, its
rows spread over both consumer warpgroups), a group that leaves padding rows (G = 5:
128 = 5 * 25 + 3), and lengths on both sides of those token counts, with every mask kind,
per-head sinks (each row of a packed tile has its own head's sink) and seqused. Each case is the
harness's forward and backward against flash_varlen.reference (tests/variant_harness.py); on
GPUs without the sm90 family the same calls test the sm80 one.
"""

from __future__ import annotations

import pytest
import torch

from flash_varlen.reference import TOP_LEFT

from accuracy import (
    dtype_name,
    make_fixed_batch,
    make_varlen_batch,
    require_backward_kernel,
    varlen_from_fixed,
)
from variant_harness import DEVICE, RANDOM_SINKS, Variant, build_case, check_case, run_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (nheads, nheads_k): query heads per key/value head 8, 32 (MQA), 5 and 128 (MQA).
LAYOUTS = {"group8": (16, 2), "group32": (32, 1), "group5": (10, 2), "group128": (128, 1)}
# Lengths around the tokens per head of a packed tile (4, 5, 6, 16, 24, 25, ...), one of several
# tiles, single rows and keys, and empty sequences on either side.
SEQLENS_Q = (1, 4, 5, 6, 15, 16, 17, 24, 25, 49, 130, 0, 3)
SEQLENS_K = (1, 9, 5, 6, 40, 16, 3, 24, 70, 49, 130, 7, 0)
# Used lengths for the seqused variant: shorter than the slot, equal, or 0.
SEQUSED_Q = (1, 2, 5, 0, 15, 9, 17, 20, 25, 33, 100, 0, 1)
SEQUSED_K = (1, 9, 3, 6, 0, 16, 3, 24, 61, 49, 129, 7, 0)
VARIANTS = {
    "full": Variant(),
    "causal": Variant(causal=True),
    "causal_top_left": Variant(causal=True, causal_alignment=TOP_LEFT),
    "window": Variant(window_size=(20, 3)),
    "causal_sinks": Variant(causal=True, sinks=RANDOM_SINKS),
    "seqused": Variant(seqused=True),
}
HEAD_DIMS = (64, 128)  # 192-row and 128-row tiles
FIXED_SEQLEN_PAIRS = ((17, 40), (49, 49))
FIXED_BATCH = 2


def _params(with_variants: bool) -> list:
    cases = []
    for layout in LAYOUTS:
        for head_dim in HEAD_DIMS:
            for variant in VARIANTS if with_variants else ("full", "causal"):
                case_id = f"{layout}-d{head_dim}-{variant}"
                cases.append(pytest.param(layout, head_dim, variant, id=case_id))
    return cases


@pytest.mark.parametrize("layout, head_dim, variant", _params(with_variants=True))
def test_packed_groups_varlen(layout: str, head_dim: int, variant: str) -> None:
    dtype = torch.bfloat16
    require_backward_kernel(dtype, head_dim)
    nheads, nheads_k = LAYOUTS[layout]
    batch = make_varlen_batch(SEQLENS_Q, SEQLENS_K, nheads, nheads_k, head_dim, dtype, DEVICE)
    case = build_case(batch, VARIANTS[variant], seqused=(SEQUSED_Q, SEQUSED_K))
    check_case(case, run_kernel(case), f"flash_attn_varlen_func {layout} d{head_dim} {variant}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("seqlens", FIXED_SEQLEN_PAIRS, ids=lambda pair: f"{pair[0]}x{pair[1]}")
@pytest.mark.parametrize("layout, head_dim, variant", _params(with_variants=False))
def test_packed_groups_fixed_length(
    layout: str, head_dim: int, variant: str, seqlens: tuple[int, int], dtype: torch.dtype
) -> None:
    require_backward_kernel(dtype, head_dim)
    nheads, nheads_k = LAYOUTS[layout]
    q, k, v = make_fixed_batch(FIXED_BATCH, *seqlens, nheads, nheads_k, head_dim, dtype, DEVICE)
    case = build_case(varlen_from_fixed(q, k, v), VARIANTS[variant], fixed=True)
    check_case(case, run_kernel(case), f"flash_attn_func {layout} d{head_dim} {variant}")
