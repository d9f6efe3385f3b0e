"""The build's checks of the machine, in simulated environments (no GPU, no real toolkit needed):
CUDA toolkit discovery and each failure message of csrc/toolchain.py, the parallelism of
csrc/build_parallelism.py, and how setup.py runs them before anything compiles."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC_BANNER = (
    "nvcc: NVIDIA (R) Cuda compiler driver\n"
    "Cuda compilation tools, release {major}.0, V{major}.0.88\n"
)
GIB = 1024**3


def load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


toolchain = load("flash_varlen_toolchain_for_tests", ROOT / "csrc" / "toolchain.py")
parallelism = load("flash_varlen_parallelism_for_tests", ROOT / "csrc" / "build_parallelism.py")


def fake_toolkit(folder: Path, major: int = 13, header: bool = True) -> Path:
    """A folder with bin/nvcc (a script printing nvcc's banner for CUDA ``major``) and, with
    ``header``, include/cuda_runtime.h."""
    (folder / "bin").mkdir(parents=True)
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\nprintf '{NVCC_BANNER.format(major=major)}'\n")
    nvcc.chmod(0o755)
    if header:
        (folder / "include").mkdir()
        (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


@pytest.fixture
def no_default_toolkit(monkeypatch, tmp_path):
    """/usr/local/cuda replaced by an empty folder, so that only the simulated toolkits count."""
    empty = tmp_path / "no_default"
    empty.mkdir()
    monkeypatch.setattr(toolchain, "DEFAULT_TOOLKIT", empty)
    return empty


# --------------------------------------------------------------------------------------------
# Toolkit discovery


def test_nvcc_version_is_parsed_from_its_banner():
    assert toolchain.parse_nvcc_version(NVCC_BANNER.format(major=13)) == "13.0.88"
    assert toolchain.parse_nvcc_version("nvcc: command not found") == "unknown"


def test_torch_guess_is_taken_when_it_is_a_toolkit(tmp_path, no_default_toolkit):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    found = toolchain.find_cuda_toolkit(str(home), path="")
    assert found.home == home and found.version == "13.0.88" and found.passed_over == ()
    assert toolchain.describe(found) == f"CUDA toolkit 13.0.88 at {home}"


def test_nvcc_linked_into_a_bin_folder_leads_to_its_toolkit(tmp_path, no_default_toolkit):
    """torch guesses the folder above `which nvcc` (/usr/local for /usr/local/bin/nvcc), which has
    no CUDA headers; the nvcc resolved through its symlink names the real toolkit."""
    home = fake_toolkit(tmp_path / "cuda-13.0")
    linked_root = tmp_path / "usr_local"
    (linked_root / "bin").mkdir(parents=True)
    (linked_root / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    found = toolchain.find_cuda_toolkit(str(linked_root), path=str(linked_root / "bin"))
    assert found.home == home
    (reason,) = found.passed_over
    assert f"torch's CUDA_HOME guess {linked_root} has no include/cuda_runtime.h" in reason
    assert "has no include/cuda_runtime.h" in toolchain.describe(found)


def test_default_location_is_the_last_candidate(tmp_path, monkeypatch):
    home = fake_toolkit(tmp_path / "default_cuda")
    monkeypatch.setattr(toolchain, "DEFAULT_TOOLKIT", home)
    assert toolchain.find_cuda_toolkit(None, path="").home == home


def test_no_toolkit_names_every_place_searched(tmp_path, no_default_toolkit):
    guess = tmp_path / "guess"
    guess.mkdir()
    with pytest.raises(toolchain.BuildEnvironmentError) as raised:
        toolchain.find_cuda_toolkit(str(guess), path="")
    message = str(raised.value)
    assert message.startswith("no CUDA toolkit found")
    assert f"torch's CUDA_HOME guess {guess} has no bin/nvcc or include/cuda_runtime.h" in message
    assert f"the default location {no_default_toolkit} has no bin/nvcc" in message
    assert "set CUDA_HOME" in message


# --------------------------------------------------------------------------------------------
# torch and the toolkit's version


def test_missing_torch_says_how_to_install_it():
    with pytest.raises(toolchain.BuildEnvironmentError, match="torch is not installed") as raised:
        toolchain.check_torch(None, None)
    assert "--no-build-isolation" in str(raised.value)


def test_cpu_only_torch_is_refused_with_the_cuda_wheel_and_the_python_only_way():
    with pytest.raises(toolchain.BuildEnvironmentError) as raised:
        toolchain.check_torch("2.11.0+cpu", None)
    message = str(raised.value)
    assert "torch 2.11.0+cpu is a CPU-only build" in message
    assert "download.pytorch.org/whl/cu130" in message and "FLASH_VARLEN_SKIP_CUDA=1" in message


def test_cuda_torch_passes():
    toolchain.check_torch("2.11.0+cu130", "13.0")


def test_major_version_mismatch_names_both(tmp_path):
    toolkit = toolchain.CudaToolkit(tmp_path, "12.4.131")
    with pytest.raises(toolchain.BuildEnvironmentError) as raised:
        toolchain.check_toolkit_matches_torch(toolkit, "2.11.0+cu130", "13.0")
    message = str(raised.value)
    assert f"CUDA toolkit 12.4.131 at {tmp_path}" in message
    assert "torch 2.11.0+cu130, which was built with CUDA 13.0" in message
    assert "Install CUDA toolkit 13.x" in message and "a torch built for CUDA 12" in message


def test_matching_major_passes_and_unknown_version_is_refused(tmp_path):
    toolchain.check_toolkit_matches_torch(
        toolchain.CudaToolkit(tmp_path, "13.1.20"), "2.11.0+cu130", "13.0"
    )
    with pytest.raises(toolchain.BuildEnvironmentError, match="did not report its version"):
        toolchain.check_toolkit_matches_torch(
            toolchain.CudaToolkit(tmp_path, "unknown"), "2.11.0+cu130", "13.0"
        )


def test_broken_nvcc_reports_unknown(tmp_path, no_default_toolkit):
    home = fake_toolkit(tmp_path / "cuda")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    assert toolchain.find_cuda_toolkit(str(home), path="").version == "unknown"


# --------------------------------------------------------------------------------------------
# Parallelism


@pytest.mark.parametrize(
    ("cores", "available_gib", "threads", "expected_jobs"),
    [
        (2, 21.0, 2, 2),  # the 2-core / 24 GB machine: 2 x 2 x 3.8 GiB fits in 80% of 21 GiB
        (16, 120.0, 2, 12),  # the GPU machine: memory, not cores, bounds it
        (64, 500.0, 2, 52),
        (8, 500.0, 2, 8),  # never more jobs than cores
        (2, 21.0, 1, 2),
        (4, 10.0, 2, 1),  # one job of two threads fits 8 GiB
        (4, 3.0, 2, 1),  # not even one fits: still one job, and the line says so
    ],
)
def test_jobs_fit_cores_and_memory(cores, available_gib, threads, expected_jobs):
    environ = {"NVCC_THREADS": str(threads)}
    chosen = parallelism.choose(cores, int(available_gib * GIB), environ)
    assert (chosen.jobs, chosen.nvcc_threads) == (expected_jobs, threads)
    # What the estimate promises, whenever one job fits at all.
    estimate = chosen.jobs * threads * parallelism.PEAK_GIB_PER_NVCC_THREAD * GIB
    fits = estimate <= available_gib * GIB * parallelism.MEMORY_MARGIN
    assert fits or (chosen.jobs == 1 and "may not fit" in chosen.reason)


@pytest.mark.parametrize(
    ("cores", "available_gib", "expected"),
    [
        (2, 21.0, (2, 1)),  # the 2-core machine: the jobs fill the cores, one thread each
        (16, 120.0, (16, 1)),  # the GPU machine: 16 x 3.8 GiB fits
        (8, 20.0, (4, 1)),  # memory allows 4 jobs; a second thread each would not fit
        (8, 40.0, (8, 1)),
        (4, 18.0, (3, 1)),  # 3 jobs, one idle core, but no room for 6 threads
        (4, 10.0, (2, 1)),
        (8, 13.0, (2, 1)),  # 2 jobs fit, and not 4 threads
        (16, 35.0, (7, 1)),
        (8, 16.0, (3, 1)),
    ],
)
def test_default_threads_only_for_cores_that_jobs_leave_idle(cores, available_gib, expected):
    chosen = parallelism.choose(cores, int(available_gib * GIB), {})
    assert (chosen.jobs, chosen.nvcc_threads) == expected
    estimate = chosen.jobs * chosen.nvcc_threads * parallelism.PEAK_GIB_PER_NVCC_THREAD * GIB
    assert estimate <= available_gib * GIB * parallelism.MEMORY_MARGIN


def test_spare_cores_get_a_second_thread_when_memory_allows():
    # MAX_JOBS leaves cores idle: a second thread per job uses them where memory allows.
    chosen = parallelism.choose(8, int(10.0 * GIB), {"MAX_JOBS": "2"})
    assert (chosen.jobs, chosen.nvcc_threads) == (2, 1)  # 2 x 2 x 3.8 GiB > 8 GiB
    chosen = parallelism.choose(8, int(40.0 * GIB), {"MAX_JOBS": "2"})
    assert (chosen.jobs, chosen.nvcc_threads) == (2, 2)  # 4 idle cores, room for 4 threads
    chosen = parallelism.choose(16, int(120.0 * GIB), {"MAX_JOBS": "16"})
    assert (chosen.jobs, chosen.nvcc_threads) == (16, 1)  # scripts/gpu_check.sh's setting


def test_environment_overrides_are_taken_as_they_are():
    chosen = parallelism.choose(2, 4 * GIB, {"MAX_JOBS": "6", "NVCC_THREADS": "3"})
    assert (chosen.jobs, chosen.nvcc_threads, chosen.reason) == (6, 3, "MAX_JOBS set")
    line = parallelism.describe(chosen)
    assert line.startswith("6 parallel jobs x 3 nvcc threads") and "override" in line


@pytest.mark.parametrize("variable", ["MAX_JOBS", "NVCC_THREADS"])
def test_non_positive_overrides_are_refused(variable):
    with pytest.raises(ValueError, match=f"{variable} must be >= 1"):
        parallelism.choose(2, 20 * GIB, {variable: "0"})


def test_unknown_memory_falls_back_to_the_cores():
    chosen = parallelism.choose(12, None, {})
    assert chosen.jobs == 12 and "memory unknown" in chosen.reason


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert parallelism.available_memory_bytes(meminfo) == 20000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert parallelism.available_memory_bytes(meminfo) is None
    assert parallelism.available_memory_bytes(tmp_path / "missing") is None


# --------------------------------------------------------------------------------------------
# setup.py: the checks run first, and a failure is one line


def load_setup() -> types.ModuleType:
    return load("flash_varlen_setup_for_toolchain_tests", ROOT / "setup.py")


def test_failed_check_ends_the_build_with_one_message(monkeypatch):
    setup = load_setup()

    def no_toolkit():
        raise setup.TOOLCHAIN.BuildEnvironmentError("no CUDA toolkit found (simulated)")

    monkeypatch.setattr(setup, "extensions", no_toolkit)
    monkeypatch.setattr(setup, "setup", lambda **_: pytest.fail("setup() ran after a failed check"))
    with pytest.raises(SystemExit) as raised:
        setup.main()
    assert raised.value.code == (
        "flash_varlen: cannot build the CUDA extension: no CUDA toolkit found (simulated)"
    )


def test_missing_cutlass_headers_say_how_to_get_them(monkeypatch):
    setup = load_setup()
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setattr(setup, "ROOT", Path("/nonexistent"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(setup.TOOLCHAIN.BuildEnvironmentError) as raised:
        setup.cutlass_include_dir()
    assert "pip install --no-deps nvidia-cutlass==4.2.0.0" in str(raised.value)
    assert "CUTLASS_PATH" in str(raised.value)


def test_checks_run_in_order_and_point_torch_at_the_toolkit(monkeypatch, tmp_path):
    """checked_toolchain finds the toolkit from torch's guess and hands it to torch's extension
    builder (whose CUDA_HOME was fixed when it was imported) and to the processes it starts."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    from torch.utils import cpp_extension

    setup = load_setup()
    major = torch.version.cuda.split(".")[0]
    home = fake_toolkit(tmp_path / "cuda", major=int(major))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "wrong_guess"))
    monkeypatch.setattr(setup.TOOLCHAIN, "DEFAULT_TOOLKIT", home)
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrong_guess"))
    found = setup.checked_toolchain()
    assert found.home == home
    assert cpp_extension.CUDA_HOME == str(home)
    assert os.environ["CUDA_HOME"] == str(home)


def test_objects_stay_in_the_source_tree():
    """A stopped build resumes: its objects are in build/ of the checkout, not in a temporary
    folder (as setuptools makes for editable installs)."""
    setup = load_setup()
    assert setup.OBJECTS_DIR.parent == ROOT / "build"
