// Device helpers shared by the kernel families: sequence bookkeeping, masks, cp.async, packing.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cutlass/numeric_types.h>
#include "fmx_params.h"

namespace fmx {

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
// Floor division that is correct for negative numerators (b > 0).
__host__ __device__ __forceinline__ int floor_div(int a, int b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Where one sequence of the batch lives. Offsets are 64-bit element offsets.
struct SeqInfo {
  int sq, sk;        // actual lengths of this sequence
  int off;           // sk - sq: bottom-right alignment of causal/window masks
  int64_t q_row0;    // global row index of row 0 in the (total_q) row space
  int64_t k_row0;
  bool varlen;

  __device__ __forceinline__ SeqInfo(const Params &p, int b) {
    varlen = p.cu_q != nullptr;
    if (varlen) {
      int q0 = p.cu_q[b], q1 = p.cu_q[b + 1];
      int k0 = p.cu_k[b], k1 = p.cu_k[b + 1];
      sq = q1 - q0; sk = k1 - k0;
      q_row0 = q0; k_row0 = k0;
    } else {
      sq = p.seqlen_q; sk = p.seqlen_k;
      q_row0 = (int64_t)b * p.seqlen_q; k_row0 = (int64_t)b * p.seqlen_k;
    }
    off = sk - sq;
  }
  // Element offset of (row 0, head 0) of this sequence in a tensor with the given strides.
  __device__ __forceinline__ int64_t q_base(int b, int64_t bs, int64_t rs) const {
    return varlen ? q_row0 * rs : (int64_t)b * bs;
  }
  __device__ __forceinline__ int64_t k_base(int b, int64_t bs, int64_t rs) const {
    return varlen ? k_row0 * rs : (int64_t)b * bs;
  }
  // Offset of lse / dsum for (head h, row i): padded (B,Hq,Sq), varlen (Hq,Tq).
  __device__ __forceinline__ int64_t lse_off(const Params &p, int b, int h, int i) const {
    return varlen ? (int64_t)h * p.total_q + q_row0 + i
                  : ((int64_t)b * p.hq + h) * p.seqlen_q + i;
  }
};

// Key block range [n_min, n_max) that can hold an allowed key for query rows [m0, m0 + bm).
__device__ __forceinline__ void key_block_range(const Params &p, const SeqInfo &si, int m0, int bm,
                                                int bn, int &n_min, int &n_max) {
  n_max = ceil_div(si.sk, bn);
  n_min = 0;
  if (p.window_right >= 0)
    n_max = min(n_max, floor_div(m0 + bm - 1 + si.off + p.window_right, bn) + 1);
  if (p.window_left >= 0) n_min = max(0, floor_div(m0 + si.off - p.window_left, bn));
}

// Query block range [m_min, m_max) (blocks of bm) that can see a key of [n0, n0 + bn).
__device__ __forceinline__ void query_block_range(const Params &p, const SeqInfo &si, int n0, int bn,
                                                  int bm, int &m_min, int &m_max) {
  m_max = ceil_div(si.sq, bm);
  m_min = 0;
  if (p.window_right >= 0) m_min = max(0, floor_div(n0 - si.off - p.window_right, bm));
  if (p.window_left >= 0)
    m_max = min(m_max, floor_div(n0 + bn - 1 - si.off + p.window_left, bm) + 1);
}

// Does the (rows [m0,m0+bm), keys [n0,n0+bn)) tile contain any disallowed (or out of range) key?
__device__ __forceinline__ bool tile_needs_mask(const Params &p, const SeqInfo &si, int m0, int bm,
                                                int n0, int bn) {
  if (n0 + bn > si.sk) return true;
  if (p.window_right >= 0 && n0 + bn - 1 > m0 + si.off + p.window_right) return true;
  if (p.window_left >= 0 && n0 < m0 + bm - 1 + si.off - p.window_left) return true;
  return false;
}

__device__ __forceinline__ bool key_allowed(const Params &p, const SeqInfo &si, int i, int j) {
  if (j >= si.sk) return false;
  if (p.window_right >= 0 && j > i + si.off + p.window_right) return false;
  if (p.window_left >= 0 && j < i + si.off - p.window_left) return false;
  return true;
}

// ---- cp.async ------------------------------------------------------------------------------
// 16-byte global->shared copy; when pred is false the destination is zero-filled (src-size 0).
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem, bool pred) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Load a (ROWS x D) tile of a row-major (row stride rs, unit column stride) gmem matrix into a
// CuTe smem tensor, zero-filling rows >= rows_valid and columns >= cols_valid. Each thread moves
// 16-byte chunks; when the threads cover whole rows and step by a multiple of 8 rows (the
// swizzle period), a thread's later chunks sit at static offsets from its first one, so only
// one smem address and one gmem pointer per thread are live.
template <int ROWS, int D, int NTHREADS, typename Element, typename SmemTensor>
__device__ __forceinline__ void load_tile_async(SmemTensor &s, const Element *g, int64_t rs,
                                                int rows_valid, int cols_valid, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  constexpr bool kRegular = NTHREADS % kChunks == 0 && (NTHREADS / kChunks) % 8 == 0 &&
                            kTotal % NTHREADS == 0;
  if constexpr (kRegular) {
    constexpr int kRowsPerIter = NTHREADS / kChunks;
    const int r0 = tid / kChunks, c = (tid % kChunks) * 8;
    Element *s0 = &s(r0, c);
    const Element *g0 = g + (int64_t)r0 * rs + c;
    const int64_t gstep = (int64_t)kRowsPerIter * rs;
    const bool col_ok = c < cols_valid;
    if (rows_valid >= ROWS && cols_valid >= D) {  // interior tile: no predicates
#pragma unroll
      for (int it = 0; it < kTotal / NTHREADS; ++it) {
        const int soff = s.layout()(it * kRowsPerIter, 0) - s.layout()(0, 0);
        cp_async_16(s0 + soff, g0 + it * gstep, true);
      }
    } else {
#pragma unroll
      for (int it = 0; it < kTotal / NTHREADS; ++it) {
        const int soff = s.layout()(it * kRowsPerIter, 0) - s.layout()(0, 0);
        const bool pred = col_ok && r0 + it * kRowsPerIter < rows_valid;
        cp_async_16(s0 + soff, pred ? g0 + it * gstep : g, pred);
      }
    }
  } else {
#pragma unroll
    for (int it = 0; it < (kTotal + NTHREADS - 1) / NTHREADS; ++it) {
      int idx = it * NTHREADS + tid;
      if (kTotal % NTHREADS == 0 || idx < kTotal) {
        int r = idx / kChunks, c = (idx % kChunks) * 8;
        bool pred = r < rows_valid && c < cols_valid;
        const Element *src = pred ? g + (int64_t)r * rs + c : g;
        cp_async_16(&s(r, c), src, pred);
      }
    }
  }
}

// Write zeros to rows [0, rows_valid) x cols [0, cols_valid) of a gmem matrix.
template <int D, int NTHREADS, typename Element>
__device__ __forceinline__ void zero_rows(Element *g, int64_t rs, int rows_valid, int cols_valid,
                                          int tid) {
  constexpr int kChunks = D / 8;
  int total = rows_valid * kChunks;
  for (int idx = tid; idx < total; idx += NTHREADS) {
    int r = idx / kChunks, c = (idx % kChunks) * 8;
    if (c < cols_valid) *reinterpret_cast<uint4 *>(g + (int64_t)r * rs + c) = make_uint4(0, 0, 0, 0);
  }
}

// ---- numerics ------------------------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh with small absolute error (|err| ~ 1e-7), cheap enough for the inner loop: 1 - 2/(e^2x + 1).
__device__ __forceinline__ float tanh_fast(float x) {
  float e = fast_exp2(x * 2.8853900817779268f);
  return 1.f - 2.f * __frcp_rn(1.f + e);
}

template <typename Element>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<cutlass::half_t>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<cutlass::bfloat16_t>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}

template <typename Element>
__device__ __forceinline__ float to_float(Element x) { return static_cast<float>(x); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x;
}

}  // namespace fmx
