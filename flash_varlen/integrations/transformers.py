"""Hugging Face transformers integration: the attention implementation ``"flash_varlen"``.

Usage::

    import flash_varlen.integrations.transformers as flash_varlen_hf

    flash_varlen_hf.register()
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.bfloat16, attn_implementation="flash_varlen"
    )

``register()`` adds ``"flash_varlen"`` to transformers' two public registries:
``AttentionInterface`` (``attention_forward``, called by every attention layer) and
``AttentionMaskInterface`` (``padding_mask``, which builds the mask the layers receive, once per
forward). Importing this module registers nothing and does not import transformers.

The batches ``attention_forward`` handles, in the order it checks them:

1. Padded: a (batch, seqlen) ``attention_mask`` with padding on the left or the right. The real
   tokens are packed with the mask, attended with ``flash_attn_varlen_func`` and scattered back;
   outputs at padding positions are 0.
2. Padding-free (packed): documents back to back in a row, e.g. input_ids (1, total) from
   ``DataCollatorWithFlattening``. The document boundaries are the collator's ``cu_seq_lens_q/k``
   (and ``max_length_q/k``) when given; otherwise a document starts wherever ``position_ids``
   restart at 0, and at the start of every row (so a (batch, seqlen) batch may pack each row).
3. Anything else: ``flash_attn_func`` on the (batch, seqlen) tensors, one sequence per row.

Causal attention is aligned to the bottom-right corner, which is what a KV cache needs (the
queries are the last tokens of their sequence). Attention dropout (the config's
``attention_dropout``, which transformers passes in training mode only), logit soft-capping
(Gemma 2) and sliding windows (Mistral, Gemma 2) reach the kernels as transformers' own
flash-attention integration passes them to flash-attn. Attention sinks (gpt-oss's ``sinks``
parameter, passed as ``s_aux``) reach them as ``learnable_sink``, in float32 and differentiable,
with the semantics of gpt-oss's eager attention: one more logit per head in every row's softmax,
unscaled, outside any window or mask, whose probability is dropped before dropout and the
product with the values. A row that sees no key then gets output 0, as in eager attention.

Models that name the flash kernels they accept (``_compatible_flash_implementations``, e.g.
gpt-oss in transformers 5.17) replace any other implementation whose name contains "flash",
this one included, by their first choice when they are built. Build such a model with
``attn_implementation="eager"`` and then set ``model.config._attn_implementation =
"flash_varlen"``: the layers and mask builders read the name at every forward.

Host synchronizations (device reads), since they stall the CPU until the GPU catches up: each
mask transformers builds per forward is checked once for padding. Per layer, a padded batch
costs two (``unpad_input`` reads the token count and the longest row; four while decoding with
a cache), a batch without a mask but with ``position_ids`` one (finding the boundaries) plus one
when it is packed (the longest document). The collator's kwargs with ``max_length_q/k`` as Python
ints cost none.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from flash_varlen.interface import flash_attn_func, flash_attn_varlen_func
from flash_varlen.padding import cu_seqlens_from_position_ids, pad_input, unpad_input
from flash_varlen.reference import NO_WINDOW

ATTENTION_NAME = "flash_varlen"
"""The ``attn_implementation`` name that ``register()`` adds."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
CU_SEQLENS_DTYPE = torch.int32

# transformers' module-level cache of loaded flash-attention functions (private, as of 5.17);
# see _mark_loaded_in_transformers.
_LOADER_ATTRIBUTES = (
    "_loaded_implementation",
    "_flash_fn",
    "_flash_varlen_fn",
    "_flash_with_kvcache_fn",
    "_pad_fn",
    "_unpad_fn",
    "_process_flash_kwargs_fn",
    "_lazy_define_process_function",
)


class _Packed(NamedTuple):
    """A batch in the packed layout; the fields follow flash_attn_varlen_func's arguments.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q/k: (num_seqs + 1,)
    int32 on q's device; max_seqlen_q/k: positive Python ints.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def register() -> None:
    """Makes ``attn_implementation="flash_varlen"`` available to transformers models.

    Idempotent: the registries map the name to the same two functions however often it runs.
    After a model with another flash-attention implementation (e.g. "flash_attention_2") was
    built or run in the same process, call it again before building the next "flash_varlen"
    model (see ``_mark_loaded_in_transformers``); models already built keep working.

    Raises:
        ImportError: transformers is not installed.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "flash_varlen.integrations.transformers.register() needs the transformers package "
            "(pip install transformers)."
        ) from error
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    # Without an entry here transformers' mask builders return None for an unknown
    # implementation, and the padding would be lost.
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
    _mark_loaded_in_transformers()


