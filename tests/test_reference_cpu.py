"""The PyTorch reference against dense math written independently here, on CPU.

The naive implementation below builds the mask matrix element by element from the rule
"query i sees key j iff j <= i + seqlen_k - seqlen_q", maps query heads to kv heads by
integer division, and normalizes each row over its visible keys only, all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from flash_varlen import reference

HEAD_DIM = 16


def naive_mask(seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    mask = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            mask[i, j] = (not causal) or j <= i + seqlen_k - seqlen_q
    return mask


def naive_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (sq, h, d), k/v (sk, hk, d) -> out (sq, h, d) float64, lse (h, sq) float64."""
    seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k, _ = k.shape
    q, k, v = q.double(), k.double(), v.double()
    mask = naive_mask(seqlen_q, seqlen_k, causal)
    out = torch.zeros(seqlen_q, nheads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((nheads, seqlen_q), -math.inf, dtype=torch.float64)
    for h in range(nheads):
        kv_head = h // (nheads // nheads_k)
        scores = scale * q[:, h] @ k[:, kv_head].T  # (sq, sk)
        for i in range(seqlen_q):
            keys = mask[i].nonzero().flatten()
            if keys.numel() == 0:
                continue
            row = scores[i, keys]
            row_max = row.max()
            weights = torch.exp(row - row_max)
            total = weights.sum()
            out[i, h] = (weights / total) @ v[keys, kv_head]
            lse[h, i] = row_max + torch.log(total)
    return out, lse


def naive_varlen(q, k, v, cu_q, cu_k, scale, causal):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        out_b, lse_b = naive_sequence(
            q[cu_q[b] : cu_q[b + 1]],
            k[cu_k[b] : cu_k[b + 1]],
            v[cu_k[b] : cu_k[b + 1]],
            scale,
            causal,
        )
        outs.append(out_b)
        lses.append(lse_b)
    return torch.cat(outs), torch.cat(lses, dim=1)


def make_varlen(seqlens_q, seqlens_k, nheads=4, nheads_k=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)
    q = torch.randn(total_q, nheads, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(total_k, nheads_k, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(total_k, nheads_k, HEAD_DIM, generator=g).to(dtype)
    cu_q = [0]
    cu_k = [0]
    for sq, sk in zip(seqlens_q, seqlens_k):
        cu_q.append(cu_q[-1] + sq)
        cu_k.append(cu_k[-1] + sk)
    return q, k, v, cu_q, cu_k


def as_cu(bounds: list[int]) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


# Lengths mixing seqlen_q < seqlen_k, seqlen_q > seqlen_k, equal, and empty q, k or both.
SEQLENS_Q = [3, 7, 5, 0, 4, 0, 1, 6]
SEQLENS_K = [6, 2, 5, 3, 0, 0, 1, 9]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_naive_float64(causal: bool) -> None:
    q, k, v, cu_q, cu_k = make_varlen(SEQLENS_Q, SEQLENS_K)
    scale = 0.3
    out, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), scale, causal, compute_dtype=torch.float64
    )
    expected_out, expected_lse = naive_varlen(q, k, v, cu_q, cu_k, scale, causal)
    assert out.dtype == torch.float64
    assert out.shape == (sum(SEQLENS_Q), 4, HEAD_DIM)
    assert lse.dtype == torch.float32
    assert lse.shape == (4, sum(SEQLENS_Q))
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nheads_k", [1, 2, 8])  # MQA, GQA, MHA
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads(nheads_k: int, causal: bool) -> None:
    seqlens_q, seqlens_k = [5, 3, 8], [4, 7, 8]
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k, nheads=8, nheads_k=nheads_k)
    out, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), causal=causal, compute_dtype=torch.float64
    )
    expected_out, expected_lse = naive_varlen(
        q, k, v, cu_q, cu_k, 1 / math.sqrt(HEAD_DIM), causal
    )
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)


