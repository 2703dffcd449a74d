// FlashAttention-2 forward for sm80+ (mma.sync m16n8k16, ldmatrix, cp.async).
// One CTA owns a (kBlockM x D) query tile of one (batch, head); it streams key/value tiles of
// kBlockN rows through shared memory (the V load overlaps S = Q K^T, the next K load overlaps
// the softmax and O += P V) and keeps the online softmax state in registers.
#pragma once
#include "sm80_utils.cuh"

namespace fmx {
namespace sm80 {

// Variant flags (tuning; 0 = the measured defaults):
//   kFwdSmemEpi: O is written through shared memory (the Q tile) with 16-byte coalesced stores;
//   kFwdLazyRescale: acc_o is rescaled only when some row max of the warp changed (warp vote);
//   kFwdNoPrefetchS: the S GEMM loads each K fragment just before its MMAs (no one-step-ahead
//     prefetch: 32 fewer live registers with 128-wide key tiles).
//   kFwdPipe: fwd_kernel's pipelined key-tile loop: K and V double buffered (the next tile
//     loads during the whole current one, one barrier per key tile) and each key tile computed
//     in kSubN-wide column chunks (S, softmax and O += P V per chunk: the fp32 scores of one
//     chunk only are live, so wide load tiles cost no registers).
constexpr int kFwdSmemEpi = 1, kFwdLazyRescale = 2, kFwdNoPrefetchS = 4, kFwdPipe = 8;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_,
          int kFlags_ = 0, int kSubN_ = kBlockN_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kFlags = kFlags_, kSubN = kSubN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32;
  static_assert(kBlockM == 16 * kNWarps || kBlockM == 32 * kNWarps, "each warp owns whole rows");
  static_assert(kBlockN % kSubN == 0 && kSubN % 16 == 0, "whole column chunks");
  static_assert(kSubN == kBlockN || (kFlags & kFwdPipe) != 0, "column chunks need kFwdPipe");
  using TiledMma = TiledMmaFor<Element, kNWarps, 1>;
  using SmemQ = SmemTile<kBlockM, kHeadDim>;
  using SmemKV = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes =
      (kBlockM + ((kFlags & kFwdPipe) != 0 ? 4 : 2) * kBlockN) * kHeadDim * 2;
};

// Online softmax of one score tile (base 2, the scale folded into one FFMA): S (a rowcol view
// of the fp32 scores, rows x keys) becomes P = exp2(S sl2 - max sl2) in place, the running row
// max and row sum of this thread's NR rows are updated and accO (rowcol view) is rescaled by
// the correction. Both key-tile loops of fwd_kernel call it.
template <int kFlags, int NR, typename STensor, typename OTensor>
__device__ __forceinline__ void online_softmax(STensor &S, OTensor &accO, float (&row_max)[NR],
                                               float (&row_sum)[NR], const float sl2) {
  CUTE_UNROLL
  for (int r = 0; r < NR; ++r) {
    // Two interleaved partial reductions halve the dependent max / sum chains.
    float mx0 = row_max[r], mx1 = -INFINITY;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); c += 2) {
      mx0 = fmaxf(mx0, S(r, c));
      mx1 = fmaxf(mx1, S(r, c + 1));
    }
    const float mx = quad_max(fmaxf(mx0, mx1));
    const float ms = mx == -INFINITY ? 0.f : mx * sl2;
    // (row_max -inf: corr 0 without relying on exp2(-inf * sl2), which needs sl2 > 0)
    const float corr = row_max[r] == -INFINITY ? 0.f : fast_exp2(row_max[r] * sl2 - ms);
    row_max[r] = mx;
    float sum0 = row_sum[r] * corr, sum1 = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); c += 2) {
      const float e0 = fast_exp2(fmaf(S(r, c), sl2, -ms));
      const float e1 = fast_exp2(fmaf(S(r, c + 1), sl2, -ms));
      S(r, c) = e0;
      S(r, c + 1) = e1;
      sum0 += e0;
      sum1 += e1;
    }
    row_sum[r] = sum0 + sum1;
    // With kFwdLazyRescale the multiplies are skipped when corr is exactly 1 (row max
    // unchanged) for this row index in every thread of the warp (warp-uniform branch).
    if (!(kFlags & kFwdLazyRescale) || __any_sync(0xffffffffu, corr != 1.f)) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(accO); ++c) accO(r, c) *= corr;
    }
  }
}

