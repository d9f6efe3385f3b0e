"""What this flash_varlen installation is and whether it works here: ``python -m flash_varlen``.

Prints one aligned ``key: value`` line per fact: the package version; the torch and CUDA
versions the extension was built against (from the build record setup.py writes,
``flash_varlen/_build_info.py``) and the ones running now; nvcc, CUTLASS, the architectures,
kernel families and kernel selection of the build; the kernel families and the forward and
backward kernels the extension contains; the GPU and the kernel family that runs on it. With a
GPU and a loadable extension it then runs a self-check: forward and backward of a small packed
batch against the float32 reference of :mod:`flash_varlen.reference`, judged by the tests'
tolerance rule. The exit status is 1 when the self-check fails and 0 otherwise: without a
GPU or an extension the command only informs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Sequence

import torch

import flash_varlen
from flash_varlen import _extension
from flash_varlen.reference import attention_ref_varlen

UNKNOWN = "unknown"

# The tolerance rule of the accuracy tests (tests/accuracy.py; a CPU test keeps these equal):
# the kernel's max error against the float32 reference may be at most FACTOR times the error of
# the same PyTorch math run in the input dtype, plus half an ulp of the output at the reference's
# largest magnitude.
FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0

# The self-check batch: three packed sequences of different lengths (one shorter than any row
# block, one a whole number of 64-row blocks, one that spills 2 rows past a 128-row block, so
# full and partial tiles both run), grouped-query heads (two query heads per kv head), and both
# mask kinds.
SELF_CHECK_SEQLENS = (7, 64, 130)
SELF_CHECK_HEADS = (4, 2)  # (nheads, nheads_k)
SELF_CHECK_CAUSAL = (False, True)
SELF_CHECK_SEED = 0
# Tried in this order; the first with forward and backward kernels in the build is used.
SELF_CHECK_DTYPES = (torch.bfloat16, torch.float16)

@dataclass(frozen=True)
class SelfCheckResult:
    """The outcome of the self-check: whether every comparison passed, and a one-line account."""

    passed: bool
    summary: str


# Signature of flash_attn_varlen_func as the self-check calls it (return_attn_probs=True).
AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor, object]]


def _extension_dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of the extension's kernel lists."""
    return str(dtype).removeprefix("torch.")


def _rounding_floor(dtype: torch.dtype, refs_fp32: Sequence[torch.Tensor]) -> float:
    """Half an ulp of `dtype` at the largest magnitude of `refs_fp32`: the error of rounding the
    exact result once to the output dtype, allowed even where the input-dtype math is exact."""
    largest = max((float(ref.abs().max()) for ref in refs_fp32 if ref.numel()), default=0.0)
    return torch.finfo(dtype).eps / 2 * largest


def compare_to_reference(
    name: str,
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor,
    factor: float,
    floor: float,
) -> str:
    """'' when max|actual - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + floor, else a line
    naming `name`, both errors and the bound. A NaN anywhere in `actual` fails."""
    error = float((actual.float() - ref_fp32.float()).abs().max())
    lowp_error = float((ref_lowp.float() - ref_fp32.float()).abs().max())
    bound = factor * lowp_error + floor
    if error <= bound:  # False for a NaN error, which therefore fails
        return ""
    return (
        f"{name}: max error {error:.3e} > {factor} x {lowp_error:.3e} (input-dtype PyTorch) "
        f"+ {floor:.1e}"
    )


def _self_check_batch(
    dtype: torch.dtype, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, ...]:
    """q, k, v (total, heads, head_dim) in `dtype`, dout like q, and int32 cu_seqlens."""
    generator = torch.Generator(device=device).manual_seed(SELF_CHECK_SEED)
    total = sum(SELF_CHECK_SEQLENS)
    nheads, nheads_k = SELF_CHECK_HEADS
    shapes = [(total, nheads, head_dim), (total, nheads_k, head_dim), (total, nheads_k, head_dim),
              (total, nheads, head_dim)]
    # Drawn in float32 and then rounded, as the tests do, so every dtype sees the same values.
    q, k, v, dout = (
        torch.randn(shape, generator=generator, device=device).to(dtype) for shape in shapes
    )
    bounds = [0]
    for length in SELF_CHECK_SEQLENS:
        bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    return q, k, v, dout, cu_seqlens


