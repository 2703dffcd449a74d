// sm90 backward instantiations for head_dim <= 64 (fp16 and bf16); sm_90a only.
#include <cstdlib>

#include "bwd_kernel.cuh"

// Query rows per step and Q/dO stages, overridable at build time for sweeps.
#ifndef FMX_SM90_BWD64_BM
#define FMX_SM90_BWD64_BM 128
#endif
#ifndef FMX_SM90_BWD64_STAGES
#define FMX_SM90_BWD64_STAGES 2
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Bwd64 = BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, T>;

template <>
int run_bwd<64>(const Params &p, const float *lse2, const float *dsum, int dtype,
                cudaStream_t stream) {
  const int pad = bwd_sq_pad(p.seqlen_q);
#ifdef FMX_SM90_BWD_TUNING
  // -DFMX_SM90_BWD_TUNING builds: FMX_TUNE_SM90_BWD=1 adds dQ through shared memory and bulk
  // reduce-adds (kDqBulk) where seqlen_q % 8 == 0 (its 8-row groups must be dq_accum's);
  // FMX_TUNE_SM90_BWD=2 (bf16) flips the GEMM issue order (kEarlyDV) against the default;
  // FMX_TUNE_SM90_BWD=3 (bf16) gives each warpgroup its own dQ partial (kLocalDQ).
  const char *tune = std::getenv("FMX_TUNE_SM90_BWD");
  if (tune != nullptr && tune[0] == '3' && dtype == 1)  // per-warpgroup dQ partials (kLocalDQ)
    return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::bfloat16_t, false, -1, true>>(
        p, lse2, dsum, pad, stream);
  if (tune != nullptr && tune[0] == '2' && dtype == 1) {
    constexpr int kFlip = BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::bfloat16_t>::kEarlyDV ? 0 : 1;
    return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::bfloat16_t, false, kFlip>>(
        p, lse2, dsum, pad, stream);
  }
  if (tune != nullptr && tune[0] == '1' && p.seqlen_q % 8 == 0) {
    if (dtype == 0)
      return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::half_t, true>>(
          p, lse2, dsum, pad, stream);
    return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::bfloat16_t, true>>(
        p, lse2, dsum, pad, stream);
  }
#endif
#ifndef FMX_HEAD_DIMS_LIMITED
  if (dtype == 1) {  // bf16: FLASHMUX_CUDA_SM90_BWD=bulk / pre / bulk+pre (bwdvar_hdim64.cu)
    if (const int v = bwd_variant_env(p)) return run_bwd_var<64>(v, p, lse2, dsum, pad, stream);
  }
#endif
  if (p.deterministic) {  // dQ added in key-block order (kDet)
    if (dtype == 0)
      return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::half_t, false, -1, false, true>>(
          p, lse2, dsum, pad, stream);
    return launch_bwd<BwdTraits<64, FMX_SM90_BWD64_BM, FMX_SM90_BWD64_STAGES, cutlass::bfloat16_t, false, -1, false, true>>(
        p, lse2, dsum, pad, stream);
  }
  if (dtype == 0) return launch_bwd<Bwd64<cutlass::half_t>>(p, lse2, dsum, pad, stream);
  return launch_bwd<Bwd64<cutlass::bfloat16_t>>(p, lse2, dsum, pad, stream);
}
}  // namespace sm90
}  // namespace fmx
