// Entry points of the sm90 (Hopper: wgmma + TMA, warp-specialized) kernel family. Compiled for
// sm_90a only (build.py); the API file uses it when the device is compute capability 9.0 and
// fwd_supported() says yes, else the sm80 family runs. Return 0 or a cudaError_t value.
#pragma once
#include <cuda_runtime.h>
#include <cstdlib>
#include "../common/fmx_params.h"

namespace fmx {
namespace sm90 {
// FLASHMUX_CUDA_SM90_PAD96=1 (session 8 experiment, read per call): the forward runs head_dim
// 65..96 on the 128 instantiation (TMA zero-fills the padding: 4/3 of the MMA work), to be
// compared with the 96 instantiation (session 10) in one process.
inline bool sm90_pad96() {
  const char *e = std::getenv("FLASHMUX_CUDA_SM90_PAD96");
  return e != nullptr && e[0] == '1';
}

// The head-dim instantiation the sm90 forward would use for head_dim d (0: none). 65..96: the
// 96 instantiation (64-byte swizzled rows; session 10), or 128 under sm90_pad96().
inline int fwd_head_dim(int d) {
  if (d <= 64) return 64;
  if (d <= 96) return sm90_pad96() ? 128 : 96;
  if (d <= 128) return 128;
  if (d > 128 && d <= 192) return 192;
  if (d > 192 && d <= 256) return 256;
  return 0;
}

// The head dim the kernels are picked by: max(D, Dv) (Dv != D: the smaller one is zero-filled
// by TMA's out-of-bounds fill up to the instantiation, as head dims below it always were).
inline int kernel_dim(const Params &p) { return p.d > p.d_v ? p.d : p.d_v; }

// nullptr when the sm90 forward runs this problem, else why not (the sm80 kernels run it).
// Mirrored in Python by flashmux_cuda.family (keep the two in step).
inline const char *fwd_unsupported(const Params &p) {
  if (p.cu_q != nullptr) return "varlen";
  if (p.softcap > 0.f) return "softcap";
  if (fwd_head_dim(kernel_dim(p)) == 0) return "head_dim";
  if (p.seqlen_k <= 0) return "empty keys";
  // TMA descriptors need positive strides that are multiples of 16 bytes (8 elements here).
  const int64_t s[] = {p.q_rs, p.q_hs, p.q_bs, p.k_rs, p.k_hs, p.k_bs, p.v_rs, p.v_hs, p.v_bs};
  for (int64_t x : s)
    if (x <= 0 || x % 8 != 0) return "strides";
  return nullptr;
}

template <int D> int run_fwd(const Params &p, int dtype, cudaStream_t stream);

// ---- ALiBi slopes and block masks in the forward (issue 15, session 11) ----------------------
// The kExt kernels of fwd_extras_hdim{64,96,128}.cu (128-key blocks: a mask block of 128 k keys
// is k kernel blocks) run calls with ALiBi slopes and/or a block mask at those instantiations;
// nullptr when they run this problem (or it has neither), else why not (the sm80 forward runs
// it). FLASHMUX_CUDA_SM90_EXT=0 (read per call) sends such calls to the sm80 family
// (comparisons in one process). The backward of these calls is the sm80 family's
// (api: use_sm90_bwd). Mirrored in Python by flashmux_cuda.family.
inline const char *fwd_ext_unsupported(const Params &p) {
  if (p.alibi == nullptr && p.bm_qnf == nullptr) return nullptr;
  const char *e = std::getenv("FLASHMUX_CUDA_SM90_EXT");
  if (e != nullptr && e[0] == '0') return "FLASHMUX_CUDA_SM90_EXT=0";
  const int d = fwd_head_dim(kernel_dim(p));
  if (d != 64 && d != 96 && d != 128) return "head_dim";
  if (p.bm_qnf != nullptr && (p.bm_block <= 0 || p.bm_block % 128 != 0)) return "mask block";
  return nullptr;
}
template <int D> int run_fwd_ext(const Params &p, int dtype, cudaStream_t stream);

// ---- backward (bwd_kernel.cuh, bwd_hdim*.cu, bwd_aux.cu) ------------------------------------
// head_dim <= 64 and 97..128 (192 and 256 have an sm90 forward only: the sm80 backward follows;
// so does 65..96 under sm90_pad96()).
inline int bwd_head_dim(int d) {
  const int f = fwd_head_dim(d);
  return f <= 128 && (d <= 64 || d > 96) ? f : 0;
}

// nullptr when the sm90 backward runs this problem, else why not (the sm80 backward runs it).
// The API file also applies the forward's call-level conditions (use_sm90_fwd). Mirrored in
// Python by flashmux_cuda.family.backward_family.
inline const char *bwd_unsupported(const Params &p) {
  if (const char *why = fwd_unsupported(p)) return why;
  if (bwd_head_dim(kernel_dim(p)) == 0) return "head_dim";
  // deterministic: the kDet kernels (dQ in key-block order; session 10)
  const int64_t s[] = {p.do_rs, p.do_hs, p.do_bs};
  for (int64_t x : s)
    if (x <= 0 || x % 8 != 0) return "strides";
  return nullptr;
}

// Query rows of the padded lse2/dsum rows the sm90 backward reads (a multiple of every BM).
inline int bwd_sq_pad(int seqlen_q) { return (seqlen_q + 127) / 128 * 128; }
// Workspace floats the sm90 backward needs beside the sm80 layout: lse2 and dsum, each
// (batch, hq, bwd_sq_pad(seqlen_q)).
inline size_t bwd_extra_floats(int batch, int hq, int seqlen_q) {
  return 2 * (size_t)batch * (size_t)hq * (size_t)bwd_sq_pad(seqlen_q);
}

// lse2 = lse * log2(e) (+inf where lse = -inf and past seqlen_q), dsum = rowsum(dO * O) - dlse
// (0 past seqlen_q), both (batch, hq, sq_pad).
int run_bwd_preprocess(const Params &p, float *lse2, float *dsum, int dtype, cudaStream_t stream);
// The main backward: dK, dV written, dQ added into p.dq_accum (the sm80 convert kernel follows).
template <int D>
int run_bwd(const Params &p, const float *lse2, const float *dsum, int dtype, cudaStream_t stream);
}  // namespace sm90
}  // namespace fmx
