// Tuning-build-only variant (compiled empty unless -DFMX_TUNING; see sm80_api.h): bf16 forward hd64, 128x64 not pipelined, O through smem + lazy rescale + no K prefetch (the default without kFwdPipe).
#ifdef FMX_TUNING
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int tune_fwd<64, 3>(const Params &p, cudaStream_t stream) {
  return launch_fwd<FwdTraits<64, 128, 64, 4, cutlass::bfloat16_t, kFwdSmemEpi | kFwdLazyRescale | kFwdNoPrefetchS>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
#endif
