// The decode kernel: one CTA per (request, KV head, row block, key split). The CTA's query rows
// are every query head of the KV group for every query token (GQA packing, row = token * group +
// head in group), so all of them share one read of the group's K and V. K and V stream through
// a kStages-deep cp.async ring of 64-key blocks gathered row by row through the cache addressing
// (kv_cache_rows.h); each warp runs an online softmax over its rows and its slice of every
// block (decode_kernel_traits.h), and the epilogue merges the warps' slices in shared memory and
// writes either the output (one split) or the split's float32 partial output and LSE for the
// combine kernel (combine_kernel.h), as FlashAttention-2's flash_fwd_splitkv_kernel does.
//
// Scores are kept in log2 units: x = raw * logit_scale_log2 + ALiBi bias, raw = q.k or, with
// soft-capping, tanh(q.k * softcap_prescale) (flash_params.h); probabilities are exp2(x - max).
// Masking is a run-time test per score (no local-mask instantiation): the window sides of an
// unbounded mask are numbers no distance reaches, and the test is a few integer operations per
// score in a kernel bound by HBM.
#pragma once

#include <cutlass/fast_math.h>
#include <cutlass/numeric_conversion.h>

#include <cmath>
#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/softmax_rows.h"
#include "kernels/decode/decode_kernel_traits.h"
#include "kernels/decode/kv_cache_rows.h"
#include "kernels/decode/warp_gemm.h"

namespace flash_varlen {
namespace decode {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Which CTA this is: blockIdx.x enumerates (row block fastest, then split, KV head, request),
// so that the row blocks of one (request, KV head, split), which read the same keys, run
// together; one grid dimension has no 65535 limit on batch * nheads_k.
struct DecodeTile {
    int row_block;
    int split;
    int kv_head;
    int request;

    __device__ DecodeTile(int linear, int row_blocks, int splits, int nheads_k) {
        row_block = linear % row_blocks;
        linear /= row_blocks;
        split = linear % splits;
        linear /= splits;
        kv_head = linear % nheads_k;
        request = linear / nheads_k;
    }
};

// The visible keys and biases of the CTA's rows, for one request.
struct DecodeMask {
    int seqlen_k;
    int diagonal;  // the key aligned with query token 0
    int window_left;
    int window_right;

