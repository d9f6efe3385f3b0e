"""The kernel families: which devices each serves, how nvcc builds it, what it instantiates.

A family is one implementation of the attention kernels for a range of GPU generations (its
code lives in ``csrc/kernels/<name>/``). ``FAMILIES`` lists them best first: at run time the
extension picks, per call, the first family that this build contains for the call's (dtype,
head-dim bucket, mask) and that runs on the device (``csrc/bindings/dispatch.cpp``;
``FLASH_VARLEN_KERNEL_FAMILY`` forces one). ``csrc/generate.py`` writes the instantiation files
and ``csrc/generated/kernel_families.h`` from this list; ``setup.py`` compiles each family's
files with the family's own nvcc targets. This module imports nothing, so that ``setup.py`` can
load it by path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelFamily:
    """One family.

    ``compute_capabilities``: (lowest, highest) compute capability it serves, as major * 10 +
    minor (80 is 8.0). ``targets``: nvcc's -gencode flag per architecture number (the values
    FLASH_VARLEN_ARCHS selects from). ``directions``: the kernels it instantiates, each with
    its launch header (under csrc/kernels/<name>/), the launcher and the workspace-size function
    (templates on (element type, head-dim bucket[, local mask])).
    """

    name: str
    summary: str
    compute_capabilities: tuple[int, int]
    targets: dict[str, str]
    directions: dict[str, tuple[str, str, str | None]]
    local_variants: tuple[bool, ...] = (False, True)

    @property
    def enum(self) -> str:
        """The C++ enumerator: kSm80 for sm80."""
        return "k" + self.name[0].upper() + self.name[1:]


SM80 = KernelFamily(
    name="sm80",
    summary="mma.sync and cp.async (Ampere, Ada, Hopper)",
    compute_capabilities=(80, 90),
    targets={
        "80": "-gencode=arch=compute_80,code=sm_80",
        "90": "-gencode=arch=compute_90,code=sm_90",
    },
    directions={
        "fwd": ("flash_fwd_launch.h", "launch_flash_fwd", None),
        "bwd": ("flash_bwd_launch.h", "launch_flash_bwd", "flash_bwd_workspace_size"),
    },
)

# Best first.
FAMILIES: tuple[KernelFamily, ...] = (SM80,)
