// Forward instantiations for head_dim <= 64 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_FWD64_BN=...) for sweeps.
#ifndef FMX_FWD64_BM
#define FMX_FWD64_BM 128
#endif
#ifndef FMX_FWD64_BN
#define FMX_FWD64_BN 64
#endif
#ifndef FMX_FWD64_WARPS
#define FMX_FWD64_WARPS 4
#endif
// Variant flags (fwd_kernel.cuh); run 9 measured them against flags 0 (the run-8 kernels), run 11
// the pipelined 128x64 kernel (kFwdPipe, no spills) against run 10's 128x128 (196 B spills).
#ifndef FMX_FWD64_FLAGS
#define FMX_FWD64_FLAGS (kFwdSmemEpi | kFwdLazyRescale | kFwdNoPrefetchS | kFwdPipe)
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Fwd64 = FwdTraits<64, FMX_FWD64_BM, FMX_FWD64_BN, FMX_FWD64_WARPS, T,
                          FMX_FWD64_FLAGS>;

FMX_FWD_EXTRAS(Fwd64)  // ALiBi / block-mask kernels: fwd_extras_hdim64.cu

#ifndef FMX_FWD_EXTRAS_UNIT
template <>
int run_fwd<64>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_TUNING
  if (dtype == 1) {
    switch (tune_choice("FMX_TUNE_FWD64")) {
      case 1: return tune_fwd<64, 1>(p, stream);
      case 2: return tune_fwd<64, 2>(p, stream);
      case 3: return tune_fwd<64, 3>(p, stream);
      case 4: return tune_fwd<64, 4>(p, stream);
      default: break;
    }
  }
#endif
  if (dtype == 0) return launch_fwd<Fwd64<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd64<cutlass::bfloat16_t>>(p, stream);
}
#endif
}  // namespace sm80
}  // namespace fmx
