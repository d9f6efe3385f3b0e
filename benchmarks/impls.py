"""The implementations the benchmarks time, behind one interface.

Each `prepare_*` function takes a `Case` (one workload x layout x causal, inputs already on the
GPU), does all set-up outside the timed region (layout copies, block masks, compilation happens
on the first call), and returns a `Prepared` whose `run` is exactly what the forward benchmark
times. The backward benchmark passes a case whose q, k, v require grad and differentiates `run`'s
output with respect to `Prepared.inputs`. Any failure to set up or run raises; the benchmarks
record it as "n/a" with the reason ("unsupported" for NotImplementedError: the implementation
does not serve this case).

"ours" runs flash_varlen as it picks its kernel family per call; "ours_<family>" forces one family
through FLASH_VARLEN_KERNEL_FAMILY, set (in `Prepared.environment`) only while that
implementation's calls run. "fa4" is FlashAttention-4 (`flash_attn.cute`), when installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from benchmarks.workloads import HeadLayout, Workload

FA4_IMPL = "fa4"
IMPL_NAMES = ("ours", "varlen_attn", "flex", FA4_IMPL)
# FlashAttention-4's import name (the flash-attn-4 package, CuTe DSL; shared/peers/fa4.md).
FA4_MODULE = "flash_attn.cute"

# The extension reads this variable at every call; a family name forces that kernel family.
FAMILY_OVERRIDE_VARIABLE = "FLASH_VARLEN_KERNEL_FAMILY"
# The --families entry for flash_varlen's own per-call choice (the variable left as it is).
AUTO_FAMILY = "auto"
# The backward benchmark also times ours with deterministic=True (bitwise reproducible dq), and
# FA4 likewise (its `deterministic` flag).
DETERMINISTIC_IMPL = "ours_det"
FA4_DETERMINISTIC_IMPL = "fa4_det"
BACKWARD_IMPL_NAMES = ("ours", DETERMINISTIC_IMPL, "varlen_attn", "flex", FA4_IMPL,
                       FA4_DETERMINISTIC_IMPL)
# Backward-only columns: the deterministic variant of an implementation (whose forward is the
# same call) -> that implementation. Their gradients must also be bitwise reproducible.
DETERMINISTIC_VARIANT_OF = {DETERMINISTIC_IMPL: "ours", FA4_DETERMINISTIC_IMPL: FA4_IMPL}

# FlexAttention compiles once per (causal, layout); the default limit of 8 could be reached by a
# full run and would silently fall back to the eager path, which materializes all scores.
FLEX_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Case:
    """One benchmark row. q: (total, nheads_q, d); k, v: (total, nheads_kv, d); bf16, CUDA."""

    workload: Workload
    layout: HeadLayout
    causal: bool
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # (num_sequences + 1,) int32, CUDA

    @property
    def scale(self) -> float:
        return self.layout.head_dim**-0.5


def _already_packed(out: torch.Tensor) -> torch.Tensor:
    return out


@dataclass
class Prepared:
    """What to time (`run`), what it reads, and how its layout maps to the packed one.

    `inputs` are q, k, v as `run` reads them, in the implementation's own layout; the backward
    benchmark differentiates with respect to them, so layout copies stay outside the timed
    backward. `to_packed` maps a tensor of the implementation's layout (output, or the gradient of
    an input) to the packed (total, nheads, d) one; `from_packed` is its inverse (both views).
    """

    run: Callable[[], torch.Tensor]
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    to_packed: Callable[[torch.Tensor], torch.Tensor] = _already_packed
    from_packed: Callable[[torch.Tensor], torch.Tensor] = _already_packed
    note: str = ""
    # Environment variables the benchmarks set around every call of `run` (warm-up, checks and
    # timing alike) and restore afterwards; set once around them, so the timed calls pay nothing.
    environment: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def environment_set(changes: Mapping[str, str]) -> Iterator[None]:
    """Sets the variables of `changes` in os.environ and restores every one afterwards (removed
    again where it was not set before), however the block ends."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def family_impl(family: str) -> str:
    """The implementation name of ours run with kernel family `family`: "ours" for AUTO_FAMILY,
    else "ours_<family>"."""
    return "ours" if family == AUTO_FAMILY else f"ours_{family}"


