"""The transformers integration (flash_varlen.integrations.transformers) on CPU.

There is no kernel here, so the tests replace the two kernel calls of the integration
(monkeypatch) with fakes: the float32 reference of ``flash_varlen.reference``, after checking the
arguments the way the kernels' validation would (int32 cu_seqlens on q's device that span the
packed tensors, Python-int max_seqlen bounds, k/v with their own head count, a float32
(nheads,) sink on q's device), with the sliding window, soft-capping and attention sinks the
integration passes. A tiny Llama with
attn_implementation="flash_varlen" must then match the same weights under "sdpa" to float32
rounding, for padded (left and right), packed and unpadded batches, in the forward pass, the
gradients and generation with a KV cache; Mistral's sliding window, Gemma 2's soft-capping and
gpt-oss's attention sinks (against its eager attention) must match too. The fakes also record
each call, so the tests check which kernel ran with which boundaries and options.

Those model tests keep the float32 inputs (the reference computes in float32) by bypassing the
kernel-dtype rule, which its own tests check with a stand-in attention layer.

Tests that need transformers skip without it (pip install transformers); the tests of the
attention function alone and of importing without transformers do not.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import flash_varlen
from flash_varlen import reference
from flash_varlen.integrations import transformers as integration

VOCAB = 97
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # grouped-query attention: k and v keep 2 heads
NAME = integration.ATTENTION_NAME
REPO_ROOT = Path(flash_varlen.__file__).resolve().parents[1]
# float32 on both sides: only the summation order differs.
FLOAT32_TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}


# ----------------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelCall:
    """One call of a fake kernel. cu_seqlens and max_seqlen are None for the fixed-length one."""

    kind: str  # "varlen" or "fixed"
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    dtype: torch.dtype
    softmax_scale: float | None
    causal: bool
    dropout_p: float
    softcap: float
    window_size: tuple[int, int]
    learnable_sink: torch.Tensor | None
    cu_seqlens_q: list[int] | None = None
    cu_seqlens_k: list[int] | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None


class ReferenceKernels:
    """Stand-ins for flash_attn_varlen_func / flash_attn_func: check, record, run the reference.

    The reference draws no randomness, so dropout runs with a mask that keeps every entry
    (only the 1 / (1 - dropout_p) scale remains): the tests check that dropout_p arrives.
    """

    def __init__(self) -> None:
        self.calls: list[KernelCall] = []

    def kinds(self) -> set[str]:
        return {call.kind for call in self.calls}

    def varlen(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options
    ) -> torch.Tensor:
        assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape
        assert q.dtype == k.dtype == v.dtype
        for cu_seqlens, tokens, longest in (
            (cu_seqlens_q, q.shape[0], max_seqlen_q),
            (cu_seqlens_k, k.shape[0], max_seqlen_k),
        ):
            assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
            assert cu_seqlens.device == q.device and cu_seqlens.is_contiguous()
            bounds = cu_seqlens.tolist()
            assert bounds[0] == 0 and bounds[-1] == tokens
            lengths = [end - start for start, end in zip(bounds, bounds[1:])]
            assert min(lengths) >= 0
            # The kernels take max_seqlen as a positive Python int bound on every length.
            assert type(longest) is int and longest >= max(1, *lengths)
        call = self._record("varlen", q, k, options)
        call.cu_seqlens_q, call.cu_seqlens_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        call.max_seqlen_q, call.max_seqlen_k = max_seqlen_q, max_seqlen_k
        batch = cu_seqlens_q.shape[0] - 1
        out, _ = reference.attention_ref_varlen(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            call.softmax_scale,
            call.causal,
            **self._variants(call, (batch, q.shape[1], max_seqlen_q, max_seqlen_k)),
        )
        return out.to(q.dtype)

    def fixed(self, q, k, v, **options) -> torch.Tensor:
        assert q.dim() == 4 and k.dim() == 4 and v.shape == k.shape
        assert q.dtype == k.dtype == v.dtype
        call = self._record("fixed", q, k, options)
        out, _ = reference.attention_ref(
            q,
            k,
            v,
            call.softmax_scale,
            call.causal,
            **self._variants(call, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])),
        )
        return out.to(q.dtype)

    def _record(self, kind: str, q, k, options: dict) -> KernelCall:
        known = {"softmax_scale", "causal", "dropout_p", "softcap", "window_size", "learnable_sink"}
        assert options.keys() <= known, f"unexpected options {options.keys() - known}"
        sink = options.get("learnable_sink")
        if sink is not None:  # the kernels' rule: float32 (nheads,) on q's device
            assert sink.dtype == torch.float32 and sink.shape == (q.shape[-2],)
            assert sink.device == q.device
        call = KernelCall(
            kind,
            tuple(q.shape),
            tuple(k.shape),
            q.dtype,
            options.get("softmax_scale"),
            options.get("causal", False),
            options.get("dropout_p", 0.0),
            options.get("softcap", 0.0),
            tuple(options.get("window_size", reference.NO_WINDOW)),
            sink,
        )
        self.calls.append(call)
        return call

    @staticmethod
    def _variants(call: KernelCall, mask_shape: tuple[int, int, int, int]) -> dict:
        """The reference's variant arguments; a keep-everything mask stands in for dropout."""
        keep_all = torch.ones(mask_shape, dtype=torch.bool) if call.dropout_p > 0 else None
        return {
            "window_size": call.window_size,
            "softcap": call.softcap,
            "dropout_p": call.dropout_p,
            "dropout_mask": keep_all,
            "learnable_sink": call.learnable_sink,
        }


