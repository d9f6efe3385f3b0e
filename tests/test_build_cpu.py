"""Build-side checks that run without a GPU: the generated kernel files are current, and when the
extension was built (CI builds a narrowed one), it imports, reports what it contains, and its
host-side checks reject bad input before any kernel could run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "csrc" / "generate_kernels.py"
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_kernels", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_extension():
    """The compiled module, or a skip when this checkout has none (unless CI requires one)."""
    from flash_varlen import _extension

    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        return _extension.load_extension()
    if not _extension.is_available():
        pytest.skip(f"extension not built: {_extension.unavailable_reason()}")
    return _extension.load_extension()


def test_generated_kernel_files_are_current():
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generator_covers_both_directions_dtypes_every_bucket_and_local_mask():
    gen = load_generator()
    names = {inst.filename for inst in gen.all_instantiations()}
    assert len(names) == len(gen.DIRECTIONS) * len(gen.ELEMENT_TYPES) * len(gen.HEAD_DIM_BUCKETS) * 2
    assert set(gen.DIRECTIONS) == {"fwd", "bwd"}
    assert "flash_fwd_sm80_bf16_hdim128_local.cu" in names
    assert "flash_fwd_sm80_fp16_hdim64.cu" in names
    assert "flash_bwd_sm80_bf16_hdim256_local.cu" in names
    assert "flash_bwd_sm80_fp16_hdim96.cu" in names


def test_kernel_sources_include_no_torch_headers():
    kernel_files = list((ROOT / "csrc" / "kernels").glob("*.h"))
    kernel_files += list((ROOT / "csrc" / "instantiations").glob("*.cu"))
    assert kernel_files
    for path in kernel_files:
        text = path.read_text()
        assert "torch/" not in text and "Python.h" not in text and "pybind11" not in text, path


def test_extension_buckets_match_generator():
    ext = built_extension()
    assert ext.head_dim_buckets() == list(load_generator().HEAD_DIM_BUCKETS)


def test_extension_contains_what_the_build_selected():
    """Every registered kernel is one the generator knows; in CI, whose build environment is the
    test environment, exactly the FLASH_VARLEN_DTYPES x FLASH_VARLEN_HEAD_DIMS selection."""
    ext = built_extension()
    compiled = set(ext.compiled_kernels())
    assert compiled, "the extension registered no kernel"
    # Both directions are built from the same selection.
    assert set(ext.compiled_backward_kernels()) == compiled
    gen = load_generator()
    everything = {(DTYPE_NAMES[d], h) for d in gen.ELEMENT_TYPES for h in gen.HEAD_DIM_BUCKETS}
    assert compiled <= everything
    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        dtypes = os.environ.get("FLASH_VARLEN_DTYPES") or ",".join(gen.ELEMENT_TYPES)
        head_dims = os.environ.get("FLASH_VARLEN_HEAD_DIMS") or ",".join(
            map(str, gen.HEAD_DIM_BUCKETS)
        )
        expected = {
            (DTYPE_NAMES[d.strip()], int(h)) for d in dtypes.split(",") for h in head_dims.split(",")
        }
        assert compiled == expected


def test_extension_rejects_cpu_tensors_before_any_kernel():
    ext = built_extension()
    q = torch.randn(8, 2, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.varlen_fwd(q, q, q, cu, cu, 8, 8, 0.125, False)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.fwd(q.unsqueeze(0), q.unsqueeze(0), q.unsqueeze(0), 0.125, False)


def test_extension_rejects_wrong_dtype_before_device():
    ext = built_extension()
    q = torch.randn(8, 2, 64)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        ext.varlen_fwd(q, q, q, cu, cu, 8, 8, 0.125, False)


def test_extension_messages_format_numbers():
    """Shape errors carry numbers. Formatting them must not crash (error_message.h says why this
    once segfaulted on the GPU build machine) and must read naturally."""
    ext = built_extension()
    q2d = torch.randn(8, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must have 3 dimensions, got 2"):
        ext.varlen_fwd(q2d, q2d, q2d, cu, cu, 8, 8, 0.125, False)
    strided = torch.randn(8, 2, 128).to(torch.bfloat16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"contiguous last dimension \(stride 1\), got 2"):
        ext.varlen_fwd(strided, strided, strided, cu, cu, 8, 8, 0.125, False)


def _backward_args(total: int = 8, nheads: int = 2, head_dim: int = 64) -> dict:
    """Valid-looking CPU arguments for varlen_bwd; tests break one rule at a time."""
    q = torch.randn(total, nheads, head_dim).to(torch.bfloat16)
    return {
        "dout": q.clone(),
        "q": q,
        "k": q.clone(),
        "v": q.clone(),
        "out": q.clone(),
        "softmax_lse": torch.zeros(nheads, total),
        "cu_seqlens_q": torch.tensor([0, total], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, total], dtype=torch.int32),
        "max_seqlen_q": total,
        "max_seqlen_k": total,
        "softmax_scale": 0.125,
        "causal": False,
        "deterministic": False,
    }


def test_backward_rejects_cpu_tensors_before_any_kernel():
    ext = built_extension()
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.varlen_bwd(**_backward_args())
    args = _backward_args()
    fixed = {name: args[name].unsqueeze(0) for name in ("dout", "q", "k", "v", "out")}
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.bwd(**fixed, softmax_lse=torch.zeros(1, 2, 8), softmax_scale=0.125, causal=False,
                deterministic=False)


def test_backward_checks_dout_shape_and_strides_by_name():
    ext = built_extension()
    args = _backward_args()
    args["dout"] = args["dout"][:4]
    with pytest.raises(RuntimeError, match=r"dout must have the shape of q \[8, 2, 64\], got \[4, 2, 64\]"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    args["dout"] = torch.randn(8, 2, 128).to(torch.bfloat16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"dout must have a contiguous last dimension"):
        ext.varlen_bwd(**args)


def test_backward_checks_softmax_lse_and_gradient_buffers_by_name():
    ext = built_extension()
    args = _backward_args()
    args["softmax_lse"] = torch.zeros(2, 7)
    with pytest.raises(RuntimeError, match=r"softmax_lse must have shape \[2, 8\], got \[2, 7\]"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    args["softmax_lse"] = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="softmax_lse must be float32"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    with pytest.raises(RuntimeError, match="dk must have the shape of k"):
        ext.varlen_bwd(**args, dk=torch.zeros(8, 1, 64).to(torch.bfloat16))
