"""The fixed benchmark workloads and the rule for counting their useful FLOPs.

Every number the project reports is measured on these workloads, so that results compare across
time: 32,768 packed tokens, seqlen_q == seqlen_k per sequence, sequence lengths drawn one after
another from a CPU generator seeded with 0, the last sequence cut so the total is exact (`skewed`
starts with one fixed long sequence and draws the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

TOTAL_TOKENS = 32_768
LENGTH_SEED = 0

# `docs`: log-normal document lengths, a realistic packed pre-training batch.
DOCS_LOG_MEAN = 6.8
DOCS_LOG_STD = 1.0
DOCS_MIN_LEN = 32
DOCS_MAX_LEN = 8192

# `short`: uniform lengths in [64, 512], fine-tuning / chat data.
SHORT_MIN_LEN = 64
SHORT_MAX_LEN = 512

# `equal2k`: the fixed-length case.
EQUAL_LEN = 2048

# `skewed`: one long document among many tiny ones (load balance is the problem): one sequence
# of SKEWED_LONG_LEN, then lengths uniform in [SKEWED_MIN_LEN, SKEWED_MAX_LEN] up to the total.
SKEWED_LONG_LEN = 16_384
SKEWED_MIN_LEN = 1
SKEWED_MAX_LEN = 128

# Two matrix products per (query, key) pair and head dim element (Q K^T and P V), two FLOPs
# (multiply and add) each.
FLOPS_PER_PAIR_AND_DIM = 4
# Backward is counted, by convention, as 2.5x the forward work (five matrix products vs two).
BACKWARD_FLOP_FACTOR = 2.5

WORKLOAD_NAMES = ("docs", "short", "equal2k", "skewed")


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of one benchmark row: nheads_q query heads share nheads_kv kv heads."""

    name: str
    nheads_q: int
    nheads_kv: int
    head_dim: int


HEAD_LAYOUTS = {
    "mha": HeadLayout("mha", nheads_q=16, nheads_kv=16, head_dim=128),
    "gqa": HeadLayout("gqa", nheads_q=32, nheads_kv=8, head_dim=128),
    # targets.md's other head dims, measured on docs and skewed only (TARGET_LAYOUT_WORKLOADS).
    "mha_32x64": HeadLayout("mha_32x64", nheads_q=32, nheads_kv=32, head_dim=64),
    "mha_8x256": HeadLayout("mha_8x256", nheads_q=8, nheads_kv=8, head_dim=256),
    # Not in targets.md: the other head-dim buckets, 16 heads each, run only when asked for.
    "mha_d64": HeadLayout("mha_d64", nheads_q=16, nheads_kv=16, head_dim=64),
    "mha_d96": HeadLayout("mha_d96", nheads_q=16, nheads_kv=16, head_dim=96),
    "mha_d192": HeadLayout("mha_d192", nheads_q=16, nheads_kv=16, head_dim=192),
    "mha_d256": HeadLayout("mha_d256", nheads_q=16, nheads_kv=16, head_dim=256),
}
# The head layouts of targets.md and the workloads it measures each on: the default rows.
TARGET_LAYOUT_WORKLOADS = {
    "mha": WORKLOAD_NAMES,
    "gqa": WORKLOAD_NAMES,
    "mha_32x64": ("docs", "skewed"),
    "mha_8x256": ("docs", "skewed"),
}


def layouts_for(workload: str, layouts: Sequence[str] | None) -> list[str]:
    """The head layouts to measure on `workload`: every one of `layouts` when the caller chose
    them, else (None) the layouts targets.md measures on that workload, in the order of
    TARGET_LAYOUT_WORKLOADS."""
    if layouts is not None:
        return list(layouts)
    return [name for name, on in TARGET_LAYOUT_WORKLOADS.items() if workload in on]


