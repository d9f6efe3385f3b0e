// Compile-time shape of the sm90-family forward kernel: tile sizes, warpgroup roles and their
// register budgets, wgmma tiled MMAs, shared-memory layouts, TMA copy types and the pipelines.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/builders/sm90_common.inl>  // ss_smem_selector
#include <cutlass/pipeline/sm90_pipeline.hpp>

// Our wgmma atoms for the kBlockN that CuTe's base header lacks (64x176x16, ...) and
// ss_op_selector_extended, which picks them (csrc/generate.py writes them from the PTX ISA).
// CUTLASS declares such atoms only under CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED, whose headers
// would double this file's compile time; without an atom of its N, cute's ss_op_selector
// silently falls back to 64x16x16 atoms (11 instructions instead of one for kBlockN = 176). The
// static_asserts on the atom shapes below catch a miss.
#include "generated/sm90_wgmma_atoms.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/common/varlen_tile_schedule.h"  // TileCoordinates
#include "kernels/sm90/register_split.h"

namespace flash_varlen {
namespace sm90 {

using namespace cute;

constexpr int kThreadsPerWarpgroup = 128;
constexpr int kRowsPerMmaWarpgroup = 64;  // one wgmma atom is 64 rows tall

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct FwdKernelTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kStages = kStages_;

    // Warpgroup 0 is the producer (one thread of it issues every TMA load); warpgroups 1.. are
    // the consumers, each owning 64 query rows of the tile (FlashAttention-3's layout,
    // Dao-AILab/flash-attention hopper/flash_fwd_kernel_sm90.h).
    static constexpr int kNumMmaWarpgroups = kBlockM / kRowsPerMmaWarpgroup;
    static_assert(kBlockM % kRowsPerMmaWarpgroup == 0, "consumers own whole 64-row slices");
    static_assert(kNumMmaWarpgroups == 2 || kNumMmaWarpgroups == 3, "2 or 3 consumer warpgroups");
    static constexpr int kNumMmaThreads = kNumMmaWarpgroups * kThreadsPerWarpgroup;
    static constexpr int kNumThreads = kNumMmaThreads + kThreadsPerWarpgroup;

    // setmaxnreg budgets: the registers the launch gives the block (168 per thread, the most
    // ptxas may use with 384 threads and one block per SM: 168 x 384 = 64512) split between the
    // roles, 128 * (producer + consumers * consumer) <= 64512, or the consumers' increase would
    // wait forever. The consumers hold S, P and O of their rows. FlashAttention-3 takes 24 / 240
    // with two consumer warpgroups; here the producer also walks the persistent grid's tiles,
    // and at 24 registers its loop spilled (ptxas, bf16 d = 128: 208 bytes of spill stores; d =
    // 256 local: 368), so it takes 40 and the consumers 232, where the consumer code of d = 128
    // spills nothing (d = 256 local: 4 bytes, in the variants kernel). Three consumer warpgroups
    // (d = 64) keep 32 / 160, FlashAttention-3's: their S, P and O fill 160 (the producer spills
    // 48 bytes around its TMA issues there).
    static constexpr int kProducerRegisters = kNumMmaWarpgroups == 2 ? 40 : 32;
    static constexpr int kConsumerRegisters = kNumMmaWarpgroups == 2 ? 232 : 160;
    static_assert(register_split_fits(kThreadsPerWarpgroup, kProducerRegisters, kConsumerRegisters,
                                      kNumMmaWarpgroups),
                  "setmaxnreg counts past what the launch gives the block (register_split.h)");

    using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // S = Q K^T: (M, N, K)
    using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;  // O = P V:   (M, N, K)

