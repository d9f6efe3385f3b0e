"""The PyTorch reference against dense math written independently here, on CPU.

The naive implementation below never calls the reference's mask, bias or softmax code. For
each sequence, head and query it loops over the keys one by one, decides visibility from the
rules as stated in the flash-attn documentation (window [i + sk - sq - left, i + sk - sq + right],
-1 unbounded, causal meaning right = 0, top-left alignment dropping the sk - sq shift), builds
each visible score with a dot product, soft-caps it with tanh, subtracts the ALiBi distance
penalty, and normalizes over the visible keys only, all in float64 and all with differentiable
torch operations, so its autograd gradients are a second, independent reference. With an
attention sink it normalizes the way gpt-oss's eager attention does: torch.softmax over the row
with the sink appended as one more logit, whose probability is then dropped.
"""

from __future__ import annotations

import math

import pytest
import torch

from flash_varlen import reference

HEAD_DIM = 16
KEEP_PROBABILITY = 0.7
"""Fraction of entries the random dropout keep masks keep."""


def naive_is_visible(
    i: int, j: int, seqlen_q: int, seqlen_k: int, causal: bool, window_size, top_left: bool
) -> bool:
    """flash-attn's documented rule: key j is visible iff it lies in
    [i + sk - sq - left, i + sk - sq + right] (i alone for top-left), -1 unbounded, causal
    meaning right = 0."""
    left, right = window_size
    if causal:
        right = 0
    aligned_key = i if top_left else i + seqlen_k - seqlen_q
    if right != -1 and j > aligned_key + right:
        return False
    if left != -1 and j < aligned_key - left:
        return False
    return True


def naive_mask(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size=(-1, -1), top_left: bool = False
) -> torch.Tensor:
    mask = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            mask[i, j] = naive_is_visible(i, j, seqlen_q, seqlen_k, causal, window_size, top_left)
    return mask


def naive_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    causal_alignment: str = "bottom_right",
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (sq, h, d), k/v (sk, hk, d) -> out (sq, h, d) float64, lse (h, sq) float64.

    alibi_slopes: (h,); dropout_mask: (h, >= sq, >= sk) bool keep mask; learnable_sink: (h,).
    """
    seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k, _ = k.shape
    q, k, v = q.double(), k.double(), v.double()
    top_left = causal_alignment == "top_left"
    out = torch.zeros(seqlen_q, nheads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((nheads, seqlen_q), -math.inf, dtype=torch.float64)
    for h in range(nheads):
        kv_head = h // (nheads // nheads_k)
        for i in range(seqlen_q):
            keys, scores = [], []
            for j in range(seqlen_k):
                if not naive_is_visible(i, j, seqlen_q, seqlen_k, causal, window_size, top_left):
                    continue
                score = scale * torch.dot(q[i, h], k[j, kv_head])
                if softcap > 0:
                    score = softcap * torch.tanh(score / softcap)
                if alibi_slopes is not None:
                    aligned_key = i if top_left else i + seqlen_k - seqlen_q
                    score = score - float(alibi_slopes[h]) * abs(aligned_key - j)
                keys.append(j)
                scores.append(score)
            if learnable_sink is not None:
                row = torch.stack([*scores, learnable_sink[h].double()])
                lse[h, i] = torch.logsumexp(row, dim=0)
                if not keys:  # the sink is the row's only logit: out stays 0
                    continue
                probs = torch.softmax(row, dim=0)[:-1]
            elif not keys:
                continue
            else:
                row = torch.stack(scores)
                row_max = row.max()
                weights = torch.exp(row - row_max)
                total = weights.sum()
                probs = weights / total
                lse[h, i] = row_max + torch.log(total)
            if dropout_mask is not None:
                keep = dropout_mask[h, i, keys].double()
                probs = probs * keep / (1.0 - dropout_p)
            out[i, h] = probs @ v[keys, kv_head]
    return out, lse


def naive_varlen(
    q, k, v, cu_q, cu_k, scale, causal, *, seqused_q=None, seqused_k=None, **options
):
    """Sequence by sequence over the first seqused (default: all) rows of each slot; other rows
    stay out = 0, lse = -inf. alibi_slopes may be (h,) or (batch, h); dropout_mask is padded
    (batch, h, >= max sq, >= max sk)."""
    slopes = options.pop("alibi_slopes", None)
    mask = options.pop("dropout_mask", None)
    nheads = q.shape[1]
    out = torch.zeros(q.shape[0], nheads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((nheads, q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        used_q = cu_q[b + 1] - cu_q[b] if seqused_q is None else int(seqused_q[b])
        used_k = cu_k[b + 1] - cu_k[b] if seqused_k is None else int(seqused_k[b])
        rows = slice(cu_q[b], cu_q[b] + used_q)
        keys = slice(cu_k[b], cu_k[b] + used_k)
        out[rows], lse[:, rows] = naive_sequence(
            q[rows],
            k[keys],
            v[keys],
            scale,
            causal,
            alibi_slopes=None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b]),
            dropout_mask=None if mask is None else mask[b],
            **options,
        )
    return out, lse


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


# ----------------------------------------------------------------------------------------------
# Attention variants: sliding window, softcap, ALiBi, dropout, seqused, causal alignment
# ----------------------------------------------------------------------------------------------

BOTTOM_RIGHT, TOP_LEFT = "bottom_right", "top_left"
SCALE = 0.3
DROPOUT_P = 0.3
MASK_PADDING = 3
"""Extra rows and columns in the padded dropout masks, like the rounded sizes of S_dmask."""


def random_slopes(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    """ALiBi slopes in [0.1, 0.6], float32 like flash-attn requires."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.5 * torch.rand(shape, generator=g)


