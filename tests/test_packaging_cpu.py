"""Packaging without a GPU: the build record setup.py writes, the torch version check made with it
before the extension is imported, and the package metadata in pyproject.toml.

setup.py is imported as a module (it only builds when run as a script), so the functions that
gather and render the record are tested without compiling anything. The version check is tested
with simulated records and a monkeypatched torch version, so these tests pass whether or not
the extension is built; where a real build is needed they skip, saying why.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import types
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch

import flash_varlen
from flash_varlen import _extension

ROOT = Path(__file__).resolve().parents[1]

BUILT_TORCH = "2.11.0+cu130"
BUILT_CUDA = "13.0"
OTHER_TORCH = "2.10.0+cu130"


def load_setup() -> types.ModuleType:
    """setup.py as a module; importing it defines its functions and builds nothing."""
    spec = importlib.util.spec_from_file_location("flash_varlen_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_values(**overrides: object) -> dict[str, object]:
    """Values for every build record field, as a narrowed CI build would record them."""
    values = {
        "PACKAGE_VERSION": flash_varlen.__version__,
        "TORCH_VERSION": BUILT_TORCH,
        "TORCH_CUDA_VERSION": BUILT_CUDA,
        "NVCC_VERSION": "13.0.88",
        "CUTLASS_VERSION": "4.2.0",
        "ARCHS": ("80",),
        "FAMILIES": ("sm80", "decode"),
        "DTYPES": ("bf16",),
        "HEAD_DIMS": (64,),
    }
    values.update(overrides)
    return values


def record_module(source: str) -> types.ModuleType:
    """The module that rendered `source` becomes when imported."""
    module = types.ModuleType(_extension.BUILD_INFO_NAME)
    exec(compile(source, "_build_info.py", "exec"), module.__dict__)
    return module


def fake_record(torch_version: str, cuda_version: str | None) -> types.ModuleType:
    return record_module(
        load_setup().render_build_info(
            sample_values(TORCH_VERSION=torch_version, TORCH_CUDA_VERSION=cuda_version)
        )
    )


@pytest.fixture
def fresh_state(monkeypatch):
    """Forgets any earlier import attempt (restored afterwards by monkeypatch)."""
    monkeypatch.setattr(_extension, "_cached", None)


@pytest.fixture
def running_torch(monkeypatch):
    """Pins the running torch to BUILT_TORCH / CUDA BUILT_CUDA, whatever is installed."""
    monkeypatch.setattr(torch, "__version__", BUILT_TORCH)
    monkeypatch.setattr(torch.version, "cuda", BUILT_CUDA)


@pytest.fixture
def import_spy(monkeypatch, fresh_state):
    """Replaces the import of _C by a fake module, present whether or not _C is built here; the
    list records every import attempt."""
    monkeypatch.setattr(_extension, "_is_built", lambda: True)
    attempts = []
    module = types.ModuleType(_extension.EXTENSION_NAME)

    def spy():
        attempts.append(1)
        return module

    monkeypatch.setattr(_extension, "_import_module", spy)
    return attempts, module


# ----------------------------------------------------------------------------------------------
# The build record: gathered and rendered by setup.py
# ----------------------------------------------------------------------------------------------


def test_rendered_record_holds_every_field_and_says_it_is_generated():
    setup = load_setup()
    values = sample_values()
    source = setup.render_build_info(values)
    module = record_module(source)
    assert {name: getattr(module, name) for name in setup.BUILD_INFO_FIELDS} == values
    assert "Written by setup.py at build time: do not edit" in module.__doc__
    # Each field has its explanation above it.
    for name, comment in setup.BUILD_INFO_FIELDS.items():
        assert f"# {comment}\n{name} = " in source


def test_rendered_record_keeps_a_cpu_only_torch_as_none():
    module = record_module(load_setup().render_build_info(sample_values(TORCH_CUDA_VERSION=None)))
    assert module.TORCH_CUDA_VERSION is None


def test_render_refuses_missing_and_unknown_fields():
    setup = load_setup()
    values = sample_values()
    del values["NVCC_VERSION"]
    values["GIT_COMMIT"] = "abc"
    expected = r"missing \['NVCC_VERSION'\], unexpected \['GIT_COMMIT'\]"
    with pytest.raises(ValueError, match=expected):
        setup.render_build_info(values)


def test_cutlass_version_comes_from_the_version_header(tmp_path):
    setup = load_setup()
    (tmp_path / "cutlass").mkdir()
    header = tmp_path / "cutlass" / "version.h"
    header.write_text(
        "#pragma once\n#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 2\n#define CUTLASS_PATCH 1 \n"
        "#define CUTLASS_VERSION ((CUTLASS_MAJOR)*100 + (CUTLASS_MINOR)*10 + CUTLASS_PATCH)\n"
    )
    assert setup.cutlass_version(tmp_path) == "4.2.1"
    header.write_text("#define CUTLASS_MAJOR 4\n")
    assert setup.cutlass_version(tmp_path) == "unknown"
    assert setup.cutlass_version(tmp_path / "missing") == "unknown"


def test_cutlass_version_of_the_pinned_package_headers():
    """The headers of the pinned nvidia-cutlass wheel report the wheel's own version."""
    try:
        package_version = metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        pytest.skip("nvidia-cutlass is not installed (it only provides build-time headers)")
    spec = importlib.util.find_spec("cutlass_library")
    include = Path(spec.submodule_search_locations[0]) / "source" / "include"
    expected = ".".join(package_version.split(".")[:3])  # 4.2.0.0 -> 4.2.0
    assert load_setup().cutlass_version(include) == expected


