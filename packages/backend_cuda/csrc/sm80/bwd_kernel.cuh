// FlashAttention-2 backward for sm80+ (mma.sync m16n8k16, ldmatrix, cp.async).
// One CTA owns a (kBlockN x D) key/value tile of one (batch, kv head). It walks every query head
// of the GQA group and every query block that can see the tile, recomputes P from the saved lse,
// accumulates dK and dV in registers (so the GQA sum needs no atomics) and adds dQ = dS K into
// the fp32 workspace with atomics (in key-block order when deterministic). dS is rounded to
// the input dtype as dS * scale (plain attention's rounding), so dQ and dK come out scaled.
#pragma once
#include "sm80_utils.cuh"

namespace fmx {
namespace sm80 {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kAtomMSdP, int kAtomNdKV,
          int kAtomMdQ, bool kDoubleBuf_, typename Element_, bool kRedV4_ = false>
struct BwdTraits {
  // kRedV4: full dQ tiles are added with 16-byte reductions (lane pairs swap half rows first).
  static constexpr bool kRedV4 = kRedV4_;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32;
  static constexpr bool kDoubleBuf = kDoubleBuf_;
  static constexpr int kQBufs = kDoubleBuf ? 2 : 1;
  static_assert(kBlockM % kBwdBlockM == 0, "workspace semaphores count blocks of kBwdBlockM");
  using MmaSdP = TiledMmaFor<Element, kAtomMSdP, kNWarps / kAtomMSdP>;
  using MmadKV = TiledMmaFor<Element, kAtomNdKV, kNWarps / kAtomNdKV>;
  using MmadQ = TiledMmaFor<Element, kAtomMdQ, kNWarps / kAtomMdQ>;
  using SmemQ = SmemTile<kBlockM, kHeadDim>;   // Q and dO
  using SmemKV = SmemTile<kBlockN, kHeadDim>;  // K and V
  using SmemPdS = SmemTile<kBlockM, kBlockN>;  // P and dS
  static constexpr int kSmemElems =
      2 * kQBufs * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + 2 * kBlockM * kBlockN;
  static constexpr int kSmemBytes = kSmemElems * 2 + 2 * kQBufs * kBlockM * 4;
};

// Fire-and-forget fp32 reductions into global memory (RED, no value returned: atomicAdd on
// float2 compiles to ATOMG, whose unused result still occupies a register until it returns).
__device__ __forceinline__ void red_add2(float *ptr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(a), "f"(b)
               : "memory");
#else
  atomicAdd(ptr, a);
  atomicAdd(ptr + 1, b);
#endif
}
__device__ __forceinline__ void red_add4(float *ptr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "f"(a),
               "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(ptr, a);
  atomicAdd(ptr + 1, b);
  atomicAdd(ptr + 2, c);
  atomicAdd(ptr + 3, d);
#endif
}

__device__ __forceinline__ int ld_acquire(const int *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1) bwd_kernel(const Params p) {
  using Element = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim, NT = Tr::kNThreads;
  constexpr int QB = Tr::kQBufs;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const SeqInfo si(p, b);
  const int n0 = n_block * BN;
  if (n0 >= si.sk) return;
  const int rows_k = min(BN, si.sk - n0);

  Element *dk_ptr = reinterpret_cast<Element *>(p.dk) + si.k_base(b, p.dk_bs, p.dk_rs) +
                    (int64_t)n0 * p.dk_rs + (int64_t)hk * p.dk_hs;
  Element *dv_ptr = reinterpret_cast<Element *>(p.dv) + si.k_base(b, p.dv_bs, p.dv_rs) +
                    (int64_t)n0 * p.dv_rs + (int64_t)hk * p.dv_hs;
  int m_min, m_max;
  query_block_range(p, si, n0, BN, BM, m_min, m_max);
  const int nm = max(0, m_max - m_min);
  // Block mask: per head of the group, this key block's listed full then partial query mask
  // blocks (the transposed lists), each as block / BM query tiles; empty ones are never visited.
  const bool masked = p.bm_qnf != nullptr;
  const int kmb = masked ? n0 / p.bm_block : 0;
  const int subq = masked ? p.bm_block / BM : 1;
  auto mrow = [&](int h) -> int64_t {
    return ((int64_t)(p.bm_b > 1 ? b : 0) * p.bm_h + (p.bm_h > 1 ? h : 0)) * p.bm_nk + kmb;
  };
  auto mcount = [&](int h) {
    const int64_t r = mrow(h);
    return (p.bm_knf[r] + p.bm_knp[r]) * subq;
  };
  int num_steps = nm * p.group;
  if (masked && nm > 0) {
    num_steps = 0;
    for (int g = 0; g < p.group; ++g) num_steps += mcount(hk * p.group + g);
  }
  if (num_steps == 0 || nm == 0) {
    zero_rows<D, NT>(dk_ptr, p.dk_rs, rows_k, p.d, tid);
    zero_rows<D, NT>(dv_ptr, p.dv_rs, rows_k, p.d_v, tid);
    return;
  }

  const Element *k_ptr = reinterpret_cast<const Element *>(p.k) + si.k_base(b, p.k_bs, p.k_rs) +
                         (int64_t)n0 * p.k_rs + (int64_t)hk * p.k_hs;
  const Element *v_ptr = reinterpret_cast<const Element *>(p.v) + si.k_base(b, p.v_bs, p.v_rs) +
                         (int64_t)n0 * p.v_rs + (int64_t)hk * p.v_hs;
  const Element *q_base = reinterpret_cast<const Element *>(p.q) + si.q_base(b, p.q_bs, p.q_rs);
  const Element *do_base =
      reinterpret_cast<const Element *>(p.dout) + si.q_base(b, p.do_bs, p.do_rs);

  extern __shared__ __align__(128) char smem_raw[];
  Element *smem = reinterpret_cast<Element *>(smem_raw);
  Element *smem_k = smem;
  Element *smem_v = smem_k + BN * D;
  Element *smem_q = smem_v + BN * D;        // QB buffers
  Element *smem_do = smem_q + QB * BM * D;  // QB buffers
  Element *smem_p = smem_do + QB * BM * D;
  Element *smem_ds = smem_p + BM * BN;
  float *s_lse = reinterpret_cast<float *>(smem_ds + BM * BN);  // QB buffers
  float *s_dsum = s_lse + QB * BM;                              // QB buffers

  using LQ = typename Tr::SmemQ::Layout_;
  using LQt = typename Tr::SmemQ::LayoutT;
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tr::SmemKV::Layout_{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Tr::SmemKV::LayoutT{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tr::SmemKV::Layout_{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemPdS::Layout_{});
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemPdS::LayoutT{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Tr::SmemPdS::Layout_{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Tr::SmemPdS::LayoutT{});

  // Key blocks start their walk over query blocks at different places so that concurrently
  // running CTAs add into different dQ rows (deterministic mode keeps the plain order).
  // A step is (head of the group, query block); both advance incrementally (no divisions).
  const int rot = (p.deterministic || masked) ? 0 : n_block % nm;
  struct Cursor {
    int h, mi;  // head, query-block index in [0, nm) before rotation (masked: list position)
  };
  auto skip_empty = [&](Cursor c) {  // masked: past heads whose lists are empty
    while (c.h < (hk + 1) * p.group && c.mi >= mcount(c.h)) { c.mi = 0; ++c.h; }
    return c;
  };
  auto next = [&](Cursor c) {
    if (masked) {
      ++c.mi;
      return skip_empty(c);
    }
    if (++c.mi == nm) { c.mi = 0; ++c.h; }
    return c;
  };
  auto m_of = [&](Cursor c) {
    if (masked) {
      const int64_t r = mrow(c.h);
      const int nf = p.bm_knf[r] * subq;
      const int mi = c.mi < nf ? c.mi : c.mi - nf;
      const int32_t *lst = (c.mi < nf ? p.bm_kfi : p.bm_kpi) + r * p.bm_nq;
      return lst[mi / subq] * subq + mi % subq;
    }
    int mi = c.mi + rot;
    return m_min + (mi >= nm ? mi - nm : mi);
  };
  auto bits_of = [&](Cursor c) -> const int32_t * {  // a partial tile's bitmask, else nullptr
    if (!masked) return nullptr;
    const int64_t r = mrow(c.h);
    const int nf = p.bm_knf[r] * subq;
    if (c.mi < nf) return nullptr;
    const int qmb = p.bm_kpi[r * p.bm_nq + (c.mi - nf) / subq];
    const int64_t trow =
        ((int64_t)(p.bm_b > 1 ? b : 0) * p.bm_h + (p.bm_h > 1 ? c.h : 0)) * p.bm_nq + qmb;
    return p.bm_bits + (int64_t)p.bm_tile[trow * p.bm_nk + kmb] * p.bm_block * (p.bm_block / 32);
  };
  auto load_q_do = [&](Cursor cur, int buf) {
    const int h = cur.h;
    const int m0 = m_of(cur) * BM;
    Tensor sQb = make_tensor(make_smem_ptr(smem_q + buf * BM * D), LQ{});
    Tensor sdOb = make_tensor(make_smem_ptr(smem_do + buf * BM * D), LQ{});
    load_tile_async<BM, D, NT>(sQb, q_base + (int64_t)m0 * p.q_rs + (int64_t)h * p.q_hs, p.q_rs,
                               si.sq - m0, p.d, tid);
    load_tile_async<BM, D, NT>(sdOb, do_base + (int64_t)m0 * p.do_rs + (int64_t)h * p.do_hs,
                               p.do_rs, si.sq - m0, p.d_v, tid);  // dO: Dv columns
    // lse and dsum rows (4 floats per 16-byte copy; the row offsets of one head are contiguous).
    if (tid < 2 * (BM / 4)) {
      const int which = tid / (BM / 4), r = (tid % (BM / 4)) * 4;
      const float *src = which == 0 ? p.lse : p.dsum;
      float *dst = (which == 0 ? s_lse : s_dsum) + buf * BM + r;
      const int64_t off = si.lse_off(p, b, h, m0 + r);
      const int valid = si.sq - m0 - r;
      if (valid >= 4 && (off & 3) == 0) {
        cp_async_16(dst, src + off, true);
      } else {
        for (int e = 0; e < 4; ++e) dst[e] = e < valid ? src[off + e] : 0.f;
      }
    }
  };

  load_tile_async<BN, D, NT>(sK, k_ptr, p.k_rs, rows_k, p.d, tid);
  // Dv != D: V and dO hold Dv columns, Q and K D columns, each zero-filled up to the
  // instantiation (max of the two): dP = dO V^T and dV = P^T dO see zeros past Dv.
  load_tile_async<BN, D, NT>(sV, v_ptr, p.v_rs, rows_k, p.d_v, tid);
  Cursor cur{hk * p.group, 0};
  if (masked) cur = skip_empty(cur);
  load_q_do(cur, 0);
  cp_async_commit();

  // S = Q K^T and dP = dO V^T.
  typename Tr::MmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto cpA_sdp = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma_sdp);
  auto cpB_sdp = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma_sdp);
  auto cpA_sdp_t = cpA_sdp.get_thread_slice(tid);
  auto cpB_sdp_t = cpB_sdp.get_thread_slice(tid);
  Tensor sQ0 = make_tensor(make_smem_ptr(smem_q), LQ{});
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ0);
  Tensor tSrQv = cpA_sdp_t.retile_D(tSrQ);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tSrKv = cpB_sdp_t.retile_D(tSrK);
  Tensor tSsK = cpB_sdp_t.partition_S(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sQ0);
  Tensor tdPrdOv = cpA_sdp_t.retile_D(tdPrdO);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  Tensor tdPrVv = cpB_sdp_t.retile_D(tdPrV);
  Tensor tdPsV = cpB_sdp_t.partition_S(sV);
  Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol_layout(cS.layout()));

