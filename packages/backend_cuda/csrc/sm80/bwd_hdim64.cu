// Backward instantiations for head_dim <= 64 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_BWD64_DQ=...) for sweeps.
// BN: key rows per CTA; W: warps; SDP: warps along M for S/dP; DKV: warps along N for dK/dV;
// DQ: warps along M for dQ; DB: double-buffered Q/dO. BM: query rows per step (a multiple of kBwdBlockM = 64).
#ifndef FMX_BWD64_BM
#define FMX_BWD64_BM 128
#endif
#ifndef FMX_BWD64_BN
#define FMX_BWD64_BN 128
#endif
#ifndef FMX_BWD64_W
#define FMX_BWD64_W 8
#endif
#ifndef FMX_BWD64_SDP
#define FMX_BWD64_SDP 2  // run 11: 2x4 S/dP warps beat 4x2 by 0.01-0.03 (f+b ratio)
#endif
#ifndef FMX_BWD64_DKV
#define FMX_BWD64_DKV 4
#endif
#ifndef FMX_BWD64_DQ
#define FMX_BWD64_DQ 4
#endif
#ifndef FMX_BWD64_DB
#define FMX_BWD64_DB true
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Bwd64 = BwdTraits<64, FMX_BWD64_BM, FMX_BWD64_BN, FMX_BWD64_W, FMX_BWD64_SDP,
                          FMX_BWD64_DKV, FMX_BWD64_DQ, FMX_BWD64_DB, T>;

template <>
int run_bwd<64>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_TUNING
  if (dtype == 1) {
    switch (tune_choice("FMX_TUNE_BWD64")) {
      case 1: return tune_bwd<64, 1>(p, stream);
      case 2: return tune_bwd<64, 2>(p, stream);
      case 3: return tune_bwd<64, 3>(p, stream);
      case 4: return tune_bwd<64, 4>(p, stream);
      default: break;
    }
  }
#endif
  if (dtype == 0) return launch_bwd<Bwd64<cutlass::half_t>>(p, stream);
  return launch_bwd<Bwd64<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
