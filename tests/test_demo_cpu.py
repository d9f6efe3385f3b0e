"""examples/train_packed.py without a GPU: the --cpu-reference run (also what the default mode
runs without a GPU), the exit without a usable extension, the data.

The script runs end to end on the CPU with flash_varlen.reference as its attention (in a
subprocess, as a user runs it, and in-process where output formatting is checked); its building
blocks (document sampling, packing, padding, the padded attention mask) are checked directly.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from demo_script import REPO_ROOT, SCRIPT, RUN_TIMEOUT_S, FINAL_LOSS, STEP1_LOSSES, load_script

from flash_varlen.reference import attention_ref_varlen

# Both layouts run in float32 on the CPU with identical weights and data, so their step-1
# losses differ only by float32 summation order.
FP32_STEP1_TOLERANCE = 1e-5




demo = load_script()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def documents(lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(demo.VOCAB_SIZE, (length,), generator=gen) for length in lengths]


# --------------------------------------------------------------------------- the whole script


def test_cpu_reference_run_reports_and_loss_falls() -> None:
    # The defaults (5 steps of 256 tokens, seed 0): the loss falls by about 0.15 as the model
    # learns the skewed token frequencies; seeds 0-5 all fall by more than 0.1.
    result = run_script("--cpu-reference", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[packed, flash_varlen.reference]" in out
    for line in ("final loss:", "loss decreased: yes", "tokens/s:", "peak memory:"):
        assert line in out, f"missing {line!r} in:\n{out}"
    final, first = map(float, FINAL_LOSS.search(out).groups())
    assert final < first


def test_cpu_reference_compare_padded_matches_packed_at_step_1() -> None:
    """Same weights and data at step 1: the padded SDPA model must give the packed loss."""
    result = run_script("--cpu-reference", "--compare", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[padded, scaled_dot_product_attention]" in out
    assert "both losses decreased: yes" in out
    assert re.search(r"speed-up \d+\.\d+x", out)
    packed, padded = map(float, STEP1_LOSSES.search(out).groups())
    assert packed == pytest.approx(padded, abs=FP32_STEP1_TOLERANCE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_default_mode_without_gpu_says_so_and_runs_the_cpu_reference() -> None:
    """The README's demo command on a machine without a GPU: the CPU-reference run, exit 0."""
    result = run_script("--compare", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU is available" in result.stderr and "--cpu-reference" in result.stderr
    assert "[packed, flash_varlen.reference]" in result.stdout
    assert "both losses decreased: yes" in result.stdout


def test_gpu_without_a_usable_extension_exits_nonzero(monkeypatch, capsys) -> None:
    """With a GPU, a missing or mismatched extension is an error, not a silent CPU run."""
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(demo._extension, "unavailable_reason", lambda: "it is not built.")
    assert demo.main(["--steps", "2"]) == demo.EXTENSION_UNAVAILABLE_EXIT_CODE != 0
    captured = capsys.readouterr()
    assert "but it is not built." in captured.err and "--cpu-reference" in captured.err
    assert "final loss" not in captured.out  # nothing was trained


def test_progress_without_tqdm_prints_periodic_log_lines(monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "tqdm", None)
    steps = demo.LOG_EVERY + 2  # one periodic line and the final one
    assert demo.main(["--cpu-reference", "--steps", str(steps), "--tokens-per-step", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("packed step ")]
    assert [line.split(":")[0] for line in progress] == [
        f"packed step {demo.LOG_EVERY}/{steps}",
        f"packed step {steps}/{steps}",
    ]
    assert all("tokens/s" in line for line in progress)


def test_no_progress_prints_only_the_report(monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "tqdm", None)
    argv = ["--cpu-reference", "--steps", "2", "--tokens-per-step", "64", "--no-progress"]
    assert demo.main(argv) == 0
    captured = capsys.readouterr()
    assert "step 2/2" not in captured.out and captured.err == ""
    assert "final loss:" in captured.out


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("budget", [demo.MIN_DOC_LEN, 256, 5000, 16384])
def test_sampled_documents_fill_the_budget_and_follow_the_rule(budget: int) -> None:
    docs = demo.sample_documents(torch.Generator().manual_seed(1), budget)
    lengths = [len(doc) for doc in docs]
    assert sum(lengths) == budget
    assert max(lengths) <= min(demo.MAX_DOC_LEN, budget)
    # Only the last document may be cut below the minimum length.
    assert all(length >= demo.MIN_DOC_LEN for length in lengths[:-1])
    for doc in docs:
        assert doc.dtype == torch.int64
        assert 0 <= int(doc.min()) and int(doc.max()) < demo.VOCAB_SIZE
        periods = range(demo.MIN_PATTERN_LEN, demo.MAX_PATTERN_LEN + 1)
        assert any(torch.equal(doc[p:], doc[:-p]) for p in periods), "not a repeated pattern"


def test_document_lengths_are_long_tailed() -> None:
    gen = torch.Generator().manual_seed(2)
    lengths = [len(doc) for _ in range(20) for doc in demo.sample_documents(gen, 16384)[:-1]]
    median = sorted(lengths)[len(lengths) // 2]
    assert median < 400 and max(lengths) > 1500  # mostly short, a few near MAX_DOC_LEN


def test_sampling_is_reproducible_from_the_seed() -> None:
    first = demo.sample_documents(torch.Generator().manual_seed(3), 4096)
    second = demo.sample_documents(torch.Generator().manual_seed(3), 4096)
    assert len(first) == len(second)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_pack_documents() -> None:
    lengths = [5, 1, 12, 3]
    docs = documents(lengths)
    batch = demo.pack_documents(docs, torch.device("cpu"))

    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 5, 6, 18, 21]
    assert batch.max_seqlen == 12
    assert torch.equal(batch.tokens, torch.cat(docs))
    cu = batch.cu_seqlens.tolist()
    for index, doc in enumerate(docs):
        start, end = cu[index], cu[index + 1]
        assert batch.positions[start:end].tolist() == list(range(len(doc)))  # restart at 0
        # Targets: the next token of the same document; the last token has none.
        assert batch.targets[start : end - 1].tolist() == doc[1:].tolist()
        assert batch.targets[end - 1] == demo.IGNORE_INDEX


def test_pack_sampled_budget() -> None:
    docs = demo.sample_documents(torch.Generator().manual_seed(4), 16384)
    batch = demo.pack_documents(docs, torch.device("cpu"))
    assert batch.tokens.shape == (16384,)
    assert batch.cu_seqlens[-1] == 16384
    lengths = torch.tensor([len(doc) for doc in docs], dtype=torch.int32)
    assert torch.equal(batch.cu_seqlens.diff(), lengths)
    assert batch.max_seqlen == int(lengths.max())
    assert int((batch.targets != demo.IGNORE_INDEX).sum()) == 16384 - len(docs)


def test_pad_documents() -> None:
    lengths = [5, 1, 3]
    docs = documents(lengths)
    batch = demo.pad_documents(docs, torch.device("cpu"))

    assert batch.tokens.shape == batch.positions.shape == batch.targets.shape == (3, 5)
    assert batch.mask.shape == (3, 1, 5, 5) and batch.mask.dtype == torch.bool
    for row, doc in enumerate(docs):
        n = len(doc)
        assert torch.equal(batch.tokens[row, :n], doc)
        assert batch.positions[row, :n].tolist() == list(range(n))
        assert batch.targets[row, : n - 1].tolist() == doc[1:].tolist()
        # No target on a document's last token nor on padding: both stay out of the loss.
        assert (batch.targets[row, n - 1 :] == demo.IGNORE_INDEX).all()
    # The same loss targets as the packed layout, in the same order.
    packed = demo.pack_documents(docs, torch.device("cpu"))
    padded_targets = batch.targets[batch.targets != demo.IGNORE_INDEX]
    assert torch.equal(padded_targets, packed.targets[packed.targets != demo.IGNORE_INDEX])


def test_padded_attention_mask() -> None:
    lengths = torch.tensor([3, 1, 5])
    max_len = 5
    mask = demo.padded_attention_mask(lengths, max_len)
    assert mask.shape == (3, 1, max_len, max_len) and mask.dtype == torch.bool
    for row, length in enumerate(lengths.tolist()):
        for query in range(max_len):
            visible = mask[row, 0, query].nonzero().flatten().tolist()
            if query < length:
                assert visible == list(range(query + 1))  # causal within the document
            else:
                # A padded query sees the real keys (never an empty row, so no NaN).
                assert visible == list(range(length))
        assert not mask[row, 0, :, length:].any()  # nobody attends to a padded key


def test_padded_attention_equals_packed_reference_on_real_tokens() -> None:
    """SDPA under the mask, with GQA, gives the reference's per-document causal attention."""
    lengths, heads, kv_heads, head_dim = [7, 2, 11], 4, 2, 8
    gen = torch.Generator().manual_seed(5)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(total, kv_heads, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(total, kv_heads, head_dim, generator=gen, requires_grad=True)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    expected, _ = attention_ref_varlen(q, k, v, cu, cu, causal=True)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)

    mask = demo.padded_attention_mask(torch.tensor(lengths), max(lengths))
    out = demo.padded_attention(pad(q), pad(k), pad(v), mask)
    real = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(out[real], expected)
    assert not out.isnan().any()  # padded query rows included

    # Gradients through the padded path are finite and match the reference's.
    grads = torch.autograd.grad(out[real].sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_reference_attention_supports_autograd() -> None:
    """The --cpu-reference mode trains through attention_ref_varlen: its gradients are exact."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    inputs = [torch.randn(8, h, 4, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1)]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_ref_varlen(q, k, v, cu, cu, causal=True, compute_dtype=torch.float64)[0]

    assert torch.autograd.gradcheck(attention, inputs)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_model_forward_is_per_document(layout: str) -> None:
    """A document's logits do not depend on where it sits in the step nor on its neighbours
    (attention stays inside documents, positions restart)."""
    torch.manual_seed(0)
    model = demo.TinyLM(layers=2, d_model=32, heads=4, kv_heads=2)
    first, middle, last = documents([6, 9, 4])

    def logits_of(docs: list[torch.Tensor], index: int) -> torch.Tensor:
        batch, attend = demo.make_batch(docs, layout, torch.device("cpu"), use_reference=True)
        with torch.no_grad():
            logits = model(batch.tokens, batch.positions, attend)
        if layout == "padded":
            return logits[index, : len(docs[index])]
        start = sum(len(doc) for doc in docs[:index])
        return logits[start : start + len(docs[index])]

    torch.testing.assert_close(logits_of([first, middle, last], 1), logits_of([middle], 0))