def random_keep_mask(batch: int, nheads: int, rows: int, cols: int, seed: int = 6) -> torch.Tensor:
    """A padded (batch, nheads, rows, cols) bool keep mask keeping KEEP_PROBABILITY of entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, nheads, rows, cols, generator=g) < KEEP_PROBABILITY


def random_sink(nheads: int, seed: int = 11, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sink logits of standard deviation 2, the scale of the scores here: the sink takes a
    sizeable but not dominant share of each row."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(nheads, generator=g, dtype=dtype)


def variant_options(name: str, seqlens_q, seqlens_k, nheads: int) -> dict:
    """Keyword options of one named variant (or '+'-joined combination) for a varlen batch."""
    batch = len(seqlens_q)
    rows, cols = max(seqlens_q) + MASK_PADDING, max(seqlens_k) + MASK_PADDING
    single = {
        "window": {"window_size": (2, 1)},
        "left_window": {"window_size": (3, -1)},
        "softcap": {"softcap": 1.5},
        "alibi": {"alibi_slopes": random_slopes((nheads,))},
        "alibi_per_sequence": {"alibi_slopes": random_slopes((batch, nheads))},
        "dropout": {
            "dropout_p": DROPOUT_P,
            "dropout_mask": random_keep_mask(batch, nheads, rows, cols),
        },
        "top_left": {"causal_alignment": TOP_LEFT},
        "sink": {"learnable_sink": random_sink(nheads)},
    }
    options = {}
    for part in name.split("+"):
        options.update(single[part])
    return options


def assert_varlen_matches_naive(
    seqlens_q, seqlens_k, causal: bool, nheads: int = 4, nheads_k: int = 2, **options
) -> None:
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k, nheads=nheads, nheads_k=nheads_k)
    out, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), SCALE, causal, compute_dtype=torch.float64, **options
    )
    expected_out, expected_lse = naive_varlen(q, k, v, cu_q, cu_k, SCALE, causal, **options)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)


def pattern(*rows: str) -> list[list[bool]]:
    """'x' = visible, '.' = hidden, one string per query row."""
    return [[c == "x" for c in row] for row in rows]


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "causal", "window_size", "alignment", "expected"),
    [
        pytest.param(4, 4, False, (1, 0), BOTTOM_RIGHT,
                     pattern("x...", "xx..", ".xx.", "..xx"), id="left1-4x4"),
        pytest.param(4, 4, False, (0, 0), BOTTOM_RIGHT,
                     pattern("x...", ".x..", "..x.", "...x"), id="diagonal-only"),
        pytest.param(2, 5, False, (1, 1), BOTTOM_RIGHT,
                     pattern("..xxx", "...xx"), id="fewer-queries"),
        pytest.param(5, 3, False, (1, 1), BOTTOM_RIGHT,
                     pattern("...", "x..", "xx.", "xxx", ".xx"), id="more-queries"),
        pytest.param(3, 5, False, (0, 1), BOTTOM_RIGHT,
                     pattern("..xx.", "...xx", "....x"), id="right-only-past-end"),
        pytest.param(3, 3, False, (-1, 1), BOTTOM_RIGHT,
                     pattern("xx.", "xxx", "xxx"), id="unbounded-left"),
        pytest.param(4, 4, True, (2, 3), BOTTOM_RIGHT,
                     pattern("x...", "xx..", "xxx.", ".xxx"), id="causal-forces-right-0"),
        pytest.param(3, 5, True, (-1, -1), BOTTOM_RIGHT,
                     pattern("xxx..", "xxxx.", "xxxxx"), id="causal-bottom-right"),
        pytest.param(3, 5, True, (-1, -1), TOP_LEFT,
                     pattern("x....", "xx...", "xxx.."), id="causal-top-left"),
        pytest.param(3, 5, False, (1, 0), TOP_LEFT,
                     pattern("x....", "xx...", ".xx.."), id="window-top-left"),
    ],
)
def test_visible_key_patterns(seqlen_q, seqlen_k, causal, window_size, alignment, expected):
    """Hand-drawn patterns, including the two diagrams of the module docstring."""
    mask = reference.visible_keys(
        seqlen_q, seqlen_k, causal, window_size=window_size, causal_alignment=alignment
    )
    assert mask.tolist() == expected


WINDOWS = [(1, 0), (0, 0), (2, 3), (-1, 2), (3, -1), (-1, -1)]


@pytest.mark.parametrize("alignment", [BOTTOM_RIGHT, TOP_LEFT])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", WINDOWS)
def test_window_matches_naive(window_size, causal: bool, alignment: str) -> None:
    assert_varlen_matches_naive(
        SEQLENS_Q, SEQLENS_K, causal, window_size=window_size, causal_alignment=alignment
    )


@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(5, 5), (3, 7), (7, 3)])
def test_window_wider_than_sequences_is_no_window(seqlen_q: int, seqlen_k: int) -> None:
    q, k, v, cu_q, cu_k = make_varlen([seqlen_q], [seqlen_k])
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    wide = max(seqlen_q, seqlen_k)
    for causal in (False, True):
        plain = reference.attention_ref_varlen(*args, causal=causal)
        for window in [(wide, wide), (wide, -1), (-1, wide)]:
            windowed = reference.attention_ref_varlen(*args, causal=causal, window_size=window)
            torch.testing.assert_close(windowed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap_matches_naive(softcap: float, causal: bool) -> None:
    assert_varlen_matches_naive(SEQLENS_Q, SEQLENS_K, causal, softcap=softcap)


def test_huge_softcap_equals_no_softcap_and_small_one_differs() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 7], [6, 4])
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k), SCALE)
    plain, plain_lse = reference.attention_ref_varlen(*args, compute_dtype=torch.float64)
    # softcap * tanh(s / softcap) = s - s^3 / (3 softcap^2) + ...: ~1e-11 here.
    huge, huge_lse = reference.attention_ref_varlen(
        *args, compute_dtype=torch.float64, softcap=1e6
    )
    small, _ = reference.attention_ref_varlen(*args, compute_dtype=torch.float64, softcap=0.5)
    torch.testing.assert_close(huge, plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(huge_lse, plain_lse, rtol=0, atol=1e-6)
    assert (small - plain).abs().max() > 1e-2


SATURATING_SOFTCAP = 2.0
SATURATION_RATIO = 20.0
"""tanh(x) rounds to exactly +-1 in float64 once |x| > 19.1."""


def test_softcap_saturates_for_large_scores() -> None:
    """Huge scores are capped to +-softcap: out and lse are those of scores softcap * sign(s)."""
    q, k, v, cu_q, cu_k = make_varlen([4], [6], nheads=2, nheads_k=2, dtype=torch.float64)
    q, k = q * 300, k * 300
    raw = torch.einsum("qhd,khd->hqk", q, k)  # softmax_scale = 1 below
    assert raw.abs().min() > SATURATION_RATIO * SATURATING_SOFTCAP  # the premise of the test
    out, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), 1.0, compute_dtype=torch.float64,
        softcap=SATURATING_SOFTCAP,
    )
    capped = SATURATING_SOFTCAP * raw.sign()
    expected_out = torch.einsum("hqk,khd->qhd", torch.softmax(capped, dim=-1), v)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), torch.logsumexp(capped, dim=-1), rtol=0, atol=1e-6)
    assert (lse <= SATURATING_SOFTCAP + math.log(6) + 1e-6).all()


@pytest.mark.parametrize(
    ("alignment", "expected_head0"),
    [
        (BOTTOM_RIGHT, [[-1.0, -0.5, 0.0, -0.5], [-1.5, -1.0, -0.5, 0.0]]),
        (TOP_LEFT, [[0.0, -0.5, -1.0, -1.5], [-0.5, 0.0, -0.5, -1.0]]),
    ],
)
def test_alibi_bias_values(alignment: str, expected_head0) -> None:
    """-slope * |i + offset - j| for seqlen_q = 2, seqlen_k = 4, slopes (0.5, 2.0)."""
    bias = reference.alibi_bias(torch.tensor([0.5, 2.0]), 2, 4, alignment)
    assert bias.shape == (2, 2, 4) and bias.dtype == torch.float32
    expected = torch.tensor([expected_head0, [[4 * x for x in row] for row in expected_head0]])
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


@pytest.mark.parametrize("alignment", [BOTTOM_RIGHT, TOP_LEFT])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("slopes", ["alibi", "alibi_per_sequence"])
def test_alibi_matches_naive(slopes: str, causal: bool, alignment: str) -> None:
    """SEQLENS_Q/K contain sequences empty in q, in k and in both."""
    options = variant_options(slopes, SEQLENS_Q, SEQLENS_K, nheads=4)
    assert_varlen_matches_naive(
        SEQLENS_Q, SEQLENS_K, causal, causal_alignment=alignment, **options
    )


def test_alibi_changes_the_result() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5], [7])
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    plain, _ = reference.attention_ref_varlen(*args)
    biased, _ = reference.attention_ref_varlen(*args, alibi_slopes=random_slopes((4,)))
    assert (biased - plain).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_naive(causal: bool) -> None:
    options = variant_options("dropout", SEQLENS_Q, SEQLENS_K, nheads=4)
    assert_varlen_matches_naive(SEQLENS_Q, SEQLENS_K, causal, **options)


def test_dropout_with_zero_p_and_all_kept_equals_no_dropout() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 3], [4, 6])
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    plain = reference.attention_ref_varlen(*args, causal=True)
    all_kept = torch.ones(2, 4, 5, 6, dtype=torch.bool)
    dropped = reference.attention_ref_varlen(*args, causal=True, dropout_mask=all_kept)
    torch.testing.assert_close(dropped, plain, rtol=0, atol=0)


def test_dropout_rescales_kept_probabilities_and_keeps_lse() -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 3], [4, 6])
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    plain, plain_lse = reference.attention_ref_varlen(*args)
    all_kept = torch.ones(2, 4, 5, 6, dtype=torch.bool)
    half, half_lse = reference.attention_ref_varlen(*args, dropout_p=0.5, dropout_mask=all_kept)
    torch.testing.assert_close(half, 2 * plain, rtol=1e-6, atol=1e-6)
    some_dropped = random_keep_mask(2, 4, 5, 6)
    _, dropped_lse = reference.attention_ref_varlen(
        *args, dropout_p=DROPOUT_P, dropout_mask=some_dropped
    )
    torch.testing.assert_close(half_lse, plain_lse, rtol=0, atol=0)
    torch.testing.assert_close(dropped_lse, plain_lse, rtol=0, atol=0)


def test_dropout_mask_entries_outside_each_sequence_are_ignored() -> None:
    """Only mask[b, :, :seqlen_q[b], :seqlen_k[b]] matters: flipping the rest changes nothing."""
    seqlens_q, seqlens_k = [5, 2, 0], [3, 6, 4]
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k)
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    mask = random_keep_mask(3, 4, 5 + MASK_PADDING, 6 + MASK_PADDING)
    flipped = ~mask
    for b, (sq, sk) in enumerate(zip(seqlens_q, seqlens_k)):
        flipped[b, :, :sq, :sk] = mask[b, :, :sq, :sk]
    out = reference.attention_ref_varlen(*args, dropout_p=DROPOUT_P, dropout_mask=mask)
    out_flipped = reference.attention_ref_varlen(*args, dropout_p=DROPOUT_P, dropout_mask=flipped)
    torch.testing.assert_close(out_flipped, out, rtol=0, atol=0)


def test_dropout_keep_mask_reads_the_sign_bit_of_s_dmask() -> None:
    s_dmask = torch.tensor([0.25, -0.25, 0.0, -0.0, 1.0, -1e-30])
    assert reference.dropout_keep_mask(s_dmask).tolist() == [
        True, False, True, False, True, False
    ]


@pytest.mark.parametrize(
    "variant", ["", "window+alibi_per_sequence+dropout+softcap", "window+dropout+sink"]
)
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_equals_truncated_sequences(causal: bool, variant: str) -> None:
    """Running on the first seqused rows of each slot is running on truncated sequences."""
    seqused_q = [2, 7, 0, 0, 3, 0, 1, 4]  # slots SEQLENS_Q = [3, 7, 5, 0, 4, 0, 1, 6]
    seqused_k = [6, 1, 5, 0, 0, 0, 0, 5]  # slots SEQLENS_K = [6, 2, 5, 3, 0, 0, 1, 9]
    options = variant_options(variant, SEQLENS_Q, SEQLENS_K, nheads=4) if variant else {}
    q, k, v, cu_q, cu_k = make_varlen(SEQLENS_Q, SEQLENS_K)
    out, lse = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), causal=causal,
        seqused_q=torch.tensor(seqused_q, dtype=torch.int32),
        seqused_k=torch.tensor(seqused_k, dtype=torch.int32), **options,
    )
    q_rows = torch.cat([torch.arange(cu_q[b], cu_q[b] + n) for b, n in enumerate(seqused_q)])
    k_rows = torch.cat([torch.arange(cu_k[b], cu_k[b] + n) for b, n in enumerate(seqused_k)])
    truncated_out, truncated_lse = reference.attention_ref_varlen(
        q[q_rows], k[k_rows], v[k_rows],
        as_cu([0, *torch.tensor(seqused_q).cumsum(0).tolist()]),
        as_cu([0, *torch.tensor(seqused_k).cumsum(0).tolist()]),
        causal=causal, **options,
    )
    torch.testing.assert_close(out[q_rows], truncated_out, rtol=0, atol=0)
    torch.testing.assert_close(lse[:, q_rows], truncated_lse, rtol=0, atol=0)
    unused = torch.ones(q.shape[0], dtype=torch.bool)
    unused[q_rows] = False
    assert unused.sum() == sum(SEQLENS_Q) - sum(seqused_q)
    assert torch.equal(out[unused], torch.zeros_like(out[unused]))
    assert torch.all(lse[:, unused] == -math.inf)
    used = reference.used_query_rows(as_cu(cu_q), torch.tensor(seqused_q), q.shape[0])
    assert torch.equal(used, ~unused)


def test_used_query_rows_without_seqused_covers_the_slots_only() -> None:
    used = reference.used_query_rows(as_cu([0, 2, 2, 5]), None, total_q=7)
    assert used.tolist() == [True, True, True, True, True, False, False]


@pytest.mark.parametrize("variant", ["", "window", "alibi"])
def test_top_left_equals_bottom_right_for_square_sequences(variant: str) -> None:
    q, k, v, cu_q, cu_k = make_varlen([6, 4], [6, 4])
    options = variant_options(variant, [6, 4], [6, 4], nheads=4) if variant else {}
    args = (q, k, v, as_cu(cu_q), as_cu(cu_k))
    bottom = reference.attention_ref_varlen(*args, causal=True, **options)
    top = reference.attention_ref_varlen(*args, causal=True, causal_alignment=TOP_LEFT, **options)
    torch.testing.assert_close(top, bottom, rtol=0, atol=0)


@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(3, 5), (5, 3)])
def test_top_left_matches_pytorch_is_causal(seqlen_q: int, seqlen_k: int) -> None:
    q, k, v, cu_q, cu_k = make_varlen([seqlen_q], [seqlen_k], nheads=2, nheads_k=2)
    out, _ = reference.attention_ref_varlen(
        q, k, v, as_cu(cu_q), as_cu(cu_k), causal=True, causal_alignment=TOP_LEFT
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


COMBINATIONS = [
    "window+softcap",
    "window+alibi",
    "softcap+alibi_per_sequence",
    "window+dropout",
    "left_window+softcap+alibi+dropout+top_left",
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("combination", COMBINATIONS)
def test_combinations_match_naive(combination: str, causal: bool) -> None:
    options = variant_options(combination, SEQLENS_Q, SEQLENS_K, nheads=4)
    assert_varlen_matches_naive(SEQLENS_Q, SEQLENS_K, causal, **options)


@pytest.mark.parametrize("nheads_k", [1, 2, 8])  # MQA, GQA, MHA
@pytest.mark.parametrize("causal", [False, True])
def test_window_with_grouped_query_heads_matches_naive(nheads_k: int, causal: bool) -> None:
    options = variant_options("window+alibi", SEQLENS_Q, SEQLENS_K, nheads=8)
    assert_varlen_matches_naive(
        SEQLENS_Q, SEQLENS_K, causal, nheads=8, nheads_k=nheads_k, **options
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "variant", ["window", "softcap", "alibi_per_sequence", "dropout", "top_left+window", "sink"]
)
def test_fixed_length_variants_match_varlen(variant: str, causal: bool) -> None:
    batch, seqlen_q, seqlen_k, nheads = 3, 7, 4, 4
    options = variant_options(variant, [seqlen_q] * batch, [seqlen_k] * batch, nheads)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(batch, seqlen_q, nheads, HEAD_DIM, generator=g)
    k = torch.randn(batch, seqlen_k, 2, HEAD_DIM, generator=g)
    v = torch.randn(batch, seqlen_k, 2, HEAD_DIM, generator=g)
    out, lse = reference.attention_ref(q, k, v, causal=causal, **options)
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32) * seqlen_q
    cu_k = torch.arange(0, batch + 1, dtype=torch.int32) * seqlen_k
    out_varlen, lse_varlen = reference.attention_ref_varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, causal=causal, **options
    )
    torch.testing.assert_close(out.flatten(0, 1), out_varlen, rtol=0, atol=0)
    torch.testing.assert_close(lse.transpose(0, 1).flatten(1), lse_varlen, rtol=0, atol=0)


# Gradients. Tiny batches: one sequence with more queries than keys, one with fewer, one with
# keys only, so that rows without keys and keys without queries both occur for some variants.
GRAD_SEQLENS_Q = [4, 2, 0]
GRAD_SEQLENS_K = [2, 5, 3]
GRAD_SEQUSED = {"seqused_q": torch.tensor([3, 2, 0]), "seqused_k": torch.tensor([2, 3, 0])}
GRAD_VARIANTS = [
    "", "window", "softcap", "alibi_per_sequence", "dropout", "top_left", "seqused",
    "window+softcap+alibi+dropout", "sink", "window+softcap+alibi+dropout+sink",
]


def grad_options(variant: str, nheads: int) -> dict:
    if variant == "seqused":
        return dict(GRAD_SEQUSED)
    return variant_options(variant, GRAD_SEQLENS_Q, GRAD_SEQLENS_K, nheads) if variant else {}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", GRAD_VARIANTS)
def test_gradients_match_naive_autograd(variant: str, causal: bool) -> None:
    """Gradients of out and of softmax_lse, with random cotangents on every row (also rows that
    see no key), against autograd through the independent naive implementation."""
    options = grad_options(variant, nheads=4)
    q, k, v, cu_q, cu_k = make_varlen(GRAD_SEQLENS_Q, GRAD_SEQLENS_K, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(4, q.shape[0], generator=g)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention_ref_varlen(
        *leaves, as_cu(cu_q), as_cu(cu_k), SCALE, causal, compute_dtype=torch.float64, **options
    )
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))

    naive_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    naive_out, naive_lse = naive_varlen(*naive_leaves, cu_q, cu_k, SCALE, causal, **options)
    expected = torch.autograd.grad(
        (naive_out, naive_lse), naive_leaves, (dout, dlse.double()), allow_unused=True,
        materialize_grads=True,
    )
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", GRAD_VARIANTS)
def test_gradcheck_float64(variant: str, causal: bool) -> None:
    nheads, nheads_k, head_dim = 2, 1, 3
    options = grad_options(variant, nheads)
    g = torch.Generator().manual_seed(4)
    total_q, total_k = sum(GRAD_SEQLENS_Q), sum(GRAD_SEQLENS_K)
    q = torch.randn(total_q, nheads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(total_k, nheads_k, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(total_k, nheads_k, head_dim, generator=g, dtype=torch.float64)
    cu_q = as_cu([0, 4, 6, 6])
    cu_k = as_cu([0, 2, 7, 10])

    def attention_out(q, k, v):
        out, _ = reference.attention_ref_varlen(
            q, k, v, cu_q, cu_k, SCALE, causal, compute_dtype=torch.float64, **options
        )
        return out

    leaves = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(attention_out, leaves)


@pytest.mark.parametrize(("causal", "window_size"), [(True, (-1, -1)), (False, (0, 0))])
def test_rows_without_keys_get_zero_finite_gradients(causal: bool, window_size) -> None:
    """dq is exactly 0 on rows that see no key and dk, dv on keys no query sees, even with
    nonzero cotangents for out and softmax_lse there."""
    seqlens_q, seqlens_k = [6, 4, 2], [3, 3, 5]
    seqused_q, seqused_k = [6, 2, 2], [3, 0, 5]  # sequence 1: two queries, no key
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention_ref_varlen(
        *leaves, as_cu(cu_q), as_cu(cu_k), causal=causal, window_size=window_size,
        seqused_q=torch.tensor(seqused_q), seqused_k=torch.tensor(seqused_k),
        softcap=1.0, alibi_slopes=random_slopes((4,)),
    )
    g = torch.Generator().manual_seed(8)
    cotangents = (torch.randn(out.shape, generator=g).double(), torch.randn(lse.shape, generator=g))
    dq, dk, dv = torch.autograd.grad((out, lse), leaves, cotangents)

    rows_with_keys = torch.zeros(q.shape[0], dtype=torch.bool)
    keys_seen = torch.zeros(k.shape[0], dtype=torch.bool)
    for b in range(len(seqlens_q)):
        mask = naive_mask(seqused_q[b], seqused_k[b], causal, window_size)
        rows_with_keys[cu_q[b] : cu_q[b] + seqused_q[b]] = mask.any(dim=1)
        keys_seen[cu_k[b] : cu_k[b] + seqused_k[b]] = mask.any(dim=0)
    assert (~rows_with_keys).sum() >= 3 and (~keys_seen).sum() >= 3  # the premise of the test
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
    assert torch.equal(dq[~rows_with_keys], torch.zeros_like(dq[~rows_with_keys]))
    assert torch.equal(dk[~keys_seen], torch.zeros_like(dk[~keys_seen]))
    assert torch.equal(dv[~keys_seen], torch.zeros_like(dv[~keys_seen]))
    assert (dq[rows_with_keys].abs().sum(dim=(1, 2)) > 0).all()
    assert (dv[keys_seen].abs().sum(dim=(1, 2)) > 0).all()


def test_softmax_and_lse_rows_of_minus_inf_from_an_additive_bias() -> None:
    """An additive -inf bias (whose backward, unlike masked_fill's, passes NaN through) on a
    whole row gives probs 0, lse -inf and zero gradients; other rows are the usual softmax."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, 4, dtype=torch.float64)
    bias[1] = -math.inf
    probs, lse = reference.softmax_and_lse(logits + bias)
    assert torch.equal(probs[1], torch.zeros(4, dtype=torch.float64)) and lse[1] == -math.inf
    torch.testing.assert_close(probs[[0, 2]], torch.softmax(logits[[0, 2]], dim=-1))
    torch.testing.assert_close(lse[[0, 2]], torch.logsumexp(logits[[0, 2]], dim=-1))
    cotangents = (torch.randn(3, 4, generator=g, dtype=torch.float64),
                  torch.randn(3, generator=g, dtype=torch.float64))
    (grad,) = torch.autograd.grad((probs, lse), logits, cotangents)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window_size": (-2, 0)}, "window_size"),
        ({"window_size": (1,)}, "window_size"),
        ({"causal_alignment": "top-left"}, "causal_alignment"),
        ({"softcap": -1.0}, "softcap"),
        ({"dropout_p": 1.0, "dropout_mask": torch.ones(2, 4, 5, 6, dtype=torch.bool)}, "dropout_p"),
        ({"dropout_p": 0.1}, "needs dropout_mask"),
        ({"dropout_mask": torch.ones(2, 4, 5, 6)}, "bool"),
        ({"dropout_mask": torch.ones(2, 4, 4, 6, dtype=torch.bool)}, "dropout_mask must have"),
        ({"alibi_slopes": torch.ones(3)}, "alibi_slopes"),
        ({"alibi_slopes": torch.ones(3, 4)}, "alibi_slopes"),
        ({"learnable_sink": torch.ones(3)}, "learnable_sink"),
        ({"learnable_sink": torch.ones(1, 4)}, "learnable_sink"),
        ({"seqused_q": torch.tensor([6, 3])}, "seqused_q"),
        ({"seqused_k": torch.tensor([1])}, "seqused_k"),
    ],
)
def test_invalid_options_raise(options: dict, message: str) -> None:
    q, k, v, cu_q, cu_k = make_varlen([5, 3], [4, 6])
    with pytest.raises(ValueError, match=message):
        reference.attention_ref_varlen(q, k, v, as_cu(cu_q), as_cu(cu_k), **options)


