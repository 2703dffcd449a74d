// sm90 forward: warp-specialized FlashAttention forward for Hopper (sm_90a).
//
// One CTA per (128-row query block, query head, batch), 3 warpgroups:
//   warpgroup 0 (producer): one thread issues TMA loads of Q (two 64-row halves, one mbarrier)
//     and, per key block, of K and V into Stages-deep shared-memory rings (PipelineTmaAsync:
//     full barriers carry the TMA transaction bytes, empty barriers the consumers' releases);
//     it gives its registers away (setmaxnreg.dec).
//   warpgroups 1, 2 (consumers, setmaxnreg.inc): each owns 64 query rows. Per key block:
//     S = Q K^T (wgmma SS, fp32 accumulators), K stage released, mask (boundary tiles only),
//     online softmax in base 2 with the scale folded into one FFMA, P rounded to the input type
//     in registers, O += P V (wgmma RS: P from registers, V^T from shared memory, MN-major),
//     V stage released. Epilogue: O / l stored from registers, lse = m*scale + ln(l).
// Masks (causal bottom-right, windows, key tails) use the family-independent helpers of
// common/fmx_device.cuh; Q/K/V tails and head dims below the instantiation are zero-filled by
// TMA (out-of-bounds fill), so no load is predicated. Dv != D (v's head dim, p.d_v) runs on the
// instantiation of max(D, Dv): V's TMA tensor has Dv columns (the rest of the box reads zeros,
// so O's extra columns are 0) and the epilogue stores Dv columns.
#pragma once
#include <cstdlib>
#include <cuda_runtime.h>
#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include <cutlass/numeric_types.h>

#include "../common/fmx_device.cuh"
#include "sm90_api.h"

namespace fmx {
namespace sm90 {
using namespace cute;

template <int kD_, int kBN_, int kStages_, typename T_, bool kOverlap_ = true,
          bool kPingPong_ = kOverlap_>
struct FwdTraits {
  using T = T_;
  // Ping-pong (named barriers) between the two consumer warpgroups. With kOverlap a turn issues
  // O += P V of one block and S of the next; without it (the sequential loop) a turn issues one
  // GEMM, S or O += P V, so one warpgroup's softmax runs under the other's GEMM with the
  // sequential loop's registers.
  static constexpr bool kPingPong = kPingPong_;
  // true: the two consumer warpgroups take turns issuing GEMMs (named barriers), and within a
  // warpgroup S = Q K^T of the next key block is issued together with O += P V of the current
  // one, so the softmax runs while both are in flight. false: S, softmax, P V in sequence.
  static constexpr bool kOverlap = kOverlap_;
  static constexpr int kD = kD_;
  static constexpr int kBM = 128;      // rows per CTA
  static constexpr int kWM = 64;       // rows per consumer warpgroup
  static constexpr int kBN = kBN_;     // keys per block
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384; // producer + 2 consumer warpgroups
  // 128-byte swizzled tiles need 64-element rows (the head dim); head dims that are a multiple
  // of 32 but not of 64 (96, session 10) take 64-byte swizzled atoms of 32-element rows. The
  // key block is the N of the S wgmma and the K of O += P V (16-key k-blocks; P's
  // accumulator->A regrouping pairs 8-key column blocks), so any multiple of 16 (head_dim 256
  // takes 80, 192 takes 112: smem).
  static constexpr bool kSW64 = kD % 64 != 0;
  static constexpr int kAtomD = kSW64 ? 32 : 64;  // head-dim elements of one swizzle atom
  static_assert(kD % 32 == 0 && kBN % 16 == 0, "head dim: 32-element rows; keys: 16-key blocks");
  static_assert(kD <= 256 && kBN <= 256, "one wgmma N and one TMA box dimension are <= 256");
  using AtomK = std::conditional_t<kSW64, GMMA::Layout_K_SW64_Atom<T>, GMMA::Layout_K_SW128_Atom<T>>;
  using AtomMN = std::conditional_t<kSW64, GMMA::Layout_MN_SW64_Atom<T>, GMMA::Layout_MN_SW128_Atom<T>>;

  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<kWM>, Int<kD>, _2>{}));
  using SmemLayoutK = decltype(tile_to_shape(AtomK{}, Shape<Int<kBN>, Int<kD>, Int<kStages>>{}));
  // V^T as the (N = head dim, K = keys) B operand of O += P V: head dim contiguous (MN-major).
  // Head dims of a power-of-two number of atoms tile the head dim first; 192 and 96 (3 atoms)
  // tile the keys first (CuTe cannot slice one stage out of the other order with 3 atoms).
  static constexpr bool kVtKeysFirst = ((kD / kAtomD) & (kD / kAtomD - 1)) != 0;
  using SmemLayoutVt = std::conditional_t<
      kVtKeysFirst,
      decltype(tile_to_shape(AtomMN{}, Shape<Int<kD>, Int<kBN>, Int<kStages>>{}, Step<_2, _1, _3>{})),
      decltype(tile_to_shape(AtomMN{}, Shape<Int<kD>, Int<kBN>, Int<kStages>>{}))>;

  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kWM>, Int<kBN>, Int<kD>>>()));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<Int<kWM>, Int<kD>, Int<kBN>>, GMMA::Major::K,
                           GMMA::Major::MN>()));

  // Global tensors as TMA sees them: (rows, head dim, heads, batch) for Q and K, and
  // (head dim, rows, heads, batch) for V^T; element strides, the head dim contiguous.
  using ShapeG = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideRow = cute::Stride<int64_t, _1, int64_t, int64_t>;
  using StrideCol = cute::Stride<_1, int64_t, int64_t, int64_t>;
  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const *>(nullptr)), ShapeG{}, StrideRow{}),
      SmemLayoutQ{}(_, _, 0), Shape<Int<kWM>, Int<kD>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const *>(nullptr)), ShapeG{}, StrideRow{}),
      SmemLayoutK{}(_, _, 0), Shape<Int<kBN>, Int<kD>>{}, _1{}));
  using TmaV = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const *>(nullptr)), ShapeG{}, StrideCol{}),
      SmemLayoutVt{}(_, _, 0), Shape<Int<kD>, Int<kBN>>{}, _1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutVt>, 1024> v;
    typename Pipeline::SharedStorage pipe_k, pipe_v;
    alignas(8) uint64_t bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;  // + base alignment

  static constexpr uint32_t kBytesQ = kWM * kD * sizeof(T) * 2;
  static constexpr uint32_t kBytesK = kBN * kD * sizeof(T);
  static constexpr uint32_t kBytesV = kBN * kD * sizeof(T);
};