def test_collected_record_describes_this_torch_and_the_selection(monkeypatch, tmp_path):
    setup = load_setup()
    monkeypatch.setenv("FLASH_VARLEN_ARCHS", "80")
    monkeypatch.setenv("FLASH_VARLEN_DTYPES", "bf16")
    monkeypatch.setenv("FLASH_VARLEN_HEAD_DIMS", "64,128")
    values = setup.collect_build_info("0.1.0", tmp_path, "13.0.88")
    assert values == {
        "PACKAGE_VERSION": "0.1.0",
        "TORCH_VERSION": str(torch.__version__),
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "NVCC_VERSION": "13.0.88",
        "CUTLASS_VERSION": "unknown",  # tmp_path has no cutlass/version.h
        "ARCHS": ("80",),
        "FAMILIES": ("sm80", "decode"),
        "DTYPES": ("bf16",),
        "HEAD_DIMS": (64, 128),
    }
    # The record of a build with this torch lets the extension be imported into it.
    assert _extension._torch_mismatch(record_module(setup.render_build_info(values))) == ""


@pytest.mark.parametrize(
    ("families", "archs", "expected"),
    [
        ("sm80", "80,90", {"sm80": 20}),
        # Any order: the shared PTX is the lowest architecture's.
        ("sm80", "90,80", {"sm80": 20}),
        ("sm80", "90", {"sm80": 20}),
        # decode: buckets 64 and 128, no local variant; sm90: the forward in every bucket, the
        # backward (issue 15, in progress) in d = 64 and 128.
        ("", "", {"sm80": 20, "sm90": 14, "decode": 2}),
        ("", "80", {"sm80": 20, "decode": 2}),
        ("sm90", "90", {"sm90": 14}),
        ("decode", "90", {"decode": 2}),
    ],
)
def test_kernel_sources_are_grouped_by_family_with_its_targets(
    monkeypatch, families, archs, expected
):
    """Each family's files are compiled with the family's own -gencode flags, filtered by
    FLASH_VARLEN_ARCHS; FLASH_VARLEN_FAMILIES narrows the families."""
    setup = load_setup()
    # Without FLASH_VARLEN_ARCHS the build follows the GPUs it sees: none here.
    monkeypatch.setattr(setup, "visible_gpu_capabilities", lambda: [])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("FLASH_VARLEN_FAMILIES", families)
    monkeypatch.setenv("FLASH_VARLEN_ARCHS", archs)
    monkeypatch.setenv("FLASH_VARLEN_DTYPES", "bf16")
    monkeypatch.delenv("FLASH_VARLEN_HEAD_DIMS", raising=False)
    sources = setup.kernel_sources()
    assert {family: len(files) for family, files in sources.items()} == expected
    for family, files in sources.items():
        assert all(path.startswith(f"csrc/instantiations/{family}/") for path in files)
    selected = sorted(archs.split(","), key=int) if archs else ["80", "90"]
    mask = {"80": 1, "90": 2}
    machine_archs = f"-DFLASH_VARLEN_MACHINE_ARCHS={sum(mask[arch] for arch in selected)}"
    assert setup.target_flags("sm80", "bwd") == [
        *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in selected), machine_archs
    ]
    # The forward shares one PTX among the targets: one front-end pass for both.
    shared = (
        "-gencode=arch=compute_80,code=[sm_80,sm_90]"
        if len(selected) == 2
        else f"-gencode=arch=compute_{selected[0]},code=sm_{selected[0]}"
    )
    assert setup.target_flags("sm80", "fwd") == [shared, machine_archs]
    assert setup.target_flags("decode", "decode") == [shared, machine_archs]
    # sm90 code is architecture-specific (sm_90a: wgmma, setmaxnreg) and needs its own defines.
    if "90" in selected:
        assert setup.target_flags("sm90", "fwd") == [
            "-gencode=arch=compute_90a,code=sm_90a",
            "-DFLASH_VARLEN_MACHINE_ARCHS=2",
            "-DNDEBUG",
        ]
    assert not any("gencode" in flag for flag in setup.nvcc_flags(nvcc_threads=2))