    // Consumer warpgroups are stacked along M: every row of S lives in one warpgroup, so the
    // softmax needs only shuffles among the 4 threads of a row, never shared memory.
    using MmaWarpgroupLayout = Layout<Shape<Int<kNumMmaWarpgroups>, _1, _1>>;
    // S = Q K^T with both operands in shared memory (K-major: the head dim is contiguous).
    using TiledMmaQK = decltype(make_tiled_mma(ss_op_selector_extended<Element, TileShapeQK>(),
                                               MmaWarpgroupLayout{}));
    // O += P V with P from registers (the accumulator of S, converted) and V in shared memory.
    // V is stored as loaded, a key per row with the head dim contiguous, which for the B
    // operand (N = head dim, K = key) is MN-major; wgmma reads it transposed for 16-bit types.
    using TiledMmaPV =
        decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, TileShapePV,
                                                     GMMA::Major::K, GMMA::Major::MN>(),
                                MmaWarpgroupLayout{}));
    static_assert(size<1>(typename TiledMmaQK::AtomShape_MNK{}) == kBlockN,
                  "one wgmma atom spans kBlockN (add it to SM90_OWN_WGMMA_N?)");
    static_assert(size<1>(typename TiledMmaPV::AtomShape_MNK{}) == kHeadDim,
                  "one wgmma atom spans the head dim");
    static_assert(size(TiledMmaQK{}) == kNumMmaThreads && size(TiledMmaPV{}) == kNumMmaThreads);

    // Shared memory: the widest swizzle the tile allows (128 B rows for head dims that are
    // multiples of 64), in the canonical GMMA layouts, which TMA writes and wgmma reads directly.
    using SmemLayoutAtomQ = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim>>());
    using SmemLayoutQ =
        decltype(tile_to_shape(SmemLayoutAtomQ{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    // Q lands in chunks of the atom's columns, each chunk all kBlockM rows of those columns, rows
    // one after another: the order in which a TMA box (columns, heads, tokens) writes them
    // (flash_fwd_kernel.h's Q load; the swizzle applies to addresses alike).
    static constexpr int kQChunkCols = size<1>(SmemLayoutAtomQ{});
    static constexpr int kQChunks = kHeadDim / kQChunkCols;
    static constexpr int kQChunkElems = kBlockM * kQChunkCols;
    static_assert(get_nonswizzle_portion(SmemLayoutQ{})(Int<1>{}, Int<0>{}) == kQChunkCols &&
                      (kQChunks == 1 ||
                       get_nonswizzle_portion(SmemLayoutQ{})(Int<0>{}, Int<kQChunkCols>{}) ==
                           kQChunkElems),
                  "Q's chunks are not laid out as its TMA boxes write them");
    static constexpr uint32_t kQBytesPerRow = kHeadDim * sizeof(Element);
    using SmemLayoutAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim>>());
    using SmemLayoutK = decltype(tile_to_shape(
        SmemLayoutAtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));  // (N, D, stage)
    // V as the B operand of P V: (head dim, key, stage), head dim contiguous. Atoms are laid
    // along the key first (Step<_2, _1, _3>), CUTLASS's order for MN-major operands
    // (cutlass/gemm/collective/builders/sm90_gmma_builder.inl).
    using SmemLayoutAtomVt = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                      GMMA::Major::MN, Element, Int<kHeadDim>, Int<kBlockN>>());
    using SmemLayoutVt = decltype(tile_to_shape(SmemLayoutAtomVt{},
                                                Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                                Step<_2, _1, _3>{}));  // (D, N, stage)
    // The output tile is staged in the shared memory of Q, with Q's layout: a consumer
    // warpgroup's rows of O then cover exactly the bytes of its own rows of Q, which no other
    // warpgroup reads, so each warpgroup stores its O as soon as its own last S = Q K^T is done,
    // with a barrier among its own 128 threads only.
    using SmemLayoutO = SmemLayoutQ;

    // Global tensors as the K and V TMA descriptors see them: (rows, head dim, heads, batch).
    // Varlen buffers are one batch of total rows; a tile's row coordinate is its sequence's first
    // row plus its offset in the sequence (flash_fwd_kernel.h explains what lies past a
    // sequence). Q's descriptor is built by hand (flash_fwd_launch.h).
    using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
    using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
    // V for the MN-major operand: (head dim, rows, heads, batch).
    using GmemStrideVt = Stride<_1, int64_t, int64_t, int64_t>;
    using TmaK = decltype(make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), GmemShape{}, GmemStride{}),
        take<0, 2>(SmemLayoutK{}), Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));
    using TmaV = decltype(make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), GmemShape{},
                    GmemStrideVt{}),
        take<0, 2>(SmemLayoutVt{}), Shape<Int<kHeadDim>, Int<kBlockN>>{}, _1{}));

    static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

    // K and V stream through kStages buffers each, one mbarrier pair (full, empty) per buffer.
    using PipelineKV = cutlass::PipelineTmaAsync<kStages>;
    using PipelineState = typename cutlass::PipelineState<kStages>;

    // 1024-byte alignment: the 128-byte swizzle repeats every 8 rows of 128 bytes, and the
    // threads that write shared memory themselves (V's tail rows, the O staging) compute the
    // swizzle from offsets, which match the hardware's address-based swizzle only on a
    // 1024-byte-aligned base.
    static constexpr int kSmemAlignment = 1024;
    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, kSmemAlignment> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutK>, kSmemAlignment> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutVt>, kSmemAlignment> v;
        // Q (and the tile's coordinates) landed; Q's buffer may take the next tile's Q (its
        // readers, the GEMMs and the O staging of the epilogue, are done).
        alignas(16) cutlass::arch::ClusterTransactionBarrier q_full;
        alignas(16) cutlass::arch::ClusterBarrier q_empty;
        // The tile the consumers compute next and its sequence, written by the producer before
        // it arrives on q_full; tile.m_block < 0: no tile is left. They stay until the consumers
        // arrive on q_empty, so the consumers read them again in the epilogue instead of holding
        // them in registers through the main loop, and never read cu_seqlens / seqused
        // themselves.
        TileCoordinates tile;
        SeqlenInfo tile_seq;
        alignas(16) typename PipelineKV::SharedStorage pipeline_k;
        alignas(16) typename PipelineKV::SharedStorage pipeline_v;
    };
    static constexpr int kSmemBytes = int(sizeof(SharedStorage));
    static constexpr int kMaxSmemBytes = 227 * 1024;  // H100 / H200 opt-in limit per block
    static_assert(kSmemBytes <= kMaxSmemBytes, "tile does not fit shared memory");

    // Epilogue: 16-byte reads of the staged O and 16-byte row-contiguous global stores, one
    // warpgroup per 64 rows: kHeadDim / 8 threads cover a row.
    static constexpr int kGmemElemsPerAccess = 16 / sizeof(Element);
    static constexpr int kGmemChunksPerRow = kHeadDim / kGmemElemsPerAccess;
    // A whole row per group of threads where the chunk count is a power of two (64, 128, 256:
    // one 16-byte store each); else the largest power of two dividing it (96 -> 4 threads of
    // 3 stores, 192 -> 8 of 3), so that the threads of a warpgroup tile whole rows.
    static constexpr int kGmemThreadsPerRow =
        kGmemChunksPerRow % 16 == 0 ? 16 : (kGmemChunksPerRow % 8 == 0 ? 8 : 4);
    static_assert(kGmemChunksPerRow % kGmemThreadsPerRow == 0 &&
                      kThreadsPerWarpgroup % kGmemThreadsPerRow == 0,
                  "threads must tile the rows");
    using GmemTiledCopyO = decltype(make_tiled_copy(
        Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
        Layout<Shape<Int<kThreadsPerWarpgroup / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
               Stride<Int<kGmemThreadsPerRow>, _1>>{},
        Layout<Shape<_1, Int<kGmemElemsPerAccess>>>{}));
    // Accumulator to shared memory: stmatrix, 8x8 16-bit tiles per instruction.
    using SmemCopyAtomO = Copy_Atom<SM90_U32x4_STSM_N, Element>;
};

}  // namespace sm90
}  // namespace flash_varlen