@pytest.fixture
def kernels(monkeypatch) -> ReferenceKernels:
    """The integration's kernel calls replaced by the recording float32 reference."""
    fakes = ReferenceKernels()
    monkeypatch.setattr(integration, "flash_attn_varlen_func", fakes.varlen)
    monkeypatch.setattr(integration, "flash_attn_func", fakes.fixed)
    return fakes


@pytest.fixture
def float32_kernels(kernels, monkeypatch) -> ReferenceKernels:
    """``kernels``, with float32 inputs passed through instead of cast to a half dtype."""
    monkeypatch.setattr(integration, "_kernel_dtype", lambda query, module: query.dtype)
    return kernels


# ----------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def hf():
    """The transformers package, registered with flash_varlen; skips the test without it."""
    transformers = pytest.importorskip("transformers")
    integration.register()
    return transformers


def tiny_llama_config(hf, **overrides):
    """A 2-layer Llama small enough for CPU (head dim 16, grouped-query attention)."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    return hf.LlamaConfig(**settings)


def model_pair(hf, config, reference_implementation: str = "sdpa"):
    """The same random weights built with "flash_varlen" and with the reference implementation.

    Each model gets its own copy of the config: from_config writes the implementation into it.
    """
    torch.manual_seed(0)
    ours = hf.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=NAME)
    ref = hf.AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=reference_implementation
    )
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def padding_mask_for(lengths: list[int], seqlen: int, side: str) -> torch.Tensor:
    """(batch, seqlen) int mask with lengths[b] ones, padded on ``side``."""
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, seqlen - length :] = 1
    return mask


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    """(len(rows), seqlen) positions restarting at 0 for each document of each row."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours, ref) -> None:
    ours_grads, ref_grads = gradients(ours), gradients(ref)
    assert ours_grads.keys() == ref_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **FLOAT32_TOLERANCE, msg=name)


