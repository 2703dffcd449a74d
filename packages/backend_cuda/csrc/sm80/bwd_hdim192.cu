// Backward instantiations for head_dim <= 192 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_BWD192_DQ=...) for sweeps.
// BN: key rows per CTA; W: warps; SDP: warps along M for S/dP; DKV: warps along N for dK/dV;
// DQ: warps along M for dQ; DB: double-buffered Q/dO. (BM is fixed at kBwdBlockM = 64.)
#ifndef FMX_BWD192_BN
#define FMX_BWD192_BN 64
#endif
#ifndef FMX_BWD192_W
#define FMX_BWD192_W 8
#endif
#ifndef FMX_BWD192_SDP
#define FMX_BWD192_SDP 2
#endif
#ifndef FMX_BWD192_DKV
#define FMX_BWD192_DKV 4
#endif
#ifndef FMX_BWD192_DQ
#define FMX_BWD192_DQ 4
#endif
#ifndef FMX_BWD192_DB
#define FMX_BWD192_DB false
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Bwd192 = BwdTraits<192, kBwdBlockM, FMX_BWD192_BN, FMX_BWD192_W, FMX_BWD192_SDP,
                          FMX_BWD192_DKV, FMX_BWD192_DQ, FMX_BWD192_DB, T>;

template <>
int run_bwd<192>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_bwd<Bwd192<cutlass::half_t>>(p, stream);
  return launch_bwd<Bwd192<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