    // The first key some token in [first_token, last_token] may see, and one past the last.
    __device__ int key_begin(int first_token) const {
        return max(first_token + diagonal - window_left, 0);
    }
    __device__ int key_end(int last_token) const {
        return min(last_token + diagonal + window_right + 1, seqlen_k);
    }
    __device__ bool visible(int token, int key) const {
        return key < seqlen_k && key >= token + diagonal - window_left &&
               key <= token + diagonal + window_right;
    }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    decode_kernel(const __grid_constant__ FlashDecodeParams params,
                  const __grid_constant__ cutlass::FastDivmod page_size) {
    using Element = typename Traits::Element;
    constexpr int kHeadDim = Traits::kHeadDim;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kStages = Traits::kStages;
    constexpr int kStepKeys = Traits::kStepKeys;
    constexpr int kElems = Traits::kElemsPerVector;

    extern __shared__ char smem[];
    const int group = params.nheads / params.nheads_k;
    const int rows = group * params.seqlen_q;
    const int row_blocks = cute::ceil_div(rows, kBlockM);
    const DecodeTile tile(blockIdx.x, row_blocks, params.num_splits, params.nheads_k);
    const int tid = threadIdx.x;
    const int lane = tid % 32;
    const int warp = tid / 32;
    const int warp_m = warp % Traits::kWarpsM;
    const int warp_n = warp / Traits::kWarpsM;

    // ---- The request's keys, and the key blocks of this split.
    const KvCacheRows cache(params, page_size, tile.request);
    // Keys are cache positions [start, end), clamped into the cache's capacity; end counts the
    // keys the call appended (cache_append_kernel.h, launched before this kernel).
    const int key_end =
        min(params.cache_seqlens[tile.request] + params.append.seqlen_new, params.seqlen_k);
    const int seqlen_k = max(key_end - cache.start(), 0);
    const int seqlen_q = params.seqlen_q;
    const DecodeMask mask{seqlen_k, params.causal_top_left ? 0 : seqlen_k - seqlen_q,
                          params.window_left, params.window_right};
    const int first_row = tile.row_block * kBlockM;
    const int last_row = min(first_row + kBlockM, rows) - 1;
    const int key_lo = mask.key_begin(first_row / group);
    const int key_hi = mask.key_end(last_row / group);
    const int block_lo = key_lo / kBlockN;
    const int blocks = key_hi > key_lo ? cute::ceil_div(key_hi, kBlockN) - block_lo : 0;
    const int per_split = cute::ceil_div(blocks, params.num_splits);
    const int split_begin = block_lo + min(tile.split * per_split, blocks);
    const int split_blocks = max(min(per_split, blocks - tile.split * per_split), 0);

    // ---- Shared memory and this thread's share of the global loads.
    Element* smem_q = reinterpret_cast<Element*>(smem);
    Element* smem_k = smem_q + Traits::kSmemBytesQ / int(sizeof(Element));
    Element* smem_v = smem_k + Traits::kSmemBytesKV / 2 / int(sizeof(Element));
    Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
    const int vector_col = (tid % Traits::kVectorsPerRow) * kElems;
    const int pass_row = tid / Traits::kVectorsPerRow;
    const bool col_in_head = vector_col < params.head_dim;
    const Element* k_base =
        static_cast<const Element*>(params.k_ptr) + tile.kv_head * params.k_head_stride;
    const Element* v_base =
        static_cast<const Element*>(params.v_ptr) + tile.kv_head * params.v_head_stride;

    using Vector = cute::uint128_t;
    auto copy_vector = [](const Element* src, Element* dst, bool valid) {
        SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<Vector>::copy(*reinterpret_cast<const Vector*>(src),
                                                      *reinterpret_cast<Vector*>(dst), valid);
    };

    // Q: row r of the tile is token (first_row + r) / group, query head kv_head * group + its
    // remainder; rows past the last token and columns past head_dim are zero-filled.
    const Element* q_base = static_cast<const Element*>(params.q_ptr) +
                            tile.request * params.q_batch_stride +
                            tile.kv_head * group * params.q_head_stride;
    CUTE_UNROLL
    for (int i = 0; i < Traits::kQueryPasses; ++i) {
        const int r = pass_row + i * Traits::kRowsPerPass;
        if (r < kBlockM) {
            const int row = first_row + r;
            const bool valid = row <= last_row && col_in_head;
            const Element* src = valid ? q_base + (row / group) * params.q_row_stride +
                                             (row % group) * params.q_head_stride + vector_col
                                       : q_base;
            copy_vector(src, &sQ(r, vector_col), valid);
        }
    }

    // K and V of one block: this thread's kKeyPasses rows, through the cache addressing. A paged
    // cache's pages are looked up one block ahead (fetch_pages) so that the table reads hide
    // behind the previous block's math; a row past the last key looks up the last key's page
    // (a block exists only when there is a key), so the reads need no branch, and load_block
    // zero-fills that row anyway. A contiguous cache's rows all lie in its entry: one uniform
    // branch per block instead of one per row.
    int pages[Traits::kKeyPasses];
    CUTE_UNROLL
    for (int i = 0; i < Traits::kKeyPasses; ++i) pages[i] = cache.entry();
    auto fetch_pages = [&](int block) {
        if (!cache.paged()) return;
        CUTE_UNROLL
        for (int i = 0; i < Traits::kKeyPasses; ++i) {
            const int key = block * kBlockN + pass_row + i * Traits::kRowsPerPass;
            pages[i] = cache.page_of(min(key, seqlen_k - 1));
        }
    };
    auto load_block = [&](int block, int stage) {
        CUTE_UNROLL
        for (int i = 0; i < Traits::kKeyPasses; ++i) {
            const int r = pass_row + i * Traits::kRowsPerPass;
            const int key = block * kBlockN + r;
            // Keys past the end are zero-filled, never left stale: P is 0 there, and 0 times a
            // stale NaN would still be NaN. Their source address is the last key's row (no
            // branch; a zero-fill reads nothing), and columns past head_dim its first vector.
            const bool valid = key < seqlen_k && col_in_head;
            const int64_t offset =
                cache.row_offset(min(key, seqlen_k - 1), pages[i]) + (col_in_head ? vector_col : 0);
            copy_vector(k_base + offset, &sK(r, vector_col, stage), valid);
            copy_vector(v_base + offset, &sV(r, vector_col, stage), valid);
        }
    };

    // Prologue: Q with the first block, then the rest of the ring. Every step commits a group,
    // empty or not, so that cp_async_wait<kStages - 2> always means "the oldest block landed".
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < split_blocks) {
            fetch_pages(split_begin + s);
            load_block(split_begin + s, s);
        }
        cp_async_fence();
    }