def probe_loss(logits: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random linear function of the logits: every logit gets its own gradient."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * weights).sum()


# ----------------------------------------------------------------------------------------------
# Importing and registering
# ----------------------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` (indented is fine) in a fresh interpreter at the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_imports_without_transformers() -> None:
    """flash_varlen and its integrations import with transformers unavailable; register() says
    what is missing."""
    code = """
        import sys
        sys.modules["transformers"] = None  # makes `import transformers` raise ImportError
        import flash_varlen, flash_varlen.integrations
        import flash_varlen.integrations.transformers as integration
        try:
            integration.register()
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("register() did not raise")
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "pip install transformers" in result.stdout


def test_importing_registers_nothing_and_register_does(hf) -> None:
    """Importing the module leaves transformers as it was; register() makes the name usable."""
    code = f"""
        import pytest, transformers
        import flash_varlen.integrations.transformers as integration
        from transformers import AttentionInterface, AttentionMaskInterface

        assert {NAME!r} not in AttentionInterface()
        assert {NAME!r} not in AttentionMaskInterface()
        config = transformers.LlamaConfig(
            vocab_size=11, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )
        build = transformers.AutoModelForCausalLM.from_config
        with pytest.raises(ValueError):
            build(config, attn_implementation={NAME!r})
        integration.register()
        assert build(config, attn_implementation={NAME!r}).config._attn_implementation == {NAME!r}
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr + result.stdout


def test_register_fills_both_registries(hf) -> None:
    attention_functions = hf.AttentionInterface()
    mask_functions = hf.AttentionMaskInterface()
    assert attention_functions[NAME] is integration.attention_forward
    assert mask_functions[NAME] is integration.padding_mask
    assert NAME in attention_functions.valid_keys()


def test_register_is_idempotent(hf) -> None:
    before = dict(hf.AttentionInterface()), dict(hf.AttentionMaskInterface())
    integration.register()
    integration.register()
    assert (dict(hf.AttentionInterface()), dict(hf.AttentionMaskInterface())) == before
    model = hf.AutoModelForCausalLM.from_config(tiny_llama_config(hf), attn_implementation=NAME)
    assert model.config._attn_implementation == NAME


def test_from_config_builds_the_model(hf) -> None:
    model = hf.AutoModelForCausalLM.from_config(tiny_llama_config(hf), attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    assert len(model.model.layers) == 2


def test_register_again_after_another_flash_implementation_was_loaded(hf, monkeypatch) -> None:
    """transformers' flash-attention loader cache holds one name at a time: once another flash
    implementation replaced it, building fails until register() runs again (documented)."""
    from transformers import modeling_flash_attention_utils as loader

    monkeypatch.setattr(loader, "_loaded_implementation", "flash_attention_2")
    with pytest.raises(ValueError):
        hf.AutoModelForCausalLM.from_config(tiny_llama_config(hf), attn_implementation=NAME)
    integration.register()
    model = hf.AutoModelForCausalLM.from_config(tiny_llama_config(hf), attn_implementation=NAME)
    assert model.config._attn_implementation == NAME


# ----------------------------------------------------------------------------------------------
# Whole models against sdpa
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_sdpa(hf, float32_kernels, side: str) -> None:
    """Logits at real tokens and one training step's gradients equal sdpa's; the varlen kernel
    gets the real tokens only, with k/v keeping their KV_HEADS heads."""
    lengths, seqlen = [10, 6, 1], 10
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    ids = random_ids(len(lengths), seqlen)
    mask = padding_mask_for(lengths, seqlen, side)
    labels = ids.masked_fill(mask == 0, -100)
    real = mask.bool()

    outputs = {}
    for name, model in (("ours", ours), ("ref", ref)):
        model.train()
        result = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        (result.loss + probe_loss(result.logits * real[..., None])).backward()
        outputs[name] = result.logits.detach()

    torch.testing.assert_close(outputs["ours"][real], outputs["ref"][real], **FLOAT32_TOLERANCE)
    assert_same_gradients(ours, ref)

    calls = float32_kernels.calls
    assert float32_kernels.kinds() == {"varlen"} and len(calls) == 2  # one per layer
    for call in calls:
        assert call.cu_seqlens_q == call.cu_seqlens_k == [0, 10, 16, 17]
        assert call.max_seqlen_q == call.max_seqlen_k == 10
        assert call.q_shape == (17, HEADS, HEAD_DIM) and call.k_shape == (17, KV_HEADS, HEAD_DIM)
        assert call.causal and call.softmax_scale == pytest.approx(HEAD_DIM**-0.5)


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([[4, 9, 1, 6]], id="one-row"),  # DataCollatorWithFlattening's (1, total)
        pytest.param([[4, 4], [3, 5]], id="two-rows"),  # every row packed
    ],
)
def test_packed_batch_matches_each_document_alone(hf, float32_kernels, rows) -> None:
    """Packed documents (positions restarting at 0) give the logits and gradients of running
    each document by itself under sdpa."""
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    positions = packed_positions(rows)
    ids = random_ids(*positions.shape)

    logits = ours(ids, position_ids=positions).logits
    probe_loss(logits).backward()

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            tokens = slice(start, start + length)
            alone = ref(ids[row : row + 1, tokens]).logits[0]
            (alone * weights[row, tokens]).sum().backward()
            torch.testing.assert_close(logits[row, tokens], alone, **FLOAT32_TOLERANCE)
            start += length
    assert_same_gradients(ours, ref)

    expected_bounds = [0]
    for length in (n for row in rows for n in row):
        expected_bounds.append(expected_bounds[-1] + length)
    longest = max(n for row in rows for n in row)
    assert float32_kernels.kinds() == {"varlen"}
    for call in float32_kernels.calls:
        assert call.cu_seqlens_q == call.cu_seqlens_k == expected_bounds
        assert call.max_seqlen_q == call.max_seqlen_k == longest
        assert call.k_shape[1] == KV_HEADS