template <typename Tr>
struct FwdKernelParams {
  typename Tr::TmaQ tma_q;
  typename Tr::TmaK tma_k;
  typename Tr::TmaV tma_v;
  Params p;
};

// The accumulator fragment of a 64xN wgmma, ((2 cols, 2 rows, N/8), MMA_M, MMA_N), viewed as
// (rows, cols): a thread holds 2 rows (lane/4 and lane/4 + 8 of its warp's 16) and N/4 columns.
template <class L>
__device__ __forceinline__ auto acc_rowcol(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same fragment as the register A operand of a 64xNx16 wgmma: each pair of 8-column
// blocks becomes one k-block, ((2, 2, 2), MMA_M, N/16).
template <class L>
__device__ __forceinline__ auto acc_as_a(L l) {
  auto m0 = get<0>(l);                                         // (2, 2, N/8)
  auto split = logical_divide(m0, Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)), get<1>(l),
                     coalesce(make_layout(get<2, 1>(split), get<2>(l))));
}

// The consumers' softmax step, shared by fwd_kernel and fwd_kernel_persist (fwd_persist.cuh):
// S_rc / C_rc / O_rc are a warpgroup's 64 x BN score accumulator, its coordinates and the O
// accumulator viewed as (rows, cols) (acc_rowcol); a thread holds kRows = 2 rows.
// The element mask of a boundary tile (causal/window/key tail) for query rows row0.. and keys
// n0..; interior tiles skip it.
template <int kWM, int kBN, class TS, class TC>
__device__ __forceinline__ void mask_boundary_tile(TS &S_rc, const TC &C_rc, const Params &p,
                                                   const SeqInfo &si, int row0, int n0) {
  constexpr int kRows = decltype(size<0>(S_rc))::value;
  constexpr int kCols = decltype(size<1>(S_rc))::value;
  if (tile_needs_mask(p, si, row0, kWM, n0, kBN)) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int i = row0 + get<0>(C_rc(r, c)), j = n0 + get<1>(C_rc(r, c));
        if (!key_allowed(p, si, i, j)) S_rc(r, c) = -INFINITY;
      }
  }
}
// Online softmax of the (masked) S tile in base 2 with the scale folded into one FFMA: S becomes
// exp2 values, the row maxima and sums advance, corr is what O must be multiplied by.
template <int kRows, class TS>
__device__ __forceinline__ void online_softmax_step(TS &S_rc, float (&row_max)[kRows],
                                                    float (&row_sum)[kRows], float sl2,
                                                    float (&corr)[kRows]) {
  constexpr int kCols = decltype(size<1>(S_rc))::value;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, S_rc(r, c));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float ms = mx == -INFINITY ? 0.f : mx * sl2;
    corr[r] = row_max[r] == -INFINITY ? 0.f : fast_exp2(row_max[r] * sl2 - ms);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const float e = fast_exp2(fmaf(S_rc(r, c), sl2, -ms));
      S_rc(r, c) = e;
      sum += e;
    }
    row_sum[r] = row_sum[r] * corr[r] + sum;
  }
}

