// sm90 backward variants for head_dim 97..128, bf16 (session 11): kDqBulk (dQ through shared
// memory + bulk reduce-adds), kPre (the next step's S^T under this step's dQ adds), and both;
// chosen by FLASHMUX_CUDA_SM90_BWD (bwd_variant_env in bwd_kernel.cuh). Full builds only: with
// -DFMX_HEAD_DIMS_LIMITED (the lean CI tier) this unit compiles to nothing and bwd_hdim128.cu
// does not call it.
#ifndef FMX_HEAD_DIMS_LIMITED
#include "bwd_kernel.cuh"

#ifndef FMX_SM90_BWD128_BM
#define FMX_SM90_BWD128_BM 64
#endif
#ifndef FMX_SM90_BWD128_STAGES
#define FMX_SM90_BWD128_STAGES 2
#endif

namespace fmx {
namespace sm90 {
template <bool kBulk, bool kPre>
using BwdVar128 = BwdTraits<128, FMX_SM90_BWD128_BM, FMX_SM90_BWD128_STAGES, cutlass::bfloat16_t, kBulk, -1,
                          false, false, kPre>;

template <>
int run_bwd_var<128>(int variant, const Params &p, const float *lse2, const float *dsum,
                    int sq_pad, cudaStream_t stream) {
  switch (variant) {
    case 1: return launch_bwd<BwdVar128<true, false>>(p, lse2, dsum, sq_pad, stream);
    case 2: return launch_bwd<BwdVar128<false, true>>(p, lse2, dsum, sq_pad, stream);
    default: return launch_bwd<BwdVar128<true, true>>(p, lse2, dsum, sq_pad, stream);
  }
}
}  // namespace sm90
}  // namespace fmx
#endif
