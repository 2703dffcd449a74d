// Backward helper kernels shared by every head dim: the dsum preprocess and the dQ conversion.
// One warp per (row, head); each lane moves 8 contiguous elements (16 bytes) at a time.
#include "../common/fmx_device.cuh"
#include "sm80_api.h"
#ifdef FMX_TUNING
#include <cstdlib>
#endif

namespace fmx {
namespace sm80 {

constexpr int kAuxRowsPerBlock = 8;

template <typename Element>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * kAuxRowsPerBlock + warp, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si(p, b);
  if (i >= si.sq) return;
  const Element *o = reinterpret_cast<const Element *>(p.o) + si.q_base(b, p.o_bs, p.o_rs) +
                     (int64_t)i * p.o_rs + (int64_t)h * p.o_hs;
  const Element *dO = reinterpret_cast<const Element *>(p.dout) + si.q_base(b, p.do_bs, p.do_rs) +
                      (int64_t)i * p.do_rs + (int64_t)h * p.do_hs;
  float acc = 0.f;
  for (int c = lane * 8; c < p.d_v; c += 256) {  // O and dO have Dv columns
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
    const int64_t off = si.lse_off(p, b, h, i);
    p.dsum[off] = acc - (p.dlse != nullptr ? p.dlse[off] : 0.f);
  }
}

template <typename Element>
__global__ void __launch_bounds__(256) bwd_convert_dq_kernel(const Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * kAuxRowsPerBlock + warp, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si(p, b);
  if (i >= si.sq) return;
  const int64_t gi = si.q_row0 + i;  // dq_accum is in 8x8 blocks (fmx_params.h)
  const float *src = p.dq_accum + ((gi >> 3) * p.hq + h) * (int64_t)p.d * 8 + (gi & 7) * 8;
  Element *dst = reinterpret_cast<Element *>(p.dq) + si.q_base(b, p.dq_bs, p.dq_rs) +
                 (int64_t)i * p.dq_rs + (int64_t)h * p.dq_hs;
  for (int c = lane * 8; c < p.d; c += 256) {
    float4 a = *reinterpret_cast<const float4 *>(src + c * 8);
    float4 bb = *reinterpret_cast<const float4 *>(src + c * 8 + 4);
    uint4 out;
    out.x = pack2<Element>(a.x, a.y);  // already scaled: the backward adds (dS * scale) K
    out.y = pack2<Element>(a.z, a.w);
    out.z = pack2<Element>(bb.x, bb.y);
    out.w = pack2<Element>(bb.z, bb.w);
    *reinterpret_cast<uint4 *>(dst + c) = out;
  }
}

int run_bwd_preprocess(const Params &p, int dtype, cudaStream_t stream) {
  dim3 grid(ceil_div(p.seqlen_q, kAuxRowsPerBlock), p.hq, p.batch);
  if (dtype == 0)
    bwd_preprocess_kernel<cutlass::half_t><<<grid, 256, 0, stream>>>(p);
  else
    bwd_preprocess_kernel<cutlass::bfloat16_t><<<grid, 256, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

int run_bwd_convert_dq(const Params &p, int dtype, cudaStream_t stream) {
  dim3 grid(ceil_div(p.seqlen_q, kAuxRowsPerBlock), p.hq, p.batch);
  if (dtype == 0)
    bwd_convert_dq_kernel<cutlass::half_t><<<grid, 256, 0, stream>>>(p);
  else
    bwd_convert_dq_kernel<cutlass::bfloat16_t><<<grid, 256, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

#ifdef FMX_TUNING
int tune_choice(const char *env_name) {
  const char *v = std::getenv(env_name);
  return v != nullptr ? std::atoi(v) : 0;
}
#endif

}  // namespace sm80
}  // namespace fmx