// The block mask's walk for one query block of 128 rows (SPEC "Block masks"; the sm80 family's
// KeyTiles in the sm90 kernel's terms): the listed key blocks, full ones first, then partial ones,
// as kernel key blocks of kBN keys (a mask block of bm_block keys is bm_block / kBN kernel blocks;
// bm_block is a multiple of 128, so with kBN = 128 a query block sits in one mask block row).
// Walk position s = 0 .. count - 1; the producer and the consumers compute the same sequence.
template <int kBN>
struct BmWalk {
  const int32_t *full, *part, *tile;
  int nf, count, sub;
  // The lists' row of (sequence b, query head h, query rows m0..).
  static __device__ __forceinline__ int row_of(const Params &p, int b, int h, int m0) {
    return ((p.bm_b > 1 ? b : 0) * p.bm_h + (p.bm_h > 1 ? h : 0)) * p.bm_nq + m0 / p.bm_block;
  }
  // The walk of list row `row`, its counts (in kernel blocks) given.
  __device__ __forceinline__ void at(const Params &p, int row, int nf_, int count_) {
    sub = p.bm_block / kBN;
    nf = nf_;
    count = count_;
    full = p.bm_qfi + (int64_t)row * p.bm_nk;
    part = p.bm_qpi + (int64_t)row * p.bm_nk;
    tile = p.bm_tile + (int64_t)row * p.bm_nk;
  }
  __device__ __forceinline__ void init(const Params &p, int b, int h, int m0) {
    const int row = row_of(p, b, h, m0);
    const int s = p.bm_block / kBN;
    const int f = __ldg(p.bm_qnf + row) * s;
    at(p, row, f, f + __ldg(p.bm_qnp + row) * s);
  }
  // Kernel key block of walk position s.
  __device__ __forceinline__ int n(int s) const {
    if (sub == 1) return s < nf ? __ldg(full + s) : __ldg(part + s - nf);
    if (s < nf) return __ldg(full + s / sub) * sub + s % sub;
    s -= nf;
    return __ldg(part + s / sub) * sub + s % sub;
  }
  // Bitmask of walk position s ((bm_block rows, bm_block / 32 words) int32), nullptr: full tile.
  __device__ __forceinline__ const int32_t *bits(const Params &p, int s) const {
    if (s < nf) return nullptr;
    const int kb = __ldg(part + (sub == 1 ? s - nf : (s - nf) / sub));  // mask key block
    const int t = __ldg(tile + kb);  // tile_id is indexed by the mask key block
    return p.bm_bits + (int64_t)t * p.bm_block * (p.bm_block / 32);
  }
};

