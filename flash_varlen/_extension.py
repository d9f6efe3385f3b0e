"""Lazy access to the compiled CUDA extension ``flash_varlen._C``.

The package must import on machines without a GPU, a CUDA toolchain or a build of the
extension (CPU-only CI, documentation builds). So nothing here imports ``_C`` at package import
time: the first call of :func:`load_extension` tries once, remembers either the module or the
reason it failed, and every later call answers from that memory.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from types import ModuleType

import torch

EXTENSION_NAME = "flash_varlen._C"
BUILD_COMMAND = "pip install --no-build-isolation -e ."


@dataclass(frozen=True)
class _LoadResult:
    """Outcome of the one import attempt: the module, or why there is none."""

    module: ModuleType | None
    reason: str


_cached: _LoadResult | None = None


def _import_module() -> ModuleType:
    """Imports the extension (its own function so that tests can simulate failures)."""
    return importlib.import_module(EXTENSION_NAME)


def _toolchain_hint() -> str:
    """Explains what is missing to build the extension here, or '' when nothing obvious is."""
    if torch.version.cuda is None:
        return (
            f"This torch ({torch.__version__}) is a CPU-only build; the extension needs a CUDA "
            "build of torch."
        )
    has_cuda_home = any(os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH"))
    if not has_cuda_home and shutil.which("nvcc") is None:
        return (
            "No CUDA toolchain found (CUDA_HOME/CUDA_PATH unset and nvcc not on PATH); install a "
            f"CUDA toolkit matching torch's CUDA {torch.version.cuda}."
        )
    return ""


def _describe_failure(error: ImportError) -> str:
    """Turns an ImportError of the extension into a message saying why and how to fix it."""
    not_built = isinstance(error, ModuleNotFoundError) and error.name == EXTENSION_NAME
    if not_built:
        lines = [f"The compiled extension {EXTENSION_NAME} is not built."]
        hint = _toolchain_hint()
        if hint:
            lines.append(hint)
    else:
        # The module exists but cannot load (ABI mismatch with torch, missing CUDA runtime,
        # undefined symbol): the original text is the only useful diagnosis.
        lines = [f"The compiled extension {EXTENSION_NAME} failed to import: {error}"]
    lines.append(f"Build it from the repository root with `{BUILD_COMMAND}`.")
    return " ".join(lines)


def _load() -> _LoadResult:
    global _cached
    if _cached is None:
        try:
            _cached = _LoadResult(module=_import_module(), reason="")
        except ImportError as error:
            _cached = _LoadResult(module=None, reason=_describe_failure(error))
    return _cached


def load_extension() -> ModuleType:
    """Returns the compiled module ``flash_varlen._C``.

    Raises:
        RuntimeError: the extension cannot be imported; the message says why (not built, no CUDA
            toolchain, or the original ImportError text) and how to build it.
    """
    result = _load()
    if result.module is None:
        raise RuntimeError(f"flash_varlen: {result.reason}")
    return result.module


def is_available() -> bool:
    """Whether the compiled extension imports (it may still lack kernels for some inputs)."""
    return _load().module is not None


def unavailable_reason() -> str:
    """Why the extension is unavailable, or '' when it imports."""
    return _load().reason


def compiled_kernels() -> list[tuple[str, int]]:
    """The (dtype name, head-dim bucket) pairs this build contains; [] without the extension.

    A narrowed development build (see setup.py) contains only some pairs; calls outside them
    raise NotImplementedError from the extension.
    """
    module = _load().module
    if module is None:
        return []
    return [(str(dtype_name), int(bucket)) for dtype_name, bucket in module.compiled_kernels()]
