// sm90 forward instantiations for head_dim 256 (fp16 and bf16); sm_90a only.
// Default: the overlapped loop (ping-pong + intra-warpgroup) with 64-key blocks, 2 stages (Q 64 KB
// + K/V 128 KB of smem; ptxas 44 B of spills): measured 1.23-1.29x the sequential loop with
// 80-key blocks (224 KB, 0 spills; the 80-key overlapped loop spills 188 B). NOTES.md, session 8.
#include <cstdlib>

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
// bf16 variants picked by $FMX_TUNE_SM90 in tuning builds (-DFMX_SM90_TUNING) or with
// -DFMX_SM90_WIDE_VARIANTS=1 (session 8 compared them in the normal build: NOTES.md).
#ifndef FMX_SM90_WIDE_VARIANTS
#define FMX_SM90_WIDE_VARIANTS 0
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd256 = FwdTraits<256, FMX_SM90_FWD256_BN, FMX_SM90_FWD256_STAGES, T,
                         (FMX_SM90_FWD256_OVERLAP != 0), (FMX_SM90_FWD256_PINGPONG != 0)>;
static_assert(Fwd256<cutlass::bfloat16_t>::kSmemBytes <= 227 * 1024, "over the 227 KB of smem");

template <>
int run_fwd<256>(const Params &p, int dtype, cudaStream_t stream) {
#if FMX_SM90_WIDE_VARIANTS || defined(FMX_SM90_TUNING)
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (dtype == 1 && tune != nullptr) {
    if (tune[0] == '1')  // sequential loop with ping-pong between the warpgroups, 80 keys
      return launch_fwd<FwdTraits<256, 80, 2, cutlass::bfloat16_t, false, true>>(p, stream);
    if (tune[0] == '2')  // the sequential loop, 80 keys (session 8's first default)
      return launch_fwd<FwdTraits<256, 80, 2, cutlass::bfloat16_t, false, false>>(p, stream);
  }
#endif
  if (dtype == 0) return launch_fwd<Fwd256<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd256<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