def test_gqa_head_mapping_uses_consecutive_groups() -> None:
    """Query heads 0..3 must use kv head 0 and 4..7 kv head 1 (not a round-robin mapping)."""
    q, k, v, cu_q, cu_k = make_varlen([4], [5], nheads=8, nheads_k=2)
    out, _ = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k))
    for h in range(8):
        single, _ = reference.attention_ref_varlen(
            q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1],
            as_cu(cu_q), as_cu(cu_k),
        )
        torch.testing.assert_close(out[:, h : h + 1], single)


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "expected"),
    [
        (2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]),
        (3, 3, [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
    ],
)
def test_causal_mask_is_bottom_right_aligned(seqlen_q, seqlen_k, expected) -> None:
    """The diagrams of the docstrings, checked literally."""
    mask = reference.visible_keys(seqlen_q, seqlen_k, causal=True)
    assert mask.tolist() == [[bool(x) for x in row] for row in expected]


def test_fully_masked_rows_give_zero_and_minus_inf() -> None:
    """seqlen_q = 5 > seqlen_k = 2 with causal: rows 0..2 see no key."""
    q, k, v, cu_q, cu_k = make_varlen([5], [2])
    out, lse = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k), causal=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.all(lse[:, :3] == -math.inf)
    assert torch.all(torch.isfinite(out[3:])) and torch.all(torch.isfinite(lse[:, 3:]))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_empty_sequences() -> None:
    """Empty q (nothing to write), empty k (zeros, -inf) and both empty, among normal ones."""
    seqlens_q, seqlens_k = [3, 0, 4, 0, 2], [2, 5, 0, 0, 3]
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k)
    out, lse = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k))
    empty_k_rows = slice(cu_q[2], cu_q[3])  # sequence 2 has 4 queries and no key
    assert torch.equal(out[empty_k_rows], torch.zeros_like(out[empty_k_rows]))
    assert torch.all(lse[:, empty_k_rows] == -math.inf)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    expected_out, _ = naive_varlen(q, k, v, cu_q, cu_k, 1 / math.sqrt(HEAD_DIM), False)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)


def test_all_sequences_empty() -> None:
    q, k, v, cu_q, cu_k = make_varlen([0, 0], [0, 0])
    out, lse = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k), causal=True)
    assert out.shape == (0, 4, HEAD_DIM) and lse.shape == (4, 0)


def test_lse_matches_torch_logsumexp() -> None:
    q, k, v, cu_q, cu_k = make_varlen([6], [9], nheads=2, nheads_k=2)
    scale = 0.7
    _, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), scale, compute_dtype=torch.float64
    )
    scores = scale * torch.einsum("qhd,khd->hqk", q.double(), k.double())
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=1e-6, atol=0)


def test_large_scores_do_not_overflow() -> None:
    """Scores near 1e4 would overflow exp() without the max shift."""
    q, k, v, cu_q, cu_k = make_varlen([4], [6])
    out, lse = reference.attention_ref_varlen(q * 100, k * 100, v, as_cu(cu_q), as_cu(cu_k), 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expected_out, expected_lse = naive_varlen(q * 100, k * 100, v, cu_q, cu_k, 1.0, False)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=0)


def test_default_softmax_scale_is_inverse_sqrt_head_dim() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 3], [4, 6])
    default, _ = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k))
    explicit, _ = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), 1 / math.sqrt(HEAD_DIM)
    )
    other, _ = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k), 1.0)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, other)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(5, 5), (3, 7), (7, 3)])