# ----------------------------------------------------------------------------------------------
# Attention sinks (learnable_sink)
# ----------------------------------------------------------------------------------------------

# Causal or a window leaves rows 0 and 1 of sequence 0 without keys; sequence 2 has keys only
# and sequence 3 queries only (its rows see no key at all).
SINK_SEQLENS_Q = [4, 2, 0, 2]
SINK_SEQLENS_K = [2, 5, 3, 0]
SINK_MASKS = [(True, (-1, -1)), (False, (0, 0)), (True, (1, 0))]
SINK_MASK_IDS = ["causal", "diagonal", "causal-window"]


def sink_inputs(
    seqlens_q, seqlens_k, nheads: int = 4, nheads_k: int = 2, seed: int = 12
) -> tuple[torch.Tensor, ...]:
    """float64 q, k, v, sink and the prefix sums (as int32 tensors) of a small GQA batch."""
    q, k, v, cu_q, cu_k = make_varlen(
        seqlens_q, seqlens_k, nheads=nheads, nheads_k=nheads_k, dtype=torch.float64, seed=seed
    )
    sink = random_sink(nheads, dtype=torch.float64)
    return q, k, v, sink, as_cu(cu_q), as_cu(cu_k)


def rows_seeing_keys(seqlens_q, seqlens_k, causal: bool, window_size) -> torch.Tensor:
    """(total_q,) bool: the rows that see at least one key, by the naive rule."""
    flags = [
        naive_mask(sq, sk, causal, window_size).any(dim=1)
        for sq, sk in zip(seqlens_q, seqlens_k)
    ]
    return torch.cat(flags)


