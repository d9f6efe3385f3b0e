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
class Direction:
    """How a family builds one direction ("fwd", "bwd" or "decode").

    ``header``: the launch header under csrc/kernels/<family>/. ``launcher``: the launch
    function, a template on (element type, head-dim bucket, local mask). ``workspace_size``: the
    workspace-size function (a template on (element type, head-dim bucket)), or None when the
    kernels need no workspace. ``unsupported_option``: a function of the params that names the
    first option of a call the kernels do not implement (or returns nullptr), or None when they
    implement every option; dispatch then passes the call to the next family.
    ``shares_ptx``: nothing in the direction's code depends on ``__CUDA_ARCH__``, so the machine
    code of every selected target is made from one PTX, the lowest target's: one pass of nvcc's
    front end (cicc) per file instead of one per target. cicc is most of a file's compile time
    (sm80 forward bf16 d128 with nvcc 13.0: 20 s per target against 1.4 s for ptxas; the file
    took 29.6 s instead of 49.5 s) and the machine code is the same (scripts/compare_sass.py:
    identical sm_80 and sm_90 code for every sm80 forward and decode file).
    ``head_dim_buckets``: the buckets this direction has kernels for, where it has fewer than its
    family (None: the family's).
    """

    header: str
    launcher: str
    workspace_size: str | None = None
    unsupported_option: str | None = None
    shares_ptx: bool = False
    head_dim_buckets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Target:
    """One compilation target: the virtual architecture nvcc's front end writes PTX for, and the
    real one whose machine code ptxas makes from it."""

    virtual: str  # compute_80
    real: str  # sm_80

    def gencode(self) -> str:
        return f"-gencode=arch={self.virtual},code={self.real}"


@dataclass(frozen=True)
class KernelFamily:
    """One family.

    ``compute_capabilities``: (lowest, highest) compute capability it serves, as major * 10 +
    minor (80 is 8.0). ``targets``: the nvcc target per architecture number (the values
    FLASH_VARLEN_ARCHS selects from). ``directions``: the kernels it instantiates.
    ``head_dim_buckets``: the head-dim buckets it has kernels for (None: every bucket of
    flash_varlen/contract.py). ``nvcc_flags``: flags its files need besides the shared ones.
    """

    name: str
    summary: str
    compute_capabilities: tuple[int, int]
    targets: dict[str, Target]
    directions: dict[str, Direction]
    local_variants: tuple[bool, ...] = (False, True)
    head_dim_buckets: tuple[int, ...] | None = None
    nvcc_flags: tuple[str, ...] = ()

    @property
    def enum(self) -> str:
        """The C++ enumerator: kSm80 for sm80."""
        return "k" + self.name[0].upper() + self.name[1:]


# Machine code for Ampere and Hopper from one mma.sync / cp.async source (Ada runs the sm_80 code).
MMA_SYNC_TARGETS = {
    "80": Target("compute_80", "sm_80"),
    "90": Target("compute_90", "sm_90"),
}

SM80 = KernelFamily(
    name="sm80",
    summary="mma.sync and cp.async (Ampere, Ada, Hopper)",
    compute_capabilities=(80, 90),
    targets=MMA_SYNC_TARGETS,
    directions={
        "fwd": Direction(
            "flash_fwd_launch.h", "launch_flash_fwd", "fwd_workspace_size", shares_ptx=True
        ),
        # Not shares_ptx: on sm_90 the backward adds dQ with the bulk-copy engine
        # (kernels/sm80/dq_accum.h), which sm_80's PTX cannot express.
        "bwd": Direction("flash_bwd_launch.h", "launch_flash_bwd", "flash_bwd_workspace_size"),
    },
)

SM90 = KernelFamily(
    name="sm90",
    summary="wgmma, TMA and warp specialization (Hopper)",
    compute_capabilities=(90, 90),
    # wgmma and setmaxnreg exist only in the architecture-specific sm_90a target.
    targets={"90": Target("compute_90a", "sm_90a")},
    directions={
        "fwd": Direction(
            "flash_fwd_launch.h",
            "launch_flash_fwd",
            "fwd_workspace_size",
            unsupported_option="fwd_unsupported_option",
        ),
        # Issue 15, in progress: d = 64 and 128; the options it lacks (bwd_unsupported_option)
        # and the other head dims go to the sm80 family.
        "bwd": Direction(
            "flash_bwd_launch.h",
            "launch_flash_bwd",
            "bwd_workspace_size",
            unsupported_option="bwd_unsupported_option",
            head_dim_buckets=(64, 128),
        ),
    },
    nvcc_flags=(
        # Without it CUTLASS's pipelines check each thread's role with a trap branch inside the
        # main loop (seen in the SASS as BPT.TRAP).
        "-DNDEBUG",
    ),
)

DECODE = KernelFamily(
    name="decode",
    summary="split-KV decode over contiguous and paged KV caches (mma.sync, cp.async)",
    compute_capabilities=(80, 90),
    # mma.sync m16n8k16 and cp.async only: the kernel is bound by HBM, not by the tensor cores
    # (csrc/kernels/decode/decode_kernel_traits.h has the arithmetic), so one code for Ampere,
    # Ada and Hopper.
    targets=MMA_SYNC_TARGETS,
    # A direction of its own rather than "fwd": a decode call is not a varlen forward. Its
    # params name a cache (block table, page size, cache lengths, entries, leftpad) and a split
    # count, it needs a split workspace, and it has no backward; registering it under "fwd" would
    # put it among the forward kernels that flash_attn_varlen_func's dispatch picks from, where
    # it cannot serve packed keys. Its own direction (FlashDecodeParams, its own registry table)
    # is reached only by the KV-cache entry point, which knows the call is a decode
    # (flash_varlen/kvcache.py decides which calls go there).
    directions={
        "decode": Direction(
            "decode_launch.h",
            "launch_decode",
            "decode_workspace_size",
            unsupported_option="decode_unsupported_option",
            shares_ptx=True,
        ),
    },
    # The mask is a run-time test (decode_kernel.h): no local-mask variant.
    local_variants=(False,),
    # The serving head dims; others fall back to the varlen kernels (contiguous caches) or are
    # refused (paged caches).
    head_dim_buckets=(64, 128),
)

# Best first. The decode family serves only its own direction, so its place does not compete
# with the others.
FAMILIES: tuple[KernelFamily, ...] = (SM90, SM80, DECODE)

# Every architecture number some family targets, in ascending order. Bit i of the define
# FLASH_VARLEN_MACHINE_ARCHS (setup.py) says that a file holds machine code for TARGET_ARCHS[i]:
# nvcc's own __CUDA_ARCH_LIST__ names the virtual architectures, one for a file that shares_ptx.
TARGET_ARCHS: tuple[str, ...] = tuple(
    sorted({arch for family in FAMILIES for arch in family.targets}, key=int)
)
