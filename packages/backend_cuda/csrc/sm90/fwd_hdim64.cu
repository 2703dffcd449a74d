// sm90 forward instantiations for head_dim <= 64 (fp16 and bf16); sm_90a only.
#include <cstdlib>

#include "fwd_persist.cuh"

// Tile configuration, overridable at build time (-DFMX_SM90_FWD64_BN=...) for sweeps.
#ifndef FMX_SM90_FWD64_BN
#define FMX_SM90_FWD64_BN 128
#endif
#ifndef FMX_SM90_FWD64_STAGES
#define FMX_SM90_FWD64_STAGES 2
#endif

// Session 10 (H200, call s10b): bf16 with 192-key blocks, one CTA per tile, is the default
// where seqlen_k >= 8192 (+2.5-4.6% there against this unit's 128-key kernel measured later in
// the same process, -5-11% at 2k); FMX_TUNE_SM90=5 forces it, =0 forces the 128-key blocks.
// 3 K/V stages (=7) measured flat to -5% and dropped.
#ifndef FMX_SM90_FWD64_LONG_KEYS
#define FMX_SM90_FWD64_LONG_KEYS 8192
#endif
// Head-dim-limited builds (the lean CI compile, never shipped: they cannot load every head dim)
// leave the 192-key kernel out (~8 s of nvcc CPU time); FwdTraits is the same template.
#ifndef FMX_SM90_FWD64_LONG
#ifdef FMX_HEAD_DIMS_LIMITED
#define FMX_SM90_FWD64_LONG 0
#else
#define FMX_SM90_FWD64_LONG 1
#endif
#endif

namespace fmx {
namespace sm90 {
template <typename T>
using Fwd64 = FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, T>;

template <>
int run_fwd<64>(const Params &p, int dtype, cudaStream_t stream) {
#ifdef FMX_SM90_TUNING
  // -DFMX_SM90_TUNING builds: FMX_TUNE_SM90=1 runs the sequential variant (no ping-pong, no overlap).
  const char *tune = std::getenv("FMX_TUNE_SM90");
  if (tune != nullptr && tune[0] == '1') {
    if (dtype == 0) return launch_fwd<FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, cutlass::half_t, false>>(p, stream);
    return launch_fwd<FwdTraits<64, FMX_SM90_FWD64_BN, FMX_SM90_FWD64_STAGES, cutlass::bfloat16_t, false>>(p, stream);
  }
#endif
#if FMX_SM90_FWD64_LONG
  if (dtype == 1) {
    const char *v = std::getenv("FMX_TUNE_SM90");
    const bool long_keys = v != nullptr ? v[0] == '5' : p.seqlen_k >= FMX_SM90_FWD64_LONG_KEYS;
    const bool tile_kernel = v != nullptr || !sm90_fwd_persist(p, false, false);
    if (long_keys && tile_kernel)
      return launch_fwd<FwdTraits<64, 192, 2, cutlass::bfloat16_t>>(p, stream);
  }
#endif
  // bf16: FLASHMUX_CUDA_SM90_FWD=persist runs the persistent kernel (fwd_persist.cuh)
#ifndef FMX_HEAD_DIMS_LIMITED
  if (dtype == 0) return launch_fwd<Fwd64<cutlass::half_t>>(p, stream);
#else
  // Lean (head-dim-limited) builds are compile checks, never shipped: the fp16 kernel (the same
  // template as bf16's) is left out to pay for fwd_extras_hdim128.cu's bf16 kExt kernel in the
  // CI compile (session 11); full builds compile both.
  if (dtype == 0) return cudaErrorNotSupported;
#endif
  return launch_fwd_sched<Fwd64<cutlass::bfloat16_t>>(p, stream);
}
}  // namespace sm90
}  // namespace fmx

#ifdef FMX_HEAD_DIMS_LIMITED
// Lean (head-dim-limited) builds, the CI compile check: fwd_extras_hdim64.cu's stub is compiled in
// this unit (no unit of its own; session 11).
#define FMX_SM90_EXTRAS_IN_DENSE_UNIT
#include "fwd_extras_hdim64.cu"
#endif
