// Forward instantiations for head_dim <= 256 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_FWD256_BN=...) for sweeps.
#ifndef FMX_FWD256_BM
#define FMX_FWD256_BM 128
#endif
#ifndef FMX_FWD256_BN
#define FMX_FWD256_BN 64
#endif
#ifndef FMX_FWD256_WARPS
#define FMX_FWD256_WARPS 8
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Fwd256 = FwdTraits<256, FMX_FWD256_BM, FMX_FWD256_BN, FMX_FWD256_WARPS, T>;

FMX_FWD_EXTRAS(Fwd256)  // ALiBi / block-mask kernels: fwd_extras_hdim256.cu

#ifndef FMX_FWD_EXTRAS_UNIT
template <>
int run_fwd<256>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_fwd<Fwd256<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd256<cutlass::bfloat16_t>>(p, stream);
}
#endif
}  // namespace sm80
}  // namespace fmx
