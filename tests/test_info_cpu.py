"""``python -m flash_varlen`` (flash_varlen.info) without a GPU.

The command runs for real in a subprocess; the paths that need a GPU or a particular build
(self-check pass and fail, no extension, another torch) run in-process with monkeypatched
state, and the self-check's comparison itself runs on the CPU with the reference standing in for
the kernel. Everything here passes whether or not the extension is built.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import accuracy
import flash_varlen
from flash_varlen import _extension, info
from flash_varlen.reference import attention_ref_varlen

ROOT = Path(__file__).resolve().parents[1]

KEYS = (
    "flash_varlen",
    "running torch",
    "built with torch",
    "built with nvcc",
    "built with CUTLASS",
    "built for archs",
    "built families",
    "build selection",
    "extension",
    "kernel families",
    "forward kernels",
    "backward kernels",
    "decode kernels",
    "head-dim buckets",
    "GPU",
    "family on this GPU",
    "self-check",
)
FAKE_GPU = "Fake GPU (compute capability 9.0)"


def report_lines(text: str) -> dict[str, str]:
    """{key: value} of the 'key: value' lines of the report."""
    lines = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        lines[key.rstrip(":")] = value.strip()
    return lines


def reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal,
                        return_attn_probs):
    """flash_attn_varlen_func's calling convention, computed by the reference in q's dtype."""
    assert return_attn_probs
    out, lse = attention_ref_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, compute_dtype=q.dtype
    )
    return out, lse, None


def scaled_output_attention(*args, **kwargs):
    """A forward 5% off: out is wrong, its gradients follow from it."""
    out, lse, _ = reference_attention(*args, **kwargs)
    return out * 1.05, lse, None


def scaled_gradient_attention(*args, **kwargs):
    """The right forward values whose gradients are 10% too large."""
    out, lse, _ = reference_attention(*args, **kwargs)
    return out.detach() + 1.1 * (out - out.detach()), lse, None


FAKE_FAMILIES = [
    {"name": "sm80", "summary": "mma.sync", "compute_capabilities": (80, 90), "built_for": [80, 90]}
]


def fake_extension(
    kernels=(("sm80", "bfloat16", 64), ("sm80", "float16", 128)),
) -> types.ModuleType:
    module = types.ModuleType(_extension.EXTENSION_NAME)
    module.__file__ = "/fake/flash_varlen/_C.so"
    module.compiled_kernels = lambda: list(kernels)
    module.compiled_backward_kernels = lambda: list(kernels)
    module.compiled_decode_kernels = lambda: [("decode", "bfloat16", 128)]
    module.head_dim_buckets = lambda: [64, 96, 128, 192, 256]
    module.kernel_families = lambda: FAKE_FAMILIES
    module.select_kernel_family = lambda direction, dtype, head_dim, local, capability: "sm80"
    return module


@pytest.fixture
def fresh_state(monkeypatch):
    """Forgets any earlier import attempt (restored afterwards by monkeypatch)."""
    monkeypatch.setattr(_extension, "_cached", None)


@pytest.fixture
def loaded_on_gpu(monkeypatch, fresh_state):
    """A fake extension loads and a fake GPU is present; the record is that of this torch."""
    record = types.SimpleNamespace(
        PACKAGE_VERSION=flash_varlen.__version__, TORCH_VERSION=str(torch.__version__),
        TORCH_CUDA_VERSION=torch.version.cuda, NVCC_VERSION="13.0.88", CUTLASS_VERSION="4.2.0",
        ARCHS=("80", "90"), FAMILIES=("sm80",), DTYPES=("fp16", "bf16"), HEAD_DIMS=(64, 128),
    )
    monkeypatch.setattr(_extension, "read_build_info", lambda: record)
    monkeypatch.setattr(_extension, "_import_module", fake_extension)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(info, "_gpu", lambda: (FAKE_GPU, True))


def run_main(capsys) -> tuple[int, dict[str, str]]:
    status = info.main()
    return status, report_lines(capsys.readouterr().out)


def test_command_prints_every_key_aligned():
    result = subprocess.run(
        [sys.executable, "-m", "flash_varlen"], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )
    lines = result.stdout.splitlines()
    assert [line.partition(":")[0] for line in lines] == list(KEYS), result.stdout
    # Values start in one column.
    assert len({len(line) - len(line.split(": ", 1)[1].lstrip()) for line in lines}) == 1
    values = report_lines(result.stdout)
    assert values["flash_varlen"].startswith(flash_varlen.__version__)
    assert values["running torch"].startswith(str(torch.__version__))
    if torch.cuda.is_available() and _extension.is_available():
        assert result.returncode == 0 and values["self-check"].startswith("PASS"), result.stdout
    else:
        assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without GPU")
def test_command_reports_no_gpu_and_exits_0():
    result = subprocess.run(
        [sys.executable, "-m", "flash_varlen"], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    values = report_lines(result.stdout)
    assert values["GPU"].startswith("none")
    assert values["family on this GPU"] == "none: no GPU"
    assert values["self-check"] == "skipped: no GPU"


def test_report_without_extension_says_why_and_exits_0(monkeypatch, fresh_state, capsys):
    monkeypatch.setitem(sys.modules, _extension.EXTENSION_NAME, None)  # never built
    monkeypatch.setitem(sys.modules, _extension.BUILD_INFO_NAME, None)  # so no record either
    monkeypatch.setattr(info, "_gpu", lambda: (FAKE_GPU, True))
    status, values = run_main(capsys)
    assert status == 0
    assert values["extension"].startswith("not loaded: The compiled extension flash_varlen._C")
    assert "not built" in values["extension"]
    assert values["built with torch"].startswith("unknown (no build record")
    for key in (
        "kernel families", "forward kernels", "backward kernels", "decode kernels",
        "head-dim buckets", "family on this GPU",
    ):
        assert values[key] == "unknown (extension not loaded)"
    assert values["self-check"] == "skipped: the extension is not loaded (see above)"


def test_report_of_another_torch_names_both_versions(monkeypatch, fresh_state, capsys):
    record = types.SimpleNamespace(
        PACKAGE_VERSION=flash_varlen.__version__, TORCH_VERSION="2.10.0+cu126",
        TORCH_CUDA_VERSION="12.6", NVCC_VERSION="12.6.85", CUTLASS_VERSION="4.2.0",
        ARCHS=("80",), DTYPES=("bf16",), HEAD_DIMS=(64,),
    )
    monkeypatch.setattr(_extension, "read_build_info", lambda: record)
    monkeypatch.setattr(_extension, "_is_built", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    status, values = run_main(capsys)
    assert status == 0
    assert values["built with torch"] == "2.10.0+cu126 (CUDA 12.6)"
    assert values["running torch"] == "2.11.0+cu130 (CUDA 13.0)"
    assert "built against torch 2.10.0+cu126" in values["extension"]
    assert "but torch 2.11.0+cu130 (CUDA 13.0) is running" in values["extension"]


def test_report_of_a_loaded_build(loaded_on_gpu, monkeypatch, capsys):
    calls = []

    def passing_check(dtype, head_dim):
        calls.append((dtype, head_dim))
        return info.SelfCheckResult(True, "PASS (fake)")

    monkeypatch.setattr(info, "run_self_check", passing_check)
    status, values = run_main(capsys)
    assert status == 0
    assert values["built with nvcc"] == "13.0.88"
    assert values["built with CUTLASS"] == "4.2.0"
    assert values["built for archs"] == "sm_80, sm_90"
    assert values["built families"] == "sm80"
    assert values["build selection"] == "dtypes fp16, bf16; head dims 64, 128"
    assert values["extension"] == "loaded from /fake/flash_varlen/_C.so"
    assert values["kernel families"] == "sm80 (compute capability 8.0 to 9.0; built for 8.0, 9.0)"
    assert values["forward kernels"] == "sm80: bfloat16 (64); float16 (128)"
    assert values["backward kernels"] == "sm80: bfloat16 (64); float16 (128)"
    assert values["decode kernels"] == "decode: bfloat16 (128)"
    assert values["head-dim buckets"].startswith("64, 128 built, of 64, 96, 128, 192, 256")
    assert "this narrowed build refuses the others" in values["head-dim buckets"]
    assert values["GPU"] == FAKE_GPU
    assert values["family on this GPU"] == "sm80"
    assert values["self-check"] == "PASS (fake)"
    assert calls == [(torch.bfloat16, 64)]


def test_report_names_the_family_that_cannot_run_on_the_gpu(loaded_on_gpu, monkeypatch, capsys):
    module = fake_extension()

    def no_family(direction, dtype, head_dim, local, capability):
        raise NotImplementedError(f"no kernel for compute capability {capability}")

    module.select_kernel_family = no_family
    monkeypatch.setattr(_extension, "_import_module", lambda: module)
    monkeypatch.setattr(info, "run_self_check", lambda *c: info.SelfCheckResult(True, "PASS"))
    _, values = run_main(capsys)
    assert values["family on this GPU"] == "none: no kernel for compute capability 90"


def test_failed_self_check_exits_1(loaded_on_gpu, monkeypatch, capsys):
    monkeypatch.setattr(
        info, "run_self_check", lambda *config: info.SelfCheckResult(False, "FAIL (fake): dq")
    )
    status, values = run_main(capsys)
    assert status == 1
    assert values["self-check"] == "FAIL (fake): dq"


def test_error_in_self_check_is_a_failure_not_a_crash(loaded_on_gpu, monkeypatch, capsys):
    def no_kernel_image(*config):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(info, "run_self_check", no_kernel_image)
    status, values = run_main(capsys)
    assert status == 1
    assert values["self-check"] == (
        "FAIL: RuntimeError: CUDA error: no kernel image is available for execution on the device"
    )


def test_stale_extension_of_another_package_version_is_pointed_out(loaded_on_gpu, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(info, "run_self_check", lambda *c: info.SelfCheckResult(True, "PASS"))
    monkeypatch.setattr(_extension.read_build_info(), "PACKAGE_VERSION", "0.0.1")
    _, values = run_main(capsys)
    assert values["flash_varlen"] == (
        f"{flash_varlen.__version__} (but the extension was built from 0.0.1: rebuild it)"
    )


def test_self_check_config_prefers_bf16_and_needs_both_directions():
    both = [("float16", 64), ("bfloat16", 128), ("bfloat16", 64)]
    assert info.self_check_config(both, both) == (torch.bfloat16, 64)
    assert info.self_check_config(both, [("float16", 64)]) == (torch.float16, 64)
    assert info.self_check_config([("bfloat16", 64)], [("float16", 64)]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_check_passes_for_the_input_dtype_reference(dtype):
    result = info.run_self_check(dtype, 64, "cpu", reference_attention)
    assert result.passed, result.summary
    assert result.summary.startswith(f"PASS ({str(dtype).removeprefix('torch.')}, head dim 64")


def test_self_check_fails_on_a_wrong_output_and_names_it():
    result = info.run_self_check(torch.bfloat16, 64, "cpu", scaled_output_attention)
    assert not result.passed
    assert result.summary.startswith("FAIL (bfloat16, head dim 64")
    assert "non-causal out: max error" in result.summary and "causal out" in result.summary


def test_self_check_fails_on_wrong_gradients_alone():
    result = info.run_self_check(torch.bfloat16, 64, "cpu", scaled_gradient_attention)
    assert not result.passed
    for gradient in ("dq", "dk", "dv"):
        assert f"causal {gradient}: max error" in result.summary
    assert " out:" not in result.summary and "softmax_lse" not in result.summary


def test_comparison_follows_the_tolerance_rule():
    ref_fp32 = torch.tensor([1.0, 2.0])
    ref_lowp = torch.tensor([1.0, 2.1])  # PyTorch's own error 0.1
    floor = 0.01
    within = torch.tensor([1.0, 2.0 + 2.0 * 0.1 + floor * 0.9])
    beyond = torch.tensor([1.0, 2.0 + 2.0 * 0.1 + floor * 1.1])
    assert info.compare_to_reference("out", within, ref_fp32, ref_lowp, 2.0, floor) == ""
    failure = info.compare_to_reference("out", beyond, ref_fp32, ref_lowp, 2.0, floor)
    assert failure.startswith("out: max error 2.110e-01 > 2.0 x 1.000e-01")
    nan = torch.tensor([1.0, float("nan")])
    assert info.compare_to_reference("out", nan, ref_fp32, ref_lowp, 2.0, floor) != ""


def test_tolerance_factors_are_those_of_the_accuracy_tests():
    assert info.FORWARD_FACTOR == accuracy.FORWARD_FACTOR
    assert info.GRADIENT_FACTOR == accuracy.GRADIENT_FACTOR


def test_format_rows_aligns_values():
    text = info.format_rows([("a", "1"), ("longer key", "2")])
    assert text == "a:          1\nlonger key: 2"


def test_buckets_line_tells_a_narrowed_build_from_a_full_one():
    every = [64, 96, 128, 192, 256]
    full = info._format_buckets(every, [64, 96, 128, 192, 256, 64])
    assert full == "64, 96, 128, 192, 256 (a head dim runs in the smallest bucket >= it)"
    narrowed = info._format_buckets(every, [128])
    assert narrowed.startswith("128 built, of 64, 96, 128, 192, 256")
    assert info._format_buckets(every, []).startswith("none built")


def test_kernel_families_line_names_a_family_without_kernels_as_not_built():
    from flash_varlen import info

    sm90_absent = {"name": "sm90", "summary": "wgmma", "compute_capabilities": (90, 90),
                   "built_for": []}
    assert info._format_families([sm90_absent, *FAKE_FAMILIES]) == (
        "sm90 (compute capability 9.0 to 9.0; not built); "
        "sm80 (compute capability 8.0 to 9.0; built for 8.0, 9.0)"
    )