def test_packed_batch_matches_sdpa_on_the_same_input(hf, float32_kernels) -> None:
    """sdpa honours packing only without a cache (use_cache=False); flash_varlen always does."""
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    positions = packed_positions([[5, 3, 7]])
    ids = random_ids(*positions.shape)
    with torch.no_grad():
        ours_logits = ours(ids, position_ids=positions).logits
        ref_logits = ref(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(ours_logits, ref_logits, **FLOAT32_TOLERANCE)


def test_collator_kwargs_set_the_boundaries(hf, float32_kernels, monkeypatch) -> None:
    """DataCollatorWithFlattening's cu_seq_lens_q/k and max_length_q/k reach the kernel as they
    are, and the positions are then not read (no device synchronization)."""

    def position_ids_must_not_be_read(position_ids, **bounds):
        raise AssertionError("boundaries were read from position_ids despite cu_seq_lens")

    monkeypatch.setattr(integration, "cu_seqlens_from_position_ids", position_ids_must_not_be_read)
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    lengths = [3, 8, 5]
    documents = [random_ids(n, seed=10 + i).tolist() for i, n in enumerate(lengths)]
    collator = hf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": doc} for doc in documents])
    assert batch["max_length_q"] == 8 and batch["cu_seq_lens_q"].dtype == torch.int32

    with torch.no_grad():
        logits = ours(**batch).logits[0]
        start = 0
        for doc in documents:
            alone = ref(torch.tensor([doc])).logits[0]
            torch.testing.assert_close(
                logits[start : start + len(doc)], alone, **FLOAT32_TOLERANCE
            )
            start += len(doc)

    assert float32_kernels.kinds() == {"varlen"}
    for call in float32_kernels.calls:
        assert call.cu_seqlens_q == call.cu_seqlens_k == [0, 3, 11, 16]
        assert call.max_seqlen_q == call.max_seqlen_k == 8


@pytest.mark.parametrize("mask", ["none", "all-ones"])
def test_batch_without_padding_uses_the_fixed_length_kernel(hf, float32_kernels, mask) -> None:
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    ids = random_ids(2, 9)
    attention_mask = None if mask == "none" else torch.ones_like(ids)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=attention_mask).logits
        ref_logits = ref(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours_logits, ref_logits, **FLOAT32_TOLERANCE)
    assert float32_kernels.kinds() == {"fixed"}
    for call in float32_kernels.calls:
        assert call.q_shape == (2, 9, HEADS, HEAD_DIM)
        assert call.k_shape == (2, 9, KV_HEADS, HEAD_DIM)
        assert call.causal


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_generation_with_cache_matches_sdpa(hf, float32_kernels, padded: bool) -> None:
    """Greedy decoding with a KV cache: each step's single query attends to all earlier keys
    (bottom-right causal alignment), skipping left padding."""
    ours, ref = model_pair(hf, tiny_llama_config(hf))
    ids = random_ids(3, 7)
    mask = padding_mask_for([7, 4, 2], 7, "left") if padded else torch.ones_like(ids)
    settings = dict(
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        ours_out = ours.generate(ids, **settings)
        ref_out = ref.generate(ids, **settings)
    assert torch.equal(ours_out.sequences, ref_out.sequences)
    for ours_scores, ref_scores in zip(ours_out.scores, ref_out.scores, strict=True):
        torch.testing.assert_close(ours_scores, ref_scores, **FLOAT32_TOLERANCE)

    # Token counts: dim 0 of the packed layout, dim 1 of the (batch, seqlen, ...) one.
    token_dim = 0 if padded else 1
    decode_calls = [
        call
        for call in float32_kernels.calls
        if call.q_shape[token_dim] != call.k_shape[token_dim]
    ]
    assert decode_calls, "no decoding step with a cache reached the kernel"
    if padded:
        assert float32_kernels.kinds() == {"varlen"}
        for call in decode_calls:
            assert call.cu_seqlens_q == [0, 1, 2, 3] and call.max_seqlen_q == 1
    else:
        assert float32_kernels.kinds() == {"fixed"}
        for call in decode_calls:
            assert call.q_shape[1] == 1 and call.k_shape[1] > 1


# ----------------------------------------------------------------------------------------------
# Variants: attention dropout, sliding windows, soft-capping
# ----------------------------------------------------------------------------------------------


def test_attention_dropout_reaches_the_kernel_in_training_only(hf, float32_kernels) -> None:
    ours, _ = model_pair(hf, tiny_llama_config(hf, attention_dropout=0.1))
    ids = random_ids(1, 6)
    with torch.no_grad():
        ours(ids)  # eval: transformers passes dropout=0
    assert [call.dropout_p for call in float32_kernels.calls] == [0.0, 0.0]  # one per layer
    ours.train()
    ours(ids)
    assert [call.dropout_p for call in float32_kernels.calls[2:]] == [0.1, 0.1]


def mistral_config(hf, window: int):
    return hf.MistralConfig(**tiny_llama_config(hf).to_dict() | {"sliding_window": window})


@pytest.mark.parametrize("layout", ["unpadded", "padded", "packed"])
def test_sliding_window_matches_sdpa(hf, float32_kernels, layout: str) -> None:
    """Mistral's window of 4 on sequences longer than it: the logits at real tokens equal
    sdpa's, and every kernel call gets transformers' flash-attention mapping (3, 3), causal."""
    ours, ref = model_pair(hf, mistral_config(hf, window=4))
    if layout == "packed":
        positions = packed_positions([[7, 5]])
        ids = random_ids(*positions.shape)
        inputs = {"input_ids": ids, "position_ids": positions}
        real = torch.ones(ids.shape, dtype=torch.bool)
    else:
        ids = random_ids(2, 9)
        mask = padding_mask_for([9, 6] if layout == "padded" else [9, 9], 9, "right")
        inputs = {"input_ids": ids, "attention_mask": mask}
        real = mask.bool()
    with torch.no_grad():
        ours_logits = ours(**inputs).logits
        ref_logits = ref(**inputs, use_cache=False).logits
    torch.testing.assert_close(ours_logits[real], ref_logits[real], **FLOAT32_TOLERANCE)
    expected_kind = "fixed" if layout == "unpadded" else "varlen"
    assert float32_kernels.kinds() == {expected_kind} and len(float32_kernels.calls) == 2
    for call in float32_kernels.calls:
        assert call.window_size == (3, 3) and call.causal


def test_sliding_window_is_not_passed_when_the_keys_fit_in_it(hf, float32_kernels) -> None:
    """As in transformers' flash-attention: a window of w with at most w keys hides nothing."""
    ours, ref = model_pair(hf, mistral_config(hf, window=6))
    short = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(short).logits, ref(short).logits, **FLOAT32_TOLERANCE)
    assert {call.window_size for call in float32_kernels.calls} == {(-1, -1)}