    // ---- Per-warp MMA partitions.
    typename Traits::WarpMma mma;
    auto q_copy = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
    auto k_copy = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
    auto v_copy = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
    auto q_thr_copy = q_copy.get_slice(lane);
    auto k_thr_copy = k_copy.get_slice(lane);
    auto v_thr_copy = v_copy.get_slice(lane);
    using WarpRows = Int<Traits::kMmaRows>;
    Tensor sQ_warp = local_tile(sQ, Shape<WarpRows, Int<kHeadDim>>{}, make_coord(warp_m, 0));
    Tensor tSsQ = q_thr_copy.partition_S(sQ_warp);  // (CPY, CPY_M, CPY_K)
    Tensor tSrQ = make_tensor<Element>(
        partition_shape_A(mma, Shape<WarpRows, Int<kHeadDim>>{}));               // (MMA, 1, d / 16)
    Tensor acc_o = partition_fragment_C(mma, Shape<WarpRows, Int<kHeadDim>>{});  // (4, 1, d / 8)
    clear(acc_o);

    // This thread's two rows of the warp's tile (an m16n8 accumulator gives lane l rows l / 4
    // and l / 4 + 8, columns 2 (l % 4) + {0, 1} of each n8 atom), and their token and bias.
    constexpr int kHalves = 2;
    constexpr int kRowHalf = 8;
    int token[kHalves];
    float alibi_log2[kHalves];  // the ALiBi slope of the row's head in log2-logit units
    float row_max[kHalves];     // running max of x
    float row_sum[kHalves];     // this thread's share of sum exp2(x - row_max)
    CUTE_UNROLL
    for (int h = 0; h < kHalves; ++h) {
        const int row = first_row + warp_m * Traits::kMmaRows + lane / 4 + h * kRowHalf;
        token[h] = row / group;
        const int head = tile.kv_head * group + row % group;
        alibi_log2[h] =
            params.alibi_slopes == nullptr || row > last_row
                ? 0.f
                : params.alibi_slopes[tile.request * params.alibi_batch_stride + head] * kLog2e;
        row_max[h] = -INFINITY;
        row_sum[h] = 0.f;
    }

    if (split_blocks > 0) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        copy(q_copy, tSsQ, q_thr_copy.retile_D(tSrQ));
    }

    for (int it = 0; it < split_blocks; ++it) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        const int block = split_begin + it;
        const int stage = it % kStages;
        const int ahead = it + kStages - 1;
        if (ahead < split_blocks) fetch_pages(split_begin + ahead);

