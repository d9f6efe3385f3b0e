"""Builds flash_varlen and its CUDA extension `flash_varlen._C`.

Install with `pip install --no-build-isolation .` (the extension must be compiled against the
torch that is installed, so pip must not build it in an isolated environment with another torch).

Environment variables (all optional):
  CUTLASS_PATH              a CUTLASS checkout to take the CuTe/CUTLASS headers from
  FLASH_VARLEN_DTYPES       comma list narrowing the kernels built: fp16,bf16 (default both)
  FLASH_VARLEN_HEAD_DIMS    comma list of head-dim buckets: 64,96,128,192,256 (default all)
  FLASH_VARLEN_ARCHS        comma list of target architectures: 80,90 (default both)
  FLASH_VARLEN_SKIP_CUDA=1  install the pure-Python package only (no extension)
  MAX_JOBS                  parallel compile jobs (ninja), as for every torch extension
  NVCC_THREADS              threads nvcc uses per file to compile its architectures (default 2)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
ALL_DTYPES = ("fp16", "bf16")
ALL_HEAD_DIMS = (64, 96, 128, 192, 256)
ALL_ARCHS = ("80", "90")


def env_list(name: str, allowed: tuple) -> list[str]:
    """The comma-separated values of an environment variable, checked against `allowed`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return [str(a) for a in allowed]
    values = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [v for v in values if v not in {str(a) for a in allowed}]
    if unknown:
        sys.exit(f"{name}={raw!r}: unknown value(s) {unknown}; allowed: {list(allowed)}")
    return values


def cutlass_include_dir() -> Path:
    """CuTe/CUTLASS headers: $CUTLASS_PATH, else third_party/cutlass, else the pinned wheel."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    candidates.append(ROOT / "third_party" / "cutlass" / "include")
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "source" / "include")
    for candidate in candidates:
        if (candidate / "cute" / "tensor.hpp").exists():
            print(f"flash_varlen: CUTLASS headers from {candidate}")
            return candidate
    sys.exit(
        "flash_varlen: CUTLASS/CuTe headers not found. Set CUTLASS_PATH, check CUTLASS out into "
        f"third_party/cutlass, or `pip install --no-deps {CUTLASS_PIN}`."
    )


def kernel_sources() -> list[str]:
    """The generated instantiation files selected by FLASH_VARLEN_DTYPES / _HEAD_DIMS."""
    dtypes = env_list("FLASH_VARLEN_DTYPES", ALL_DTYPES)
    head_dims = env_list("FLASH_VARLEN_HEAD_DIMS", ALL_HEAD_DIMS)
    selected = []
    for path in sorted((CSRC / "instantiations").glob("flash_*.cu")):
        # flash_<fwd|bwd>_sm80_<dtype>_hdim<N>[_causal].cu
        parts = path.stem.split("_")
        dtype, head_dim = parts[3], parts[4].removeprefix("hdim")
        if dtype in dtypes and head_dim in head_dims:
            selected.append(str(path.relative_to(ROOT)))
    if not selected:
        sys.exit("flash_varlen: FLASH_VARLEN_DTYPES / FLASH_VARLEN_HEAD_DIMS select no kernel")
    return selected


def nvcc_flags() -> list[str]:
    archs = env_list("FLASH_VARLEN_ARCHS", ALL_ARCHS)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        # torch's extension flags disable the half/bfloat16 operators that CUTLASS's types use.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        *gencode,
    ]


def extensions() -> tuple[list, dict]:
    if os.environ.get("FLASH_VARLEN_SKIP_CUDA") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include = cutlass_include_dir()
    ext = CUDAExtension(
        name="flash_varlen._C",
        sources=[*sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")),
                 "csrc/kernels/kernel_registry.cpp", *kernel_sources()],
        include_dirs=[str(CSRC), str(include)],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
