// Moving (rows, head_dim) tiles between global and shared memory, shared by the forward and the
// backward kernels: predicated 16-byte cp.async loads that zero-fill what lies past the ends (of
// strided tiles, or of rows gathered from a paged cache), and 16-byte stores that skip it.
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// Copies a (rows, head_dim) tile from global to shared memory with 16-byte cp.async. Rows at or
// past row_limit and columns at or past the real head dim are not read and are zero-filled, so
// the MMAs can run on the whole tile and stray values never reach a valid output.
// src, dst: (CPY, CPY_ROWS, CPY_COLS) partitions; coords: the same partition of an identity tensor.
template <typename TiledCopy, typename Src, typename Dst, typename Coords, typename ColValid>
__device__ void copy_tile_zero_fill(const TiledCopy& tiled_copy, const Src& src, Dst&& dst,
                                    const Coords& coords, const ColValid& col_valid,
                                    int row_limit) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(src); ++m) {
        const bool row_valid = get<0>(coords(0, m, 0)) < row_limit;
        CUTE_UNROLL
        for (int k = 0; k < size<2>(src); ++k) {
            copy(tiled_copy.with(row_valid && col_valid(k)), src(_, m, k), dst(_, m, k));
        }
    }
}

// Copies a (rows, head_dim) tile whose rows lie anywhere in global memory (the pages of a paged
// KV cache) from global to shared memory, as copy_tile_zero_fill does a strided one: row r of
// the tile starts at row_start(r), which is called only for rows below row_limit (a gather may
// not even compute the address of a row past the end: its page may lie outside the table).
// Rows at or past row_limit and columns at or past the real head dim are not read and are
// zero-filled; their copies name `fallback`, an address that is never read.
// dst: a (CPY, CPY_ROWS, CPY_COLS) partition; coords: the same partition of an identity tensor.
template <typename TiledCopy, typename RowStart, typename Element, typename Dst, typename Coords,
          typename ColValid>
__device__ void gather_tile_zero_fill(const TiledCopy& tiled_copy, const RowStart& row_start,
                                      const Element* fallback, Dst&& dst, const Coords& coords,
                                      const ColValid& col_valid, int row_limit) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(dst); ++m) {
        const int row = get<0>(coords(0, m, 0));
        const bool row_valid = row < row_limit;
        const Element* start = row_valid ? row_start(row) : fallback;
        CUTE_UNROLL
        for (int k = 0; k < size<2>(dst); ++k) {
            // One copy's contiguous elements of the row, shaped like its shared-memory side.
            Tensor src = make_tensor(make_gmem_ptr(start + get<1>(coords(0, m, k))),
                                     make_layout(shape(dst(_, m, k))));
            copy(tiled_copy.with(row_valid && col_valid(k)), src, dst(_, m, k));
        }
    }
}

// The (kRows, kHeadDim) tile number `block` of a (seqlen, kHeadDim) matrix with the given row
// stride. The tile's start is computed in 64 bits; offsets inside it fit 32 bits.
template <int kRows, int kHeadDim, typename Element>
__device__ auto row_tile(Element* base, int block, int64_t row_stride) {
    Element* start = base + int64_t(block) * kRows * row_stride;
    return make_tensor(make_gmem_ptr(start), Shape<Int<kRows>, Int<kHeadDim>>{},
                       make_stride(int(row_stride), _1{}));
}

// Copies one float from global to shared memory with a 4-byte cp.async, or writes 0 when
// `valid` is false (the source is then not read).
__device__ __forceinline__ void cp_async_float_zero_fill(float* smem_dst, const float* gmem_src,
                                                         bool valid) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
    const int src_bytes = valid ? int(sizeof(float)) : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(src_bytes));
}

// Stores a (kRows, kHeadDim) tile staged in shared memory to global memory with 16-byte
// row-contiguous stores, skipping rows at or past row_limit and columns at or past head_dim.
// The caller synchronises the block between writing smem_tile and calling this.
template <typename GmemTiledCopy, typename SmemTile, typename GmemTile>
__device__ void store_tile_from_smem(const SmemTile& smem_tile, GmemTile& gmem_tile, int row_limit,
                                     int head_dim) {
    GmemTiledCopy gmem_tiled_copy;
    auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(threadIdx.x);
    Tensor tSs = gmem_thr_copy.partition_S(smem_tile);  // (CPY, CPY_ROWS, CPY_COLS)
    Tensor tSg = gmem_thr_copy.partition_D(gmem_tile);
    Tensor tSc = gmem_thr_copy.partition_D(make_identity_tensor(shape(gmem_tile)));
    Tensor tSr = make_tensor<typename GmemTile::value_type>(shape(tSg));
    copy(gmem_tiled_copy, tSs, tSr);
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tSr); ++m) {
        if (get<0>(tSc(0, m, 0)) >= row_limit) continue;
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tSr); ++k) {
            if (get<1>(tSc(0, m, k)) < head_dim) copy(gmem_tiled_copy, tSr(_, m, k), tSg(_, m, k));
        }
    }
}

}  // namespace sm80
}  // namespace flash_varlen
