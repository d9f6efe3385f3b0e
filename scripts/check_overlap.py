"""Checks in the SASS of sm90 forward kernels that each main-loop step's softmax overlaps the
P V product (FlashAttention-3's intra-warpgroup overlap), which ptxas can silently undo.

A step issues S = Q K^T and O += P V, waits for S alone (`WARPGROUP.DEPBAR.LE gsb0, 0x1`),
computes the softmax of S (its exp2 are MUFU.EX2), then waits for P V as well
(`WARPGROUP.DEPBAR.LE gsb0, 0x0`) before it rescales O. The overlap holds when every MUFU.EX2 of
the step sits between the two waits. ptxas is free to move the second wait up (it reads no
register), and ptxas 13.0 did move it above all of them; csrc/kernels/sm90/wait_anchor.h is the
counter-measure, and this check is what notices when a compiler or a code change defeats it.

    python scripts/compile_kernel.py csrc/instantiations/sm90/fwd_bf16_hdim128.cu --sass --out DIR
    python scripts/check_overlap.py DIR/fwd_bf16_hdim128.sass

For every flash_fwd_kernel in each listing it prints each step (the address of its first wait,
the MUFU.EX2 between the waits and after the second one, up to the next GEMM or turn barrier),
and exits with status 1 if a listing has no step or any step has an exp2 after its second wait.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
WAIT_FOR_S = "WARPGROUP.DEPBAR.LE gsb0, 0x1"
WAIT_FOR_PV = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
EXP2 = "MUFU.EX2"
# What begins the next step (or the last P V after the loop): its GEMMs or its turn barrier.
NEXT_STEP = ("HGMMA", "BAR.SYNC")
KERNEL = "flash_fwd_kernel"


@dataclass
class Step:
    address: str
    exp2_overlapped: int
    exp2_after_wait: int

    @property
    def overlaps(self) -> bool:
        return self.exp2_overlapped > 0 and self.exp2_after_wait == 0


def kernels(listing: str) -> dict[str, list[tuple[str, str]]]:
    """The instructions (address, text) of each function of a cuobjdump -sass listing."""
    functions: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in listing.splitlines():
        if match := FUNCTION.match(line):
            current = functions.setdefault(match.group(1), [])
        elif current is not None and (match := INSTRUCTION.search(line)):
            current.append((match.group(1), match.group(2)))
    return functions


def steps(instructions: list[tuple[str, str]]) -> list[Step]:
    """Each wait for S, with the exp2 before and after the wait for P V that follows it."""
    found = []
    i = 0
    while i < len(instructions):
        address, text = instructions[i]
        i += 1
        if WAIT_FOR_S not in text:
            continue
        overlapped = 0
        while i < len(instructions) and WAIT_FOR_PV not in instructions[i][1]:
            overlapped += EXP2 in instructions[i][1]
            i += 1
        after = 0
        i += 1
        while i < len(instructions) and not instructions[i][1].startswith(NEXT_STEP):
            after += EXP2 in instructions[i][1]
            i += 1
        found.append(Step(address, overlapped, after))
    return found


def check(listing_path: Path) -> bool:
    listing = kernels(listing_path.read_text())
    main_kernels = {name: body for name, body in listing.items() if KERNEL in name}
    if not main_kernels:
        print(f"{listing_path}: no {KERNEL} in the listing")
        return False
    ok = True
    for name, body in main_kernels.items():
        found = steps(body)
        if not found:
            print(f"{listing_path}: {name}: no main-loop step (no {WAIT_FOR_S!r})")
            ok = False
        for step in found:
            verdict = "overlaps" if step.overlaps else "NOT OVERLAPPED"
            print(
                f"{listing_path.name}: step at {step.address}: {step.exp2_overlapped} exp2 "
                f"beside P V, {step.exp2_after_wait} after its wait: {verdict}"
            )
            ok &= step.overlaps
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listings", nargs="+", type=Path, help="cuobjdump -sass output files")
    args = parser.parse_args()
    results = [check(path) for path in args.listings]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
