"""Builds flash_varlen and its CUDA extension `flash_varlen._C`.

Install with `pip install --no-build-isolation .` (the extension must be compiled against the
torch that is installed, so pip must not build it in an isolated environment with another torch).

Before anything compiles, the build finds the CUDA toolkit itself and checks the machine
(csrc/toolchain.py: torch installed and built with CUDA, a toolkit with nvcc and the CUDA headers
whose major version is torch's, the CUTLASS headers), ending with one message naming what is
missing; it chooses how many files to compile at once from the cores and the free memory
(csrc/build_parallelism.py) and says so in one line. Compiled objects stay in build/ (also for
editable installs), so a build that stopped resumes where it was.

Environment variables (all optional):
  CUTLASS_PATH              a CUTLASS checkout to take the CuTe/CUTLASS headers from
  FLASH_VARLEN_DTYPES       comma list narrowing the kernels built: fp16,bf16 (default both)
  FLASH_VARLEN_HEAD_DIMS    comma list of head-dim buckets: 64,96,128,192,256 (default all)
  FLASH_VARLEN_FAMILIES     comma list of kernel families (csrc/kernel_families.py; default all)
  FLASH_VARLEN_ARCHS        comma list of target architectures: 80,90; each family is compiled
                            for the ones among its own targets. Default: those that run the
                            GPUs of TORCH_CUDA_ARCH_LIST, else of the GPUs visible at build time,
                            else all
  FLASH_VARLEN_SKIP_CUDA=1  install the pure-Python package only (no extension)
  CUDA_HOME                 the CUDA toolkit (default: found as described above)
  MAX_JOBS                  parallel compile jobs (ninja); default from cores and free memory
  NVCC_THREADS              threads nvcc uses per file to compile its architectures (default 2)

Every build of the extension also writes flash_varlen/_build_info.py (git-ignored) next to it:
the torch, CUDA, nvcc and CUTLASS versions and the kernel selection it was built with. It lands in
the source tree for `setup.py build_ext --inplace` and editable installs, and in the wheel for
`pip install .` / `pip wheel .`. flash_varlen._extension reads it to refuse loading the extension
into another torch, and `python -m flash_varlen` prints it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PACKAGE = "flash_varlen"
BUILD_INFO_FILE = "_build_info.py"


def _load_by_path(path: Path, name: str):
    """A module of this tree, loaded by path: setup.py must not import the package (or torch)
    to read the declarations."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The kernel generator holds the compile-time matrix: element types, head-dim buckets (from
# flash_varlen/contract.py) and the kernel families with their nvcc targets.
GENERATOR = _load_by_path(CSRC / "generate.py", "flash_varlen_generate")
TOOLCHAIN = _load_by_path(CSRC / "toolchain.py", "flash_varlen_toolchain")
PARALLELISM = _load_by_path(CSRC / "build_parallelism.py", "flash_varlen_build_parallelism")
# Compiled objects, kept between builds so that a build that stopped resumes (ninja rebuilds an
# object whose command line changed). setuptools would put an editable install's objects in a
# temporary folder that a failure deletes.
OBJECTS_DIR = ROOT / "build" / f"objects.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
FAMILIES = {family.name: family for family in GENERATOR.kernel_families.FAMILIES}
ALL_DTYPES = tuple(GENERATOR.ELEMENT_TYPES)
ALL_HEAD_DIMS = tuple(GENERATOR.HEAD_DIM_BUCKETS)
ALL_FAMILIES = tuple(FAMILIES)
ALL_ARCHS = GENERATOR.kernel_families.TARGET_ARCHS

