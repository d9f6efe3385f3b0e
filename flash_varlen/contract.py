"""What the kernels accept and return, as numbers: the one source of these constants.

The Python checks (``validation.py``), the registered ops' fakes (``ops.py``), the build
(``setup.py``) and the kernel generator read them from here; ``csrc/generate.py`` writes them into
``csrc/generated/contract.h`` for the extension's own checks. This module imports nothing, so that
``setup.py`` and the generator can load it by path without torch or the package.
"""

from __future__ import annotations

# Element types of q, k, v (torch dtype names).
DTYPES = ("float16", "bfloat16")
# The kernels move rows with 16-byte vector loads: the head dim is a whole number of vectors of a
# 2-byte dtype, and every stride and the storage offset a whole number of 16-byte vectors.
VECTOR_BYTES = 16
ELEMENT_BYTES = 2
HEAD_DIM_MULTIPLE = VECTOR_BYTES // ELEMENT_BYTES
MAX_HEAD_DIM = 256
# Compiled tile widths: a head dim runs in the smallest bucket >= it.
HEAD_DIM_BUCKETS = (64, 96, 128, 192, 256)
# In-tile offsets are 32-bit: the largest row tile times the row stride stays below 2^31.
LARGEST_ROW_TILE = 128
MAX_ROW_STRIDE = 2**31 // LARGEST_ROW_TILE

# cu_seqlens and seqused are int32; softmax_lse and its gradient float32.
INDEX_DTYPE = "int32"
LSE_DTYPE = "float32"

# A window side of this value puts no limit on that side (flash-attn's convention).
UNBOUNDED_WINDOW_SIDE = -1
# Dropout: the forward returns the Philox (seed, offset) as this many int64 values, and its
# testing-only dropout pattern has both sequence dims rounded up to a multiple of this.
RNG_STATE_SIZE = 2
RNG_STATE_DTYPE = "int64"
DROPOUT_MASK_BLOCK = 128