def _mark_loaded_in_transformers() -> None:
    """Lets transformers build models with an implementation whose name contains "flash".

    transformers takes every ``attn_implementation`` containing "flash" for a flavour of the
    flash-attn package: building a model with one (or switching to it) calls
    ``modeling_flash_attention_utils.lazy_import_flash_attention(name)``, which imports flash-attn
    or a hub kernel of that name and raises ValueError for any other name. It skips the import
    when its module-level cache already holds the name, so this fills the cache with
    flash_varlen's functions in the same roles (fixed-length, varlen, pad, unpad). Only
    transformers' own flash-attention wrapper would call them; ``attention_forward`` does not.

    The cache is private to transformers (this matches 5.17). If its attributes are missing,
    nothing is changed and building a model fails with transformers' error (the CPU tests check
    that building works). Building or running a model with another flash implementation
    replaces the cache.
    """
    from transformers import modeling_flash_attention_utils as loader

    if not all(hasattr(loader, name) for name in _LOADER_ATTRIBUTES):
        return
    loader._loaded_implementation = ATTENTION_NAME
    loader._flash_fn = flash_attn_func
    loader._flash_varlen_fn = flash_attn_varlen_func
    loader._flash_with_kvcache_fn = None  # no paged KV-cache kernel (flash-attn 4 has none either)
    loader._pad_fn = pad_input
    loader._unpad_fn = unpad_input
    loader._process_flash_kwargs_fn = loader._lazy_define_process_function(flash_attn_varlen_func)


def padding_mask(
    *, kv_length: int, attention_mask: torch.Tensor | None = None, **unused: Any
) -> torch.Tensor | None:
    """The mask transformers hands to ``attention_forward`` (its AttentionMaskInterface entry).

    transformers' mask builders (create_causal_mask and its sliding-window, chunked and
    bidirectional variants) call this once per forward, with keyword arguments only. The others
    (batch_size, q_length, offsets, mask_function, dtype, ...) describe the causal, window and
    packing patterns, which ``attention_forward`` applies itself. Patterns beyond those (such as
    bidirectional blocks of image tokens) have no sequence-length form and are ignored, as with
    transformers' flash-attention.

    Args:
        kv_length: number of key positions the layers will attend to.
        attention_mask: (batch, >= kv_length) bool, True at real tokens; or None.

    Returns:
        None when there is no padding (one device read to check: the layers then skip the
        unpadding), else the mask's last kv_length columns, shape (batch, mask_len). mask_len is
        smaller than kv_length only with a static cache, whose slots past the mask are unused.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention, in transformers' AttentionInterface convention.

    Args:
        module: the calling attention layer. Its ``is_causal`` applies unless ``is_causal`` is
            given; for float32 inputs its ``config`` and Linear weights pick the kernel dtype.
        query: (batch, nheads, seqlen_q, head_dim).
        key, value: (batch, nheads_k, seqlen_k, head_dim). With grouped-query attention
            (nheads a multiple of nheads_k) they reach the kernel as they are, never repeated.
        attention_mask: None, or the (batch, mask_len) mask from ``padding_mask``, nonzero at
            real tokens (mask_len <= seqlen_k; smaller only for a static cache).
        dropout: attention dropout probability (transformers passes the config's
            attention_dropout while training, 0 in eval mode).
        scaling: softmax scale; default 1 / sqrt(head_dim).
        sliding_window: None, or the window w: a query sees the w keys up to itself (see
            ``_window_size``).
        softcap: logit soft-capping; None or 0 disables it.
        is_causal: overrides ``module.is_causal``.
        s_aux: None, or (nheads,) attention-sink logits in any float dtype (gpt-oss's ``sinks``
            parameter); passed as ``learnable_sink`` in float32, through a differentiable cast
            so that the parameter receives its gradient.
        position_ids: (batch or 1, seqlen_q) positions. Without a mask, a sequence starts at
            the first token of every row and wherever the position is 0 (positions restart at 0
            for each packed document).
        cu_seq_lens_q, cu_seq_lens_k: (num_docs + 1,) prefix sums of the document lengths over
            the flattened batch * seqlen tokens (DataCollatorWithFlattening); they take
            precedence over position_ids.
        max_length_q, max_length_k: the longest document of each; read from the cu_seq_lens
            (a device read) when not given.
        **unused: the model's other kwargs (use_cache, output_attentions, ...).

    Returns:
        (out, None): out (batch, seqlen_q, nheads, head_dim) in the kernel dtype (query's, or
        the half dtype a float32 query is cast to), zero at padded query positions. No
        attention weights are computed, as with transformers' flash-attention.

    Raises:
        TypeError: float32 inputs in a model that does not compute in a half dtype.
        ValueError: a 4-D attention mask, a mask longer than the keys, or only one of
            cu_seq_lens_q / cu_seq_lens_k.
    """
    causal = module.is_causal if is_causal is None else is_causal
    dtype = _kernel_dtype(query, module)
    # transformers' (batch, heads, seq, dim) into the kernels' (batch, seq, heads, dim): views,
    # which the kernels read in place when the tensors come from a projection or a cache.
    q, k, v = (tensor.transpose(1, 2).to(dtype) for tensor in (query, key, value))
    batch, seqlen_q = q.shape[:2]
    options = {
        "softmax_scale": scaling,
        "causal": causal,
        "dropout_p": dropout,
        "softcap": softcap or 0.0,  # None: no soft-capping
        "window_size": _window_size(sliding_window, k.shape[1]),
        # The kernels take float32 sinks; the model keeps them in its own dtype.
        "learnable_sink": None if s_aux is None else s_aux.float(),
    }

    if attention_mask is not None:
        packed, indices_q = _unpad_with_mask(q, k, v, attention_mask)
        out = flash_attn_varlen_func(*packed, **options)
        return pad_input(out, indices_q, batch, seqlen_q), None

    packed = _packed_documents(
        q, k, v, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k
    )
    if packed is not None:
        out = flash_attn_varlen_func(*packed, **options)
        return out.view(batch, seqlen_q, *out.shape[1:]), None

    return flash_attn_func(q, k, v, **options), None


