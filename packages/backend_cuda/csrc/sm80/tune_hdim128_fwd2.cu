// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 forward hd128, the run-8 default (128x32, flags 0).
#ifdef FMX_TUNING
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_fwd<128, 2>(const Params &p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<128, 128, 32, 4, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
