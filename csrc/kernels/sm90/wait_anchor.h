// Keeps the softmax of a main-loop step in front of the wait for the P V product that it is
// meant to overlap (FlashAttention-3's intra-warpgroup overlap).
//
// Why: the wait (`wgmma.wait_group 0`) reads no register, so ptxas may schedule it anywhere
// before the first instruction that touches the in-flight operands, and ptxas 13.0 moves it up:
// in the d128 loop it put the wait before all 90 exp2 of a step, which then ran only after P V
// had finished (bf16 d128, commit 08b742c: 0 of 90 MUFU.EX2 between the two waits of a step).
// ptxas does not move shared-memory stores across a wgmma wait, so a store of a value that
// depends on every probability of the block (the row sums do) pins the whole softmax before the
// wait: with it, all 90 MUFU.EX2 sit between the waits and only the P conversion and the O
// rescale follow the second one (scripts/check_overlap.py checks this on the SASS).
// Cost: one FADD and one 4-byte shared store per thread and step, and 4 bytes of shared memory
// per consumer thread, which nothing reads.
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm90 {

// `slot`: this thread's own word of shared memory (no other thread writes it, so the stores
// cannot race). `row_sums`: the softmax state's row sums after the block was folded in.
template <typename RowValues>
__device__ __forceinline__ void anchor_softmax_before_wait(float* slot, const RowValues& row_sums) {
    float anchor = 0.f;
    CUTE_UNROLL
    for (int r = 0; r < cute::size(row_sums); ++r) anchor += row_sums(r);
    // Inline PTX, so that no compiler pass can drop the store as dead: it is never read.
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(slot));
    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(address), "f"(anchor) : "memory");
}

}  // namespace sm90
}  // namespace flash_varlen
