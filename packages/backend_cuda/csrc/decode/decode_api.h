// KV-cache decode (split-KV, Flash-Decoding) kernels: launch parameters and entry point.
// Built from the public FmxDecodeArgs by flashmux_cuda_api.cu after validation.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace fmx {
namespace decode {

struct DecodeParams {
  const void *q, *k, *v;
  void *o;
  float *lse;                 // (batch, hq, sq) float32, contiguous
  int64_t q_bs, q_rs, q_hs;   // element strides of q (batch, row, head)
  int64_t o_bs, o_rs, o_hs;
  int64_t k_ps, k_rs, k_hs;   // cache strides: (batch | page, row, head)
  int64_t v_ps, v_rs, v_hs;
  const int32_t *seqlens_k;   // (batch,) keys per sequence, new tokens included
  const int32_t *block_table; // (batch, max_pages) row stride bt_stride; NULL: contiguous
  int64_t bt_stride;
  const float *alibi;         // NULL or slopes, element (b, h) at b * alibi_bs + h
  int64_t alibi_bs;
  int32_t batch, sq, hq, hkv, group, d;
  int32_t rows;               // sq * group: query rows packed per (sequence, KV head)
  int32_t capacity;           // keys a sequence can hold: S_max or max_pages * page_size
  int32_t page_size, num_pages, max_pages;
  float q_mult;               // q is multiplied by this: scale*log2(e), or scale/softcap
  float cap_log2;             // softcap*log2(e); 0 => no softcap
  int32_t window_left, window_right;  // -1 => unbounded (causal folded into window_right)
  int32_t num_splits;
  float *o_part;              // num_splits > 1: (split, batch, hq, sq, d) float32
  float *lse_part;            // num_splits > 1: (split, batch, hq, sq) float32
};

// Rows of query packed per program: 1, 2, 4 or 8 (more rows take several programs).
inline int rows_per_program(int rows) {
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

// dtype: FMX_DTYPE_F16 or FMX_DTYPE_BF16. Returns 0 or a cudaError_t value.
int run_decode(const DecodeParams &p, int dtype, cudaStream_t stream);

}  // namespace decode
}  // namespace fmx
