// sm90 backward: warp-specialized FlashAttention backward for Hopper (sm_90a).
//
// One CTA per (128-key block, kv head, batch), 3 warpgroups, K/V-tile-stationary:
//   warpgroup 0 (producer, setmaxnreg.dec): one thread loads K and V once (TMA, one mbarrier),
//     then, per step (query head of the GQA group x query block that can see the key block), Q
//     and dO (TMA) and the step's lse (log2 units) and dsum rows (1-D bulk copies from the
//     padded rows the preprocess kernel wrote) into a kStages-deep ring (PipelineTmaAsync).
//   warpgroups 1, 2 (consumers, setmaxnreg.inc): warpgroup w owns keys [64 w, 64 w + 64).
//     S^T = K Q^T and dP^T = V dO^T (wgmma SS, fp32), P^T = exp2(S^T * scale * log2e - lse2),
//     dS^T = P^T (dP^T * scale - dsum * scale) (rounded to the input type with the scale in,
//     as the sm80 family does, so dQ and dK need no final multiply), then
//     dV += P^T dO and dK += dS^T Q with wgmma RS (P^T and dS^T straight from the accumulator
//     registers: the transposed products make them the A operands), dS^T -> shared memory
//     (double-buffered), a 256-thread named barrier, dQ = dS K (wgmma SS, each warpgroup a
//     64 x 64 part: query rows for BM = 128, head-dim columns for BM = 64), added into the fp32
//     dq_accum workspace (the sm80 8x8-block layout, converted once by the sm80 convert kernel)
//     with fire-and-forget red.global.add.v2.f32.
//   dK, dV stay in registers across the whole walk (GQA sums over the group without atomics),
//   stored once at the end.
// Masks (causal bottom-right, windows, key tails) use common/fmx_device.cuh; Q/dO/K/V tails and
// head dims below the instantiation are zero-filled by TMA (Dv != D: dO and V have Dv columns,
// Q and K D columns, the kernel max(D, Dv); dV is stored with Dv columns); query rows past the end have
// lse2 = +inf and dsum = 0 in the padded rows, so their P and dS are 0.
#pragma once
#include <climits>
#include <cstdlib>
#include <cstring>
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

template <int kD_, int kBM_, int kStages_, typename T_, bool kDqBulk_ = false, int kOrder_ = -1,
          bool kLocalDQ_ = false, bool kDet_ = false, bool kPre_ = false>
struct BwdTraits {
  using T = T_;
  // true (session 11, FLASHMUX_CUDA_SM90_BWD=pre / bulk+pre): the next step's S^T = K Q^T is
  // issued as soon as this step's GEMMs are done (after the dQ GEMM's wait, before this step's
  // dQ reductions or dQ smem stores), so the tensor cores run S^T of step s+1 while the
  // consumers add dQ of step s; the loop top then issues dP^T only. Extra live registers over
  // the reductions: S^T's accumulator (BM / 2 fp32 per thread).
  static constexpr bool kPre = kPre_;
  // true (deterministic=True, session 10): the key blocks add into each (query block, head) of
  // dq_accum in DESCENDING key-block order. Per step one consumer thread waits until the
  // workspace counter of that (batch, head, query block) equals this CTA's turn (the key blocks
  // above it that see the query block), the 256 consumers add their dQ values, fence, and the
  // counter advances. No rotated walk. Descending, because a CTA walks its query blocks upwards
  // and, causal, key block n first meets query block n: its turn there is 0, and a higher key
  // block reached each later query block at an earlier step of its own walk (ascending order made
  // every causal CTA wait for the whole chain below it: 0.47-0.50x the default backward on the
  // H200, call s10a). The grid runs key blocks from the top (n = gridDim.x - 1 - blockIdx.x), so
  // in-order CTA dispatch puts every CTA a turn waits on before it (resident or done): no wait
  // on a CTA that has not started. The counters are the sm80 family's (p.dq_sem, 64-row blocks,
  // zero-filled workspace).
  static constexpr bool kDet = kDet_;
  // false: each consumer thread adds its dQ values into dq_accum (red.global.add.v2.f32).
  // true: the consumers write the step's dQ tile to shared memory in dq_accum's 8x8-block order
  // and warp 1 of the producer warpgroup adds it with one bulk reduce-add (cp.reduce.async.bulk)
  // per 8 query rows (named barriers 2 "dQ full" and 3 "dQ empty", 288 threads each).
  static constexpr bool kDqBulk = kDqBulk_;
  // dV issued before the dS arithmetic (under which it runs) rather than after it: only where
  // the registers allow (hd64 holds 64x128 fp32 S^T and dP^T per thread: it spilled 144 B).
  // kOrder_: -1 this rule, 0 / 1 force the late / early order (tuning variants).
  static constexpr bool kEarlyDV = kOrder_ < 0 ? kD_ >= 128 : kOrder_ == 1;
  // true (tuning variant, hd64): each warpgroup computes a full BM x D dQ partial from its own
  // 64 keys (its own dS half, a 128-thread barrier), so the two warpgroups are not held in
  // lockstep by the shared dS; twice the dQ reductions.
  static constexpr bool kLocalDQ = kLocalDQ_;
  static constexpr int kD = kD_;
  static constexpr int kBM = kBM_;     // query rows per step
  static constexpr int kBN = 128;      // keys per CTA (64 per consumer warpgroup)
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384;
  // dQ = dS K: the two warpgroups split the query rows (BM = 128) or the head dim (BM = 64);
  // either way each computes a 64 x kQN tile.
  static constexpr bool kSplitM = kBM == 128;
  static constexpr int kQN = kSplitM ? kD : kD / 2;
  static_assert(kBM == 64 || kBM == 128, "BM is 64 or 128");
  static_assert(kD % 64 == 0 && kQN % 64 == 0, "128-byte swizzled tiles need 64-element rows");

