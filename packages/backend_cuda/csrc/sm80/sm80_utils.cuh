// CuTe helpers for the sm80 (mma.sync) kernel family.
#pragma once
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include "../common/fmx_device.cuh"

namespace fmx {
namespace sm80 {
using namespace cute;

template <typename Element>
using MmaAtomFor = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                      MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                      MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

// A TiledMMA of WM x WN warps; the N tile is 16 wide per warp so that B fragments load with
// ldmatrix.x4.
template <typename Element, int WM, int WN>
using TiledMmaFor = decltype(make_tiled_mma(MmaAtomFor<Element>{},
                                            Layout<Shape<Int<WM>, Int<WN>, _1>>{},
                                            Tile<Int<16 * WM>, Int<16 * WN>, _16>{}));

// Swizzled row-major smem layout for a (ROWS x COLS) tile of 16-bit elements.
template <int ROWS, int COLS>
struct SmemTile {
  static constexpr int kAtomCols = COLS % 64 == 0 ? 64 : 32;
  static constexpr int kSwz = kAtomCols == 64 ? 3 : 2;
  using Atom = decltype(composition(Swizzle<kSwz, 3, 3>{},
                                    Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
  using Layout_ = decltype(tile_to_shape(Atom{}, Shape<Int<ROWS>, Int<COLS>>{}));
  // The same storage viewed as (COLS x ROWS): element (c, r) of the view is (r, c) of the tile.
  using LayoutT = decltype(composition(Layout_{}, make_layout(Shape<Int<COLS>, Int<ROWS>>{},
                                                              GenRowMajor{})));
};

// Accumulator ((2,2), M, N) -> (rows = (2, M), cols = (2, N)).
template <class L>
__device__ __forceinline__ constexpr auto rowcol_layout(L const &l) {
  static_assert(decltype(rank(l))::value == 3);
  static_assert(decltype(size<0>(l))::value == 4);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator ((2,2), M, N) of an m16n8 MMA -> A operand ((2,2,2), M, N/2) of an m16n8k16 MMA.
template <class L>
__device__ __forceinline__ constexpr auto acc_to_a_layout(L const &l) {
  static_assert(decltype(size<0>(l))::value == 4);
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// acc += A * B^T with both operands in smem, fragments loaded one k-step ahead.
template <typename TiledMma, typename Acc, typename RA, typename RB, typename SA, typename SB,
          typename CpA, typename CpB, typename RAv, typename RBv>
__device__ __forceinline__ void gemm_ss(TiledMma &mma, Acc &acc, RA &rA, RB &rB, SA const &sA,
                                        SB const &sB, CpA const &cpA, CpB const &cpB, RAv &rAv,
                                        RBv &rBv) {
  copy(cpA, sA(_, _, _0{}), rAv(_, _, _0{}));
  copy(cpB, sB(_, _, _0{}), rBv(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) {
      copy(cpA, sA(_, _, k + 1), rAv(_, _, k + 1));
      copy(cpB, sB(_, _, k + 1), rBv(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// gemm_ss without the one-step-ahead prefetch of B (fewer live registers; A still ahead).
template <typename TiledMma, typename Acc, typename RA, typename RB, typename SA, typename SB,
          typename CpA, typename CpB, typename RAv, typename RBv>
__device__ __forceinline__ void gemm_ss_noprefetch(TiledMma &mma, Acc &acc, RA &rA, RB &rB,
                                                   SA const &sA, SB const &sB, CpA const &cpA,
                                                   CpB const &cpB, RAv &rAv, RBv &rBv) {
  copy(cpA, sA(_, _, _0{}), rAv(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    copy(cpB, sB(_, _, k), rBv(_, _, k));
    if (k < size<2>(rA) - 1) copy(cpA, sA(_, _, k + 1), rAv(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A * B^T with A already in registers.
template <typename TiledMma, typename Acc, typename RA, typename RB, typename SB, typename CpB,
          typename RBv>
__device__ __forceinline__ void gemm_rs(TiledMma &mma, Acc &acc, RA const &rA, RB &rB, SB const &sB,
                                        CpB const &cpB, RBv &rBv) {
  copy(cpB, sB(_, _, _0{}), rBv(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) copy(cpB, sB(_, _, k + 1), rBv(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Convert an fp32 accumulator fragment into a 16-bit fragment of the same layout.
template <typename Element, typename Acc>
__device__ __forceinline__ auto to_element(Acc const &acc) {
  Tensor r = make_tensor<Element>(acc.layout());
  uint32_t *r32 = reinterpret_cast<uint32_t *>(raw_pointer_cast(r.data()));
  CUTE_UNROLL
  for (int i = 0; i < size(acc) / 2; ++i) r32[i] = pack2<Element>(acc(2 * i), acc(2 * i + 1));
  return r;
}

// Store an accumulator fragment (times mul) to a row-major gmem matrix. coords is the identity
// tensor partitioned like acc; values 2i and 2i+1 are adjacent columns of one row.
template <typename Element, typename Acc, typename Coords>
__device__ __forceinline__ void store_acc(Acc const &acc, Coords const &coords, Element *g,
                                          int64_t rs, int rows_valid, int cols_valid, float mul) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    int r = get<0>(coords(i)), c = get<1>(coords(i));
    if (r < rows_valid && c < cols_valid)
      *reinterpret_cast<uint32_t *>(g + (int64_t)r * rs + c) =
          pack2<Element>(acc(i) * mul, acc(i + 1) * mul);
  }
}

// Set disallowed scores of a rowcol-viewed tile to -inf. C is the matching rowcol view of the
// identity tensor; per-row bounds are computed once and compared with the static column offsets.
template <typename STensor, typename CTensor>
__device__ __forceinline__ void apply_mask(STensor &S, CTensor const &C, const Params &p,
                                           const SeqInfo &si, int m0, int n0) {
  const int col0 = get<1>(C(0, 0));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(S); ++r) {
    const int i = m0 + get<0>(C(r, 0));
    int hi = si.sk;  // allowed: lo <= j < hi
    if (p.window_right >= 0) hi = min(hi, i + si.off + p.window_right + 1);
    int lo = p.window_left >= 0 ? i + si.off - p.window_left : -(1 << 30);
    hi -= n0 + col0;
    lo -= n0 + col0;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); ++c) {
      const int cc = get<1>(C(r, c)) - col0;
      if (cc >= hi || cc < lo) S(r, c) = -INFINITY;
    }
  }
}

// The key tiles (BN keys each) one query tile visits, in visiting order. Dense: from the last
// allowed tile down to the first ([n_min, n_max), as before). With a block mask: the query
// block's listed full mask tiles, then its partial ones, each as block / BN consecutive key
// tiles (BN divides the mask block); tile_bits(s) is a partial tile's bitmask (nullptr for full
// tiles and dense calls). Empty mask tiles are never visited. kBlockMask = false (the forward's
// plain instantiation, fwd_kernel's kExtras off): the dense sequence only, as compile-time
// constants, so none of the list code is compiled in (it costs registers even when unused).
template <int BN, bool kBlockMask = true>
struct KeyTiles {
  int count, n_max, sub, nf, words;
  const int32_t *full, *part, *tile, *bits;  // this query block's list rows, the bitmasks
  __device__ __forceinline__ KeyTiles(const Params &p, int b, int h, int m0, int n_min, int nmax) {
    n_max = nmax;
    full = part = tile = bits = nullptr;
    sub = nf = words = 0;
    if (!kBlockMask || p.bm_qnf == nullptr) {
      count = n_max - n_min;
      return;
    }
    const int64_t row =
        ((int64_t)(p.bm_b > 1 ? b : 0) * p.bm_h + (p.bm_h > 1 ? h : 0)) * p.bm_nq + m0 / p.bm_block;
    sub = p.bm_block / BN;
    nf = p.bm_qnf[row] * sub;
    count = nf + p.bm_qnp[row] * sub;
    full = p.bm_qfi + row * p.bm_nk;
    part = p.bm_qpi + row * p.bm_nk;
    tile = p.bm_tile + row * p.bm_nk;
    bits = p.bm_bits;
    words = p.bm_block / 32;
  }
  __device__ __forceinline__ int n(int s) const {
    if (!kBlockMask || full == nullptr) return n_max - 1 - s;
    if (s < nf) return full[s / sub] * sub + s % sub;
    s -= nf;
    return part[s / sub] * sub + s % sub;
  }
  __device__ __forceinline__ const int32_t *tile_bits(int s) const {
    if (!kBlockMask || full == nullptr || s < nf) return nullptr;
    return bits + (int64_t)tile[part[(s - nf) / sub]] * (words * 32) * words;
  }
};

// Element mask of a partial block-mask tile: S(r, c) = -inf where bit (r0 + row, c0 + col) of
// the tile's bitmask tb (rows of `words` int32, bit j % 32 of word j / 32) is 0. r0 / c0: the
// kernel tile's first row / key inside the mask tile. One cached word load (L1) per element.
template <typename STensor, typename CTensor>
__device__ __forceinline__ void apply_bits(STensor &S, CTensor const &C, const int32_t *tb,
                                           int words, int r0, int c0) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(S); ++r) {
    const int32_t *wr = tb + (int64_t)(r0 + get<0>(C(r, 0))) * words;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); ++c) {
      const int j = c0 + get<1>(C(r, c));
      const unsigned w = static_cast<unsigned>(__ldg(wr + (j >> 5)));
      if (((w >> (j & 31)) & 1u) == 0u) S(r, c) = -INFINITY;
    }
  }
}

// ALiBi: the slope of (sequence b, query head h) in the accumulator's units (the scores are
// s * score_nat in natural units: the bias -slope * |d| is -slope / score_nat * |d| here).
__device__ __forceinline__ float alibi_slope_acc(const Params &p, int b, int h) {
  return p.alibi[(int64_t)b * p.alibi_bs + h] / p.score_nat;
}

// S(r, c) -= slope * |i + off - j| for the tile of query rows m0.. and keys n0.. (C as in
// apply_mask). Per element one FADD and one FFMA (|x| is an operand modifier): the distance of
// row r is computed once and the static column offsets are folded in as constants.
template <typename STensor, typename CTensor>
__device__ __forceinline__ void apply_alibi(STensor &S, CTensor const &C, float slope,
                                            const SeqInfo &si, int m0, int n0) {
  const int col0 = get<1>(C(0, 0));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(S); ++r) {
    const float d0 = static_cast<float>(m0 + get<0>(C(r, 0)) + si.off - n0 - col0);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); ++c) {
      const float cc = static_cast<float>(get<1>(C(r, c)) - col0);
      S(r, c) = fmaf(-slope, fabsf(d0 - cc), S(r, c));
    }
  }
}

}  // namespace sm80
}  // namespace fmx
