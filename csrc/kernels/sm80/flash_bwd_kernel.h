// The sm80-family backward kernel (mma.sync + cp.async; runs on Ampere, Ada and Hopper), after
// FlashAttention-2 (Dao, 2023). One thread block owns one key block (kBlockN keys) of one kv head
// of one sequence. It keeps K and V of that block in shared memory and dK, dV in registers, and
// walks the query row blocks that see the block, recomputing per row block
//   S = Q K^T,  P = exp(scale * S - LSE),  dP = dO V^T,  dS = P * (dP - D)
// (D = rowsum(dO * O) - dLSE from the preprocess kernel), then
//   dV += P^T dO,  dK += dS^T Q,  dQ += dS K  (dQ: float32 adds into dq_accum.h's accumulator).
// With grouped-query attention the block walks every query head of its kv head in turn, so dK
// and dV are reduced over the group in registers: no (nheads)-sized temporary, no atomics, and a
// fixed summation order (dK and dV are bitwise reproducible).
// Variants (flash_params.h): soft-capping multiplies dS by the cap's derivative; ALiBi biases the
// recomputed scores; dropout regenerates the forward's mask (dropout.h) and applies it to P for
// dV and to dP; a local mask limits the row blocks a key block visits.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/mask_policy.h"
#include "kernels/common/philox.h"
#include "kernels/common/score_transforms.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm80/dq_accum.h"
#include "kernels/sm80/dq_semaphore.h"
#include "kernels/sm80/dropout_tiles.h"
#include "kernels/sm80/fragment_layouts.h"
#include "kernels/sm80/tile_copy.h"
#include "kernels/sm80/warp_gemm.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// kHasVariants: soft-capping, ALiBi or dropout is on (a second kernel of the same instantiation,
// so that their code never costs the plain kernel registers; see flash_fwd_kernel.h).
template <typename Traits, bool kIsLocal, bool kHasVariants>
struct FlashBwdKeyBlock {
    using Element = typename Traits::Element;
    static constexpr int kBlockM = Traits::kBlockM;
    static constexpr int kBlockN = Traits::kBlockN;
    static constexpr int kHeadDim = Traits::kHeadDim;
    static constexpr int kQStages = Traits::kQStages;
    using Mask = MaskPolicy<kIsLocal, kHasVariants>;

