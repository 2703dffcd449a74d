// Split-KV decode (Flash-Decoding) over a contiguous or paged KV cache.
//
// Grid (ceil(rows / ROWS), num_splits, batch * hkv): one program per (packed row chunk, key
// split, sequence, KV head). The rows of a program are the Sq query positions x the group = hq/hkv
// query heads that share the KV head (row r = i * group + g), so each byte of K and V is read
// once per program (once overall when rows <= 8).
//
// A program has 128 threads cut into groups of TPK = DP/8 threads; a group owns one key at a
// time, each thread 8 columns of it (one 16-byte load of K and one of V). Every group streams
// U keys per step through registers (U 16-byte loads in flight per thread for K and for V),
// keeps its own online softmax (float32, base 2) per row, and the groups are merged through
// shared memory at the end. One split: the program writes out and lse directly. Several: it
// writes its normalised partial output and lse (float32 workspace) and `combine_kernel` merges
// the splits by lse.
//
// Indices are clamped: seqlens_k[b] to [0, capacity], block_table entries to [0, num_pages);
// element offsets are 64-bit. No host reads of device values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "../flashmux_cuda.h"
#include "decode_api.h"

namespace fmx {
namespace decode {
namespace {

constexpr int kThreads = 128;

// Build-time variants (for A/B runs: FLASHMUX_CUDA_NVCC_FLAGS="-DFMX_DECODE_PREFETCH=1"; the
// flags enter the build cache key): register double-buffered loads, keys per group per step.
#ifndef FMX_DECODE_PREFETCH
#define FMX_DECODE_PREFETCH 0
#endif
#ifndef FMX_DECODE_KEYS
#define FMX_DECODE_KEYS 4
#endif
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> struct Vec;
template <> struct Vec<__half> {
  static __device__ __forceinline__ void to_float(const uint4 &u, float (&f)[8]) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
  }
};
template <> struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ void to_float(const uint4 &u, float (&f)[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
  }
};

// A streaming 16-byte load: read-only path, no L1 allocation (every cache byte is read once).
__device__ __forceinline__ uint4 load_stream(const void *ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

__device__ __forceinline__ int clamp_len(int v, int cap) { return v < 0 ? 0 : (v > cap ? cap : v); }

// Programs resident per SM the register budget is set for (more keys in flight per SM).
template <int ROWS> struct MinBlocks {
  static constexpr int value = (ROWS >= 8 || FMX_DECODE_PREFETCH) ? 2 : ROWS >= 4 ? 3 : 4;
};

template <typename T, int DP, int ROWS, bool PAGED>
__global__ void __launch_bounds__(kThreads, MinBlocks<ROWS>::value) split_kernel(const DecodeParams p) {
  constexpr int TPK = DP / 8;            // threads per key
  constexpr int KPI = kThreads / TPK;    // groups (keys per pass)
  constexpr int U = ROWS >= 8 ? (FMX_DECODE_KEYS + 1) / 2 : FMX_DECODE_KEYS;  // keys per group per step
  constexpr int STEP = KPI * U;          // keys per program per step

  __shared__ float sm_m[KPI][ROWS];
  __shared__ float sm_l[KPI][ROWS];
  __shared__ float sm_w[KPI][ROWS];
  __shared__ float sm_acc[KPI][ROWS][DP];

  // Row chunks of one (split, sequence, KV head) are neighbours in launch order, so the
  // chunks after the first find their K/V in L2.
  const int split = blockIdx.y;
  const int b = blockIdx.z / p.hkv;
  const int hk = blockIdx.z % p.hkv;
  const int r0 = blockIdx.x * ROWS;
  const int tid = threadIdx.x;
  const int grp = tid / TPK;
  const int c0 = (tid % TPK) * 8;
  const bool col_ok = c0 < p.d;

  const int sk = clamp_len(__ldg(p.seqlens_k + b), p.capacity);
  const long long off = (long long)sk - p.sq;

  // Rows of this program, their positions and ALiBi slopes; q in registers, pre-scaled.
  float qf[ROWS][8];
  int pos[ROWS];
  float slope[ROWS];
  bool row_ok[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int r = r0 + rr;
    row_ok[rr] = r < p.rows;
    const int i = row_ok[rr] ? r / p.group : 0;
    const int h = hk * p.group + (row_ok[rr] ? r % p.group : 0);
    pos[rr] = (int)(off + i);  // in [-sq, capacity): fits int32
    slope[rr] = p.alibi != nullptr ? p.alibi[(int64_t)b * p.alibi_bs + h] * 1.4426950408889634f : 0.f;
    uint4 u = make_uint4(0, 0, 0, 0);
    if (row_ok[rr] && col_ok)
      u = *reinterpret_cast<const uint4 *>(static_cast<const T *>(p.q) + (int64_t)b * p.q_bs +
                                           (int64_t)i * p.q_rs + (int64_t)h * p.q_hs + c0);
    Vec<T>::to_float(u, qf[rr]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[rr][e] *= p.q_mult;
  }

  // The keys any row of this program may see, then this split's share of them.
  const int last = min(r0 + ROWS, p.rows) - 1;
  long long lo = 0, hi = sk;
  if (p.window_left >= 0) lo = max(0LL, off + r0 / p.group - p.window_left);
  if (p.window_right >= 0) hi = min(hi, off + last / p.group + p.window_right + 1);
  if (hi < lo) hi = lo;
  const int n = (int)(hi - lo);
  int chunk = (n + p.num_splits - 1) / p.num_splits;
  chunk = (chunk + 15) & ~15;
  const long long kb_ll = lo + (long long)split * chunk;
  const int k_begin = (int)min(kb_ll, hi);
  const int k_end = (int)min(kb_ll + chunk, hi);

  float m[ROWS], l[ROWS], acc[ROWS][8];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    m[rr] = -CUDART_INF_F;
    l[rr] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[rr][e] = 0.f;
  }

  const T *kbase = static_cast<const T *>(p.k) + (int64_t)hk * p.k_hs + c0;
  const T *vbase = static_cast<const T *>(p.v) + (int64_t)hk * p.v_hs + c0;
  const int32_t *bt = PAGED ? p.block_table + (int64_t)b * p.bt_stride : nullptr;

  // Loads of one step: U keys of this group, K and V rows (16 bytes per thread each).
  auto fetch = [&](int it, uint4 (&kr)[U], uint4 (&vr)[U], bool (&kok)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = it + grp * U + u;
      kok[u] = j < k_end;
      kr[u] = make_uint4(0, 0, 0, 0);
      vr[u] = make_uint4(0, 0, 0, 0);
      if (kok[u] && col_ok) {
        int64_t page, slot;
        if (PAGED) {
          const int pi = min(j / p.page_size, p.max_pages - 1);
          int pg = __ldg(bt + pi);
          pg = pg < 0 ? 0 : (pg >= p.num_pages ? p.num_pages - 1 : pg);
          page = pg;
          slot = j - pi * p.page_size;
        } else {
          page = b;
          slot = j;
        }
        kr[u] = load_stream(kbase + page * p.k_ps + slot * p.k_rs);
        vr[u] = load_stream(vbase + page * p.v_ps + slot * p.v_rs);
      }
    }
  };

#if FMX_DECODE_PREFETCH
  // Register double buffer: the next step's loads are in flight while this step computes.
  uint4 kn[U], vn[U];
  bool okn[U];
  if (k_begin < k_end) fetch(k_begin, kn, vn, okn);
#endif
  for (int it = k_begin; it < k_end; it += STEP) {
    uint4 kr[U], vr[U];
    bool kok[U];
#if FMX_DECODE_PREFETCH
#pragma unroll
    for (int u = 0; u < U; ++u) {
      kr[u] = kn[u];
      vr[u] = vn[u];
      kok[u] = okn[u];
    }
    if (it + STEP < k_end) fetch(it + STEP, kn, vn, okn);
#else
    fetch(it, kr, vr, kok);
#endif
    // Scores: partial dots over this thread's 8 columns, summed across the group's lanes.
    float s[ROWS][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Vec<T>::to_float(kr[u], kf);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) a = fmaf(qf[rr][e], kf[e], a);
        s[rr][u] = a;
      }
    }
#pragma unroll
    for (int o = TPK / 2; o > 0; o >>= 1) {
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int u = 0; u < U; ++u) s[rr][u] += __shfl_xor_sync(0xffffffffu, s[rr][u], o);
    }
    float vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) Vec<T>::to_float(vr[u], vf[u]);
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      float mx = m[rr];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = it + grp * U + u;
        float x = s[rr][u];
        if (p.cap_log2 != 0.f) x = p.cap_log2 * tanhf(x);
        if (p.alibi != nullptr) x -= slope[rr] * fabsf((float)(pos[rr] - j));
        bool ok = kok[u] && row_ok[rr];
        if (p.window_left >= 0) ok = ok && (long long)j >= (long long)pos[rr] - p.window_left;
        if (p.window_right >= 0) ok = ok && (long long)j <= (long long)pos[rr] + p.window_right;
        s[rr][u] = ok ? x : -CUDART_INF_F;
        mx = fmaxf(mx, s[rr][u]);
      }
      const float m_use = mx == -CUDART_INF_F ? 0.f : mx;
      const float alpha = exp2f(m[rr] - m_use);
      float psum = 0.f;
      float pu[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[u] = exp2f(s[rr][u] - m_use);
        psum += pu[u];
      }
      l[rr] = l[rr] * alpha + psum;
      m[rr] = mx;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = acc[rr][e] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pu[u], vf[u][e], a);
        acc[rr][e] = a;
      }
    }
  }

  // Merge the groups' states.
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    if (tid % TPK == 0) {
      sm_m[grp][rr] = m[rr];
      sm_l[grp][rr] = l[rr];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[grp][rr][c0 + e] = acc[rr][e];
  }
  __syncthreads();
  __shared__ float sm_lse[ROWS];
  if (tid < ROWS) {
    const int rr = tid;
    float mx = -CUDART_INF_F;
    for (int g = 0; g < KPI; ++g) mx = fmaxf(mx, sm_m[g][rr]);
    float lsum = 0.f;
    if (mx != -CUDART_INF_F)
      for (int g = 0; g < KPI; ++g) lsum += sm_l[g][rr] * exp2f(sm_m[g][rr] - mx);
    const bool empty = !(lsum > 0.f);
    const float inv = empty ? 0.f : 1.f / lsum;
    for (int g = 0; g < KPI; ++g) sm_w[g][rr] = empty ? 0.f : exp2f(sm_m[g][rr] - mx) * inv;
    sm_lse[rr] = empty ? -CUDART_INF_F : (mx + log2f(lsum)) * kLn2;
  }
  __syncthreads();

  const int64_t nrows_total = (int64_t)p.batch * p.hq * p.sq;
  for (int e8 = tid; e8 < ROWS * (DP / 8); e8 += kThreads) {
    const int rr = e8 / (DP / 8);
    const int c = (e8 % (DP / 8)) * 8;
    const int r = r0 + rr;
    if (r >= p.rows || c >= p.d) continue;
    const int i = r / p.group;
    const int h = hk * p.group + r % p.group;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = 0.f;
    for (int g = 0; g < KPI; ++g) {
      const float w = sm_w[g][rr];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(w, sm_acc[g][rr][c + e], o[e]);
    }
    const int64_t row = ((int64_t)b * p.hq + h) * p.sq + i;  // lse layout (batch, hq, sq)
    if (p.num_splits == 1) {
      uint4 u;
      u.x = Vec<T>::pack2(o[0], o[1]);
      u.y = Vec<T>::pack2(o[2], o[3]);
      u.z = Vec<T>::pack2(o[4], o[5]);
      u.w = Vec<T>::pack2(o[6], o[7]);
      *reinterpret_cast<uint4 *>(static_cast<T *>(p.o) + (int64_t)b * p.o_bs +
                                 (int64_t)i * p.o_rs + (int64_t)h * p.o_hs + c) = u;
      if (c == 0) p.lse[row] = sm_lse[rr];
    } else {
      const int64_t prow = (int64_t)split * nrows_total + row;
      float4 *dst = reinterpret_cast<float4 *>(p.o_part + prow * p.d + c);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (c == 0) p.lse_part[prow] = sm_lse[rr];
    }
  }
}