def gemma2_config(hf, softcap: float | None):
    """A tiny Gemma 2: alternating sliding-window (3) and full layers, soft-capped scores. The
    unit query_pre_attn_scalar (softmax scale 1) and large initial weights give scores large
    enough for the cap to matter."""
    return hf.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=1,
        initializer_range=0.5,
        attn_logit_softcapping=softcap,
        sliding_window=3,
    )


def test_softcapping_and_sliding_window_match_eager(hf, float32_kernels) -> None:
    ours, ref = model_pair(hf, gemma2_config(hf, softcap=0.5), reference_implementation="eager")
    uncapped, _ = model_pair(hf, gemma2_config(hf, softcap=None), reference_implementation="eager")
    ids = random_ids(2, 7)
    with torch.no_grad():
        ours_logits = ours(ids).logits
        ref_logits = ref(ids).logits
        uncapped_logits = uncapped(ids).logits
    torch.testing.assert_close(ours_logits, ref_logits, **FLOAT32_TOLERANCE)
    # The cap changes the result, so the comparison above could fail without it.
    assert not torch.allclose(ours_logits, uncapped_logits, **FLOAT32_TOLERANCE)
    sliding, full, *uncapped_calls = float32_kernels.calls
    assert sliding.window_size == (2, 2) and full.window_size == (-1, -1)
    assert sliding.softcap == full.softcap == 0.5
    assert {call.softcap for call in uncapped_calls} == {0.0}


# ----------------------------------------------------------------------------------------------
# Attention sinks: gpt-oss against its eager attention
# ----------------------------------------------------------------------------------------------

GPT_OSS_WINDOW = 3
SINK_SCALE = 2.0
"""Standard deviation of the sinks set in the tests: gpt-oss initializes them near 0 (std 0.02),
where a sink of the wrong head or sign would go unnoticed."""


def gpt_oss_config(hf):
    """A tiny gpt-oss: a sliding-window (3) layer then a full one, each with per-head sinks.
    Every token uses all four experts, so that routing has no top-k decision that float32
    rounding could flip."""
    return hf.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=4,
        num_experts_per_tok=4,
        sliding_window=GPT_OSS_WINDOW,
    )


def gpt_oss_pair(hf):
    """gpt-oss with flash_varlen and with eager attention, the same weights and random sinks.

    gpt-oss lists the flash kernels it accepts and swaps any other "flash" name for the first
    of them when built, so ours is built with eager and switched afterwards (the recipe of the
    integration's docstring).
    """
    torch.manual_seed(0)
    config = gpt_oss_config(hf)
    ours = hf.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours.config._attn_implementation = NAME
    ref = hf.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.self_attn.sinks.normal_(std=SINK_SCALE)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def gpt_oss_sinks(model) -> list[torch.Tensor]:
    return [layer.self_attn.sinks for layer in model.model.layers]


def assert_gpt_oss_calls(calls: list[KernelCall], model) -> None:
    """One call per layer: the sliding one with transformers' window mapping, both causal and
    with their own layer's sinks (as float32)."""
    sliding, full = calls
    assert sliding.window_size == (GPT_OSS_WINDOW - 1, GPT_OSS_WINDOW - 1) and sliding.causal
    assert full.window_size == (-1, -1) and full.causal
    for call, sinks in zip(calls, gpt_oss_sinks(model), strict=True):
        assert torch.equal(call.learnable_sink, sinks.detach())


