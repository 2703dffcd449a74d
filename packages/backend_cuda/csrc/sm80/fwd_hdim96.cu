// Forward instantiations for head_dim <= 96 (fp16 and bf16).
#include "fwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_FWD96_BN=...) for sweeps.
#ifndef FMX_FWD96_BM
#define FMX_FWD96_BM 128
#endif
#ifndef FMX_FWD96_BN
#define FMX_FWD96_BN 32
#endif
#ifndef FMX_FWD96_WARPS
#define FMX_FWD96_WARPS 4
#endif
// Variant flags (fwd_kernel.cuh): the hd128 default's; run 11 measured them against flags 0.
#ifndef FMX_FWD96_FLAGS
#define FMX_FWD96_FLAGS (kFwdSmemEpi | kFwdLazyRescale)
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Fwd96 = FwdTraits<96, FMX_FWD96_BM, FMX_FWD96_BN, FMX_FWD96_WARPS, T, FMX_FWD96_FLAGS>;

FMX_FWD_EXTRAS(Fwd96)  // ALiBi / block-mask kernels: fwd_extras_hdim96.cu

#ifndef FMX_FWD_EXTRAS_UNIT
template <>
int run_fwd<96>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_TUNING
  if (dtype == 1 && tune_choice("FMX_TUNE_FWD96") == 1) return tune_fwd<96, 1>(p, stream);
#endif
  if (dtype == 0) return launch_fwd<Fwd96<cutlass::half_t>>(p, stream);
  return launch_fwd<Fwd96<cutlass::bfloat16_t>>(p, stream);
}
#endif
}  // namespace sm80
}  // namespace fmx
