"""Compiles kernel instantiation files to objects with the build's own nvcc flags, without torch's
extension machinery or a GPU, and prints ptxas's register and spill report for each kernel:

    python scripts/compile_kernel.py csrc/instantiations/sm90/fwd_bf16_hdim128.cu [...] \
        [--out DIR] [--sass]

Each file is compiled for every target of its kernel family (csrc/kernel_families.py) with the
family's own flags. It is the quick check of a kernel change (about a minute per file on one
core) and CI's compile check of the sm90 family, which CI's narrowed build (sm_80) leaves out, so
that a template error never reaches the GPU machine. --sass writes the disassembly next to each
object (cuobjdump from $CUOBJDUMP, the PATH or the triton package). Exit status 1 when a file
does not compile or a kernel spills.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REPORT = re.compile(r"ptxas info\s*: (Compiling entry function|Used) ")


def load_module(relative_path: str, name: str):
    """A file of the repository as a module (importing setup.py builds nothing)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(setup, source: Path, output: Path, nvcc: Path) -> list[str]:
    """nvcc's command line for one instantiation file: the shared flags, the target flags of its
    family and direction (every target of the family), the include folders, and ptxas's
    report."""
    family = source.parent.name
    if family not in setup.FAMILIES:
        raise SystemExit(f"{source}: not under csrc/instantiations/<family>/")
    os.environ["FLASH_VARLEN_ARCHS"] = ",".join(setup.FAMILIES[family].targets)
    includes = [ROOT / "csrc", setup.cutlass_include_dir(), nvcc.parent.parent / "include"]
    return [
        str(nvcc), "-c", str(source), "-o", str(output),
        *(f"-I{folder}" for folder in includes),
        *setup.nvcc_flags(nvcc_threads=1),
        *setup.target_flags(family, setup.instantiation_direction(str(source))),
        "--ptxas-options=-v", "-Xcompiler", "-fPIC",
    ]  # fmt: skip


def compile_one(setup, source: Path, out_dir: Path, nvcc: Path, sass: bool) -> bool:
    output = out_dir / (source.stem + ".o")
    result = subprocess.run(
        nvcc_command(setup, source, output, nvcc), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        print(f"{source}: nvcc failed\n{result.stdout}{result.stderr}")
        return False
    spilled = [match for match in SPILLS.finditer(result.stderr) if match.group(1) != "0"]
    usage = [line.split(": ", 1)[1] for line in result.stderr.splitlines() if REPORT.search(line)]
    print(f"{source.relative_to(ROOT)}: {'; '.join(usage)}")
    if spilled:
        print(f"{source}: spills: {', '.join(match.group(0) for match in spilled)}")
    if sass:
        cuobjdump = load_module("scripts/compare_sass.py", "compare_sass").cuobjdump()
        with open(out_dir / (source.stem + ".sass"), "w") as listing:
            subprocess.run([cuobjdump, "-sass", str(output)], stdout=listing, check=True)
    return not spilled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="csrc/instantiations/<family>/*.cu")
    parser.add_argument("--out", type=Path, help="folder for the objects (default: temporary)")
    parser.add_argument("--sass", action="store_true", help="also write each object's SASS")
    args = parser.parse_args()
    setup = load_module("setup.py", "flash_varlen_setup")
    toolkit = setup.checked_toolchain()
    nvcc = toolkit.home / "bin" / "nvcc"
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = [
            compile_one(setup, source.resolve(), out_dir, nvcc, args.sass)
            for source in args.sources
        ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
