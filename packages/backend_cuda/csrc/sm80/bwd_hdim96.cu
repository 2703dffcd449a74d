// Backward instantiations for head_dim <= 96 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_BWD96_DQ=...) for sweeps.
// BN: key rows per CTA; W: warps; SDP: warps along M for S/dP; DKV: warps along N for dK/dV;
// DQ: warps along M for dQ; DB: double-buffered Q/dO. (BM is fixed at kBwdBlockM = 64.)
#ifndef FMX_BWD96_BN
#define FMX_BWD96_BN 128
#endif
#ifndef FMX_BWD96_W
#define FMX_BWD96_W 8
#endif
#ifndef FMX_BWD96_SDP
#define FMX_BWD96_SDP 2
#endif
#ifndef FMX_BWD96_DKV
#define FMX_BWD96_DKV 4
#endif
#ifndef FMX_BWD96_DQ
#define FMX_BWD96_DQ 4
#endif
#ifndef FMX_BWD96_DB
#define FMX_BWD96_DB true
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Bwd96 = BwdTraits<96, kBwdBlockM, FMX_BWD96_BN, FMX_BWD96_W, FMX_BWD96_SDP,
                          FMX_BWD96_DKV, FMX_BWD96_DQ, FMX_BWD96_DB, T>;

template <>
int run_bwd<96>(const Params &p, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_bwd<Bwd96<cutlass::half_t>>(p, stream);
  return launch_bwd<Bwd96<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