@pytest.mark.parametrize("layout", ["unpadded", "padded-right", "padded-left"])
def test_gpt_oss_sinks_match_eager(hf, float32_kernels, layout: str) -> None:
    """Logits at real tokens and one training step's gradients (the sinks' included) equal
    gpt-oss's eager attention, on sequences longer than the window and a one-token one (left
    padding: rows that see the sink and one key)."""
    ours, ref = gpt_oss_pair(hf)
    lengths = [9, 9] if layout == "unpadded" else [9, 6, 1]
    ids = random_ids(len(lengths), 9)
    mask = padding_mask_for(lengths, 9, layout.removeprefix("padded-"))
    real = mask.bool()
    logits = {}
    for name, model in (("ours", ours), ("ref", ref)):
        model.train()
        result = model(ids, attention_mask=mask, use_cache=False)
        probe_loss(result.logits * real[..., None]).backward()
        logits[name] = result.logits.detach()

    torch.testing.assert_close(logits["ours"][real], logits["ref"][real], **FLOAT32_TOLERANCE)
    assert_same_gradients(ours, ref)
    assert all(sinks.grad.abs().min() > 0 for sinks in gpt_oss_sinks(ours))
    assert_gpt_oss_calls(float32_kernels.calls, ours)


def test_gpt_oss_packed_documents_match_each_document_alone(hf, float32_kernels) -> None:
    """Packed documents (positions restarting at 0) give the logits and gradients of running
    each document by itself under eager attention (which, unlike flash_varlen, does not read
    document boundaries from gpt-oss's position_ids)."""
    ours, ref = gpt_oss_pair(hf)
    lengths = [7, 1, 5]
    positions = packed_positions([lengths])
    ids = random_ids(*positions.shape)
    logits = ours(ids, position_ids=positions).logits
    probe_loss(logits).backward()

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    start = 0
    for length in lengths:
        tokens = slice(start, start + length)
        alone = ref(ids[:, tokens]).logits
        (alone * weights[:, tokens]).sum().backward()
        torch.testing.assert_close(logits[:, tokens], alone, **FLOAT32_TOLERANCE)
        start += length
    assert_same_gradients(ours, ref)
    assert_gpt_oss_calls(float32_kernels.calls, ours)
    assert {tuple(call.cu_seqlens_q) for call in float32_kernels.calls} == {(0, 7, 8, 13)}


