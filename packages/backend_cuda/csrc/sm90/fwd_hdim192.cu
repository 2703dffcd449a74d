// sm90 forward instantiations for head_dim 192 (fp16 and bf16); sm_90a only.
// Shared memory bounds the key block: Q (128 x 192) + 2 stages of K and V (112 x 192 each) is
// 216 KB of the 227 KB.
#include <cstdlib>

#include "fwd_kernel.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD192_BN=...) for sweeps.
#ifndef FMX_SM90_FWD192_BN
#define FMX_SM90_FWD192_BN 112
#endif
#ifndef FMX_SM90_FWD192_STAGES
#define FMX_SM90_FWD192_STAGES 2
#endif
#ifndef FMX_SM90_FWD192_OVERLAP  // 0: the sequential consumer loop (FwdTraits::kOverlap)
#define FMX_SM90_FWD192_OVERLAP 0
#endif
#ifndef FMX_SM90_FWD192_PINGPONG  // turns between the consumer warpgroups (FwdTraits::kPingPong)
#define FMX_SM90_FWD192_PINGPONG 0
#endif
// Session 8 only: bf16 variants in the normal build, picked by $FMX_TUNE_SM90 (so that one GPU
// build compares them; -DFMX_SM90_WIDE_VARIANTS=0 leaves them out). To go once one is chosen.
#ifndef FMX_SM90_WIDE_VARIANTS
#define FMX_SM90_WIDE_VARIANTS 1
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd192 = FwdTraits<192, FMX_SM90_FWD192_BN, FMX_SM90_FWD192_STAGES, T,
                         (FMX_SM90_FWD192_OVERLAP != 0), (FMX_SM90_FWD192_PINGPONG != 0)>;
static_assert(Fwd192<cutlass::bfloat16_t>::kSmemBytes <= 227 * 1024, "over the 227 KB of smem");

template <>
int run_fwd<192>(const Params &p, int dtype, cudaStream_t stream) {
#if FMX_SM90_WIDE_VARIANTS || defined(FMX_SM90_TUNING)
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (dtype == 1 && tune != nullptr) {
    if (tune[0] == '1')  // sequential loop with ping-pong between the warpgroups, 112 keys
      return launch_fwd<FwdTraits<192, 112, 2, cutlass::bfloat16_t, false, true>>(p, stream);
    if (tune[0] == '2')  // overlap, 96-key blocks
      return launch_fwd<FwdTraits<192, 96, 2, cutlass::bfloat16_t, true>>(p, stream);
  }
#endif
  if (dtype == 0) return launch_fwd<Fwd192<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd192<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
