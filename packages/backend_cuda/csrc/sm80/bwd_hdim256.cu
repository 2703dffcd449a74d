// Backward instantiations for head_dim <= 256 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_BWD256_DQ=...) for sweeps.
// BN: key rows per CTA; W: warps; SDP: warps along M for S/dP; DKV: warps along N for dK/dV;
// DQ: warps along M for dQ; DB: double-buffered Q/dO. (BM is fixed at kBwdBlockM = 64.)
#ifndef FMX_BWD256_BN
#define FMX_BWD256_BN 64
#endif
#ifndef FMX_BWD256_W
#define FMX_BWD256_W 8
#endif
#ifndef FMX_BWD256_SDP
#define FMX_BWD256_SDP 2
#endif
#ifndef FMX_BWD256_DKV
#define FMX_BWD256_DKV 4
#endif
#ifndef FMX_BWD256_DQ
#define FMX_BWD256_DQ 4
#endif
#ifndef FMX_BWD256_DB
#define FMX_BWD256_DB false
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Bwd256 = BwdTraits<256, kBwdBlockM, FMX_BWD256_BN, FMX_BWD256_W, FMX_BWD256_SDP,
                          FMX_BWD256_DKV, FMX_BWD256_DQ, FMX_BWD256_DB, T>;

template <>
int run_bwd<256>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_bwd<Bwd256<cutlass::half_t>>(p, stream);
  return launch_bwd<Bwd256<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
