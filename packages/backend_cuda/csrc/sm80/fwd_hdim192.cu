// Forward instantiations for head_dim <= 192 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_FWD192_BN=...) for sweeps.
#ifndef FMX_FWD192_BM
#define FMX_FWD192_BM 128
#endif
#ifndef FMX_FWD192_BN
#define FMX_FWD192_BN 64
#endif
#ifndef FMX_FWD192_WARPS
#define FMX_FWD192_WARPS 8
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Fwd192 = FwdTraits<192, FMX_FWD192_BM, FMX_FWD192_BN, FMX_FWD192_WARPS, T>;

FMX_FWD_EXTRAS(Fwd192)  // ALiBi / block-mask kernels: fwd_extras_hdim192.cu

#ifndef FMX_FWD_EXTRAS_UNIT
template <>
int run_fwd<192>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_fwd<Fwd192<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd192<cutlass::bfloat16_t>>(p, stream);
}
#endif
}  // namespace sm80
}  // namespace fmx