def _reference(
    inputs: Sequence[torch.Tensor],
    dout: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    compute_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """[out, lse, dq, dk, dv] of the PyTorch reference computed entirely in `compute_dtype`."""
    leaves = [x.detach().to(compute_dtype).requires_grad_() for x in inputs]
    out, lse = attention_ref_varlen(
        *leaves, cu_seqlens, cu_seqlens, causal=causal, compute_dtype=compute_dtype
    )
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
    return [out.detach(), lse.detach(), *grads]


def run_self_check(
    dtype: torch.dtype,
    head_dim: int,
    device: torch.device | str = "cuda",
    attention: AttentionFunction | None = None,
) -> SelfCheckResult:
    """Forward and backward of the self-check batch against the float32 reference.

    `attention` defaults to flash_varlen.flash_attn_varlen_func (the tests pass others to check
    this function itself on the CPU). Outputs (out, softmax_lse) are held to FORWARD_FACTOR,
    gradients (dq, dk, dv) to GRADIENT_FACTOR with one rounding floor for the three, as in the
    tests: one of them can be exactly 0 in both references while the kernel leaves rounding
    noise. Every sequence is non-empty and causal masks align bottom-right on equal lengths,
    so every row sees a key and softmax_lse is finite throughout.
    """
    attention = attention or flash_varlen.flash_attn_varlen_func
    q, k, v, dout, cu_seqlens = _self_check_batch(dtype, head_dim, device)
    longest = max(SELF_CHECK_SEQLENS)
    failures = []
    for causal in SELF_CHECK_CAUSAL:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = attention(
            *leaves, cu_seqlens, cu_seqlens, longest, longest, causal=causal,
            return_attn_probs=True,
        )
        grads = torch.autograd.grad(out, leaves, dout)
        actual = [out.detach(), lse.detach(), *grads]
        refs_fp32 = _reference((q, k, v), dout, cu_seqlens, causal, torch.float32)
        refs_lowp = _reference((q, k, v), dout, cu_seqlens, causal, dtype)
        gradient_floor = _rounding_floor(dtype, refs_fp32[2:])
        checks = [
            ("out", FORWARD_FACTOR, _rounding_floor(dtype, refs_fp32[:1])),
            ("softmax_lse", FORWARD_FACTOR, _rounding_floor(lse.dtype, refs_fp32[1:2])),
            ("dq", GRADIENT_FACTOR, gradient_floor),
            ("dk", GRADIENT_FACTOR, gradient_floor),
            ("dv", GRADIENT_FACTOR, gradient_floor),
        ]
        mask = "causal" if causal else "non-causal"
        for (name, factor, floor), got, ref_fp32, ref_lowp in zip(
            checks, actual, refs_fp32, refs_lowp
        ):
            failure = compare_to_reference(f"{mask} {name}", got, ref_fp32, ref_lowp, factor, floor)
            if failure:
                failures.append(failure)
    batch = (
        f"{_extension_dtype_name(dtype)}, head dim {head_dim}, sequences of "
        f"{'/'.join(map(str, SELF_CHECK_SEQLENS))} tokens, causal and non-causal"
    )
    if failures:
        return SelfCheckResult(False, f"FAIL ({batch}): " + "; ".join(failures))
    return SelfCheckResult(True, f"PASS ({batch}): out, softmax_lse, dq, dk, dv match reference")


def self_check_config(
    forward: Sequence[tuple[str, int]], backward: Sequence[tuple[str, int]]
) -> tuple[torch.dtype, int] | None:
    """The (dtype, head dim) to self-check: bf16 before fp16, the smallest head-dim bucket that
    has both a forward and a backward kernel; None when no pair has both."""
    both = set(forward) & set(backward)
    for dtype in SELF_CHECK_DTYPES:
        buckets = sorted(bucket for name, bucket in both if name == _extension_dtype_name(dtype))
        if buckets:
            return dtype, buckets[0]
    return None


def _format_kernels(configs: Sequence[tuple[str, str, int]]) -> str:
    """'sm80: bfloat16 (64, 128); float16 (64)' from (family, dtype name, head-dim bucket)
    triples, one family after another."""
    if not configs:
        return "none"
    by_family: dict[str, dict[str, list[int]]] = {}
    for family, name, bucket in configs:
        by_family.setdefault(family, {}).setdefault(name, []).append(int(bucket))
    return " | ".join(
        f"{family}: "
        + "; ".join(
            f"{name} ({', '.join(map(str, sorted(buckets)))})"
            for name, buckets in sorted(by_dtype.items())
        )
        for family, by_dtype in by_family.items()
    )


def _capability_text(capability: int) -> str:
    """'9.0' for 90 (major * 10 + minor)."""
    return f"{capability // 10}.{capability % 10}"


def _format_buckets(every_bucket: list[int], built: list[int]) -> str:
    """The head-dim buckets: all of them for a full build; for a narrowed one, those it built
    (of which forward kernels exist) among all."""
    rule = "a head dim runs in the smallest bucket >= it"
    every = ", ".join(map(str, every_bucket))
    built_buckets = sorted(set(built))
    if built_buckets == sorted(every_bucket):
        return f"{every} ({rule})"
    names = ", ".join(map(str, built_buckets)) or "none"
    return f"{names} built, of {every} ({rule}; this narrowed build refuses the others)"


def _format_families(families: Sequence[dict]) -> str:
    """'sm80 (compute capability 8.0 to 9.0; built for 8.0, 9.0)' per family, best first ('not
    built' for a family this build has no kernel of)."""
    parts = []
    for family in families:
        low, high = family["compute_capabilities"]
        built = ", ".join(map(_capability_text, family["built_for"]))
        parts.append(
            f"{family['name']} (compute capability {_capability_text(low)} to "
            f"{_capability_text(high)}; {'built for ' + built if built else 'not built'})"
        )
    return "; ".join(parts)


def _family_for_gpu(module: ModuleType, config: tuple[torch.dtype, int] | None) -> str:
    """The family that runs the self-check's kernel on GPU 0, or why none does."""
    if config is None:
        return "none: no dtype and head dim has both forward and backward kernels"
    major, minor = torch.cuda.get_device_capability(0)
    dtype, head_dim = config
    try:
        return module.select_kernel_family(
            "forward", _extension_dtype_name(dtype), head_dim, False, major * 10 + minor
        )
    except (NotImplementedError, ValueError) as error:
        return f"none: {error}"


def _build_rows(record: ModuleType | None) -> list[tuple[str, str]]:
    """The lines read from the build record, or 'unknown' with the reason."""
    if record is None:
        missing = (
            f"{UNKNOWN} (no build record {_extension.BUILD_INFO_NAME}; every build by setup.py "
            "writes one)"
        )
        return [
            ("built with torch", missing),
            ("built with nvcc", UNKNOWN),
            ("built with CUTLASS", UNKNOWN),
            ("built for archs", UNKNOWN),
            ("built families", UNKNOWN),
            ("build selection", UNKNOWN),
        ]
    return [
        (
            "built with torch",
            _extension.describe_torch(record.TORCH_VERSION, record.TORCH_CUDA_VERSION),
        ),
        ("built with nvcc", record.NVCC_VERSION),
        ("built with CUTLASS", record.CUTLASS_VERSION),
        ("built for archs", ", ".join(f"sm_{arch}" for arch in record.ARCHS)),
        # A record written before kernel families existed has no FAMILIES.
        ("built families", ", ".join(getattr(record, "FAMILIES", (UNKNOWN,)))),
        (
            "build selection",
            f"dtypes {', '.join(record.DTYPES)}; head dims "
            f"{', '.join(map(str, record.HEAD_DIMS))}",
        ),
    ]


def _gpu() -> tuple[str, bool]:
    """The GPU line and whether there is a GPU to self-check on."""
    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)", False
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})", True


