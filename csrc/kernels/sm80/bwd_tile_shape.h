// Row and key block sizes of the backward kernel per head-dim bucket. The sizes are
// FlashAttention-2's (Dao, 2023) sm80 backward configurations for GPUs with large shared memory;
// bwd_kernel_traits.h holds the rest of each configuration (and the launcher sizes the dQ
// accumulator from its kBlockM).
#pragma once

namespace flash_varlen {
namespace sm80 {

struct BwdTileShape {
    int block_m;  // query rows per row block
    int block_n;  // keys per key block (one thread block each)
};

constexpr BwdTileShape bwd_tile_shape(int head_dim_bucket) {
    return head_dim_bucket <= 64    ? BwdTileShape{128, 128}
           : head_dim_bucket <= 128 ? BwdTileShape{64, 128}
                                    : BwdTileShape{64, 64};
}

}  // namespace sm80
}  // namespace flash_varlen
