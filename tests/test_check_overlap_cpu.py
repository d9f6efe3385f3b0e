"""scripts/check_overlap.py: the SASS check that each sm90 main-loop step computes its softmax
beside the P V product, on hand-written listings in cuobjdump's format."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_overlap.py"


@pytest.fixture(scope="module")
def check_overlap():
    spec = importlib.util.spec_from_file_location("check_overlap_for_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclass looks its own module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def listing(body: list[str], kernel: str = "_ZN12flash_varlen4sm9016flash_fwd_kernelIvEEvv") -> str:
    """A cuobjdump -sass listing of one function whose instructions are `body`, each followed by
    its encoding line, as cuobjdump prints them."""
    lines = [f"\t\tFunction : {kernel}", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for index, text in enumerate(body):
        lines.append(f"        /*{index * 16:04x}*/                   {text} ;   /* 0x0 */")
        lines.append("                                                   /* 0x0 */")
    return "\n".join(lines) + "\n"


STEP_PROLOGUE = [
    "HGMMA.64x176x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT, gsb0",
    "HGMMA.64x128x16.F32.BF16 R112, R176, gdesc[UR12].tnspB, R112, gsb0",
    "WARPGROUP.DEPBAR.LE gsb0, 0x1",
]
OVERLAPPED_STEP = [
    *STEP_PROLOGUE,
    "FFMA.FTZ R24, R24, UR13, -R230",
    "MUFU.EX2 R24, R24",
    "MUFU.EX2 R25, R25",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "F2FP.BF16.F32.PACK_AB R176, R25, R24",
    "FMUL.FTZ R112, R112, R9",
]
# ptxas moved the wait for P V above the softmax: the exp2 run after P V has finished.
SERIALISED_STEP = [
    *STEP_PROLOGUE,
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "MUFU.EX2 R24, R24",
    "MUFU.EX2 R25, R25",
    "F2FP.BF16.F32.PACK_AB R176, R25, R24",
]
LAST_PV = ["HGMMA.64x128x16.F32.BF16 R112, R176, gdesc[UR12].tnspB, R112, gsb0"]


def test_steps_count_exp2_on_each_side_of_the_wait(check_overlap):
    (instructions,) = check_overlap.kernels(listing(OVERLAPPED_STEP + SERIALISED_STEP)).values()
    first, second = check_overlap.steps(instructions)
    assert (first.exp2_overlapped, first.exp2_after_wait, first.overlaps) == (2, 0, True)
    assert (second.exp2_overlapped, second.exp2_after_wait, second.overlaps) == (0, 2, False)


def test_exp2_after_the_last_step_belong_to_no_step(check_overlap):
    # The normalisation after the loop may use MUFU; the next GEMM ends the step's window.
    body = OVERLAPPED_STEP + LAST_PV + ["MUFU.EX2 R3, R3"]
    (instructions,) = check_overlap.kernels(listing(body)).values()
    (step,) = check_overlap.steps(instructions)
    assert step.exp2_after_wait == 0


@pytest.mark.parametrize(
    ("body", "passes"),
    [
        (OVERLAPPED_STEP + OVERLAPPED_STEP + LAST_PV, True),
        (OVERLAPPED_STEP + SERIALISED_STEP + LAST_PV, False),
        (LAST_PV, False),  # no step at all: not the kernel the check is meant for
    ],
)
def test_check_passes_only_when_every_step_overlaps(check_overlap, tmp_path, body, passes):
    path = tmp_path / "kernel.sass"
    path.write_text(listing(body))
    assert check_overlap.check(path) is passes


def test_listing_without_the_forward_kernel_fails(check_overlap, tmp_path):
    path = tmp_path / "other.sass"
    path.write_text(listing(OVERLAPPED_STEP, kernel="_ZN12flash_varlen28prepare_scheduleEv"))
    assert check_overlap.check(path) is False