def closed_form_sink_gradient(
    sink: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor,
    used: torch.Tensor,
) -> torch.Tensor:
    """dsink_h = -sum_i exp(sink_h - lse_hi) * (rowsum(dout_i * out_i) - dlse_hi) over the used
    rows i (the formula the kernels implement). out, dout: (total_q, h, d); lse, dlse:
    (h, total_q); used: (total_q,) bool."""
    row_dot = (dout * out).sum(dim=-1).transpose(0, 1)  # (h, total_q)
    terms = torch.exp(sink[:, None] - lse.double()) * (row_dot - dlse)
    return -torch.where(used[None, :], terms, 0.0).sum(dim=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "variant",
    ["sink", "window+sink", "softcap+alibi+sink", "dropout+sink",
     "left_window+softcap+alibi_per_sequence+dropout+top_left+sink"],
)
def test_sink_matches_naive(variant: str, causal: bool) -> None:
    """Against the naive softmax over [scores, sink] (gpt-oss's construction), with empty q, k
    and both among SEQLENS_Q/K."""
    options = variant_options(variant, SEQLENS_Q, SEQLENS_K, nheads=4)
    assert_varlen_matches_naive(SEQLENS_Q, SEQLENS_K, causal, **options)


@pytest.mark.parametrize("nheads_k", [1, 2, 8])  # MQA, GQA, MHA
def test_sink_with_grouped_query_heads_matches_naive(nheads_k: int) -> None:
    """The sink is per query head, not per kv head: 8 different sinks over 1, 2 or 8 kv heads."""
    options = variant_options("window+sink", SEQLENS_Q, SEQLENS_K, nheads=8)
    assert_varlen_matches_naive(
        SEQLENS_Q, SEQLENS_K, True, nheads=8, nheads_k=nheads_k, **options
    )


