// sm90 forward with ALiBi slopes and/or a block mask (the kExt kernels of fwd_kernel.cuh) for
// the head_dim 96 instantiation, fp16 and bf16; sm_90a only (issue 15, session 11). A unit of its
// own so that the build compiles it beside the dense fwd_hdim96.cu (the dense kernels' code does
// not change). 128-key blocks whatever the dense unit's tile: block masks come in blocks of
// 128 k keys. Lean (head-dim-limited, compile-check) builds: a stub (below).
#ifdef FMX_HEAD_DIMS_LIMITED
// Lean (head-dim-limited) builds, compile checks never shipped: only fwd_extras_hdim128.cu's bf16
// kernel is compiled (CI time); this head dim's kExt kernels are a stub there, compiled inside
// fwd_hdim96.cu (no unit of its own: CI time), so this file is empty on its own.
#ifdef FMX_SM90_EXTRAS_IN_DENSE_UNIT
#include "sm90_api.h"
namespace fmx {
namespace sm90 {
template <>
int run_fwd_ext<96>(const Params &, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
}  // namespace sm90
}  // namespace fmx
#endif
#else
#include "fwd_kernel.cuh"

namespace fmx {
namespace sm90 {
template <>
int run_fwd_ext<96>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_fwd<FwdTraits<96, 128, 2, cutlass::half_t>, 1>(p, stream);
  return launch_fwd<FwdTraits<96, 128, 2, cutlass::bfloat16_t>, 1>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
#endif  // FMX_HEAD_DIMS_LIMITED
