// Entry points of the sm80 (mma.sync) kernel family, one explicit specialization per head-dim
// translation unit (fwd_hdim*.cu, bwd_hdim*.cu). Return 0 or a cudaError_t value.
#pragma once
#include <cuda_runtime.h>
#include "../common/fmx_params.h"

namespace fmx {
namespace sm80 {
template <int D> int run_fwd(const Params &p, int dtype, cudaStream_t stream);
template <int D> int run_bwd(const Params &p, int dtype, cudaStream_t stream);
// Backward helpers (bwd_aux.cu): dsum = rowsum(dO * O) - dlse; dq = dq_accum (already scaled).
int run_bwd_preprocess(const Params &p, int dtype, cudaStream_t stream);
int run_bwd_convert_dq(const Params &p, int dtype, cudaStream_t stream);

#ifdef FMX_TUNING
// Tuning builds only (gpu_kernel_check.sh builds with -DFMX_TUNING): extra bf16 tile variants,
// one per tune_hdim*.cu, picked at run time by $FMX_TUNE_<FWD|BWD><d> (0 or unset: default).
int tune_choice(const char *env_name);
template <int D, int V> int tune_fwd(const Params &p, cudaStream_t stream);
template <int D, int V> int tune_bwd(const Params &p, cudaStream_t stream);
#endif
}  // namespace sm80
}  // namespace fmx