  // Q and dO ring: (rows, head dim, stage), head dim contiguous. The transposed views
  // (head dim, rows, stage) are the MN-major B operands of dK += dS^T Q and dV += P^T dO.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             Shape<Int<kBM>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kD>, Int<kBM>, Int<kStages>>{},
                                 Stride<Int<kBM>, _1, Int<kBM * kD>>{})));
  // K and V: (keys, head dim); K^T (head dim, keys) is the MN-major B operand of dQ = dS K.
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             Shape<Int<kBN>, Int<kD>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kD>, Int<kBN>>{}, Stride<Int<kBN>, _1>{})));
  // dS as the A operand of dQ = dS K: (query rows, keys, buffer), query rows contiguous.
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                              Shape<Int<kBM>, Int<kBN>, _2>{}));
  // The same storage as (keys, query rows, buffer): the S^T / dP^T accumulator's coordinates,
  // query rows contiguous, so the accumulator leaves with plain stmatrix (8 rows of 16 bytes).
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_layout(Shape<Int<kBN>, Int<kBM>, _2>{},
                                  Stride<Int<kBM>, _1, Int<kBM * kBN>>{})));

  // kLocalDQ: (rows, 64 keys, warpgroup, buffer) and K^T of one warpgroup's 64 keys (its half of
  // sK is contiguous when kD == 64), and a one-warpgroup dQ MMA over K = 64 keys.
  static_assert(!kLocalDQ_ || (kD_ == 64 && !kDqBulk_), "kLocalDQ: hd64, red.v2 reductions");
  static_assert(!kDet_ || (!kLocalDQ_ && !kDqBulk_), "kDet: the default dQ path");
  static_assert(!kPre_ || !kLocalDQ_, "kPre: not with kLocalDQ");
  static_assert(kBM_ % kBwdBlockM == 0, "the dQ counters count blocks of kBwdBlockM rows");
  using SmemLayoutdSw = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                               Shape<Int<kBM>, _64, _2, _2>{}));
  using SmemLayoutKh = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<_64, Int<kD>>{}));
  using SmemLayoutKht = decltype(composition(
      SmemLayoutKh{}, make_layout(Shape<Int<kD>, _64>{}, Stride<_64, _1>{})));
  using TiledMmadQw = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kD>, _64>, GMMA::Major::MN,
                           GMMA::Major::MN>()));

  // Each tiled MMA spans both consumer warpgroups (256 threads).
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBM>, Int<kD>>>(),
      Layout<Shape<_2, _1, _1>>{}));
  using TiledMmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kD>, Int<kBM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  using AtomLayoutdQ = std::conditional_t<kSplitM, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _2, _1>>>;
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kQN>, Int<kBN>>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      AtomLayoutdQ{}));

  using ShapeG = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideRow = cute::Stride<int64_t, _1, int64_t, int64_t>;
  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const *>(nullptr)), ShapeG{}, StrideRow{}),
      SmemLayoutQ{}(_, _, 0), Shape<Int<kBM>, Int<kD>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<T const *>(nullptr)), ShapeG{}, StrideRow{}),
      SmemLayoutK{}, Shape<Int<kBN>, Int<kD>>{}, _1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutK>, 1024> v;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutQ>, 1024> dout;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutdS>, 1024> ds;
    alignas(16) float lse[kStages][kBM];
    alignas(16) float dsum[kStages][kBM];
    typename Pipeline::SharedStorage pipe;
    alignas(8) uint64_t bar_kv;
    // dQ tile in dq_accum order, [row / 8][col / 8][row % 8][col % 8] (kDqBulk only)
    alignas(128) float dq[kDqBulk ? kBM * kD : 4];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;

  static constexpr uint32_t kBytesKV = 2u * kBN * kD * sizeof(T);
  static constexpr uint32_t kBytesStep = 2u * kBM * kD * sizeof(T) + 2u * kBM * sizeof(float);
};

template <typename Tr>
struct BwdKernelParams {
  typename Tr::TmaQ tma_q, tma_do;
  typename Tr::TmaK tma_k, tma_v;
  Params p;
  const float *lse2;  // (batch, hq, sq_pad): lse * log2(e), +inf for rows without keys or past sq
  const float *dsum;  // (batch, hq, sq_pad): rowsum(dO * O) - dlse, 0 past sq
  int32_t sq_pad;
};