# softmax_lse is float32 whatever the compute dtype, so its finite differences need a step
# far above float32 rounding (1e-7 relative): a step of 1e-3 leaves about 1e-4 of rounding
# noise in each difference quotient and 1e-6 of truncation error.
LSE_GRADCHECK = {"eps": 1e-3, "atol": 1e-3, "rtol": 1e-3}


@pytest.mark.parametrize(("causal", "window_size"), SINK_MASKS, ids=SINK_MASK_IDS)
def test_sink_gradcheck_float64(causal: bool, window_size) -> None:
    """Finite differences of out (float64) and softmax_lse (float32, see LSE_GRADCHECK) w.r.t.
    q, k, v and the sink, GQA, on a batch with rows that see no key (their lse is the sink, so
    every lse entry is differentiable)."""
    q, k, v, sink, cu_q, cu_k = sink_inputs(SINK_SEQLENS_Q, SINK_SEQLENS_K, nheads=2, nheads_k=1)
    q, k, v = (x[..., :3].contiguous() for x in (q, k, v))  # head dim 3 keeps gradcheck quick
    blind = ~rows_seeing_keys(SINK_SEQLENS_Q, SINK_SEQLENS_K, causal, window_size)
    assert blind.sum() >= 4  # the premise: rows without keys (masked, and without any key)

    def attention(q, k, v, sink):
        return reference.attention_ref_varlen(
            q, k, v, cu_q, cu_k, SCALE, causal, compute_dtype=torch.float64,
            window_size=window_size, learnable_sink=sink,
        )

    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    assert torch.autograd.gradcheck(lambda *xs: attention(*xs)[0], leaves)
    assert torch.autograd.gradcheck(lambda *xs: attention(*xs)[1], leaves, **LSE_GRADCHECK)


