// Row and key block sizes of the backward kernel per head-dim bucket, in plain C++ (no CUDA, no
// CuTe) so that the host, which sizes the dQ accumulator in whole row blocks, and the kernels read
// the same numbers. The sizes are FlashAttention-2's (Dao, 2023) sm80 backward configurations for
// GPUs with large shared memory; bwd_kernel_traits.h holds the rest of each configuration.
#pragma once

namespace flash_varlen {

struct BwdTileShape {
    int block_m;  // query rows per row block
    int block_n;  // keys per key block (one thread block each)
};

constexpr BwdTileShape bwd_tile_shape(int head_dim_bucket) {
    return head_dim_bucket <= 64    ? BwdTileShape{128, 128}
           : head_dim_bucket <= 128 ? BwdTileShape{64, 128}
                                    : BwdTileShape{64, 64};
}

}  // namespace flash_varlen
