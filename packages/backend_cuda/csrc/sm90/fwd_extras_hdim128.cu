// sm90 forward with ALiBi slopes and/or a block mask (the kExt kernels of fwd_kernel.cuh) for
// the head_dim 128 instantiation, fp16 and bf16; sm_90a only (issue 15, session 11). A unit of its
// own so that the build compiles it beside the dense fwd_hdim128.cu (the dense kernels' code does
// not change). 128-key blocks whatever the dense unit's tile: block masks come in blocks of
// 128 k keys.
// Lean (head-dim-limited, compile-check) builds compile this file's bf16 kernel inside
// fwd_hdim128.cu (one compiler front end less: CI time), so it is empty on its own there.
#if !defined(FMX_HEAD_DIMS_LIMITED) || defined(FMX_SM90_EXTRAS_IN_DENSE_UNIT)
#include <cstdlib>

#include "fwd_persist.cuh"

namespace fmx {
namespace sm90 {
template <>
int run_fwd_ext<128>(const Params &p, int dtype, cudaStream_t stream) {
#ifndef FMX_HEAD_DIMS_LIMITED
  if (dtype == 0) return launch_fwd<FwdTraits<128, 128, 2, cutlass::half_t>, 1>(p, stream);
#else
  if (dtype == 0) return cudaErrorNotSupported;  // lean builds are compile checks, never shipped
#endif
#ifndef FMX_HEAD_DIMS_LIMITED
  // FLASHMUX_CUDA_SM90_EXT_AHEAD (read per call; bf16, this head dim only), for A/B: =1 the
  // kExt = 2 variant (list lookups one tile ahead, bitmask words loaded under the S GEMM), =2
  // kExt = 3 (lookups one tile ahead, words after the wait)
  const char *ahead = std::getenv("FLASHMUX_CUDA_SM90_EXT_AHEAD");
  if (ahead != nullptr && ahead[0] == '1')
    return launch_fwd<FwdTraits<128, 128, 2, cutlass::bfloat16_t>, 2>(p, stream);
  if (ahead != nullptr && ahead[0] == '2')
    return launch_fwd<FwdTraits<128, 128, 2, cutlass::bfloat16_t>, 3>(p, stream);
  // FLASHMUX_CUDA_SM90_EXT_PERSIST=1 (read per call; bf16, this head dim): the persistent
  // kernel's kExt = 1 (fwd_persist.cuh; the next tile's Q load and the epilogue overlap the
  // main loop: the fixed cost per query block of sparse masks), where O's strides suit TMA
  const char *persist = std::getenv("FLASHMUX_CUDA_SM90_EXT_PERSIST");
  if (persist != nullptr && persist[0] == '1' && o_tma_ok(p))
    return launch_fwd_persist<FwdTraits<128, 128, 2, cutlass::bfloat16_t>, 1>(p, stream);
#endif
  return launch_fwd<FwdTraits<128, 128, 2, cutlass::bfloat16_t>, 1>(p, stream);
}
}  // namespace sm90
}  // namespace fmx
#endif
