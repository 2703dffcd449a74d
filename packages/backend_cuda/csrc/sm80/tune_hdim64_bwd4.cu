// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 backward hd64, 128x128, S/dP 2x4 (the run-11 default) with a single Q/dO buffer.
#ifdef FMX_TUNING
#include "bwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_bwd<64, 4>(const Params &p, cudaStream_t stream) {
  return launch_bwd<BwdTraits<64, 128, 128, 8, 2, 4, 4, false, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
