// Forward instantiations for head_dim <= 192 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

namespace fmx {
namespace sm80 {
template <>
int run_fwd<192>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_fwd<FwdTraits<192, 128, 64, 8, cutlass::half_t>>(p, stream);
  return launch_fwd<FwdTraits<192, 128, 64, 8, cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
