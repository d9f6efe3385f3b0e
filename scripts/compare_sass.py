"""Compares the machine code (SASS) of every kernel in two builds of the extension.

A refactor that must not change the kernels (a file move, a rename, host-side work) is checked
by building the extension before and after and running

    python scripts/compare_sass.py OLD/_C*.so NEW/_C*.so \
        --rename flash_varlen::sm80::=flash_varlen::

It disassembles both with cuobjdump (from $CUOBJDUMP, the PATH, or the triton package), splits
the output per (architecture, kernel), maps kernel names through each --rename (applied to the
demangled names of both builds, so that a namespace move does not count as a change), and
prints, per architecture, how many kernels are identical, differ, or exist in one build only.
Instructions and their encodings are compared exactly; only the column padding is ignored.
Exit status 0 only when every kernel of either build has an identical twin in the other.

A change that adds a field to the params structs moves the fields after it, and with them the
constant-bank offsets every kernel reads its parameters from. --ignore-param-offsets compares
the instructions with those offsets (and the encodings, which contain them) masked: a kernel
that is identical then differs from the old one only in where its parameters lie.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
ARCH = re.compile(r"^\s*arch = (sm_\d+a?)\s*$")
# Lines of a function's disassembly: instructions and their encodings (/*0010*/ ... /* 0x... */),
# the header flags, and labels. Anything else (the next fatbin's banner) ends the function.
SASS_LINE = re.compile(r"^\s*(/\*|\.headerflags|\.L_|\.\w+:)")
# A kernel parameter's address in constant bank 0, and an instruction's 64-bit encoding.
PARAM_OFFSET = re.compile(r"c\[0x0\]\[0x[0-9a-f]+\]")
ENCODING = re.compile(r"/\* 0x[0-9a-f]{16} \*/")


def mask_param_offsets(line: str) -> str:
    return ENCODING.sub("", PARAM_OFFSET.sub("c[0x0][param]", line)).rstrip()


def cuobjdump() -> str:
    """The cuobjdump to use: $CUOBJDUMP, the PATH, or the one the triton package ships."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        sys.exit("cuobjdump not found: set CUOBJDUMP, put it on the PATH or install triton")
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def demangle(names: list[str]) -> dict[str, str]:
    result = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    )
    return dict(zip(names, result.stdout.splitlines()))


def kernels(
    binary: Path, renames: list[tuple[str, str]], ignore_param_offsets: bool = False
) -> dict[tuple[str, str], str]:
    """{(arch, demangled and renamed kernel name): its SASS text} of one binary.

    A kernel template instantiated in several objects (clear_rows_past_end_kernel is, in every
    backward file of its dtype) appears once per object; its copies must be identical, and
    count once.
    """
    text = subprocess.run(
        [cuobjdump(), "-sass", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    copies: list[tuple[str, str, list[str]]] = []
    arch, current = "", None
    for line in text.splitlines():
        if match := ARCH.match(line):
            arch, current = match.group(1), None
        elif match := FUNCTION.match(line):
            current = []
            copies.append((arch, match.group(1), current))
        elif current is not None and SASS_LINE.match(line):
            # Whitespace folded: cuobjdump aligns the encoding column to the longest line of
            # the whole file, which other kernels change.
            line = " ".join(line.split())
            current.append(mask_param_offsets(line) if ignore_param_offsets else line)
        elif line.strip():
            current = None
    names = demangle(sorted({name for _, name, _ in copies}))
    result: dict[tuple[str, str], str] = {}
    for copy_arch, name, lines in copies:
        readable = names[name]
        for old, new in renames:
            readable = readable.replace(old, new)
        key = (copy_arch, readable)
        sass = "\n".join(lines)
        if result.setdefault(key, sass) != sass:
            sys.exit(f"{binary}: the copies of {readable} for {copy_arch} differ")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="replace OLD by NEW in the demangled names of both builds (repeatable)",
    )
    parser.add_argument(
        "--ignore-param-offsets",
        action="store_true",
        help="mask the constant-bank offsets of the kernel parameters (a params struct grew)",
    )
    args = parser.parse_args()
    renames = [tuple(rule.split("=", 1)) for rule in args.rename]
    before = kernels(args.before, renames, args.ignore_param_offsets)
    after = kernels(args.after, renames, args.ignore_param_offsets)
    archs = sorted({arch for arch, _ in before} | {arch for arch, _ in after})
    clean = True
    for arch in archs:
        old = {name: sass for (a, name), sass in before.items() if a == arch}
        new = {name: sass for (a, name), sass in after.items() if a == arch}
        same = [name for name in old if name in new and old[name] == new[name]]
        differ = [name for name in old if name in new and old[name] != new[name]]
        only_old, only_new = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        print(
            f"{arch}: {len(same)} kernels identical, {len(differ)} differ, "
            f"{len(only_old)} only before, {len(only_new)} only after"
        )
        listed = (("differs", differ), ("only before", only_old), ("only after", only_new))
        for label, names in listed:
            for name in names:
                print(f"  {label}: {name}")
        clean = clean and not (differ or only_old or only_new)
    return 0 if clean and archs else 1


if __name__ == "__main__":
    sys.exit(main())