def with_families(impls: Sequence[str], families: Sequence[str]) -> list[str]:
    """`impls` with "ours" replaced by one implementation per kernel family (family_impl), in
    the order of `families`; the other implementations keep their places."""
    expanded: list[str] = []
    for impl in impls:
        expanded += [family_impl(family) for family in families] if impl == "ours" else [impl]
    return expanded


def prepare_ours(case: Case, deterministic: bool = False, family: str = AUTO_FAMILY) -> Prepared:
    """flash_varlen.flash_attn_varlen_func on the packed layout. `deterministic` selects the
    backward that makes dq bitwise reproducible (the forward does not depend on it). `family`
    other than AUTO_FAMILY is forced through FAMILY_OVERRIDE_VARIABLE while the calls run; a
    family that cannot serve the case makes the call raise NotImplementedError."""
    import flash_varlen

    max_seqlen = case.workload.max_seqlen

    def run() -> torch.Tensor:
        return flash_varlen.flash_attn_varlen_func(
            case.q, case.k, case.v, case.cu_seqlens, case.cu_seqlens, max_seqlen, max_seqlen,
            softmax_scale=case.scale, causal=case.causal, deterministic=deterministic,
        )

    environment = {} if family == AUTO_FAMILY else {FAMILY_OVERRIDE_VARIABLE: family}
    return Prepared(run, inputs=(case.q, case.k, case.v), environment=environment)


def ours_family_preparers(families: Sequence[str]) -> dict[str, Callable[[Case], Prepared]]:
    """A preparer per kernel family, keyed by its implementation name (family_impl)."""
    return {family_impl(family): functools.partial(prepare_ours, family=family)
            for family in families}


def prepare_ours_deterministic(case: Case) -> Prepared:
    """prepare_ours with deterministic=True."""
    return prepare_ours(case, deterministic=True)


