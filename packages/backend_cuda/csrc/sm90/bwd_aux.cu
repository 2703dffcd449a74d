// sm90 backward preprocess: the lse (log2 units) and dsum rows the main kernel bulk-copies, in
// (batch, hq, sq_pad) with padded rows, so that every 1-D copy is 16-byte aligned and whole.
// One warp per (row, head); each lane reads 8 contiguous elements (16 bytes) of O and dO.
#include "../common/fmx_device.cuh"
#include "sm90_api.h"

namespace fmx {
namespace sm90 {

constexpr int kPreRows = 8;  // rows (warps) per 256-thread block

template <typename Element>
__global__ void __launch_bounds__(256)
    bwd_preprocess_kernel(const Params p, float *lse2, float *dsum, int sq_pad) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * kPreRows + warp, h = blockIdx.y, b = blockIdx.z;
  if (i >= sq_pad) return;
  const int64_t dst = ((int64_t)b * p.hq + h) * sq_pad + i;
  if (i >= p.seqlen_q) {  // padded rows: P = exp2(s - inf) = 0 and dS = 0
    if (lane == 0) {
      lse2[dst] = INFINITY;
      dsum[dst] = 0.f;
    }
    return;
  }
  const Element *o = reinterpret_cast<const Element *>(p.o) + (int64_t)b * p.o_bs +
                     (int64_t)i * p.o_rs + (int64_t)h * p.o_hs;
  const Element *dO = reinterpret_cast<const Element *>(p.dout) + (int64_t)b * p.do_bs +
                      (int64_t)i * p.do_rs + (int64_t)h * p.do_hs;
  float acc = 0.f;
  for (int c = lane * 8; c < p.d_v; c += 256) {  // O and dO: Dv columns
    uint4 a = *reinterpret_cast<const uint4 *>(o + c);
    uint4 g = *reinterpret_cast<const uint4 *>(dO + c);
    const Element *ae = reinterpret_cast<const Element *>(&a);
    const Element *ge = reinterpret_cast<const Element *>(&g);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += static_cast<float>(ae[e]) * static_cast<float>(ge[e]);
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, s);
  if (lane == 0) {
    const int64_t off = ((int64_t)b * p.hq + h) * p.seqlen_q + i;  // lse: (batch, hq, seqlen_q)
    const float l = p.lse[off];
    lse2[dst] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
    dsum[dst] = acc - (p.dlse != nullptr ? p.dlse[off] : 0.f);
  }
}

int run_bwd_preprocess(const Params &p, float *lse2, float *dsum, int dtype, cudaStream_t stream) {
  const int pad = bwd_sq_pad(p.seqlen_q);
  dim3 grid(ceil_div(pad, kPreRows), p.hq, p.batch);
  if (dtype == 0)
    bwd_preprocess_kernel<cutlass::half_t><<<grid, 256, 0, stream>>>(p, lse2, dsum, pad);
  else
    bwd_preprocess_kernel<cutlass::bfloat16_t><<<grid, 256, 0, stream>>>(p, lse2, dsum, pad);
  return (int)cudaGetLastError();
}

}  // namespace sm90
}  // namespace fmx