def collect() -> tuple[list[tuple[str, str]], SelfCheckResult | None]:
    """Every (key, value) line of the report, and the self-check result when one ran."""
    record = _extension.read_build_info()
    version = flash_varlen.__version__
    if record is not None and record.PACKAGE_VERSION != version:
        version += f" (but the extension was built from {record.PACKAGE_VERSION}: rebuild it)"
    rows = [
        ("flash_varlen", version),
        ("running torch", _extension.describe_torch(str(torch.__version__), torch.version.cuda)),
        *_build_rows(record),
    ]

    module = _extension.load_extension() if _extension.is_available() else None
    if module is None:
        not_loaded = f"{UNKNOWN} (extension not loaded)"
        forward = backward = []
        rows += [
            ("extension", f"not loaded: {_extension.unavailable_reason()}"),
            ("kernel families", not_loaded),
            ("forward kernels", not_loaded),
            ("backward kernels", not_loaded),
            ("decode kernels", not_loaded),
            ("head-dim buckets", not_loaded),
        ]
    else:
        forward = [(str(f), str(n), int(b)) for f, n, b in module.compiled_kernels()]
        backward = [(str(f), str(n), int(b)) for f, n, b in module.compiled_backward_kernels()]
        # The KV-cache kernels (flash_attn_with_kvcache); absent from builds that predate them.
        decode = [
            (str(f), str(n), int(b)) for f, n, b in getattr(module, "compiled_decode_kernels", list)()
        ]
        buckets = _format_buckets(module.head_dim_buckets(), [b for _, _, b in forward])
        rows += [
            ("extension", f"loaded from {module.__file__}"),
            ("kernel families", _format_families(module.kernel_families())),
            ("forward kernels", _format_kernels(forward)),
            ("backward kernels", _format_kernels(backward)),
            ("decode kernels", _format_kernels(decode)),
            ("head-dim buckets", buckets),
        ]
    config = self_check_config(
        [(name, bucket) for _, name, bucket in forward],
        [(name, bucket) for _, name, bucket in backward],
    )

    gpu, has_gpu = _gpu()
    rows.append(("GPU", gpu))
    if not has_gpu:
        family = "none: no GPU"
    elif module is None:
        family = f"{UNKNOWN} (extension not loaded)"
    else:
        family = _family_for_gpu(module, config)
    rows.append(("family on this GPU", family))
    result = None
    if not has_gpu:
        check = "skipped: no GPU"
    elif module is None:
        check = "skipped: the extension is not loaded (see above)"
    else:
        if config is None:
            check = "skipped: no dtype and head dim has both forward and backward kernels"
        else:
            try:
                result = run_self_check(*config)
            except Exception as error:  # any failure on the GPU path is the answer, not a crash
                result = SelfCheckResult(False, f"FAIL: {type(error).__name__}: {error}")
            check = result.summary
    rows.append(("self-check", check))
    return rows, result


def format_rows(rows: Sequence[tuple[str, str]]) -> str:
    """'key: value' lines with the values aligned in one column."""
    width = max(len(key) for key, _ in rows) + len(": ")
    return "\n".join(f"{key + ':':<{width}}{value}" for key, value in rows)


def main() -> int:
    """Prints the report; returns the exit status (1 only when the self-check failed)."""
    rows, result = collect()
    print(format_rows(rows))
    return 1 if result is not None and not result.passed else 0