@pytest.mark.parametrize("lse_grad", [False, True], ids=["dout", "dout+dlse"])
@pytest.mark.parametrize(
    "variant", ["", "window+softcap+alibi+dropout", "seqused"], ids=["plain", "variants", "seqused"]
)
@pytest.mark.parametrize("causal", [False, True])
def test_sink_gradient_matches_closed_form(causal: bool, variant: str, lse_grad: bool) -> None:
    """Autograd's dsink equals -sum_i exp(sink - lse_i) (rowsum(dout_i * out_i) - dlse_i) over
    the used rows, computed from the reference's own out and lse. With dropout the formula
    holds with the dropped out: dropout scales the key probabilities, which all shrink by the
    same factor when the sink grows, and never reaches the lse."""
    options = grad_options(variant, nheads=4)
    q, k, v, sink, cu_q, cu_k = sink_inputs(GRAD_SEQLENS_Q, GRAD_SEQLENS_K)
    sink_leaf = sink.clone().requires_grad_()
    out, lse = reference.attention_ref_varlen(
        q, k, v, cu_q, cu_k, SCALE, causal, compute_dtype=torch.float64,
        learnable_sink=sink_leaf, **options,
    )
    g = torch.Generator().manual_seed(13)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64) if lse_grad else None
    used = reference.used_query_rows(cu_q, options.get("seqused_q"), q.shape[0])
    outputs, cotangents = [out], [dout]
    if dlse is not None:
        # Unused rows (lse -inf, not a function of anything) take no cotangent.
        outputs.append(lse)
        cotangents.append(torch.where(used[None, :], dlse, 0.0).float())
    (dsink,) = torch.autograd.grad(outputs, sink_leaf, cotangents)

    expected = closed_form_sink_gradient(
        sink, out.detach(), lse.detach(), dout,
        torch.zeros_like(lse.double()) if dlse is None else cotangents[1].double(), used,
    )
    assert dsink.dtype == torch.float64 and dsink.shape == (4,)
    torch.testing.assert_close(dsink, expected, rtol=1e-6, atol=1e-6)


