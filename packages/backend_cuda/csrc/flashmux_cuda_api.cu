// The C ABI of libflashmux_cuda: argument validation, workspace layout and dispatch to the
// kernel families (sm80 = mma.sync FlashAttention-2, runs on sm80..sm90; a Hopper family can be
// selected here by compute capability later).
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cuda_runtime.h>

#include "flashmux_cuda.h"
#include "common/fmx_params.h"
#include "sm80/sm80_api.h"
#ifdef FMX_HAS_SM90
#include "sm90/sm90_api.h"  // built when the arch list has a 9.x (build.py); sm_90a code
#endif
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include "decode/decode_api.h"

namespace {

thread_local char g_error[1024] = "";

int fail(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

int cuda_fail(int err, const char *what) {
  return fail(FMX_ERR_CUDA, "%s: CUDA error %d (%s)", what, err,
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

int padded_head_dim(int d) {
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  if (d <= 192) return 192;
  if (d <= 256) return 256;
  return 0;
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int check_tensor(const char *name, const void *ptr, const int64_t *stride, bool varlen,
                 bool required) {
  if (ptr == nullptr) {
    if (required) return fail(FMX_ERR_INVALID_ARGUMENT, "%s is NULL", name);
    return FMX_OK;
  }
  if (!aligned16(ptr))
    return fail(FMX_ERR_UNSUPPORTED, "%s must be 16-byte aligned (got %p)", name, ptr);
  for (int i = varlen ? 1 : 0; i < 3; ++i) {
    if (stride[i] < 0 || stride[i] % 8 != 0)
      return fail(FMX_ERR_UNSUPPORTED,
                  "%s stride[%d] = %lld must be a non-negative multiple of 8 elements", name, i,
                  (long long)stride[i]);
  }
  return FMX_OK;
}

void copy_strides(const int64_t *s, int64_t &bs, int64_t &rs, int64_t &hs) {
  bs = s[0];
  rs = s[1];
  hs = s[2];
}

// Shared validation of the forward fields; fills p. Returns FMX_OK or an error code.
int build_params(const FmxAttnArgs *a, fmx::Params &p, bool backward) {
  if (a == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "args is NULL");
  if (a->dtype != FMX_DTYPE_F16 && a->dtype != FMX_DTYPE_BF16)
    return fail(FMX_ERR_INVALID_ARGUMENT, "dtype must be FMX_DTYPE_F16 (0) or FMX_DTYPE_BF16 (1), got %d",
                a->dtype);
  if (a->batch < 0 || a->seqlen_q < 0 || a->seqlen_k < 0 || a->total_q < 0 || a->total_k < 0)
    return fail(FMX_ERR_INVALID_ARGUMENT,
                "batch/seqlen/total must be >= 0 (batch=%d seqlen_q=%d seqlen_k=%d total_q=%d total_k=%d)",
                a->batch, a->seqlen_q, a->seqlen_k, a->total_q, a->total_k);
  if (a->batch > 65535) return fail(FMX_ERR_UNSUPPORTED, "batch = %d exceeds 65535", a->batch);
  if (a->heads_q <= 0 || a->heads_kv <= 0 || a->heads_q % a->heads_kv != 0)
    return fail(FMX_ERR_INVALID_ARGUMENT, "heads_q (%d) must be a positive multiple of heads_kv (%d)",
                a->heads_q, a->heads_kv);
  if (a->heads_q > 65535) return fail(FMX_ERR_UNSUPPORTED, "heads_q = %d exceeds 65535", a->heads_q);
  if (a->head_dim <= 0) return fail(FMX_ERR_INVALID_ARGUMENT, "head_dim must be > 0, got %d", a->head_dim);
  if (a->head_dim > 256)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim %d > 256 is not supported", a->head_dim);
  if (a->head_dim % 8 != 0)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim %d must be a multiple of 8", a->head_dim);
  // head_dim_v (Dv) may differ from head_dim: the kernels of max(D, Dv) run it (fmx_params.h).
  if (a->head_dim_v <= 0)
    return fail(FMX_ERR_INVALID_ARGUMENT, "head_dim_v must be > 0, got %d", a->head_dim_v);
  if (a->head_dim_v > 256)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim_v %d > 256 is not supported", a->head_dim_v);
  if (a->head_dim_v % 8 != 0)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim_v %d must be a multiple of 8", a->head_dim_v);
  if (!std::isfinite(a->scale)) return fail(FMX_ERR_INVALID_ARGUMENT, "scale must be finite");
  // The forward takes row maxima of the unscaled scores and masks them with -inf: both assume a
  // positive scale (with softcap the capped scores are already signed correctly).
  if (!(a->scale > 0.f) && !(a->softcap > 0.f))
    return fail(FMX_ERR_UNSUPPORTED, "scale <= 0 (without softcap) is not supported");
  if (!(a->softcap >= 0.f) || !std::isfinite(a->softcap))
    return fail(FMX_ERR_INVALID_ARGUMENT, "softcap must be finite and >= 0 (0 = off)");
  if (a->window_left < -1 || a->window_right < -1)
    return fail(FMX_ERR_INVALID_ARGUMENT, "window_left/right must be >= -1 (got %d, %d)",
                a->window_left, a->window_right);
  if (a->causal && a->window_right != 0)
    return fail(FMX_ERR_INVALID_ARGUMENT,
                "causal=1 requires window_right == 0 (causal is folded into window_right), got %d",
                a->window_right);
  const bool varlen = a->cu_seqlens_q != nullptr;
  if ((a->cu_seqlens_k != nullptr) != varlen)
    return fail(FMX_ERR_INVALID_ARGUMENT, "cu_seqlens_q and cu_seqlens_k must both be set or both NULL");
  if (!varlen) {
    if ((int64_t)a->batch * a->seqlen_q != a->total_q || (int64_t)a->batch * a->seqlen_k != a->total_k)
      return fail(FMX_ERR_INVALID_ARGUMENT,
                  "padded layout needs total_q = batch*seqlen_q and total_k = batch*seqlen_k");
  }
  int rc;
  if ((rc = check_tensor("q", a->q, a->q_stride, varlen, true))) return rc;
  if ((rc = check_tensor("k", a->k, a->k_stride, varlen, a->total_k > 0))) return rc;
  if ((rc = check_tensor("v", a->v, a->v_stride, varlen, a->total_k > 0))) return rc;
  if ((rc = check_tensor("out", a->out, a->out_stride, varlen, true))) return rc;
  if (a->lse == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "lse is NULL");

  p = fmx::Params{};
  p.q = a->q; p.k = a->k; p.v = a->v; p.o = a->out; p.lse = a->lse;
  copy_strides(a->q_stride, p.q_bs, p.q_rs, p.q_hs);
  copy_strides(a->k_stride, p.k_bs, p.k_rs, p.k_hs);
  copy_strides(a->v_stride, p.v_bs, p.v_rs, p.v_hs);
  copy_strides(a->out_stride, p.o_bs, p.o_rs, p.o_hs);
  p.cu_q = a->cu_seqlens_q; p.cu_k = a->cu_seqlens_k;
  p.batch = a->batch; p.seqlen_q = a->seqlen_q; p.seqlen_k = a->seqlen_k;
  p.total_q = a->total_q; p.total_k = a->total_k;
  p.hq = a->heads_q; p.hkv = a->heads_kv; p.group = a->heads_q / a->heads_kv; p.d = a->head_dim;
  p.d_v = a->head_dim_v;
  p.scale = a->scale;
  p.softcap = a->softcap;
  const float log2e = 1.4426950408889634f;
  p.score_log2 = a->softcap > 0.f ? log2e : a->scale * log2e;
  p.score_nat = a->softcap > 0.f ? 1.f : a->scale;
  p.window_left = a->window_left;
  p.window_right = a->window_right;
  p.num_m_blocks_bwd = (a->seqlen_q + fmx::kBwdBlockM - 1) / fmx::kBwdBlockM;
  p.deterministic = a->deterministic ? 1 : 0;

  if (backward) {
    if ((rc = check_tensor("dout", a->dout, a->dout_stride, varlen, true))) return rc;
    if ((rc = check_tensor("dq", a->dq, a->dq_stride, varlen, true))) return rc;
    if ((rc = check_tensor("dk", a->dk, a->dk_stride, varlen, a->total_k > 0))) return rc;
    if ((rc = check_tensor("dv", a->dv, a->dv_stride, varlen, a->total_k > 0))) return rc;
    p.dout = a->dout; p.dlse = a->dlse; p.dq = a->dq; p.dk = a->dk; p.dv = a->dv;
    copy_strides(a->dout_stride, p.do_bs, p.do_rs, p.do_hs);
    copy_strides(a->dq_stride, p.dq_bs, p.dq_rs, p.dq_hs);
    copy_strides(a->dk_stride, p.dk_bs, p.dk_rs, p.dk_hs);
    copy_strides(a->dv_stride, p.dv_bs, p.dv_rs, p.dv_hs);
  }
  return FMX_OK;
}

// The optional operands (FmxAttnExt, struct_size bytes of it) into p.
int apply_ext(const FmxAttnArgs *a, const FmxAttnExt *ext, fmx::Params &p) {
  if (ext == nullptr) return FMX_OK;
  if (ext->struct_size < (int64_t)sizeof(int64_t))
    return fail(FMX_ERR_INVALID_ARGUMENT, "ext->struct_size = %lld is too small",
                (long long)ext->struct_size);
  FmxAttnExt e;
  std::memset(&e, 0, sizeof(e));
  std::memcpy(&e, ext, std::min<size_t>(sizeof(e), (size_t)ext->struct_size));
  if (e.alibi_slopes != nullptr) {
    if ((reinterpret_cast<uintptr_t>(e.alibi_slopes) & 3) != 0)
      return fail(FMX_ERR_INVALID_ARGUMENT, "alibi_slopes must be 4-byte aligned float32");
    if (e.alibi_stride != 0 && e.alibi_stride < a->heads_q)
      return fail(FMX_ERR_INVALID_ARGUMENT,
                  "alibi_stride must be 0 ((heads_q,) slopes) or >= heads_q = %d, got %lld",
                  a->heads_q, (long long)e.alibi_stride);
    p.alibi = e.alibi_slopes;
    p.alibi_bs = e.alibi_stride;
  }
  if (e.q_num_full != nullptr) {  // block mask
    if (a->cu_seqlens_q != nullptr)
      return fail(FMX_ERR_UNSUPPORTED, "block masks with cu_seqlens are not supported");
    if (!e.q_full_idx || !e.q_num_part || !e.q_part_idx || !e.tile_id || !e.bits)
      return fail(FMX_ERR_INVALID_ARGUMENT, "block mask: every array pointer must be set");
    if (e.mask_block < 128 || e.mask_block % 128 != 0)
      return fail(FMX_ERR_UNSUPPORTED,
                  "block mask: block_size %d is not a multiple of 128 (the kernels' query tile)",
                  e.mask_block);
    const int nq = (a->seqlen_q + e.mask_block - 1) / e.mask_block;
    const int nk = (a->seqlen_k + e.mask_block - 1) / e.mask_block;
    if (e.mask_nq != nq || e.mask_nk != nk)
      return fail(FMX_ERR_INVALID_ARGUMENT,
                  "block mask: %d x %d blocks, the call needs %d x %d (block %d)", e.mask_nq,
                  e.mask_nk, nq, nk, e.mask_block);
    if ((e.mask_batch != 1 && e.mask_batch != a->batch) ||
        (e.mask_heads != 1 && e.mask_heads != a->heads_q))
      return fail(FMX_ERR_INVALID_ARGUMENT,
                  "block mask: leading dims (%d, %d) must be 1 or (batch %d, heads_q %d)",
                  e.mask_batch, e.mask_heads, a->batch, a->heads_q);
    p.bm_qnf = e.q_num_full; p.bm_qfi = e.q_full_idx; p.bm_qnp = e.q_num_part;
    p.bm_qpi = e.q_part_idx; p.bm_tile = e.tile_id; p.bm_bits = e.bits;
    p.bm_knf = e.kv_num_full; p.bm_kfi = e.kv_full_idx; p.bm_knp = e.kv_num_part;
    p.bm_kpi = e.kv_part_idx;
    p.bm_block = e.mask_block; p.bm_b = e.mask_batch; p.bm_h = e.mask_heads;
    p.bm_nq = nq; p.bm_nk = nk;
  }
  return FMX_OK;
}

struct WorkspaceLayout {
  size_t dq_accum, dsum, sem, total;
  size_t sm90 = 0;  // the sm90 backward's padded lse2 and dsum rows (after the sm80 layout)
};

WorkspaceLayout workspace_layout(const FmxAttnArgs *a) {
  WorkspaceLayout w;
  const size_t tq = (size_t)(a->total_q > 0 ? a->total_q : 0);
  const size_t hq = (size_t)(a->heads_q > 0 ? a->heads_q : 0);
  const size_t d = (size_t)(a->head_dim > 0 ? a->head_dim : 0);
  const size_t mb = (size_t)((a->seqlen_q > 0 ? a->seqlen_q : 0) + fmx::kBwdBlockM - 1) / fmx::kBwdBlockM;
  const size_t b = (size_t)(a->batch > 0 ? a->batch : 0);
  w.dq_accum = 0;
  w.dsum = align_up((tq + 7) / 8 * 8 * hq * d * sizeof(float));  // dq_accum rows padded to 8
  w.sem = w.dsum + align_up(tq * hq * sizeof(float));
  w.total = w.sem + align_up(b * hq * mb * sizeof(int32_t));
#ifdef FMX_HAS_SM90
  // Sized from shapes alone (JAX asks at trace time, before the device is known).
  w.sm90 = w.total;
  const int sq = a->seqlen_q > 0 ? a->seqlen_q : 0;
  w.total = w.sm90 + align_up(fmx::sm90::bwd_extra_floats((int)b, (int)hq, sq) * sizeof(float));
#endif
  return w;
}

// The forward's kernel family: sm90 (wgmma/TMA) on compute capability 9.0 when it is built in
// and has the problem (sm90::fwd_unsupported), unless FLASHMUX_CUDA_FAMILY=sm80; else sm80.
// Mirrored by flashmux_cuda.family.forward_family (keep the two in step).
bool use_sm90_fwd(const fmx::Params &p, int cc) {
#ifdef FMX_HAS_SM90
  if (cc != 90) return false;
  // ALiBi slopes / block masks: the kExt kernels (session 11) where they have the problem
  if (fmx::sm90::fwd_ext_unsupported(p) != nullptr) return false;
  const char *env = std::getenv("FLASHMUX_CUDA_FAMILY");
  if (env != nullptr && std::strcmp(env, "sm80") == 0) return false;
  return fmx::sm90::fwd_unsupported(p) == nullptr;
#else
  (void)p;
  (void)cc;
  return false;
#endif
}

// The backward's kernel family: sm90 where the sm90 forward would run (use_sm90_fwd: device,
// FLASHMUX_CUDA_FAMILY, the forward's conditions) and sm90::bwd_unsupported has no objection
// (deterministic, dO strides); else sm80. Mirrored by flashmux_cuda.family.backward_family.
bool use_sm90_bwd(const fmx::Params &p, int cc) {
#ifdef FMX_HAS_SM90
  if (p.alibi != nullptr || p.bm_qnf != nullptr) return false;  // the sm80 backward has them
  if (!use_sm90_fwd(p, cc)) return false;
  const char *env = std::getenv("FLASHMUX_CUDA_BWD_FAMILY");  // sm80: the sm80 backward only
  if (env != nullptr && std::strcmp(env, "sm80") == 0) return false;
  return fmx::sm90::bwd_unsupported(p) == nullptr;
#else
  (void)p;
  (void)cc;
  return false;
#endif
}

int dispatch_fwd(const fmx::Params &p, int dtype, cudaStream_t s, int cc) {
#ifdef FMX_HAS_SM90
  if (use_sm90_fwd(p, cc) && (p.alibi != nullptr || p.bm_qnf != nullptr)) {
    switch (fmx::sm90::fwd_head_dim(fmx::sm90::kernel_dim(p))) {  // fwd_ext_unsupported's set
      case 64: return fmx::sm90::run_fwd_ext<64>(p, dtype, s);
      case 96: return fmx::sm90::run_fwd_ext<96>(p, dtype, s);
      case 128: return fmx::sm90::run_fwd_ext<128>(p, dtype, s);
    }
  } else if (use_sm90_fwd(p, cc)) {
    switch (fmx::sm90::fwd_head_dim(fmx::sm90::kernel_dim(p))) {
      case 64: return fmx::sm90::run_fwd<64>(p, dtype, s);
      case 96: return fmx::sm90::run_fwd<96>(p, dtype, s);
      case 128: return fmx::sm90::run_fwd<128>(p, dtype, s);
      case 192: return fmx::sm90::run_fwd<192>(p, dtype, s);
      case 256: return fmx::sm90::run_fwd<256>(p, dtype, s);
    }
  }
#else
  (void)cc;
#endif
  switch (padded_head_dim(std::max(p.d, p.d_v))) {  // Dv != D: the larger one's kernels
    case 64: return fmx::sm80::run_fwd<64>(p, dtype, s);
    case 96: return fmx::sm80::run_fwd<96>(p, dtype, s);
    case 128: return fmx::sm80::run_fwd<128>(p, dtype, s);
    case 192: return fmx::sm80::run_fwd<192>(p, dtype, s);
    case 256: return fmx::sm80::run_fwd<256>(p, dtype, s);
  }
  return -1;
}

int dispatch_bwd(const fmx::Params &p, int dtype, cudaStream_t s) {
  switch (padded_head_dim(std::max(p.d, p.d_v))) {
    case 64: return fmx::sm80::run_bwd<64>(p, dtype, s);
    case 96: return fmx::sm80::run_bwd<96>(p, dtype, s);
    case 128: return fmx::sm80::run_bwd<128>(p, dtype, s);
    case 192: return fmx::sm80::run_bwd<192>(p, dtype, s);
    case 256: return fmx::sm80::run_bwd<256>(p, dtype, s);
  }
  return -1;
}

int check_device(int *cc = nullptr) {
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return cuda_fail(e, "cudaDeviceGetAttribute");
  if (major < 8)
    return fail(FMX_ERR_UNSUPPORTED, "compute capability %d.x < 8.0 is not supported", major);
  if (cc != nullptr) {
    e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (e != cudaSuccess) return cuda_fail(e, "cudaDeviceGetAttribute");
    *cc = major * 10 + minor;
  }
  return FMX_OK;
}

}  // namespace

extern "C" {

int fmx_abi_version(void) { return FMX_ABI_VERSION; }

// Kernel families built into this library: bit 0 sm80, bit 1 sm90 forward, bit 2 sm90
// backward, bit 3 the sm90 forward's head_dim 192/256, bit 4 head_dim_v != head_dim (sm80
// forward and backward, sm90 forward; session 9). Not in the header: Python looks the symbol up
// (flashmux_cuda.family) to name the family in explain().
int fmx_families(void) {
#ifdef FMX_HAS_SM90
  // bit 2: the sm90 backward; bit 3: sm90 forward head_dim 129..256; bit 4: Dv != D;
  // bit 5: the sm90 backward's deterministic mode; bit 6: the sm90 forward at head_dim 65..96
  // (session 10); bit 7: the sm90 forward with ALiBi slopes and block masks (session 11)
  return 255;
#else
  return 17;
#endif
}

const char *fmx_last_error(void) { return g_error; }

size_t fmx_attn_bwd_workspace_size(const FmxAttnArgs *args) {
  if (args == nullptr) return 0;
  return workspace_layout(args).total;
}

int fmx_attn_fwd(const FmxAttnArgs *args, void *stream) { return fmx_attn_fwd_ext(args, nullptr, stream); }
int fmx_attn_bwd(const FmxAttnArgs *args, void *stream) { return fmx_attn_bwd_ext(args, nullptr, stream); }

int fmx_attn_fwd_ext(const FmxAttnArgs *args, const FmxAttnExt *ext, void *stream) {
  fmx::Params p;
  int rc = build_params(args, p, false);
  if (rc) return rc;
  if ((rc = apply_ext(args, ext, p))) return rc;
  if (p.batch == 0 || p.total_q == 0 || p.seqlen_q == 0) return FMX_OK;  // empty problem
  int cc = 0;
  if ((rc = check_device(&cc))) return rc;
  int err = dispatch_fwd(p, args->dtype, static_cast<cudaStream_t>(stream), cc);
  if (err) return cuda_fail(err, "fmx_attn_fwd launch");
  return FMX_OK;
}

int fmx_attn_bwd_ext(const FmxAttnArgs *args, const FmxAttnExt *ext, void *stream) {
  fmx::Params p;
  int rc = build_params(args, p, true);
  if (rc) return rc;
  if ((rc = apply_ext(args, ext, p))) return rc;
  if (p.bm_qnf != nullptr) {  // block mask: the dK/dV walk reads the transposed lists
    if (!p.bm_knf || !p.bm_kfi || !p.bm_knp || !p.bm_kpi)
      return fail(FMX_ERR_INVALID_ARGUMENT, "block mask: the backward needs the kv_* lists");
    if (p.deterministic)
      return fail(FMX_ERR_UNSUPPORTED, "block masks: no deterministic backward (the dQ order "
                                       "follows the mask's lists)");
  }
  if (p.batch == 0 || p.total_q == 0 || p.seqlen_q == 0) {
    return FMX_OK;  // nothing to do (dk/dv of an empty query set are the caller's zeros)
  }
  const WorkspaceLayout w = workspace_layout(args);
  if (args->workspace == nullptr || args->workspace_bytes < w.total)
    return fail(FMX_ERR_WORKSPACE, "workspace of %zu bytes needed (got %zu at %p)", w.total,
                args->workspace_bytes, args->workspace);
  if (!aligned16(args->workspace))
    return fail(FMX_ERR_WORKSPACE, "workspace must be 16-byte aligned");
  int cc = 0;
  if ((rc = check_device(&cc))) return rc;
  char *ws = static_cast<char *>(args->workspace);
  p.dq_accum = reinterpret_cast<float *>(ws + w.dq_accum);
  p.dsum = reinterpret_cast<float *>(ws + w.dsum);
  p.dq_sem = reinterpret_cast<int32_t *>(ws + w.sem);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#ifdef FMX_HAS_SM90
  if (use_sm90_bwd(p, cc)) {  // preprocess (padded rows), wgmma backward, the shared dQ convert
    float *lse2 = reinterpret_cast<float *>(ws + w.sm90);
    float *dsum2 = lse2 + fmx::sm90::bwd_extra_floats(p.batch, p.hq, p.seqlen_q) / 2;
    int e = fmx::sm90::run_bwd_preprocess(p, lse2, dsum2, args->dtype, s);
    if (e) return cuda_fail(e, "fmx_attn_bwd sm90 preprocess launch");
    e = fmx::sm90::bwd_head_dim(fmx::sm90::kernel_dim(p)) == 64 ? fmx::sm90::run_bwd<64>(p, lse2, dsum2, args->dtype, s)
                                           : fmx::sm90::run_bwd<128>(p, lse2, dsum2, args->dtype, s);
    if (e) return cuda_fail(e, "fmx_attn_bwd sm90 launch");
    e = fmx::sm80::run_bwd_convert_dq(p, args->dtype, s);
    if (e) return cuda_fail(e, "fmx_attn_bwd convert launch");
    return FMX_OK;
  }
#else
  (void)cc;
#endif
  int err = fmx::sm80::run_bwd_preprocess(p, args->dtype, s);
  if (err) return cuda_fail(err, "fmx_attn_bwd preprocess launch");
  if (p.seqlen_k > 0) {
    err = dispatch_bwd(p, args->dtype, s);
    if (err) return cuda_fail(err, "fmx_attn_bwd launch");
  }
  err = fmx::sm80::run_bwd_convert_dq(p, args->dtype, s);
  if (err) return cuda_fail(err, "fmx_attn_bwd convert launch");
  return FMX_OK;
}

}  // extern "C"

// ------------------------------------------------------------------------------------------
// KV-cache decode (csrc/decode/): validation, workspace and dispatch.
namespace {

struct DecodeWorkspace {
  size_t o_part, lse_part, total;
};

DecodeWorkspace decode_workspace(const FmxDecodeArgs *a) {
  DecodeWorkspace w{0, 0, 0};
  if (a == nullptr || a->num_splits <= 1) return w;
  const size_t rows = (size_t)(a->batch > 0 ? a->batch : 0) * (size_t)(a->heads_q > 0 ? a->heads_q : 0) *
                      (size_t)(a->seqlen_q > 0 ? a->seqlen_q : 0) * (size_t)a->num_splits;
  const size_t d = (size_t)(a->head_dim_v > 0 ? a->head_dim_v : 0);
  w.o_part = 0;
  w.lse_part = align_up(rows * d * sizeof(float));
  w.total = w.lse_part + align_up(rows * sizeof(float));
  return w;
}

int check_decode_tensor(const char *name, const void *ptr, const int64_t *stride) {
  if (ptr == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "%s is NULL", name);
  if (!aligned16(ptr))
    return fail(FMX_ERR_UNSUPPORTED, "%s must be 16-byte aligned (got %p)", name, ptr);
  for (int i = 0; i < 3; ++i)
    if (stride[i] < 0 || stride[i] % 8 != 0)
      return fail(FMX_ERR_UNSUPPORTED,
                  "%s stride[%d] = %lld must be a non-negative multiple of 8 elements", name, i,
                  (long long)stride[i]);
  return FMX_OK;
}

int build_decode_params(const FmxDecodeArgs *a, fmx::decode::DecodeParams &p) {
  if (a == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "args is NULL");
  if (a->dtype != FMX_DTYPE_F16 && a->dtype != FMX_DTYPE_BF16)
    return fail(FMX_ERR_INVALID_ARGUMENT, "dtype must be FMX_DTYPE_F16 (0) or FMX_DTYPE_BF16 (1), got %d",
                a->dtype);
  if (a->batch < 0 || a->seqlen_q < 0 || a->capacity < 0)
    return fail(FMX_ERR_INVALID_ARGUMENT, "batch/seqlen_q/capacity must be >= 0 (got %d, %d, %d)",
                a->batch, a->seqlen_q, a->capacity);
  if (a->batch > 65535) return fail(FMX_ERR_UNSUPPORTED, "batch = %d exceeds 65535", a->batch);
  if (a->heads_q <= 0 || a->heads_kv <= 0 || a->heads_q % a->heads_kv != 0)
    return fail(FMX_ERR_INVALID_ARGUMENT, "heads_q (%d) must be a positive multiple of heads_kv (%d)",
                a->heads_q, a->heads_kv);
  if ((int64_t)a->batch * a->heads_kv > 65535)
    return fail(FMX_ERR_UNSUPPORTED, "batch * heads_kv = %lld exceeds 65535",
                (long long)a->batch * a->heads_kv);

  if ((int64_t)a->seqlen_q * (a->heads_q / a->heads_kv) > 2147483647LL)
    return fail(FMX_ERR_UNSUPPORTED, "seqlen_q * heads_q / heads_kv exceeds 2^31-1");
  if (a->head_dim <= 0 || a->head_dim % 8 != 0 || a->head_dim > 256)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim %d must be a multiple of 8 in [8, 256]", a->head_dim);
  if (a->head_dim_v != a->head_dim)
    return fail(FMX_ERR_UNSUPPORTED, "head_dim_v (%d) != head_dim (%d) is not supported",
                a->head_dim_v, a->head_dim);
  if (!std::isfinite(a->scale)) return fail(FMX_ERR_INVALID_ARGUMENT, "scale must be finite");
  if (!(a->softcap >= 0.f) || !std::isfinite(a->softcap))
    return fail(FMX_ERR_INVALID_ARGUMENT, "softcap must be finite and >= 0 (0 = off)");
  if (a->window_left < -1 || a->window_right < -1)
    return fail(FMX_ERR_INVALID_ARGUMENT, "window_left/right must be >= -1 (got %d, %d)",
                a->window_left, a->window_right);
  if (a->num_splits < 1 || a->num_splits > 65535)
    return fail(FMX_ERR_INVALID_ARGUMENT, "num_splits must be in [1, 65535], got %d", a->num_splits);
  const bool paged = a->block_table != nullptr;
  if (paged != (a->page_size > 0))
    return fail(FMX_ERR_INVALID_ARGUMENT, "block_table and page_size > 0 go together (page_size=%d)",
                a->page_size);
  if (paged) {
    if (a->num_pages < 1 || a->max_pages < 1)
      return fail(FMX_ERR_INVALID_ARGUMENT, "paged cache: num_pages (%d) and max_pages (%d) must be >= 1",
                  a->num_pages, a->max_pages);
    if ((int64_t)a->max_pages * a->page_size != a->capacity)
      return fail(FMX_ERR_INVALID_ARGUMENT, "paged cache: capacity %d != max_pages %d * page_size %d",
                  a->capacity, a->max_pages, a->page_size);
    if (a->block_table_stride < a->max_pages)
      return fail(FMX_ERR_INVALID_ARGUMENT, "block_table_stride %lld < max_pages %d",
                  (long long)a->block_table_stride, a->max_pages);
  }
  if (a->seqlens_k == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "seqlens_k is NULL");
  if (a->lse == nullptr) return fail(FMX_ERR_INVALID_ARGUMENT, "lse is NULL");
  int rc;
  if ((rc = check_decode_tensor("q", a->q, a->q_stride))) return rc;
  if ((rc = check_decode_tensor("k_cache", a->k_cache, a->k_stride))) return rc;
  if ((rc = check_decode_tensor("v_cache", a->v_cache, a->v_stride))) return rc;
  if ((rc = check_decode_tensor("out", a->out, a->out_stride))) return rc;

  p = fmx::decode::DecodeParams{};
  p.q = a->q; p.k = a->k_cache; p.v = a->v_cache; p.o = a->out; p.lse = a->lse;
  copy_strides(a->q_stride, p.q_bs, p.q_rs, p.q_hs);
  copy_strides(a->out_stride, p.o_bs, p.o_rs, p.o_hs);
  copy_strides(a->k_stride, p.k_ps, p.k_rs, p.k_hs);
  copy_strides(a->v_stride, p.v_ps, p.v_rs, p.v_hs);
  p.seqlens_k = a->seqlens_k;
  p.block_table = a->block_table;
  p.bt_stride = a->block_table_stride;
  p.alibi = a->alibi_slopes;
  p.alibi_bs = a->alibi_stride;
  p.batch = a->batch; p.sq = a->seqlen_q; p.hq = a->heads_q; p.hkv = a->heads_kv;
  p.group = a->heads_q / a->heads_kv; p.d = a->head_dim;
  p.rows = p.sq * p.group;
  p.capacity = a->capacity;
  p.page_size = paged ? a->page_size : 0;
  p.num_pages = paged ? a->num_pages : 0;
  p.max_pages = paged ? a->max_pages : 0;
  const float log2e = 1.4426950408889634f;
  if (a->softcap > 0.f) {
    p.q_mult = a->scale / a->softcap;
    p.cap_log2 = a->softcap * log2e;
  } else {
    p.q_mult = a->scale * log2e;
    p.cap_log2 = 0.f;
  }
  p.window_left = a->window_left;
  p.window_right = a->window_right;
  p.num_splits = a->num_splits;
  return FMX_OK;
}

}  // namespace

extern "C" {

size_t fmx_decode_workspace_size(const FmxDecodeArgs *args) { return decode_workspace(args).total; }

int fmx_decode(const FmxDecodeArgs *args, void *stream) {
  fmx::decode::DecodeParams p;
  int rc = build_decode_params(args, p);
  if (rc) return rc;
  if (p.batch == 0 || p.sq == 0) return FMX_OK;  // empty problem
  if (p.num_splits > 1) {
    const DecodeWorkspace w = decode_workspace(args);
    if (args->workspace == nullptr || args->workspace_bytes < w.total)
      return fail(FMX_ERR_WORKSPACE, "decode workspace of %zu bytes needed (got %zu at %p)", w.total,
                  args->workspace_bytes, args->workspace);
    if (!aligned16(args->workspace))
      return fail(FMX_ERR_WORKSPACE, "decode workspace must be 16-byte aligned");
    char *ws = static_cast<char *>(args->workspace);
    p.o_part = reinterpret_cast<float *>(ws + w.o_part);
    p.lse_part = reinterpret_cast<float *>(ws + w.lse_part);
  }
  if ((rc = check_device())) return rc;
  int err = fmx::decode::run_decode(p, args->dtype, static_cast<cudaStream_t>(stream));
  if (err) return cuda_fail(err, "fmx_decode launch");
  return FMX_OK;
}

}  // extern "C"
