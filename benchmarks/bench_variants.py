"""Time of each attention variant relative to plain causal attention (issue 4).

    python benchmarks/bench_variants.py

One varlen batch of BATCH x SEQLEN tokens (bf16, NHEADS heads, head dim HEAD_DIM), causal; the
forward (``flash_attn_varlen_func``) and forward + backward (``torch.autograd.grad`` of its
output) of each variant, timed with ``triton.testing.do_bench``, printed as a Markdown table with
the ratio to the plain causal run. Correctness is the job of tests/test_variants_gpu.py; this
only times.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import flash_varlen

BATCH, SEQLEN, NHEADS, HEAD_DIM = 8, 4096, 16, 128
WINDOW_LEFT = 1023
SOFTCAP = 30.0  # Gemma 2's attention soft-cap
DROPOUT_P = 0.1
WARMUP_MS, REPEAT_MS = 50, 200
SEED = 0


def alibi_slopes(nheads: int) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, 2^(-8 (h + 1) / nheads)."""
    return torch.tensor([2 ** (-8 * (h + 1) / nheads) for h in range(nheads)], device="cuda")


def main() -> None:
    torch.manual_seed(SEED)
    cu_seqlens = torch.arange(
        0, (BATCH + 1) * SEQLEN, SEQLEN, dtype=torch.int32, device="cuda"
    )
    q, k, v = (
        torch.randn(BATCH * SEQLEN, NHEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        .requires_grad_()
        for _ in range(3)
    )
    dout = torch.randn_like(q)
    slopes = alibi_slopes(NHEADS)
    variants = {
        "plain causal": {},
        f"window ({WINDOW_LEFT}, 0)": {"window_size": (WINDOW_LEFT, 0)},
        f"softcap {SOFTCAP:g}": {"softcap": SOFTCAP},
        "alibi": {"alibi_slopes": slopes},
        f"dropout {DROPOUT_P:g}": {"dropout_p": DROPOUT_P},
        "softcap + alibi + dropout": {
            "softcap": SOFTCAP, "alibi_slopes": slopes, "dropout_p": DROPOUT_P
        },
    }
    print("| variant | fwd ms | fwd+bwd ms | fwd x plain | fwd+bwd x plain |")
    print("| --- | --- | --- | --- | --- |")
    plain = None
    for name, options in variants.items():
        def forward(options=options):
            return flash_varlen.flash_attn_varlen_func(
                q, k, v, cu_seqlens, cu_seqlens, SEQLEN, SEQLEN, causal=True, **options
            )

        def forward_backward(forward=forward):
            return torch.autograd.grad(forward(), (q, k, v), dout)

        times = (
            do_bench(forward, warmup=WARMUP_MS, rep=REPEAT_MS),
            do_bench(forward_backward, warmup=WARMUP_MS, rep=REPEAT_MS),
        )
        plain = plain or times
        print(
            f"| {name} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / plain[0]:.2f} | "
            f"{times[1] / plain[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
