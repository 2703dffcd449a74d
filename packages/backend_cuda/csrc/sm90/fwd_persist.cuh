// sm90 forward, persistent variant (session 10, issue 12): one CTA per SM loops over tiles.
//
// Session 1 (NOTES.md, "Call 2") tried a persistent grid by looping the consumers over tiles
// themselves; it lost 5-12% because the tile's coordinates, SeqInfo and loop bounds stayed live
// in the consumers' registers across the main loop (and hd128 spilled more). This version keeps
// the consumers free of per-tile constants:
//   - the producer thread decodes tile t (round r: t = r * G + c, or r * G + G - 1 - c in odd
//     rounds (snake), c = blockIdx.x, G = gridDim.x; tile order as the tile kernel's grid:
//     (head, batch) major, the heaviest query block first within one) and writes {m_block, h, b, n_min, n_max} into a 2-slot
//     shared-memory ring (tile_full / tile_empty mbarriers); a sentinel (m_block = -1) ends it;
//   - the consumers read n_min / n_max at the start of a tile, re-read the query row from shared
//     memory where a mask needs it, and the tile's head / batch only in the epilogue;
//   - Q has one buffer with a q_empty mbarrier: the consumers arrive once every S = Q K^T of the
//     tile has completed, so the next tile's Q loads under the last O += P V and the epilogue;
//   - O goes registers -> shared memory (swizzled, the Q layout) -> TMA store, one store per
//     consumer warpgroup (64 rows), waited for only before the next tile's epilogue reuses sO,
//     so the store overlaps the next tile's main loop; lse is stored from registers as before;
//   - the two consumer warpgroups' GEMM turns (ping-pong) alternate without a break across
//     tiles (the second warpgroup's first arrival happens once, at kernel start).
// Selected per call with FLASHMUX_CUDA_SM90_FWD=persist (fwd_hdim{64,96,128}.cu, bf16, the
// overlapped loop only) where the output's strides suit TMA; else the one-CTA-per-tile kernel
// of fwd_kernel.cuh runs. Measured slower than that kernel on the H200 (call s10b, with the
// query-block-major order): opt-in, compiled where FMX_SM90_PERSIST is 1 (the default except in
// head-dim-limited builds, i.e. the lean CI tier).
#pragma once
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>

#include "fwd_kernel.cuh"

