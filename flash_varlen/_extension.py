"""Lazy access to the compiled CUDA extension ``flash_varlen._C``.

The package must import on machines without a GPU, a CUDA toolchain or a build of the
extension (CPU-only CI, documentation builds). So nothing here imports ``_C`` at package import
time: the first call of :func:`load_extension` tries once, remembers either the module or the
reason it failed, and every later call answers from that memory.

A compiled extension only works inside the torch it was compiled against: in another one its
import fails with an undefined symbol, or succeeds and crashes later. So before importing ``_C``
this module reads the build record ``flash_varlen/_build_info.py`` that setup.py writes next to
it, and refuses the import, saying why, when the running torch is not the one recorded (see
:func:`torch_build_identity` for what must match). An extension without a record (built before
setup.py wrote one) is imported unchecked; a record without an extension (a pure-Python install
over an earlier build) is ignored, and the extension is reported as not built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from types import ModuleType

import torch

EXTENSION_NAME = "flash_varlen._C"
BUILD_INFO_NAME = "flash_varlen._build_info"
BUILD_COMMAND = "pip install --no-build-isolation -e ."

# A local version label that only names the CUDA variant of a torch build ("+cu130", "+cpu").
_CUDA_VARIANT_LABEL = re.compile(r"cu\d+|cpu")


@dataclass(frozen=True)
class _LoadResult:
    """Outcome of the one import attempt: the module, or why there is none."""

    module: ModuleType | None
    reason: str


_cached: _LoadResult | None = None


def _is_built() -> bool:
    """Whether there is an extension module to import (found without loading it)."""
    return importlib.util.find_spec(EXTENSION_NAME) is not None


def _import_module() -> ModuleType:
    """Imports the extension (its own function so that tests can simulate failures)."""
    return importlib.import_module(EXTENSION_NAME)


def read_build_info() -> ModuleType | None:
    """The build record ``flash_varlen._build_info`` written by setup.py, or None without one.

    A plain Python module of constants (see BUILD_INFO_FIELDS in setup.py); importing it never
    touches the extension.
    """
    try:
        return importlib.import_module(BUILD_INFO_NAME)
    except ModuleNotFoundError as error:
        if error.name != BUILD_INFO_NAME:
            raise
        return None


def torch_build_identity(version: str, cuda_version: str | None) -> tuple[str, str, str]:
    """What two torch builds must share for an extension compiled against one to load in the other.

    That is (public version, other local label, CUDA version), compared exactly:
    - the public version, the part of ``torch.__version__`` before "+" (major.minor.patch and any
      pre-release or dev part, e.g. "2.11.0" or "2.12.0.dev20260301"): torch's C++ ABI is only
      the same within one release;
    - the CUDA version ``torch.version.cuda`` ("13.0", or "none" for a CPU-only torch): the
      extension links the CUDA runtime of that torch. A local label that only names this variant
      ("+cu130", "+cpu") is therefore ignored: PyPI's wheel of a release carries no label while
      the identical one from PyTorch's own index carries "+cu130", and both report CUDA 13.0;
    - any other local label (a source build's "+git1a2b3c4"), which names a distinct build.
    """
    public, _, local = version.partition("+")
    if _CUDA_VARIANT_LABEL.fullmatch(local):
        local = ""
    return public, local, cuda_version or "none"


def describe_torch(version: str, cuda_version: str | None) -> str:
    """'2.11.0+cu130 (CUDA 13.0)', or '... (CPU-only)' for a torch without CUDA."""
    return f"{version} ({'CUDA ' + cuda_version if cuda_version else 'CPU-only'})"


def _torch_mismatch(record: ModuleType | None) -> str:
    """Why the extension of `record` must not be imported into the running torch, or ''."""
    if record is None:
        return ""
    built = (str(record.TORCH_VERSION), record.TORCH_CUDA_VERSION)
    running = (str(torch.__version__), torch.version.cuda)
    if torch_build_identity(*built) == torch_build_identity(*running):
        return ""
    return (
        f"The compiled extension {EXTENSION_NAME} was built against torch "
        f"{describe_torch(*built)}, but torch {describe_torch(*running)} is running, so it is "
        "not imported (an extension only loads into the torch it was compiled against; in "
        "another it fails with undefined symbols or crashes). Rebuild it for this torch from the "
        f"repository root with `{BUILD_COMMAND}`, or install torch {built[0]} again."
    )


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
        mismatch = _torch_mismatch(read_build_info()) if _is_built() else ""
        if mismatch:
            # Checked before the import: a mismatched extension may crash the process on import.
            _cached = _LoadResult(module=None, reason=mismatch)
        else:
            try:
                _cached = _LoadResult(module=_import_module(), reason="")
            except ImportError as error:
                _cached = _LoadResult(module=None, reason=_describe_failure(error))
    return _cached


def load_extension() -> ModuleType:
    """Returns the compiled module ``flash_varlen._C``.

    Raises:
        RuntimeError: the extension cannot be imported; the message says why (not built, no CUDA
            toolchain, built against another torch, or the original ImportError text) and how to
            build it.
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


def compiled_kernels() -> list[tuple[str, str, int]]:
    """The (kernel family, dtype name, head-dim bucket) triples of the forward kernels this
    build contains; [] without the extension.

    A narrowed development build (see setup.py) contains only some; calls outside them raise
    NotImplementedError from the extension.
    """
    module = _load().module
    if module is None:
        return []
    return [
        (str(family), str(name), int(bucket))
        for family, name, bucket in module.compiled_kernels()
    ]
