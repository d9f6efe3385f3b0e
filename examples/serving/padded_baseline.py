"""The baseline: static batches, a contiguous padded cache per request, and SDPA.

What a serving loop without paged attention does: take ``batch_size`` requests, give each one a
contiguous cache row as long as the batch's longest prompt plus its longest output, prefill the
right-padded prompts in one call, then decode the whole batch until its longest request is done
(finished requests keep computing: that is the padding's cost) before starting the next batch.
Attention is ``torch.nn.functional.scaled_dot_product_attention`` under a boolean mask (causal
and key padding). Same model, same greedy sampling as the paged engine.

``teacher_forced_logits`` (one padded forward over prompts and given outputs, no cache) is the
check of any generation path: the logits every token was chosen from, recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .model import DecoderModel, apply_rotary, kv_bytes_per_token, rotary_tables
from .requests import GenerationResult, Request

KVWriter = Callable[[int, torch.Tensor, torch.Tensor], None]
"""(layer, rotated k, v (batch, seqlen, nheads_k, d)): stores a prefill's keys and values."""

# Any valid token id: padding positions are masked out as keys, and their outputs are dropped.
PAD_TOKEN = 0


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA on (batch, seqlen, heads, d) tensors (GQA: query head h reads kv head
    h // (nheads / nheads_k), as flash_varlen does) under mask (batch, 1, seqlen_q, seqlen_k)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def padded_forward(
    model: DecoderModel, sequences: Sequence[Sequence[int]], write_kv: KVWriter | None = None
) -> torch.Tensor:
    """Hidden states (batch, longest, hidden) of right-padded ``sequences``, each causal from
    position 0; ``write_kv`` receives every layer's rotated keys and values."""
    device = model.embed.weight.device
    longest = max(len(sequence) for sequence in sequences)
    tokens = torch.full((len(sequences), longest), PAD_TOKEN, device=device)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, device=device)
    lengths = torch.tensor([len(sequence) for sequence in sequences], device=device)
    index = torch.arange(longest, device=device)
    # Query i sees key j iff j <= i and j is real. Padded query rows still see real keys (a
    # row with none would be NaN); their outputs are never used.
    mask = (index[None, :] <= index[:, None])[None] & (index < lengths[:, None])[:, None, :]
    positions = index.expand(len(sequences), longest)
    cos, sin = rotary_tables(longest, model.config.head_dim, device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = apply_rotary(q, cos, sin, positions), apply_rotary(k, cos, sin, positions)
        if write_kv is not None:
            write_kv(layer, k, v)
        return sdpa(q, k, v, mask.unsqueeze(1))

    return model(tokens, attend)


def teacher_forced_logits(
    model: DecoderModel, requests: Sequence[Request], outputs: dict[int, list[int]]
) -> dict[int, torch.Tensor]:
    """For each request, float32 (len(output), vocab): the logits that output token i was
    chosen from, recomputed in one forward over the prompt and the outputs before it."""
    sequences = [list(request.prompt) + outputs[request.request_id][:-1] for request in requests]
    hidden = padded_forward(model, sequences)
    logits = {}
    for row, request in enumerate(requests):
        first = len(request.prompt) - 1  # the prompt's last position predicts output token 0
        count = len(outputs[request.request_id])
        logits[request.request_id] = model.logits(hidden[row, first : first + count])
    return logits


def generate_padded(
    model: DecoderModel,
    requests: Sequence[Request],
    batch_size: int,
    keep_logits: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generates ``requests`` in static batches of ``batch_size`` (in order); ``on_batch(done,
    generated_tokens)`` is told after each batch."""
    device = model.embed.weight.device
    tokens: dict[int, list[int]] = {}
    logits: dict[int, torch.Tensor] = {}
    peak_bytes = 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        batch_tokens, batch_logits, kv_bytes = _generate_batch(model, batch, keep_logits)
        tokens.update(batch_tokens)
        logits.update(batch_logits)
        peak_bytes = max(peak_bytes, kv_bytes)
        if on_batch is not None:
            on_batch(first + len(batch), sum(len(t) for t in tokens.values()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return GenerationResult(
        tokens=tokens,
        seconds=time.perf_counter() - start,
        peak_kv_bytes=peak_bytes,
        logits=logits if keep_logits else None,
    )


def _generate_batch(
    model: DecoderModel, batch: Sequence[Request], keep_logits: bool
) -> tuple[dict[int, list[int]], dict[int, torch.Tensor], int]:
    """One static batch: its tokens, logits (empty unless kept) and cache bytes."""
    config = model.config
    device = model.embed.weight.device
    prompt_lengths = [len(request.prompt) for request in batch]
    steps = max(request.max_new_tokens for request in batch)
    # Every row decodes for the longest request's steps, so every row needs that much room.
    capacity = max(prompt_lengths) + steps
    cache_shape = (len(batch), capacity, config.nheads_k, config.head_dim)
    weight = model.embed.weight
    k_caches = [weight.new_zeros(cache_shape) for _ in range(config.layers)]
    v_caches = [weight.new_zeros(cache_shape) for _ in range(config.layers)]

    def write_prompt(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k_caches[layer][:, : k.shape[1]] = k
        v_caches[layer][:, : v.shape[1]] = v

    hidden = padded_forward(model, [request.prompt for request in batch], write_prompt)
    lengths = torch.tensor(prompt_lengths, device=device)  # cached tokens per row
    step_logits = model.logits(hidden[torch.arange(len(batch), device=device), lengths - 1])
    rotary = rotary_tables(capacity, config.head_dim, device)
    # Chosen tokens stay on the device until the batch is done: no read back per step.
    chosen, kept_logits = [step_logits.argmax(-1)], [step_logits]
    for _ in range(steps - 1):
        step_logits = _decode_step(model, k_caches, v_caches, chosen[-1], lengths, rotary)
        lengths = lengths + 1
        chosen.append(step_logits.argmax(-1))
        if keep_logits:
            kept_logits.append(step_logits)
    chosen_rows = torch.stack(chosen, dim=1).tolist()  # (batch, steps)
    tokens, logits = {}, {}
    for row, request in enumerate(batch):
        tokens[request.request_id] = chosen_rows[row][: request.max_new_tokens]
        if keep_logits:
            request_logits = torch.stack([step[row] for step in kept_logits])
            logits[request.request_id] = request_logits[: request.max_new_tokens].cpu()
    kv_bytes = len(batch) * capacity * kv_bytes_per_token(config, weight.dtype)
    return tokens, logits, kv_bytes


def _decode_step(
    model: DecoderModel,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Feeds tokens (batch,) at positions ``lengths`` (batch,): their keys and values are
    written into the contiguous caches (batch, capacity, nheads_k, d) there, and each attends
    to positions 0 .. lengths[b] of its row. float32 logits (batch, vocab)."""
    rows = torch.arange(len(tokens), device=tokens.device)
    positions = lengths[:, None]
    slots = torch.arange(k_caches[0].shape[1], device=tokens.device)
    mask = (slots[None, :] <= lengths[:, None])[:, None, None, :]  # the new key included

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = apply_rotary(q, *rotary, positions), apply_rotary(k, *rotary, positions)
        k_caches[layer][rows, lengths] = k[:, 0]
        v_caches[layer][rows, lengths] = v[:, 0]
        return sdpa(q, k_caches[layer], v_caches[layer], mask)

    return model.logits(model(tokens[:, None], attend)[:, 0])