def unmasked_pairs(lengths: tuple[int, ...], causal: bool) -> int:
    """Number of (query, key) pairs that attention actually computes, summed over sequences.

    A sequence of length s has s*s pairs, or s*(s+1)/2 with causal masking (seqlen_q == seqlen_k,
    so every query i sees keys 0..i).
    """
    if causal:
        return sum(s * (s + 1) // 2 for s in lengths)
    return sum(s * s for s in lengths)


def forward_flops(lengths: tuple[int, ...], nheads_q: int, head_dim: int, causal: bool) -> int:
    """Useful forward FLOPs: 4 * head_dim * nheads_q * unmasked pairs (padding is never counted)."""
    return FLOPS_PER_PAIR_AND_DIM * head_dim * nheads_q * unmasked_pairs(lengths, causal)


def backward_flops(lengths: tuple[int, ...], nheads_q: int, head_dim: int, causal: bool) -> float:
    """Useful backward FLOPs: BACKWARD_FLOP_FACTOR times the forward count."""
    return BACKWARD_FLOP_FACTOR * forward_flops(lengths, nheads_q, head_dim, causal)


@dataclass(frozen=True)
class Workload:
    """A packed batch: sequence lengths (seqlen_q == seqlen_k) that sum to TOTAL_TOKENS."""

    name: str
    lengths: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Prefix sums of the lengths, int32, shape (num_sequences + 1,), starting at 0."""
        offsets = [0]
        for length in self.lengths:
            offsets.append(offsets[-1] + length)
        return torch.tensor(offsets, dtype=torch.int32, device=device)

    def forward_flops(self, layout: HeadLayout, causal: bool) -> int:
        return forward_flops(self.lengths, layout.nheads_q, layout.head_dim, causal)

    def backward_flops(self, layout: HeadLayout, causal: bool) -> float:
        return backward_flops(self.lengths, layout.nheads_q, layout.head_dim, causal)


def draw_lengths(draw_one: Callable[[torch.Generator], int], total: int) -> tuple[int, ...]:
    """Draws lengths one after another from one generator seeded with LENGTH_SEED until they
    reach `total`; the last length is cut so that the lengths sum to exactly `total`."""
    generator = torch.Generator().manual_seed(LENGTH_SEED)
    lengths: list[int] = []
    remaining = total
    while remaining > 0:
        length = min(draw_one(generator), remaining)
        lengths.append(length)
        remaining -= length
    return tuple(lengths)


def _draw_doc_length(generator: torch.Generator) -> int:
    normal = torch.randn(1, generator=generator)
    length = torch.exp(normal * DOCS_LOG_STD + DOCS_LOG_MEAN).clamp(DOCS_MIN_LEN, DOCS_MAX_LEN)
    return int(length.item())


def _uniform_length(low: int, high: int) -> Callable[[torch.Generator], int]:
    """One draw of a length uniform in [low, high], both included: torch.randint(low, high + 1,
    (1,), generator=g), as targets.md writes it (randint's upper bound is exclusive)."""

    def draw(generator: torch.Generator) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator).item())

    return draw


def make_workload(name: str) -> Workload:
    """Builds the workload `name` (one of WORKLOAD_NAMES); deterministic."""
    if name == "docs":
        return Workload(name, draw_lengths(_draw_doc_length, TOTAL_TOKENS))
    if name == "short":
        draw_short = _uniform_length(SHORT_MIN_LEN, SHORT_MAX_LEN)
        return Workload(name, draw_lengths(draw_short, TOTAL_TOKENS))
    if name == "equal2k":
        return Workload(name, (EQUAL_LEN,) * (TOTAL_TOKENS // EQUAL_LEN))
    if name == "skewed":
        # The long sequence is fixed, not drawn: the generator's first draw is the first tiny one.
        draw_tiny = _uniform_length(SKEWED_MIN_LEN, SKEWED_MAX_LEN)
        tiny = draw_lengths(draw_tiny, TOTAL_TOKENS - SKEWED_LONG_LEN)
        return Workload(name, (SKEWED_LONG_LEN, *tiny))
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOAD_NAMES}")
