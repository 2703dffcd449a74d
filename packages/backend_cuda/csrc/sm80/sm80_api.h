// Entry points of the sm80 (mma.sync) kernel family, one explicit specialization per head-dim
// translation unit (fwd_hdim*.cu, bwd_hdim*.cu). Return 0 or a cudaError_t value.
#pragma once
#include <cuda_runtime.h>
#include "../common/fmx_params.h"

namespace fmx {
namespace sm80 {
template <int D> int run_fwd(const Params &p, int dtype, cudaStream_t stream);
template <int D> int run_bwd(const Params &p, int dtype, cudaStream_t stream);
// Backward helpers (bwd_aux.cu): dsum = rowsum(dO * O) - dlse; dq = dq_accum * scale.
int run_bwd_preprocess(const Params &p, int dtype, cudaStream_t stream);
int run_bwd_convert_dq(const Params &p, int dtype, cudaStream_t stream);
}  // namespace sm80
}  // namespace fmx
