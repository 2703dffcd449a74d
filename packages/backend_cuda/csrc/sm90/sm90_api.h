// Entry points of the sm90 (Hopper: wgmma + TMA, warp-specialized) kernel family. Compiled for
// sm_90a only (build.py); the API file uses it when the device is compute capability 9.0 and
// fwd_supported() says yes, else the sm80 family runs. Return 0 or a cudaError_t value.
#pragma once
#include <cuda_runtime.h>
#include "../common/fmx_params.h"

namespace fmx {
namespace sm90 {
// The head-dim instantiation the sm90 forward would use for head_dim d (0: none).
inline int fwd_head_dim(int d) {
  if (d <= 64) return 64;
  if (d > 96 && d <= 128) return 128;
  return 0;
}

// nullptr when the sm90 forward runs this problem, else why not (the sm80 kernels run it).
// Mirrored in Python by flashmux_cuda.family (keep the two in step).
inline const char *fwd_unsupported(const Params &p) {
  if (p.cu_q != nullptr) return "varlen";
  if (p.softcap > 0.f) return "softcap";
  if (fwd_head_dim(p.d) == 0) return "head_dim";
  if (p.seqlen_k <= 0) return "empty keys";
  // TMA descriptors need positive strides that are multiples of 16 bytes (8 elements here).
  const int64_t s[] = {p.q_rs, p.q_hs, p.q_bs, p.k_rs, p.k_hs, p.k_bs, p.v_rs, p.v_hs, p.v_bs};
  for (int64_t x : s)
    if (x <= 0 || x % 8 != 0) return "strides";
  return nullptr;
}

template <int D> int run_fwd(const Params &p, int dtype, cudaStream_t stream);
}  // namespace sm90
}  // namespace fmx