// kExt's per-tile pieces, shared by fwd_kernel and fwd_kernel_persist. A tile of the walk: its
// first key and its bitmask (nullptr: a full tile or no block mask).
struct ExtTile {
  int n0;
  const int32_t *tb;
};
// The bitmask words of this thread's rows (kBN / 32 words each, pre-shifted by the thread's
// first column: the columns a thread holds sit at static offsets below 32 within a word, so the
// word index and the bit are compile-time constants).
template <int kBN, int kRows, class TC>
__device__ __forceinline__ void ext_load_bits(const ExtTile &t, uint32_t (&wv)[kRows][kBN / 32],
                                              const TC &C_rc, const Params &p, int row0) {
  if (t.tb != nullptr) {
    const int words = p.bm_block / 32;
    const int col0 = get<1>(C_rc(0, 0));
    const int rb = row0 % p.bm_block, cb = (t.n0 % p.bm_block) / 32;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int32_t *wr = t.tb + (int64_t)(rb + get<0>(C_rc(r, 0))) * words + cb;
#pragma unroll
      for (int k = 0; k < kBN / 32; ++k) wv[r][k] = static_cast<uint32_t>(__ldg(wr + k)) >> col0;
    }
  }
}
// ALiBi (slope in the accumulator's units; 0 = none), then the bitmask (partial tiles), then the
// boundary mask (window/causal/tails): the scores of tile t before the online softmax.
template <int kWM, int kBN, int kRows, class TS, class TC>
__device__ __forceinline__ void ext_modify_scores(TS &S_rc, const TC &C_rc, const ExtTile &t,
                                                  const uint32_t (&wv)[kRows][kBN / 32],
                                                  const Params &p, const SeqInfo &si, int row0,
                                                  bool alibi, float slope) {
  constexpr int kCols = decltype(size<1>(S_rc))::value;
  const int n0 = t.n0;
  const int col0 = get<1>(C_rc(0, 0));
  if (alibi) {
    // S -= slope * |i + off - j|: the distance of row r once, the static column offsets folded
    // in (one FADD with |.| and one FFMA per score, as the sm80 family)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float d0 = static_cast<float>(row0 + get<0>(C_rc(r, 0)) + si.off - n0 - col0);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float cc = static_cast<float>(get<1>(C_rc(r, c)) - col0);
        S_rc(r, c) = fmaf(-slope, fabsf(d0 - cc), S_rc(r, c));
      }
    }
  }
  if (t.tb != nullptr) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int jc = get<1>(C_rc(r, c)) - col0;  // static
        if (((wv[r][jc >> 5] >> (jc & 31)) & 1u) == 0u) S_rc(r, c) = -INFINITY;
      }
  }
  mask_boundary_tile<kWM, kBN>(S_rc, C_rc, p, si, row0, n0);
}

