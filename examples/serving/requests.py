"""Requests, what a generation path returns, and the demo's random request queue."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Request:
    """Generate ``max_new_tokens`` tokens (greedy; no stop token: random weights have no
    end-of-text) after ``prompt``."""

    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.prompt or self.max_new_tokens < 1:
            raise ValueError(
                f"request {self.request_id}: needs a prompt and max_new_tokens >= 1, got "
                f"{len(self.prompt)} prompt tokens and max_new_tokens {self.max_new_tokens}"
            )

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the cache holds at the end: the prompt and every
        generated token but the last (which is never fed back)."""
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def total_tokens(self) -> int:
        return len(self.prompt) + self.max_new_tokens


@dataclass
class GenerationResult:
    """What a generation path produced, and at what cost."""

    tokens: dict[int, list[int]]  # request id -> generated tokens
    seconds: float
    # Bytes of K/V the path held at its peak (the paged pool's pages in use; the padded path's
    # largest batch of contiguous caches).
    peak_kv_bytes: int
    # request id -> float32 (max_new_tokens, vocab) logits each token was chosen from; kept
    # only when asked (the tests compare them).
    logits: dict[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def generated_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens.values())

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds


def random_requests(
    count: int,
    prompt_lengths: tuple[int, int],
    output_lengths: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> list[Request]:
    """``count`` requests with prompt and output lengths uniform in the inclusive ranges and
    uniformly random prompt tokens, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    requests = []
    for request_id in range(count):
        prompt = torch.randint(vocab_size, (draw(*prompt_lengths),), generator=generator)
        requests.append(Request(request_id, tuple(prompt.tolist()), draw(*output_lengths)))
    return requests
