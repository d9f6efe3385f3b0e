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

    // The kernels keep a "raw" score per (query, key) pair and get the logit (the softmax input)
    // as logit_scale * raw. Without soft-capping raw = q.k and logit_scale = softmax_scale; with
    // it raw = tanh(q.k * softcap_prescale) and logit_scale = softcap, so that
    // logit = softcap * tanh(softmax_scale * q.k / softcap) costs one multiply and one tanh more.
    float softmax_scale;  // the user's scale; the gradients of q and k carry it
    float logit_scale;
    float logit_scale_log2;  // logit_scale * log2(e): the kernels exponentiate with exp2
    float softcap_prescale;  // softmax_scale / softcap; 0 disables soft-capping

    // Visible keys (local mask): query i sees key j iff
    //   i + diagonal - window_left <= j <= i + diagonal + window_right,
    // with diagonal = seqlen_k - seqlen_q per sequence (bottom-right alignment) or 0
    // (causal_top_left). Causal is window_right = 0. An unbounded side is set by the host to a
    // value no distance reaches (max_seqlen_q + max_seqlen_k), so no kernel tests for it. Only
    // the local instantiations read the window; every kernel reads causal_top_left (ALiBi).
    int window_left;
    int window_right;
    bool causal_top_left;

    // ALiBi: bias -slope * |i + diagonal - j| on the logits, slope = alibi_slopes[batch *
    // alibi_batch_stride + head] (stride 0 for (nheads,) slopes). nullptr: no bias.
    const float* __restrict__ alibi_slopes;
    int64_t alibi_batch_stride;

    // (batch,) used lengths: sequence b is only the first seqused_q[b] (seqused_k[b]) rows of its
    // slot; nullptr: the whole slot. Varlen layout only.
    const int* __restrict__ seqused_q;
    const int* __restrict__ seqused_k;

    // Dropout (philox.h): a pair is kept when its 32-bit Philox draw is >= dropout_threshold;
    // kept probabilities are scaled by dropout_rescale = 1 / (1 - dropout_p). threshold 0: none.
    uint32_t dropout_threshold;
    float dropout_rescale;
    // Philox key and counter base: the values, or (under CUDA graph capture, and in the
    // backward) device pointers to them; offset_extra is added to the counter base either way.
    uint64_t philox_seed;
    uint64_t philox_offset;
    const int64_t* __restrict__ philox_seed_ptr;  // nullptr: use the values
    const int64_t* __restrict__ philox_offset_ptr;
    uint64_t philox_offset_extra;
    // Forward only: where the forward records (seed, offset) for the backward; nullptr: nowhere.
    int64_t* __restrict__ rng_state_out;
    // Forward, testing only: (batch, nheads, rows, cols) dropout pattern, the probability with
    // its sign bit set where dropped; nullptr: not written.
    void* __restrict__ dropout_mask_ptr;
    int64_t dropout_mask_batch_stride, dropout_mask_head_stride, dropout_mask_row_stride;

    // Attention sinks: (nheads,) logits, one more term exp(sink[head]) in every row's softmax
    // denominator (and LSE), with no value vector; nullptr: none. A row that sees no key gets
    // output 0 and LSE = sink[head].
    const float* __restrict__ learnable_sink;

    // Rows of q (and o) and of k (and v): total_q / total_k (varlen) or batch * seqlen
    // (fixed length). For the launchers: the sm80 backward sizes its workspace from total_q; the
    // sm90 forward's TMA descriptors end where the buffers end, so that a tile running past the
    // last sequence reads zeros instead of memory past the allocation.
    int64_t total_q;
    int64_t total_k;

    // Paged K/V (kernels/common/paged_rows.h): k_ptr and v_ptr are pools of num_pages pages of
    // page_size rows, (num_pages, page_size, nheads_k, head_dim), k/v_batch_stride being the
    // page strides, and key position j of sequence b is row j % page_size of page
    // block_table[b * block_table_batch_stride + j / page_size]; page numbers read from the
    // table are clamped into [0, num_pages), so no read leaves the pool. Read by the sm80
    // forward (the varlen layout's paged prefill: sequence b's keys are counted by cu_seqlens_k
    // or seqused_k but do not live at cu_seqlens_k[b]) and by the decode family (FlashDecodeParams,
    // whose contiguous cache addresses each entry as one page). nullptr: keys are rows of k and v.
    const int* __restrict__ block_table;
    int64_t block_table_batch_stride;
    int page_size;
    int num_pages;
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
    // With learnable_sink: each query row's term of the sink's gradient,
    // -exp(sink - lse) * (rowsum(dO * O) - dLSE), laid out like softmax_lse and zero-filled by the
    // host, which sums it per head (a fixed order: the gradient is reproducible). nullptr: none.
    float* __restrict__ sink_grad_rows_ptr;

    // Workspace of the sm80 family's backward, set by its launcher from the workspace it asked
    // for (sm80/flash_bwd_launch.h); other families keep theirs elsewhere.
    // dQ accumulated over key blocks in float32: (nheads, query rows + batch * kBlockM, head-dim
    // bucket), in tiles of one row block each; see sm80/dq_accum.h for the layout.
    float* __restrict__ dq_accum_ptr;
    int64_t dq_accum_head_stride;  // rows * head-dim bucket

    // Varlen gradients the backward allocated itself: rows from cu_seqlens_q[batch] (dq) and
    // cu_seqlens_k[batch] (dk, dv) up to these row counts are zeroed (clear_rows_past_end.h).
    // 0: nothing to clear (a buffer given by the caller, or the fixed-length layout).
    int64_t clear_dq_rows_until;
    int64_t clear_dk_rows_until;
    int64_t clear_dv_rows_until;

    // Deterministic mode (sm80 workspace): one counter per (head, query row block) that orders
    // the dQ adds of the key blocks (key block j adds after j - 1). nullptr: unordered atomic
    // adds. See sm80/dq_semaphore.h.
    int* __restrict__ dq_semaphore;
    int dq_semaphore_head_stride;  // counters per head

    // For the launchers, which size their workspace from it; no kernel reads it. (Kept last:
    // fields before it keep their offsets in the kernels' parameter space.)
    bool deterministic;  // order the dQ accumulation (bitwise reproducible dq)
};

