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

// Backward: the forward's tensors (q, k, v, o, softmax_lse, read only) plus the gradients.
struct FlashBwdParams : FlashFwdParams {
    // dout like q; dq like q; dk, dv like k.
    const void* __restrict__ do_ptr;
    void* __restrict__ dq_ptr;
    void* __restrict__ dk_ptr;
    void* __restrict__ dv_ptr;
    int64_t do_batch_stride, do_row_stride, do_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

    // Gradient of the loss with respect to softmax_lse, laid out like it; nullptr when zero.
    const float* __restrict__ softmax_lse_grad_ptr;
    // rowsum(dO * O) - dLSE per query row, float32, laid out like softmax_lse (preprocess output).
    float* __restrict__ softmax_d_ptr;

    // dQ accumulated over key blocks in float32: (nheads, query rows + batch * kBlockM, head-dim
    // bucket), in tiles of one row block each; see dq_accum.h for the layout.
    float* __restrict__ dq_accum_ptr;
    int64_t dq_accum_head_stride;  // rows * head-dim bucket

    // Varlen gradients the backward allocated itself: rows from cu_seqlens_q[batch] (dq) and
    // cu_seqlens_k[batch] (dk, dv) up to these row counts are zeroed (clear_rows_past_end.h).
    // 0: nothing to clear (a buffer given by the caller, or the fixed-length layout).
    int64_t clear_dq_rows_until;
    int64_t clear_dk_rows_until;
    int64_t clear_dv_rows_until;

    // Deterministic mode: one counter per (head, query row block) that orders the dQ adds of
    // the key blocks (key block j adds after j - 1). nullptr: unordered atomic adds.
    // Counters are indexed in units of kSemaphoreRows query rows (see dq_semaphore_slot), so the
    // host can size the array without knowing the kernel's row-block size.
    int* __restrict__ dq_semaphore;
    int dq_semaphore_head_stride;  // counters per head
};

// Granularity of the dq_semaphore slots; every backward row block is a multiple of it.
constexpr int kSemaphoreRows = 64;

}  // namespace flash_varlen
