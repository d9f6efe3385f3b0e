"""Build-side checks that run without a GPU: the generated kernel files are current, and when the
extension was built (CI builds a narrowed one), it imports, reports what it contains, and its
host-side checks reject bad input before any kernel could run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "csrc" / "generate.py"
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def load_generator():
    spec = importlib.util.spec_from_file_location("flash_varlen_generate_for_tests", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def built_extension():
    """The compiled module, or a skip when this checkout has none (unless CI requires one)."""
    from flash_varlen import _extension

    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        return _extension.load_extension()
    if not _extension.is_available():
        pytest.skip(f"extension not built: {_extension.unavailable_reason()}")
    return _extension.load_extension()


def test_generated_files_are_current():
    """Instantiations and csrc/generated/ match the declarations they are written from."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generator_covers_both_directions_dtypes_every_bucket_and_local_mask():
    gen = load_generator()
    names = {inst.relative_path for inst in gen.all_instantiations()}
    expected = sum(
        len(gen.ELEMENT_TYPES)
        * len(gen.direction_buckets(family, direction))
        * len(family.local_variants)
        for family in gen.kernel_families.FAMILIES
        for direction in family.directions
    )
    assert len(names) == expected
    # sm80: every direction, dtype, bucket and mask.
    assert len([name for name in names if name.startswith("sm80/")]) == 2 * 2 * 5 * 2
    assert "sm80/fwd_bf16_hdim128_local.cu" in names
    assert "sm80/fwd_fp16_hdim64.cu" in names
    assert "sm80/bwd_bf16_hdim256_local.cu" in names
    assert "sm80/bwd_fp16_hdim96.cu" in names
    # sm90: the forward in every bucket; the backward (issue 15, in progress) in d = 64 and 128.
    assert "sm90/fwd_fp16_hdim64_local.cu" in names and "sm90/fwd_bf16_hdim256.cu" in names
    assert sorted(name for name in names if name.startswith("sm90/bwd_")) == sorted(
        f"sm90/bwd_{dtype}_hdim{bucket}{mask}.cu"
        for dtype in ("bf16", "fp16") for bucket in (64, 128) for mask in ("", "_local"))


def test_kernel_sources_include_no_torch_headers():
    """Kernel code (and the generated headers it includes) never includes torch or Python."""
    kernel_files = list((ROOT / "csrc" / "kernels").glob("*/*.h"))
    kernel_files += list((ROOT / "csrc" / "instantiations").glob("*/*.cu"))
    kernel_files += [
        ROOT / "csrc" / "generated" / name
        for name in ("contract.h", "kernel_families.h", "sm90_wgmma_atoms.h")
    ]
    assert len(kernel_files) > 40
    for path in kernel_files:
        text = path.read_text()
        assert "torch/" not in text and "Python.h" not in text and "pybind11" not in text, path


def test_host_sources_include_no_whole_torch_api():
    """The host sources include the ATen and pybind11 headers they use, not <torch/extension.h>
    (all of libtorch's C++ API and pybind11): compiling that header alone takes 36 CPU seconds,
    and the 8 host files took about 35 s each with it, 2 to 13 s each (54 s in all) without it."""
    host_files = [
        path
        for folder in ("bindings", "generated")
        for path in (ROOT / "csrc" / folder).iterdir()
        if path.suffix in (".h", ".cpp")
    ]
    assert len(host_files) > 10
    for path in host_files:
        text = path.read_text()
        for header in ("torch/extension.h", "torch/all.h", "torch/torch.h", "ATen/ATen.h"):
            assert f"#include <{header}>" not in text, (path, header)


def test_sm90_family_compiles_without_cutlass_extended_atoms():
    """CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED pulls 76,000 lines of wgmma atoms into every sm90
    file (about 25 of its 53 CPU seconds); the family takes the atoms its tiles need beyond CuTe's
    base set from generated/sm90_wgmma_atoms.h instead, which csrc/generate.py writes itself (it
    reads no CUTLASS header)."""
    gen = load_generator()
    sm90 = next(family for family in gen.kernel_families.FAMILIES if family.name == "sm90")
    assert not any("CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED" in flag for flag in sm90.nvcc_flags)
    for path in (ROOT / "csrc" / "kernels").glob("*/*.h"):
        assert "#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED" not in path.read_text(), path
    atoms = (ROOT / "csrc" / "generated" / "sm90_wgmma_atoms.h").read_text()
    assert atoms == gen.sm90_wgmma_atoms_header()
    for cutlass_name in ("_ext.hpp", "SM90::GMMA::MMA_64x", "SM90_64x"):
        assert cutlass_name not in atoms
    assert "_ext.hpp" not in GENERATOR.read_text()