def test_sink_gradient_matches_naive_autograd() -> None:
    """dq, dk, dv and dsink of out and lse against autograd through the naive construction."""
    options = variant_options("window+softcap+alibi+dropout", GRAD_SEQLENS_Q, GRAD_SEQLENS_K, 4)
    q, k, v, sink, cu_q, cu_k = sink_inputs(GRAD_SEQLENS_Q, GRAD_SEQLENS_K)
    g = torch.Generator().manual_seed(14)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(4, q.shape[0], generator=g, dtype=torch.float64)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    out, lse = reference.attention_ref_varlen(
        *leaves[:3], cu_q, cu_k, SCALE, True, compute_dtype=torch.float64,
        learnable_sink=leaves[3], **options,
    )
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse.float()))
    naive_leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    naive_out, naive_lse = naive_varlen(
        *naive_leaves[:3], cu_q.tolist(), cu_k.tolist(), SCALE, True,
        learnable_sink=naive_leaves[3], **options,
    )
    expected = torch.autograd.grad(
        (naive_out, naive_lse), naive_leaves, (dout, dlse.float().double()), allow_unused=True,
        materialize_grads=True,
    )
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("causal", "window_size"), SINK_MASKS, ids=SINK_MASK_IDS)
def test_rows_without_keys_with_a_sink(causal: bool, window_size) -> None:
    """A used row that sees no key gets out exactly 0 and softmax_lse exactly sink[h] (float32,
    as the kernels must), zero dq and finite gradients; rows past seqused_q keep out 0 and
    softmax_lse -inf: they take part in no softmax, sink or not."""
    seqlens_q, seqlens_k = [6, 4, 2, 3], [3, 3, 5, 0]
    seqused_q, seqused_k = [6, 2, 1, 3], [3, 0, 5, 0]  # sequences 1 and 3 see no key at all
    q, k, v, _, cu_q, cu_k = sink_inputs(seqlens_q, seqlens_k)
    sink = random_sink(4)  # float32, as the kernels take it
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    out, lse = reference.attention_ref_varlen(
        *leaves[:3], cu_q, cu_k, causal=causal, window_size=window_size,
        seqused_q=torch.tensor(seqused_q), seqused_k=torch.tensor(seqused_k),
        softcap=1.0, alibi_slopes=random_slopes((4,)), learnable_sink=leaves[3],
    )
    used = reference.used_query_rows(cu_q, torch.tensor(seqused_q), q.shape[0])
    sees = torch.zeros(q.shape[0], dtype=torch.bool)
    sees[used] = rows_seeing_keys(seqused_q, seqused_k, causal, window_size)
    blind = used & ~sees
    assert blind.sum() >= 5 and (~used).sum() == 3  # the premise of the test

    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(lse[:, blind], sink[:, None].expand(-1, int(blind.sum())))
    assert torch.equal(out[~used], torch.zeros_like(out[~used]))
    assert torch.all(lse[:, ~used] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, used]).all()

    g = torch.Generator().manual_seed(15)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.where(used[None, :], torch.randn(lse.shape, generator=g), 0.0)
    dq, dk, dv, dsink = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    for grad in (dq, dk, dv, dsink):
        assert torch.isfinite(grad).all()
    assert torch.equal(dq[~sees], torch.zeros_like(dq[~sees]))
    assert (dsink != 0).all()


