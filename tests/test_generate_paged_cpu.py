"""The serving demo (examples/generate_paged.py, examples/serving/) on the CPU.

- The paged engine, with the float32 reference (``attention_ref_kvcache``) as its attention,
  against the padded SDPA baseline on the same model: identical greedy tokens for every request
  (prompts that end mid-page, a one-token prompt, a request that ends at its prefill, prefill
  chunks that cross pages), page sizes 1 and 16, a pool small enough that admission waits; and
  every logit each token was chosen from equal to a cache-free recomputation (teacher forcing).
  A backend with an off-by-one cache length must break that agreement (the comparison has
  teeth: the model's tokens depend on what attention reads).
- The page allocator: no page owned twice, every page back in the pool at the end (checked
  after random operations and after every engine step); admission waits for pages and proceeds
  when they are freed, in arrival order; a request larger than the pool is refused naming the
  limit, and one exactly as large is served.
- The attention calls: a checking backend verifies at every call that the block table rows and
  cache_seqlens are the running requests' pages and lengths, and that every decode step batches
  all requests that have a token to feed back.
- flash_attn_with_kvcache itself (its checks, with the debug-mode value checks, its append and
  rotary) in bf16, only the decode kernel replaced by the reference: the engine's calls pass its
  checks and its logits meet the GPU test's tolerance rule (a rehearsal of
  tests/test_generate_paged_gpu.py).
- The script: its --cpu-reference run, its --help, its refusal of an oversized request.
"""

from __future__ import annotations

import random

import pytest
import torch
from accuracy import FORWARD_FACTOR, assert_within_tolerance
from serving_demo import load_script, make_requests, recomputed_logits

# isort: split
# serving_demo puts examples/ on sys.path: the demo's package imports after it.
from serving.attention import reference_attention
from serving.model import ModelConfig, build_model
from serving.padded_baseline import generate_padded, teacher_forced_logits
from serving.paged_engine import EngineStatus, PagedEngine
from serving.pages import PageAllocator
from serving.requests import GenerationResult, Request
from serving.scheduler import RequestTooLarge, RunningRequest, Scheduler

from flash_varlen import flash_attn_with_kvcache, kvcache, validation
from flash_varlen.reference import attention_ref_kvcache

