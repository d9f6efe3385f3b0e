"""Train a small decoder-only transformer on packed variable-length documents.

Every step draws synthetic documents of long-tailed random lengths, packs them back to back into
a fixed token budget (no padding anywhere) described by int32 ``cu_seqlens``, and runs causal
``flash_attn_varlen_func`` over the packed batch. Rotary positions restart in every document.
Each document repeats a random pattern of skewed-frequency tokens, so the loss falls: first as
the model learns the token frequencies, then much further as it learns to copy the pattern.

    python examples/train_packed.py                    # GPU: 4 layers, d 512, 16k tokens/step
    python examples/train_packed.py --compare          # also train with padded SDPA; speed-up
    python examples/train_packed.py --cpu-reference    # tiny CPU run with flash_varlen.reference

The GPU modes need CUDA and the compiled extension. On a machine without a GPU the script says so
and runs ``--cpu-reference`` instead, which trains a tiny model for a few steps on the CPU with
the pure-PyTorch reference attention (slow, but it runs this whole script, e.g. in CI). With a
GPU but no usable extension it exits with status 2 and says why: a broken build must not pass
for a working demo.

``--compare`` trains the same model again (same init seed, data, dtype, optimizer and steps)
with each step's documents padded to the longest one and
``torch.nn.functional.scaled_dot_product_attention`` under a causal + key-padding mask; tokens/s
counts only real tokens for both. The step-1 losses are directly comparable (identical weights
and data); later ones are not: the runs round differently and Adam amplifies the differences.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    # Run as a script from a checkout (extension built in place): make flash_varlen importable.
    # Appended, not prepended, so an installed flash_varlen wins over the source tree.
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from flash_varlen import _extension, flash_attn_varlen_func  # noqa: E402
from flash_varlen.reference import attention_ref_varlen  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # optional: without it, progress is a plain log line
    tqdm = None

VOCAB_SIZE = 256
MIN_DOC_LEN, MAX_DOC_LEN = 32, 2048
MIN_PATTERN_LEN, MAX_PATTERN_LEN = 4, 16  # period of the pattern a document repeats
ZIPF_EXPONENT = 1.0  # token i is drawn with weight 1 / (i + 1) ** ZIPF_EXPONENT
PAD_TOKEN = 0  # any valid id: padding is masked out of attention and carries no target
IGNORE_INDEX = -100  # cross_entropy's default: no target (a document's last token, padding)
ROPE_BASE = 10000.0
MLP_RATIO = 4
INIT_STD = 0.02
LEARNING_RATE = 1e-3
GRAD_CLIP_NORM = 1.0
MAX_WARMUP_STEPS = 10  # untimed first steps (allocator growth, kernel selection)
WARMUP_FRACTION = 5  # ... but at most 1/5 of the steps, so that short runs keep timed steps
LOG_EVERY = 10  # steps between progress updates (each one waits for the GPU to read the loss)
MIB = 2**20
KIB_PER_MIB = 1024
EXTENSION_UNAVAILABLE_EXIT_CODE = 2

GPU_DEFAULTS = dict(steps=300, tokens_per_step=16384, layers=4, d_model=512, heads=8)
CPU_DEFAULTS = dict(steps=5, tokens_per_step=256, layers=2, d_model=64, heads=4)

# Skewed token frequencies give the model something to learn within a few steps (tiny CPU runs).
TOKEN_WEIGHTS = 1.0 / torch.arange(1, VOCAB_SIZE + 1, dtype=torch.float64) ** ZIPF_EXPONENT

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q (..., heads, d), k and v (..., kv_heads, d) -> out (..., heads, d), causal per document."""


