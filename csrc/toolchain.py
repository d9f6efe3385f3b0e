"""The build's toolchain: which CUDA toolkit compiles the extension, and whether the machine can
build it at all, decided before anything compiles.

setup.py loads this module by path (it must not import the package or need torch to load). Each
check ends the build with one message that names what is missing and how to get it, instead of
the compiler error or traceback it would otherwise cause minutes later.

Toolkit discovery (``find_cuda_toolkit``), first usable candidate wins:
1. torch's guess (``torch.utils.cpp_extension.CUDA_HOME``: $CUDA_HOME / $CUDA_PATH, else the
   folder above the nvcc on PATH, else /usr/local/cuda). torch takes the folder above
   ``which nvcc`` as is, so an nvcc linked into /usr/local/bin makes it guess /usr/local, which
   has no CUDA headers;
2. the nvcc on PATH resolved through symlinks: the toolkit it belongs to;
3. /usr/local/cuda.
A candidate is usable when it has ``bin/nvcc`` and ``include/cuda_runtime.h``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOOLKIT = Path("/usr/local/cuda")
RUNTIME_HEADER = Path("include") / "cuda_runtime.h"
NVCC = Path("bin") / "nvcc"
UNKNOWN = "unknown"
MESSAGE_PREFIX = "flash_varlen: "
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


class BuildEnvironmentError(Exception):
    """The machine cannot build the extension; the message says why and what to do."""


@dataclass(frozen=True)
class CudaToolkit:
    home: Path
    version: str  # nvcc's major.minor.patch, or "unknown"
    # Why an earlier candidate was passed over, for the line the build prints; empty if none was.
    passed_over: tuple[str, ...] = ()

    @property
    def major(self) -> str:
        return self.version.split(".")[0]


def parse_nvcc_version(banner: str) -> str:
    """'13.0.88' from `nvcc --version` output ('... release 13.0, V13.0.88'), else 'unknown'."""
    match = re.search(r"\bV(\d+\.\d+\.\d+)", banner)
    return match.group(1) if match else UNKNOWN


def nvcc_version(home: Path) -> str:
    """The version of ``home``/bin/nvcc, or 'unknown' when it does not run."""
    try:
        result = subprocess.run(
            [str(home / NVCC), "--version"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN
    return parse_nvcc_version(result.stdout)


def _missing_parts(home: Path) -> list[str]:
    return [str(part) for part in (NVCC, RUNTIME_HEADER) if not (home / part).is_file()]


def toolkit_candidates(torch_guess: str | None, path: str | None) -> list[tuple[str, Path]]:
    """(how it was found, folder) in the order of the module docstring, without repeats."""
    candidates: list[tuple[str, Path]] = []
    if torch_guess:
        candidates.append(("torch's CUDA_HOME guess", Path(torch_guess)))
    nvcc_on_path = shutil.which("nvcc", path=path)
    if nvcc_on_path:
        resolved = Path(nvcc_on_path).resolve()
        how = f"the nvcc on PATH ({nvcc_on_path} -> {resolved})"
        candidates.append((how, resolved.parent.parent))
    candidates.append(("the default location", DEFAULT_TOOLKIT))
    unique: list[tuple[str, Path]] = []
    for how, folder in candidates:
        if all(folder != seen for _, seen in unique):
            unique.append((how, folder))
    return unique


def find_cuda_toolkit(torch_guess: str | None, path: str | None = None) -> CudaToolkit:
    """The first usable toolkit among ``toolkit_candidates`` (``path``: the PATH to search for
    nvcc, default the environment's). Raises BuildEnvironmentError naming every candidate and
    what it lacked when none is usable."""
    passed_over = []
    for how, folder in toolkit_candidates(torch_guess, path):
        missing = _missing_parts(folder)
        if not missing:
            return CudaToolkit(folder, nvcc_version(folder), tuple(passed_over))
        passed_over.append(f"{how} {folder} has no {' or '.join(missing)}")
    raise BuildEnvironmentError(
        "no CUDA toolkit found (nvcc and the CUDA headers): "
        + "; ".join(passed_over)
        + ". Install the CUDA toolkit whose major version matches torch's CUDA, or set CUDA_HOME "
        "to the folder that holds bin/nvcc and include/cuda_runtime.h."
    )


def check_torch(torch_version: str | None, torch_cuda: str | None) -> None:
    """torch is installed (``torch_version`` None: not importable) and is a CUDA build."""
    if torch_version is None:
        raise BuildEnvironmentError(
            "torch is not installed. The extension is compiled against the installed torch: "
            "install a CUDA build of torch first (pip install torch), then build with "
            "pip install --no-build-isolation (see the README's install command)."
        )
    if torch_cuda is None:
        raise BuildEnvironmentError(
            f"the installed torch {torch_version} is a CPU-only build; the extension needs a "
            "CUDA build of torch (e.g. pip install torch --index-url "
            "https://download.pytorch.org/whl/cu130). FLASH_VARLEN_SKIP_CUDA=1 installs the "
            "pure-Python package without kernels instead."
        )


def check_toolkit_matches_torch(toolkit: CudaToolkit, torch_version: str, torch_cuda: str) -> None:
    """The toolkit's CUDA major version is torch's (an extension built with another major does
    not load into that torch)."""
    if toolkit.version == UNKNOWN:
        raise BuildEnvironmentError(
            f"{toolkit.home / NVCC} did not report its version (nvcc --version failed)."
        )
    torch_major = torch_cuda.split(".")[0]
    if toolkit.major != torch_major:
        raise BuildEnvironmentError(
            f"the CUDA toolkit {toolkit.version} at {toolkit.home} does not match torch "
            f"{torch_version}, which was built with CUDA {torch_cuda}: their major versions "
            f"must agree. Install CUDA toolkit {torch_major}.x (and set CUDA_HOME to it), or a "
            f"torch built for CUDA {toolkit.major}."
        )


def describe(toolkit: CudaToolkit) -> str:
    """The line the build prints about the toolkit it uses."""
    line = f"CUDA toolkit {toolkit.version} at {toolkit.home}"
    if toolkit.passed_over:
        line += " (" + "; ".join(toolkit.passed_over) + ")"
    return line


def use_toolkit(toolkit: CudaToolkit, cpp_extension) -> None:
    """Points torch's extension builder (the module ``cpp_extension``, which computed its
    CUDA_HOME when imported) and every process it starts at ``toolkit``."""
    cpp_extension.CUDA_HOME = str(toolkit.home)
    os.environ["CUDA_HOME"] = str(toolkit.home)


def cutlass_include_dir(root: Path) -> Path:
    """CuTe/CUTLASS headers: $CUTLASS_PATH, else ``root``/third_party/cutlass, else the pinned
    wheel. Raises BuildEnvironmentError when none has them. setup.py compiles with them and
    csrc/generate.py copies the extended wgmma atoms the sm90 family uses from them."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    candidates.append(root / "third_party" / "cutlass" / "include")
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "source" / "include")
    for candidate in candidates:
        if (candidate / "cute" / "tensor.hpp").exists():
            return candidate
    raise BuildEnvironmentError(
        f"the CUTLASS/CuTe headers were not found. Install them with `pip install --no-deps "
        f"{CUTLASS_PIN}` (headers only; the README's install command does), or set CUTLASS_PATH "
        "to a CUTLASS checkout, or check one out into third_party/cutlass."
    )