def _window_size(sliding_window: int | None, key_length: int) -> tuple[int, int]:
    """flash-attn's ``window_size`` for transformers' ``sliding_window``, mapped exactly as
    transformers' own flash-attention integration does (``_process_flash_attention_kwargs`` in
    ``modeling_flash_attention_utils``, 5.17).

    A window of w lets a query see itself and the w - 1 keys before it, and in an encoder also
    the w - 1 after it: (w - 1, w - 1), whose right side causal attention replaces by 0. Like
    transformers, the window is passed only when there are more keys than w (``key_length``:
    the keys of the (batch, seqlen) layout, before unpadding); with fewer it hides nothing.
    """
    if sliding_window is None or key_length <= sliding_window:
        return NO_WINDOW
    return sliding_window - 1, sliding_window - 1


def _kernel_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype:
    """The half dtype the kernels run in.

    A float16/bfloat16 query keeps its dtype. A float32 query (float32 layer norms under PEFT, a
    quantized model) is cast with the rule of transformers' flash-attention integration: the
    autocast dtype while autocast is on, else the config's dtype for a quantized model, else the
    dtype of the model's first Linear weight.

    Raises:
        TypeError: that rule gives no half dtype either (a float32 model): the kernels have no
            float32 path, and silently computing in half precision would hide it.
    """
    if query.dtype in KERNEL_DTYPES:
        return query.dtype
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
    elif getattr(module.config, "_is_quantized", False):
        target = module.config.dtype
    else:
        linear_dtypes = (m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear))
        target = next(linear_dtypes, query.dtype)
    if target not in KERNEL_DTYPES:
        raise TypeError(
            f"flash_varlen computes in float16 or bfloat16, but this attention layer's inputs "
            f"are {query.dtype} and the model computes in {target}: load the model with "
            "dtype=torch.bfloat16 (or torch.float16), or run it under torch.autocast."
        )
    return target