        CUTE_UNROLL
        for (int step = 0; step < Traits::kStepsPerWarp; ++step) {
            const int step_index = warp_n * Traits::kStepsPerWarp + step;
            // S = Q K^T over the step's keys.
            Tensor sK_step = local_tile(sK(_, _, stage), Shape<Int<kStepKeys>, Int<kHeadDim>>{},
                                        make_coord(step_index, 0));
            Tensor tSsK = k_thr_copy.partition_S(sK_step);  // (CPY, CPY_N, d / 16)
            Tensor acc_s =
                partition_fragment_C(mma, Shape<WarpRows, Int<kStepKeys>>{});  // (4, 1, keys/8)
            clear(acc_s);
            gemm_a_in_registers<kStepKeys>(mma, acc_s, tSrQ, tSsK, k_copy, k_thr_copy);

            // Scores in log2 units, masked, then the online softmax update per row. acc_s's
            // linear index j holds column 8 (j / 4) + 2 (lane % 4) + j % 2 of row half
            // (j / 2) % 2.
            const int key0 = block * kBlockN + step_index * kStepKeys + 2 * (lane % 4);
            CUTE_UNROLL
            for (int j = 0; j < size(acc_s); ++j) {
                const int h = (j / 2) % kHalves;
                const int key = key0 + 8 * (j / 4) + j % 2;
                float raw = acc_s(j);
                if (params.softcap_prescale != 0.f) raw = tanhf(raw * params.softcap_prescale);
                const float bias = -alibi_log2[h] * fabsf(float(token[h] + mask.diagonal - key));
                acc_s(j) =
                    mask.visible(token[h], key) ? raw * params.logit_scale_log2 + bias : -INFINITY;
            }
            float rescale[kHalves];
            CUTE_UNROLL
            for (int h = 0; h < kHalves; ++h) {
                float step_max = -INFINITY;
                CUTE_UNROLL
                for (int j = 0; j < size(acc_s); ++j) {
                    if ((j / 2) % kHalves == h) step_max = fmaxf(step_max, acc_s(j));
                }
                const float new_max = fmaxf(row_max[h], quad_allreduce_max(step_max));
                // A row that has seen no visible key yet keeps max -inf; exponentiate against 0
                // then, so that -inf - -inf never makes a NaN (FlashAttention-2's Check_inf).
                const float reference = new_max == -INFINITY ? 0.f : new_max;
                rescale[h] = exp2f(row_max[h] - reference);
                row_max[h] = new_max;
                row_sum[h] *= rescale[h];
                CUTE_UNROLL
                for (int j = 0; j < size(acc_s); ++j) {
                    if ((j / 2) % kHalves == h) {
                        acc_s(j) = exp2f(acc_s(j) - reference);
                        row_sum[h] += acc_s(j);
                    }
                }
            }
            CUTE_UNROLL
            for (int j = 0; j < size(acc_o); ++j) acc_o(j) *= rescale[(j / 2) % kHalves];

            // P in the A-operand layout: the accumulators of n8 atoms 2k and 2k + 1 are, in
            // order, the A fragment of k-step k, so the conversion is element for element.
            constexpr int kScores = decltype(size(acc_s))::value;
            Tensor tOrP = make_tensor<Element>(
                partition_shape_A(mma, Shape<WarpRows, Int<kStepKeys>>{}));  // (MMA, 1, keys/16)
            cutlass::NumericArrayConverter<Element, float, kScores> convert;
            *reinterpret_cast<cutlass::Array<Element, kScores>*>(raw_pointer_cast(tOrP.data())) =
                convert(*reinterpret_cast<const cutlass::Array<float, kScores>*>(
                    raw_pointer_cast(acc_s.data())));

            // O += P V over the step's keys.
            Tensor sVt_step = local_tile(sVt(_, _, stage), Shape<Int<kHeadDim>, Int<kStepKeys>>{},
                                         make_coord(0, step_index));
            Tensor tOsVt = v_thr_copy.partition_S(sVt_step);  // (CPY, CPY_N, keys / 16)
            gemm_a_in_registers<kHeadDim>(mma, acc_o, tOrP, tOsVt, v_copy, v_thr_copy);
        }

