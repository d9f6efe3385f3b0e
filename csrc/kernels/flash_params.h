// The only contract between the host bindings and the kernels: plain data, no torch types.
#pragma once

#include <cstdint>

namespace flash_varlen {

// Forward attention over a batch of sequences, either packed back to back (varlen, described by
// cu_seqlens) or stored with a uniform length and a batch stride (fixed length). Both layouts run
// the same kernels: fixed length is varlen with implicit uniform lengths.
struct FlashFwdParams {
    // q: (tokens, nheads, head_dim); k, v: (tokens, nheads_k, head_dim); o like q.
    const void* __restrict__ q_ptr;
    const void* __restrict__ k_ptr;
    const void* __restrict__ v_ptr;
    void* __restrict__ o_ptr;
    // softmax_lse: natural-log sum of exp of the scaled scores per query row, float32.
    float* __restrict__ softmax_lse_ptr;

    // Strides in elements. The batch strides are used only in the fixed-length layout.
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    // LSE is (nheads, total_q) for varlen and (batch, nheads, seqlen_q) for fixed length; its rows
    // of one head are contiguous in both, so a batch stride and a head stride describe both.
    int64_t lse_batch_stride, lse_head_stride;

    // (batch + 1,) prefix sums of the sequence lengths, or nullptr for the fixed-length layout.
    const int* __restrict__ cu_seqlens_q;
    const int* __restrict__ cu_seqlens_k;

    int batch;
    int nheads;
    int nheads_k;  // nheads % nheads_k == 0; query head h reads kv head h / (nheads / nheads_k)
    int head_dim;  // the real head dim; the kernel's tile width is the bucket >= head_dim
    // Fixed length: the uniform lengths. Varlen: upper bounds of the lengths (they size the grid).
    int seqlen_q;
    int seqlen_k;

    float softmax_scale;
    float softmax_scale_log2;  // softmax_scale * log2(e): the kernels exponentiate with exp2
};

}  // namespace flash_varlen