# The fields of flash_varlen/_build_info.py, in file order, each with the comment written above
# it. flash_varlen._extension and flash_varlen.info read these names.
BUILD_INFO_FIELDS = {
    "PACKAGE_VERSION": "flash_varlen version that was built.",
    "TORCH_VERSION": "torch.__version__ the extension was compiled against.",
    "TORCH_CUDA_VERSION": "torch.version.cuda of that torch (None for a CPU-only torch).",
    "NVCC_VERSION": "nvcc that compiled the kernels (major.minor.patch).",
    "CUTLASS_VERSION": "CUTLASS headers used (CUTLASS_MAJOR.MINOR.PATCH of cutlass/version.h).",
    "ARCHS": "GPU architectures with compiled code (FLASH_VARLEN_ARCHS), e.g. '80' for sm_80.",
    "FAMILIES": "Kernel families compiled (FLASH_VARLEN_FAMILIES and the architectures).",
    "DTYPES": "Element types selected (FLASH_VARLEN_DTYPES).",
    "HEAD_DIMS": "Head-dim buckets selected (FLASH_VARLEN_HEAD_DIMS).",
}
UNKNOWN = "unknown"
# The order in which a family's kernel files are handed to ninja, which starts them in that order
# as jobs free up: heaviest first, so that the run does not end with one long file on one core
# while the other cores wait. The backward files are the heaviest: 58 to 87 s each against 47 to
# 60 s for the forward in the 2-core full build at 6e065ca (its .ninja_log; 62 against 49 CPU
# seconds for the d128 bf16 pair compiled alone by nvcc 13.0). The host sources, 2 to 13 s each,
# come last (build_runs) and fill the cores while the last kernels finish. The decode family
# (its own direction) has no backward; its files come in their family's run, after any forward.
DIRECTIONS_HEAVIEST_FIRST = ("bwd", "fwd", "decode")
# The torch versions the package supports (the pure-Python package and an sdist say this).
TORCH_RANGE = "torch>=2.11"


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
    """CuTe/CUTLASS headers (toolchain.cutlass_include_dir says where it looks)."""
    include = TOOLCHAIN.cutlass_include_dir(ROOT)
    print(f"flash_varlen: CUTLASS headers from {include}")
    return include


def kernel_sources() -> dict[str, list[str]]:
    """The generated instantiation files selected by FLASH_VARLEN_DTYPES / _HEAD_DIMS /
    _FAMILIES, per family (families with no selected target architecture get none), each
    family's in DIRECTIONS_HEAVIEST_FIRST order."""
    dtypes = env_list("FLASH_VARLEN_DTYPES", ALL_DTYPES)
    head_dims = env_list("FLASH_VARLEN_HEAD_DIMS", ALL_HEAD_DIMS)
    families = [
        name for name in env_list("FLASH_VARLEN_FAMILIES", ALL_FAMILIES) if family_archs(name)
    ]
    selected: dict[str, list[str]] = {}
    by_weight = sorted(
        GENERATOR.all_instantiations(),
        key=lambda inst: (
            ALL_FAMILIES.index(inst.family), DIRECTIONS_HEAVIEST_FIRST.index(inst.direction)
        ),
    )
    for inst in by_weight:
        if inst.family in families and inst.dtype in dtypes and str(inst.head_dim) in head_dims:
            path = GENERATOR.INSTANTIATION_DIR / inst.relative_path
            selected.setdefault(inst.family, []).append(str(path.relative_to(ROOT)))
    if not selected:
        sys.exit(
            "flash_varlen: FLASH_VARLEN_DTYPES / FLASH_VARLEN_HEAD_DIMS / FLASH_VARLEN_FAMILIES / "
            "FLASH_VARLEN_ARCHS select no kernel"
        )
    return selected


class CompileRun(NamedTuple):
    """One ninja run of the compile step: files that share their nvcc target flags."""

    parts: list[tuple[str, str]]  # the (family, direction) pairs of its kernel files
    target_flags: list[str]
    files: list[str]  # kernel files, then any host sources

    @property
    def label(self) -> str:
        """The parts in words: "sm80 fwd, decode" (a family named after its one direction alone)."""
        return ", ".join(
            family if direction == family else f"{family} {direction}"
            for family, direction in self.parts
        )


def instantiation_direction(path: str) -> str:
    """The direction of a generated instantiation file (<family>/<direction>_<dtype>_...cu)."""
    return Path(path).name.split("_")[0]


def build_runs(family_sources: dict[str, list[str]], host_sources: list[str]) -> list[CompileRun]:
    """The ninja runs of the compile step, each with its files in the order ninja starts them:
    torch's extension builder gives every file of a run the same nvcc flags, so there is one run
    per set of target flags (a family's directions differ where one shares_ptx; the sm80
    forward's flags and the decode family's are the same), in the order of the families and
    their directions. The host sources join the first run, after its kernel files (nvcc flags do
    not touch .cpp files), so that they compile while kernels do: compiled after them, they added
    about a minute to the full build on the 16-core GPU machine (293 s against 204 s)."""
    runs: dict[tuple[str, ...], CompileRun] = {}
    for family, files in family_sources.items():
        for path in files:
            direction = instantiation_direction(path)
            flags = target_flags(family, direction)
            run = runs.setdefault(tuple(flags), CompileRun([], flags, []))
            if (family, direction) not in run.parts:
                run.parts.append((family, direction))
            run.files.append(path)
    ordered = list(runs.values())
    if ordered:
        ordered[0].files.extend(host_sources)
    return ordered


