"""The demo's model: a small decoder-only transformer with random weights.

The model knows nothing about caches. Each layer hands its queries, keys and values (not yet
rotated) to an ``Attend`` callback and continues with what it returns; the paged engine and the
padded baseline implement that callback differently (the engine lets
``flash_attn_with_kvcache`` rotate, append and attend; the baseline rotates, writes its
contiguous cache and runs SDPA). Both paths therefore run the same weights and the same
arithmetic everywhere but in attention.

Rotary embeddings rotate dims (i, i + head_dim / 2) (GPT-NeoX's pairing:
``rotary_interleaved=False`` in flash-attn's terms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, q (batch, seqlen, nheads, d), k, v (batch, seqlen, nheads_k, d)) -> out (batch,
seqlen, nheads, d). q and k arrive unrotated: rotating them is the callback's job."""

ROPE_BASE = 10000.0
MLP_RATIO = 4
ATTENTION_GAIN = 2.0  # see DecoderModel


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden: int
    layers: int
    nheads: int
    nheads_k: int
    head_dim: int
    # The longest request (prompt + generated tokens) the model serves: rotary positions and
    # the width of the engine's block table are sized from it.
    max_positions: int

    def __post_init__(self) -> None:
        if self.nheads % self.nheads_k:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of nheads_k")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {self.head_dim}")


def rotary_tables(
    num_positions: int, head_dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin (num_positions, head_dim / 2): the angles of every rotary pair at
    positions 0 .. num_positions - 1, as flash_attn_with_kvcache's rotary_cos/sin take them."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(num_positions, device=device).float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """x (batch, seqlen, heads, d) rotated at ``positions`` (batch, seqlen): pairs
    (i, i + d / 2), computed in float32 and rounded to x's dtype once, as
    flash_attn_with_kvcache rotates (so that both paths round the same way)."""
    cos = cos[positions].unsqueeze(2)  # (batch, seqlen, 1, d / 2): broadcast over heads
    sin = sin[positions].unsqueeze(2)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: grouped-query attention (through ``attend``), then a GELU MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        q_width = config.nheads * config.head_dim
        kv_width = config.nheads_k * config.head_dim
        self.split = [q_width, kv_width, kv_width]
        self.attn_norm = nn.RMSNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, sum(self.split), bias=False)
        self.out = nn.Linear(q_width, config.hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(config.hidden)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden, MLP_RATIO * config.hidden, bias=False),
            nn.GELU(),
            nn.Linear(MLP_RATIO * config.hidden, config.hidden, bias=False),
        )

    def forward(
        self,
        x: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        q, k, v = (
            t.unflatten(-1, (-1, self.head_dim))
            for t in self.qkv(self.attn_norm(x)).split(self.split, dim=-1)
        )
        x = x + self.out(attend(q, k, v).flatten(-2))
        return x + self.mlp(self.mlp_norm(x))


class DecoderModel(nn.Module):
    """Token ids (batch, seqlen) -> final hidden states; ``logits`` maps those to the vocabulary.

    Weights are random. PyTorch's default initialisation (unit-variance embeddings, linear
    layers scaled by 1 / sqrt(fan_in)) gives nearly uniform attention (scores of standard
    deviation about 1/3) whose output hardly changes the residual stream: the generated tokens
    would then barely depend on what attention reads, and a broken cache could go unnoticed. So
    the attention projections are drawn larger (``ATTENTION_GAIN``): scores then have a standard
    deviation of about ATTENTION_GAIN ** 2, attention is peaked, and its output outweighs the
    embeddings (root mean square 2.6 against 1.0 in the demo's first layer, measured).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        for layer in self.layers:
            for projection in (layer.qkv, layer.out):
                fan_in = projection.weight.shape[1]
                nn.init.normal_(projection.weight, std=ATTENTION_GAIN / math.sqrt(fan_in))

    def forward(self, tokens: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            x = layer(x, lambda q, k, v, index=index: attend(index, q, k, v))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states (..., hidden), computed in float32 whatever the
        model's dtype: rounding logits to bf16 would tie close candidates of greedy sampling and
        hide smaller differences upstream from the tests' comparisons."""
        return F.linear(hidden.float(), self.lm_head.weight.float())


def build_model(
    config: ModelConfig, seed: int, device: torch.device | str, dtype: torch.dtype
) -> DecoderModel:
    """A model with seeded random weights, drawn on the CPU (the same weights on every device)
    and then moved; in inference mode (no gradients are ever needed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DecoderModel(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached token holds over all layers."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.layers * config.nheads_k * config.head_dim * element_size
