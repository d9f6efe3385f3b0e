"""Shared by the demo's CPU and GPU tests: where examples/train_packed.py is, how to import it,
and the report lines they parse."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_packed.py"
RUN_TIMEOUT_S = 600
FINAL_LOSS = re.compile(r"final loss: (\d+\.\d+) \(step 1: (\d+\.\d+)\)")
STEP1_LOSSES = re.compile(r"step-1 loss .*: packed (\d+\.\d+), padded (\d+\.\d+)")
FINAL_LOSSES = re.compile(r"final loss: packed (\d+\.\d+), padded (\d+\.\d+)")


def load_script() -> ModuleType:
    """Imports the example as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_packed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module