// One kernel for both variants: the setup, the score modifiers, the online softmax and the
// epilogue are shared; the key-tile loop is one of two (`if constexpr` on kFwdPipe):
// - plain: smem holds Q, one K and one V tile; per key tile, V[n] loads during S = Q K^T and
//   K[n_next] during the softmax and O += P V (two barriers per key tile);
// - kFwdPipe: stage s of smem holds K and V of one key tile; tile n-1 loads into the other stage
//   while tile n is computed, so one barrier per key tile suffices (it both publishes tile n and
//   retires the stage that the next load overwrites). Each tile is computed in column chunks of
//   kSubN keys: S chunk, mask, online softmax, O += P V chunk.
// Stage 0 of the pipelined layout is the plain layout (K right after Q, V right after K).
// kExtras: ALiBi and block masks compiled in (launch_fwd picks the instantiation per call). Off,
// the kernel is the dense one without their runtime branches: with them ptxas spilled 88-184 B
// in the dense kernels (session 7), which cost the dense forward 15-17% on the H200.
template <typename Tr, bool kExtras>
__global__ void __launch_bounds__(Tr::kNThreads, 1) fwd_kernel(const Params p) {
  using Element = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, SN = Tr::kSubN, D = Tr::kHeadDim;
  constexpr int NT = Tr::kNThreads;
  constexpr bool kPipe = (Tr::kFlags & kFwdPipe) != 0;
  using LKV = typename Tr::SmemKV::Layout_;
  using LKVt = typename Tr::SmemKV::LayoutT;

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) tiles first
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const SeqInfo si(p, b);
  const int m0 = m_block * BM;
  if (m0 >= si.sq) return;
  const int hk = h / p.group;
  const int rows_q = min(BM, si.sq - m0);

  Element *o_ptr = reinterpret_cast<Element *>(p.o) + si.q_base(b, p.o_bs, p.o_rs) +
                   (int64_t)m0 * p.o_rs + (int64_t)h * p.o_hs;
  int n_min, n_max;
  key_block_range(p, si, m0, BM, BN, n_min, n_max);
  const KeyTiles<BN, kExtras> kt(p, b, h, m0, n_min, n_max);  // dense range or the block mask's lists
  if (n_max <= n_min || kt.count <= 0) {  // no allowed key for any row of this tile
    zero_rows<D, NT>(o_ptr, p.o_rs, rows_q, p.d_v, tid);
    for (int r = tid; r < rows_q; r += NT) p.lse[si.lse_off(p, b, h, m0 + r)] = -INFINITY;
    return;
  }

  const Element *q_ptr = reinterpret_cast<const Element *>(p.q) + si.q_base(b, p.q_bs, p.q_rs) +
                         (int64_t)m0 * p.q_rs + (int64_t)h * p.q_hs;
  const Element *k_ptr = reinterpret_cast<const Element *>(p.k) + si.k_base(b, p.k_bs, p.k_rs) +
                         (int64_t)hk * p.k_hs;
  const Element *v_ptr = reinterpret_cast<const Element *>(p.v) + si.k_base(b, p.v_bs, p.v_rs) +
                         (int64_t)hk * p.v_hs;

  extern __shared__ __align__(128) char smem_raw[];
  Element *smem = reinterpret_cast<Element *>(smem_raw);
  Element *smem_kv = smem + BM * D;  // stage s: K at smem_kv + 2 s BN D, V right after it
  // V of stage s (plain: stage 0, spelled from smem as before the fold, which keeps its code).
  auto smem_v = [&](int stage) {
    return kPipe ? smem_kv + stage * 2 * BN * D + BN * D : smem + (BM + BN) * D;
  };
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Tr::SmemQ::Layout_{});
  Tensor sK0 = make_tensor(make_smem_ptr(smem_kv), LKV{});
  Tensor sV0 = make_tensor(make_smem_ptr(smem_v(0)), LKV{});
  Tensor sVt0 = make_tensor(make_smem_ptr(smem_v(0)), LKVt{});
  // K / V tile n into stage `stage` (plain: always stage 0).
  auto load_k = [&](int n, int stage) {
    Tensor sK = make_tensor(make_smem_ptr(smem_kv + stage * 2 * BN * D), LKV{});
    load_tile_async<BN, D, NT>(sK, k_ptr + (int64_t)n * BN * p.k_rs, p.k_rs, si.sk - n * BN, p.d,
                               tid);
  };
  auto load_v = [&](int n, int stage) {
    Tensor sV = kPipe ? make_tensor(make_smem_ptr(smem_v(stage)), LKV{}) : sV0;
    // Dv columns (Dv < D: the rest zero-filled, so O's extra columns stay 0 and are not stored)
    load_tile_async<BN, D, NT>(sV, v_ptr + (int64_t)n * BN * p.v_rs, p.v_rs, si.sk - n * BN,
                               p.d_v, tid);
  };

  // Prologue: Q and the first key tile (dense: the last one): K only, or K and V (kFwdPipe).
  if constexpr (kPipe) {
    load_tile_async<BM, D, NT>(sQ, q_ptr, p.q_rs, rows_q, p.d, tid);
    const int n_first = kt.n(0);
    load_k(n_first, 0);
    load_v(n_first, 0);
  } else {
    const int n_first = kt.n(0);
    load_tile_async<BM, D, NT>(sQ, q_ptr, p.q_rs, rows_q, p.d, tid);
    load_k(n_first, 0);
  }
  cp_async_commit();

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tSrQ = thr.partition_fragment_A(sQ);
  Tensor tSrK =
      thr.partition_fragment_B(local_tile(sK0, Shape<Int<SN>, Int<D>>{}, make_coord(0, 0)));
  Tensor tOrVt =
      thr.partition_fragment_B(local_tile(sVt0, Shape<Int<D>, Int<SN>>{}, make_coord(0, 0)));
  auto cpQ = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto cpK = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto cpV = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto cpQt = cpQ.get_thread_slice(tid);
  auto cpKt = cpK.get_thread_slice(tid);
  auto cpVt = cpV.get_thread_slice(tid);
  Tensor tSsQ = cpQt.partition_S(sQ);
  Tensor tSrQv = cpQt.retile_D(tSrQ);
  Tensor tSsK0 = cpKt.partition_S(sK0);  // plain only: its K and V tiles stay in place
  Tensor tSrKv = cpKt.retile_D(tSrK);
  Tensor tOsVt0 = cpVt.partition_S(sVt0);
  Tensor tOrVtv = cpVt.retile_D(tOrVt);

  Tensor acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_o);
  Tensor accO = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<SN>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int NR = decltype(size<0>(accO))::value;  // rows per thread

  float row_max[NR], row_sum[NR];
  CUTE_UNROLL
  for (int r = 0; r < NR; ++r) { row_max[r] = -INFINITY; row_sum[r] = 0.f; }
  const bool capped = p.softcap > 0.f;
  const float cap = p.softcap, cap_in = p.scale / (capped ? p.softcap : 1.f);
  const float sl2 = p.score_log2;
  // ALiBi (kExtras only): a CTA-uniform branch per tile; off: not a single FLOP.
  const bool alibi_on = kExtras && p.alibi != nullptr;
  const float slope = alibi_on ? alibi_slope_acc(p, b, h) : 0.f;

  // The score tile's modifiers (softcap, ALiBi, then the mask where kMask) for keys from n0().
  auto modify_scores = [&](auto &acc_s, auto &S, auto n0, const int32_t *tb, auto mask_c) {
    constexpr bool kMask = decltype(mask_c)::value;
    if (capped) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) = cap * tanh_fast(acc_s(i) * cap_in);
    }
    if (alibi_on) apply_alibi(S, cSrc, slope, si, m0, n0());
    if constexpr (kMask) {
      apply_mask(S, cSrc, p, si, m0, n0());
      if (tb != nullptr) apply_bits(S, cSrc, tb, kt.words, m0 % p.bm_block, n0() % p.bm_block);
    }
  };
  auto gemm_s = [&](auto &acc_s, auto &tSsK) {
    if constexpr ((Tr::kFlags & kFwdNoPrefetchS) != 0) {
      gemm_ss_noprefetch(mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, cpQ, cpK, tSrQv, tSrKv);
    } else {
      gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, cpQ, cpK, tSrQv, tSrKv);
    }
  };

  if constexpr (!kPipe) {
    // One loop iteration; instantiated with and without the mask so that interior tiles run no
    // mask code at all (the compiler would otherwise predicate it rather than branch over it).
    auto iteration = [&](const int n, const int n_next, const int32_t *tb, auto mask_c) {
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
      clear(acc_s);
      cp_async_wait<0>();
      __syncthreads();  // K[n] landed; everyone is done reading V[n+1]
      load_v(n, 0);
      cp_async_commit();

      gemm_s(acc_s, tSsK0);
      Tensor S = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
      const int n0 = n * BN;
      modify_scores(acc_s, S, [&] { return n0; }, tb, mask_c);

      cp_async_wait<0>();
      __syncthreads();  // V[n] landed; everyone is done reading K[n]
      if (n_next >= 0) {
        load_k(n_next, 0);
        cp_async_commit();
      }

      online_softmax<Tr::kFlags>(S, accO, row_max, row_sum, sl2);
      Tensor rP = to_element<Element>(acc_s);
      Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
      gemm_rs(mma, acc_o, tOrP, tOrVt, tOsVt0, cpV, tOrVtv);
    };

    for (int s = 0; s < kt.count; ++s) {
      const int n = kt.n(s);
      const int n_next = s + 1 < kt.count ? kt.n(s + 1) : -1;
      const int32_t *tb = kt.tile_bits(s);
      if (tb != nullptr || tile_needs_mask(p, si, m0, BM, n * BN, BN)) {
        iteration(n, n_next, tb, cute::true_type{});
      } else {
        iteration(n, n_next, tb, cute::false_type{});
      }
    }
  } else {
    auto iteration = [&](const int n, const int n_next, const int32_t *tb, const int stage,
                         auto mask_c) __attribute__((always_inline)) {
      cp_async_wait<0>();
      __syncthreads();  // tile n landed; every warp is done with the previous tile (other stage)
      if (n_next >= 0) {
        load_k(n_next, stage ^ 1);
        load_v(n_next, stage ^ 1);
        cp_async_commit();
      }
      Tensor sK = make_tensor(make_smem_ptr(smem_kv + stage * 2 * BN * D), LKV{});
      Tensor sVt = make_tensor(make_smem_ptr(smem_v(stage)), LKVt{});

      CUTE_UNROLL
      for (int ch = 0; ch < BN / SN; ++ch) {
        Tensor tSsK =
            cpKt.partition_S(local_tile(sK, Shape<Int<SN>, Int<D>>{}, make_coord(ch, 0)));
        Tensor tOsVt =
            cpVt.partition_S(local_tile(sVt, Shape<Int<D>, Int<SN>>{}, make_coord(0, ch)));
        Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<SN>>{});
        clear(acc_s);
        gemm_s(acc_s, tSsK);
        Tensor S = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
        modify_scores(acc_s, S, [&] { return n * BN + ch * SN; }, tb, mask_c);

        online_softmax<Tr::kFlags>(S, accO, row_max, row_sum, sl2);
        Tensor rP = to_element<Element>(acc_s);
        Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
        gemm_rs(mma, acc_o, tOrP, tOrVt, tOsVt, cpV, tOrVtv);
      }
    };

    for (int s = 0, stage = 0; s < kt.count; ++s, stage ^= 1) {
      const int n = kt.n(s);
      const int n_next = s + 1 < kt.count ? kt.n(s + 1) : -1;
      const int32_t *tb = kt.tile_bits(s);
      if (tb != nullptr || tile_needs_mask(p, si, m0, BM, n * BN, BN)) {
        iteration(n, n_next, tb, stage, cute::true_type{});
      } else {
        iteration(n, n_next, tb, stage, cute::false_type{});
      }
    }
  }

  // Epilogue: normalize, write O and lse.
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor cOrc = make_tensor(cO.data(), rowcol_layout(cO.layout()));
  const int lane = tid & 31;
  CUTE_UNROLL
  for (int r = 0; r < NR; ++r) {
    float sum = quad_sum(row_sum[r]);
    float inv = sum > 0.f ? 1.f / sum : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(accO); ++c) accO(r, c) *= inv;
    int row = get<0>(cOrc(r, 0));
    if ((lane & 3) == 0 && row < rows_q)
      p.lse[si.lse_off(p, b, h, m0 + row)] =
          sum > 0.f ? row_max[r] * p.score_nat + logf(sum) : -INFINITY;
  }
  if constexpr ((Tr::kFlags & kFwdSmemEpi) != 0) {
    // The Q tile is free once every warp is done with its last S GEMM. Plain: every warp passed
    // the last iteration's second barrier after its S GEMM, and no cp.async is in flight;
    // kFwdPipe: no barrier follows the last S GEMM, so one is needed here. Each thread writes
    // its fragment pairs (4 bytes, swizzled, conflict free), then the tile leaves in 16-byte row
    // chunks (a warp covers whole lines).
    if constexpr (kPipe) __syncthreads();
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2)
      *reinterpret_cast<uint32_t *>(&sQ(get<0>(cO(i)), get<1>(cO(i)))) =
          pack2<Element>(acc_o(i), acc_o(i + 1));
    __syncthreads();
    constexpr int kChunks = D / 8;
    CUTE_UNROLL
    for (int it = 0; it < BM * kChunks / NT; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      if (r < rows_q && c < p.d_v)
        *reinterpret_cast<uint4 *>(o_ptr + (int64_t)r * p.o_rs + c) =
            *reinterpret_cast<const uint4 *>(&sQ(r, c));
    }
  } else {
    store_acc<Element>(acc_o, cO, o_ptr, p.o_rs, rows_q, p.d_v, 1.f);
  }
}

