// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 forward hd96, the run-10 default (128x32, flags 0).
#ifdef FMX_TUNING
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_fwd<96, 1>(const Params &p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<96, 128, 32, 4, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