def prepare_varlen_attn(case: Case) -> Prepared:
    """PyTorch's torch.nn.attention.varlen.varlen_attn (the FlashAttention-2 kernels in ATen).

    Its Python wrapper passes nheads_kv < nheads_q straight to the kernel, which accepts it (the
    FlashAttention-2 API requires only that nheads_kv divides nheads_q). Should that ever fail,
    k and v are repeated to nheads_q outside the timed region and the row says so; the timed
    backward then includes the sum of the repeated heads' gradients (the cost of the fallback).
    """
    from torch.nn.attention.varlen import varlen_attn

    max_seqlen = case.workload.max_seqlen
    # varlen_attn decides causality by comparing the tuple with (-1, 0): it must be a tuple.
    window_size = (-1, 0) if case.causal else (-1, -1)

    def call(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attn(
            case.q, k, v, case.cu_seqlens, case.cu_seqlens, max_seqlen, max_seqlen,
            scale=case.scale, window_size=window_size,
        )

    inputs = (case.q, case.k, case.v)
    if case.layout.nheads_kv == case.layout.nheads_q:
        return Prepared(lambda: call(case.k, case.v), inputs)
    try:
        call(case.k, case.v)
        return Prepared(lambda: call(case.k, case.v), inputs)
    except RuntimeError as error:
        group = case.layout.nheads_q // case.layout.nheads_kv
        k_full = case.k.repeat_interleave(group, dim=1)
        v_full = case.v.repeat_interleave(group, dim=1)
        note = f"no native GQA ({error}); k/v repeated to {case.layout.nheads_q} heads"
        return Prepared(lambda: call(k_full, v_full), inputs, note=note)


def fa4_import_error() -> Exception | None:
    """None when FlashAttention-4 (FA4_MODULE) imports, else the error. Any error counts: a
    broken install must not stop the benchmark, which then runs without the peer."""
    try:
        importlib.import_module(FA4_MODULE)
    except Exception as error:  # noqa: BLE001 - returned: the reason the peer is skipped
        return error
    return None


def _output_of(result: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The attention output of a call that returns either `out` or `(out, lse)`."""
    return result[0] if isinstance(result, tuple) else result


def prepare_fa4(case: Case, deterministic: bool = False) -> Prepared:
    """FlashAttention-4's flash_attn_varlen_func on the packed layout (native GQA). It compiles
    each configuration at its first call, which the benchmarks' warm-up call absorbs.
    `deterministic` is FA4's flag of the same name (it changes only the backward)."""
    fa4 = importlib.import_module(FA4_MODULE)
    max_seqlen = case.workload.max_seqlen

    def run() -> torch.Tensor:
        return _output_of(fa4.flash_attn_varlen_func(
            case.q, case.k, case.v, cu_seqlens_q=case.cu_seqlens, cu_seqlens_k=case.cu_seqlens,
            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=case.scale,
            causal=case.causal, deterministic=deterministic,
        ))

    return Prepared(run, inputs=(case.q, case.k, case.v))


def prepare_fa4_deterministic(case: Case) -> Prepared:
    """prepare_fa4 with deterministic=True."""
    return prepare_fa4(case, deterministic=True)


def _document_mask_mod(doc_id: torch.Tensor, causal: bool) -> Callable:
    """mask_mod for FlexAttention: same document (and key <= query when causal).

    doc_id: (total,) int32, the sequence index of every packed token. The two closures keep fixed
    code objects, so compiled code is reused across workloads (only the tensor changes).
    """
    if causal:

        def causal_document_mask(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (kv_idx <= q_idx)

        return causal_document_mask

    def document_mask(b, h, q_idx, kv_idx):
        return doc_id[q_idx] == doc_id[kv_idx]

    return document_mask


class FlexRunner:
    """FlexAttention with a document BlockMask, compiled once and reused across rows.

    Block masks are built once per (workload, causal) and shared by both head layouts
    (B = H = None broadcasts them over batch and heads). Set-up is lazy, so that a missing or
    broken FlexAttention fails inside `prepare` and is reported for the row like any other error.
    """

    def __init__(self) -> None:
        self._attention: Callable | None = None
        self._create_block_mask: Callable | None = None
        self._block_masks: dict[tuple[str, bool], object] = {}

    def _compile(self) -> None:
        import torch._functorch.config as functorch_config
        from torch.nn.attention import flex_attention as flex

        torch._dynamo.config.recompile_limit = FLEX_RECOMPILE_LIMIT
        # The backward benchmark calls the compiled backward repeatedly (retain_graph=True), which
        # a backward compiled with donated buffers (saved tensors reused as outputs) refuses.
        functorch_config.donated_buffer = False
        # dynamic=False: a second shape (GQA after MHA) must not turn the kernel generic.
        self._attention = torch.compile(flex.flex_attention, dynamic=False)
        # The eager create_block_mask materializes a (total x total) mask; compiled, it does not.
        self._create_block_mask = torch.compile(flex.create_block_mask, dynamic=False)

    def _block_mask(self, workload: Workload, causal: bool, device: torch.device) -> object:
        key = (workload.name, causal)
        if key not in self._block_masks:
            lengths = torch.tensor(workload.lengths, device=device)
            doc_id = torch.repeat_interleave(
                torch.arange(workload.num_sequences, dtype=torch.int32, device=device), lengths
            )
            total = workload.total_tokens
            mask_mod = _document_mask_mod(doc_id, causal)
            self._block_masks[key] = self._create_block_mask(
                mask_mod, None, None, total, total, device=device
            )
        return self._block_masks[key]

    def prepare(self, case: Case) -> Prepared:
        """q/k/v copied to FlexAttention's (1, heads, total, d) layout outside the timed region.

        The copies are new leaves (requiring grad when the case's tensors do), so the timed
        backward stops at them instead of copying gradients back to the packed layout.
        """
        if self._attention is None:
            self._compile()
        block_mask = self._block_mask(case.workload, case.causal, case.q.device)
        q, k, v = (
            _flex_layout(t).contiguous().detach().requires_grad_(t.requires_grad)
            for t in (case.q, case.k, case.v)
        )
        enable_gqa = case.layout.nheads_kv != case.layout.nheads_q

        attention = self._attention

        def run() -> torch.Tensor:
            return attention(
                q, k, v, block_mask=block_mask, scale=case.scale, enable_gqa=enable_gqa
            )

        return Prepared(run, (q, k, v), to_packed=_packed_layout, from_packed=_flex_layout)


def _flex_layout(packed: torch.Tensor) -> torch.Tensor:
    """(total, nheads, d) -> FlexAttention's (1, nheads, total, d), a view."""
    return packed.transpose(0, 1).unsqueeze(0)


def _packed_layout(flex: torch.Tensor) -> torch.Tensor:
    """FlexAttention's (1, nheads, total, d) -> (total, nheads, d), a view."""
    return flex[0].transpose(0, 1)
