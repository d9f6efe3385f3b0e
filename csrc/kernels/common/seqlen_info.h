// Where one sequence of the batch lives: read cu_seqlens once per thread block, then let the rest
// of the kernel work on a dense (seqlen, heads, head_dim) view of that sequence.
#pragma once

#include <cstdint>

#include "kernels/common/flash_params.h"

namespace flash_varlen {

struct SeqlenInfo {
    bool is_varlen;
    int q_start;  // first token of the sequence in the packed q (0 in the fixed-length layout)
    int k_start;
    int seqlen_q;
    int seqlen_k;

    // With seqused_q / seqused_k the lengths are the used ones: the sequence is the first
    // seqused rows of its slot, which still starts at cu_seqlens[batch_idx].
    __device__ SeqlenInfo(const FlashFwdParams& params, int batch_idx)
        : is_varlen(params.cu_seqlens_q != nullptr),
          q_start(is_varlen ? params.cu_seqlens_q[batch_idx] : 0),
          k_start(is_varlen ? params.cu_seqlens_k[batch_idx] : 0),
          seqlen_q(params.seqused_q != nullptr ? params.seqused_q[batch_idx]
                   : is_varlen                 ? params.cu_seqlens_q[batch_idx + 1] - q_start
                                               : params.seqlen_q),
          seqlen_k(params.seqused_k != nullptr ? params.seqused_k[batch_idx]
                   : is_varlen                 ? params.cu_seqlens_k[batch_idx + 1] - k_start
                                               : params.seqlen_k) {}

    // Element offset of the sequence's first q (or o) row: packed rows in the varlen layout,
    // a batch stride in the fixed-length one.
    __device__ int64_t q_offset(int64_t batch_stride, int64_t row_stride, int batch_idx) const {
        return is_varlen ? int64_t(q_start) * row_stride : int64_t(batch_idx) * batch_stride;
    }

    __device__ int64_t k_offset(int64_t batch_stride, int64_t row_stride, int batch_idx) const {
        return is_varlen ? int64_t(k_start) * row_stride : int64_t(batch_idx) * batch_stride;
    }

    // Offset of the sequence's first LSE entry within one head's row of the LSE tensor.
    __device__ int64_t lse_offset(int64_t batch_stride, int batch_idx) const {
        return is_varlen ? int64_t(q_start) : int64_t(batch_idx) * batch_stride;
    }
};

}  // namespace flash_varlen