// 1-D bulk copy global -> shared completing on an mbarrier (16-byte aligned, bytes % 16 == 0).
__device__ __forceinline__ void bulk_g2s(void *smem, const void *gmem, uint32_t bytes, uint64_t *bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(s),
      "l"(gmem), "r"(bytes), "r"(b)
      : "memory");
#endif
}

__device__ __forceinline__ void red_add_v2(float *ptr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(a), "f"(b)
               : "memory");
#endif
}

// The accumulator fragment of a 64xN wgmma, ((2 cols, 2 rows, N/8), MMA_M, MMA_N), viewed as
// (rows, cols): a thread holds 2 rows (lane/4 and lane/4 + 8 of its warp's 16) and N/4 columns.
template <class L>
CUTE_HOST_DEVICE auto bwd_rowcol(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same fragment as the register A operand of a 64xNx16 wgmma: each pair of 8-column
// blocks becomes one k-block, ((2, 2, 2), MMA_M, N/16).
template <class L>
CUTE_HOST_DEVICE auto bwd_acc_as_a(L l) {
  auto m0 = get<0>(l);                                                    // (2, 2, N/8)
  auto split = logical_divide(m0, Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)), get<1>(l),
                     coalesce(make_layout(get<2, 1>(split), get<2>(l))));
}

