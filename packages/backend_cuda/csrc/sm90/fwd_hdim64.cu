// sm90 forward instantiations for head_dim <= 64 (fp16 and bf16); sm_90a only.
#include <cstdlib>

#include "fwd_persist.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD64_BN=...) for sweeps.
#ifndef FMX_SM90_FWD64_BN
#define FMX_SM90_FWD64_BN 128
#endif
#ifndef FMX_SM90_FWD64_STAGES
#define FMX_SM90_FWD64_STAGES 2
#endif

// Session 10: a bf16 variant in the normal build, FMX_TUNE_SM90=5: 192-key blocks (the S GEMM
// longer against the softmax, as FlashAttention-3's head_dim 64 tile; both schedules).
// -DFMX_SM90_FWD64_VARIANT=0 leaves it out; to go once measured (NOTES.md).
#ifndef FMX_SM90_FWD64_VARIANT
#define FMX_SM90_FWD64_VARIANT 1
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd64 = FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, T>;

template <>
int run_fwd<64>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_SM90_TUNING
  // -DFMX_SM90_TUNING builds: FMX_TUNE_SM90=1 runs the sequential variant (no ping-pong, no overlap).
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (tune != nullptr && tune[0] == '1') {
    if (dtype == 0) return launch_fwd<FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, cutlass::half_t, false>>(p, stream);
    return launch_fwd<FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, cutlass::bfloat16_t, false>>(p, stream);
  }
#endif
#if FMX_SM90_FWD64_VARIANT
  if (dtype == 1) {
    const char *v = std::getenv("FMX_TUNE_SM90");
    if (v != nullptr && v[0] == '5')
      return launch_fwd_sched<FwdTraits<64, 192, 2, cutlass::bfloat16_t>>(p, stream);
    // =7: 3 K/V stages (both schedules)
    if (v != nullptr && v[0] == '7')
      return launch_fwd_sched<FwdTraits<64, 128, 3, cutlass::bfloat16_t>>(p, stream);
  }
#endif
  // FLASHMUX_CUDA_SM90_FWD=persist: the persistent kernel (fwd_persist.cuh), else one CTA per tile
  if (dtype == 0) return launch_fwd_sched<Fwd64<cutlass::half_t>>(p, stream);
  return launch_fwd_sched<Fwd64<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
