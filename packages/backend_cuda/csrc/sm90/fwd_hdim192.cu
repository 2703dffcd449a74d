// sm90 forward instantiations for head_dim 192 (fp16 and bf16); sm_90a only.
// Default: the overlapped loop (ping-pong + intra-warpgroup) with 96-key blocks, 2 stages (Q 48 KB
// + K/V 144 KB of smem; ptxas 44 B of spills): measured 1.41-1.58x the sequential loop with
// 112-key blocks (216 KB, 0 spills; the 112-key overlapped loop spills 156 B). NOTES.md, session 8.
#include "fwd_kernel.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD192_BN=...) for sweeps.
#ifndef FMX_SM90_FWD192_BN
#define FMX_SM90_FWD192_BN 96
#endif
#ifndef FMX_SM90_FWD192_STAGES
#define FMX_SM90_FWD192_STAGES 2
#endif
#ifndef FMX_SM90_FWD192_OVERLAP  // 0: the sequential consumer loop (FwdTraits::kOverlap)
#define FMX_SM90_FWD192_OVERLAP 1
#endif
#ifndef FMX_SM90_FWD192_PINGPONG  // turns between the consumer warpgroups (FwdTraits::kPingPong)
#define FMX_SM90_FWD192_PINGPONG 1
#endif

namespace fmx {
namespace sm90 {
// run_fwd_wide (fwd_kernel.cuh): both dtypes; tuning builds add the 112-key sequential variants.
template <>
int run_fwd<192>(const Params &p, int dtype, cudaStream_t stream) {
  return run_fwd_wide<192, FMX_SM90_FWD192_BN, FMX_SM90_FWD192_STAGES, (FMX_SM90_FWD192_OVERLAP != 0),
                      (FMX_SM90_FWD192_PINGPONG != 0), 112>(p, dtype, stream);
}
}  // namespace sm90
}  // namespace fmx