    __device__ static void run(const FlashBwdParams& params, char* smem, int n_block, int batch,
                               int head_k) {
        const int tidx = threadIdx.x;
        const SeqlenInfo seq(params, batch);
        if (n_block * kBlockN >= seq.seqlen_k) return;  // this key block lies past the end

        const int group_size = params.nheads / params.nheads_k;
        // The row blocks with a row that sees some key of this block (the same for every head).
        const Mask block_mask(params, seq, batch, head_k * group_size);
        const int m_begin = block_mask.template row_block_begin<kBlockM, kBlockN>(n_block);
        const int m_end = block_mask.template row_block_end<kBlockM, kBlockN>(n_block);
        const bool has_dropout = params.dropout_threshold != 0;
        const int rows_left_k = seq.seqlen_k - n_block * kBlockN;

        // Shared memory: K, V, dO, P, dS, then the Q stages.
        Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)),
                                typename Traits::SmemLayoutKV{});
        Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
        Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKt{});
        Tensor sKtNoSwizzle = make_tensor(sK.data(), typename Traits::SmemLayoutKtNoSwizzle{});
        Tensor sdO = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutQdO{});
        Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQdOt{});
        Tensor sdOtNoSwizzle = make_tensor(sdO.data(), typename Traits::SmemLayoutQdOtNoSwizzle{});
        Tensor sP = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutPdS{});
        Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPdSt{});
        Tensor sPtNoSwizzle = make_tensor(sP.data(), typename Traits::SmemLayoutPdStNoSwizzle{});
        Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutPdS{});
        Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPdSt{});
        Tensor sdStNoSwizzle = make_tensor(sdS.data(), typename Traits::SmemLayoutPdStNoSwizzle{});
        // Q stage 0; stage s lies s * kSmemElemsQdO elements further (see q_stage_offset).
        Tensor sQ = make_tensor(sdS.data() + size(sdS), typename Traits::SmemLayoutQdO{});
        Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutQdOt{});
        Tensor sQtNoSwizzle = make_tensor(sQ.data(), typename Traits::SmemLayoutQdOtNoSwizzle{});
        // Per stage: LSE of the row block's kBlockM rows, then their D.
        float* row_stats_smem = reinterpret_cast<float*>(
            raw_pointer_cast((sQ.data() + kQStages * Traits::kSmemElemsQdO).get()));
        // Hopper and later: one dQ tile in float32 for the bulk adds, unless the adds must be
        // ordered (deterministic mode adds from registers after its turn).
        float* dq_staging = row_stats_smem + kQStages * Traits::kSmemRowStatsFloats;
        const bool bulk_dq_adds = kDqBulkAdds && params.dq_semaphore == nullptr;
        float* pending_dq_tile = nullptr;  // staged, its bulk add not issued yet

        // Global to shared copies (16-byte cp.async, zero-filled past the ends).
        typename Traits::GmemTiledCopyLoad gmem_tiled_copy;
        auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tidx);
        Tensor tQcQ = gmem_thr_copy.partition_S(
            make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (CPY, CPY_M, CPY_D)
        Tensor tKVcKV = gmem_thr_copy.partition_S(
            make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (CPY, CPY_N, CPY_D)
        auto col_valid = [&](int k) { return get<1>(tQcQ(0, 0, k)) < params.head_dim; };
        Tensor tQsQ = gmem_thr_copy.partition_D(sQ);  // (CPY, CPY_M, CPY_D)
        Tensor tdOsdO = gmem_thr_copy.partition_D(sdO);

        const Element* k_base = static_cast<const Element*>(params.k_ptr) +
                                seq.k_offset(params.k_batch_stride, params.k_row_stride, batch) +
                                head_k * params.k_head_stride;
        const Element* v_base = static_cast<const Element*>(params.v_ptr) +
                                seq.k_offset(params.v_batch_stride, params.v_row_stride, batch) +
                                head_k * params.v_head_stride;
        copy_tile_zero_fill(gmem_tiled_copy,
                            gmem_thr_copy.partition_S(
                                row_tile<kBlockN, kHeadDim>(k_base, n_block, params.k_row_stride)),
                            gmem_thr_copy.partition_D(sK), tKVcKV, col_valid, rows_left_k);
        copy_tile_zero_fill(gmem_tiled_copy,
                            gmem_thr_copy.partition_S(
                                row_tile<kBlockN, kHeadDim>(v_base, n_block, params.v_row_stride)),
                            gmem_thr_copy.partition_D(sV), tKVcKV, col_valid, rows_left_k);
        cp_async_fence();

        // The three products and their shared-memory operand copies.
        typename Traits::TiledMmaSdP mma_sdp;
        auto thr_mma_sdp = mma_sdp.get_thread_slice(tidx);
        Tensor tSrQ = thr_mma_sdp.partition_fragment_A(sQ);     // (MMA, MMA_M, MMA_D)
        Tensor tSrK = thr_mma_sdp.partition_fragment_B(sK);     // (MMA, MMA_N, MMA_D)
        Tensor tdPrdO = thr_mma_sdp.partition_fragment_A(sdO);  // (MMA, MMA_M, MMA_D)
        Tensor tdPrV = thr_mma_sdp.partition_fragment_B(sV);    // (MMA, MMA_N, MMA_D)
        auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
        auto thr_copy_a_sdp = copy_a_sdp.get_thread_slice(tidx);
        Tensor tSsQ = thr_copy_a_sdp.partition_S(sQ);
        Tensor tdPsdO = thr_copy_a_sdp.partition_S(sdO);
        auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
        auto thr_copy_b_sdp = copy_b_sdp.get_thread_slice(tidx);
        Tensor tSsK = thr_copy_b_sdp.partition_S(sK);
        Tensor tdPsV = thr_copy_b_sdp.partition_S(sV);
        auto copy_store_sdp = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_sdp);
        auto thr_copy_store_sdp = copy_store_sdp.get_thread_slice(tidx);
        Tensor tPsP = thr_copy_store_sdp.partition_D(sP);  // (CPY, CPY_M, CPY_N)
        Tensor tdSsdS = thr_copy_store_sdp.partition_D(sdS);

        typename Traits::TiledMmadKV mma_dkv;
        auto thr_mma_dkv = mma_dkv.get_thread_slice(tidx);
        Tensor tdVrPt = thr_mma_dkv.partition_fragment_A(sPtNoSwizzle);    // (MMA, MMA_N, MMA_M)
        Tensor tdVrdOt = thr_mma_dkv.partition_fragment_B(sdOtNoSwizzle);  // (MMA, MMA_D, MMA_M)
        Tensor tdKrdSt = thr_mma_dkv.partition_fragment_A(sdStNoSwizzle);  // (MMA, MMA_N, MMA_M)
        Tensor tdKrQt = thr_mma_dkv.partition_fragment_B(sQtNoSwizzle);    // (MMA, MMA_D, MMA_M)
        auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
        auto thr_copy_a_dkv = copy_a_dkv.get_thread_slice(tidx);
        Tensor tdVsPt = thr_copy_a_dkv.partition_S(sPt);
        Tensor tdKsdSt = thr_copy_a_dkv.partition_S(sdSt);
        auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
        auto thr_copy_b_dkv = copy_b_dkv.get_thread_slice(tidx);
        Tensor tdVsdOt = thr_copy_b_dkv.partition_S(sdOt);
        Tensor tdKsQt = thr_copy_b_dkv.partition_S(sQt);

        typename Traits::TiledMmadQ mma_dq;
        auto thr_mma_dq = mma_dq.get_thread_slice(tidx);
        Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);           // (MMA, MMA_M, MMA_N)
        Tensor tdQrKt = thr_mma_dq.partition_fragment_B(sKtNoSwizzle);  // (MMA, MMA_D, MMA_N)
        auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
        auto thr_copy_a_dq = copy_a_dq.get_thread_slice(tidx);
        Tensor tdQsdS = thr_copy_a_dq.partition_S(sdS);
        auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);
        auto thr_copy_b_dq = copy_b_dq.get_thread_slice(tidx);
        Tensor tdQsKt = thr_copy_b_dq.partition_S(sKt);

        Tensor acc_dk = partition_fragment_C(
            mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (MMA, MMA_N, MMA_D)
        Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
        clear(acc_dk);
        clear(acc_dv);

        // Rows of the score tile this thread holds, as (row, col) coordinates.
        Tensor score_coords =
            thr_mma_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
        Tensor score_coords_rc =
            make_tensor(score_coords.data(), accumulator_as_rows_cols(score_coords.layout()));
        constexpr int kRowsPerThread = decltype(size<0>(score_coords_rc))::value;

        for (int head = head_k * group_size; head < (head_k + 1) * group_size; ++head) {
            if (m_begin >= m_end) break;
            const Mask mask(params, seq, batch, head);  // ALiBi's slope is per query head
            // The previous head's last dK product may still be reading Q stage 0.
            __syncthreads();
            const Element* q_base =
                static_cast<const Element*>(params.q_ptr) +
                seq.q_offset(params.q_batch_stride, params.q_row_stride, batch) +
                head * params.q_head_stride;
            const Element* do_base =
                static_cast<const Element*>(params.do_ptr) +
                seq.q_offset(params.do_batch_stride, params.do_row_stride, batch) +
                head * params.do_head_stride;
            const int64_t row_stats_offset =
                head * params.lse_head_stride + seq.lse_offset(params.lse_batch_stride, batch);
            const float* lse_base = params.softmax_lse_ptr + row_stats_offset;
            const float* d_base = params.softmax_d_ptr + row_stats_offset;

            // Q of a row block and its per-row statistics: LSE and D, one float per thread with
            // 4-byte cp.async, so that they arrive with Q instead of stalling the loop on global
            // loads (ncu, bf16 d128: loading them with plain loads at the top of the loop made
            // long-scoreboard stalls three times FlashAttention-2's).
            auto load_q = [&](int m_block, int stage) {
                Tensor gQ = row_tile<kBlockM, kHeadDim>(q_base, m_block, params.q_row_stride);
                Tensor dst =
                    make_tensor(tQsQ.data() + stage * Traits::kSmemElemsQdO, tQsQ.layout());
                const int rows_left = seq.seqlen_q - m_block * kBlockM;
                copy_tile_zero_fill(gmem_tiled_copy, gmem_thr_copy.partition_S(gQ), dst, tQcQ,
                                    col_valid, rows_left);
                if (tidx < Traits::kSmemRowStatsFloats) {
                    const int row = tidx % kBlockM;
                    const float* stats = tidx < kBlockM ? lse_base : d_base;
                    cp_async_float_zero_fill(
                        row_stats_smem + stage * Traits::kSmemRowStatsFloats + tidx,
                        stats + m_block * kBlockM + row, row < rows_left);
                }
            };
            auto load_do = [&](int m_block) {
                Tensor gdO = row_tile<kBlockM, kHeadDim>(do_base, m_block, params.do_row_stride);
                copy_tile_zero_fill(gmem_tiled_copy, gmem_thr_copy.partition_S(gdO), tdOsdO, tQcQ,
                                    col_valid, seq.seqlen_q - m_block * kBlockM);
            };

            load_q(m_begin, 0);
            load_do(m_begin);
            cp_async_fence();

            for (int m_block = m_begin; m_block < m_end; ++m_block) {
                const int stage = kQStages == 1 ? 0 : (m_block - m_begin) % kQStages;
                const int q_stage_offset = stage * Traits::kSmemElemsQdO;
                const int rows_left_q = seq.seqlen_q - m_block * kBlockM;
                // Q and dO of this row block landed, and every warp is done with the previous
                // block's P, dS and Q stage.
                cp_async_wait<0>();
                __syncthreads();
                if (pending_dq_tile != nullptr) {  // the previous row block's, staged and fenced
                    if (tidx == 0) {
                        issue_dq_tile_add(pending_dq_tile, dq_staging, Traits::kSmemDqStagingBytes);
                    }
                    pending_dq_tile = nullptr;
                }

                // Per-row statistics. Rows past the sequence end, and rows that saw no key in the
                // forward (LSE = -inf), use LSE = +inf so that P = 0 and their gradients vanish.
                const float* stage_lse = row_stats_smem + stage * Traits::kSmemRowStatsFloats;
                const float* stage_d = stage_lse + kBlockM;
                float lse_log2[kRowsPerThread];
                CUTE_UNROLL
                for (int r = 0; r < kRowsPerThread; ++r) {
                    const int row = get<0>(score_coords_rc(r, 0));
                    const float lse = row < rows_left_q ? stage_lse[row] : INFINITY;
                    lse_log2[r] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
                }

                Tensor acc_s = partition_fragment_C(
                    mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
                clear(acc_s);
                gemm_smem_smem(mma_sdp, acc_s, tSrQ, tSrK,
                               make_tensor(tSsQ.data() + q_stage_offset, tSsQ.layout()), tSsK,
                               copy_a_sdp, copy_b_sdp, thr_copy_a_sdp, thr_copy_b_sdp);
                if (kHasVariants && params.softcap_prescale != 0.f) {
                    apply_softcap(acc_s, params.softcap_prescale);
                }
                if (mask.template tile_needs_mask<kBlockM, kBlockN>(m_block * kBlockM,
                                                                    n_block * kBlockN)) {
                    mask.apply_by_coordinates(acc_s,
                                              thr_mma_sdp.partition_C(make_identity_tensor(
                                                  Shape<Int<kBlockM>, Int<kBlockN>>{})),
                                              m_block * kBlockM, n_block * kBlockN);
                }
                // P = exp2(scale_log2 * S - LSE_log2): the forward's probabilities, recomputed.
                Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
                CUTE_UNROLL
                for (int r = 0; r < kRowsPerThread; ++r) {
                    CUTE_UNROLL
                    for (int c = 0; c < size<1>(scores); ++c) {
                        scores(r, c) = exp2f(scores(r, c) * params.logit_scale_log2 - lse_log2[r]);
                    }
                }
                // Dropout: dV takes the kept probabilities, scaled (the forward's P V operand).
                using KeepBits = TileKeepBits<decltype(size<1>(acc_s) * size<2>(acc_s))::value>;
                KeepBits keep;
                if (kHasVariants && has_dropout) {
                    keep = tile_keep_bits(Dropout(params, batch, head),
                                          thr_mma_sdp.partition_C(make_identity_tensor(
                                              Shape<Int<kBlockM>, Int<kBlockN>>{})),
                                          m_block * kBlockM, n_block * kBlockN);
                }
                Tensor rP = kHasVariants && has_dropout
                                ? dropped_fragment<Element>(acc_s, keep, params.dropout_rescale)
                                : convert_fragment<Element>(acc_s);
                copy(copy_store_sdp, thr_copy_store_sdp.retile_S(rP), tPsP);

                Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
                clear(acc_dp);
                gemm_smem_smem(mma_sdp, acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, copy_a_sdp,
                               copy_b_sdp, thr_copy_a_sdp, thr_copy_b_sdp);
                // Dropout: the gradient reaches only the kept probabilities, scaled.
                if (kHasVariants && has_dropout) {
                    CUTE_UNROLL
                    for (int i = 0; i < size(acc_dp); ++i) {
                        acc_dp(i) = keep.kept(i) ? acc_dp(i) * params.dropout_rescale : 0.f;
                    }
                }
                // dS = P * (dP - D), in place of dP. D of rows past the end is 0 (zero-filled).
                Tensor ds = make_tensor(acc_dp.data(), scores.layout());
                CUTE_UNROLL
                for (int r = 0; r < kRowsPerThread; ++r) {
                    const float row_d = stage_d[get<0>(score_coords_rc(r, 0))];
                    CUTE_UNROLL
                    for (int c = 0; c < size<1>(ds); ++c) {
                        ds(r, c) = scores(r, c) * (ds(r, c) - row_d);
                    }
                }
                if (kHasVariants && params.softcap_prescale != 0.f) {
                    multiply_by_softcap_derivative(ds, scores, score_coords_rc, stage_lse, mask,
                                                   params.logit_scale_log2, rows_left_q,
                                                   m_block * kBlockM, n_block * kBlockN);
                }

                const bool has_next = m_block + 1 < m_end;
                if (kQStages == 2 && has_next) {
                    load_q(m_block + 1, 1 - stage);  // that stage's last reader was block m - 1
                    cp_async_fence();
                }
                Tensor rdS = convert_fragment<Element>(acc_dp);
                copy(copy_store_sdp, thr_copy_store_sdp.retile_S(rdS), tdSsdS);
                __syncthreads();  // P and dS visible to every warp

                gemm_smem_smem(mma_dkv, acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, copy_a_dkv,
                               copy_b_dkv, thr_copy_a_dkv, thr_copy_b_dkv);
                // The staged dQ tile has been read by the bulk add issued at the top.
                if (bulk_dq_adds && tidx == 0) wait_dq_tile_read();
                __syncthreads();  // every warp is done reading dO of this block (and the staging)
                if (has_next) {
                    load_do(m_block + 1);
                    cp_async_fence();
                }

                gemm_smem_smem(mma_dkv, acc_dk, tdKrdSt, tdKrQt, tdKsdSt,
                               make_tensor(tdKsQt.data() + q_stage_offset, tdKsQt.layout()),
                               copy_a_dkv, copy_b_dkv, thr_copy_a_dkv, thr_copy_b_dkv);
                if (kQStages == 1 && has_next) {
                    __syncthreads();  // every warp is done reading Q of this block
                    load_q(m_block + 1, 0);
                    cp_async_fence();
                }

                // dQ last, so that its adds (or its staging for the bulk add) meet the next row
                // block's barrier rather than the dK product. Placed before dK (FlashAttention-2's
                // order), the `red` adds' source registers were taken for dK's operands at once,
                // and the loads that overwrote them waited for the adds to leave the queue (ncu,
                // H200, bf16 d128: 5% of the kernel's samples; 1.13 ms -> 1.11 ms moved here).
                Tensor acc_dq = partition_fragment_C(
                    mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
                clear(acc_dq);
                gemm_smem_smem(mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, copy_a_dq, copy_b_dq,
                               thr_copy_a_dq, thr_copy_b_dq);
                float* dq_tile = dq_accum_tile<Traits>(params, seq, batch, head, m_block);
                if (bulk_dq_adds) {
                    stage_dq_fragment<Traits::kNThreads>(dq_staging, acc_dq);
                    fence_staged_dq();
                    pending_dq_tile = dq_tile;
                } else {
                    int* turn = params.dq_semaphore == nullptr
                                    ? nullptr
                                    : dq_semaphore_slot(params, batch, head, seq.q_start,
                                                        m_block * kBlockM);
                    // The key blocks that visit this row block take turns from its first one.
                    const int turn_index =
                        n_block - mask.template key_block_begin<kBlockM, kBlockN>(m_block);
                    if (turn != nullptr) wait_for_turn(turn, turn_index);
                    add_dq_fragment<Traits::kNThreads>(dq_tile, acc_dq);
                    if (turn != nullptr) pass_turn(turn, turn_index);
                }
            }
        }

        // Epilogue: dK carries the softmax scale (S was scaled in the forward); stage dK and dV
        // through the shared memory of K and V for 16-byte row-contiguous stores.
        CUTE_UNROLL
        for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= params.softmax_scale;
        Tensor rdK = convert_fragment<Element>(acc_dk);
        Tensor rdV = convert_fragment<Element>(acc_dv);
        cp_async_wait<0>();
        __syncthreads();  // every warp is done reading K and V (and no copy is in flight)
        if (pending_dq_tile != nullptr && tidx == 0) {
            issue_dq_tile_add(pending_dq_tile, dq_staging, Traits::kSmemDqStagingBytes);
        }
        auto copy_store_dkv = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_dkv);
        auto thr_copy_store_dkv = copy_store_dkv.get_thread_slice(tidx);
        copy(copy_store_dkv, thr_copy_store_dkv.retile_S(rdK), thr_copy_store_dkv.partition_D(sK));
        copy(copy_store_dkv, thr_copy_store_dkv.retile_S(rdV), thr_copy_store_dkv.partition_D(sV));
        __syncthreads();  // dK and dV complete before threads read rows written by other warps

        Element* dk_base = static_cast<Element*>(params.dk_ptr) +
                           seq.k_offset(params.dk_batch_stride, params.dk_row_stride, batch) +
                           head_k * params.dk_head_stride;
        Element* dv_base = static_cast<Element*>(params.dv_ptr) +
                           seq.k_offset(params.dv_batch_stride, params.dv_row_stride, batch) +
                           head_k * params.dv_head_stride;
        Tensor gdK = row_tile<kBlockN, kHeadDim>(dk_base, n_block, params.dk_row_stride);
        Tensor gdV = row_tile<kBlockN, kHeadDim>(dv_base, n_block, params.dv_row_stride);
        store_tile_from_smem<typename Traits::GmemTiledCopyStore>(sK, gdK, rows_left_k,
                                                                  params.head_dim);
        store_tile_from_smem<typename Traits::GmemTiledCopyStore>(sV, gdV, rows_left_k,
                                                                  params.head_dim);
        // The bulk adds read shared memory and must land before the conversion kernel reads dQ.
        if (bulk_dq_adds && tidx == 0) wait_dq_tile_adds();
    }

    // Scales dS (in the rows-cols view, like the probabilities `probs`) by the soft-cap's
    // derivative 1 - raw^2, raw recovered from the probability (score_transforms.h).
    template <typename DsTensor, typename ProbTensor, typename CoordsRC>
    __device__ static void multiply_by_softcap_derivative(DsTensor& ds, const ProbTensor& probs,
                                                          const CoordsRC& coords_rc,
                                                          const float* stage_lse, const Mask& mask,
                                                          float logit_scale_log2, int rows_left_q,
                                                          int row0, int col0) {
        CUTE_UNROLL
        for (int r = 0; r < size<0>(ds); ++r) {
            const int row = get<0>(coords_rc(r, 0));
            // Rows past the end have P = 0 and keep dS = 0 whatever LSE is read for them.
            const float lse_log2 = row < rows_left_q ? stage_lse[row] * float(M_LOG2E) : 0.f;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(ds); ++c) {
                const float bias = mask.alibi_bias(row0 + row, col0 + get<1>(coords_rc(r, c)));
                ds(r, c) *= softcap_derivative(probs(r, c), lse_log2, logit_scale_log2, bias);
            }
        }
    }
};

// Grid: (key blocks of the longest sequence, batch, kv heads). Key blocks of one (sequence, kv
// head) are adjacent in launch order, which the deterministic mode's ordering relies on.
template <typename Traits, bool kIsLocal, bool kHasVariants>
__global__ void __launch_bounds__(Traits::kNThreads)
    flash_bwd_kernel(const __grid_constant__ FlashBwdParams params) {
    extern __shared__ __align__(128) char smem[];
    FlashBwdKeyBlock<Traits, kIsLocal, kHasVariants>::run(params, smem, blockIdx.x, blockIdx.y,
                                                          blockIdx.z);
}

}  // namespace sm80
}  // namespace flash_varlen
