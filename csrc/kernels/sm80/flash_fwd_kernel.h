// The sm80-family forward kernel (mma.sync + cp.async; runs on Ampere, Ada and Hopper).
// One thread block computes one row block (kBlockM query rows) of one head of one sequence,
// walking the visible key blocks from the last one down, as in FlashAttention-2 (Dao, 2023):
// S = Q K^T in registers, online softmax, O += P V with P kept in registers. The variants are
// runtime fields of the params (flash_params.h). Two template booleans choose the kernel: a local
// mask (causal and/or a window; it changes the loop structure) is one generated instantiation,
// and soft-capping, ALiBi, dropout and paged K/V (params.block_table, the varlen layout's paged
// prefill) run in a second kernel of each instantiation, the general one (the launcher picks it at
// run time), so that their code never costs the plain kernel registers. For paged K/V that was
// measured: the same run-time branch in the plain kernel too (ptxas, bf16 d = 128, not local)
// took its spills from 92 to 116 bytes (sm_80) and from 136 to 200 (sm_90) and its SASS from 3408
// to 5032 instructions; a third kernel per instantiation would cost build time instead.
#pragma once

#include <cutlass/fast_math.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/mask_policy.h"
#include "kernels/common/paged_rows.h"
#include "kernels/common/philox.h"
#include "kernels/common/score_transforms.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/common/varlen_tile_schedule.h"
#include "kernels/sm80/dropout_tiles.h"
#include "kernels/sm80/fragment_layouts.h"
#include "kernels/sm80/mask_fragments.h"
#include "kernels/sm80/online_softmax.h"
#include "kernels/sm80/tile_copy.h"
#include "kernels/sm80/warp_gemm.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// kHasVariants: the general kernel, where soft-capping, ALiBi, dropout or paged K/V may be on
// (see the top of the file).
template <typename Traits, bool kIsLocal, bool kHasVariants>
struct FlashFwdRowBlock {
    using Element = typename Traits::Element;
    static constexpr int kBlockM = Traits::kBlockM;
    static constexpr int kBlockN = Traits::kBlockN;
    static constexpr int kHeadDim = Traits::kHeadDim;
    using Mask = MaskPolicy<kIsLocal, kHasVariants>;

