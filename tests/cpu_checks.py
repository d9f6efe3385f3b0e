"""Helpers shared by the CPU test files: matching an exception's message by fragments, and
whether this torch can create fake CUDA tensors (the API layer's tests trace the public
functions through them on machines without a GPU)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def raises(kind: type[Exception], *fragments: str):
    """pytest.raises whose message must contain every fragment (literally)."""
    return pytest.raises(kind, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def fake_cuda_supported() -> bool:
    try:
        with FakeTensorMode():
            torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError):
        return False
    return True


needs_fake_cuda = pytest.mark.skipif(
    not fake_cuda_supported(), reason="this torch cannot create fake CUDA tensors"
)
