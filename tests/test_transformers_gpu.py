"""GPU tests of the transformers integration: small random models in bfloat16 against
transformers' own attention.

The same seeded weights run three ways: attn_implementation="flash_varlen" in bfloat16 (the
tested run), the reference implementation in bfloat16 (the error transformers' own attention
makes in that dtype) and the reference in float32 (the truth; its weights are the bfloat16
ones, widened, so that it measures the computation, not the rounding of the weights). The
tolerance rule of tests/accuracy.py applies to the whole model: flash_varlen's max error
against the float32 run may be at most FORWARD_FACTOR (logits) or GRADIENT_FACTOR (each
parameter's gradient) times the bfloat16 reference's, plus half an ulp of the largest reference
value.

Models: a Llama against "sdpa", and a gpt-oss (attention sinks, a sliding-window layer and a
full one, mixture-of-experts MLPs) against "eager", gpt-oss's only reference implementation with
sinks. Its experts run the eager loop (no grouped GEMM, whose float32 support varies), and
every token uses all of them: with top-k routing a token whose router scores nearly tie could
pick different experts in float32 and bfloat16, a jump no attention error explains.

Batches: a padded batch (right and left padding; logits at real tokens and one training step's
gradients), and the same documents padding-free, packed into one (1, total) row by transformers'
DataCollatorWithFlattening, against the reference on the padded batch with every position
mapped back.

Runs only where CUDA is available and transformers is installed; elsewhere it is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from accuracy import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_within_tolerance,
    require_backward_kernel,
)
from flash_varlen.integrations import transformers as integration

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPE = torch.bfloat16
VOCAB = 1000
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
# Lengths of the documents: long and short, one of a single token, none a tile multiple.
DOCUMENT_LENGTHS = (300, 17, 128, 1, 77, 211)
IGNORE = -100  # transformers' label for "no loss here"
GPT_OSS_EXPERTS = 4
GPT_OSS_WINDOW = 64
"""Shorter than most documents, so that the sliding layer's window hides keys."""
SINK_STD = 2.0
"""The sinks are set to N(0, 2^2): gpt-oss initializes them near 0 (std 0.02), where a sink
passed to the wrong head would hardly change the result."""


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
    )


def gpt_oss_config():
    return transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=2,  # layer_types: a sliding-window layer, then a full one
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=GPT_OSS_EXPERTS,
        num_experts_per_tok=GPT_OSS_EXPERTS,
        sliding_window=GPT_OSS_WINDOW,
    )


def three_ways(ours, reference) -> dict:
    """{"ours", "ref_bf16", "ref_fp32"} on the GPU: ours and the reference (which receives
    ours' weights) in bfloat16, and the reference in float32 with the bfloat16 weights
    widened."""
    reference.load_state_dict(ours.state_dict())
    ref_bf16 = copy.deepcopy(reference).to(DEVICE, DTYPE)
    ref_fp32 = reference.to(DEVICE, DTYPE).to(torch.float32)
    return {"ours": ours.to(DEVICE, DTYPE), "ref_bf16": ref_bf16, "ref_fp32": ref_fp32}


@pytest.fixture(scope="module")
def models():
    """A Llama against sdpa: one set of seeded weights, three ways (see three_ways)."""
    require_backward_kernel(DTYPE, HEAD_DIM)
    integration.register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(
        llama_config(), attn_implementation=integration.ATTENTION_NAME
    )
    sdpa = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa")
    return three_ways(ours, sdpa)


@pytest.fixture(scope="module")
def gpt_oss_models():
    """A gpt-oss against eager attention, three ways (see three_ways), with random sinks.

    gpt-oss swaps any attn_implementation containing "flash" for the flash kernel it lists
    first when it is built, so ours is built with eager and switched afterwards (the recipe of
    the integration's docstring).
    """
    require_backward_kernel(DTYPE, HEAD_DIM)
    integration.register()
    torch.manual_seed(0)
    build = transformers.AutoModelForCausalLM.from_config
    ours = build(gpt_oss_config(), attn_implementation="eager", experts_implementation="eager")
    ours.config._attn_implementation = integration.ATTENTION_NAME
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.self_attn.sinks.normal_(std=SINK_STD)
    eager = build(gpt_oss_config(), attn_implementation="eager", experts_implementation="eager")
    return three_ways(ours, eager)


