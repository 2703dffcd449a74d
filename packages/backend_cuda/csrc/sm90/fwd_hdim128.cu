// sm90 forward instantiations for head_dim <= 128 (fp16 and bf16); sm_90a only.
#include <cstdlib>

#include "fwd_persist.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD128_BN=...) for sweeps.
#ifndef FMX_SM90_FWD128_BN
#define FMX_SM90_FWD128_BN 128
#endif
#ifndef FMX_SM90_FWD128_STAGES
#define FMX_SM90_FWD128_STAGES 2
#endif
// Session 10: a bf16 variant in the normal build, FMX_TUNE_SM90=4: the same overlapped loop with
// 176-key blocks (FlashAttention-3's non-causal head_dim 128 tile; one CTA per tile only: with
// the persistent kernel's O buffer the smem would exceed 227 KB). Session 8's FMX_TUNE_SM90=3
// (96-key blocks) was measured slower and is gone. -DFMX_SM90_FWD128_VARIANT=0 leaves it out.
#ifndef FMX_SM90_FWD128_VARIANT
#define FMX_SM90_FWD128_VARIANT 1
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd128 = FwdTraits<128, FMX_SM90_FWD128_BN, FMX_SM90_FWD128_STAGES, T>;

template <>
int run_fwd<128>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_SM90_TUNING
  // -DFMX_SM90_TUNING builds: FMX_TUNE_SM90=1 runs the sequential variant (no ping-pong, no overlap).
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (tune != nullptr && tune[0] == '1') {
    if (dtype == 0) return launch_fwd<FwdTraits<128, FMX_SM90_FWD128_BN, FMX_SM90_FWD128_STAGES, cutlass::half_t, false>>(p, stream);
    return launch_fwd<FwdTraits<128, FMX_SM90_FWD128_BN, FMX_SM90_FWD128_STAGES, cutlass::bfloat16_t, false>>(p, stream);
  }
#endif
#if FMX_SM90_FWD128_VARIANT
  if (dtype == 1) {
    const char *v = std::getenv("FMX_TUNE_SM90");
    if (v != nullptr && v[0] == '4')
      return launch_fwd<FwdTraits<128, 176, 2, cutlass::bfloat16_t>>(p, stream);
    // =6: 3 K/V stages (224 KB of smem: one CTA per tile only)
    if (v != nullptr && v[0] == '6')
      return launch_fwd<FwdTraits<128, 128, 3, cutlass::bfloat16_t>>(p, stream);
  }
#endif
  // FLASHMUX_CUDA_SM90_FWD=persist: the persistent kernel (fwd_persist.cuh), else one CTA per tile
  if (dtype == 0) return launch_fwd_sched<Fwd128<cutlass::half_t>>(p, stream);
  return launch_fwd_sched<Fwd128<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
