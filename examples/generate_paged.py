"""Serve a queue of generation requests from a paged KV cache by continuous batching.

A small decoder-only transformer with random weights (4 layers, hidden 512, GQA with 8 query and
2 key/value heads of dim 64, rotary embeddings, bf16) generates greedily for a queue of requests
of random prompt and output lengths. The paged engine keeps every layer's keys and values in one
pool of fixed-size pages; a request is admitted as soon as the pool can reserve its pages, its
prompt is prefilled in chunks, and every step decodes all running requests in one
``flash_attn_with_kvcache`` call per layer (block_table + cache_seqlens; new keys and values are
appended in place by the call); a finished request's pages go straight to the next one. A status
line shows requests done / running / waiting, pages in use and tokens/s.

Then the same model generates the same requests the way a loop without paged attention would:
static batches, each request with a contiguous cache padded to its batch's longest prompt plus
longest output, ``torch.nn.functional.scaled_dot_product_attention`` under a padding mask, every
batch decoding until its longest request is done. The report compares generated tokens/s (prefill
included), K/V memory, and the greedy tokens of the two paths.

    python examples/generate_paged.py                      # GPU: 256 requests, page size 16
    python examples/generate_paged.py --requests 64 --prompt-len 8 2000 --page-size 1
    python examples/generate_paged.py --cpu-reference      # tiny CPU run, reference attention

The GPU mode needs CUDA and the compiled extension (with the decode kernels for bf16 and the
head dim). On a machine without a GPU the script says so and runs ``--cpu-reference`` instead: a
tiny float32 model on the CPU with the pure-PyTorch reference attention in the engine (slow, but
it runs this whole script); there both paths compute in float32 and must produce identical
tokens, and the script exits 1 if they do not. In bf16 they need not: the two paths round
differently, and a flipped near-tie changes every later token of a request
(tests/test_generate_paged_gpu.py checks the kernels' logits against float32 instead). With a GPU
but no usable extension it exits 2 and says why.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script from a checkout (extension built in place): make flash_varlen importable.
    # Appended, not prepended, so an installed flash_varlen wins over the source tree. The
    # serving package sits next to this file, on sys.path already.
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from serving.attention import KVCacheAttention, reference_attention  # noqa: E402
from serving.model import DecoderModel, ModelConfig, build_model, kv_bytes_per_token  # noqa: E402
from serving.padded_baseline import generate_padded  # noqa: E402
from serving.paged_engine import EngineStatus, PagedEngine  # noqa: E402
from serving.requests import GenerationResult, Request, random_requests  # noqa: E402
from serving.scheduler import RequestTooLarge  # noqa: E402

from flash_varlen import _extension, flash_attn_with_kvcache  # noqa: E402
from flash_varlen.kvcache_decode import build_kernel_check  # noqa: E402

MIB = 2**20
EXTENSION_UNAVAILABLE_EXIT_CODE = 2
TOKENS_DIFFER_EXIT_CODE = 1
REQUEST_TOO_LARGE_EXIT_CODE = 3
WARMUP_REQUESTS = 2  # untimed first requests on the GPU (cuBLAS set-up, the allocator's growth)

GPU_DEFAULTS = dict(
    requests=256,
    prompt_len=(16, 1024),
    output_len=(16, 512),
    page_size=16,
    num_pages=4096,
    max_running=64,
    prefill_chunk=512,
    layers=4,
    hidden=512,
    vocab=8192,
)
CPU_DEFAULTS = dict(
    requests=8,
    prompt_len=(4, 40),
    output_len=(2, 16),
    page_size=4,
    num_pages=48,
    max_running=4,
    prefill_chunk=16,
    layers=2,
    hidden=64,
    vocab=256,
)
GPU_HEADS = dict(nheads=8, nheads_k=2)
CPU_HEADS = dict(nheads=4, nheads_k=2, head_dim=16)


class StatusLine:
    """One line of progress on stderr, rewritten in place on a terminal; elsewhere (a log file,
    a pipe) a new line every LOG_INTERVAL_S seconds, so that logs stay readable."""

    TERMINAL_INTERVAL_S = 0.1
    LOG_INTERVAL_S = 5.0

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.terminal = sys.stderr.isatty()
        self.interval = self.TERMINAL_INTERVAL_S if self.terminal else self.LOG_INTERVAL_S
        self.start = self.last_shown = time.perf_counter()

    def show(self, done: int, running: int, waiting: int, memory: str, generated: int) -> None:
        now = time.perf_counter()
        final = done == self.total
        if not self.enabled or (now - self.last_shown < self.interval and not final):
            return
        self.last_shown = now
        rate = generated / max(now - self.start, 1e-9)
        text = (
            f"{self.label}: done {done}/{self.total}, running {running}, waiting {waiting}, "
            f"{memory}, {rate:,.0f} tokens/s"
        )
        if self.terminal:
            # \r returns to the start of the line, \x1b[K clears what a longer line left.
            end = "\n" if final else ""
            print(f"\r{text}\x1b[K", end=end, file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def run_paged(
    model: DecoderModel,
    attention: KVCacheAttention,
    requests: list[Request],
    args: argparse.Namespace,
    progress: bool,
) -> GenerationResult:
    engine = PagedEngine(
        model,
        attention,
        num_pages=args.num_pages,
        page_size=args.page_size,
        max_running=args.max_running,
        prefill_chunk=args.prefill_chunk,
    )
    line = StatusLine("paged", len(requests), progress)

    def on_step(status: EngineStatus) -> None:
        pages = f"pages {status.pages_in_use}/{status.num_pages}"
        line.show(status.done, status.running, status.waiting, pages, status.generated_tokens)

    return engine.generate(requests, on_step)


def run_padded(
    model: DecoderModel, requests: list[Request], args: argparse.Namespace, progress: bool
) -> GenerationResult:
    line = StatusLine("padded", len(requests), progress)

    def on_batch(done: int, generated: int) -> None:
        running = min(args.max_running, len(requests) - done)
        line.show(done, running, len(requests) - done - running, "contiguous caches", generated)

    return generate_padded(model, requests, args.max_running, on_batch=on_batch)


def print_report(
    args: argparse.Namespace,
    attention_name: str,
    paged: GenerationResult,
    padded: GenerationResult | None,
    pool_bytes: int,
) -> bool:
    """Prints the comparison; returns whether the greedy tokens agree where they must (float32
    runs: every token of every request)."""
    count = len(paged.tokens)
    print(f"[paged: continuous batching, {attention_name}, page size {args.page_size}]")
    print(
        f"  {count} requests, {paged.generated_tokens:,} generated tokens in "
        f"{paged.seconds:.2f} s: {paged.tokens_per_s:,.0f} tokens/s"
    )
    print(
        f"  K/V memory: a pool of {args.num_pages:,} pages ({pool_bytes / MIB:,.1f} MiB), at "
        f"most {paged.peak_kv_bytes / MIB:,.1f} MiB of it in use"
    )
    if padded is None:
        return True
    print(f"[padded: static batches of {args.max_running}, scaled_dot_product_attention]")
    print(
        f"  {count} requests, {padded.generated_tokens:,} generated tokens in "
        f"{padded.seconds:.2f} s: {padded.tokens_per_s:,.0f} tokens/s"
    )
    print(f"  K/V memory: {padded.peak_kv_bytes / MIB:,.1f} MiB of contiguous caches at most")
    same = sum(paged.tokens[i] == padded.tokens[i] for i in paged.tokens)
    same_first = sum(paged.tokens[i][0] == padded.tokens[i][0] for i in paged.tokens)
    print("[comparison: same model, requests and greedy sampling]")
    if args.cpu_reference:
        # The reference attention loops over sequences in Python: timing it means nothing.
        print("  speed-up: not measured (the CPU reference attention is not built for speed)")
    else:
        print(f"  speed-up: {paged.tokens_per_s / padded.tokens_per_s:.2f}x (generated tokens/s)")
    print(f"  greedy tokens identical: {same}/{count} requests (first token: {same_first}/{count})")
    if args.cpu_reference:
        return same == count
    print(
        "  (bf16: the paths round differently and a flipped near-tie changes every later token "
        "of its request; identical tokens are expected only in float32, --cpu-reference)"
    )
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="In parentheses: the default of the GPU mode; of --cpu-reference. "
        "The module docstring says what the report shows.",
    )
    add = parser.add_argument
    add("--requests", type=int, help="requests in the queue (256; 8)")
    add(
        "--prompt-len",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="prompt lengths, uniform (16 1024; 4 40)",
    )
    add(
        "--output-len",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="generated tokens per request, uniform (16 512; 2 16)",
    )
    add("--page-size", type=int, help="tokens per page, any value >= 1 (16; 4)")
    add("--num-pages", type=int, help="pages in the pool, per layer for K and V (4096; 48)")
    add(
        "--max-running",
        type=int,
        help="most requests decoded at once; also the padded path's batch size (64; 4)",
    )
    add("--prefill-chunk", type=int, help="prompt tokens per prefill call (512; 16)")
    add("--layers", type=int, help="transformer layers (4; 2)")
    add("--hidden", type=int, help="model width (512; 64)")
    add(
        "--head-dim",
        type=int,
        default=64,
        choices=(64, 128),
        help="GPU head dim, a decode-kernel bucket (64; the CPU model uses 16)",
    )
    add("--vocab", type=int, help="vocabulary size (8192; 256)")
    add("--seed", type=int, default=0, help="seed of the weights and the requests (0)")
    add("--no-baseline", dest="baseline", action="store_false", help="skip the padded path")
    add("--no-progress", dest="progress", action="store_false", help="no status line")
    add(
        "--cpu-reference",
        action="store_true",
        help="tiny float32 CPU run with flash_varlen.reference as the engine's attention",
    )
    args = parser.parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.cpu_reference else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = ("requests", "page_size", "num_pages", "max_running", "prefill_chunk", "layers")
    if any(getattr(args, name) < 1 for name in positive):
        parser.error(
            "--" + ", --".join(name.replace("_", "-") for name in positive) + " must be >= 1"
        )
    for name in ("prompt_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {low} {high}")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    heads = CPU_HEADS if args.cpu_reference else {**GPU_HEADS, "head_dim": args.head_dim}
    return ModelConfig(
        vocab_size=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        max_positions=args.prompt_len[1] + args.output_len[1],
        **heads,
    )


def decode_kernel_missing(head_dim: int) -> str | None:
    """Why this build cannot run the paged bf16 attention of ``head_dim`` on this GPU (the
    decode kernels serve every paged call), or None: said before any work rather than by the
    first attention call."""
    probe = torch.empty(1, 1, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    return build_kernel_check(probe)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_reference and not torch.cuda.is_available():
        print(
            "note: no CUDA GPU is available (torch.cuda.is_available() is False), so this runs "
            "the CPU-reference mode (--cpu-reference): a tiny float32 model served on the CPU "
            "with the PyTorch reference attention (flash_varlen.reference), no kernels.",
            file=sys.stderr,
        )
        args = parse_args([*(sys.argv[1:] if argv is None else argv), "--cpu-reference"])
    elif not args.cpu_reference and (reason := _extension.unavailable_reason()):
        print(
            f"error: this example serves on the GPU, but {reason}\n"
            "Run with --cpu-reference to serve a tiny model on the CPU with the PyTorch "
            "reference attention (flash_varlen.reference) instead.",
            file=sys.stderr,
        )
        return EXTENSION_UNAVAILABLE_EXIT_CODE
    elif not args.cpu_reference and (reason := decode_kernel_missing(args.head_dim)):
        print(f"error: the engine needs the decode kernels, but {reason}", file=sys.stderr)
        return EXTENSION_UNAVAILABLE_EXIT_CODE
    if args.cpu_reference:
        device, dtype = torch.device("cpu"), torch.float32
        attention, attention_name = reference_attention, "flash_varlen.reference"
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        attention, attention_name = flash_attn_with_kvcache, "flash_attn_with_kvcache"
    config = model_config(args)
    model = build_model(config, args.seed, device, dtype)
    requests = random_requests(
        args.requests, args.prompt_len, args.output_len, config.vocab_size, args.seed
    )
    if device.type == "cuda":
        warmup = requests[:WARMUP_REQUESTS]
        run_paged(model, attention, warmup, args, progress=False)
        if args.baseline:
            run_padded(model, warmup, args, progress=False)
    try:
        paged = run_paged(model, attention, requests, args, args.progress)
    except RequestTooLarge as refusal:
        print(f"error: {refusal}; raise --num-pages or shorten the requests", file=sys.stderr)
        return REQUEST_TOO_LARGE_EXIT_CODE
    padded = run_padded(model, requests, args, args.progress) if args.baseline else None
    pool_bytes = args.num_pages * args.page_size * kv_bytes_per_token(config, dtype)
    if not print_report(args, attention_name, paged, padded, pool_bytes):
        print("error: float32 paths gave different greedy tokens", file=sys.stderr)
        return TOKENS_DIFFER_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