  // dV += P^T dO and dK += dS^T Q.
  typename Tr::MmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto cpA_dkv = make_tiled_copy_A(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma_dkv);
  auto cpB_dkv = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma_dkv);
  auto cpA_dkv_t = cpA_dkv.get_thread_slice(tid);
  auto cpB_dkv_t = cpB_dkv.get_thread_slice(tid);
  Tensor sQt0 = make_tensor(make_smem_ptr(smem_q), LQt{});
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);
  Tensor tdVrPtv = cpA_dkv_t.retile_D(tdVrPt);
  Tensor tdVsPt = cpA_dkv_t.partition_S(sPt);
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdKrdStv = cpA_dkv_t.retile_D(tdKrdSt);
  Tensor tdKsdSt = cpA_dkv_t.partition_S(sdSt);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sQt0);
  Tensor tdVrdOtv = cpB_dkv_t.retile_D(tdVrdOt);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt0);
  Tensor tdKrQtv = cpB_dkv_t.retile_D(tdKrQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<BN>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<BN>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);

  // dQ = dS K.
  typename Tr::MmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  auto cpA_dq = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma_dq);
  auto cpB_dq = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma_dq);
  auto cpA_dq_t = cpA_dq.get_thread_slice(tid);
  auto cpB_dq_t = cpB_dq.get_thread_slice(tid);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrdSv = cpA_dq_t.retile_D(tdQrdS);
  Tensor tdQsdS = cpA_dq_t.partition_S(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
  Tensor tdQrKtv = cpB_dq_t.retile_D(tdQrKt);
  Tensor tdQsKt = cpB_dq_t.partition_S(sKt);
  Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));

  // P and dS go to smem through a tiled copy of the S/dP accumulator layout (one thread base
  // address, static offsets) instead of per-element coordinate math.
  auto cpC_sdp = make_tiled_copy_C(Copy_Atom<UniversalCopy<uint32_t>, Element>{}, mma_sdp);
  auto cpC_sdp_t = cpC_sdp.get_thread_slice(tid);
  Tensor tPsP = cpC_sdp_t.partition_D(sP);
  Tensor tPsdS = cpC_sdp_t.partition_D(sdS);

  const bool capped = p.softcap > 0.f;
  const float cap = p.softcap, cap_in = p.scale / (capped ? p.softcap : 1.f);
  const float sl2 = p.score_log2, inv_cap = capped ? 1.f / p.softcap : 0.f;
  const int64_t dq_blk = (int64_t)p.hq * p.d * 8;  // dq_accum floats per group of 8 rows
  const bool alibi_on = p.alibi != nullptr;  // ALiBi: CTA-uniform branches, as in the forward

  // Per step (FlashAttention-2 order): S = Q K^T; P -> smem; dP = dO V^T (overlaps the P
  // stores); dS -> smem; barrier; dV += P^T dO; dQ = dS K and its atomics; dK += dS^T Q (the
  // atomics drain under the dK GEMM). With two Q/dO buffers the next step's loads are issued
  // right after the top barrier, so one more barrier per step suffices.
  for (int step = 0; step < num_steps; ++step, cur = next(cur)) {
    const int h = cur.h;
    const int m = m_of(cur);
    const int m0 = m * BM;
    const int buf = QB == 2 ? (step & 1) : 0;
    cp_async_wait<0>();
    __syncthreads();  // Q/dO[buf] landed; every thread is done with the previous step
    if (QB == 2 && step + 1 < num_steps) {
      load_q_do(next(cur), buf ^ 1);
      cp_async_commit();
    }

    Tensor sQ = make_tensor(make_smem_ptr(smem_q + buf * BM * D), LQ{});
    Tensor sdO = make_tensor(make_smem_ptr(smem_do + buf * BM * D), LQ{});
    Tensor sQt = make_tensor(make_smem_ptr(smem_q + buf * BM * D), LQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(smem_do + buf * BM * D), LQt{});

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    gemm_ss(mma_sdp, acc_s, tSrQ, tSrK, cpA_sdp_t.partition_S(sQ), tSsK, cpA_sdp, cpB_sdp, tSrQv,
            tSrKv);

    Tensor S = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    if (capped) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) = cap * tanh_fast(acc_s(i) * cap_in);
    }
    // ALiBi after softcap, before the mask. S then holds capped score + bias; the softcap
    // derivative below needs the capped score alone and adds the bias back (pass2, kAlibi).
    const float slope = alibi_on ? alibi_slope_acc(p, b, h) : 0.f;
    if (alibi_on) apply_alibi(S, cSrc, slope, si, m0, n0);
    if (tile_needs_mask(p, si, m0, BM, n0, BN)) apply_mask(S, cSrc, p, si, m0, n0);
    if (const int32_t *tb = bits_of(cur))  // block mask: a partial tile's element mask
      apply_bits(S, cSrc, tb, p.bm_block / 32, m0 % p.bm_block, n0 % p.bm_block);

    // P = exp(s - lse) on allowed keys (rows past the end and fully masked rows get 0). Without
    // softcap S is overwritten by P; with it S keeps the capped scores (needed for the
    // derivative) and P is recomputed below.
    constexpr int NR = decltype(size<0>(S))::value;
    float lrow[NR];
    {
      Tensor rP = make_tensor<Element>(acc_s.layout());
      Tensor rPrc = make_tensor(rP.data(), rowcol_layout(rP.layout()));
      auto pass1 = [&](auto capped_c) {
        constexpr bool kCapped = decltype(capped_c)::value;
        CUTE_UNROLL
        for (int r = 0; r < size<0>(S); ++r) {
          const int row = get<0>(cSrc(r, 0));
          float l = s_lse[buf * BM + row];
          l = (m0 + row >= si.sq || l == -INFINITY) ? INFINITY : l * 1.4426950408889634f;
          lrow[r] = l;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            const float pr = fast_exp2(fmaf(S(r, c), sl2, -l));
            rPrc(r, c) = static_cast<Element>(pr);
            if constexpr (!kCapped) S(r, c) = pr;
          }
        }
      };
      if (capped) {
        pass1(cute::true_type{});
      } else {
        pass1(cute::false_type{});
      }
      copy(cpC_sdp, cpC_sdp_t.retile_S(rP), tPsP);
    }

    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<BM>, Int<BN>>{});
    clear(acc_dp);
    gemm_ss(mma_sdp, acc_dp, tdPrdO, tdPrV, cpA_sdp_t.partition_S(sdO), tdPsV, cpA_sdp, cpB_sdp,
            tdPrdOv, tdPrVv);

    // dS * scale = P * (dP * scale - dsum * scale) (* d softcap / ds): the scale is applied in
    // float32 before the rounding to the input dtype, as plain attention's autograd does (its
    // scores are scaled before the cast), so dQ and dK need no final multiply. Same instruction
    // count as P * (dP - dsum): one FFMA and one FMUL per element.
    {
      Tensor dP = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
      const float scale = p.scale;
      auto pass2 = [&](auto capped_c, auto alibi_c) {
        constexpr bool kCapped = decltype(capped_c)::value;
        constexpr bool kAlibi = decltype(alibi_c)::value;  // only with kCapped
        [[maybe_unused]] const int col0 = get<1>(cSrc(0, 0));
        CUTE_UNROLL
        for (int r = 0; r < size<0>(S); ++r) {
          const float ds = s_dsum[buf * BM + get<0>(cSrc(r, 0))] * scale;
          [[maybe_unused]] const float d0 =
              static_cast<float>(m0 + get<0>(cSrc(r, 0)) + si.off - n0 - col0);
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            if constexpr (kCapped) {
              const float x = S(r, c);
              const float pr = fast_exp2(fmaf(x, sl2, -lrow[r]));
              // the capped score: S minus the ALiBi bias (apply_alibi's distance, added back)
              float xc = x;
              if constexpr (kAlibi) {
                const float cc = static_cast<float>(get<1>(cSrc(r, c)) - col0);
                xc = fmaf(slope, fabsf(d0 - cc), x);
              }
              const float t = fminf(fabsf(xc * inv_cap), 1.f);
              dP(r, c) = pr * fmaf(dP(r, c), scale, -ds) * (1.f - t * t);
            } else {
              dP(r, c) = S(r, c) * fmaf(dP(r, c), scale, -ds);
            }
          }
        }
      };
      if (capped && alibi_on) {
        pass2(cute::true_type{}, cute::true_type{});
      } else if (capped) {
        pass2(cute::true_type{}, cute::false_type{});
      } else {
        pass2(cute::false_type{}, cute::false_type{});
      }
      Tensor rdS = to_element<Element>(acc_dp);
      copy(cpC_sdp, cpC_sdp_t.retile_S(rdS), tPsdS);
    }
    __syncthreads();  // P and dS visible to every warp

    gemm_ss(mma_dkv, acc_dv, tdVrPt, tdVrdOt, tdVsPt, cpB_dkv_t.partition_S(sdOt), cpA_dkv,
            cpB_dkv, tdVrPtv, tdVrdOtv);

    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<BM>, Int<D>>{});
    clear(acc_dq);
    gemm_ss(mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, cpA_dq, cpB_dq, tdQrdSv, tdQrKtv);

    int *sem = nullptr;
    if (p.deterministic) {
      sem = p.dq_sem + ((int64_t)b * p.hq + h) * p.num_m_blocks_bwd + m;
      const int n_lo = p.window_left >= 0 ? max(0, floor_div(m0 + si.off - p.window_left, BN)) : 0;
      if (tid == 0) {
        const int target = n_block - n_lo;
        while (ld_acquire(sem) != target) {
        }
      }
      __syncthreads();
    }
    {
      // One row pointer per fragment row; columns are static offsets (pairs -> float2 atomics).
      // Full tiles take a branch-free path.
      Tensor dQrc = make_tensor(acc_dq.data(), rowcol_layout(acc_dq.layout()));
      Tensor cdQrc = make_tensor(cdQ.data(), rowcol_layout(cdQ.layout()));
      const int rows_q = si.sq - m0;
      // dq_accum is stored in 8x8 blocks (fmx_params.h): the 8 rows x 8 columns that one warp
      // reduction instruction covers are 256 contiguous bytes (2 cache lines, not 8).
      const int c0 = get<1>(cdQrc(0, 0));
      float *dq_h = p.dq_accum + (int64_t)h * p.d * 8 + (c0 >> 3) * 64 + (c0 & 7);
      const int64_t i0 = si.q_row0 + m0;
      auto row_ptr = [&](int row) {
        const int64_t i = i0 + row;
        return dq_h + (i >> 3) * dq_blk + (i & 7) * 8;
      };
      if (Tr::kRedV4 && rows_q >= BM && p.d == D) {
        // Lanes 2k and 2k+1 hold columns [4j, 4j+2) and [4j+2, 4j+4) of rows g and g+8; the
        // even lane gathers row g, the odd lane row g+8, and each adds 4 floats at once.
        const bool odd = (tid & 1) != 0;
        CUTE_UNROLL
        for (int r = 0; r < size<0>(dQrc); r += 2) {
          float *rp = row_ptr(get<0>(cdQrc(odd ? r + 1 : r, 0))) - (odd ? 2 : 0);
          CUTE_UNROLL
          for (int c = 0; c < size<1>(dQrc); c += 2) {
            const float x0 = odd ? dQrc(r, c) : dQrc(r + 1, c);
            const float x1 = odd ? dQrc(r, c + 1) : dQrc(r + 1, c + 1);
            const float y0 = __shfl_xor_sync(0xffffffffu, x0, 1);
            const float y1 = __shfl_xor_sync(0xffffffffu, x1, 1);
            const float v0 = odd ? y0 : dQrc(r, c), v1 = odd ? y1 : dQrc(r, c + 1);
            const float v2 = odd ? dQrc(r + 1, c) : y0, v3 = odd ? dQrc(r + 1, c + 1) : y1;
            red_add4(rp + (get<1>(cdQrc(r, c)) - c0) * 8, v0, v1, v2, v3);
          }
        }
      } else if (rows_q >= BM && p.d == D) {
        CUTE_UNROLL
        for (int r = 0; r < size<0>(dQrc); ++r) {
          float *rp = row_ptr(get<0>(cdQrc(r, 0)));
          CUTE_UNROLL
          for (int c = 0; c < size<1>(dQrc); c += 2)
            red_add2(rp + (get<1>(cdQrc(r, c)) - c0) * 8, dQrc(r, c), dQrc(r, c + 1));
        }
      } else {
        CUTE_UNROLL
        for (int r = 0; r < size<0>(dQrc); ++r) {
          const int row = get<0>(cdQrc(r, 0));
          float *rp = row_ptr(row);
          CUTE_UNROLL
          for (int c = 0; c < size<1>(dQrc); c += 2) {
            const int dc = get<1>(cdQrc(r, c)) - c0;
            if (row < rows_q && c0 + dc < p.d) red_add2(rp + dc * 8, dQrc(r, c), dQrc(r, c + 1));
          }
        }
      }
    }
    if (p.deterministic) {
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicAdd(sem, 1);
    }

    gemm_ss(mma_dkv, acc_dk, tdKrdSt, tdKrQt, tdKsdSt, cpB_dkv_t.partition_S(sQt), cpA_dkv,
            cpB_dkv, tdKrdStv, tdKrQtv);

    if (QB == 1 && step + 1 < num_steps) {
      __syncthreads();  // all reads of Q/dO are done
      load_q_do(next(cur), 0);
      cp_async_commit();
    }
  }
  Tensor cKV = thr_dkv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  store_acc<Element>(acc_dk, cKV, dk_ptr, p.dk_rs, rows_k, p.d, 1.f);  // dS carries the scale
  store_acc<Element>(acc_dv, cKV, dv_ptr, p.dv_rs, rows_k, p.d_v, 1.f);
}

template <typename Tr>
int launch_bwd(const Params &p, cudaStream_t stream) {
  constexpr int smem = Tr::kSmemBytes;
  auto kernel = bwd_kernel<Tr>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
  }
  dim3 grid(ceil_div(p.seqlen_k, Tr::kBlockN), p.hkv, p.batch);
  kernel<<<grid, Tr::kNThreads, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace sm80
}  // namespace fmx
