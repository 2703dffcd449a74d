// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 forward hd64, the run-8 default (128x128, flags 0; run 9 measured it as the default).
#ifdef FMX_TUNING
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_fwd<64, 3>(const Params &p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<64, 128, 128, 4, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
