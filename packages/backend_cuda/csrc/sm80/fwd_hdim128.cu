// Forward instantiations for head_dim <= 128 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_FWD128_BN=...) for sweeps.
#ifndef FMX_FWD128_BM
#define FMX_FWD128_BM 128
#endif
#ifndef FMX_FWD128_BN
#define FMX_FWD128_BN 32
#endif
#ifndef FMX_FWD128_WARPS
#define FMX_FWD128_WARPS 4
#endif
// Variant flags (fwd_kernel.cuh); run 9 measured these against flags 0 (the run-8 kernels).
#ifndef FMX_FWD128_FLAGS
#define FMX_FWD128_FLAGS (kFwdSmemEpi | kFwdLazyRescale)
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Fwd128 = FwdTraits<128, FMX_FWD128_BM, FMX_FWD128_BN, FMX_FWD128_WARPS, T,
                          FMX_FWD128_FLAGS>;

FMX_FWD_EXTRAS(Fwd128)  // ALiBi / block-mask kernels: fwd_extras_hdim128.cu

#ifndef FMX_FWD_EXTRAS_UNIT
template <>
int run_fwd<128>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_TUNING
  if (dtype == 1) {
    switch (tune_choice("FMX_TUNE_FWD128")) {
      case 1: return tune_fwd<128, 1>(p, stream);
      case 2: return tune_fwd<128, 2>(p, stream);
      default: break;
    }
  }
#endif
  if (dtype == 0) return launch_fwd<Fwd128<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd128<cutlass::bfloat16_t>>(p, stream);
}
#endif
}  // namespace sm80
}  // namespace fmx