template <typename Tr, bool kExtras>
int launch_fwd_kernel(const Params &p, cudaStream_t stream) {
  constexpr int smem = Tr::kSmemBytes;
  void (*kernel)(const Params) = fwd_kernel<Tr, kExtras>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
  }
  dim3 grid(ceil_div(p.seqlen_q, Tr::kBlockM), p.hq, p.batch);
  kernel<<<grid, Tr::kNThreads, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

// The dense instantiation unless the call has ALiBi slopes or a block mask (host-side fields).
template <typename Tr>
int launch_fwd(const Params &p, cudaStream_t stream) {
  if (p.alibi != nullptr || p.bm_qnf != nullptr) return launch_fwd_kernel<Tr, true>(p, stream);
  return launch_fwd_kernel<Tr, false>(p, stream);
}

// fwd_hdim<D>.cu compiles a head dim's dense kernels; its ALiBi / block-mask kernels (kExtras)
// are compiled by fwd_extras_hdim<D>.cu, which includes fwd_hdim<D>.cu with FMX_FWD_EXTRAS_UNIT
// defined: two units the build runs in parallel, each as long as the dense one alone.
// FMX_FWD_EXTRAS(Alias) declares (dense unit) or instantiates (extras unit) both dtypes.
#ifdef FMX_FWD_EXTRAS_UNIT
#define FMX_FWD_EXTRAS_INSTANCE template
#else
#define FMX_FWD_EXTRAS_INSTANCE extern template
#endif
#define FMX_FWD_EXTRAS(Alias)                                                                \
  FMX_FWD_EXTRAS_INSTANCE int launch_fwd_kernel<Alias<cutlass::half_t>, true>(const Params &, \
                                                                             cudaStream_t);   \
  FMX_FWD_EXTRAS_INSTANCE int launch_fwd_kernel<Alias<cutlass::bfloat16_t>, true>(           \
      const Params &, cudaStream_t);

}  // namespace sm80
}  // namespace fmx