// kExt (fwd_extras_hdim*.cu): 0 = the dense kernel, whose code does not change (every kExt
// line sits under `if constexpr`); 1 = with ALiBi slopes and block masks (runtime fields of
// Params, CTA-uniform branches), a tile's list entries and bitmask words loaded after its S GEMM
// completed; 2 = the same with the list entries looked up one tile ahead and the words loaded
// under the S GEMM (more registers live across the wait: 80 B of spills at hd128 vs 28);
// 3 = lookups one tile ahead, words after the wait.
template <typename Tr, int kExt = 0>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fwd_kernel(const __grid_constant__ FwdKernelParams<Tr> kp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int kD = Tr::kD, kBN = Tr::kBN, kWM = Tr::kWM, kBM = Tr::kBM;
  using Pipeline = typename Tr::Pipeline;
  using PipeState = typename cutlass::PipelineState<Tr::kStages>;
  const Params &p = kp.p;

  extern __shared__ char smem_raw[];
  char *smem_aligned = reinterpret_cast<char *>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto &ss = *reinterpret_cast<typename Tr::SharedStorage *>(smem_aligned);

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (last) query blocks first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const SeqInfo si(p, b);
  const int m0 = m_block * kBM;
  int n_min, n_max;
  key_block_range(p, si, m0, kBM, kBN, n_min, n_max);
  // kExt with a block mask: the loops below run over walk positions (n = n_max - 1 .. n_min is
  // position n_max - 1 - n), and real_n() turns them into key blocks; else real_n(n) = n.
  [[maybe_unused]] BmWalk<kBN> bw;
  [[maybe_unused]] bool bm_on = false;
  if constexpr (kExt) {
    if (p.bm_qnf != nullptr) {
      bm_on = true;
      bw.init(p, b, h, m0);
      n_min = 0;
      n_max = bw.count;
    }
  }
  auto real_n = [&](int n) __attribute__((always_inline)) {
    if constexpr (kExt) {
      if (bm_on) return bw.n(n_max - 1 - n);
    }
    return n;
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;

  typename Pipeline::Params pp;
  pp.transaction_bytes = Tr::kBytesK;
  pp.role = wg == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = 2 * 128;
  Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});
  pp.transaction_bytes = Tr::kBytesV;
  Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x == 0 && n_max > n_min) {  // no key block: nothing to load or wait for
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.seqlen_q, p.d, p.hq, p.batch));
      Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.seqlen_k, p.d, p.hkv, p.batch));
      Tensor mVt = kp.tma_v.get_tma_tensor(make_shape(p.d_v, p.seqlen_k, p.hkv, p.batch));
      // (64, D, 2): the two halves of this CTA's 128 query rows
      Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kWM>, Int<kD>>{}, make_coord(_, 0));
      Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));
      Tensor gVt = local_tile(mVt(_, _, hk, b), Shape<Int<kD>, Int<kBN>>{}, make_coord(0, _));
      auto cq = kp.tma_q.get_slice(_0{});
      auto ck = kp.tma_k.get_slice(_0{});
      auto cv = kp.tma_v.get_slice(_0{});
      Tensor tQgQ = cq.partition_S(gQ);   // (TMA, 1, 1, m halves)
      Tensor tQsQ = cq.partition_D(sQ);   // (TMA, 1, 1, 2)
      Tensor tKgK = ck.partition_S(gK);   // (TMA, 1, 1, n blocks)
      Tensor tKsK = ck.partition_D(sK);   // (TMA, 1, 1, stages)
      Tensor tVgV = cv.partition_S(gVt);
      Tensor tVsV = cv.partition_D(sVt);

      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, Tr::kBytesQ);
      copy(kp.tma_q.with(ss.bar_q), tQgQ(_, _, _, 2 * m_block), tQsQ(_, _, _, 0));
      copy(kp.tma_q.with(ss.bar_q), tQgQ(_, _, _, 2 * m_block + 1), tQsQ(_, _, _, 1));

      PipeState st_k = cutlass::make_producer_start_state<Pipeline>();
      PipeState st_v = cutlass::make_producer_start_state<Pipeline>();
      for (int n = n_max - 1; n >= n_min; --n) {
        const int nr = real_n(n);
        pipe_k.producer_acquire(st_k);
        copy(kp.tma_k.with(*pipe_k.producer_get_barrier(st_k)), tKgK(_, _, _, nr),
             tKsK(_, _, _, st_k.index()));
        ++st_k;
        pipe_v.producer_acquire(st_v);
        copy(kp.tma_v.with(*pipe_v.producer_get_barrier(st_v)), tVgV(_, _, _, nr),
             tVsV(_, _, _, st_v.index()));
        ++st_v;
      }
    }
  } else {
    // ---------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<240>();
    const int w = wg - 1;                    // which 64-row half
    const int tid = threadIdx.x - 128 * wg;  // thread in the warpgroup
    typename Tr::TiledMmaS mma_s;
    typename Tr::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(tid);
    auto thr_o = mma_o.get_thread_slice(tid);

    Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ(_, _, w)));  // (MMA, 1, D/16)
    Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));           // (MMA, 1, D/16, stages)
    Tensor tOrV = thr_o.make_fragment_B(thr_o.partition_B(sVt));          // (MMA, 1, BN/16, stages)
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kWM>, Int<kBN>>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kWM>, Int<kD>>{});
    clear(tOrO);

    // Row/column coordinates (within the 64 x BN tile) of each S element this thread holds.
    Tensor cS = make_identity_tensor(Shape<Int<kWM>, Int<kBN>>{});
    Tensor tScS = thr_s.partition_C(cS);
    Tensor S_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor C_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    constexpr int kRows = decltype(size<0>(S_rc))::value;  // 2
    constexpr int kCols = decltype(size<1>(S_rc))::value;
    static_assert(kRows == 2, "a thread holds two rows of a 64-row wgmma accumulator");

    float row_max[kRows], row_sum[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
    const float sl2 = p.score_log2;
    const int row0 = m0 + w * kWM;  // first query row of this warpgroup
    // ALiBi (kExt): the slope of (b, h) in the accumulator's units (the bias -slope * |d| in
    // natural units is -slope / score_nat * |d| here), loaded once; 0 without slopes.
    [[maybe_unused]] float slope = 0.f;
    if constexpr (kExt) {
      if (p.alibi != nullptr) slope = __ldg(p.alibi + (int64_t)b * p.alibi_bs + h) / p.score_nat;
    }

    PipeState st_k, st_v;
    Tensor rP = make_tensor_like<T>(tSrS);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));

    // S = Q K^T on K stage `stage`, issued (not waited for).
    auto issue_s = [&](int stage) __attribute__((always_inline)) {
      warpgroup_fence_operand(tSrS);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        gemm(mma_s, tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    // O += P V on V stage `stage`, issued (not waited for).
    auto issue_o = [&](int stage) __attribute__((always_inline)) {
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < size<2>(tOrP); ++kb)
        gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrO);
      warpgroup_commit_batch();
    };
    // Mask (boundary tiles) and online softmax of key block n: S becomes exp2 values, the row
    // maxima and sums advance, corr is what O must be multiplied by.
    auto online = [&](float (&corr)[kRows]) __attribute__((always_inline)) {
      online_softmax_step(S_rc, row_max, row_sum, sl2, corr);
    };
    // Mask (boundary tiles) and online softmax of key block n (the dense kernel).
    auto softmax = [&](int n, float (&corr)[kRows]) __attribute__((always_inline)) {
      warpgroup_fence_operand(tSrS);
      mask_boundary_tile<kWM, kBN>(S_rc, C_rc, p, si, row0, n * kBN);
      online(corr);
    };
    // ---- kExt: the tile of loop index n (walk position n_max - 1 - n with a block mask); past
    // the walk (n < n_min): nothing.
    [[maybe_unused]] auto ext_tile = [&](int n) __attribute__((always_inline)) {
      ExtTile t{0, nullptr};
      if (n >= n_min) {
        t.n0 = real_n(n) * kBN;
        if (bm_on) t.tb = bw.bits(p, n_max - 1 - n);
      }
      return t;
    };
    constexpr int kWords = kBN / 32;
    [[maybe_unused]] auto load_bits = [&](const ExtTile &t, uint32_t (&wv)[kRows][kWords])
        __attribute__((always_inline)) { ext_load_bits<kBN>(t, wv, C_rc, p, row0); };
    [[maybe_unused]] auto softmax_ext = [&](const ExtTile &t, const uint32_t (&wv)[kRows][kWords],
                                            float (&corr)[kRows]) __attribute__((always_inline)) {
      warpgroup_fence_operand(tSrS);
      ext_modify_scores<kWM, kBN>(S_rc, C_rc, t, wv, p, si, row0, p.alibi != nullptr, slope);
      online(corr);
    };
    auto rescale_o = [&](const float (&corr)[kRows]) __attribute__((always_inline)) {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= corr[r];
    };
    auto convert_p = [&]() __attribute__((always_inline)) {
      warpgroup_fence_operand(rP);
#pragma unroll
      for (int e = 0; e < size(tSrS); ++e) rP(e) = static_cast<T>(tSrS(e));
      warpgroup_fence_operand(rP);
    };
    // Ping-pong between the two consumer warpgroups (kPingPong): a warpgroup issues its GEMMs
    // only in its turn (named barrier), so one's softmax runs under the other's GEMMs. Turns per
    // warpgroup: kOverlap: first S, n-1 combined, last O; sequential: S and O of each block.
    // Both take the same number (same key blocks); w = 1's last turn does not arrive (w = 0 goes
    // first: w = 1 arrives on w = 0's barrier once up front).
    const int n_turns = Tr::kOverlap ? n_max - n_min + 1 : 2 * (n_max - n_min);
    int turn = 0;
    auto my_turn = [&]() __attribute__((always_inline)) {
      if constexpr (Tr::kPingPong) cutlass::arch::NamedBarrier::sync(256, 1 + w);
    };
    auto end_turn = [&]() __attribute__((always_inline)) {
      if constexpr (Tr::kPingPong) {
        if (w == 0 || ++turn < n_turns) cutlass::arch::NamedBarrier::arrive(256, 2 - w);
      }
    };

    float corr[kRows];
    static_assert(!kExt || (Tr::kOverlap && Tr::kPingPong), "kExt: the overlapped ping-pong loop");
    if (n_max > n_min) {
      cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_q, 0);
      if constexpr (!Tr::kOverlap) {
        if (Tr::kPingPong && w == 1) cutlass::arch::NamedBarrier::arrive(256, 1);  // w = 0 first
        for (int n = n_max - 1; n >= n_min; --n) {
          pipe_k.consumer_wait(st_k);
          my_turn();
          issue_s(st_k.index());
          end_turn();
          warpgroup_wait<0>();
          pipe_k.consumer_release(st_k);
          ++st_k;
          softmax(n, corr);
          rescale_o(corr);
          convert_p();
          pipe_v.consumer_wait(st_v);
          my_turn();
          issue_o(st_v.index());
          end_turn();
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          pipe_v.consumer_release(st_v);
          ++st_v;
        }
      } else {
        // kExt: the overlapped ping-pong loop with the kExt softmax of the walk's tile `cur`;
        // kExt >= 2 looks the tiles up one ahead, kExt == 2 loads the bitmask words under the S
        // GEMM (the dense kernel's code is the same loop with every kExt line compiled out)
        constexpr bool kAhead = kExt >= 2;        // list lookups one tile ahead
        constexpr bool kWordsEarly = kExt == 2;  // bitmask words loaded under the S GEMM
        [[maybe_unused]] uint32_t wv[kRows][kWords];
        [[maybe_unused]] ExtTile cur{0, nullptr}, nxt{0, nullptr};
        // the masks and online softmax of loop index n, after its S GEMM completed
        auto step = [&](int n) __attribute__((always_inline)) {
          if constexpr (kExt) {
            if constexpr (!kAhead) cur = ext_tile(n);
            if constexpr (!kWordsEarly) load_bits(cur, wv);
            softmax_ext(cur, wv, corr);
          } else {
            softmax(n, corr);
          }
        };
        if (w == 1) cutlass::arch::NamedBarrier::arrive(256, 1);  // the first turn is WG 1's
        if constexpr (kAhead) {
          cur = ext_tile(n_max - 1);
          nxt = ext_tile(n_max - 2);
        }
        // first key block: S only
        pipe_k.consumer_wait(st_k);
        my_turn();
        issue_s(st_k.index());
        end_turn();
        if constexpr (kWordsEarly) load_bits(cur, wv);
        warpgroup_wait<0>();
        pipe_k.consumer_release(st_k);
        ++st_k;
        step(n_max - 1);
        convert_p();
        // steady state: S of block n runs beside O += P V of block n + 1
        for (int n = n_max - 2; n >= n_min; --n) {
          if constexpr (kAhead) {
            cur = nxt;
            nxt = ext_tile(n - 1);
          }
          pipe_k.consumer_wait(st_k);
          pipe_v.consumer_wait(st_v);
          my_turn();
          issue_s(st_k.index());
          issue_o(st_v.index());
          end_turn();
          if constexpr (kWordsEarly) load_bits(cur, wv);
          warpgroup_wait<1>();
          pipe_k.consumer_release(st_k);
          ++st_k;
          step(n);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          pipe_v.consumer_release(st_v);
          ++st_v;
          rescale_o(corr);
          convert_p();
        }
        // last block's O += P V
        pipe_v.consumer_wait(st_v);
        my_turn();
        issue_o(st_v.index());
        end_turn();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        pipe_v.consumer_release(st_v);
        ++st_v;
      }
    }
    // Epilogue: O / l, lse = m * scale + ln(l) (natural units), rows without keys: 0 and -inf.
    Tensor cO = make_identity_tensor(Shape<Int<kWM>, Int<kD>>{});
    Tensor cO_rc = make_tensor(thr_o.partition_C(cO).data(),
                               acc_rowcol(thr_o.partition_C(cO).layout()));
    T *o = static_cast<T *>(p.o);
    const int64_t obase = si.q_base(b, p.o_bs, p.o_rs) + (int64_t)h * p.o_hs;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int i = row0 + get<0>(cO_rc(r, 0));
      if (i < si.sq) {
        T *orow = o + obase + (int64_t)i * p.o_rs;
#pragma unroll
        for (int c = 0; c < size<1>(O_rc); c += 2) {
          const int j = get<1>(cO_rc(r, c));
          if (j < p.d_v) {  // Dv columns (Dv != D: the rest are zeros)
            // columns c, c+1 of the fragment are adjacent in memory (one 4-byte store)
            T pair[2] = {static_cast<T>(O_rc(r, c) * inv), static_cast<T>(O_rc(r, c + 1) * inv)};
            *reinterpret_cast<uint32_t *>(orow + j) = *reinterpret_cast<uint32_t *>(pair);
          }
        }
        if ((lane & 3) == 0) {
          const float lse = sum > 0.f ? row_max[r] * p.score_nat + logf(sum) : -INFINITY;
          p.lse[si.lse_off(p, b, h, i)] = lse;
        }
      }
    }
  }