def own_headers(source: Path) -> set[Path]:
    """The files of csrc/ that `source` includes, directly or not ("..." includes, resolved
    against csrc/ as the build's include path does)."""
    seen: set[Path] = set()
    pending = [source]
    while pending:
        path = pending.pop()
        for name in re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), re.MULTILINE):
            header = ROOT / "csrc" / name
            if header.is_file() and header not in seen:
                seen.add(header)
                pending.append(header)
    return seen


def arch_dependent_files(files: set[Path]) -> list[str]:
    """The files with code (not a comment) that tests __CUDA_ARCH__."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in files
        if any("__CUDA_ARCH__" in line.split("//")[0] for line in path.read_text().splitlines())
    )


def test_directions_that_share_ptx_have_no_architecture_dependent_code():
    """A direction that shares_ptx gets its sm_90 machine code from sm_80's PTX, so code of ours
    that tests __CUDA_ARCH__ would silently take its sm_80 path on Hopper. The sm80 backward,
    which does (bulk dQ adds on sm_90), shows that the scan finds such code."""
    setup = load_setup()
    for family in setup.FAMILIES.values():
        for name, direction in family.directions.items():
            source = next(
                setup.GENERATOR.INSTANTIATION_DIR / inst.relative_path
                for inst in setup.GENERATOR.all_instantiations()
                if inst.family == family.name and inst.direction == name
            )
            found = arch_dependent_files(own_headers(source))
            if direction.shares_ptx:
                assert found == [], f"{family.name} {name} shares_ptx but tests __CUDA_ARCH__"
    sm80_backward = setup.GENERATOR.INSTANTIATION_DIR / "sm80" / "bwd_bf16_hdim128.cu"
    assert arch_dependent_files(own_headers(sm80_backward)) == ["csrc/kernels/sm80/dq_accum.h"]


def test_ninja_starts_the_heaviest_files_first(monkeypatch):
    """Each family's backward files come before its forward files, and the host sources after
    the first family's kernels (setup.DIRECTIONS_HEAVIEST_FIRST gives the measurements): a run
    that ended on a long file would leave the other cores idle."""
    setup = load_setup()
    monkeypatch.setattr(setup, "visible_gpu_capabilities", lambda: [])
    for name in ("TORCH_CUDA_ARCH_LIST", "FLASH_VARLEN_ARCHS", "FLASH_VARLEN_FAMILIES",
                 "FLASH_VARLEN_DTYPES", "FLASH_VARLEN_HEAD_DIMS"):
        monkeypatch.delenv(name, raising=False)
    sources = setup.kernel_sources()
    assert list(sources) == ["sm90", "sm80", "decode"]
    sm80_directions = [Path(path).name.split("_")[0] for path in sources["sm80"]]
    assert sm80_directions == ["bwd"] * 20 + ["fwd"] * 20
    sm90_directions = [Path(path).name.split("_")[0] for path in sources["sm90"]]
    assert sm90_directions == ["bwd"] * 8 + ["fwd"] * 20
    host = ["csrc/bindings/module.cpp", "csrc/kernels/common/kernel_registry.cpp"]
    runs = setup.build_runs(sources, host)
    # One run per set of target flags: the sm90 directions share theirs, and so do the sm80
    # forward and the decode family.
    assert [run.label for run in runs] == ["sm90 bwd, sm90 fwd", "sm80 bwd", "sm80 fwd, decode"]
    assert runs[0].files == sources["sm90"] + host
    assert runs[1].files == sources["sm80"][:20]
    assert runs[2].files == sources["sm80"][20:] + sources["decode"]


@pytest.mark.parametrize(
    ("capability", "arch"),
    [((8, 0), "80"), ((8, 6), "80"), ((8, 9), "80"), ((9, 0), "90"), ((10, 0), None),
     ((7, 5), None)],
)
def test_a_gpu_runs_the_highest_target_of_its_major_version(capability, arch):
    assert load_setup().capability_arch(capability) == arch


def test_torch_arch_list_is_parsed_as_torch_writes_it():
    setup = load_setup()
    assert setup.parse_torch_arch_list("8.0;9.0+PTX") == [(8, 0), (9, 0)]
    assert setup.parse_torch_arch_list(" 8.6 9.0a ") == [(8, 6), (9, 0)]
    with pytest.raises(setup.TOOLCHAIN.BuildEnvironmentError, match="'Ampere' is not a compute"):
        setup.parse_torch_arch_list("Ampere")


@pytest.mark.parametrize(
    ("flash_varlen_archs", "torch_arch_list", "visible", "archs", "reason"),
    [
        ("80", "9.0", [(9, 0)], ["80"], "FLASH_VARLEN_ARCHS"),
        ("", "8.6;9.0", [], ["80", "90"], "TORCH_CUDA_ARCH_LIST: compute capability 8.6, 9.0"),
        ("", "8.9", [(9, 0)], ["80"], "TORCH_CUDA_ARCH_LIST"),
        ("", "", [(9, 0)], ["90"], "the GPUs visible at build time: compute capability 9.0"),
        ("", "", [(8, 0), (9, 0)], ["80", "90"], "visible at build time"),
        ("", "", [], ["80", "90"], "no GPU visible at build time"),
        ("", "", [(10, 0)], ["80", "90"], "no kernel family runs compute capability 10.0"),
    ],
)
def test_architectures_follow_the_settings_then_the_visible_gpus(
    monkeypatch, flash_varlen_archs, torch_arch_list, visible, archs, reason
):
    """As torch builds its extensions: for the GPUs at hand, unless told otherwise."""
    setup = load_setup()
    monkeypatch.setenv("FLASH_VARLEN_ARCHS", flash_varlen_archs)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", torch_arch_list)
    monkeypatch.setattr(setup, "visible_gpu_capabilities", lambda: visible)
    chosen, why = setup.arch_selection()
    assert chosen == archs and reason in why
    assert setup.selected_archs() == archs


def test_unknown_family_is_refused(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("FLASH_VARLEN_FAMILIES", "sm90x")
    with pytest.raises(SystemExit, match="FLASH_VARLEN_FAMILIES='sm90x': unknown value"):
        setup.kernel_sources()


def test_record_of_the_build_in_this_checkout_matches_package_and_selection():
    """In CI (FLASH_VARLEN_REQUIRE_EXTENSION=1) the narrowed build must have written its record."""
    record = _extension.read_build_info()
    if record is None:
        if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the extension was built but {_extension.BUILD_INFO_NAME} is missing")
        pytest.skip(f"no build record ({_extension.BUILD_INFO_NAME}): the extension is not built")
    setup = load_setup()
    assert set(setup.BUILD_INFO_FIELDS) <= set(vars(record))
    assert record.PACKAGE_VERSION == flash_varlen.__version__
    assert _extension._torch_mismatch(record) == ""
    if os.environ.get("FLASH_VARLEN_REQUIRE_EXTENSION") == "1":
        # CI builds in the environment the tests run in: the record shows that selection.
        assert record.ARCHS == tuple(setup.selected_archs())
        assert record.FAMILIES == tuple(setup.kernel_sources())
        assert record.DTYPES == tuple(setup.env_list("FLASH_VARLEN_DTYPES", setup.ALL_DTYPES))
        head_dims = setup.env_list("FLASH_VARLEN_HEAD_DIMS", setup.ALL_HEAD_DIMS)
        assert record.HEAD_DIMS == tuple(int(h) for h in head_dims)


# ----------------------------------------------------------------------------------------------
# The torch version check before importing _C
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "running"),
    [
        (("2.11.0+cu130", "13.0"), ("2.11.0+cu130", "13.0")),
        # PyPI's wheel has no label; PyTorch's index labels the same build "+cu130".
        (("2.11.0+cu130", "13.0"), ("2.11.0", "13.0")),
        (("2.11.0+cpu", None), ("2.11.0", None)),
        (("2.12.0a0+git1a2b3c4", "13.0"), ("2.12.0a0+git1a2b3c4", "13.0")),
    ],
)
def test_same_torch_builds_are_compatible(built, running):
    assert _extension.torch_build_identity(*built) == _extension.torch_build_identity(*running)


@pytest.mark.parametrize(
    ("built", "running"),
    [
        (("2.11.0+cu130", "13.0"), ("2.11.1+cu130", "13.0")),  # patch release
        (("2.11.0+cu130", "13.0"), ("2.12.0+cu130", "13.0")),  # minor release
        (("2.11.0+cu130", "13.0"), ("2.11.0+cu128", "12.8")),  # CUDA variant
        (("2.11.0+cu130", "13.0"), ("2.11.0+cpu", None)),  # CPU-only torch
        (("2.11.0+cu130", "13.0"), ("2.11.0", "12.8")),  # unlabelled but another CUDA
        (("2.12.0a0+git1a2b3c4", "13.0"), ("2.12.0a0+git5d6e7f8", "13.0")),  # source builds
        (("2.12.0.dev20260301+cu130", "13.0"), ("2.12.0.dev20260302+cu130", "13.0")),  # nightlies
    ],
)
def test_different_torch_builds_are_incompatible(built, running):
    assert _extension.torch_build_identity(*built) != _extension.torch_build_identity(*running)


def test_other_torch_version_refuses_the_import_and_names_both(
    monkeypatch, running_torch, import_spy
):
    attempts, _ = import_spy
    monkeypatch.setattr(_extension, "read_build_info", lambda: fake_record(OTHER_TORCH, "13.0"))
    with pytest.raises(RuntimeError) as info:
        _extension.load_extension()
    message = str(info.value)
    assert f"built against torch {OTHER_TORCH} (CUDA 13.0)" in message
    assert f"but torch {BUILT_TORCH} (CUDA 13.0) is running" in message
    assert f"`{_extension.BUILD_COMMAND}`" in message
    assert attempts == [], "the mismatched extension must not be imported"
    assert not _extension.is_available()
    assert _extension.unavailable_reason() in message


def test_other_cuda_variant_refuses_the_import(monkeypatch, running_torch, import_spy):
    attempts, _ = import_spy
    monkeypatch.setattr(_extension, "read_build_info", lambda: fake_record("2.11.0+cu128", "12.8"))
    with pytest.raises(RuntimeError, match=r"2\.11\.0\+cu128 \(CUDA 12\.8\).*2\.11\.0\+cu130"):
        _extension.load_extension()
    assert attempts == []


def test_monkeypatched_running_torch_is_compared_with_the_record(monkeypatch, import_spy):
    """The running version is read at load time, not cached at import of the module."""
    attempts, _ = import_spy
    record = fake_record(str(torch.__version__), torch.version.cuda)
    monkeypatch.setattr(_extension, "read_build_info", lambda: record)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    built = re.escape(record.TORCH_VERSION)
    with pytest.raises(RuntimeError, match=rf"built against torch {built} .*but torch 9\.9\.9"):
        _extension.load_extension()
    assert attempts == []


def test_matching_torch_imports_the_extension(monkeypatch, running_torch, import_spy):
    attempts, module = import_spy
    # The record of an unlabelled PyPI torch matches the labelled running one of the same build.
    monkeypatch.setattr(_extension, "read_build_info", lambda: fake_record("2.11.0", "13.0"))
    assert _extension.load_extension() is module
    assert attempts == [1] and _extension.unavailable_reason() == ""


def test_extension_without_record_is_imported_unchecked(monkeypatch, running_torch, import_spy):
    attempts, module = import_spy
    monkeypatch.setitem(sys.modules, _extension.BUILD_INFO_NAME, None)  # no record to import
    assert _extension.read_build_info() is None
    assert _extension.load_extension() is module
    assert attempts == [1]


def test_mismatch_leaves_the_extension_unimported_in_a_real_process():
    """A process whose record names another torch never has flash_varlen._C in sys.modules."""
    code = f"""
