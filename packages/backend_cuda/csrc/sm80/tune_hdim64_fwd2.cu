// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 forward hd64, pipelined 128x64 (the run-11 default) with the one-k-step-ahead K prefetch.
#ifdef FMX_TUNING
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_fwd<64, 2>(const Params &p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<64, 128, 64, 4, cutlass::bfloat16_t, kFwdSmemEpi | kFwdLazyRescale | kFwdPipe>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