        if (ahead < split_blocks) load_block(split_begin + ahead, ahead % kStages);
        cp_async_fence();
    }

    // ---- Epilogue: every warp's O, row max and row sum to shared memory (over the dead
    // pipeline), then each thread merges the warps' key slices for its (row, 8 columns).
    cp_async_wait<0>();
    __syncthreads();
    float* reduce_o = reinterpret_cast<float*>(smem);
    float* reduce_max = reduce_o + Traits::kWarpsN * kBlockM * Traits::kReduceRowStride;
    float* reduce_sum = reduce_max + Traits::kWarpsN * kBlockM;
    const int warp_row0 = warp_m * Traits::kMmaRows + lane / 4;
    CUTE_UNROLL
    for (int j = 0; j < size(acc_o); j += 2) {
        const int r = warp_row0 + kRowHalf * ((j / 2) % kHalves);
        const int col = 8 * (j / 4) + 2 * (lane % 4);
        float2* dst = reinterpret_cast<float2*>(
            reduce_o + (warp_n * kBlockM + r) * Traits::kReduceRowStride + col);
        *dst = make_float2(acc_o(j), acc_o(j + 1));
    }
    CUTE_UNROLL
    for (int h = 0; h < kHalves; ++h) {
        const float sum = quad_allreduce_sum(row_sum[h]);
        if (lane % 4 == 0) {
            reduce_max[warp_n * kBlockM + warp_row0 + kRowHalf * h] = row_max[h];
            reduce_sum[warp_n * kBlockM + warp_row0 + kRowHalf * h] = sum;
        }
    }
    __syncthreads();

    const bool final_output = params.num_splits == 1;
    constexpr int kChunk = 8;  // output columns per thread step: one 16-byte store of Element
    constexpr int kChunksPerRow = kHeadDim / kChunk;
    for (int item = tid; item < kBlockM * kChunksPerRow; item += Traits::kNThreads) {
        const int r = item / kChunksPerRow;
        const int col = (item % kChunksPerRow) * kChunk;
        const int row = first_row + r;
        if (row > last_row) continue;
        float merged_max = -INFINITY;
        CUTE_UNROLL
        for (int w = 0; w < Traits::kWarpsN; ++w) {
            merged_max = fmaxf(merged_max, reduce_max[w * kBlockM + r]);
        }
        const float reference = merged_max == -INFINITY ? 0.f : merged_max;
        float sum = 0.f;
        float o[kChunk] = {};
        CUTE_UNROLL
        for (int w = 0; w < Traits::kWarpsN; ++w) {
            const float weight = exp2f(reduce_max[w * kBlockM + r] - reference);
            sum += reduce_sum[w * kBlockM + r] * weight;
            const float* src = reduce_o + (w * kBlockM + r) * Traits::kReduceRowStride + col;
            CUTE_UNROLL
            for (int c = 0; c < kChunk; ++c) o[c] += src[c] * weight;
        }
        const int query_token = row / group;
        const int head = tile.kv_head * group + row % group;
        // The row's max in log2 units is merged_max; normalise_row takes it with logit_scale
        // ln 2 to give natural-log results. The sink joins the softmax once, in the final
        // output: partial results leave it to the combine.
        const float sink = final_output && params.learnable_sink != nullptr
                               ? params.learnable_sink[head]
                               : -INFINITY;
        const RowNormalisation norm = normalise_row(sum, merged_max, kLn2, 1.f, sink);
        if (final_output) {
            Element* out = static_cast<Element*>(params.o_ptr) +
                           tile.request * params.o_batch_stride +
                           query_token * params.o_row_stride + head * params.o_head_stride + col;
            if (col < params.head_dim) {
                cutlass::Array<Element, kChunk> values;
                CUTE_UNROLL
                for (int c = 0; c < kChunk; ++c) values[c] = Element(o[c] * norm.factor);
                *reinterpret_cast<cutlass::Array<Element, kChunk>*>(out) = values;
            }
            if (col == 0) {
                params.softmax_lse_ptr[tile.request * params.lse_batch_stride +
                                       head * params.lse_head_stride + query_token] = norm.lse;
            }
        } else {
            const int64_t query_row =
                (int64_t(tile.request) * params.nheads + head) * seqlen_q + query_token;
            const int64_t split_row =
                int64_t(tile.split) * params.batch * params.nheads * seqlen_q + query_row;
            float* out = params.partial_out + split_row * kHeadDim + col;
            CUTE_UNROLL
            for (int c = 0; c < kChunk; c += 4) {
                *reinterpret_cast<float4*>(out + c) =
                    make_float4(o[c] * norm.factor, o[c + 1] * norm.factor, o[c + 2] * norm.factor,
                                o[c + 3] * norm.factor);
            }
            if (col == 0) params.partial_lse[split_row] = norm.lse;
        }
    }
}

}  // namespace decode
}  // namespace flash_varlen