def sample_documents(gen: torch.Generator, token_budget: int) -> list[torch.Tensor]:
    """Documents (int64 token ids) whose lengths add up to exactly ``token_budget``.

    Lengths are log-uniform in [MIN_DOC_LEN, min(MAX_DOC_LEN, budget)] (many short documents, a
    few long ones); the last document is cut to what is left of the budget.
    """
    log_low, log_high = math.log(MIN_DOC_LEN), math.log(min(MAX_DOC_LEN, token_budget) + 1)
    docs: list[torch.Tensor] = []
    used = 0
    while used < token_budget:
        draw = torch.rand((), generator=gen).item()
        length = min(int(math.exp(log_low + draw * (log_high - log_low))), token_budget - used)
        period = int(torch.randint(MIN_PATTERN_LEN, MAX_PATTERN_LEN + 1, (), generator=gen))
        pattern = torch.multinomial(TOKEN_WEIGHTS, period, replacement=True, generator=gen)
        docs.append(pattern.repeat(math.ceil(length / period))[:length])
        used += length
    return docs


def next_token_targets(doc: torch.Tensor) -> torch.Tensor:
    """Each token's target is the next one; the last has none (documents are independent)."""
    return torch.cat([doc[1:], torch.tensor([IGNORE_INDEX])])


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (total,) documents back to back
    positions: torch.Tensor  # (total,) restart at 0 in every document
    targets: torch.Tensor  # (total,)
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32 prefix sums of the lengths
    max_seqlen: int


def pack_documents(docs: list[torch.Tensor], device: torch.device) -> PackedBatch:
    lengths = torch.tensor([len(doc) for doc in docs])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # leading 0
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])
    targets = torch.cat([next_token_targets(doc) for doc in docs])
    return PackedBatch(
        *(t.to(device) for t in (torch.cat(docs), positions, targets, cu_seqlens)),
        max_seqlen=int(lengths.max()),
    )


@dataclass
class PaddedBatch:
    tokens: torch.Tensor  # (num_docs, max_len), PAD_TOKEN after each document
    positions: torch.Tensor  # (num_docs, max_len)
    targets: torch.Tensor  # (num_docs, max_len), IGNORE_INDEX on padding
    mask: torch.Tensor  # (num_docs, 1, max_len, max_len) bool, True = may attend


def padded_attention_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """SDPA mask (batch, 1, max_len, max_len): query i sees key j iff j <= i and j < length.

    Padded query rows keep their causal view of the real keys instead of being masked entirely:
    a row with no visible key makes SDPA return NaN, which the backward pass would spread. Their
    outputs are harmless: no real query sees a padded key, and padding carries no target.
    """
    index = torch.arange(max_len, device=lengths.device)
    causal = index[None, :] <= index[:, None]  # (query, key)
    real_key = index[None, :] < lengths[:, None]  # (batch, key)
    return (causal[None] & real_key[:, None, :]).unsqueeze(1)


def pad_documents(docs: list[torch.Tensor], device: torch.device) -> PaddedBatch:
    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value).to(device)

    tokens = pad(docs, PAD_TOKEN)
    positions = pad([torch.arange(len(doc)) for doc in docs], 0)  # any: padding is not attended
    targets = pad([next_token_targets(doc) for doc in docs], IGNORE_INDEX)
    # Built on the device: the mask is the largest tensor of the step.
    lengths = torch.tensor([len(doc) for doc in docs], device=device)
    return PaddedBatch(tokens, positions, targets, padded_attention_mask(lengths, tokens.shape[1]))


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SDPA on (batch, max_len, heads, d) inputs under ``mask`` (padded_attention_mask)."""
    # Grouped-query attention as flash_varlen does it: query head h uses kv head h // group.
    group = q.shape[-2] // k.shape[-2]
    k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, max_len, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def make_batch(
    docs: list[torch.Tensor], layout: str, device: torch.device, use_reference: bool
) -> tuple[PackedBatch | PaddedBatch, Attend]:
    """The step's documents in the "packed" or "padded" layout, and attention for that layout."""
    if layout == "padded":
        padded = pad_documents(docs, device)
        return padded, lambda q, k, v: padded_attention(q, k, v, padded.mask)
    batch = pack_documents(docs, device)
    cu, max_len = batch.cu_seqlens, batch.max_seqlen
    if use_reference:
        return batch, lambda q, k, v: attention_ref_varlen(q, k, v, cu, cu, causal=True)[0]
    return batch, lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, causal=True
    )


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., 1, head_dim / 2) of the rotary angles; the 1 broadcasts over heads."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions[..., None, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Tables cast to x's dtype so that q and k stay bf16 under autocast (the kernel's input).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block; works on any leading shape (packed or padded tokens)."""

    def __init__(self, d_model: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.head_dim = d_model // heads
        self.split = [heads * self.head_dim, kv_heads * self.head_dim, kv_heads * self.head_dim]
        self.attn_norm = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, sum(self.split), bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, MLP_RATIO * d_model, bias=False),
            nn.GELU(),
            nn.Linear(MLP_RATIO * d_model, d_model, bias=False),
        )

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attend: Attend):
        q, k, v = (
            t.unflatten(-1, (-1, self.head_dim))  # views: the kernel reads v in place
            for t in self.qkv(self.attn_norm(x)).split(self.split, dim=-1)
        )
        out = attend(apply_rotary(q, *rotary), apply_rotary(k, *rotary), v)
        x = x + self.proj(out.flatten(-2))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, layers: int, d_model: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.head_dim = d_model // heads
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        for param in self.parameters():
            if param.dim() == 2:  # embeddings and projections; the norms keep their ones
                nn.init.normal_(param, std=INIT_STD)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend):
        rotary = rotary_tables(positions, self.head_dim)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, rotary, attend)
        return self.lm_head(self.norm(x))