namespace fmx {
namespace sm90 {
using namespace cute;

struct TileInfo {
  // nf, bm_row, slope_bits: kExt only (the walk's full count and list row, the ALiBi slope)
  int m_block, h, b, n_min, n_max, nf, bm_row, slope_bits;
};

__device__ __forceinline__ int ld_volatile(const int *p) { return *reinterpret_cast<const volatile int *>(p); }
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }


template <typename Tr>
struct Persist {
  using T = typename Tr::T;
  static_assert(Tr::kOverlap && Tr::kPingPong, "the persistent forward has the overlapped loop only");
  // O staged like Q: two 64-row halves, 128-byte swizzle (conflict-free pair stores).
  using SmemLayoutO = typename Tr::SmemLayoutQ;
  using TmaO = decltype(make_tma_copy(
      SM90_TMA_STORE{},
      make_tensor(make_gmem_ptr(static_cast<T *>(nullptr)), typename Tr::ShapeG{}, typename Tr::StrideRow{}),
      SmemLayoutO{}(_, _, 0), Shape<Int<Tr::kWM>, Int<Tr::kD>>{}, _1{}));
  struct SharedStorage {
    alignas(1024) cute::array_aligned<T, cosize_v<typename Tr::SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<typename Tr::SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<typename Tr::SmemLayoutVt>, 1024> v;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemLayoutO>, 1024> o;
    typename Tr::Pipeline::SharedStorage pipe_k, pipe_v;
    alignas(8) uint64_t bar_q;
    alignas(8) uint64_t q_empty;
    alignas(8) uint64_t tile_full[2];
    alignas(8) uint64_t tile_empty[2];
    alignas(16) TileInfo tiles[2];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "over the 227 KB of smem");
};

template <typename Tr>
struct FwdPersistParams {
  typename Tr::TmaQ tma_q;
  typename Tr::TmaK tma_k;
  typename Tr::TmaV tma_v;
  typename Persist<Tr>::TmaO tma_o;
  Params p;
  int num_m;        // query blocks of 128 rows
  int total_tiles;  // num_m * hq * batch
};

// kExt (session 11): 0 = dense; 1 = ALiBi slopes / block masks as fwd_kernel's kExt = 1 (the
// producer writes the walk's counts, list row and slope into the tile ring).
template <typename Tr, int kExt = 0>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fwd_kernel_persist(const __grid_constant__ FwdPersistParams<Tr> kp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using Pz = Persist<Tr>;
  using ClusterBarrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD, kBN = Tr::kBN, kWM = Tr::kWM, kBM = Tr::kBM;
  using Pipeline = typename Tr::Pipeline;
  using PipeState = typename cutlass::PipelineState<Tr::kStages>;
  const Params &p = kp.p;

  extern __shared__ char smem_raw[];
  char *smem_aligned = reinterpret_cast<char *>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto &ss = *reinterpret_cast<typename Pz::SharedStorage *>(smem_aligned);

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
    ClusterBarrier::init(&ss.bar_q, 1);
    ClusterBarrier::init(&ss.q_empty, 256);
    ClusterBarrier::init(&ss.tile_full[0], 1);
    ClusterBarrier::init(&ss.tile_full[1], 1);
    ClusterBarrier::init(&ss.tile_empty[0], 256);
    ClusterBarrier::init(&ss.tile_empty[1], 256);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  Tensor sO = make_tensor(make_smem_ptr(ss.o.data()), typename Pz::SmemLayoutO{});

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    // 24, as the one-CTA-per-tile kernel: setmaxnreg.inc takes registers only from what the
    // producer released, and 128 x (24 + 2 x 240) = 384 x 168, the launch allocation (32 would
    // leave the consumers 1024 registers short: a hang). The tile decode spills a few words in
    // the producer thread (hd64 60 B, ptxas), off the consumers' path.
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.seqlen_q, p.d, p.hq, p.batch));
      Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.seqlen_k, p.d, p.hkv, p.batch));
      Tensor mVt = kp.tma_v.get_tma_tensor(make_shape(p.d_v, p.seqlen_k, p.hkv, p.batch));
      auto cq = kp.tma_q.get_slice(_0{});
      auto ck = kp.tma_k.get_slice(_0{});
      auto cv = kp.tma_v.get_slice(_0{});
      Tensor tQsQ = cq.partition_D(sQ);  // (TMA, 1, 1, 2)
      Tensor tKsK = ck.partition_D(sK);  // (TMA, 1, 1, stages)
      Tensor tVsV = cv.partition_D(sVt);
      PipeState st_k = cutlass::make_producer_start_state<Pipeline>();
      PipeState st_v = cutlass::make_producer_start_state<Pipeline>();
      for (int iter = 0;; ++iter) {
        // round `iter` of the tile list (sorted heaviest first), snake order: CTA c takes tile
        // c in even rounds and G - 1 - c in odd ones, so that a CTA that drew a heavier tile in
        // one round draws a lighter one in the next (causal lengths fall along the list)
        const int t = iter * (int)gridDim.x +
                      ((iter & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x);
        const int slot = iter & 1;
        if (iter >= 2) ClusterBarrier::wait(&ss.tile_empty[slot], ((iter >> 1) - 1) & 1);
        int m_block = -1, h = 0, b = 0, n_min = 0, n_max = 0;
        [[maybe_unused]] int nf = 0, bm_row = 0;
        [[maybe_unused]] float slope = 0.f;
        if (t < kp.total_tiles) {
          // head-major, as the one-CTA-per-tile grid launches: the CTAs running together work on
          // the query blocks of one or two (head, batch) pairs and share their K/V in L2 (the
          // first version went query-block-major, heaviest first over all heads: ~132 heads'
          // K/V in flight at once, 0.78-0.89x the tile kernel on the H200, call s10b)
          m_block = kp.num_m - 1 - t % kp.num_m;  // heaviest (last) query blocks first
          const int r = t / kp.num_m;
          h = r % p.hq;
          b = r / p.hq;
          const SeqInfo si(p, b);
          key_block_range(p, si, m_block * kBM, kBM, kBN, n_min, n_max);
          if constexpr (kExt) {
            if (p.bm_qnf != nullptr) {  // walk positions, as fwd_kernel
              BmWalk<kBN> bw;
              bw.init(p, b, h, m_block * kBM);
              nf = bw.nf;
              bm_row = BmWalk<kBN>::row_of(p, b, h, m_block * kBM);
              n_min = 0;
              n_max = bw.count;
            }
            if (p.alibi != nullptr)
              slope = __ldg(p.alibi + (int64_t)b * p.alibi_bs + h) / p.score_nat;
          }
        }
        volatile TileInfo *ti = &ss.tiles[slot];
        ti->m_block = m_block;
        ti->h = h;
        ti->b = b;
        ti->n_min = n_min;
        ti->n_max = n_max;
        if constexpr (kExt) {
          ti->nf = nf;
          ti->bm_row = bm_row;
          ti->slope_bits = __float_as_int(slope);
        }
        compiler_fence();
        ClusterBarrier::arrive(&ss.tile_full[slot]);  // release: the consumers see the fields
        if (m_block < 0) break;
        // Q of this tile once every S GEMM of the previous tile has completed
        if (iter >= 1) ClusterBarrier::wait(&ss.q_empty, (iter - 1) & 1);
        const int hk = h / p.group;
        Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kWM>, Int<kD>>{}, make_coord(_, 0));
        Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));
        Tensor gVt = local_tile(mVt(_, _, hk, b), Shape<Int<kD>, Int<kBN>>{}, make_coord(0, _));
        Tensor tQgQ = cq.partition_S(gQ);
        Tensor tKgK = ck.partition_S(gK);
        Tensor tVgV = cv.partition_S(gVt);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, Tr::kBytesQ);
        copy(kp.tma_q.with(ss.bar_q), tQgQ(_, _, _, 2 * m_block), tQsQ(_, _, _, 0));
        copy(kp.tma_q.with(ss.bar_q), tQgQ(_, _, _, 2 * m_block + 1), tQsQ(_, _, _, 1));
        [[maybe_unused]] BmWalk<kBN> bw;
        if constexpr (kExt) {
          if (p.bm_qnf != nullptr) bw.at(p, bm_row, nf, n_max);
        }
        for (int n = n_max - 1; n >= n_min; --n) {
          int nr = n;
          if constexpr (kExt) {
            if (p.bm_qnf != nullptr) nr = bw.n(n_max - 1 - n);
          }
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

    Tensor cS = make_identity_tensor(Shape<Int<kWM>, Int<kBN>>{});
    Tensor tScS = thr_s.partition_C(cS);
    Tensor S_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor C_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    constexpr int kRows = decltype(size<0>(S_rc))::value;  // 2
    static_assert(kRows == 2, "a thread holds two rows of a 64-row wgmma accumulator");

    float row_max[kRows], row_sum[kRows];
    const float sl2 = p.score_log2;

    PipeState st_k, st_v;
    Tensor rP = make_tensor_like<T>(tSrS);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));

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
    auto issue_o = [&](int stage) __attribute__((always_inline)) {
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < size<2>(tOrP); ++kb)
        gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrO);
      warpgroup_commit_batch();
    };
    // The masks of a non-varlen call need no per-tile state but the query row, read from the
    // tile ring (shared memory) where a boundary tile needs it.
    auto softmax = [&](int n, int slot, float (&corr)[kRows]) __attribute__((always_inline)) {
      warpgroup_fence_operand(tSrS);
      const SeqInfo si(p, 0);
      const int row0 = ld_volatile(&ss.tiles[slot].m_block) * kBM + w * kWM;
      if constexpr (kExt) {
        // fwd_kernel's kExt = 1 step: the tile's list entries and words after its S GEMM; the
        // walk's fields from the tile ring (kExt: n_max is the walk's count)
        const int cnt = ld_volatile(&ss.tiles[slot].n_max);
        ExtTile t{n * kBN, nullptr};
        if (p.bm_qnf != nullptr) {
          BmWalk<kBN> bw;
          bw.at(p, ld_volatile(&ss.tiles[slot].bm_row), ld_volatile(&ss.tiles[slot].nf), cnt);
          t.n0 = bw.n(cnt - 1 - n) * kBN;
          t.tb = bw.bits(p, cnt - 1 - n);
        }
        uint32_t wv[kRows][kBN / 32];
        ext_load_bits<kBN>(t, wv, C_rc, p, row0);
        const float slope = __int_as_float(ld_volatile(&ss.tiles[slot].slope_bits));
        ext_modify_scores<kWM, kBN>(S_rc, C_rc, t, wv, p, si, row0, p.alibi != nullptr, slope);
      } else {
        mask_boundary_tile<kWM, kBN>(S_rc, C_rc, p, si, row0, n * kBN);  // fwd_kernel.cuh
      }
      online_softmax_step(S_rc, row_max, row_sum, sl2, corr);
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
    // Ping-pong turns alternate across tiles: w = 1 arrives on w = 0's barrier once here, every
    // turn of either warpgroup ends with an arrival on the other's, and w = 0 takes the one
    // arrival left over after the last tile (both run the same tiles: the same turn count).
    auto my_turn = [&]() __attribute__((always_inline)) {
      cutlass::arch::NamedBarrier::sync(256, 1 + w);
    };
    auto end_turn = [&]() __attribute__((always_inline)) {
      cutlass::arch::NamedBarrier::arrive(256, 2 - w);
    };
    if (w == 1) cutlass::arch::NamedBarrier::arrive(256, 1);

    Tensor sOw = sO(_, _, w);

    float corr[kRows];
    for (int iter = 0;; ++iter) {
      const int slot = iter & 1;
      ClusterBarrier::wait(&ss.tile_full[slot], (iter >> 1) & 1);
      compiler_fence();
      if (ld_volatile(&ss.tiles[slot].m_block) < 0) break;
      const int n_min = ld_volatile(&ss.tiles[slot].n_min);
      const int n_max = ld_volatile(&ss.tiles[slot].n_max);
      clear(tOrO);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.f;
      }
      ClusterBarrier::wait(&ss.bar_q, iter & 1);
      if (n_max > n_min) {
        // first key block: S only
        pipe_k.consumer_wait(st_k);
        my_turn();
        issue_s(st_k.index());
        end_turn();
        warpgroup_wait<0>();
        pipe_k.consumer_release(st_k);
        ++st_k;
        softmax(n_max - 1, slot, corr);
        convert_p();
        // steady state: S of block n runs beside O += P V of block n + 1
        for (int n = n_max - 2; n >= n_min; --n) {
          pipe_k.consumer_wait(st_k);
          pipe_v.consumer_wait(st_v);
          my_turn();
          issue_s(st_k.index());
          issue_o(st_v.index());
          end_turn();
          warpgroup_wait<1>();
          pipe_k.consumer_release(st_k);
          ++st_k;
          softmax(n, slot, corr);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          pipe_v.consumer_release(st_v);
          ++st_v;
          rescale_o(corr);
          convert_p();
        }
        ClusterBarrier::arrive(&ss.q_empty);  // every S of the tile is done: next Q may load
        // last block's O += P V
        pipe_v.consumer_wait(st_v);
        my_turn();
        issue_o(st_v.index());
        end_turn();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        pipe_v.consumer_release(st_v);
        ++st_v;
      } else {
        ClusterBarrier::arrive(&ss.q_empty);
      }
      // ---- epilogue: O / l -> sO (this warpgroup's 64 rows) -> TMA store; lse from registers
      const int m_block = ld_volatile(&ss.tiles[slot].m_block);
      const int h = ld_volatile(&ss.tiles[slot].h), b = ld_volatile(&ss.tiles[slot].b);
      compiler_fence();
      ClusterBarrier::arrive(&ss.tile_empty[slot]);  // the slot's fields are in registers now
      const int row0 = m_block * kBM + w * kWM;
      Tensor cO = make_identity_tensor(Shape<Int<kWM>, Int<kD>>{});
      Tensor tOcO = thr_o.partition_C(cO);
      Tensor cO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
      if (tid == 0) tma_store_wait<0>();  // the previous tile's store has read sO
      cutlass::arch::NamedBarrier::sync(128, 3 + w);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int il = get<0>(cO_rc(r, 0));
#pragma unroll
        for (int c = 0; c < size<1>(O_rc); c += 2) {
          const int j = get<1>(cO_rc(r, c));
          // columns j, j+1 share a 16-byte chunk of the swizzled row: one 4-byte store
          T pair[2] = {static_cast<T>(O_rc(r, c) * inv), static_cast<T>(O_rc(r, c + 1) * inv)};
          *reinterpret_cast<uint32_t *>(&sOw(il, j)) = *reinterpret_cast<uint32_t *>(pair);
        }
        const int i = row0 + il;
        if ((lane & 3) == 0 && i < p.seqlen_q) {
          const float lse = sum > 0.f ? row_max[r] * p.score_nat + logf(sum) : -INFINITY;
          p.lse[((int64_t)b * p.hq + h) * p.seqlen_q + i] = lse;
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> the TMA (async) proxy
      cutlass::arch::NamedBarrier::sync(128, 3 + w);
      if (tid == 0) {
        // rows past seqlen_q and columns past d_v fall outside the tensor: TMA does not store them
        Tensor mO = kp.tma_o.get_tma_tensor(make_shape(p.seqlen_q, p.d_v, p.hq, p.batch));
        Tensor gO = local_tile(mO(_, _, h, b), Shape<Int<kWM>, Int<kD>>{}, make_coord(_, 0));
        auto co = kp.tma_o.get_slice(_0{});
        Tensor tOsO = co.partition_S(sO);  // (TMA, 1, 1, 2)
        Tensor tOgO = co.partition_D(gO);  // (TMA, 1, 1, m halves)
        copy(kp.tma_o, tOsO(_, _, _, w), tOgO(_, _, _, 2 * m_block + w));
        tma_store_arrive();
      }
    }
    if (w == 0) cutlass::arch::NamedBarrier::sync(256, 1);  // w = 1's up-front arrival
    if (tid == 0) tma_store_wait<0>();
  }
