"""Small forward + backward calls whose tiles hang past the ends of their tensors, meant to run
under compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/memcheck_backward.py

The backward kernels must never touch rows past a sequence's end or columns past the head dim,
neither when loading (q, k, v, out, dout, lse) nor when storing (dq, dk, dv) or adding into
the float32 dq accumulator. Every tensor here is allocated exactly, with lengths and head dims
that are not tile multiples, empty sequences (no queries, no keys, neither) and GQA/MQA head
groups, so a stray access leaves its allocation and the sanitizer reports it. Each case runs
causal and not, once with the default backward and out-only gradient, once with
deterministic=True (the dq semaphores) and a softmax_lse gradient as well. The last cases add
soft-capping, ALiBi and attention sinks (the sm90 backward's variants kernel and its row
kernel's sink term; the sink's gradient is checked too). Exits non-zero if a gradient is not
finite or far from the float32 reference.

Calls whose kernel a narrowed build lacks, and under FLASH_VARLEN_KERNEL_FAMILY=<family> the calls
that family does not serve (an option it lacks, a head dim it has no kernel for), are skipped and
listed; at least one case must run. `--cases 0,3-5` runs only those entries of CASES
(scripts/sanitizer_cases.py: racecheck over every case outlasts one device call).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_varlen import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flash_varlen.reference import attention_ref_varlen  # noqa: E402
from sanitizer_cases import selected_cases  # noqa: E402

# Soft-capping, ALiBi and attention sinks in one call: a cap inside the score range (tanh
# saturates, so its derivative matters), slopes of shape (batch, nheads) that differ per sequence
# and per head (a wrong sequence or query head within a GQA group reads another slope), and a sink
# per head (its gradient is a sum over every query row, the row kernel's terms).
VARIANTS = {"softcap": 2.0, "alibi": True, "sink": True}

# (seqlens_q, seqlens_k, nheads, nheads_k, head_dim[, VARIANTS]): tails of every size, empty
# sequences at both ends and in the middle, MQA and GQA, and head dims below their bucket so the
# column predicate is exercised.
CASES = [
    ([1, 70, 0, 129], [65, 3, 9, 0], 2, 1, 72),
    ([200], [131], 3, 3, 40),
    ([5, 77], [300, 1], 4, 2, 256),
    ([0, 33, 0, 17], [0, 33, 5, 130], 4, 2, 128),
    # MHA at d = 128, what the sm90 backward (issue 15) serves: one row block and more,
    # more queries than keys and fewer, a sequence without keys and one without queries.
    ([0, 65, 130, 1, 64], [70, 65, 0, 129, 200], 2, 2, 128),
    # And at d = 64 with GQA, which it serves too.
    ([0, 65, 130, 1, 64], [70, 65, 0, 129, 200], 4, 2, 64),
    # One long sequence among short ones: the sm90 backward's tiles then follow the varlen tile
    # schedule (longest first) rather than the grid order.
    ([*range(1, 31, 2), 700, *range(2, 30, 2)], [*range(1, 31, 2), 700, *range(2, 30, 2)], 2, 1,
     128),
    # The variants at the sm90 backward's two head dims, GQA (the kernel walks a group's query
    # heads inside a key block, each with its own slope); they run there only under
    # FLASH_VARLEN_KERNEL_FAMILY=sm90 until their speed is measured against the sm80 family's
    # (bwd_unsupported_option).
    ([0, 65, 130, 1, 64], [70, 65, 0, 129, 200], 4, 2, 128, VARIANTS),
    ([0, 65, 130, 1, 64], [70, 65, 0, 129, 200], 6, 2, 64, VARIANTS),
    # d = 64's 128-row steps (the variants' 64-row ones above): a length one under, at and over a
    # step, a sequence without keys, and a query count over two steps with fewer keys.
    ([127, 128, 5, 129, 300], [128, 40, 0, 129, 257], 2, 2, 64),
]
# (use softmax_lse's gradient, deterministic): the common path, then the other backward paths.
MODES = [(False, False), (True, False), (True, True)]
FAMILY_OVERRIDE = "FLASH_VARLEN_KERNEL_FAMILY"
# How dispatch refuses a call whose kernel a narrowed build (FLASH_VARLEN_HEAD_DIMS and the like)
# lacks, and a call a forced family does not serve.
NOT_BUILT = ": not in this build"
FAMILY_REFUSAL = ": does not implement "
DTYPE = torch.bfloat16
# bf16 gradients of randn inputs, relative to the largest reference gradient: this script hunts
# memory errors, not ulps (tests/test_backward_gpu.py checks accuracy).
TOLERANCE = 5e-2


def cu_seqlens(lengths: list[int], device: str) -> torch.Tensor:
    """(batch + 1,) int32 prefix sums of `lengths`, starting at 0."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def variant_options(variants: dict, batch: int, nheads: int, device: str) -> dict:
    """The keyword arguments of `variants` (VARIANTS) for flash_attn_varlen_func and the
    reference: float32 slopes (batch, nheads) and a float32 (nheads,) sink that requires grad."""
    options = {}
    if variants.get("softcap"):
        options["softcap"] = variants["softcap"]
    if variants.get("alibi"):
        options["alibi_slopes"] = 0.05 + 0.5 * torch.rand(batch, nheads, device=device)
    if variants.get("sink"):
        options["learnable_sink"] = torch.randn(nheads, device=device).requires_grad_()
    return options


