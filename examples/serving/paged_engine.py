"""The paged path: continuous batching over a page pool, one attention call per layer and step.

Every ``step``:

1. the scheduler admits what the pool can reserve;
2. each request still reading its prompt runs one chunk of it (``prefill_chunk`` tokens, a
   batch of one): the chunk's keys and values are appended to its pages and its queries attend
   causally to everything cached so far; the chunk that ends the prompt yields the first token;
3. every request with a token to feed back runs one decode step, all of them batched into one
   attention call per layer: the block table holds each request's pages, cache_seqlens its
   cached tokens, and the call appends the new keys and values in place;
4. finished requests leave and their pages return to the pool.

Prefill chunks do not wait for the running decodes and decodes do not wait for long prompts
(chunked prefill). Sampling is greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import KVCacheAttention
from .model import DecoderModel, kv_bytes_per_token, rotary_tables
from .pages import PageAllocator, ceil_div
from .requests import GenerationResult, Request
from .scheduler import RunningRequest, Scheduler

# Block-table entries past a request's pages. The attention reads only the pages that hold
# positions below cache_seqlens + seqlen_new; a real page number keeps even a reader that
# ignored that inside the pool.
UNUSED_PAGE = 0


@dataclass(frozen=True)
class EngineStatus:
    """What the progress display shows after a step."""

    done: int  # requests finished since the engine was made
    running: int
    waiting: int
    pages_in_use: int
    num_pages: int
    generated_tokens: int


class PagedEngine:
    def __init__(
        self,
        model: DecoderModel,
        attention: KVCacheAttention,
        *,
        num_pages: int,
        page_size: int,
        max_running: int,
        prefill_chunk: int,
        keep_logits: bool = False,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        config = model.config
        weight = model.embed.weight
        self.model = model
        self.attention = attention
        self.prefill_chunk = prefill_chunk
        self.keep_logits = keep_logits
        self.allocator = PageAllocator(num_pages, page_size)
        self.scheduler = Scheduler(self.allocator, max_running, config.max_positions)
        pool_shape = (num_pages, page_size, config.nheads_k, config.head_dim)
        self.k_pools = [weight.new_zeros(pool_shape) for _ in range(config.layers)]
        self.v_pools = [weight.new_zeros(pool_shape) for _ in range(config.layers)]
        # Every block-table row has room for the longest request the model serves; the rotary
        # tables must cover that capacity (flash_attn_with_kvcache's rule).
        self.table_width = ceil_div(config.max_positions, page_size)
        self.rotary_cos, self.rotary_sin = rotary_tables(
            self.table_width * page_size, config.head_dim, weight.device
        )
        self.page_bytes = page_size * kv_bytes_per_token(config, weight.dtype)
        # The requests of the attention call in progress, in the order of its batch rows
        # (tests read it to check the block table and cache_seqlens they are handed).
        self.batch: list[RunningRequest] = []
        self._logits: dict[int, list[torch.Tensor]] = {}
        self._generated = 0

    def generate(
        self,
        requests: Sequence[Request],
        on_step: Callable[[EngineStatus], None] | None = None,
    ) -> GenerationResult:
        """Serves ``requests`` (queued in order) until all are done; ``on_step`` sees the
        status after every step. Raises RequestTooLarge, before any work, for a request the
        pool or the model could never hold."""
        for request in requests:
            self.scheduler.check_fits(request)  # all of them first: refuse before queueing any
        for request in requests:
            self.scheduler.submit(request)
        device = self.model.embed.weight.device
        self._logits = {request.request_id: [] for request in requests}
        tokens: dict[int, list[int]] = {}
        peak_pages = self._generated = 0
        start = time.perf_counter()
        while not self.scheduler.idle:
            self.step()
            peak_pages = max(peak_pages, self.allocator.pages_in_use)
            for finished in self.scheduler.retire_finished():
                tokens[finished.request_id] = finished.output
            if on_step is not None:
                on_step(self.status())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        logits = None
        if self.keep_logits:
            logits = {request_id: torch.stack(rows) for request_id, rows in self._logits.items()}
        return GenerationResult(
            tokens={request.request_id: tokens[request.request_id] for request in requests},
            seconds=seconds,
            peak_kv_bytes=peak_pages * self.page_bytes,
            logits=logits,
        )

    def step(self) -> None:
        """Admission, a prefill chunk for each request still reading its prompt, then one
        decode step for all the others (the module docstring's steps 1-3)."""
        self.scheduler.admit()
        for running in self.scheduler.running:
            if not running.prefilled:
                self._prefill_chunk(running)
        decoding = [r for r in self.scheduler.running if r.prefilled and not r.finished]
        if decoding:
            self._decode(decoding)

    def status(self) -> EngineStatus:
        return EngineStatus(
            done=self.scheduler.done,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            pages_in_use=self.allocator.pages_in_use,
            num_pages=self.allocator.num_pages,
            generated_tokens=self._generated,
        )

    def _prefill_chunk(self, running: RunningRequest) -> None:
        prompt = running.request.prompt
        chunk = list(prompt[running.cached : running.cached + self.prefill_chunk])
        self.allocator.grow(running.request_id, running.cached + len(chunk))
        logits = self._forward([running], [chunk])
        running.cached += len(chunk)
        if running.prefilled:
            self._sample([running], logits)

    def _decode(self, batch: list[RunningRequest]) -> None:
        for running in batch:
            self.allocator.grow(running.request_id, running.cached + 1)
        logits = self._forward(batch, [[running.output[-1]] for running in batch])
        for running in batch:
            running.cached += 1
        self._sample(batch, logits)

    def _forward(self, batch: list[RunningRequest], tokens: list[list[int]]) -> torch.Tensor:
        """Runs ``tokens`` (one equally long list per request) through the model on top of each
        request's cache, appending their keys and values; float32 logits (batch, vocab) of each
        request's last token."""
        device = self.model.embed.weight.device
        block_table = torch.tensor(
            [self._table_row(running) for running in batch], dtype=torch.int32, device=device
        )
        cache_seqlens = torch.tensor(
            [running.cached for running in batch], dtype=torch.int32, device=device
        )

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attention(
                q,
                self.k_pools[layer],
                self.v_pools[layer],
                k,
                v,
                rotary_cos=self.rotary_cos,
                rotary_sin=self.rotary_sin,
                cache_seqlens=cache_seqlens,
                block_table=block_table,
                causal=True,
                rotary_interleaved=False,
            )

        self.batch = batch
        try:
            hidden = self.model(torch.tensor(tokens, device=device), attend)
        finally:
            self.batch = []
        return self.model.logits(hidden[:, -1])

    def _table_row(self, running: RunningRequest) -> list[int]:
        pages = list(self.allocator.pages_of(running.request_id))
        return pages + [UNUSED_PAGE] * (self.table_width - len(pages))

    def _sample(self, batch: list[RunningRequest], logits: torch.Tensor) -> None:
        """Greedy: each request's next token is its argmax (one read back for the batch)."""
        for running, token, row in zip(batch, logits.argmax(-1).tolist(), logits, strict=True):
            running.output.append(token)
            if self.keep_logits:
                self._logits[running.request_id].append(row.cpu())
        self._generated += len(batch)