def test_rows_without_keys_with_a_sink_have_finite_gradients_in_every_dtype() -> None:
    """Gradients through the shortcut for empty sequences and through fully masked rows stay
    finite in float64, float32 and bfloat16 alike."""
    q, k, v, sink, cu_q, cu_k = sink_inputs(SINK_SEQLENS_Q, SINK_SEQLENS_K)
    for compute_dtype in (torch.float64, torch.float32, torch.bfloat16):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, sink.float())]
        out, lse = reference.attention_ref_varlen(
            *leaves[:3], cu_q, cu_k, causal=True, compute_dtype=compute_dtype,
            learnable_sink=leaves[3],
        )
        grads = torch.autograd.grad((out.float().sum() + lse.sum()), leaves)
        for grad in grads:
            assert torch.isfinite(grad).all(), compute_dtype


@pytest.mark.parametrize("causal", [False, True])
def test_sink_of_minus_inf_is_no_sink(causal: bool) -> None:
    """exp(-inf) = 0 joins no normalization: out, softmax_lse (-inf rows included) and dq, dk,
    dv equal learnable_sink=None's bit for bit, which in turn are the reference's results from
    before the sink existed (the sink only adds terms when it is given)."""
    q, k, v, _, cu_q, cu_k = sink_inputs(SINK_SEQLENS_Q, SINK_SEQLENS_K)
    results = []
    for sink in (None, torch.full((4,), -math.inf)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = reference.attention_ref_varlen(
            *leaves, cu_q, cu_k, causal=causal, window_size=(1, 1), softcap=2.0,
            learnable_sink=sink,
        )
        finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
        grads = torch.autograd.grad(out.sum() + finite_lse.sum(), leaves)
        results.append((out, lse, *grads))
    for without, with_minus_inf in zip(*results):
        assert torch.equal(without, with_minus_inf)
    assert torch.isneginf(results[0][1]).any()  # rows without keys keep -inf


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("magnitude", [1.0, 20.0, 200.0])
def test_sink_merges_like_one_more_partial_result(magnitude: float, compute_dtype) -> None:
    """The sink is a partial softmax with lse = sink and out = 0, merged by LSE:
    lse = logaddexp(lse_plain, sink) and out = out_plain * exp(lse_plain - lse). Sinks of
    +-20 and +-200 (exp overflows float32 beyond 88) stay finite: the dominated side vanishes.
    """
    q, k, v, _, cu_q, cu_k = sink_inputs(SEQLENS_Q, SEQLENS_K)
    sink = magnitude * torch.tensor([1.0, -1.0, 0.5, -0.25])
    args = (q, k, v, cu_q, cu_k, SCALE, True)
    plain, plain_lse = reference.attention_ref_varlen(*args, compute_dtype=torch.float64)
    out, lse = reference.attention_ref_varlen(
        *args, compute_dtype=compute_dtype, learnable_sink=sink
    )
    expected_lse = torch.logaddexp(plain_lse.double(), sink.double()[:, None])
    expected_out = plain * torch.exp(plain_lse.double() - expected_lse).transpose(0, 1)[..., None]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Both lse are float32 (plain_lse enters expected_out): float32 rounding bounds everything.
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)


def test_sink_is_cast_to_the_compute_dtype() -> None:
    """In bfloat16 the sink is rounded like the slopes (the same math in the input dtype), and
    its gradient still reaches the float32 tensor as float32."""
    q, k, v, _, cu_q, cu_k = sink_inputs([5, 3], [4, 6])
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    sink = random_sink(4).requires_grad_()
    rounded = sink.detach().to(torch.bfloat16).float()
    out, lse = reference.attention_ref_varlen(
        q, k, v, cu_q, cu_k, compute_dtype=torch.bfloat16, learnable_sink=sink
    )
    same, same_lse = reference.attention_ref_varlen(
        q, k, v, cu_q, cu_k, compute_dtype=torch.bfloat16, learnable_sink=rounded
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, same) and torch.equal(lse, same_lse)
    (dsink,) = torch.autograd.grad(out.float().sum() + lse.sum(), sink)
    assert dsink.dtype == torch.float32 and torch.isfinite(dsink).all()


def test_fixed_length_sink_rows_without_keys() -> None:
    """attention_ref: seqlen_k = 0 gives out 0 and lse = sink for every row and batch entry."""
    q = torch.randn(2, 3, 4, HEAD_DIM)
    k = v = torch.randn(2, 0, 2, HEAD_DIM)
    sink = random_sink(4)
    out, lse = reference.attention_ref(q, k, v, causal=True, learnable_sink=sink)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sink[None, :, None].expand(2, 4, 3))
