"""Host time of the Python layer per call, without a GPU.

    python benchmarks/bench_host_overhead.py [--calls 20000]

Times flash_attn_varlen_func and flash_attn_func (forward, with and without options) and one
forward + backward, from the public call to the extension, with a stand-in extension that returns
preallocated outputs: what is measured is the Python layer alone (validation, option conversion,
the registered ops' dispatch, autograd), which every call pays on top of the kernels. Run it in
two checkouts to compare their Python layers; it needs no GPU and no build.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

import flash_varlen  # noqa: E402
from flash_varlen import _extension, validation  # noqa: E402

TOTAL, NHEADS, HEAD_DIM = 64, 4, 64


def stand_in_extension() -> types.ModuleType:
    """Returns outputs of the contract's shapes at once (preallocated: nothing is computed)."""
    module = types.ModuleType(_extension.EXTENSION_NAME)
    out = torch.zeros(TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    lse = torch.zeros(NHEADS, TOTAL)
    fixed_out = torch.zeros(1, TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    fixed_lse = torch.zeros(1, NHEADS, TOTAL)
    empty, rng = torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.int64)
    module.varlen_fwd = lambda *args, **kwargs: (out, lse, empty, rng)
    module.fwd = lambda *args, **kwargs: (fixed_out, fixed_lse, empty, rng)
    # Gradients must not alias each other nor the backward's inputs (torch.library checks).
    # dq, dk, dv, then the empty placeholder of learnable_sink's gradient (no sink given).
    grads = (*(torch.zeros_like(out) for _ in range(3)), torch.empty(0))
    module.varlen_bwd = lambda *args, **kwargs: grads
    return module


def time_per_call(function, calls: int) -> float:
    """Median over 5 repeats of the mean time per call, in microseconds."""
    for _ in range(calls // 10):
        function()
    results = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        results.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(results)[len(results) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    _extension._cached = _extension._LoadResult(module=stand_in_extension(), reason="")
    # CPU tensors stand in for CUDA ones: the device check is the only rule they break.
    validation._check_devices = lambda *args: None

    q = torch.zeros(TOTAL, NHEADS, HEAD_DIM, dtype=torch.bfloat16)
    cu = torch.tensor([0, 20, TOTAL], dtype=torch.int32)
    q_fixed = q.view(1, TOTAL, NHEADS, HEAD_DIM)
    slopes = torch.ones(NHEADS)
    leaf = q.clone().requires_grad_()
    grad = torch.ones_like(q)

    def backward_step() -> None:
        out = flash_varlen.flash_attn_varlen_func(leaf, leaf, leaf, cu, cu, 44, 44, causal=True)
        torch.autograd.grad(out, leaf, grad)

    cases = {
        "varlen forward, defaults": lambda: flash_varlen.flash_attn_varlen_func(
            q, q, q, cu, cu, 44, 44
        ),
        "varlen forward, causal + window + softcap + ALiBi": lambda: (
            flash_varlen.flash_attn_varlen_func(
                q, q, q, cu, cu, 44, 44, causal=True, window_size=(16, 0), softcap=30.0,
                alibi_slopes=slopes,
            )
        ),
        "fixed forward, defaults": lambda: flash_varlen.flash_attn_func(q_fixed, q_fixed, q_fixed),
        "varlen forward + backward, causal": backward_step,
    }
    print(f"torch {torch.__version__}; microseconds per call, median of 5 x {args.calls} calls")
    for name, function in cases.items():
        print(f"{name:<52} {time_per_call(function, args.calls):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
