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
// Session 10 measured (H200, call s10b) and dropped: 176-key blocks (FMX_TUNE_SM90=4,
// 0.70-0.77x of this kernel), 3 K/V stages (=6, 0.87-0.99x); session 8's 96-key blocks (=3).

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
  // bf16: FLASHMUX_CUDA_SM90_FWD=persist runs the persistent kernel (fwd_persist.cuh)
  if (dtype == 0) return launch_fwd<Fwd128<cutlass::half_t>>(p, stream);
  return launch_fwd_sched<Fwd128<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx

#ifdef FMX_HEAD_DIMS_LIMITED
// Lean (head-dim-limited) builds, the CI compile check: fwd_extras_hdim128.cu's bf16 kExt kernel
// is compiled in this unit (one front end less than a unit of its own; session 11).
#define FMX_SM90_EXTRAS_IN_DENSE_UNIT
#include "fwd_extras_hdim128.cu"
#endif
