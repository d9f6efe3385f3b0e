"""Admission and continuous batching: which requests run, and in what state each one is.

No tensors here. The scheduler keeps a first-come-first-served queue of waiting requests and the
list of running ones; it admits the head of the queue whenever the page pool can reserve the
request's worst case and fewer than ``max_running`` requests run, and retires requests as soon
as they have all their tokens, which frees their pages for the queue. The queue is strict FIFO
(a request never overtakes an earlier one, even if it would fit): simple and starvation-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .pages import PageAllocator
from .requests import Request


class RequestTooLarge(ValueError):
    """A request that could never be admitted: the message names the limit."""


@dataclass
class RunningRequest:
    """An admitted request: how much of it is cached, and what it has generated."""

    request: Request
    cached: int = 0  # tokens whose keys and values are in the cache
    output: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.request.prompt)

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.request.max_new_tokens


class Scheduler:
    """The waiting queue and the running list over one page allocator (module docstring)."""

    def __init__(self, allocator: PageAllocator, max_running: int, max_positions: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.allocator = allocator
        self.max_running = max_running
        self.max_positions = max_positions
        self.waiting: deque[Request] = deque()
        self.running: list[RunningRequest] = []
        self.done = 0  # requests retired so far

    def submit(self, request: Request) -> None:
        """Queues ``request`` (RequestTooLarge if it could never be admitted: ``check_fits``)."""
        self.check_fits(request)
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Raises RequestTooLarge if no state of the pool could ever admit ``request``: it needs
        more pages than the whole pool, or more positions than the model has."""
        if request.total_tokens > self.max_positions:
            raise RequestTooLarge(
                f"request {request.request_id} has {request.total_tokens} tokens (prompt "
                f"{len(request.prompt)} + {request.max_new_tokens} generated), more than the "
                f"model's {self.max_positions} positions"
            )
        pages = self.allocator.pages_for(request.cached_tokens)
        if pages > self.allocator.num_pages:
            raise RequestTooLarge(
                f"request {request.request_id} needs {pages} pages of "
                f"{self.allocator.page_size} tokens ({request.cached_tokens} cached tokens: the "
                f"prompt's {len(request.prompt)} and {request.max_new_tokens - 1} generated ones "
                f"fed back), more than the whole pool of {self.allocator.num_pages} pages: it "
                f"could never be admitted"
            )

    def admit(self) -> list[RunningRequest]:
        """Moves requests from the head of the queue to the running list while they fit;
        returns the admitted ones."""
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            request = self.waiting[0]
            pages = self.allocator.pages_for(request.cached_tokens)
            if not self.allocator.reserve(request.request_id, pages):
                break  # waits until finishing requests free enough pages
            self.waiting.popleft()
            admitted.append(RunningRequest(request))
        self.running.extend(admitted)
        return admitted

    def retire_finished(self) -> list[RunningRequest]:
        """Removes the requests that have all their tokens and frees their pages."""
        finished = [running for running in self.running if running.finished]
        for running in finished:
            self.allocator.release(running.request_id)
        self.running = [running for running in self.running if not running.finished]
        self.done += len(finished)
        return finished

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