    // page_size: params.page_size as a FastDivmod (the launcher builds it; unused without a
    // block table).
    __device__ static void run(const FlashFwdParams& params, const cutlass::FastDivmod& page_size,
                               char* smem, int m_block, int batch, int head) {
        const int tidx = threadIdx.x;
        const SeqlenInfo seq(params, batch);
        if (m_block * kBlockM >= seq.seqlen_q) return;  // this row block lies past the sequence end

        const Mask mask(params, seq, batch, head);
        const int key_block_begin = mask.template key_block_begin<kBlockM, kBlockN>(m_block);
        const int key_block_end = mask.template key_block_end<kBlockM, kBlockN>(m_block);
        const int head_k = head / (params.nheads / params.nheads_k);

        // Dense per-sequence, per-head views: (seqlen, kHeadDim) with the real row stride. A
        // paged cache has no per-sequence view: k_base and v_base are then the pools' bases at
        // the KV head, and each key row is found through the block table (load_key_block).
        const bool paged = kHasVariants && params.block_table != nullptr;
        const Element* q_base = static_cast<const Element*>(params.q_ptr) +
                                seq.q_offset(params.q_batch_stride, params.q_row_stride, batch) +
                                head * params.q_head_stride;
        const Element* k_base =
            static_cast<const Element*>(params.k_ptr) +
            (paged ? 0 : seq.k_offset(params.k_batch_stride, params.k_row_stride, batch)) +
            head_k * params.k_head_stride;
        const Element* v_base =
            static_cast<const Element*>(params.v_ptr) +
            (paged ? 0 : seq.k_offset(params.v_batch_stride, params.v_row_stride, batch)) +
            head_k * params.v_head_stride;
        // In-tile offsets use 32-bit strides (the host checks row strides fit) so that a copy's
        // addresses cost one 64-bit base per tile instead of one 64-bit register per row.
        Tensor gQ = row_tile<kBlockM, kHeadDim>(q_base, m_block, params.q_row_stride);  // (BM, D)

        Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)),
                                typename Traits::SmemLayoutQ{});
        Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
        Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
        Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
        Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Traits::SmemLayoutVtNoSwizzle{});

        typename Traits::TiledMma tiled_mma;
        auto thr_mma = tiled_mma.get_thread_slice(tidx);
        Tensor acc_o = partition_fragment_C(
            tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
        clear(acc_o);
        constexpr int kRowsPerThread =
            decltype(size<0>(accumulator_as_rows_cols(acc_o.layout())))::value;
        OnlineSoftmax<kRowsPerThread> softmax;

        // Columns past the real head dim (d smaller than the bucket) are zero-filled on load and
        // never stored.
        Tensor identity_tile = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
        typename Traits::GmemTiledCopyQKV gmem_tiled_copy;
        auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tidx);
        Tensor tQcQ = gmem_thr_copy.partition_S(identity_tile);  // (CPY, CPY_M, CPY_D)
        Tensor identity_kv = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});
        Tensor tKVcKV = gmem_thr_copy.partition_S(identity_kv);  // (CPY, CPY_N, CPY_D)
        auto col_valid = [&](int k) { return get<1>(tQcQ(0, 0, k)) < params.head_dim; };

        if (key_block_begin < key_block_end) {
            Tensor tQgQ = gmem_thr_copy.partition_S(gQ);  // (CPY, CPY_M, CPY_D)
            Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
            const int rows_left_q = seq.seqlen_q - m_block * kBlockM;
            Tensor tKsK = gmem_thr_copy.partition_D(sK);  // (CPY, CPY_N, CPY_D)
            Tensor tVsV = gmem_thr_copy.partition_D(sV);
            // Key block n_block of K or V (base, row and page strides) into its shared-memory
            // tile: a strided tile of the sequence's rows, or, paged, its rows gathered from the
            // pages the block table names (FlashAttention-2 and -3 load paged K/V the same way,
            // one page lookup per row). Rows past the sequence's keys are zero-filled and never
            // read: a partial last tile reads nothing of the next sequence's rows nor of the
            // pages past the used keys, and P V sees zeros there (P is 0 too: masked).
            auto load_key_block = [&](const Element* base, int64_t row_stride, int64_t page_stride,
                                      auto& smem_tile, int n_block) {
                if constexpr (kHasVariants) {
                    if (paged) {
                        // Made at each load, not once per CTA, and the table read again for V:
                        // no paged value stays live across the main loop, whose registers the
                        // unpaged calls of this kernel share.
                        const PagedRows pages(
                            page_size,
                            params.block_table + batch * params.block_table_batch_stride,
                            params.num_pages, page_stride, row_stride);
                        const int first_key = n_block * kBlockN;
                        // Keys past max_seqlen_k (params.seqlen_k), which the host checked the
                        // table covers, are not read: a sequence longer than that (a caller
                        // error that FLASH_VARLEN_DEBUG=1 reports) never makes a table read
                        // leave the sequence's row.
                        const int rows_in_table = min(seq.seqlen_k, params.seqlen_k) - first_key;
                        gather_tile_zero_fill(
                            gmem_tiled_copy,
                            [&](int row) { return base + pages.row_offset(first_key + row); },
                            base, smem_tile, tKVcKV, col_valid, rows_in_table);
                        return;
                    }
                }
                Tensor g_tile = row_tile<kBlockN, kHeadDim>(base, n_block, row_stride);  // (BN, D)
                copy_tile_zero_fill(gmem_tiled_copy, gmem_thr_copy.partition_S(g_tile), smem_tile,
                                    tKVcKV, col_valid, seq.seqlen_k - n_block * kBlockN);
            };
            auto load_k = [&](int n_block) {
                load_key_block(k_base, params.k_row_stride, params.k_batch_stride, tKsK, n_block);
            };
            auto load_v = [&](int n_block) {
                load_key_block(v_base, params.v_row_stride, params.v_batch_stride, tVsV, n_block);
            };

            Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_D)
            Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_D)
            Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_N)

            auto smem_tiled_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
            auto smem_thr_copy_q = smem_tiled_copy_q.get_thread_slice(tidx);
            Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
            auto smem_tiled_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
            auto smem_thr_copy_k = smem_tiled_copy_k.get_thread_slice(tidx);
            Tensor tSsK = smem_thr_copy_k.partition_S(sK);
            auto smem_tiled_copy_v =
                make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
            auto smem_thr_copy_v = smem_tiled_copy_v.get_thread_slice(tidx);
            Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);

            // Prologue: Q and the highest key block in flight together.
            int n_block = key_block_end - 1;
            copy_tile_zero_fill(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, col_valid, rows_left_q);
            load_k(n_block);
            cp_async_fence();

            // One key block. While S = Q K^T runs, V of this block streams in; while P V runs, K
            // of the next block does: each wait below covers exactly the copy the next GEMM needs.
            // Always inlined: the local kernel calls it from three loops, and the compiler
            // outlined it there (ptxas, bf16 d128 sm_90: a 2.3 KB stack frame).
            auto process_key_block = [&](int n_block, auto apply_mask) CUTLASS_LAMBDA_FUNC_INLINE {
                Tensor acc_s = partition_fragment_C(
                    tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
                clear(acc_s);
                // K(n_block) landed, and every warp is done reading V(n_block + 1).
                cp_async_wait<0>();
                __syncthreads();
                load_v(n_block);
                cp_async_fence();

                gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, smem_tiled_copy_q,
                               smem_tiled_copy_k, smem_thr_copy_q, smem_thr_copy_k);
                if constexpr (kHasVariants) {
                    if (params.softcap_prescale != 0.f) {
                        apply_softcap(acc_s, params.softcap_prescale);
                    }
                }
                if constexpr (decltype(apply_mask)::value) {
                    mask_accumulator<Traits::kNWarps>(mask, acc_s, m_block * kBlockM,
                                                      n_block * kBlockN);
                }

                cp_async_wait<0>();
                __syncthreads();  // V(n_block) landed, and every warp is done reading K(n_block)
                if (n_block > key_block_begin) {
                    load_k(n_block - 1);
                    cp_async_fence();
                }

                softmax.update(acc_s, acc_o, params.logit_scale_log2);
                if constexpr (kHasVariants) {
                    // After the row sums: the softmax sees every probability.
                    if (params.dropout_threshold != 0) {
                        apply_dropout(acc_s, params, seq, batch, head, m_block, n_block, thr_mma);
                    }
                }
                Tensor rP = convert_fragment<Element>(acc_s);
                Tensor tOrP = make_tensor(
                    rP.data(),
                    accumulator_as_a_operand(rP.layout()));  // ((4, 2), MMA_M, MMA_N / 2)
                gemm_reg_smem(tiled_mma, acc_o, tOrP, tOrVt, tOsVt, smem_tiled_copy_v,
                              smem_thr_copy_v);
            };

            if constexpr (kHasVariants) {  // ALiBi biases every block: all through the masking pass
                for (; n_block >= key_block_begin; --n_block) {
                    process_key_block(n_block, cute::true_type{});
                }
            } else {
                // The highest blocks may hold masked pairs (sequence tail, causal diagonal, the
                // window's right edge) and, with a local mask, the lowest ones too (the window's
                // left edge); the blocks between are fully visible to every valid row and skip
                // the masking work.
                const int unmasked_end =
                    mask.template unmasked_block_end<kBlockM, kBlockN>(m_block);
                const int unmasked_begin =
                    mask.template unmasked_block_begin<kBlockM, kBlockN>(m_block);
                for (; n_block >= key_block_begin && n_block >= unmasked_end; --n_block) {
                    process_key_block(n_block, cute::true_type{});
                }
                for (; n_block >= key_block_begin && n_block >= unmasked_begin; --n_block) {
                    process_key_block(n_block, cute::false_type{});
                }
                if constexpr (kIsLocal) {  // the window's left edge
                    for (; n_block >= key_block_begin; --n_block) {
                        process_key_block(n_block, cute::true_type{});
                    }
                }
            }
        }

        // Epilogue: normalise, stage O through shared memory for 16-byte row-contiguous stores.
        Tensor lse = softmax.finalize(
            acc_o, params.logit_scale,
            kHasVariants && params.dropout_threshold != 0 ? params.dropout_rescale : 1.f,
            params.learnable_sink == nullptr ? -INFINITY : params.learnable_sink[head]);
        Tensor rO = convert_fragment<Element>(acc_o);
        Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutO{});
        auto smem_tiled_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
        auto smem_thr_copy_o = smem_tiled_copy_o.get_thread_slice(tidx);
        Tensor taccOrO = smem_thr_copy_o.retile_S(rO);  // (CPY, CPY_M, CPY_D)
        Tensor taccOsO = smem_thr_copy_o.partition_D(sO);
        // Every warp passed the last barrier of the main loop after its final read of sQ, so sQ
        // can be overwritten without another barrier here.
        copy(smem_tiled_copy_o, taccOrO, taccOsO);

        // Recomputed rather than kept from the prologue: holding it across the main loop costs a
        // register there (cuobjdump, bf16 d = 128 causal sm_90: 89 local-memory instructions
        // instead of 58).
        const int rows_left_q = seq.seqlen_q - m_block * kBlockM;
        write_lse(params, seq, lse, thr_mma, batch, head, m_block, rows_left_q);

        __syncthreads();  // sO complete before threads read rows written by other warps
        Element* o_base = static_cast<Element*>(params.o_ptr) +
                          seq.q_offset(params.o_batch_stride, params.o_row_stride, batch) +
                          head * params.o_head_stride;
        Tensor gO = row_tile<kBlockM, kHeadDim>(o_base, m_block, params.o_row_stride);  // (BM, D)
        store_tile_from_smem<typename Traits::GmemTiledCopyO>(sO, gO, rows_left_q, params.head_dim);
    }

    // Zeroes the dropped probabilities of one key block (the output is scaled by 1 / (1 - p)
    // at the end) and, when asked to (testing only), records the pattern.
    template <typename AccS, typename ThrMma>
    __device__ static void apply_dropout(AccS& acc_s, const FlashFwdParams& params,
                                         const SeqlenInfo& seq, int batch, int head, int m_block,
                                         int n_block, const ThrMma& thr_mma) {
        Tensor coords =
            thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
        const auto keep = tile_keep_bits(Dropout(params, batch, head), coords, m_block * kBlockM,
                                         n_block * kBlockN);
        if (params.dropout_mask_ptr != nullptr) {
            constexpr int kValues = decltype(size(acc_s))::value;
            cute::array<float, kValues> probs;
            CUTE_UNROLL
            for (int i = 0; i < kValues; ++i) probs[i] = acc_s(i);
            write_dropout_pattern<Element>(probs, keep, coords, params, batch, head,
                                           m_block * kBlockM, n_block * kBlockN, seq.seqlen_q,
                                           seq.seqlen_k);
        }
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) acc_s(i) = keep.kept(i) ? acc_s(i) : 0.f;
    }

    // The four threads of a quad hold the same rows; the one holding column 0 writes their LSE.
    template <typename Lse, typename ThrMma>
    __device__ static void write_lse(const FlashFwdParams& params, const SeqlenInfo& seq,
                                     const Lse& lse, const ThrMma& thr_mma, int batch, int head,
                                     int m_block, int rows_left_q) {
        Tensor coords =
            thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
        Tensor coords_rc = make_tensor(coords.data(), accumulator_as_rows_cols(coords.layout()));
        if (get<1>(coords_rc(0, 0)) != 0) return;
        float* lse_base = params.softmax_lse_ptr + head * params.lse_head_stride +
                          seq.lse_offset(params.lse_batch_stride, batch) + m_block * kBlockM;
        CUTE_UNROLL
        for (int r = 0; r < size(lse); ++r) {
            const int row = get<0>(coords_rc(r, 0));
            if (row < rows_left_q) lse_base[row] = lse(r);
        }
    }
};