def reference_gradients(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    dout: torch.Tensor, dlse: torch.Tensor | None, causal: bool, options: dict,
) -> tuple[torch.Tensor, ...]:
    """float32 autograd of the reference for the loss sum(out * dout) + sum(lse * dlse): the
    gradients of q, k, v, and of the sink when options has one."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    options = dict(options)
    if "learnable_sink" in options:
        options["learnable_sink"] = options["learnable_sink"].detach().clone().requires_grad_()
        leaves.append(options["learnable_sink"])
    out, lse = attention_ref_varlen(*leaves[:3], cu_q, cu_k, causal=causal, **options)
    if not out.requires_grad:  # every sequence is empty on one side
        return tuple(torch.zeros_like(x) for x in leaves)
    outputs, grads = [out], [dout.float()]
    if dlse is not None:
        # Rows without keys have lse = -inf (without a sink; with one, lse = sink there); their
        # gradient is 0 whatever dlse holds there.
        outputs.append(lse)
        grads.append(torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse)))
    return torch.autograd.grad(outputs, leaves, grads, allow_unused=True, materialize_grads=True)


def largest_error(grads: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> float:
    """Largest max|grad - ref| / max(1, max|ref|) over dq, dk, dv (and dsink); inf if one is not
    finite."""
    error = 0.0
    for grad, ref in zip(grads, refs):
        if not bool(torch.isfinite(grad).all()):
            return float("inf")
        if grad.numel():
            scale = max(1.0, float(ref.abs().max()))
            error = max(error, float((grad.float() - ref).abs().max()) / scale)
    return error


def run_case(case: tuple, causal: bool, use_lse: bool, deterministic: bool) -> bool:
    """One entry of CASES, forward and backward, against the float32 reference."""
    seqlens_q, seqlens_k, nheads, nheads_k, d, *variants = case
    device = "cuda"
    cu_q, cu_k = cu_seqlens(seqlens_q, device), cu_seqlens(seqlens_k, device)
    q = torch.randn(sum(seqlens_q), nheads, d, device=device, dtype=DTYPE, requires_grad=True)
    k = torch.randn(sum(seqlens_k), nheads_k, d, device=device, dtype=DTYPE, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    options = variant_options(variants[0], len(seqlens_q), nheads, device) if variants else {}
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(1, *seqlens_q), max(1, *seqlens_k), causal=causal,
        deterministic=deterministic, return_attn_probs=True, **options,
    )
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if use_lse else None
    outputs, grad_outputs = ([out, lse], [dout, dlse]) if use_lse else ([out], [dout])
    leaves = (q, k, v, *([options["learnable_sink"]] if "learnable_sink" in options else []))
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    refs = reference_gradients(q, k, v, cu_q, cu_k, dout, dlse, causal, options)
    error = largest_error(grads, refs)
    ok = error < TOLERANCE
    print(f"{'ok ' if ok else 'BAD'} varlen q={seqlens_q} k={seqlens_k} h={nheads}/{nheads_k} "
          f"d={d} causal={causal} lse_grad={use_lse} deterministic={deterministic} "
          f"options={sorted(options)} err={error:.3g}")
    return ok


def run_fixed_case() -> bool:
    """flash_attn_func, fp16, MQA, seqlen_q > seqlen_k (causal rows without keys), d=96."""
    q = torch.randn(2, 33, 2, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 17, 1, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    ok = all(bool(torch.isfinite(grad).all()) for grad in grads)
    print(f"{'ok ' if ok else 'BAD'} fixed q=(2, 33, 2, 96) k=(2, 17, 1, 96) fp16 causal")
    return ok


def served(run, *args) -> bool | None:
    """run(*args), or None (printed) where a narrowed build lacks the call's kernel or a forced
    kernel family does not serve the call."""
    try:
        return run(*args)
    except NotImplementedError as error:
        forced = os.environ.get(FAMILY_OVERRIDE)
        if NOT_BUILT in str(error):
            print(f"skip {run.__name__}{args}: kernel not in this build")
            return None
        if forced and FAMILY_REFUSAL in str(error):
            print(f"skip {run.__name__}{args}: {FAMILY_OVERRIDE}={forced} does not serve it")
            return None
        raise


def main() -> int:
    chosen = selected_cases(" ".join(__doc__.split("\n\n")[0].split()), len(CASES))
    torch.manual_seed(0)
    results = []
    for index in range(len(CASES)) if chosen is None else chosen:
        for causal in (False, True):
            for use_lse, deterministic in MODES:
                results.append(served(run_case, CASES[index], causal, use_lse, deterministic))
    if chosen is None:
        results.append(served(run_fixed_case))
    torch.cuda.synchronize()
    ran = [result for result in results if result is not None]
    failed = ran.count(False)
    print(f"memcheck cases: {len(ran)} ran, {len(results) - len(ran)} skipped, "
          + (f"{failed} FAILED" if failed else "all passed"))
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