CONFIG = ModelConfig(
    vocab_size=256, hidden=64, layers=2, nheads=4, nheads_k=2, head_dim=16, max_positions=32
)
# Prompts ending mid-page (9, 23, 5 for page size 16), one token long, exactly a page (16);
# a request that ends at its prefill (1 new token) and some that decode for a while.
PROMPT_LENGTHS = [9, 1, 16, 23, 5, 12]
OUTPUT_LENGTHS = [6, 9, 1, 4, 12, 7]
PREFILL_CHUNK = 5  # not a divisor of the page sizes: chunks start and end mid-page
MAX_RUNNING = 3
# (page size, pool pages): both pools are too small for all requests at once, so admission
# waits; both hold the largest request (26 cached tokens).
POOLS = [(1, 40), (16, 3)]
# float32 on both sides; measured differences are about 2e-6.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds synchronisation, and on a busy
    2-core machine it made these tests about 10x slower (measured: an engine run 1.07 s with
    two threads, 0.08 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, seed=0, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    return make_requests(PROMPT_LENGTHS, OUTPUT_LENGTHS, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def baseline(model, requests) -> GenerationResult:
    return generate_padded(model, requests, batch_size=MAX_RUNNING, keep_logits=True)


def make_engine(model, attention, page_size: int, num_pages: int, **options) -> PagedEngine:
    return PagedEngine(
        model,
        attention,
        num_pages=num_pages,
        page_size=page_size,
        max_running=MAX_RUNNING,
        prefill_chunk=PREFILL_CHUNK,
        **options,
    )


def assert_pool_consistent(allocator: PageAllocator) -> None:
    """Every page is free or owned by exactly one request, never both, never twice."""
    owned = [page for owner in allocator.owners() for page in allocator.pages_of(owner)]
    free = list(allocator.free_pages())
    assert len(set(owned)) == len(owned), f"a page is owned twice: {sorted(owned)}"
    assert not set(owned) & set(free), f"pages both owned and free: {set(owned) & set(free)}"
    assert sorted(owned + free) == list(range(allocator.num_pages))


# ----------------------------------------------------------------------------------------------
# The engine against the baseline
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("page_size", "num_pages"), POOLS)
def test_paged_engine_gives_the_padded_baselines_tokens(
    model, requests, baseline, page_size, num_pages
) -> None:
    engine = make_engine(model, reference_attention, page_size, num_pages, keep_logits=True)
    statuses: list[EngineStatus] = []

    def after_step(status: EngineStatus) -> None:
        assert_pool_consistent(engine.allocator)
        statuses.append(status)

    result = engine.generate(requests, after_step)

    assert result.tokens == baseline.tokens
    recomputed = teacher_forced_logits(model, requests, result.tokens)
    for request in requests:
        torch.testing.assert_close(
            result.logits[request.request_id],
            recomputed[request.request_id],
            atol=LOGIT_TOLERANCE,
            rtol=0,
        )
    # The run was the one described: admission waited for pages while others ran, and every
    # page came back.
    assert any(s.waiting and s.running < MAX_RUNNING for s in statuses)
    assert engine.allocator.pages_in_use == 0 and not engine.allocator.owners()
    assert sorted(engine.allocator.free_pages()) == list(range(num_pages))


def test_padded_baseline_agrees_with_teacher_forcing(model, requests, baseline) -> None:
    """The baseline's incremental decoding over its contiguous caches gives the logits of one
    cache-free forward over the same tokens (so it is a fair yardstick)."""
    recomputed = teacher_forced_logits(model, requests, baseline.tokens)
    for request in requests:
        assert len(baseline.tokens[request.request_id]) == request.max_new_tokens
        torch.testing.assert_close(
            baseline.logits[request.request_id],
            recomputed[request.request_id],
            atol=LOGIT_TOLERANCE,
            rtol=0,
        )


def test_an_off_by_one_cache_length_changes_the_tokens(model, requests, baseline) -> None:
    """A backend told one key too few at every decode step (it overwrites the last cached
    token) must not reproduce the baseline: the comparison above can see cache bugs."""

    def off_by_one(q, k_cache, v_cache, k, v, *, cache_seqlens, **options):
        if q.shape[1] == 1:
            cache_seqlens = (cache_seqlens - 1).clamp(min=0)
        return reference_attention(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, **options
        )

    result = make_engine(model, off_by_one, *POOLS[1]).generate(requests)
    decoding = [r.request_id for r in requests if r.max_new_tokens > 2]
    differing = [i for i in decoding if result.tokens[i] != baseline.tokens[i]]
    assert len(differing) >= len(decoding) - 1, (differing, decoding)


# ----------------------------------------------------------------------------------------------
# What the attention calls are handed
# ----------------------------------------------------------------------------------------------


class CheckingAttention:
    """The reference, after checking each call's block table and cache_seqlens against the
    engine's running requests and its allocator."""

    def __init__(self) -> None:
        self.engine: PagedEngine | None = None
        self.decode_batch_sizes: list[int] = []
        self.prefill_calls = 0

    def __call__(self, q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, **options):
        engine = self.engine
        batch: list[RunningRequest] = engine.batch
        page_size = engine.allocator.page_size
        seqlen_new = k.shape[1]
        assert q.shape[0] == k.shape[0] == len(batch) == block_table.shape[0]
        assert q.shape[1] == seqlen_new  # queries are exactly the appended tokens
        assert block_table.dtype == cache_seqlens.dtype == torch.int32
        assert block_table.shape[1] * page_size >= CONFIG.max_positions
        seen_pages: set[int] = set()
        for row, running in enumerate(batch):
            pages = engine.allocator.pages_of(running.request_id)
            cached = int(cache_seqlens[row])
            assert cached == running.cached
            # Room for the append has been allocated, and the row starts with the request's
            # own pages in position order.
            assert cached + seqlen_new <= len(pages) * page_size
            assert block_table[row, : len(pages)].tolist() == list(pages)
            assert not seen_pages & set(pages), "two rows share a page"
            seen_pages |= set(pages)
        if all(running.prefilled for running in batch):
            # A decode step: one token for every request that has one to feed back.
            expected = {
                r.request_id for r in engine.scheduler.running if r.prefilled and not r.finished
            }
            assert {running.request_id for running in batch} == expected
            assert seqlen_new == 1
            self.decode_batch_sizes.append(len(batch))
        else:
            # A prefill chunk: one request, at most a chunk, within its prompt.
            (running,) = batch
            assert seqlen_new <= PREFILL_CHUNK
            assert running.cached + seqlen_new <= len(running.request.prompt)
            self.prefill_calls += 1
        return reference_attention(
            q,
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens=cache_seqlens,
            block_table=block_table,
            **options,
        )


@pytest.mark.parametrize(("page_size", "num_pages"), POOLS)
def test_attention_calls_get_the_running_requests_pages_and_lengths(
    model, requests, baseline, page_size, num_pages
) -> None:
    attention = CheckingAttention()
    engine = make_engine(model, attention, page_size, num_pages)
    attention.engine = engine

    result = engine.generate(requests)

    assert result.tokens == baseline.tokens
    # Continuous batching did batch: some decode steps ran several requests in one call.
    assert max(attention.decode_batch_sizes) > 1
    chunks = sum(-(-length // PREFILL_CHUNK) for length in PROMPT_LENGTHS)
    assert attention.prefill_calls == chunks * CONFIG.layers


class DecodeKernelOnTheCpu:
    """Stands in for the decode op inside flash_attn_with_kvcache: its append and rotary steps
    as torch operations (kvcache.append_and_rotate), then the reference over the cache, all keys
    up to the key ends visible, causal bottom-right."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []  # (batch, seqlen_q) of every call

    def __call__(self, call, cache_lengths):
        options = call.options
        assert call.paged and options["causal"]
        q, key_ends = kvcache.append_and_rotate(call, cache_lengths)
        self.shapes.append(tuple(q.shape[:2]))
        result = attention_ref_kvcache(
            q,
            call.k_cache,
            call.v_cache,
            cache_seqlens=key_ends,
            block_table=call.block_table,
            softmax_scale=options["softmax_scale"],
            causal=True,
        )
        return result.out.to(q.dtype), result.softmax_lse


def test_engine_through_flash_attn_with_kvcaches_own_checks_and_append(
    monkeypatch, requests
) -> None:
    """The GPU configuration but for the kernel: bf16, flash_attn_with_kvcache itself (its
    checks, with the debug-mode value checks, its in-place append and rotary), only the decode
    kernel replaced by the reference and CPU tensors let past the device check. Judged as
    tests/test_generate_paged_gpu.py judges the kernels: logits against a float32
    recomputation, within the tolerance rule of tests/accuracy.py."""
    monkeypatch.setattr(validation, "_check_devices", lambda *args: None)
    monkeypatch.setattr(kvcache, "build_kernel_check", lambda q: None)
    monkeypatch.setenv(validation.DEBUG_ENV_VAR, "1")
    kernel = DecodeKernelOnTheCpu()
    monkeypatch.setattr(kvcache, "_decode_attention", kernel)
    model = build_model(CONFIG, seed=0, device="cpu", dtype=torch.bfloat16)

    result = make_engine(model, flash_attn_with_kvcache, *POOLS[1], keep_logits=True).generate(
        requests
    )

    actual, fp32, lowp, floor = recomputed_logits(model, requests, result)
    assert_within_tolerance(actual, fp32, lowp, FORWARD_FACTOR, "logits", floor)
    assert any(batch > 1 for batch, _ in kernel.shapes)  # batched decode steps
    assert any(seqlen_q > 1 for _, seqlen_q in kernel.shapes)  # prefill chunks


# ----------------------------------------------------------------------------------------------
# The page allocator and admission
# ----------------------------------------------------------------------------------------------


def test_allocator_never_hands_out_a_page_twice_and_gets_every_page_back() -> None:
    allocator = PageAllocator(num_pages=12, page_size=3)
    rng = random.Random(0)
    grown: dict[int, int] = {}  # owner -> tokens it has grown to
    reserved: dict[int, int] = {}
    for owner in range(200):
        if reserved and rng.random() < 0.4:
            victim = rng.choice(sorted(reserved))
            allocator.release(victim)
            del reserved[victim], grown[victim]
        pages = rng.randint(1, 5)
        if allocator.reserve(owner, pages):
            reserved[owner], grown[owner] = pages, 0
        else:
            assert pages > 12 - sum(reserved.values())
        for live in reserved:  # each live request grows by a few tokens, within its reservation
            grown[live] = min(grown[live] + rng.randint(0, 4), reserved[live] * 3)
            allocator.grow(live, grown[live])
            assert len(allocator.pages_of(live)) == -(-grown[live] // 3)
        assert_pool_consistent(allocator)
    for live in list(reserved):
        allocator.release(live)
    assert allocator.pages_in_use == 0 and allocator.unreserved == 12
    assert sorted(allocator.free_pages()) == list(range(12))


def test_allocator_refuses_growth_past_the_reservation() -> None:
    allocator = PageAllocator(num_pages=8, page_size=4)
    assert allocator.reserve("a", 2)
    allocator.grow("a", 8)
    with pytest.raises(RuntimeError, match="needs 3 pages for 9 tokens but reserved 2"):
        allocator.grow("a", 9)


def finish(running: RunningRequest) -> None:
    running.output.extend([0] * running.request.max_new_tokens)


def test_admission_waits_for_pages_then_proceeds_in_order() -> None:
    scheduler = Scheduler(PageAllocator(num_pages=4, page_size=4), max_running=8, max_positions=64)
    big = Request(0, (1,) * 12, 1)  # 12 cached tokens: 3 pages
    medium = Request(1, (1,) * 8, 1)  # 2 pages: does not fit next to the big one
    small = Request(2, (1,) * 2, 1)  # 1 page: would fit, but waits behind the medium one
    for request in (big, medium, small):
        scheduler.submit(request)

    (first,) = scheduler.admit()
    assert first.request is big
    assert list(scheduler.waiting) == [medium, small]
    assert scheduler.admit() == []  # nothing freed yet: still waiting

    finish(first)
    assert scheduler.retire_finished() == [first]
    admitted = scheduler.admit()
    assert [running.request for running in admitted] == [medium, small]
    assert scheduler.allocator.unreserved == 1 and not scheduler.waiting


def test_admission_respects_max_running() -> None:
    scheduler = Scheduler(PageAllocator(num_pages=64, page_size=4), max_running=2, max_positions=64)
    for request_id in range(3):
        scheduler.submit(Request(request_id, (1, 2), 3))
    assert len(scheduler.admit()) == 2 and len(scheduler.waiting) == 1


def test_a_request_larger_than_the_pool_is_refused_naming_the_limit(model, requests) -> None:
    scheduler = Scheduler(PageAllocator(num_pages=4, page_size=4), max_running=8, max_positions=64)
    too_large = Request(7, (1,) * 15, 3)  # 17 cached tokens: 5 pages of 4
    with pytest.raises(RequestTooLarge, match=r"request 7 needs 5 pages .* whole pool of 4 pages"):
        scheduler.submit(too_large)
    assert not scheduler.waiting
    with pytest.raises(RequestTooLarge, match="more than the model's 64 positions"):
        scheduler.submit(Request(8, (1,) * 60, 5))

    # Through the engine: refused before any work (nothing queued, nothing written into the
    # pools), although the first requests would fit.
    engine = make_engine(model, reference_attention, page_size=16, num_pages=1)
    with pytest.raises(RequestTooLarge, match="request 3 needs 2 pages .* whole pool of 1 pages"):
        engine.generate(requests)
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert not any(pool.any() for pool in engine.k_pools)


def test_a_request_exactly_as_large_as_the_pool_is_served(model) -> None:
    (request,) = make_requests([13], [4], CONFIG.vocab_size, seed=1)  # 16 cached tokens
    baseline = generate_padded(model, [request], batch_size=1)
    result = make_engine(model, reference_attention, page_size=4, num_pages=4).generate([request])
    assert result.tokens == baseline.tokens


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_script_cpu_reference_run_reports_identical_tokens(script, capsys) -> None:
    assert script.main(["--cpu-reference", "--requests", "5"]) == 0
    captured = capsys.readouterr()
    assert "greedy tokens identical: 5/5 requests" in captured.out
    for line in ("[paged: continuous batching, flash_varlen.reference", "tokens/s", "[padded:"):
        assert line in captured.out
    # The status line (stderr is not a terminal here: its final state on a line of its own).
    assert "paged: done 5/5, running 0, waiting 0, pages 0/48" in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_script_without_gpu_says_so_and_runs_the_cpu_reference(script, capsys) -> None:
    assert script.main(["--requests", "2", "--no-progress", "--no-baseline"]) == 0
    captured = capsys.readouterr()
    assert "no CUDA GPU is available" in captured.err
    assert "flash_varlen.reference" in captured.out


def test_script_refuses_a_request_larger_than_the_pool(script, capsys) -> None:
    code = script.main(["--cpu-reference", "--num-pages", "2", "--no-progress"])
    assert code == script.REQUEST_TOO_LARGE_EXIT_CODE
    assert "more than the whole pool of 2 pages" in capsys.readouterr().err


def test_script_help_documents_the_options(script, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--requests", "--prompt-len", "--output-len", "--page-size", "--seed"):
        assert option in text