def test_fixed_length_matches_varlen(causal: bool, seqlen_q: int, seqlen_k: int) -> None:
    batch, nheads, nheads_k = 3, 4, 2
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, seqlen_q, nheads, HEAD_DIM, generator=g)
    k = torch.randn(batch, seqlen_k, nheads_k, HEAD_DIM, generator=g)
    v = torch.randn(batch, seqlen_k, nheads_k, HEAD_DIM, generator=g)
    out, lse = reference.attention_ref(q, k, v, causal=causal)
    assert out.shape == (batch, seqlen_q, nheads, HEAD_DIM)
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32

    cu_q = torch.arange(0, batch + 1, dtype=torch.int32) * seqlen_q
    cu_k = torch.arange(0, batch + 1, dtype=torch.int32) * seqlen_k
    out_varlen, lse_varlen = reference.attention_ref_varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, causal=causal
    )
    torch.testing.assert_close(out.flatten(0, 1), out_varlen, rtol=0, atol=0)
    # varlen lse (nheads, batch * seqlen_q) vs fixed (batch, nheads, seqlen_q)
    torch.testing.assert_close(lse.transpose(0, 1).flatten(1), lse_varlen, rtol=0, atol=0)


def test_input_dtype_is_cast_to_compute_dtype() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 4], [3, 6], dtype=torch.float16)
    out, lse = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    expected_out, _ = naive_varlen(q, k, v, cu_q, cu_k, 1 / math.sqrt(HEAD_DIM), False)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)


# Measured on these inputs: float32 errs by ~3e-7; float16 by 1.3e-3 (out) and 2.6e-3 (lse);
# bfloat16 by 1.2e-2 (out) and 2.3e-2 (lse), i.e. 1-3 epsilons of the dtype at the values'
# magnitude (|out| ~ 1, |lse| ~ 5). The bounds allow 4 epsilons at that magnitude.
ALLOWED_EPSILONS = 4
FLOAT32_BOUND = 1e-5


@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_error_is_larger_than_float32_but_bounded(compute_dtype, causal) -> None:
    seqlens_q, seqlens_k = [17, 9, 24], [20, 9, 13]
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k, seed=3)
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))  # inputs exactly representable
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    exact, exact_lse = reference.attention_ref_varlen(
        *args, causal=causal, compute_dtype=torch.float64
    )
    fp32, _ = reference.attention_ref_varlen(*args, causal=causal, compute_dtype=torch.float32)
    low, low_lse = reference.attention_ref_varlen(*args, causal=causal, compute_dtype=compute_dtype)

    assert low.dtype == compute_dtype
    assert low_lse.dtype == torch.float32
    eps = torch.finfo(compute_dtype).eps
    err_fp32 = (fp32.double() - exact).abs().max().item()
    err_low = (low.double() - exact).abs().max().item()
    assert err_fp32 < FLOAT32_BOUND
    assert err_fp32 < err_low < ALLOWED_EPSILONS * eps * exact.abs().max().item()
    finite = torch.isfinite(exact_lse)
    assert torch.equal(finite, torch.isfinite(low_lse))
    exact_lse, low_lse = exact_lse[finite].double(), low_lse[finite].double()
    lse_err = (low_lse - exact_lse).abs().max().item()
    assert lse_err < ALLOWED_EPSILONS * eps * exact_lse.abs().max().item()


def test_reference_accepts_int64_cu_seqlens() -> None:
    """The reference reads cu_seqlens on the host, so int64 (e.g. from torch.cumsum) works."""
    q, k, v, cu_q, cu_k = make_varlen([2, 5], [3, 4])
    out32, _ = reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k))
    out64, _ = reference.attention_ref_varlen(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k))
    torch.testing.assert_close(out32, out64, rtol=0, atol=0)


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu() -> None:
    q, k, v, cu_q, cu_k = make_varlen(SEQLENS_Q, SEQLENS_K)
    cpu_out, cpu_lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), causal=True
    )
    cuda_args = [x.cuda() for x in (q, k, v, as_cu(cu_q), as_cu(cu_k))]
    gpu_out, gpu_lse = reference.attention_ref_varlen(*cuda_args, causal=True)
    assert gpu_out.is_cuda and gpu_lse.is_cuda
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu_lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-5)