// Merge the splits of each output row by their lse: one warp per (batch, head, query) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total = (int64_t)p.batch * p.hq * p.sq;
  const int64_t row = (int64_t)blockIdx.x * (kThreads / 32) + warp;
  if (row >= total) return;
  const int ns = p.num_splits;
  float mx = -CUDART_INF_F;
  for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, p.lse_part[s * total + row]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
  if (mx != -CUDART_INF_F)
    for (int s = lane; s < ns; s += 32) sum += __expf(p.lse_part[s * total + row] - mx);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const bool empty = !(sum > 0.f);
  const float lse = empty ? -CUDART_INF_F : mx + __logf(sum);
  if (lane == 0) p.lse[row] = lse;
  const int i = (int)(row % p.sq);
  const int h = (int)((row / p.sq) % p.hq);
  const int b = (int)(row / ((int64_t)p.sq * p.hq));
  T *dst = static_cast<T *>(p.o) + (int64_t)b * p.o_bs + (int64_t)i * p.o_rs + (int64_t)h * p.o_hs;
  for (int c = lane * 4; c < p.d; c += 128) {
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    if (!empty) {
      for (int s = 0; s < ns; ++s) {
        const float ls = p.lse_part[s * total + row];
        if (ls == -CUDART_INF_F) continue;
        const float w = __expf(ls - lse);
        const float4 x = *reinterpret_cast<const float4 *>(p.o_part + (s * total + row) * p.d + c);
        a.x = fmaf(w, x.x, a.x);
        a.y = fmaf(w, x.y, a.y);
        a.z = fmaf(w, x.z, a.z);
        a.w = fmaf(w, x.w, a.w);
      }
    }
    uint2 u;
    u.x = Vec<T>::pack2(a.x, a.y);
    u.y = Vec<T>::pack2(a.z, a.w);
    *reinterpret_cast<uint2 *>(dst + c) = u;
  }
}