#else
  __trap();  // the sm90 family is built for sm_90a only
#endif
}

template <typename Tr, int kExt = 0>
int launch_fwd(const Params &p, cudaStream_t stream) {
  using T = typename Tr::T;
  FwdKernelParams<Tr> kp;
  kp.p = p;
  auto sq = make_shape(p.seqlen_q, p.d, p.hq, p.batch);
  auto sk = make_shape(p.seqlen_k, p.d, p.hkv, p.batch);
  auto svt = make_shape(p.d_v, p.seqlen_k, p.hkv, p.batch);  // Dv <= kD: TMA zero-fills
  Tensor mQ = make_tensor(make_gmem_ptr(static_cast<T const *>(p.q)), sq,
                          make_stride(p.q_rs, _1{}, p.q_hs, p.q_bs));
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<T const *>(p.k)), sk,
                          make_stride(p.k_rs, _1{}, p.k_hs, p.k_bs));
  Tensor mVt = make_tensor(make_gmem_ptr(static_cast<T const *>(p.v)), svt,
                           make_stride(_1{}, p.v_rs, p.v_hs, p.v_bs));
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Tr::SmemLayoutQ{}(_, _, 0),
                           Shape<Int<Tr::kWM>, Int<Tr::kD>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Tr::SmemLayoutK{}(_, _, 0),
                           Shape<Int<Tr::kBN>, Int<Tr::kD>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, typename Tr::SmemLayoutVt{}(_, _, 0),
                           Shape<Int<Tr::kD>, Int<Tr::kBN>>{}, _1{});
  auto kernel = fwd_kernel<Tr, kExt>;
  constexpr int smem = Tr::kSmemBytes;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(ceil_div(p.seqlen_q, Tr::kBM), p.hq, p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(kp);
  return cudaGetLastError();
}