__device__ __forceinline__ int ld_acquire_gpu(const int *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    bwd_kernel(const __grid_constant__ BwdKernelParams<Tr> kp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int kD = Tr::kD, kBN = Tr::kBN, kBM = Tr::kBM;
  using Pipeline = typename Tr::Pipeline;
  using PipeState = typename cutlass::PipelineState<Tr::kStages>;
  const Params &p = kp.p;

  extern __shared__ char smem_raw[];
  char *smem_aligned = reinterpret_cast<char *>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto &ss = *reinterpret_cast<typename Tr::SharedStorage *>(smem_aligned);

  const int n_block = Tr::kDet ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo si(p, b);
  const int n0 = n_block * kBN;
  int m_min, m_max;
  query_block_range(p, si, n0, kBN, kBM, m_min, m_max);
  const int nm = max(0, m_max - m_min);
  const int num_steps = nm * p.group;
  // Key blocks start their walk at different query blocks, so that CTAs running together add
  // into different dQ rows.
  const int rot = (nm > 0 && !Tr::kDet) ? n_block % nm : 0;
  auto step_hm = [&](int s, int &h, int &m) __attribute__((always_inline)) {
    const int g = s / nm;
    int mi = s - g * nm + rot;
    if (mi >= nm) mi -= nm;
    h = hk * p.group + g;
    m = m_min + mi;
  };

  const int wg = threadIdx.x / 128;

  typename Pipeline::Params pp;
  pp.transaction_bytes = Tr::kBytesStep;
  pp.role = wg == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = 2 * 128;
  Pipeline pipe(ss.pipe, pp, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_kv, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutdSt{});

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if constexpr (Tr::kDqBulk) {
      if (threadIdx.x / 32 == 1 && num_steps > 0) {  // warp 1: dQ bulk reduce-adds
        const uint32_t sdq = static_cast<uint32_t>(__cvta_generic_to_shared(&ss.dq[0]));
        const uint32_t bytes = (uint32_t)p.d * 8 * sizeof(float);  // 8 rows x d columns
        const int64_t dq_blk = (int64_t)p.hq * p.d * 8;
        for (int s = 0; s < num_steps; ++s) {
          int h, m;
          step_hm(s, h, m);
          const int m0 = m * kBM;
          const int groups = min(kBM / 8, ceil_div(si.sq - m0, 8));
          cutlass::arch::NamedBarrier::sync(288, 2);  // dQ full
          if (threadIdx.x == 32) {
            const int64_t i0 = si.q_row0 + m0;  // a multiple of 8: seqlen_q rows per batch...
            float *dst = p.dq_accum + (i0 >> 3) * dq_blk + (int64_t)h * p.d * 8;
            // ...only when seqlen_q % 8 == 0; bwd_unsupported declines the rest for this variant
            for (int g = 0; g < groups; ++g)
              asm volatile(
                  "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                      dst + g * dq_blk),
                  "r"(sdq + (uint32_t)(g * kD * 8 * sizeof(float))), "r"(bytes)
                  : "memory");
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
            asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
          }
          __syncwarp();
          if (s + 1 < num_steps) cutlass::arch::NamedBarrier::arrive(288, 3);  // dQ empty
        }
        if (threadIdx.x == 32) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
      }
    }
    if (threadIdx.x == 0 && num_steps > 0) {
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.seqlen_q, p.d, p.hq, p.batch));
      Tensor mdO = kp.tma_do.get_tma_tensor(make_shape(p.seqlen_q, p.d_v, p.hq, p.batch));
      Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.seqlen_k, p.d, p.hkv, p.batch));
      Tensor mV = kp.tma_v.get_tma_tensor(make_shape(p.seqlen_k, p.d_v, p.hkv, p.batch));
      auto cq = kp.tma_q.get_slice(_0{});
      auto cdo = kp.tma_do.get_slice(_0{});
      auto ck = kp.tma_k.get_slice(_0{});
      auto cv = kp.tma_v.get_slice(_0{});
      Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
      Tensor gV = local_tile(mV(_, _, hk, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_kv, Tr::kBytesKV);
      copy(kp.tma_k.with(ss.bar_kv), ck.partition_S(gK), ck.partition_D(sK));
      copy(kp.tma_v.with(ss.bar_kv), cv.partition_S(gV), cv.partition_D(sV));

      Tensor tQsQ = cq.partition_D(sQ);     // (TMA, 1, 1, stages)
      Tensor tdOsdO = cdo.partition_D(sdO);
      PipeState st = cutlass::make_producer_start_state<Pipeline>();
      for (int s = 0; s < num_steps; ++s) {
        int h, m;
        step_hm(s, h, m);
        Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kBM>, Int<kD>>{}, make_coord(m, 0));
        Tensor gdO = local_tile(mdO(_, _, h, b), Shape<Int<kBM>, Int<kD>>{}, make_coord(m, 0));
        pipe.producer_acquire(st);
        uint64_t *bar = pipe.producer_get_barrier(st);
        const int i = st.index();
        copy(kp.tma_q.with(*bar), cq.partition_S(gQ), tQsQ(_, _, _, i));
        copy(kp.tma_do.with(*bar), cdo.partition_S(gdO), tdOsdO(_, _, _, i));
        const int64_t row = ((int64_t)b * p.hq + h) * kp.sq_pad + (int64_t)m * kBM;
        bulk_g2s(&ss.lse[i][0], kp.lse2 + row, kBM * sizeof(float), bar);
        bulk_g2s(&ss.dsum[i][0], kp.dsum + row, kBM * sizeof(float), bar);
        ++st;
      }
    }
  } else {
    // ---------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<240>();
    const int tid = threadIdx.x - 128;  // 0..255 over both consumer warpgroups
    typename Tr::TiledMmaSdP mma_sdp;
    typename Tr::TiledMmaKV mma_kv;
    typename Tr::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_kv = mma_kv.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    // S^T = K Q^T, dP^T = V dO^T: A = this warpgroup's 64 keys, B = the step's query rows.
    Tensor tSrK = thr_sdp.make_fragment_A(thr_sdp.partition_A(sK));     // (MMA, 1, D/16)
    Tensor tSrQ = thr_sdp.make_fragment_B(thr_sdp.partition_B(sQ));     // (MMA, 1, D/16, stages)
    Tensor tdPrV = thr_sdp.make_fragment_A(thr_sdp.partition_A(sV));
    Tensor tdPrdO = thr_sdp.make_fragment_B(thr_sdp.partition_B(sdO));
    // dV += P^T dO, dK += dS^T Q: B = dO^T, Q^T (head dim, query rows), MN-major.
    Tensor tdVrdOt = thr_kv.make_fragment_B(thr_kv.partition_B(sdOt));  // (MMA, 1, BM/16, stages)
    Tensor tdKrQt = thr_kv.make_fragment_B(thr_kv.partition_B(sQt));
    // dQ = dS K: A = dS (query rows, keys), B = K^T (head dim, keys).
    Tensor tdQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS));   // (MMA, 1, BN/16, 2)
    Tensor tdQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));   // (MMA, 1, BN/16)

    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});
    Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});
    Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<kD>>{});
    Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<kD>>{});
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<kD>>{});
    clear(acc_dk);
    clear(acc_dv);

    // (key, query row) of each S^T element this thread holds; (row, col) of each dQ element.
    Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kBM>>{}));
    Tensor S_rc = make_tensor(tSrS.data(), bwd_rowcol(tSrS.layout()));
    Tensor dP_rc = make_tensor(tdPrdP.data(), bwd_rowcol(tdPrdP.layout()));
    Tensor C_rc = make_tensor(cS.data(), bwd_rowcol(cS.layout()));
    constexpr int kRows = decltype(size<0>(S_rc))::value;  // 2
    constexpr int kCols = decltype(size<1>(S_rc))::value;  // BM / 4
    static_assert(kRows == 2, "a thread holds two rows of a 64-row wgmma accumulator");

    Tensor rP = make_tensor_like<T>(tSrS);
    Tensor rdS = make_tensor_like<T>(tdPrdP);
    Tensor tPrP = make_tensor(rP.data(), bwd_acc_as_a(rP.layout()));
    Tensor tdSrdS = make_tensor(rdS.data(), bwd_acc_as_a(rdS.layout()));
    Tensor rdS_rc = make_tensor(rdS.data(), bwd_rowcol(rdS.layout()));

    const float sl2 = p.score_log2, scale = p.scale;
    PipeState st;
    if (num_steps > 0) cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_kv, 0);

    // S^T = K Q^T of the stage's query rows, one commit group.
    auto issue_s = [&](int stage_s, bool arrive) __attribute__((always_inline)) {
      if (arrive) {
        warpgroup_fence_operand(tSrS);
        warpgroup_arrive();
      }
      mma_sdp.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kb = 0; kb < size<2>(tSrK); ++kb) {
        gemm(mma_sdp, tSrK(_, _, kb), tSrQ(_, _, kb, stage_s), tSrS);
        mma_sdp.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    if constexpr (Tr::kPre) {  // step 0's S^T; later steps' are issued at the end of the step before
      if (num_steps > 0) {
        pipe.consumer_wait(st);
        issue_s(st.index(), true);
      }
    }

    for (int s = 0; s < num_steps; ++s) {
      int h, m;
      step_hm(s, h, m);
      const int m0 = m * kBM;
      const int buf = s & 1;
      if constexpr (!Tr::kPre) pipe.consumer_wait(st);
      const int stage = st.index();

      // S^T and dP^T, two batches (kPre: S^T is in flight already).
      if constexpr (!Tr::kPre) warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tdPrdP);
      warpgroup_arrive();
      if constexpr (!Tr::kPre) issue_s(stage, false);
      mma_sdp.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kb = 0; kb < size<2>(tdPrV); ++kb) {
        gemm(mma_sdp, tdPrV(_, _, kb), tdPrdO(_, _, kb, stage), tdPrdP);
        mma_sdp.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();

      // P^T = exp2(S^T * sl2 - lse2) on allowed (key, row) pairs, 0 elsewhere.
      warpgroup_wait<1>();
      warpgroup_fence_operand(tSrS);
      // Interior tiles run the plain loop; boundary tiles (causal / window edge, key tail) the
      // masked one, whose bounds are per key row (this thread's two): query row i is allowed
      // for key j iff j < sk and j - off - right <= i <= j - off + left (compares, no branches).
      if (!tile_needs_mask(p, si, m0, kBM, n0, kBN)) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float l2 = ss.lse[stage][get<1>(C_rc(0, c))];
#pragma unroll
          for (int r = 0; r < kRows; ++r) S_rc(r, c) = fast_exp2(fmaf(S_rc(r, c), sl2, -l2));
        }
      } else {
        int lo[kRows], hi[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int j = n0 + get<0>(C_rc(r, 0));
          // 64-bit: the window bounds may be INT32_MAX (unbounded sides come as -1)
          const int64_t jo = (int64_t)j - si.off - m0;
          lo[r] = p.window_right >= 0 ? (int)max(jo - p.window_right, (int64_t)(INT_MIN / 2))
                                      : INT_MIN / 2;
          hi[r] = p.window_left >= 0 ? (int)min(jo + p.window_left, (int64_t)(INT_MAX / 2))
                                     : INT_MAX / 2;
          if (j >= si.sk) hi[r] = INT_MIN / 2;  // key past the end: no row
        }
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int q = get<1>(C_rc(0, c));
          const float l2 = ss.lse[stage][q];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const float pr = fast_exp2(fmaf(S_rc(r, c), sl2, -l2));
            S_rc(r, c) = (q >= lo[r] && q <= hi[r]) ? pr : 0.f;
          }
        }
      }
      // P^T in the input type, the A operand of dV += P^T dO. kEarlyDV: now (dV runs under the
      // dS arithmetic). Else after dS^T is converted (session 9): P^T's 16-bit copy (BM / 4
      // registers) is not live during the dS arithmetic, where fp32 S^T and dP^T (BM / 2 each)
      // peak; at hd64 (BM 128) that peak spilled and made ptxas serialize the wgmmas (C7512).
      auto convert_p = [&]() __attribute__((always_inline)) {
#pragma unroll
        for (int e = 0; e < size(tSrS); ++e) rP(e) = static_cast<T>(tSrS(e));
        warpgroup_fence_operand(rP);
      };
      if constexpr (Tr::kEarlyDV) convert_p();

      // dV += P^T dO: issued now (kEarlyDV) so that it runs under the dS arithmetic, or after
      // it (fewer live registers).
      auto issue_dv = [&]() __attribute__((always_inline)) {
        warpgroup_fence_operand(acc_dv);
        warpgroup_arrive();
#pragma unroll
        for (int kb = 0; kb < size<2>(tPrP); ++kb)
          gemm(mma_kv, tPrP(_, _, kb), tdVrdOt(_, _, kb, stage), acc_dv);
        warpgroup_commit_batch();
      };
      if constexpr (Tr::kEarlyDV) {
        issue_dv();
        warpgroup_wait<1>();  // dP^T done (dV may still run)
      } else {
        warpgroup_wait<0>();
      }

      // dS^T = P^T (dP^T * scale - dsum * scale), in the input type.
      warpgroup_fence_operand(tdPrdP);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int q = get<1>(C_rc(0, c));
        const float ds = ss.dsum[stage][q] * scale;