template <typename T, int DP, int ROWS, bool PAGED>
int launch_split(const DecodeParams &p, cudaStream_t stream) {
  const int chunks = (p.rows + ROWS - 1) / ROWS;
  dim3 grid(chunks, p.num_splits, p.batch * p.hkv);
  split_kernel<T, DP, ROWS, PAGED><<<grid, kThreads, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

template <typename T, int DP, bool PAGED>
int by_rows(const DecodeParams &p, cudaStream_t stream) {
  switch (rows_per_program(p.rows)) {
    case 1: return launch_split<T, DP, 1, PAGED>(p, stream);
    case 2: return launch_split<T, DP, 2, PAGED>(p, stream);
    case 4: return launch_split<T, DP, 4, PAGED>(p, stream);
    default: return launch_split<T, DP, 8, PAGED>(p, stream);
  }
}

template <typename T, bool PAGED>
int by_dim(const DecodeParams &p, cudaStream_t stream) {
  if (p.d <= 64) return by_rows<T, 64, PAGED>(p, stream);
  if (p.d <= 128) return by_rows<T, 128, PAGED>(p, stream);
  return by_rows<T, 256, PAGED>(p, stream);
}

template <typename T>
int run_typed(const DecodeParams &p, cudaStream_t stream) {
  int err = p.block_table != nullptr ? by_dim<T, true>(p, stream) : by_dim<T, false>(p, stream);
  if (err || p.num_splits == 1) return err;
  const int64_t total = (int64_t)p.batch * p.hq * p.sq;
  const int64_t blocks = (total + kThreads / 32 - 1) / (kThreads / 32);
  combine_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace

int run_decode(const DecodeParams &p, int dtype, cudaStream_t stream) {
  if (dtype == FMX_DTYPE_BF16) return run_typed<__nv_bfloat16>(p, stream);
  return run_typed<__half>(p, stream);
}

}  // namespace decode
}  // namespace fmx