// The head_dim 192 and 256 forward units (fwd_hdim192.cu, fwd_hdim256.cu: separate units so
// that the build runs them in parallel) share this body: the default tile (BN keys, Stages, the
// overlapped loop and ping-pong flags, each overridable per unit at build time) for both dtypes
// and, in tuning builds (-DFMX_SM90_TUNING or -DFMX_SM90_WIDE_VARIANTS=1), the bf16 sequential
// loop with VBN-key blocks: $FMX_TUNE_SM90 = 1 with ping-pong, 2 without (session 8's variants).
#ifndef FMX_SM90_WIDE_VARIANTS
#define FMX_SM90_WIDE_VARIANTS 0
#endif
template <int D, int BN, int Stages, bool Overlap, bool PingPong, int VBN>
int run_fwd_wide(const Params &p, int dtype, cudaStream_t stream) {
  using Bf16 = FwdTraits<D, BN, Stages, cutlass::bfloat16_t, Overlap, PingPong>;
  static_assert(Bf16::kSmemBytes <= 227 * 1024, "over the 227 KB of smem");
#if FMX_SM90_WIDE_VARIANTS || defined(FMX_SM90_TUNING)
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (dtype == 1 && tune != nullptr) {
    if (tune[0] == '1')
      return launch_fwd<FwdTraits<D, VBN, 2, cutlass::bfloat16_t, false, true>>(p, stream);
    if (tune[0] == '2')
      return launch_fwd<FwdTraits<D, VBN, 2, cutlass::bfloat16_t, false, false>>(p, stream);
  }
#endif
  if (dtype == 0)
    return launch_fwd<FwdTraits<D, BN, Stages, cutlass::half_t, Overlap, PingPong>>(p, stream);
  return launch_fwd<Bf16>(p, stream);
}

}  // namespace sm90
}  // namespace fmx