// The append step of a decode call (decode/cache_append_kernel.h): new keys and values written
// into the cache, the keys and queries rotated. Strides in elements; the last dim is contiguous.
struct CacheAppend {
    // (batch, seqlen_new, nheads_k, head_dim) each; k == nullptr: no append (and no rotary).
    const void* __restrict__ k;
    const void* __restrict__ v;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int seqlen_new;
    // Rotary tables, (rotary_rows, rotary_dim / 2) each, float32 (rotary_tables_float) or the
    // element type; rotary_cos == nullptr: no rotary embedding.
    const void* __restrict__ rotary_cos;
    const void* __restrict__ rotary_sin;
    int64_t rotary_cos_row_stride, rotary_sin_row_stride;
    int rotary_rows;
    int rotary_dim;
    bool rotary_tables_float;
    bool rotary_interleaved;  // pairs (2j, 2j + 1), else (j, j + rotary_dim / 2)
    bool q_consecutive;       // query row i at cache_seqlens[b] + i, else all at cache_seqlens[b]
    // With rotary tables: the queries as given, (batch, seqlen_q, nheads, head_dim), and their
    // rotated copy, which the attention reads (q_ptr and the q_* strides describe it).
    const void* __restrict__ q;
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    void* __restrict__ q_rotated;
};

// Decode over a KV cache (the decode family): a few query tokens per request (q is the
// fixed-length layout: (batch, seqlen_q, nheads, d), o and softmax_lse likewise) against each
// request's keys in a cache, contiguous or paged. k_ptr / v_ptr point at the cache; its rows are
// addressed per key position (the decode family's kv_cache_rows.h), so the forward's fields for
// packed keys (cu_seqlens_k, seqused_k) are unused and k_batch_stride means a page or an entry.
// The paged fields are FlashFwdParams's: block_table nullptr means a contiguous cache, where
// request b reads entry cache_batch_idx[b] (or b) from position cache_leftpad[b] (or 0), and
// num_pages counts its entries (cache_batch_idx values are clamped into [0, num_pages)).
// seqlen_k is the capacity of one request's cache (max_pages * page_size, or the entry length): the
// upper bound of every cache_seqlens, read on the host only by the split heuristic, and the clamp
// of the lengths on the device.
struct FlashDecodeParams : FlashFwdParams {
    // (batch,) request b's cache length before the append: its keys are positions
    // cache_leftpad[b] (or 0) .. cache_seqlens[b] + append.seqlen_new - 1.
    const int* __restrict__ cache_seqlens;
    const int* __restrict__ cache_batch_idx;
    const int* __restrict__ cache_leftpad;

    // Key splits per (request, KV head); 0: the launcher's heuristic (decode/split_heuristic.h).
    int num_splits;
    // Set by the launcher from its workspace when a call runs more than one split: per split,
    // the float32 output of each query row normalised over the split's keys,
    // (splits, batch, nheads, seqlen_q, head-dim bucket), and its natural-log LSE,
    // (splits, batch, nheads, seqlen_q). The combine kernel merges them.
    float* __restrict__ partial_out;
    float* __restrict__ partial_lse;

    CacheAppend append;
};

// PyTorch's CUDA generator hands out Philox offsets in multiples of 4 (philox_cuda_state rounds
// the increment up): each launch takes this much, and philox.h divides offsets by it.
constexpr uint64_t kPhiloxOffsetGranularity = 4;

}  // namespace flash_varlen