def test_gpt_oss_generation_with_cache_matches_eager(hf, float32_kernels) -> None:
    """Greedy decoding with a KV cache and left padding: each new query sees the sink and the
    keys its layer's window allows."""
    ours, ref = gpt_oss_pair(hf)
    ids = random_ids(2, 6)
    settings = {
        "attention_mask": padding_mask_for([6, 2], 6, "left"),
        "max_new_tokens": 4,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        ours_out = ours.generate(ids, **settings)
        ref_out = ref.generate(ids, **settings)
    assert torch.equal(ours_out.sequences, ref_out.sequences)
    for ours_scores, ref_scores in zip(ours_out.scores, ref_out.scores, strict=True):
        torch.testing.assert_close(ours_scores, ref_scores, **FLOAT32_TOLERANCE)
    assert all(call.learnable_sink is not None for call in float32_kernels.calls)


# ----------------------------------------------------------------------------------------------
# The attention function alone (no transformers needed)
# ----------------------------------------------------------------------------------------------


class StandInLayer(torch.nn.Module):
    """What attention_forward reads from a transformers attention layer: is_causal, config and
    the Linear weights (their dtype)."""

    def __init__(
        self, weight_dtype: torch.dtype = torch.bfloat16, quantized_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.is_causal = True
        self.proj = torch.nn.Linear(HEAD_DIM, HEAD_DIM, dtype=weight_dtype)
        self.config = types.SimpleNamespace()
        if quantized_dtype is not None:
            self.config._is_quantized = True
            self.config.dtype = quantized_dtype


def layer_inputs(
    batch: int = 2, seqlen: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers-layout query (batch, HEADS, seqlen, d) and key/value (batch, KV_HEADS, ...)."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(batch, HEADS, seqlen, HEAD_DIM, generator=generator).to(dtype)
    k = torch.randn(batch, KV_HEADS, seqlen, HEAD_DIM, generator=generator).to(dtype)
    v = torch.randn(batch, KV_HEADS, seqlen, HEAD_DIM, generator=generator).to(dtype)
    return q, k, v


def test_output_layout_scale_and_causal_flag(kernels) -> None:
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    out, weights = integration.attention_forward(StandInLayer(), q, k, v, None, scaling=0.3)
    assert weights is None
    assert out.shape == (2, 8, HEADS, HEAD_DIM)  # (batch, seq, heads, dim)
    expected, _ = reference.attention_ref(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3, causal=True
    )
    torch.testing.assert_close(out, expected.to(out.dtype))
    assert kernels.calls[-1].softmax_scale == 0.3 and kernels.calls[-1].causal

    integration.attention_forward(StandInLayer(), q, k, v, None, is_causal=False)
    assert not kernels.calls[-1].causal  # the keyword overrides module.is_causal


@pytest.mark.parametrize(
    ("layer", "autocast", "expected"),
    [
        pytest.param(StandInLayer(torch.bfloat16), False, torch.bfloat16, id="linear-bf16"),
        pytest.param(StandInLayer(torch.float16), False, torch.float16, id="linear-fp16"),
        pytest.param(StandInLayer(torch.float32), True, torch.bfloat16, id="autocast"),
        pytest.param(
            StandInLayer(torch.float32, quantized_dtype=torch.float16),
            False,
            torch.float16,
            id="quantized",
        ),
    ],
)
def test_float32_inputs_are_cast_like_transformers_flash_attention(
    kernels, layer, autocast: bool, expected: torch.dtype
) -> None:
    q, k, v = layer_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = integration.attention_forward(layer, q, k, v, None)
    assert kernels.calls[-1].dtype == expected and out.dtype == expected


def test_half_inputs_keep_their_dtype(kernels) -> None:
    q, k, v = layer_inputs(dtype=torch.float16)
    out, _ = integration.attention_forward(StandInLayer(torch.bfloat16), q, k, v, None)
    assert kernels.calls[-1].dtype == torch.float16 and out.dtype == torch.float16


def test_float32_model_raises(kernels) -> None:
    q, k, v = layer_inputs()
    with pytest.raises(TypeError, match="dtype=torch.bfloat16.*autocast"):
        integration.attention_forward(StandInLayer(torch.float32), q, k, v, None)
    assert not kernels.calls


@pytest.mark.parametrize("mask", [None, "padded"])
def test_attention_sinks_reach_the_kernel_in_float32(kernels, mask) -> None:
    """s_aux (gpt-oss's bfloat16 sinks parameter) arrives as a float32 learnable_sink with the
    same values; the output is the reference's with that sink, and the parameter receives the
    reference's gradient through the cast."""
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    attention_mask = None if mask is None else padding_mask_for([8, 5], 8, "right").bool()
    generator = torch.Generator().manual_seed(4)
    sinks = torch.nn.Parameter(torch.randn(HEADS, generator=generator).to(torch.bfloat16))
    out, _ = integration.attention_forward(StandInLayer(), q, k, v, attention_mask, s_aux=sinks)
    (call,) = kernels.calls
    assert call.kind == ("fixed" if mask is None else "varlen")
    assert call.learnable_sink.dtype == torch.float32
    assert torch.equal(call.learnable_sink, sinks.detach().float())
    upstream = torch.randn(out.shape, generator=generator).to(out.dtype)
    (out.float() * upstream).sum().backward()

    reference_sinks = sinks.detach().float().requires_grad_()
    expected, _ = reference.attention_ref(
        *(x.transpose(1, 2) for x in (q, k, v)), causal=True, learnable_sink=reference_sinks
    )
    if mask is not None:  # padded query rows are 0 and have no gradient
        expected = expected * attention_mask[..., None, None]
    (expected.to(out.dtype).float() * upstream).sum().backward()
    torch.testing.assert_close(out, expected.to(out.dtype))
    assert sinks.grad.dtype == torch.bfloat16
    torch.testing.assert_close(sinks.grad, reference_sinks.grad.to(torch.bfloat16))


def test_without_sinks_the_kernel_gets_none(kernels) -> None:
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    integration.attention_forward(StandInLayer(), q, k, v, None)
    assert kernels.calls[-1].learnable_sink is None


@pytest.mark.parametrize(
    ("sliding_window", "key_length", "window_size"),
    [
        (None, 8, (-1, -1)),
        (8, 8, (-1, -1)),  # the keys fit in the window
        (4, 8, (3, 3)),  # itself and 3 keys on each side; causal then drops the right side
        (1, 2, (0, 0)),
    ],
)
def test_window_size_maps_sliding_window_like_transformers(
    sliding_window, key_length, window_size
) -> None:
    assert integration._window_size(sliding_window, key_length) == window_size


@pytest.mark.parametrize("mask", [None, "padded"])
def test_variant_options_reach_the_kernel(kernels, mask) -> None:
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    attention_mask = None if mask is None else padding_mask_for([8, 5], 8, "right").bool()
    out, _ = integration.attention_forward(
        StandInLayer(), q, k, v, attention_mask, dropout=0.1, softcap=0.5, sliding_window=3
    )
    (call,) = kernels.calls
    assert call.kind == ("fixed" if mask is None else "varlen")
    assert (call.dropout_p, call.softcap, call.window_size, call.causal) == (0.1, 0.5, (2, 2), True)
    assert out.shape == (2, 8, HEADS, HEAD_DIM)


def test_soft_capped_sliding_window_output(kernels) -> None:
    """The output is the reference's with the mapped window and the cap, which differs from
    the plain one."""
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    layer = StandInLayer()
    out, _ = integration.attention_forward(layer, q, k, v, None, softcap=0.5, sliding_window=3)
    plain, _ = integration.attention_forward(layer, q, k, v, None)
    expected, _ = reference.attention_ref(
        *(x.transpose(1, 2) for x in (q, k, v)), causal=True, window_size=(2, 0), softcap=0.5
    )
    torch.testing.assert_close(out, expected.to(out.dtype))
    assert not torch.equal(out, plain)


def test_neutral_variant_values_change_nothing(kernels) -> None:
    """dropout 0, softcap None/0 and a window no shorter than the keys reach the kernel as its
    defaults."""
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    layer = StandInLayer()
    plain, _ = integration.attention_forward(layer, q, k, v, None)
    for softcap in (None, 0.0):
        neutral, _ = integration.attention_forward(
            layer, q, k, v, None, dropout=0.0, softcap=softcap, sliding_window=8
        )
        assert torch.equal(plain, neutral)
    assert {(c.dropout_p, c.softcap, c.window_size) for c in kernels.calls} == {
        (0.0, 0.0, (-1, -1))
    }


def test_four_dimensional_mask_raises(kernels) -> None:
    q, k, v = layer_inputs(dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="2-D"):
        integration.attention_forward(StandInLayer(), q, k, v, mask)


def test_one_cu_seq_lens_without_the_other_raises(kernels) -> None:
    q, k, v = layer_inputs(batch=1, dtype=torch.bfloat16)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        integration.attention_forward(StandInLayer(), q, k, v, None, cu_seq_lens_q=cu_seqlens)


def test_static_cache_slots_past_the_mask_are_ignored(kernels) -> None:
    """With a static cache the keys have more slots than the mask has columns; the unused ones
    (here filled with huge values) must not be attended to."""
    q, k, v = layer_inputs(batch=2, seqlen=4, dtype=torch.bfloat16)
    slots = 7
    k_cache = torch.full((2, KV_HEADS, slots, HEAD_DIM), 1e4, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, 1e4)
    k_cache[:, :, :4], v_cache[:, :, :4] = k, v
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)

    out, _ = integration.attention_forward(StandInLayer(), q, k_cache, v_cache, mask)
    full, _ = integration.attention_forward(StandInLayer(), q, k, v, mask)
    assert torch.equal(out, full)
    assert kernels.calls[0].cu_seqlens_k == [0, 4, 7]
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))  # padded query position


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_padding_mask_returns_none_without_padding() -> None:
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert integration.padding_mask(kv_length=5, attention_mask=None) is None
    assert integration.padding_mask(kv_length=5, attention_mask=mask) is None