class Progress:
    """A tqdm bar if tqdm is installed, else a log line every LOG_EVERY steps; or nothing."""

    def __init__(self, label: str, steps: int, enabled: bool) -> None:
        self.label, self.steps, self.enabled = label, steps, enabled
        self.bar = tqdm(total=steps, desc=label) if enabled and tqdm is not None else None
        self.tokens, self.since = 0, time.perf_counter()

    def update(self, step: int, loss: torch.Tensor, tokens: int) -> None:
        if not self.enabled:
            return
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update()
        if (step + 1) % LOG_EVERY and step + 1 < self.steps:
            return
        loss_value = loss.item()  # waits for the GPU, so the rate below covers finished work
        rate = self.tokens / (time.perf_counter() - self.since)
        text = f"loss {loss_value:.4f}, {rate:,.0f} tokens/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"{self.label} step {step + 1}/{self.steps}: {text}", flush=True)
        self.tokens, self.since = 0, time.perf_counter()
        if self.bar is not None and step + 1 == self.steps:
            self.bar.close()


@dataclass
class RunResult:
    name: str
    losses: list[float]  # one per step, before that step's update
    tokens_per_s: float  # real tokens over the timed steps
    warmup_steps: int
    peak_memory: str


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / MIB:,.1f} MiB (max allocated by torch)"
    # ru_maxrss is in KiB on Linux; it covers the whole process, not only this run.
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB
    return f"{max_rss_mib:,.1f} MiB (process max RSS)"


