// sm90 forward instantiations for head_dim 256 (fp16 and bf16); sm_90a only.
// Default: the overlapped loop (ping-pong + intra-warpgroup) with 64-key blocks, 2 stages (Q 64 KB
// + K/V 128 KB of smem; ptxas 44 B of spills): measured 1.23-1.29x the sequential loop with
// 80-key blocks (224 KB, 0 spills; the 80-key overlapped loop spills 188 B). NOTES.md, session 8.
#include "fwd_kernel.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD256_BN=...) for sweeps.
#ifndef FMX_SM90_FWD256_BN
#define FMX_SM90_FWD256_BN 64
#endif
#ifndef FMX_SM90_FWD256_STAGES
#define FMX_SM90_FWD256_STAGES 2
#endif
#ifndef FMX_SM90_FWD256_OVERLAP  // 0: the sequential consumer loop (FwdTraits::kOverlap)
#define FMX_SM90_FWD256_OVERLAP 1
#endif
#ifndef FMX_SM90_FWD256_PINGPONG  // turns between the consumer warpgroups (FwdTraits::kPingPong)
#define FMX_SM90_FWD256_PINGPONG 1
#endif

namespace fmx {
namespace sm90 {
// run_fwd_wide (fwd_kernel.cuh): both dtypes; tuning builds add the 80-key sequential variants.
template <>
int run_fwd<256>(const Params &p, int dtype, cudaStream_t stream) {
  return run_fwd_wide<256, FMX_SM90_FWD256_BN, FMX_SM90_FWD256_STAGES, (FMX_SM90_FWD256_OVERLAP != 0),
                      (FMX_SM90_FWD256_PINGPONG != 0), 80>(p, dtype, stream);
}
}  // namespace sm90
}  // namespace fmx