import json, sys, types
import flash_varlen
record = types.ModuleType({_extension.BUILD_INFO_NAME!r})
record.TORCH_VERSION, record.TORCH_CUDA_VERSION = {OTHER_TORCH!r}, "13.0"
sys.modules[record.__name__] = record
from flash_varlen import _extension
_extension._is_built = lambda: True  # as if _C were built here (it is not imported either way)
print(json.dumps([_extension.is_available(), _extension.unavailable_reason(),
                  {_extension.EXTENSION_NAME!r} in sys.modules]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    available, reason, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert not available and not imported
    assert OTHER_TORCH in reason and str(torch.__version__) in reason


def test_record_without_extension_is_ignored(monkeypatch, fresh_state):
    """A pure-Python install over an earlier build: the extension is reported as not built."""
    monkeypatch.setattr(_extension, "read_build_info", lambda: fake_record(OTHER_TORCH, "13.0"))
    monkeypatch.setitem(sys.modules, _extension.EXTENSION_NAME, None)  # no extension to find
    assert not _extension._is_built()
    with pytest.raises(RuntimeError, match="flash_varlen._C is not built"):
        _extension.load_extension()


def test_extension_with_its_record_loads_in_this_checkout():
    if _extension.read_build_info() is None:
        pytest.skip("no build record: the extension is not built in this checkout")
    assert _extension.is_available(), _extension.unavailable_reason()


# ----------------------------------------------------------------------------------------------
# pyproject.toml
# ----------------------------------------------------------------------------------------------


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_single_sourced_from_the_package():
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "flash_varlen.__version__"
    }
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        # Older setuptools flag its pyproject support as beta; that is not what is tested here.
        warnings.simplefilter("ignore")
        resolved = read_configuration(ROOT / "pyproject.toml", expand=True)
    assert resolved["project"]["version"] == flash_varlen.__version__


def test_python_classifiers_start_at_requires_python():
    project = pyproject()["project"]
    minimum = project["requires-python"].removeprefix(">=")
    listed = [
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert listed and listed[0] == minimum, (listed, minimum)


def test_every_subpackage_ships():
    """Every folder of flash_varlen with an __init__.py is matched by the package patterns."""
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    package_dir = ROOT / "flash_varlen"
    packages = [
        ".".join(init.parent.relative_to(ROOT).parts) for init in package_dir.rglob("__init__.py")
    ]
    assert "flash_varlen" in packages
    for package in packages:
        assert any(fnmatch.fnmatchcase(package, p) for p in patterns), package


def test_wheel_metadata_pins_the_torch_it_was_built_against():
    """A wheel with the extension loads only under its torch, so pip must not pair it with
    another; an sdist and the pure-Python package keep the supported range."""
    setup = load_setup()
    assert setup.torch_requirement(["bdist_wheel"], "2.11.0+cu130") == "torch==2.11.0"
    assert setup.torch_requirement(["editable_wheel", "--dist-dir", "x"], "2.11.0") == (
        "torch==2.11.0"
    )
    assert setup.torch_requirement(["sdist"], "2.11.0+cu130") == setup.TORCH_RANGE
    assert setup.torch_requirement(["bdist_wheel"], None) == setup.TORCH_RANGE
    project = pyproject()["project"]
    # setup.py gives the requirement: pyproject must leave it dynamic and not state its own.
    assert "dependencies" in project["dynamic"] and "dependencies" not in project


@pytest.mark.parametrize(
    ("commands", "compiles"),
    [
        (["sdist"], False),
        (["sdist", "--formats", "gztar"], False),
        (["sdist", "bdist_wheel"], True),
        (["build_ext", "--inplace"], True),
        (["bdist_wheel"], True),
        (["egg_info"], True),
        ([], True),
    ],
)
def test_only_a_source_distribution_skips_the_extension(commands, compiles):
    assert load_setup().compiles_extension(commands) is compiles


def test_sdist_carries_every_file_the_build_reads(tmp_path):
    """An sdist (built without touching torch or a toolkit) holds every file git tracks under
    csrc/ (sources, headers, the generator and the kernel-family declarations), so that it
    builds on its own."""
    tracked = subprocess.run(
        ["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0 or not tracked.stdout:
        pytest.skip("not a git checkout: no list of the tracked files to compare with")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("flash_varlen-*.tar.gz")
    with tarfile.open(archive) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = set(tracked.stdout.split()) - shipped
    assert not missing, f"the sdist lacks {sorted(missing)[:10]}"
    assert {"setup.py", "pyproject.toml", "README.md", "flash_varlen/__init__.py"} <= shipped


def test_readme_install_command_uses_the_pip_of_the_python_that_builds():
    """Every install in the README's command is `python -m pip`: on the GPU machine the `pip` on
    PATH belongs to another Python than `python` (the system's against a virtual environment's),
    and the command with plain `pip` installed into the wrong one (there: stopped offline looking
    for torch). The demo at the end runs with that same `python`."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "--no-build-isolation -v -e ." in line)
    steps = [step.strip() for step in command.split("&&")]
    installs = [step for step in steps if re.search(r"\bpip\b", step)]
    assert len(installs) == 3, steps
    assert all(step.startswith("python -m pip install ") for step in installs), installs
    assert steps[-1].startswith("python examples/"), steps


def test_readme_install_command_installs_the_tested_torch():
    """The README's install command pins torch: in a fresh virtual environment an unpinned
    `pip install torch` installed 2.14.1, whose headers need C++20 while the extension compiles
    as C++17. The pin is the torch the build was tested with, and within setup.TORCH_RANGE."""
    setup = load_setup()
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "--no-build-isolation -v -e ." in line)
    pinned = re.search(r"\btorch==(\d+\.\d+\.\d+)\b", command)
    assert pinned is not None, command
    minimum = setup.TORCH_RANGE.removeprefix("torch>=")
    version = tuple(int(part) for part in pinned.group(1).split("."))
    assert version >= tuple(int(part) for part in minimum.split("."))
    assert f"torch {pinned.group(1)}+cu" in readme  # the versions the README says were used