#else
  __trap();  // the sm90 family is built for sm_90a only
#endif
}

// The schedule of one launch: FLASHMUX_CUDA_SM90_FWD=persist / =tile (read per call) force the
// persistent / one-CTA-per-tile kernel; unset, the unit's measured default for masked (causal,
// windows) and dense calls.
inline bool sm90_fwd_persist(const Params &p, bool masked_default, bool dense_default) {
  const char *e = std::getenv("FLASHMUX_CUDA_SM90_FWD");
  if (e != nullptr && e[0] == 'p') return true;
  if (e != nullptr && e[0] == 't') return false;
  return (p.window_left >= 0 || p.window_right >= 0) ? masked_default : dense_default;
}

// The output as TMA stores it: positive strides, multiples of 16 bytes, a 16-byte aligned base.
inline bool o_tma_ok(const Params &p) {
  const int64_t s[] = {p.o_rs, p.o_hs, p.o_bs};
  for (int64_t x : s)
    if (x <= 0 || x % 8 != 0) return false;
  return (reinterpret_cast<uintptr_t>(p.o) & 15) == 0;
}

template <typename Tr, int kExt = 0>
int launch_fwd_persist(const Params &p, cudaStream_t stream) {
  using T = typename Tr::T;
  using Pz = Persist<Tr>;
  FwdPersistParams<Tr> kp;
  kp.p = p;
  auto sq = make_shape(p.seqlen_q, p.d, p.hq, p.batch);
  auto sk = make_shape(p.seqlen_k, p.d, p.hkv, p.batch);
  auto svt = make_shape(p.d_v, p.seqlen_k, p.hkv, p.batch);
  auto so = make_shape(p.seqlen_q, p.d_v, p.hq, p.batch);
  Tensor mQ = make_tensor(make_gmem_ptr(static_cast<T const *>(p.q)), sq,
                          make_stride(p.q_rs, _1{}, p.q_hs, p.q_bs));
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<T const *>(p.k)), sk,
                          make_stride(p.k_rs, _1{}, p.k_hs, p.k_bs));
  Tensor mVt = make_tensor(make_gmem_ptr(static_cast<T const *>(p.v)), svt,
                           make_stride(_1{}, p.v_rs, p.v_hs, p.v_bs));
  Tensor mO = make_tensor(make_gmem_ptr(static_cast<T *>(p.o)), so,
                          make_stride(p.o_rs, _1{}, p.o_hs, p.o_bs));
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Tr::SmemLayoutQ{}(_, _, 0),
                           Shape<Int<Tr::kWM>, Int<Tr::kD>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Tr::SmemLayoutK{}(_, _, 0),
                           Shape<Int<Tr::kBN>, Int<Tr::kD>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, typename Tr::SmemLayoutVt{}(_, _, 0),
                           Shape<Int<Tr::kD>, Int<Tr::kBN>>{}, _1{});
  kp.tma_o = make_tma_copy(SM90_TMA_STORE{}, mO, typename Pz::SmemLayoutO{}(_, _, 0),
                           Shape<Int<Tr::kWM>, Int<Tr::kD>>{}, _1{});
  kp.num_m = ceil_div(p.seqlen_q, Tr::kBM);
  kp.total_tiles = kp.num_m * p.hq * p.batch;
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  auto kernel = fwd_kernel_persist<Tr, kExt>;
  constexpr int smem = Pz::kSmemBytes;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const int grid = kp.total_tiles < sms ? kp.total_tiles : sms;
  kernel<<<grid, Tr::kThreads, smem, stream>>>(kp);
  return cudaGetLastError();
}

// The forward of traits Tr: the persistent kernel where the schedule says so (sm90_fwd_persist;
// kMasked / kDense: the unit's defaults) and the output suits TMA, else one CTA per tile.
#ifndef FMX_SM90_PERSIST
#ifdef FMX_HEAD_DIMS_LIMITED
#define FMX_SM90_PERSIST 0
#else
#define FMX_SM90_PERSIST 1
#endif
#endif
template <typename Tr, bool kMasked = false, bool kDense = false>
int launch_fwd_sched(const Params &p, cudaStream_t stream) {
#if FMX_SM90_PERSIST
  if (sm90_fwd_persist(p, kMasked, kDense) && o_tma_ok(p)) return launch_fwd_persist<Tr>(p, stream);
#endif
  return launch_fwd<Tr>(p, stream);
}

}  // namespace sm90
}  // namespace fmx
