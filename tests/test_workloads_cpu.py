"""The benchmark workloads are exactly those of targets.md, and the FLOP count is right (CPU)."""

import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is not installed with the package: import it from the source tree.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from benchmarks.workloads import (  # noqa: E402
    HEAD_LAYOUTS,
    TOTAL_TOKENS,
    WORKLOAD_NAMES,
    backward_flops,
    forward_flops,
    make_workload,
)

# What seed 0 gives, recorded once: a change here means benchmark numbers no longer compare.
EXPECTED_NUM_SEQUENCES = {"docs": 26, "short": 115, "equal2k": 16}
EXPECTED_DOCS_PREFIX = (4192, 669, 101, 1585, 303)
EXPECTED_DOCS_LAST = 2409  # cut so the total is exact
EXPECTED_SHORT_LAST = 246


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_total_is_exact_and_cu_seqlens_match(name: str) -> None:
    workload = make_workload(name)
    assert sum(workload.lengths) == TOTAL_TOKENS == 32_768
    cu_seqlens = workload.cu_seqlens()
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.shape == (workload.num_sequences + 1,)
    assert cu_seqlens[0].item() == 0 and cu_seqlens[-1].item() == TOTAL_TOKENS
    assert torch.equal(cu_seqlens.diff(), torch.tensor(workload.lengths, dtype=torch.int32))
    assert workload.max_seqlen == max(workload.lengths)


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_number_of_sequences(name: str) -> None:
    assert make_workload(name).num_sequences == EXPECTED_NUM_SEQUENCES[name]


def test_docs_lengths() -> None:
    lengths = make_workload("docs").lengths
    assert lengths[: len(EXPECTED_DOCS_PREFIX)] == EXPECTED_DOCS_PREFIX
    assert lengths[-1] == EXPECTED_DOCS_LAST
    # Every drawn length is within the clip bounds; the cut last one only gets shorter.
    assert all(32 <= s <= 8192 for s in lengths[:-1])
    assert 1 <= lengths[-1] <= 8192


def test_short_lengths() -> None:
    lengths = make_workload("short").lengths
    assert all(64 <= s <= 512 for s in lengths[:-1])
    assert lengths[-1] == EXPECTED_SHORT_LAST
    # Uniform in [64, 512]: both ends are reachable and the mean is near 288.
    assert min(lengths[:-1]) < 80 and max(lengths) > 490
    assert 260 < sum(lengths) / len(lengths) < 320


def test_equal2k_lengths() -> None:
    assert make_workload("equal2k").lengths == (2048,) * 16


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_deterministic(name: str) -> None:
    # A global RNG state change must not matter: lengths use their own seeded generator.
    first = make_workload(name)
    torch.manual_seed(12345)
    torch.rand(100)
    assert make_workload(name) == first


def test_unknown_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("long")


def test_forward_flops_hand_computed() -> None:
    # Sequences of 3 and 2 tokens, 2 query heads, d = 4.
    # Full: pairs 9 + 4 = 13 -> 4 * 4 * 2 * 13 = 416.
    # Causal: pairs 6 + 3 = 9 -> 4 * 4 * 2 * 9 = 288.
    assert forward_flops((3, 2), nheads_q=2, head_dim=4, causal=False) == 416
    assert forward_flops((3, 2), nheads_q=2, head_dim=4, causal=True) == 288
    assert backward_flops((3, 2), nheads_q=2, head_dim=4, causal=True) == 720.0


def test_workload_flops_use_query_heads() -> None:
    # GQA counts query heads: 32 query heads do twice the work of 16, kv heads do not matter.
    workload = make_workload("equal2k")
    mha = workload.forward_flops(HEAD_LAYOUTS["mha"], causal=False)
    gqa = workload.forward_flops(HEAD_LAYOUTS["gqa"], causal=False)
    assert mha == 4 * 128 * 16 * 16 * 2048 * 2048
    assert gqa == 2 * mha
    causal = workload.forward_flops(HEAD_LAYOUTS["mha"], causal=True)
    assert causal == 4 * 128 * 16 * 16 * (2048 * 2049 // 2)
