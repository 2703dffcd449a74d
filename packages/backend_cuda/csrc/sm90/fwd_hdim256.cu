// sm90 forward instantiations for head_dim 256 (fp16 and bf16); sm_90a only.
// Shared memory bounds the key block: Q (128 x 256) + 2 stages of K and V (80 x 256 each) is
// 224 KB of the 227 KB (FlashAttention-3 uses 80-key blocks at head_dim 256 too).
#include <cstdlib>

#include "fwd_kernel.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD256_BN=...) for sweeps.
#ifndef FMX_SM90_FWD256_BN
#define FMX_SM90_FWD256_BN 80
#endif
#ifndef FMX_SM90_FWD256_STAGES
#define FMX_SM90_FWD256_STAGES 2
#endif
#ifndef FMX_SM90_FWD256_OVERLAP  // 0: the sequential consumer loop (FwdTraits::kOverlap)
#define FMX_SM90_FWD256_OVERLAP 0
#endif
#ifndef FMX_SM90_FWD256_PINGPONG  // turns between the consumer warpgroups (FwdTraits::kPingPong)
#define FMX_SM90_FWD256_PINGPONG 0
#endif
// Session 8 only: bf16 variants in the normal build, picked by $FMX_TUNE_SM90 (so that one GPU
// build compares them; -DFMX_SM90_WIDE_VARIANTS=0 leaves them out). To go once one is chosen.
#ifndef FMX_SM90_WIDE_VARIANTS
#define FMX_SM90_WIDE_VARIANTS 1
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
    if (tune[0] == '2')  // overlap, 64-key blocks (44 B spills)
      return launch_fwd<FwdTraits<256, 64, 2, cutlass::bfloat16_t, true>>(p, stream);
  }
#endif
  if (dtype == 0) return launch_fwd<Fwd256<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd256<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