#pragma unroll
        for (int r = 0; r < kRows; ++r) dP_rc(r, c) = S_rc(r, c) * fmaf(dP_rc(r, c), scale, -ds);
      }
#pragma unroll
      for (int e = 0; e < size(tdPrdP); ++e) rdS(e) = static_cast<T>(tdPrdP(e));
      warpgroup_fence_operand(rdS);
      if constexpr (!Tr::kEarlyDV) {
        convert_p();
        issue_dv();
      }

      // dK += dS^T Q: before the dS stores (kEarlyDV: they run under it) or after them.
      auto issue_dk = [&]() __attribute__((always_inline)) {
        warpgroup_fence_operand(acc_dk);
        warpgroup_arrive();
#pragma unroll
        for (int kb = 0; kb < size<2>(tdSrdS); ++kb)
          gemm(mma_kv, tdSrdS(_, _, kb), tdKrQt(_, _, kb, stage), acc_dk);
        warpgroup_commit_batch();
      };
      if constexpr (Tr::kEarlyDV) issue_dk();

      if constexpr (Tr::kLocalDQ) {
        // This warpgroup's dS half -> smem, its own barrier, dQ partial = dS_w K_w, reductions.
        const int w = tid / 128;
        Tensor sdSw = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutdSw{});
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int c = 0; c < kCols; c += 2) {
            const int key = get<0>(C_rc(r, c)) - 64 * w, q = get<1>(C_rc(r, c));
            T pair[2] = {rdS_rc(r, c), rdS_rc(r, c + 1)};
            *reinterpret_cast<uint32_t *>(&sdSw(q, key, w, buf)) = *reinterpret_cast<uint32_t *>(pair);
          }
        cutlass::arch::fence_view_async_shared();
        if constexpr (!Tr::kEarlyDV) issue_dk();
        cutlass::arch::NamedBarrier::sync(128, 4 + w);
        typename Tr::TiledMmadQw mma_dqw;
        auto thr_dqw = mma_dqw.get_thread_slice(tid % 128);
        Tensor sKtw = make_tensor(make_smem_ptr(ss.k.data() + w * 64 * kD), typename Tr::SmemLayoutKht{});
        Tensor tdQrdSw = thr_dqw.make_fragment_A(thr_dqw.partition_A(sdSw(_, _, w, _)));  // (MMA, 2, 4, 2)
        Tensor tdQrKtw = thr_dqw.make_fragment_B(thr_dqw.partition_B(sKtw));              // (MMA, 1, 4)
        Tensor acc_dqw = partition_fragment_C(mma_dqw, Shape<Int<kBM>, Int<kD>>{});
        warpgroup_fence_operand(acc_dqw);
        warpgroup_arrive();
        mma_dqw.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
        for (int kb = 0; kb < size<2>(tdQrdSw); ++kb) {
          gemm(mma_dqw, tdQrdSw(_, _, kb, buf), tdQrKtw(_, _, kb), acc_dqw);
          mma_dqw.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_dv);
        warpgroup_fence_operand(acc_dk);
        warpgroup_fence_operand(acc_dqw);
        pipe.consumer_release(st);
        ++st;
        Tensor cQ = thr_dqw.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
        Tensor dQ_rc = make_tensor(acc_dqw.data(), bwd_rowcol(acc_dqw.layout()));
        Tensor cQ_rc = make_tensor(cQ.data(), bwd_rowcol(cQ.layout()));
        const int rows_q = si.sq - m0;
        const int64_t dq_blk = (int64_t)p.hq * p.d * 8;
        const int col0 = get<1>(cQ_rc(0, 0));
        float *dq_h = p.dq_accum + (int64_t)h * p.d * 8 + (col0 >> 3) * 64 + (col0 & 7);