def train(args: argparse.Namespace, layout: str, device: torch.device) -> RunResult:
    """Trains a fresh model (seeded init and data) with the "packed" or "padded" layout."""
    on_gpu = device.type == "cuda"
    attention = "flash_varlen.reference" if args.cpu_reference else "flash_attn_varlen_func"
    name = f"packed, {attention}" if layout == "packed" else "padded, scaled_dot_product_attention"
    torch.manual_seed(args.seed)  # initialized on the CPU: identical weights for both layouts
    model = TinyLM(args.layers, args.d_model, args.heads, args.kv_heads).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    data_gen = torch.Generator().manual_seed(args.seed)
    warmup_steps = max(1, min(MAX_WARMUP_STEPS, args.steps // WARMUP_FRACTION))
    progress = Progress(layout, args.steps, args.progress)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[torch.Tensor] = []
    timed_tokens, start = 0, 0.0
    for step in range(args.steps):
        if step == warmup_steps:
            if on_gpu:
                torch.cuda.synchronize(device)  # queued warm-up work must not count as timed
            start = time.perf_counter()
        docs = sample_documents(data_gen, args.tokens_per_step)
        batch, attend = make_batch(docs, layout, device, args.cpu_reference)
        # bf16 autocast on the GPU (fp32 weights and optimizer state); plain fp32 on the CPU.
        with torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext():
            logits = model(batch.tokens, batch.positions, attend)
        # Mean over real targets only: padding and documents' last tokens are IGNORE_INDEX.
        loss = F.cross_entropy(
            logits.flatten(0, -2).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        losses.append(loss.detach())  # read after the loop: .item() here would sync every step
        real_tokens = sum(len(doc) for doc in docs)
        timed_tokens += real_tokens if step >= warmup_steps else 0
        progress.update(step, loss, real_tokens)
    if on_gpu:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return RunResult(
        name, [loss.item() for loss in losses], timed_tokens / elapsed, warmup_steps,
        peak_memory(device),
    )


def decreased(result: RunResult) -> bool:
    return result.losses[-1] < result.losses[0]


def print_report(result: RunResult, steps: int) -> None:
    print(f"[{result.name}]")
    print(f"  final loss: {result.losses[-1]:.4f} (step 1: {result.losses[0]:.4f})")
    print(f"  loss decreased: {'yes' if decreased(result) else 'NO'}")
    print(
        f"  tokens/s: {result.tokens_per_s:,.0f} (mean over {steps - result.warmup_steps} "
        f"timed steps after {result.warmup_steps} warm-up; real tokens only)"
    )
    print(f"  peak memory: {result.peak_memory}")


def print_comparison(packed: RunResult, padded: RunResult) -> None:
    step1_gap = abs(packed.losses[0] - padded.losses[0])
    print("[comparison: same init, data, dtype, optimizer and steps]")
    print(
        f"  step-1 loss (identical weights and data): packed {packed.losses[0]:.6f}, "
        f"padded {padded.losses[0]:.6f}, |difference| {step1_gap:.2e}"
    )
    both = decreased(packed) and decreased(padded)
    print(f"  both losses decreased: {'yes' if both else 'NO'}")
    print(f"  final loss: packed {packed.losses[-1]:.4f}, padded {padded.losses[-1]:.4f}")
    print(
        f"  tokens/s (real tokens): packed {packed.tokens_per_s:,.0f}, padded "
        f"{padded.tokens_per_s:,.0f}, speed-up {packed.tokens_per_s / padded.tokens_per_s:.2f}x"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (GPU 300, CPU 5)")
    parser.add_argument("--tokens-per-step", type=int, help="token budget (GPU 16384, CPU 256)")
    parser.add_argument("--layers", type=int, help="transformer blocks (GPU 4, CPU 2)")
    parser.add_argument("--d-model", type=int, help="model width (GPU 512, CPU 64)")
    parser.add_argument("--heads", type=int, help="query heads (GPU 8, CPU 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads for GQA (default --heads)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data")
    parser.add_argument("--compare", action="store_true", help="also train with padded SDPA")
    parser.add_argument(
        "--cpu-reference", action="store_true", help="tiny CPU run with the reference attention"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.cpu_reference else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    if args.d_model % args.heads or args.heads % args.kv_heads:
        parser.error("--d-model must be a multiple of --heads, and --heads of --kv-heads")
    if args.steps < 2 or args.tokens_per_step < MIN_DOC_LEN:
        parser.error(f"need --steps >= 2 (one warm-up) and --tokens-per-step >= {MIN_DOC_LEN}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_reference and not torch.cuda.is_available():
        print(
            "note: no CUDA GPU is available (torch.cuda.is_available() is False), so this runs "
            "the CPU-reference mode (--cpu-reference): a tiny model trained for a few steps on "
            "the PyTorch reference attention (flash_varlen.reference), no kernels.",
            file=sys.stderr,
        )
        args = parse_args([*(sys.argv[1:] if argv is None else argv), "--cpu-reference"])
    elif not args.cpu_reference and (reason := _extension.unavailable_reason()):
        print(
            f"error: this example trains on the GPU, but {reason}\n"
            "Run with --cpu-reference to train a tiny model on the CPU with the PyTorch "
            "reference attention (flash_varlen.reference) instead.",
            file=sys.stderr,
        )
        return EXTENSION_UNAVAILABLE_EXIT_CODE
    device = torch.device("cpu" if args.cpu_reference else "cuda")
    results = [train(args, "packed", device)]
    if args.compare:
        results.append(train(args, "padded", device))
    for result in results:
        print_report(result, args.steps)
    if args.compare:
        print_comparison(*results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
