// How many key splits a decode call runs, and the workspace they need: plain host C++ (no CUDA,
// no torch), so that a CPU test compiles this header alone and checks the rule.
//
// A decode CTA owns one (request, KV head, row block, split). Without splits a call has
// batch * nheads_k * row_blocks CTAs; when that does not fill the GPU (few requests with long
// caches: 16 x 32k with 8 KV heads is 128 CTAs for 132 SMs that each hold 2 of them) the HBM is
// idle behind too few loads in flight, so each request's keys are split and the partial results
// merged by LSE afterwards (FlashAttention-2's split-KV "Flash-Decoding"; its
// num_splits_heuristic is the model for the wave rule below). The lengths are not read on the
// host (no sync, CUDA-graph safe): the rule sees only the capacity of a cache, an upper bound of
// every length.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flash_varlen {
namespace decode {

// At most this many splits: the combine kernel reads one LSE per split per row, and beyond 64
// splits a 32k cache gives each split under 512 keys, where the split's prologue (Q load,
// pipeline fill) and the combine cost more than the extra parallelism brings.
constexpr int kMaxSplits = 64;
// A split reads at least this many key blocks, so that its pipeline reaches steady state.
constexpr int kMinBlocksPerSplit = 4;
// Among split counts whose wave efficiency is within this fraction of the best, the smallest
// wins: fewer splits means less partial-result traffic and a cheaper combine (FlashAttention-2
// uses the same 0.85).
constexpr double kWaveEfficiencySlack = 0.85;

struct SplitProblem {
    int64_t ctas_without_split;  // batch * nheads_k * row blocks
    int64_t max_key_blocks;      // key blocks of the longest possible cache (its capacity)
    int sm_count;
    int ctas_per_sm;  // resident decode CTAs per SM (occupancy of the kernel)
};

// The fraction of the CTA slots of the last wave that `ctas` CTAs use, averaged over the waves.
inline double wave_efficiency(int64_t ctas, int64_t slots) {
    const int64_t waves = (ctas + slots - 1) / slots;
    return double(ctas) / double(waves * slots);
}

// The rule: 1 split when the call already fills the GPU's CTA slots at least
// kWaveEfficiencySlack full; otherwise the smallest split count (at most kMaxSplits and at most
// max_key_blocks / kMinBlocksPerSplit) whose wave efficiency is within kWaveEfficiencySlack of
// the best one in that range.
inline int heuristic_num_splits(const SplitProblem& p) {
    const int64_t slots = int64_t(std::max(p.sm_count, 1)) * std::max(p.ctas_per_sm, 1);
    if (p.ctas_without_split <= 0) return 1;
    if (double(p.ctas_without_split) >= kWaveEfficiencySlack * double(slots)) return 1;
    const int64_t by_length = std::max<int64_t>(p.max_key_blocks / kMinBlocksPerSplit, 1);
    const int most = int(std::min<int64_t>(kMaxSplits, by_length));
    double best = 0.0;
    for (int s = 1; s <= most; ++s) {
        best = std::max(best, wave_efficiency(p.ctas_without_split * s, slots));
    }
    for (int s = 1; s <= most; ++s) {
        if (wave_efficiency(p.ctas_without_split * s, slots) >= kWaveEfficiencySlack * best) {
            return s;
        }
    }
    return most;
}

// A caller's num_splits (0: the heuristic), capped so that every split can own a key block.
inline int resolve_num_splits(int requested, const SplitProblem& p) {
    const int64_t cap = std::max<int64_t>(std::min<int64_t>(kMaxSplits, p.max_key_blocks), 1);
    const int64_t splits = requested > 0 ? requested : heuristic_num_splits(p);
    return int(std::min<int64_t>(splits, cap));
}

// Workspace of a call with `splits` > 1: the float32 partial outputs (splits, rows, bucket) and
// then their LSE (splits, rows), rows = batch * nheads * seqlen_q. One split writes the output
// directly and needs none.
struct SplitWorkspace {
    int64_t partial_out_floats;
    int64_t partial_lse_floats;

    int64_t bytes() const { return (partial_out_floats + partial_lse_floats) * 4; }
};

inline SplitWorkspace split_workspace(int splits, int64_t query_rows, int head_dim_bucket) {
    if (splits <= 1) return {0, 0};
    return {splits * query_rows * head_dim_bucket, splits * query_rows};
}

}  // namespace decode
}  // namespace flash_varlen