#pragma unroll
        for (int r = 0; r < size<0>(dQ_rc); ++r) {
          const int row = get<0>(cQ_rc(r, 0));
          if (row < rows_q) {
            const int64_t i = si.q_row0 + m0 + row;
            float *rp = dq_h + (i >> 3) * dq_blk + (i & 7) * 8;
#pragma unroll
            for (int c = 0; c < size<1>(dQ_rc); c += 2)
              if (col0 + 8 * (c / 2) < p.d) red_add_v2(rp + (c / 2) * 64, dQ_rc(r, c), dQ_rc(r, c + 1));
          }
        }
        continue;
      }

      // dS^T -> shared memory as dS (query rows contiguous): columns c, c+1 of the fragment are
      // adjacent query rows, so each pair is one 4-byte store.
      // With stmatrix (session 9; 8 STSM.x4 per thread at hd64): the element-wise 4-byte stores
      // this replaces kept ~64 hoisted swizzled addresses live across the loop, so ptxas
      // serialized every wgmma of the hd64 kernel (C7512: a wait after each HGMMA) and spilled
      // 88 B (hd128 28 B); with it 16 B / 0 B and no serialization (NOTES.md, session 9).
      {
        auto r2s = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, T>{}, mma_sdp);
        auto r2s_thr = r2s.get_thread_slice(tid);
        Tensor tdSsdS = r2s_thr.partition_D(sdSt);  // (CPY, CPY_M, CPY_N, buffer)
        Tensor tdSrdS_s = r2s_thr.retile_S(rdS);
        copy(r2s, tdSrdS_s, tdSsdS(_, _, _, buf));
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> wgmma reads
      if constexpr (!Tr::kEarlyDV) issue_dk();

      // Both warpgroups' halves of dS are in shared memory: dQ = dS K.
      cutlass::arch::NamedBarrier::sync(256, 1);
      warpgroup_fence_operand(acc_dq);
      warpgroup_arrive();
      mma_dq.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kb = 0; kb < size<2>(tdQrdS); ++kb) {
        gemm(mma_dq, tdQrdS(_, _, kb, buf), tdQrKt(_, _, kb), acc_dq);
        mma_dq.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(acc_dq);
      pipe.consumer_release(st);  // Q, dO, lse, dsum of this stage are no longer read
      ++st;
      if constexpr (Tr::kPre) {  // the next step's S^T runs under this step's dQ adds
        if (s + 1 < num_steps) {
          pipe.consumer_wait(st);
          issue_s(st.index(), true);
        }
      }

      if constexpr (Tr::kDqBulk) {
        // dQ tile -> shared memory in dq_accum's order; the reducer warp adds it.
        Tensor cQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
        Tensor dQ_rc = make_tensor(acc_dq.data(), bwd_rowcol(acc_dq.layout()));
        Tensor cQ_rc = make_tensor(cQ.data(), bwd_rowcol(cQ.layout()));
        if (s > 0) cutlass::arch::NamedBarrier::sync(288, 3);  // the previous tile was read
        // Fragment (r, c) sits at row row0 + 8 r, column col0 + c % 2 + 8 (c / 2) (checked on
        // the host), so one base address and static offsets cover it.
        const int row0 = get<0>(cQ_rc(0, 0)), col0 = get<1>(cQ_rc(0, 0));
        float *base = &ss.dq[((row0 >> 3) * (kD / 8) + (col0 >> 3)) * 64 + (row0 & 7) * 8 + (col0 & 7)];
#pragma unroll
        for (int r = 0; r < size<0>(dQ_rc); ++r)
#pragma unroll
          for (int c = 0; c < size<1>(dQ_rc); c += 2)
            *reinterpret_cast<float2 *>(base + r * (kD / 8) * 64 + (c / 2) * 64) =
                make_float2(dQ_rc(r, c), dQ_rc(r, c + 1));
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::arrive(288, 2);  // dQ full
        continue;
      }

      // dQ into the fp32 workspace: 8x8 blocks, (row i, head h, col c) at
      // ((i / 8 * hq + h) * d + c / 8 * 8) * 8 + i % 8 * 8 + c % 8.
      {
        Tensor cQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
        Tensor dQ_rc = make_tensor(acc_dq.data(), bwd_rowcol(acc_dq.layout()));
        Tensor cQ_rc = make_tensor(cQ.data(), bwd_rowcol(cQ.layout()));
        const int rows_q = si.sq - m0;
        const int64_t dq_blk = (int64_t)p.hq * p.d * 8;
        // Fragment (r, c) is row row0 + 8 r, column col0 + c % 2 + 8 (c / 2) (host-checked).
        const int row0 = get<0>(cQ_rc(0, 0)), col0 = get<1>(cQ_rc(0, 0));
        const int64_t i = si.q_row0 + m0 + row0;
        float *base = p.dq_accum + (int64_t)h * p.d * 8 + (i >> 3) * dq_blk + (i & 7) * 8 +
                      (col0 >> 3) * 64 + (col0 & 7);
        int *sem = nullptr;
        if constexpr (Tr::kDet) {  // wait for this CTA's turn on (b, h, m)
          sem = p.dq_sem + ((int64_t)b * p.hq + h) * p.num_m_blocks_bwd + m * (kBM / kBwdBlockM);
          if (tid == 0) {
            int n_lo, n_hi;
            key_block_range(p, si, m0, kBM, kBN, n_lo, n_hi);
            const int target = n_hi - 1 - n_block;  // descending key-block order
            while (ld_acquire_gpu(sem) != target) {
            }
          }
          cutlass::arch::NamedBarrier::sync(256, 4);
        }
#pragma unroll
        for (int r = 0; r < size<0>(dQ_rc); ++r) {
          if (row0 + 8 * r < rows_q) {
#pragma unroll
            for (int c = 0; c < size<1>(dQ_rc); c += 2)
              if (col0 + 8 * (c / 2) < p.d)
                red_add_v2(base + r * dq_blk + (c / 2) * 64, dQ_rc(r, c), dQ_rc(r, c + 1));
          }
        }
        if constexpr (Tr::kDet) {  // the adds are visible (gpu scope) before the turn passes on
          __threadfence();
          cutlass::arch::NamedBarrier::sync(256, 4);
          if (tid == 0) atomicAdd(sem, 1);
        }
      }
    }

    // Epilogue: dK and dV (zeros when no query row sees this key block).
    Tensor cKV = thr_kv.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kD>>{}));
    Tensor cKV_rc = make_tensor(cKV.data(), bwd_rowcol(cKV.layout()));
    Tensor dK_rc = make_tensor(acc_dk.data(), bwd_rowcol(acc_dk.layout()));
    Tensor dV_rc = make_tensor(acc_dv.data(), bwd_rowcol(acc_dv.layout()));
    T *dk = static_cast<T *>(p.dk) + si.k_base(b, p.dk_bs, p.dk_rs) + (int64_t)hk * p.dk_hs;
    T *dv = static_cast<T *>(p.dv) + si.k_base(b, p.dv_bs, p.dv_rs) + (int64_t)hk * p.dv_hs;
