// Backward instantiations for head_dim <= 96 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int run_bwd<96>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_bwd<BwdTraits<96, 64, 128, 8, 2, 4, 4, true, cutlass::half_t>>(p, stream);
  return launch_bwd<BwdTraits<96, 64, 128, 8, 2, 4, 4, true, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