@pytest.fixture(params=["llama", "gpt-oss"])
def any_models(request):
    """Each model family's three runs in turn."""
    return request.getfixturevalue("models" if request.param == "llama" else "gpt_oss_models")


def documents() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in DOCUMENT_LENGTHS]


def padded_batch(side: str) -> dict[str, torch.Tensor]:
    """The documents as a (batch, longest) batch padded on ``side``, with causal-LM labels."""
    docs = documents()
    seqlen = max(DOCUMENT_LENGTHS)
    input_ids = torch.zeros(len(docs), seqlen, dtype=torch.long)
    attention_mask = torch.zeros(len(docs), seqlen, dtype=torch.long)
    for row, doc in enumerate(docs):
        columns = slice(0, len(doc)) if side == "right" else slice(seqlen - len(doc), seqlen)
        input_ids[row, columns] = torch.tensor(doc)
        attention_mask[row, columns] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(DEVICE) for name, tensor in batch.items()}


def run(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's forward and backward: (logits, {parameter name: gradient})."""
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**batch, use_cache=False)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return output.logits.detach(), grads


def assert_model_within_tolerance(
    logits: dict[str, torch.Tensor], grads: dict[str, dict[str, torch.Tensor]], name: str
) -> None:
    """The tolerance rule on logits and on every parameter's gradient (gpt-oss's sinks too).

    logits: {"ours", "ref_bf16", "ref_fp32"} -> (tokens, vocab) at the compared tokens;
    grads: the same keys -> {parameter name: gradient}.
    """
    assert_within_tolerance(
        logits["ours"],
        logits["ref_fp32"],
        logits["ref_bf16"],
        FORWARD_FACTOR,
        f"{name} logits",
    )
    assert grads["ours"].keys() == grads["ref_fp32"].keys()
    for parameter, grad in grads["ours"].items():
        assert_within_tolerance(
            grad,
            grads["ref_fp32"][parameter],
            grads["ref_bf16"][parameter],
            GRADIENT_FACTOR,
            f"{name} grad {parameter}",
        )


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_the_reference(any_models, side: str) -> None:
    batch = padded_batch(side)
    real = batch["attention_mask"].bool()
    logits, grads = {}, {}
    for key, model in any_models.items():
        all_logits, grads[key] = run(model, batch)
        logits[key] = all_logits[real]
    assert_model_within_tolerance(logits, grads, f"padded ({side})")


@pytest.mark.parametrize(
    "collator_kwargs", [False, True], ids=["position-ids", "position-ids+cu-seq-lens"]
)
def test_packed_batch_matches_the_reference_on_the_padded_batch(
    any_models, collator_kwargs: bool
) -> None:
    """DataCollatorWithFlattening's (1, total) batch, whose labels skip each document's first
    token, gives the padded batch's loss terms; its logits are mapped back to padded positions.
    (gpt-oss's eager attention does not read document boundaries from position_ids, so the
    reference always runs on the padded batch.)"""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=collator_kwargs)
    packed = collator([{"input_ids": doc} for doc in documents()])
    packed = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for name, value in packed.items()
    }
    assert packed["input_ids"].shape == (1, sum(DOCUMENT_LENGTHS))
    packed_logits, packed_grads = run(any_models["ours"], packed)

    padded = padded_batch("right")
    real = padded["attention_mask"].bool()
    logits = {"ours": packed_logits[0]}  # row-major padded[real] is the packed order
    grads = {"ours": packed_grads}
    for key in ("ref_bf16", "ref_fp32"):
        all_logits, grads[key] = run(any_models[key], padded)
        logits[key] = all_logits[real]
    assert_model_within_tolerance(logits, grads, "packed")
