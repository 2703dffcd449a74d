// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 backward hd128, 64x128 with S/dP warps 4x2 (default 2x4).
#ifdef FMX_TUNING
#include "bwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_bwd<128, 1>(const Params &p, cudaStream_t stream) {
  return launch_bwd<BwdTraits<128, 64, 128, 8, 4, 4, 2, true, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
