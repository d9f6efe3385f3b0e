"""flash_varlen: exact fast attention for packed variable-length sequences.

Call-compatible with flash-attn 2.x (same function names, arguments and returns), backed by
hand-written CUDA kernels in the extension ``flash_varlen._C``. The package imports without the
extension (CPU-only machines); the attention functions then raise RuntimeError saying why.
"""

from flash_varlen import reference
from flash_varlen.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flash_varlen.kvcache import flash_attn_with_kvcache
from flash_varlen.padding import (
    cu_seqlens_from_attention_mask,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    pad_input,
    unpad_input,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cu_seqlens_from_attention_mask",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "pad_input",
    "reference",
    "unpad_input",
]