@pytest.mark.parametrize("element", ["cutlass::bfloat16_t", "cutlass::half_t"])
@pytest.mark.parametrize("n", [80, 112, 176])
def test_sm90_own_wgmma_atom_has_n_over_2_accumulators(n, element):
    """One atom per (N, element type): a specialisation of WgmmaSS whose single wgmma takes the
    N / 2 accumulators of a thread ({%0, ..., %(N/2 - 1)}), both descriptors, scale-d and the
    four immediates, and whose fma takes as many floats (CuTe's mma_unpack passes one per
    register of CRegisters)."""
    gen = load_generator()
    assert n in gen.SM90_OWN_WGMMA_N
    ptx_type = gen.SM90_WGMMA_TYPES[element]
    atom = gen.wgmma_ss_atom(n, element, ptx_type)
    assert f"struct WgmmaSS<{n}, {element}, tnspA, tnspB, scaleA, scaleB> {{" in atom
    assert f"using CRegisters = float[{n // 2}];" in atom
    assert atom.count("wgmma.mma_async.sync") == 1
    assert f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx_type}.{ptx_type}\\n"' in atom
    # The operand list of the asm statement, string literals joined.
    literals = "".join(re.findall(r'^\s*"(.*)"$', atom, re.MULTILINE))
    d_operand = re.search(r"\{(%\d+(?:, %\d+)*)\}", literals).group(1)
    assert d_operand.split(", ") == [f"%{i}" for i in range(n // 2)]
    m = n // 2
    assert f"setp.ne.b32 p, %{m + 2}, 0;" in literals
    assert f", %{m}, %{m + 1}, p, %{m + 3}, %{m + 4}, %{m + 5}, %{m + 6};" in literals
    assert atom.count('"+f"(') == m and atom.count("float& d") == m
    assert f"%{m + 7}" not in literals
    assert atom in (ROOT / "csrc" / "generated" / "sm90_wgmma_atoms.h").read_text()


def test_sm90_tiles_have_one_wgmma_atom_per_gemm():
    """Every tile of kernels/sm90/fwd_tile_config.h finds an atom that spans it: kBlockN (the N of
    S = Q K^T, both operands in shared memory) among CuTe's base atoms or ours, the head dim (the
    N of O += P V, P from registers) among CuTe's base atoms, for which we have no own RS atom."""
    gen = load_generator()
    config = (ROOT / "csrc" / "kernels" / "sm90" / "fwd_tile_config.h").read_text()
    block_n = r"(?:kIsLocal \? (\d+) : (\d+)|(\d+))"
    tiles = re.findall(rf"FwdKernelTraits<Element, (\d+), (\d+), {block_n}, kFwdStages>", config)
    assert len(tiles) == 5
    block_ns = {int(n) for tile in tiles for n in tile[2:] if n}
    head_dims = {int(tile[0]) for tile in tiles}
    assert head_dims == set(gen.HEAD_DIM_BUCKETS)
    assert head_dims <= set(gen.CUTE_BASE_WGMMA_N)
    own = block_ns - set(gen.CUTE_BASE_WGMMA_N)
    assert own == set(gen.SM90_OWN_WGMMA_N), "SM90_OWN_WGMMA_N lists exactly the N CuTe lacks"
    assert set(gen.SM90_WGMMA_TYPES) == {cpp for cpp, _ in gen.ELEMENT_TYPES.values()}


def test_no_family_includes_another_familys_headers():
    """What two families share lives in kernels/common/ (design.md)."""
    kernels = ROOT / "csrc" / "kernels"
    families = [path.name for path in kernels.iterdir() if path.is_dir() and path.name != "common"]
    assert "sm80" in families
    for family in families:
        for path in (kernels / family).glob("*.h"):
            for other in families:
                if other != family:
                    assert f"kernels/{other}/" not in path.read_text(), (path, other)
    for path in (kernels / "common").glob("*"):
        for family in families:
            assert f"kernels/{family}/" not in path.read_text(), (path, family)


def test_extension_buckets_match_the_contract():
    from flash_varlen import contract

    ext = built_extension()
    assert ext.head_dim_buckets() == list(contract.HEAD_DIM_BUCKETS)


def test_extension_contains_what_the_build_selected():
    """Every registered kernel is one the generator knows; in CI, whose build environment is the
    test environment, exactly the FLASH_VARLEN_DTYPES x FLASH_VARLEN_HEAD_DIMS x
    FLASH_VARLEN_ARCHS selection, per direction (a family may lack a direction or a bucket)."""
    ext = built_extension()
    compiled = {
        "fwd": set(ext.compiled_kernels()),
        "bwd": set(ext.compiled_backward_kernels()),
    }
    assert compiled["fwd"], "the extension registered no kernel"
    gen = load_generator()
    known = {
        direction: {
            (inst.family, DTYPE_NAMES[inst.dtype], inst.head_dim)
            for inst in gen.all_instantiations()
            if inst.direction == direction
        }
        for direction in compiled
    }
    for direction in compiled:
        assert compiled[direction] <= known[direction]
    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        dtypes = os.environ.get("FLASH_VARLEN_DTYPES") or ",".join(gen.ELEMENT_TYPES)
        head_dims = os.environ.get("FLASH_VARLEN_HEAD_DIMS") or ",".join(
            map(str, gen.HEAD_DIM_BUCKETS)
        )
        archs = (os.environ.get("FLASH_VARLEN_ARCHS") or "80,90").split(",")
        families = {
            family.name for family in gen.kernel_families.FAMILIES
            if any(arch in family.targets for arch in archs)
        }
        selected = {(DTYPE_NAMES[d.strip()], int(h)) for d in dtypes.split(",")
                    for h in head_dims.split(",")}
        for direction in compiled:
            expected = {
                triple for triple in known[direction]
                if triple[0] in families and triple[1:] in selected
            }
            assert compiled[direction] == expected


def test_extension_rejects_cpu_tensors_before_any_kernel():
    ext = built_extension()
    q = torch.randn(8, 2, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.varlen_fwd(q, q, q, cu, cu, 8, 8, 0.125, False)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.fwd(q.unsqueeze(0), q.unsqueeze(0), q.unsqueeze(0), 0.125, False)


def test_extension_rejects_wrong_dtype_before_device():
    ext = built_extension()
    q = torch.randn(8, 2, 64)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        ext.varlen_fwd(q, q, q, cu, cu, 8, 8, 0.125, False)


def test_extension_messages_format_numbers():
    """Shape errors carry numbers. Formatting them must not crash (error_message.h says why this
    once segfaulted on the GPU build machine) and must read naturally."""
    ext = built_extension()
    q2d = torch.randn(8, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must have 3 dimensions, got 2"):
        ext.varlen_fwd(q2d, q2d, q2d, cu, cu, 8, 8, 0.125, False)
    strided = torch.randn(8, 2, 128).to(torch.bfloat16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"contiguous last dimension \(stride 1\), got 2"):
        ext.varlen_fwd(strided, strided, strided, cu, cu, 8, 8, 0.125, False)


def _backward_args(total: int = 8, nheads: int = 2, head_dim: int = 64) -> dict:
    """Valid-looking CPU arguments for varlen_bwd; tests break one rule at a time."""
    q = torch.randn(total, nheads, head_dim).to(torch.bfloat16)
    return {
        "dout": q.clone(),
        "q": q,
        "k": q.clone(),
        "v": q.clone(),
        "out": q.clone(),
        "softmax_lse": torch.zeros(nheads, total),
        "cu_seqlens_q": torch.tensor([0, total], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, total], dtype=torch.int32),
        "max_seqlen_q": total,
        "max_seqlen_k": total,
        "softmax_scale": 0.125,
        "causal": False,
        "deterministic": False,
    }


def test_backward_rejects_cpu_tensors_before_any_kernel():
    ext = built_extension()
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.varlen_bwd(**_backward_args())
    args = _backward_args()
    fixed = {name: args[name].unsqueeze(0) for name in ("dout", "q", "k", "v", "out")}
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.bwd(**fixed, softmax_lse=torch.zeros(1, 2, 8), softmax_scale=0.125, causal=False,
                deterministic=False)


def test_backward_checks_dout_shape_and_strides_by_name():
    ext = built_extension()
    args = _backward_args()
    args["dout"] = args["dout"][:4]
    with pytest.raises(RuntimeError, match=r"dout must have the shape of q \[8, 2, 64\], got \[4, 2, 64\]"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    args["dout"] = torch.randn(8, 2, 128).to(torch.bfloat16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"dout must have a contiguous last dimension"):
        ext.varlen_bwd(**args)


def test_backward_checks_softmax_lse_and_gradient_buffers_by_name():
    ext = built_extension()
    args = _backward_args()
    args["softmax_lse"] = torch.zeros(2, 7)
    with pytest.raises(RuntimeError, match=r"softmax_lse must have shape \[2, 8\], got \[2, 7\]"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    args["softmax_lse"] = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="softmax_lse must be float32"):
        ext.varlen_bwd(**args)
    args = _backward_args()
    with pytest.raises(RuntimeError, match="dk must have the shape of k"):
        ext.varlen_bwd(**args, dk=torch.zeros(8, 1, 64).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Kernel families and dispatch (the selection logic itself; no GPU needed)


def _any_built_config(ext) -> tuple[str, str, int]:
    return sorted(ext.compiled_kernels())[0]


def _family(ext, name: str) -> dict:
    return next(family for family in ext.kernel_families() if family["name"] == name)


def test_kernel_families_describe_what_is_built():
    ext = built_extension()
    families = ext.kernel_families()
    declared = load_generator().kernel_families.FAMILIES
    assert [family["name"] for family in families] == [f.name for f in declared]
    for family, declaration in zip(families, declared):
        assert family["compute_capabilities"] == declaration.compute_capabilities
        assert set(family["built_for"]) <= {int(arch) for arch in declaration.targets}
    # A development build may leave families out (FLASH_VARLEN_FAMILIES): those have no code.
    from flash_varlen import _build_info

    for family in families:
        if family["name"] not in _build_info.FAMILIES:
            assert family["built_for"] == [], family["name"]
    sm80 = _family(ext, "sm80")
    built = set(sm80["built_for"])
    assert built <= {80, 90}
    assert bool(built) == ("sm80" in _build_info.FAMILIES)
    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        archs = os.environ.get("FLASH_VARLEN_ARCHS") or "80,90"
        assert built == {int(arch) for arch in archs.split(",")}


def _expected_family(ext, direction: str, dtype: str, bucket: int, capability: int) -> str | None:
    """The first family, best first, that has a kernel of `direction` for (dtype, bucket) built
    for a compute capability that runs on `capability` (the same major version, not above)."""
    triples = ext.compiled_kernels() if direction == "forward" else ext.compiled_backward_kernels()
    for family in ext.kernel_families():
        low, high = family["compute_capabilities"]
        runs = any(
            built // 10 == capability // 10 and built <= capability
            for built in family["built_for"]
        )
        if low <= capability <= high and runs and (family["name"], dtype, bucket) in triples:
            return family["name"]
    return None


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dispatch_picks_the_best_built_family_for_a_device_it_runs_on(direction, monkeypatch):
    ext = built_extension()
    monkeypatch.delenv("FLASH_VARLEN_KERNEL_FAMILY", raising=False)
    checked = 0
    for _, dtype, bucket in set(ext.compiled_kernels()):
        for capability in (80, 86, 89, 90):
            expected = _expected_family(ext, direction, dtype, bucket, capability)
            for local in (False, True):
                if expected is None:
                    with pytest.raises(NotImplementedError):
                        ext.select_kernel_family(direction, dtype, bucket, local, capability)
                else:
                    chosen = ext.select_kernel_family(direction, dtype, bucket, local, capability)
                    assert chosen == expected
                    checked += 1
    assert checked > 0


def test_dispatch_explains_why_no_family_runs_a_call(monkeypatch):
    ext = built_extension()
    monkeypatch.delenv("FLASH_VARLEN_KERNEL_FAMILY", raising=False)
    _, dtype, bucket = _any_built_config(ext)
    # A Turing GPU: no family serves compute capability 7.5.
    with pytest.raises(NotImplementedError, match=r"compute capability 7\.5.*sm80: serves "
                       r"compute capability 8\.0 to 9\.0.*FLASH_VARLEN_ARCHS"):
        ext.select_kernel_family("forward", dtype, bucket, False, 75)
    # An Ada GPU runs sm_80 code, but not code built for sm_90 alone, nor a build without it.
    built = set(_family(ext, "sm80")["built_for"])
    if not built:
        with pytest.raises(NotImplementedError, match="sm80: not in this build"):
            ext.select_kernel_family("backward", dtype, bucket, False, 89)
    elif built == {90}:
        with pytest.raises(NotImplementedError, match="compiled for sm_90 only"):
            ext.select_kernel_family("backward", dtype, bucket, False, 89)
    else:
        assert ext.select_kernel_family("backward", dtype, bucket, False, 89) == "sm80"
    missing = [(d, b) for d in ("float16", "bfloat16") for b in ext.head_dim_buckets()
               if ("sm80", d, b) not in set(ext.compiled_kernels())]
    if missing:
        d, b = missing[0]
        with pytest.raises(NotImplementedError, match="sm80: not in this build"):
            ext.select_kernel_family("forward", d, b, False, 90)


def test_family_override_forces_or_refuses(monkeypatch):
    ext = built_extension()
    for family, dtype, bucket in set(ext.compiled_kernels()):
        capability = _family(ext, family)["built_for"][0]
        monkeypatch.setenv("FLASH_VARLEN_KERNEL_FAMILY", family)
        assert ext.select_kernel_family("forward", dtype, bucket, False, capability) == family
        monkeypatch.setenv("FLASH_VARLEN_KERNEL_FAMILY", "sm70")
        with pytest.raises(ValueError, match="FLASH_VARLEN_KERNEL_FAMILY=sm70 names no kernel "
                           "family; known: sm90, sm80"):
            ext.select_kernel_family("forward", dtype, bucket, False, capability)
        monkeypatch.setenv("FLASH_VARLEN_KERNEL_FAMILY", "")
        expected = _expected_family(ext, "forward", dtype, bucket, capability)
        assert ext.select_kernel_family("forward", dtype, bucket, False, capability) == expected


# --------------------------------------------------------------------------------------------
# The options' rules, as generated into the extension from flash_varlen/options.py


@pytest.mark.parametrize(
    ("option", "value", "kind", "message"),
    [
        ("softmax_scale", 0.0, ValueError, "softmax_scale must be finite and positive, got 0"),
        ("softmax_scale", float("nan"), ValueError, "softmax_scale must be finite and positive"),
        ("window_left", -2, ValueError, r"window_left must be -1 \(unbounded\) or >= 0, got -2"),
        ("window_right", -5, ValueError, r"window_right must be -1 \(unbounded\) or >= 0"),
        ("softcap", -1.0, ValueError, r"softcap must be finite and >= 0 \(0 disables it\)"),
        ("softcap", float("inf"), ValueError, "softcap must be finite"),
        ("dropout_p", 1.0, ValueError, r"dropout_p must be in \[0, 1\), got 1"),
        ("dropout_p", -0.5, ValueError, r"dropout_p must be in \[0, 1\)"),
        ("alibi_slopes", torch.ones(2, dtype=torch.float64), TypeError,
         "alibi_slopes must be float32, got Double"),
        ("alibi_slopes", torch.ones(3), ValueError,
         r"alibi_slopes must have shape \(nheads,\) = \[2\] or \(batch, nheads\) = "
         r"\[1, 2\], got \[3\]"),
        ("seqused_q", torch.ones(2, dtype=torch.int32), ValueError,
         r"seqused_q must have shape \(batch,\) = \[1\], one entry per sequence"),
        ("seqused_k", torch.ones(1), TypeError, "seqused_k must be int32"),
    ],
)
def test_extension_checks_every_declared_rule_before_the_device(option, value, kind, message):
    """The extension's checks come from the same declaration as the Python ones; they run
    before the device check, so CPU tensors reach them."""
    ext = built_extension()
    q = torch.randn(8, 2, 64).to(torch.bfloat16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    kwargs = {"softmax_scale": 0.125, "causal": False, option: value}
    with pytest.raises(kind, match=message):
        ext.varlen_fwd(q, q, q, cu, cu, 8, 8, **kwargs)
    if option not in ("seqused_q", "seqused_k"):
        with pytest.raises(kind, match=message):
            ext.varlen_bwd(**{**_backward_args(), **kwargs})


def test_extension_entry_points_follow_the_signatures():
    """pybind11's parameter lists are generated from flash_varlen/signatures.py."""
    from flash_varlen.signatures import EXTENSION_ENTRY_POINTS

    ext = built_extension()
    for signature in EXTENSION_ENTRY_POINTS:
        doc = getattr(ext, signature.name).__doc__
        listed = re.findall(r"(\w+): ", doc.splitlines()[0].split("(", 1)[1])
        assert listed == list(signature.names), signature.name