def _unpad_with_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[_Packed, torch.Tensor]:
    """Packs the real tokens of a padded batch.

    Args:
        q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
        attention_mask: (batch, mask_len), nonzero at real tokens, mask_len <= seqlen_k. Key j of
            a row is mask column j; the queries are the row's last seqlen_q columns (all of
            them without a cache).

    Returns:
        The packed batch, and indices_q: (total_q,) the real queries' positions in the
        flattened (batch * seqlen_q) output, for pad_input. unpad_input synchronizes twice (the
        token count and the longest row) for the keys, and twice more for the queries when they
        are fewer than the keys (a cache).
    """
    if attention_mask.dim() != 2:
        raise ValueError(
            "flash_varlen takes a 2-D (batch, seqlen) padding mask, got shape "
            f"{tuple(attention_mask.shape)}: an arbitrary mask has no sequence-length form; "
            "use attn_implementation='sdpa' or 'eager' for it."
        )
    mask_len = attention_mask.shape[1]
    if mask_len > k.shape[1]:
        raise ValueError(
            f"attention_mask covers {mask_len} positions but there are only {k.shape[1]} keys."
        )
    # A static cache hands over all its slots; those past the mask were never written.
    k, v = k[:, :mask_len], v[:, :mask_len]
    k_packed, indices_k, cu_seqlens_k, max_seqlen_k, _ = unpad_input(k, attention_mask)
    v_packed = v.reshape(-1, *v.shape[2:])[indices_k]
    seqlen_q = q.shape[1]
    if seqlen_q == mask_len:
        # The queries are the keys' tokens: their indices and lengths are the keys'.
        q_packed = q.reshape(-1, *q.shape[2:])[indices_k]
        indices_q, cu_seqlens_q, max_seqlen_q = indices_k, cu_seqlens_k, max_seqlen_k
    else:
        q_packed, indices_q, cu_seqlens_q, max_seqlen_q, _ = unpad_input(
            q, attention_mask[:, -seqlen_q:]
        )
    # The kernels take max_seqlen as a positive bound; it is 0 only when every row is padding.
    packed = _Packed(
        q_packed,
        k_packed,
        v_packed,
        cu_seqlens_q,
        cu_seqlens_k,
        max(1, max_seqlen_q),
        max(1, max_seqlen_k),
    )
    return packed, indices_q


def _packed_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None,
    cu_seq_lens_k: torch.Tensor | None,
    max_length_q: int | None,
    max_length_k: int | None,
) -> _Packed | None:
    """The documents of a padding-free batch, or None when every row is one sequence.

    q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d). The documents span the
    flattened batch * seqlen tokens. The other arguments are ``attention_forward``'s.
    """
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_q is None or cu_seq_lens_k is None:
            raise ValueError("pass both cu_seq_lens_q and cu_seq_lens_k, or neither.")
        cu_seqlens_q = _as_cu_seqlens(cu_seq_lens_q, q.device)
        cu_seqlens_k = _as_cu_seqlens(cu_seq_lens_k, q.device)
        max_seqlen_q = _max_seqlen(cu_seqlens_q) if max_length_q is None else int(max_length_q)
        max_seqlen_k = _max_seqlen(cu_seqlens_k) if max_length_k is None else int(max_length_k)
        return _Packed(*_flatten(q, k, v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    seqlen_q = q.shape[1]
    if (
        position_ids is None
        or position_ids.dim() != 2
        or position_ids.shape[1] != seqlen_q
        # With a cache the positions describe only the new tokens, not the keys' documents.
        or k.shape[1] != seqlen_q
    ):
        return None
    # A sequence starts at the first token of every row and wherever the position is 0
    # (DataCollatorWithFlattening restarts the positions at 0 for each document); transformers'
    # eager/sdpa masks split wherever a position is not the previous one plus 1, which agrees
    # for such positions. A document never spans rows, so the row length bounds every document
    # and finding the boundaries costs one device read; the longest document costs another,
    # only when the batch turns out to be packed.
    cu_seqlens, _ = cu_seqlens_from_position_ids(
        position_ids.expand(q.shape[0], -1), max_seqlen=seqlen_q
    )
    if cu_seqlens.numel() - 1 == q.shape[0]:
        return None  # one sequence per row: the fixed-length kernel needs no boundaries
    max_seqlen = _max_seqlen(cu_seqlens)
    return _Packed(*_flatten(q, k, v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence of (num_seqs + 1,) prefix sums, at least 1; one device read."""
    return max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def _as_cu_seqlens(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The collator's prefix sums as the kernels take them: int32, contiguous, on ``device``."""
    return cu_seqlens.to(device=device, dtype=CU_SEQLENS_DTYPE).contiguous()


def _flatten(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(batch, seqlen, heads, d) tensors as (batch * seqlen, heads, d), views where possible."""
    return [tensor.reshape(-1, *tensor.shape[2:]) for tensor in tensors]