#pragma unroll
    for (int r = 0; r < size<0>(dK_rc); ++r) {
      const int j = n0 + get<0>(cKV_rc(r, 0));
      if (j < si.sk) {
        T *krow = dk + (int64_t)j * p.dk_rs;
        T *vrow = dv + (int64_t)j * p.dv_rs;
#pragma unroll
        for (int c = 0; c < size<1>(dK_rc); c += 2) {
          const int col = get<1>(cKV_rc(r, c));
          if (col < p.d) {
            T kp2[2] = {static_cast<T>(dK_rc(r, c)), static_cast<T>(dK_rc(r, c + 1))};
            *reinterpret_cast<uint32_t *>(krow + col) = *reinterpret_cast<uint32_t *>(kp2);
          }
          if (col < p.d_v) {  // dV: Dv columns
            T vp2[2] = {static_cast<T>(dV_rc(r, c)), static_cast<T>(dV_rc(r, c + 1))};
            *reinterpret_cast<uint32_t *>(vrow + col) = *reinterpret_cast<uint32_t *>(vp2);
          }
        }
      }
    }
  }
#else
  __trap();  // the sm90 family is built for sm_90a only
#endif
}

template <typename Tr>
int launch_bwd(const Params &p, const float *lse2, const float *dsum, int sq_pad,
               cudaStream_t stream) {
  using T = typename Tr::T;
  BwdKernelParams<Tr> kp;
  kp.p = p;
  kp.lse2 = lse2;
  kp.dsum = dsum;
  kp.sq_pad = sq_pad;
  auto sq = make_shape(p.seqlen_q, p.d, p.hq, p.batch);
  auto sk = make_shape(p.seqlen_k, p.d, p.hkv, p.batch);
  // dO and V have Dv columns (Dv != D: the TMA box's columns past Dv read zeros)
  auto sqv = make_shape(p.seqlen_q, p.d_v, p.hq, p.batch);
  auto skv = make_shape(p.seqlen_k, p.d_v, p.hkv, p.batch);
  Tensor mQ = make_tensor(make_gmem_ptr(static_cast<T const *>(p.q)), sq,
                          make_stride(p.q_rs, _1{}, p.q_hs, p.q_bs));
  Tensor mdO = make_tensor(make_gmem_ptr(static_cast<T const *>(p.dout)), sqv,
                           make_stride(p.do_rs, _1{}, p.do_hs, p.do_bs));
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<T const *>(p.k)), sk,
                          make_stride(p.k_rs, _1{}, p.k_hs, p.k_bs));
  Tensor mV = make_tensor(make_gmem_ptr(static_cast<T const *>(p.v)), skv,
                          make_stride(p.v_rs, _1{}, p.v_hs, p.v_bs));
  auto sl_q = typename Tr::SmemLayoutQ{}(_, _, 0);
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, sl_q, Shape<Int<Tr::kBM>, Int<Tr::kD>>{}, _1{});
  kp.tma_do = make_tma_copy(SM90_TMA_LOAD{}, mdO, sl_q, Shape<Int<Tr::kBM>, Int<Tr::kD>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Tr::SmemLayoutK{},
                           Shape<Int<Tr::kBN>, Int<Tr::kD>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, typename Tr::SmemLayoutK{},
                           Shape<Int<Tr::kBN>, Int<Tr::kD>>{}, _1{});
  auto kernel = bwd_kernel<Tr>;
  constexpr int smem = Tr::kSmemBytes;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(ceil_div(p.seqlen_k, Tr::kBN), p.hkv, p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(kp);
  return cudaGetLastError();
}

