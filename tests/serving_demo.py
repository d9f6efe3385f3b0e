"""Shared by the serving demo's CPU and GPU tests: makes examples/serving importable, loads
examples/generate_paged.py, builds the tests' requests, and recomputes a run's logits."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SCRIPT = EXAMPLES / "generate_paged.py"

# The demo's package sits in examples/; tests find it there (first on the path, so that no
# installed package of the same name can shadow it).
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from serving.model import DecoderModel  # noqa: E402
from serving.padded_baseline import teacher_forced_logits  # noqa: E402
from serving.requests import GenerationResult, Request  # noqa: E402


def load_script() -> ModuleType:
    """Imports the example as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("generate_paged", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_requests(
    prompt_lengths: list[int], output_lengths: list[int], vocab_size: int, seed: int = 0
) -> list[Request]:
    """Requests with the given lengths and seeded random prompt tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [
        Request(
            request_id,
            tuple(torch.randint(vocab_size, (prompt_length,), generator=generator).tolist()),
            output_length,
        )
        for request_id, (prompt_length, output_length) in enumerate(
            zip(prompt_lengths, output_lengths, strict=True)
        )
    ]


def recomputed_logits(
    model: DecoderModel, requests: list[Request], result: GenerationResult
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """What the tolerance rule of tests/accuracy.py needs to judge a low-precision run's
    logits: (the run's logits, their float32 recomputation, their recomputation in the model's
    dtype, floor), all (generated tokens, vocab) float32 on the CPU.

    The recomputations are teacher-forced (one cache-free padded SDPA forward over each prompt
    and the run's own tokens), the float32 one with the model's weights cast up (the same
    values). The floor is half an ulp of the model's dtype at the largest logit: the logits are
    float32, computed from hidden states in the model's dtype.
    """
    model_fp32 = copy.deepcopy(model).float()
    ref_fp32 = teacher_forced_logits(model_fp32, requests, result.tokens)
    ref_lowp = teacher_forced_logits(model, requests, result.tokens)

    def stacked(logits: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([logits[request.request_id].cpu() for request in requests])

    fp32 = stacked(ref_fp32)
    floor = torch.finfo(model.embed.weight.dtype).eps / 2 * float(fp32.abs().max())
    return stacked(result.logits), fp32, stacked(ref_lowp), floor
