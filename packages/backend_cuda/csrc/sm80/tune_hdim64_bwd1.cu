// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 backward hd64, the run-10 default: 128x128, S/dP warps 4x2, dK/dV 4x2, dQ 4x2, Q/dO double buffered.
#ifdef FMX_TUNING
#include "bwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_bwd<64, 1>(const Params &p, cudaStream_t stream) {
  return launch_bwd<BwdTraits<64, 128, 128, 8, 4, 4, 4, true, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
