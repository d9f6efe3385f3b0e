"""GPU tests of the transformers integration: a small random Llama in bfloat16 against sdpa.

The same seeded weights run three ways: attn_implementation="flash_varlen" in bfloat16 (the
tested run), "sdpa" in bfloat16 (the error PyTorch's own attention makes in that dtype) and
"sdpa" in float32 (the truth; its weights are the bfloat16 ones, widened, so that it measures
the computation, not the rounding of the weights). The tolerance rule of tests/accuracy.py
applies to the whole model: flash_varlen's max error against the float32 run may be at most
FORWARD_FACTOR (logits) or GRADIENT_FACTOR (each parameter's gradient) times bfloat16 sdpa's,
plus half an ulp of the largest reference value.

Batches: a padded batch (right and left padding; logits at real tokens and one training step's
gradients), and the same documents padding-free, packed into one (1, total) row by transformers'
DataCollatorWithFlattening, against sdpa on the padded batch with every position mapped back.

Runs only where CUDA is available and transformers is installed; elsewhere it is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from accuracy import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_tolerance, require_kernel
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


@pytest.fixture(scope="module")
def models():
    """{"ours", "sdpa_bf16", "sdpa_fp32"}: one set of seeded weights, three ways."""
    require_kernel(DTYPE, HEAD_DIM)
    integration.register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(
        llama_config(), attn_implementation=integration.ATTENTION_NAME
    )
    sdpa = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    ours = ours.to(DEVICE, DTYPE)
    sdpa_bf16 = copy.deepcopy(sdpa).to(DEVICE, DTYPE)
    # The float32 truth gets the bfloat16 weights, widened.
    sdpa_fp32 = sdpa.to(DEVICE, DTYPE).to(torch.float32)
    return {"ours": ours, "sdpa_bf16": sdpa_bf16, "sdpa_fp32": sdpa_fp32}


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
    """The tolerance rule on logits and on every parameter's gradient.

    logits: {"ours", "sdpa_bf16", "sdpa_fp32"} -> (tokens, vocab) at the compared tokens;
    grads: the same keys -> {parameter name: gradient}.
    """
    assert_within_tolerance(
        logits["ours"],
        logits["sdpa_fp32"],
        logits["sdpa_bf16"],
        FORWARD_FACTOR,
        f"{name} logits",
    )
    assert grads["ours"].keys() == grads["sdpa_fp32"].keys()
    for parameter, grad in grads["ours"].items():
        assert_within_tolerance(
            grad,
            grads["sdpa_fp32"][parameter],
            grads["sdpa_bf16"][parameter],
            GRADIENT_FACTOR,
            f"{name} grad {parameter}",
        )


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_sdpa(models, side: str) -> None:
    batch = padded_batch(side)
    real = batch["attention_mask"].bool()
    logits, grads = {}, {}
    for key, model in models.items():
        all_logits, grads[key] = run(model, batch)
        logits[key] = all_logits[real]
    assert_model_within_tolerance(logits, grads, f"padded ({side})")


@pytest.mark.parametrize(
    "collator_kwargs", [False, True], ids=["position-ids", "position-ids+cu-seq-lens"]
)
def test_packed_batch_matches_sdpa_on_the_padded_batch(models, collator_kwargs: bool) -> None:
    """DataCollatorWithFlattening's (1, total) batch, whose labels skip each document's first
    token, gives the padded batch's loss terms; its logits are mapped back to padded positions."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=collator_kwargs)
    packed = collator([{"input_ids": doc} for doc in documents()])
    packed = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for name, value in packed.items()
    }
    assert packed["input_ids"].shape == (1, sum(DOCUMENT_LENGTHS))
    packed_logits, packed_grads = run(models["ours"], packed)

    padded = padded_batch("right")
    real = padded["attention_mask"].bool()
    logits = {"ours": packed_logits[0]}  # row-major padded[real] is the packed order
    grads = {"ours": packed_grads}
    for key in ("sdpa_bf16", "sdpa_fp32"):
        all_logits, grads[key] = run(models[key], padded)
        logits[key] = all_logits[real]
    assert_model_within_tolerance(logits, grads, "packed")
