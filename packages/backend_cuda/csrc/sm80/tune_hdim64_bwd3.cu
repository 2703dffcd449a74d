// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 backward hd64, the run-5 64x128 tiles (S/dP 2x4, dK/dV 4x2, dQ 2x4, Q/dO double buffered).
#ifdef FMX_TUNING
#include "bwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_bwd<64, 3>(const Params &p, cudaStream_t stream) {
  return launch_bwd<BwdTraits<64, 64, 128, 8, 2, 4, 2, true, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