// page_size: params.page_size as a FastDivmod (FlashFwdRowBlock::run). schedule: the varlen
// tile schedule on a 1-D grid, or null for the (row blocks, batch, heads) grid
// (flash_fwd_launch.h).
template <typename Traits, bool kIsLocal, bool kHasVariants>
__global__ void __launch_bounds__(Traits::kNThreads)
    flash_fwd_kernel(const __grid_constant__ FlashFwdParams params,
                     const __grid_constant__ cutlass::FastDivmod page_size,
                     const __grid_constant__ VarlenTileSchedule schedule) {
    extern __shared__ __align__(128) char smem[];
    // The generator state this launch used, for the backward (one thread of the grid writes it,
    // before any early exit).
    if (params.rng_state_out != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 &&
        threadIdx.x == 0) {
        params.rng_state_out[0] = int64_t(philox_seed(params));
        params.rng_state_out[1] = int64_t(philox_offset(params));
    }
    TileCoordinates tile{int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
    // Only the plain kernel takes the schedule (flash_fwd_launch.h): in the general one, which
    // spills already, its lookup added some 300 bytes of spills at sm_90 (bf16 d128 local).
    if constexpr (!kHasVariants) {
        if (schedule.tile_start != nullptr &&
            !varlen_tile(schedule, params.batch, params.nheads, blockIdx.x, kIsLocal, tile)) {
            return;  // past the last tile (the grid is an upper bound); uniform over the block
        }
    }
    FlashFwdRowBlock<Traits, kIsLocal, kHasVariants>::run(params, page_size, smem, tile.m_block,
                                                          tile.batch, tile.head);
}

}  // namespace sm80
}  // namespace flash_varlen
