"""Plain C++ headers of the kernels (no CUDA) compiled into small drivers with the host compiler,
so that CPU tests can run their arithmetic (tests/test_decode_cpu.py,
tests/test_padded_rows_cpu.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def compile_host_driver(tmp_path_factory: pytest.TempPathFactory, name: str, source: str) -> Path:
    """The executable of `source` (C++17, csrc/ on the include path) in a fresh folder `name`;
    skips the test when the machine has no host C++ compiler."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp(name)
    (folder / "driver.cpp").write_text(source)
    binary = folder / "driver"
    subprocess.run([compiler, "-std=c++17", f"-I{CSRC}", str(folder / "driver.cpp"), "-o",
                    str(binary)], check=True)
    return binary