// Session 11 variants of the (non-deterministic) bf16 kernels, chosen per call by
// FLASHMUX_CUDA_SM90_BWD (read on the host at each launch): "bulk" (kDqBulk: dQ through shared
// memory and cp.reduce.async.bulk adds by a producer warp, where seqlen_q % 8 == 0), "pre" (kPre:
// the next step's S^T issued before this step's dQ adds), "bulk+pre" (both), "plain" (the
// red.global.add dQ kernel of session 10). Unset: "bulk", the default since session 12 (H200,
// bf16, backward alone: +5..+10% over "plain" at head_dim 64 and 128, 2k-16k, causal or not;
// "pre" and "bulk+pre" were slower). Their kernels live in bwdvar_hdim64.cu / bwdvar_hdim128.cu,
// compiled in full builds only (not with -DFMX_HEAD_DIMS_LIMITED, the lean CI tier, which runs
// the plain kernel). Returns bit 1 (bulk) | bit 2 (pre), 0 = the plain kernel.
inline int bwd_variant_env(const Params &p) {
  if (p.deterministic) return 0;
  const char *v = std::getenv("FLASHMUX_CUDA_SM90_BWD");
  if (v == nullptr || v[0] == '\0') v = "bulk";
  int r = 0;
  if (std::strstr(v, "bulk") != nullptr && p.seqlen_q % 8 == 0) r |= 1;
  if (std::strstr(v, "pre") != nullptr) r |= 2;
  return r;
}
template <int D>
int run_bwd_var(int variant, const Params &p, const float *lse2, const float *dsum, int sq_pad,
                cudaStream_t stream);

}  // namespace sm90
}  // namespace fmx
