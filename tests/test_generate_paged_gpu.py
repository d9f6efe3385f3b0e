"""The serving demo on the GPU: the paged engine with flash_attn_with_kvcache (bf16).

Why not compare greedy tokens with the padded SDPA baseline: in bf16 the two paths round
differently (other kernels, other matmul shapes), a near-tie between a request's two best logits
flips its greedy token in one path only, and every later token of that request differs. So
identical tokens would fail a correct engine (the CPU tests require them in float32, where they
are sound).

What is compared instead: every logit each generated token was chosen from (the first token's,
after a prefill in chunks through the paged kernel, and every batched decode step's), against a
float32 recomputation of the same trajectory: one cache-free forward over the prompt and the
engine's own tokens (teacher forcing, padded SDPA) with the model's weights cast to float32
(the same values). The bound is the repository's tolerance rule (tests/accuracy.py): the
engine's max error may be FORWARD_FACTOR times that of the same teacher-forced forward run in
bf16 (the error any correct bf16 implementation of this model makes on these tokens), plus half
a bf16 ulp of the largest logit. Comparing a trajectory with its own recomputation means a
flipped near-tie costs nothing.

The second test shows that the bound catches a cache bug: an engine told one key too few at
each decode step (the previous token's keys and values overwritten) must exceed it by
LEAK_MARGIN. Emulated on the CPU (bf16 model, the float32 reference as attention, a bf16 cache;
these tests' configurations): the correct engine reached 0.42-0.54 of the bound, the
off-by-one 12.7-15.0 times it. Not measured on a GPU yet.

Runs only where CUDA is available; elsewhere every test is skipped.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from accuracy import FORWARD_FACTOR, assert_within_tolerance, require_decode_kernel
from serving_demo import REPO_ROOT, SCRIPT, recomputed_logits

# isort: split
# serving_demo puts examples/ on sys.path: the demo's package imports after it.
from serving.model import ModelConfig, build_model
from serving.paged_engine import PagedEngine
from serving.requests import GenerationResult, random_requests

from flash_varlen import flash_attn_with_kvcache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPE = torch.bfloat16
VOCAB_SIZE = 8192
PROMPT_LENGTHS = (1, 300)
OUTPUT_LENGTHS = (1, 24)
PREFILL_CHUNK = 128  # above the decode kernels' 16 query tokens: their long-chunk path
MAX_RUNNING = 8
# (head dim, page size, pool pages): both decode-kernel buckets; page size 1 and 16. The pools
# hold fewer than all requests at once, so admission waits.
CASES = [(64, 16, 64), (128, 1, 1024)]
LEAK_MARGIN = 4.0
SCRIPT_TIMEOUT_S = 600


def model_config(head_dim: int) -> ModelConfig:
    """The demo's model (hidden 512, 8 query and 2 key/value heads), 2 layers for speed."""
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
        hidden=512,
        layers=2,
        nheads=8,
        nheads_k=2,
        head_dim=head_dim,
        max_positions=PROMPT_LENGTHS[1] + OUTPUT_LENGTHS[1],
    )


def serve(model, attention, page_size: int, num_pages: int, requests) -> GenerationResult:
    engine = PagedEngine(
        model,
        attention,
        num_pages=num_pages,
        page_size=page_size,
        max_running=MAX_RUNNING,
        prefill_chunk=PREFILL_CHUNK,
        keep_logits=True,
    )
    return engine.generate(requests)


@pytest.mark.parametrize(("head_dim", "page_size", "num_pages"), CASES)
def test_engine_logits_are_as_accurate_as_bf16_sdpa(head_dim, page_size, num_pages) -> None:
    require_decode_kernel(DTYPE, head_dim)
    model = build_model(model_config(head_dim), seed=0, device="cuda", dtype=DTYPE)
    requests = random_requests(12, PROMPT_LENGTHS, OUTPUT_LENGTHS, VOCAB_SIZE, seed=0)

    result = serve(model, flash_attn_with_kvcache, page_size, num_pages, requests)

    assert [len(result.tokens[r.request_id]) for r in requests] == [
        r.max_new_tokens for r in requests
    ]
    actual, fp32, lowp, floor = recomputed_logits(model, requests, result)
    assert_within_tolerance(
        actual, fp32, lowp, FORWARD_FACTOR, f"logits (d {head_dim}, page {page_size})", floor
    )


def test_bound_catches_an_off_by_one_cache_length() -> None:
    head_dim, page_size, num_pages = CASES[0]
    require_decode_kernel(DTYPE, head_dim)
    model = build_model(model_config(head_dim), seed=0, device="cuda", dtype=DTYPE)
    requests = random_requests(12, PROMPT_LENGTHS, OUTPUT_LENGTHS, VOCAB_SIZE, seed=0)

    def off_by_one(q, k_cache, v_cache, k, v, *, cache_seqlens, **options):
        if q.shape[1] == 1:
            cache_seqlens = (cache_seqlens - 1).clamp(min=0)
        return flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, **options
        )

    result = serve(model, off_by_one, page_size, num_pages, requests)
    actual, fp32, lowp, floor = recomputed_logits(model, requests, result)
    bound = FORWARD_FACTOR * float((lowp - fp32).abs().max()) + floor
    error = float((actual - fp32).abs().max())
    assert error > LEAK_MARGIN * bound, (error, bound)


def test_script_runs_and_reports_the_comparison() -> None:
    """A short run of the demo as users start it (its default model, fewer requests)."""
    require_decode_kernel(DTYPE, 64)
    command = [
        sys.executable,
        str(SCRIPT),
        "--requests",
        "24",
        "--prompt-len",
        "8",
        "200",
        "--output-len",
        "4",
        "32",
        "--no-progress",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "[paged: continuous batching, flash_attn_with_kvcache, page size 16]",
        "[padded: static batches of 64, scaled_dot_product_attention]",
        "speed-up:",
        "greedy tokens identical:",
    ):
        assert line in result.stdout, f"missing {line!r} in:\n{result.stdout}"
    print(result.stdout)
