// sm90 forward instantiations for head_dim 65..96 (fp16 and bf16); sm_90a only (session 10).
// 96 is not a multiple of the 128-byte swizzle's 64-element rows: Q, K and V^T take 64-byte
// swizzled atoms of 32-element rows (FwdTraits::kSW64); the wgmma shapes are 64 x BN x 96 (S) and
// 64 x 96 x BN (O). Before, 65..96 ran the sm80 forward (or, with FLASHMUX_CUDA_SM90_PAD96=1,
// the 128 instantiation with a third more MMA work).
#include <cstdlib>

#include "fwd_persist.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD96_BN=...) for sweeps.
#ifndef FMX_SM90_FWD96_BN
#define FMX_SM90_FWD96_BN 128
#endif
#ifndef FMX_SM90_FWD96_STAGES
#define FMX_SM90_FWD96_STAGES 2
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd96 = FwdTraits<96, FMX_SM90_FWD96_BN, FMX_SM90_FWD96_STAGES, T>;

template <>
int run_fwd<96>(const Params &p, int dtype, cudaStream_t stream) {
  // bf16: FLASHMUX_CUDA_SM90_FWD=persist runs the persistent kernel (fwd_persist.cuh)
  if (dtype == 0) return launch_fwd<Fwd96<cutlass::half_t>>(p, stream);
  return launch_fwd_sched<Fwd96<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx

#ifdef FMX_HEAD_DIMS_LIMITED
// Lean (head-dim-limited) builds, the CI compile check: fwd_extras_hdim96.cu's stub is compiled in
// this unit (no unit of its own; session 11).
#define FMX_SM90_EXTRAS_IN_DENSE_UNIT
#include "fwd_extras_hdim96.cu"
#endif