def test_padding_mask_keeps_the_last_kv_length_columns() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(integration.padding_mask(kv_length=6, attention_mask=mask), mask)
    assert torch.equal(integration.padding_mask(kv_length=5, attention_mask=mask), mask[:, 1:])
    # The last 4 columns hold no padding.
    assert integration.padding_mask(kv_length=4, attention_mask=mask) is None


def test_padding_mask_shorter_than_the_keys_is_kept() -> None:
    """A static cache has more key slots than the mask: the mask is needed even without padding,
    to tell the layers which slots hold keys."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(integration.padding_mask(kv_length=8, attention_mask=mask), mask)


@pytest.mark.parametrize(
    ("position_ids", "batch", "expected"),
    [
        ([[0, 1, 2, 0, 1, 0]], 1, [0, 3, 5, 6]),
        ([[3, 4, 0, 1]], 1, [0, 2, 4]),  # a row starts a sequence whatever its first position
        ([[0, 1, 2, 3], [0, 1, 0, 1]], 2, [0, 4, 6, 8]),  # rows are read one after the other
        ([[0, 1, 0, 1]], 2, [0, 2, 4, 6, 8]),  # one row of positions for the whole batch
        ([[0, 0, 0]], 1, [0, 1, 2, 3]),  # one-token documents
    ],
)
def test_packed_boundaries_from_position_ids(kernels, position_ids, batch, expected) -> None:
    """flash_varlen.padding.cu_seqlens_from_position_ids's rule, over batch * seqlen tokens."""
    seqlen = len(position_ids[0])
    q, k, v = layer_inputs(batch=batch, seqlen=seqlen, dtype=torch.bfloat16)
    positions = torch.tensor(position_ids)
    integration.attention_forward(StandInLayer(), q, k, v, None, position_ids=positions)
    (call,) = kernels.calls
    lengths = [end - start for start, end in zip(expected, expected[1:])]
    assert call.kind == "varlen" and call.cu_seqlens_q == call.cu_seqlens_k == expected
    assert call.max_seqlen_q == call.max_seqlen_k == max(lengths)


def test_one_sequence_per_row_uses_the_fixed_length_kernel(kernels) -> None:
    q, k, v = layer_inputs(batch=2, seqlen=5, dtype=torch.bfloat16)
    positions = torch.arange(5)[None]
    integration.attention_forward(StandInLayer(), q, k, v, None, position_ids=positions)
    assert kernels.kinds() == {"fixed"}
