"""The package imports without the compiled extension, and says why the extension is missing.

Failures are simulated with monkeypatch (sys.modules, the import function, the cached state),
which restores everything after each test, so these tests pass whether or not ``_C`` is built
and leak nothing into other tests.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import flash_varlen
from flash_varlen import _extension, ops

HEAD_DIM = 64


@pytest.fixture
def fresh_state(monkeypatch):
    """Forgets any earlier import attempt (restored afterwards by monkeypatch)."""
    monkeypatch.setattr(_extension, "_cached", None)


@pytest.fixture
def extension_absent(monkeypatch, fresh_state):
    """Makes ``import flash_varlen._C`` fail as it does when the extension was never built."""
    monkeypatch.setitem(sys.modules, _extension.EXTENSION_NAME, None)


def test_importing_the_package_does_not_import_the_extension() -> None:
    code = (
        "import sys, flash_varlen; "
        "assert 'flash_varlen._C' not in sys.modules, 'imported eagerly'; "
        "print(flash_varlen.__version__)"
    )
    repo_root = Path(flash_varlen.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == flash_varlen.__version__


def test_missing_extension_raises_runtime_error_with_reason_and_fix(extension_absent) -> None:
    with pytest.raises(RuntimeError) as info:
        _extension.load_extension()
    message = str(info.value)
    assert "flash_varlen._C is not built" in message
    assert "pip install --no-build-isolation -e ." in message
    assert not _extension.is_available()
    assert _extension.unavailable_reason() in message


def test_broken_extension_reports_the_original_import_error(monkeypatch, fresh_state) -> None:
    def broken_import():
        raise ImportError("flash_varlen/_C.so: undefined symbol: _ZN3c104cuda9SetDevice")

    monkeypatch.setattr(_extension, "_import_module", broken_import)
    with pytest.raises(RuntimeError, match="failed to import: .*undefined symbol") as info:
        _extension.load_extension()
    assert "pip install --no-build-isolation -e ." in str(info.value)


def test_cpu_only_torch_is_named_as_the_reason(monkeypatch, extension_absent) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        _extension.load_extension()


def test_missing_cuda_toolchain_is_named_as_the_reason(monkeypatch, extension_absent) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_extension.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="No CUDA toolchain found"):
        _extension.load_extension()


def test_failure_is_remembered_and_not_retried(monkeypatch, fresh_state) -> None:
    attempts = []

    def failing_import():
        attempts.append(1)
        raise ModuleNotFoundError("No module named 'flash_varlen._C'", name="flash_varlen._C")

    monkeypatch.setattr(_extension, "_import_module", failing_import)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="not built"):
            _extension.load_extension()
    assert len(attempts) == 1


def test_compiled_kernels_is_empty_without_the_extension(extension_absent) -> None:
    assert _extension.compiled_kernels() == []


def test_available_extension_is_returned_and_lists_its_kernels(monkeypatch, fresh_state) -> None:
    module = types.ModuleType("flash_varlen._C")
    module.compiled_kernels = lambda: [("sm80", "bfloat16", 128), ("sm80", "float16", 64)]
    monkeypatch.setattr(_extension, "_import_module", lambda: module)
    assert _extension.load_extension() is module
    assert _extension.is_available() and _extension.unavailable_reason() == ""
    assert _extension.compiled_kernels() == [("sm80", "bfloat16", 128), ("sm80", "float16", 64)]


def test_op_reports_the_missing_extension_when_it_runs(extension_absent) -> None:
    """The registered op's real implementation (reached here with CPU tensors) loads _C."""
    q = torch.zeros(4, 2, HEAD_DIM, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not built"):
        ops.varlen_fwd(q, q, q, cu, cu, 4, 4, 0.125, False)
    with pytest.raises(RuntimeError, match="not built"):
        ops.fwd(q[None], q[None], q[None], 0.125, False)


def test_op_forwards_to_the_extension(monkeypatch, fresh_state) -> None:
    """With an extension present, the op calls _C.varlen_fwd with the contract's positional
    arguments in order and the variant options by keyword."""
    received = []
    module = types.ModuleType("flash_varlen._C")

    def varlen_fwd(*args, **kwargs):
        received.append((args, kwargs))
        q = args[0]
        empty = torch.empty(0)
        return q + 1, torch.zeros(q.shape[1], q.shape[0]), empty, empty.long()

    module.varlen_fwd = varlen_fwd
    monkeypatch.setattr(_extension, "_import_module", lambda: module)
    q = torch.zeros(4, 2, HEAD_DIM, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out, lse, _, _ = ops.varlen_fwd(q, q, q, cu, cu, 4, 3, 0.5, True, window_left=2)
    assert torch.equal(out, q + 1) and lse.shape == (2, 4)
    args, kwargs = received[0]
    assert args[5:] == (4, 3, 0.5, True)
    assert kwargs["window_left"] == 2 and kwargs["dropout_p"] == 0.0