def capability_arch(capability: tuple[int, int]) -> str | None:
    """The compiled architecture whose machine code runs on a GPU of ``capability``: the highest
    of ALL_ARCHS with its major version and not above it (sm_80 code runs on 8.6 and 8.9, not on
    9.0 or 10.0), or None."""
    major, minor = capability
    runs = [
        arch for arch in ALL_ARCHS if int(arch) // 10 == major and int(arch) <= 10 * major + minor
    ]
    return max(runs, key=int, default=None)


def parse_torch_arch_list(text: str) -> list[tuple[int, int]]:
    """The compute capabilities of a TORCH_CUDA_ARCH_LIST ('8.0;9.0+PTX', '8.6 9.0a')."""
    capabilities = []
    for token in re.split(r"[;,\s]+", text.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", token)
        if match is None:
            raise TOOLCHAIN.BuildEnvironmentError(
                f"TORCH_CUDA_ARCH_LIST={text!r}: {token!r} is not a compute capability like 9.0 "
                "(set FLASH_VARLEN_ARCHS=80,90 instead to name the architectures directly)"
            )
        capabilities.append((int(match.group(1)), int(match.group(2))))
    return capabilities


def visible_gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capabilities of the GPUs torch sees at build time (none without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def arch_selection() -> tuple[list[str], str]:
    """The target architectures ('80' for sm_80) and why: FLASH_VARLEN_ARCHS when set, else
    those that run the GPUs of TORCH_CUDA_ARCH_LIST, else those of the GPUs visible at build time
    (as torch builds its extensions), else every architecture the kernel families target."""
    if os.environ.get("FLASH_VARLEN_ARCHS", "").strip():
        # In ascending order whatever order the variable lists them in: a family that shares
        # one PTX among its targets compiles it for the lowest (target_flags).
        named = set(env_list("FLASH_VARLEN_ARCHS", ALL_ARCHS))
        return [arch for arch in ALL_ARCHS if arch in named], "FLASH_VARLEN_ARCHS"
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        source = "TORCH_CUDA_ARCH_LIST"
        capabilities = parse_torch_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    else:
        source = "the GPUs visible at build time"
        capabilities = visible_gpu_capabilities()
    if not capabilities:
        return list(ALL_ARCHS), "no GPU visible at build time: every target architecture"
    archs = {capability_arch(capability) for capability in capabilities} - {None}
    named = ", ".join(f"{major}.{minor}" for major, minor in capabilities)
    if not archs:
        return list(ALL_ARCHS), (
            f"no kernel family runs compute capability {named} ({source}): every target "
            "architecture"
        )
    return [arch for arch in ALL_ARCHS if arch in archs], f"{source}: compute capability {named}"


def selected_archs() -> list[str]:
    """The target architectures of this build ('80' for sm_80); see arch_selection."""
    return arch_selection()[0]


def family_archs(family: str) -> list[str]:
    """The selected architectures among a family's own targets."""
    return [arch for arch in selected_archs() if arch in FAMILIES[family].targets]


def nvcc_flags(nvcc_threads: int) -> list[str]:
    """The nvcc flags every family shares; target_flags adds each family's own."""
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
        f"--threads={nvcc_threads}",
    ]


def target_flags(family: str, direction: str) -> list[str]:
    """nvcc's flags for the files of one direction of a family: the -gencode flags of the
    family's selected architectures (one for all of them, from the lowest's PTX, where the
    direction shares_ptx), FLASH_VARLEN_MACHINE_ARCHS (a bit per TARGET_ARCHS entry the file has
    machine code for, which its kernel registration reads: __CUDA_ARCH_LIST__ names only the
    virtual architectures), then the flags the family's code needs (KernelFamily.nvcc_flags)."""
    declared = FAMILIES[family]
    archs = family_archs(family)
    targets = [declared.targets[arch] for arch in archs]
    if declared.directions[direction].shares_ptx and len(targets) > 1:
        reals = ",".join(target.real for target in targets)
        gencode = [f"-gencode=arch={targets[0].virtual},code=[{reals}]"]
    else:
        gencode = [target.gencode() for target in targets]
    machine_archs = sum(1 << ALL_ARCHS.index(arch) for arch in archs)
    return [*gencode, f"-DFLASH_VARLEN_MACHINE_ARCHS={machine_archs}", *declared.nvcc_flags]


def cutlass_version(include_dir: Path) -> str:
    """'MAJOR.MINOR.PATCH' from the CUTLASS_MAJOR/MINOR/PATCH macros of cutlass/version.h under
    `include_dir`, or 'unknown' when the header or a macro is missing (the record must not fail
    a build that already succeeded)."""
    header = include_dir / "cutlass" / "version.h"
    if not header.is_file():
        return UNKNOWN
    text = header.read_text()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^\s*#define\s+CUTLASS_{part}\s+(\d+)", text, re.MULTILINE)
        if match is None:
            return UNKNOWN
        parts.append(match.group(1))
    return ".".join(parts)


def collect_build_info(
    package_version: str, include_dir: Path, nvcc_version: str
) -> dict[str, object]:
    """The values of BUILD_INFO_FIELDS for the build now running."""
    import torch

    return {
        "PACKAGE_VERSION": package_version,
        "TORCH_VERSION": str(torch.__version__),
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "NVCC_VERSION": nvcc_version,
        "CUTLASS_VERSION": cutlass_version(include_dir),
        "ARCHS": tuple(selected_archs()),
        "FAMILIES": tuple(kernel_sources()),
        "DTYPES": tuple(env_list("FLASH_VARLEN_DTYPES", ALL_DTYPES)),
        "HEAD_DIMS": tuple(int(h) for h in env_list("FLASH_VARLEN_HEAD_DIMS", ALL_HEAD_DIMS)),
    }


def render_build_info(values: dict[str, object]) -> str:
    """The Python source of flash_varlen/_build_info.py for `values` (exactly the names of
    BUILD_INFO_FIELDS; str, int, None or tuples of them, written with repr)."""
    missing = [name for name in BUILD_INFO_FIELDS if name not in values]
    extra = [name for name in values if name not in BUILD_INFO_FIELDS]
    if missing or extra:
        raise ValueError(
            f"build info fields must be exactly {list(BUILD_INFO_FIELDS)}; "
            f"missing {missing}, unexpected {extra}"
        )
    lines = [
        '"""What flash_varlen._C was built with. Written by setup.py at build time: do not edit, '
        "rebuild.",
        "",
        "flash_varlen._extension compares TORCH_VERSION and TORCH_CUDA_VERSION with the running "
        "torch",
        'before importing the extension; `python -m flash_varlen` prints every value."""',
    ]
    for name, comment in BUILD_INFO_FIELDS.items():
        lines += ["", f"# {comment}", f"{name} = {values[name]!r}"]
    return "\n".join(lines) + "\n"


def build_ext_command(
    include_dir: Path, family_sources: dict[str, list[str]], nvcc_version: str
) -> type:
    """torch's BuildExtension (with ninja) that compiles each kernel family's files with the
    family's own nvcc targets into OBJECTS_DIR, and writes the build record after a successful
    build: into the source package for in-place and editable builds, else into build_lib, from
    which the wheel is made."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithRecord(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = str(OBJECTS_DIR)

        def build_extension(self, ext) -> None:
            # torch's extension builder gives every source the same flags, so the compile step
            # is split into build_runs: each family's kernel files are compiled with its own
            # target flags. The link step is setuptools' own.
            compile_with_shared_flags = self.compiler.compile
            kernel_files = {path for files in family_sources.values() for path in files}

            def compile_by_family(sources: list[str], *, extra_postargs: dict, **kwargs) -> list:
                host = [path for path in sources if path not in kernel_files]
                objects = []
                for run in build_runs(family_sources, host):
                    kernels = [path for path in run.files if path in kernel_files]
                    print(f"flash_varlen: compiling {len(kernels)} kernel files ({run.label}): "
                          + " ".join(run.target_flags))
                    nvcc = extra_postargs["nvcc"] + run.target_flags
                    flags = {**extra_postargs, "nvcc": nvcc}
                    objects += compile_with_shared_flags(run.files, extra_postargs=flags, **kwargs)
                return objects

            self.compiler.compile = compile_by_family
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_with_shared_flags

        def _record_path(self) -> Path:
            package_root = ROOT if self.inplace else Path(self.build_lib)
            return package_root / PACKAGE / BUILD_INFO_FILE

        def run(self) -> None:
            super().run()
            values = collect_build_info(
                self.distribution.get_version(), include_dir, nvcc_version
            )
            path = self._record_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_build_info(values))
            print(f"flash_varlen: wrote the build record {path}")

        def get_outputs(self) -> list[str]:
            return [*super().get_outputs(), str(self._record_path())]

    return BuildExtensionWithRecord


def say(line: str) -> None:
    print(f"{TOOLCHAIN.MESSAGE_PREFIX}{line}", flush=True)


def checked_toolchain():
    """The CUDA toolkit the build uses, after every check of toolchain.py (in the order a user
    would fix them: torch, then the toolkit, then the headers); torch's extension builder is
    pointed at it. Raises BuildEnvironmentError."""
    try:
        import torch
    except ImportError:
        TOOLCHAIN.check_torch(None, None)
    TOOLCHAIN.check_torch(torch.__version__, torch.version.cuda)
    from torch.utils import cpp_extension

    toolkit = TOOLCHAIN.find_cuda_toolkit(cpp_extension.CUDA_HOME)
    TOOLCHAIN.check_toolkit_matches_torch(toolkit, torch.__version__, torch.version.cuda)
    TOOLCHAIN.use_toolkit(toolkit, cpp_extension)
    say(TOOLCHAIN.describe(toolkit))
    return toolkit


def extensions() -> tuple[list, dict]:
    if os.environ.get("FLASH_VARLEN_SKIP_CUDA") == "1":
        return [], {}
    toolkit = checked_toolchain()
    include = cutlass_include_dir()
    try:
        parallelism = PARALLELISM.choose(
            os.cpu_count() or 1, PARALLELISM.available_memory_bytes()
        )
    except ValueError as error:  # a MAX_JOBS / NVCC_THREADS that is no positive integer
        raise TOOLCHAIN.BuildEnvironmentError(str(error)) from None
    # torch's extension builder reads MAX_JOBS for ninja's parallelism.
    os.environ["MAX_JOBS"] = str(parallelism.jobs)
    say(PARALLELISM.describe(parallelism))
    from torch.utils.cpp_extension import CUDAExtension

    family_sources = kernel_sources()
    archs, reason = arch_selection()
    say(
        f"building for {', '.join(f'sm_{arch}' for arch in archs)} ({reason}; "
        "FLASH_VARLEN_ARCHS or TORCH_CUDA_ARCH_LIST choose others)"
    )
    # Host code: the bindings, the generated entry points and checks, the kernel registry.
    host_sources = sorted(
        str(path.relative_to(ROOT))
        for folder in ("bindings", "generated", "kernels/common")
        for path in (CSRC / folder).glob("*.cpp")
    )
    ext = CUDAExtension(
        name="flash_varlen._C",
        sources=[*host_sources, *(path for files in family_sources.values() for path in files)],
        include_dirs=[str(CSRC), str(include)],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": nvcc_flags(parallelism.nvcc_threads),
        },
    )
    return [ext], {"build_ext": build_ext_command(include, family_sources, toolkit.version)}


def torch_requirement(commands: list[str], torch_version: str | None) -> str:
    """The torch requirement of the metadata being built.

    A wheel that contains the compiled extension loads only under the torch it was compiled
    against (flash_varlen._extension refuses another), so its metadata pins that version:
    ``torch==2.11.0`` (PEP 440 ignores the local ``+cu130`` label of the installed version when the
    requirement has none, so the CUDA variant is left to the import check). An sdist, which
    builds against whatever torch it meets, and the pure-Python package keep TORCH_RANGE.
    """
    if torch_version is None or "sdist" in commands:
        return TORCH_RANGE
    return f"torch=={torch_version.split('+')[0]}"


# setup.py commands that compile (or install) the extension.
BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel")


def compiles_extension(commands: list[str]) -> bool:
    """False for a source distribution alone: it ships the sources (MANIFEST.in) and compiles
    nothing, so it needs neither torch nor a CUDA toolkit."""
    return "sdist" not in commands or any(command in BUILD_COMMANDS for command in commands)


def main() -> None:
    try:
        ext_modules, cmdclass = extensions() if compiles_extension(sys.argv[1:]) else ([], {})
    except TOOLCHAIN.BuildEnvironmentError as error:
        # One line that says what to fix, instead of a traceback (pip shows the last lines).
        sys.exit(f"{TOOLCHAIN.MESSAGE_PREFIX}cannot build the CUDA extension: {error}")
    torch_version = None
    if ext_modules:
        import torch

        torch_version = torch.__version__
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=[torch_requirement(sys.argv[1:], torch_version)],
    )


# Tests import this file to check the functions above; only running it (setuptools and pip run it
# as __main__) builds anything.
if __name__ == "__main__":
    main()
