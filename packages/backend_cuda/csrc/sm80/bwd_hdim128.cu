// Backward instantiations for head_dim <= 128 (fp16 and bf16).
#include "bwd_kernel.cuh"
#include "sm80_api.h"

// Tile configuration; each field is overridable at build time (-DFMX_BWD128_DQ=...) for sweeps.
// BN: key rows per CTA; W: warps; SDP: warps along M for S/dP; DKV: warps along N for dK/dV;
// DQ: warps along M for dQ; DB: double-buffered Q/dO. BM: query rows per step (a multiple of kBwdBlockM = 64).
#ifndef FMX_BWD128_BM
#define FMX_BWD128_BM 64
#endif
#ifndef FMX_BWD128_BN
#define FMX_BWD128_BN 128
#endif
#ifndef FMX_BWD128_W
#define FMX_BWD128_W 8
#endif
#ifndef FMX_BWD128_SDP
#define FMX_BWD128_SDP 2
#endif
#ifndef FMX_BWD128_DKV
#define FMX_BWD128_DKV 4
#endif
#ifndef FMX_BWD128_DQ
#define FMX_BWD128_DQ 2
#endif
#ifndef FMX_BWD128_DB
#define FMX_BWD128_DB true
#endif

namespace fmx {
namespace sm80 {
template <typename T>
using Bwd128 = BwdTraits<128, FMX_BWD128_BM, FMX_BWD128_BN, FMX_BWD128_W, FMX_BWD128_SDP,
                          FMX_BWD128_DKV, FMX_BWD128_DQ, FMX_BWD128_DB, T>;

template <>
int run_bwd<128>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_TUNING
  if (dtype == 1) {
    switch (tune_choice("FMX_TUNE_BWD128")) {
      case 1: return tune_bwd<128, 1>(p, stream);
      case 2: return tune_bwd<128, 2>(p, stream);
      case 3: return tune_bwd<128, 3>(p, stream);
      default: break;
    }
  }
#endif
  if (dtype == 0) return launch_bwd<Bwd128<cutlass::half_t>>(p, stream);
  return launch_bwd<Bwd128<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm80
}  // namespace fmx
