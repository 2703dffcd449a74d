// XLA FFI handlers over the flashmux_cuda C ABI, for jax.ffi.ffi_call.
//
// Built by flashmux_cuda.build into libflashmux_cuda_jax.so against jaxlib's headers
// (jax.ffi.include_dir()) and linked to libflashmux_cuda.so. JAX arrays are dense row-major, so
// strides follow from the shapes. Python has already checked shapes and dtypes at trace time
// (flashmux_cuda.abi.make_args); the handlers re-check what they rely on and report a clean
// error instead of launching on something unexpected.
//
// Forward:  q, k, v, cu_seqlens_q, cu_seqlens_k, alibi -> out, lse
// Backward: dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi -> dq, dk, dv, workspace
// Padded calls pass cu_seqlens as dummy int32 vectors and varlen=0; has_dlse=0 passes a dummy dlse;
// has_alibi=0 a dummy alibi (else float32 slopes (Hq,) or (B, Hq), run through fmx_attn_*_ext).
// With mask_block > 0 the BlockMask's ten int32 arrays follow alibi (remaining arguments, in the
// order of flashmux_cuda.abi.MASK_ARRAYS); without, none do.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "flashmux_cuda.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Attrs {
  float scale, softcap;
  int32_t causal, window_left, window_right, varlen, max_seqlen_q, max_seqlen_k, deterministic;
};

// Element strides of (batch, seq, head) for a dense row-major (B,S,H,D) or varlen (T,H,D) array.
void dense_strides(const ffi::AnyBuffer& a, bool varlen, int64_t s[3]) {
  auto d = a.dimensions();
  if (varlen) {
    s[0] = 0;
    s[1] = d[1] * d[2];
    s[2] = d[2];
  } else {
    s[2] = d[3];
    s[1] = d[2] * d[3];
    s[0] = d[1] * d[2] * d[3];
  }
}

// The same for an array shaped like q with the last dimension `last` (out and dout: Dv).
void dense_strides_last(const ffi::AnyBuffer& q, int64_t last, bool varlen, int64_t s[3]) {
  auto d = q.dimensions();
  if (varlen) {
    s[0] = 0;
    s[1] = d[1] * last;
    s[2] = last;
  } else {
    s[2] = last;
    s[1] = d[2] * last;
    s[0] = d[1] * d[2] * last;
  }
}

ffi::Error fill_forward(FmxAttnArgs& a, const Attrs& at, const ffi::AnyBuffer& q,
                        const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                        const ffi::AnyBuffer& cu_q, const ffi::AnyBuffer& cu_k, void* out,
                        void* lse) {
  std::memset(&a, 0, sizeof(a));
  const bool varlen = at.varlen != 0;
  const size_t rank = varlen ? 3 : 4;
  if (q.dimensions().size() != rank || k.dimensions().size() != rank ||
      v.dimensions().size() != rank)
    return ffi::Error::InvalidArgument("flashmux_cuda: q, k, v have the wrong rank");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("flashmux_cuda: q, k, v dtypes differ");
  if (q.element_type() == ffi::DataType::F16)
    a.dtype = FMX_DTYPE_F16;
  else if (q.element_type() == ffi::DataType::BF16)
    a.dtype = FMX_DTYPE_BF16;
  else
    return ffi::Error::InvalidArgument("flashmux_cuda: dtype must be float16 or bfloat16");
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (varlen) {
    if (cu_q.element_type() != ffi::DataType::S32 || cu_k.element_type() != ffi::DataType::S32 ||
        cu_q.element_count() != cu_k.element_count() || cu_q.element_count() < 1)
      return ffi::Error::InvalidArgument("flashmux_cuda: bad cu_seqlens");
    a.batch = static_cast<int32_t>(cu_q.element_count() - 1);
    a.total_q = static_cast<int32_t>(qd[0]);
    a.total_k = static_cast<int32_t>(kd[0]);
    a.seqlen_q = at.max_seqlen_q > 0 ? at.max_seqlen_q : a.total_q;
    a.seqlen_k = at.max_seqlen_k > 0 ? at.max_seqlen_k : a.total_k;
    a.cu_seqlens_q = static_cast<const int32_t*>(cu_q.untyped_data());
    a.cu_seqlens_k = static_cast<const int32_t*>(cu_k.untyped_data());
  } else {
    a.batch = static_cast<int32_t>(qd[0]);
    a.seqlen_q = static_cast<int32_t>(qd[1]);
    a.seqlen_k = static_cast<int32_t>(kd[1]);
    a.total_q = static_cast<int32_t>(qd[0] * qd[1]);
    a.total_k = static_cast<int32_t>(kd[0] * kd[1]);
  }
  a.heads_q = static_cast<int32_t>(qd[rank - 2]);
  a.heads_kv = static_cast<int32_t>(kd[rank - 2]);
  a.head_dim = static_cast<int32_t>(qd[rank - 1]);
  a.head_dim_v = static_cast<int32_t>(vd[rank - 1]);
  a.q = q.untyped_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  a.out = out;
  a.lse = static_cast<float*>(lse);
  dense_strides(q, varlen, a.q_stride);
  dense_strides(k, varlen, a.k_stride);
  dense_strides(v, varlen, a.v_stride);
  dense_strides_last(q, vd[rank - 1], varlen, a.out_stride);  // out: q's shape with v's Dv
  a.scale = at.scale;
  a.softcap = at.softcap;
  a.causal = at.causal;
  a.window_left = at.window_left;
  a.window_right = at.window_right;
  a.deterministic = at.deterministic;
  return ffi::Error::Success();
}

// FmxAttnExt for the ALiBi operand (dense float32 (Hq,) or (B, Hq)); used = false without one.
ffi::Error fill_ext(FmxAttnExt& e, const FmxAttnArgs& a, const ffi::AnyBuffer& alibi,
                    int32_t has_alibi, bool& used) {
  std::memset(&e, 0, sizeof(e));
  e.struct_size = sizeof(e);
  used = has_alibi != 0;
  if (!used) return ffi::Error::Success();
  auto d = alibi.dimensions();
  if (alibi.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("flashmux_cuda: alibi_slopes must be float32");
  if (d.size() == 1 && d[0] == a.heads_q) {
    e.alibi_stride = 0;
  } else if (d.size() == 2 && d[0] == a.batch && d[1] == a.heads_q) {
    e.alibi_stride = a.heads_q;
  } else {
    return ffi::Error::InvalidArgument("flashmux_cuda: alibi_slopes must be (Hq,) or (B, Hq)");
  }
  e.alibi_slopes = static_cast<const float*>(alibi.untyped_data());
  return ffi::Error::Success();
}

// The BlockMask's arrays, in the order flashmux_cuda.abi.MASK_ARRAYS lists them.
constexpr int kMaskArrays = 10;

ffi::Error fill_mask(FmxAttnExt& e, const ffi::RemainingArgs& m, int32_t mask_block, bool& used) {
  if (mask_block <= 0) return ffi::Error::Success();
  if (m.size() != kMaskArrays)
    return ffi::Error::InvalidArgument("flashmux_cuda: a block mask needs its 10 arrays");
  const int32_t* ptr[kMaskArrays];
  for (int i = 0; i < kMaskArrays; ++i) {
    auto buf = m.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    if (buf->element_type() != ffi::DataType::S32)
      return ffi::Error::InvalidArgument("flashmux_cuda: block mask arrays must be int32");
    if (i == 1) {  // q_full_idx (mask_batch, mask_heads, nq, nk)
      auto d = buf->dimensions();
      if (d.size() != 4)
        return ffi::Error::InvalidArgument("flashmux_cuda: q_full_idx must have rank 4");
      e.mask_batch = static_cast<int32_t>(d[0]);
      e.mask_heads = static_cast<int32_t>(d[1]);
      e.mask_nq = static_cast<int32_t>(d[2]);
      e.mask_nk = static_cast<int32_t>(d[3]);
    }
    ptr[i] = static_cast<const int32_t*>(buf->untyped_data());
  }
  e.mask_block = mask_block;
  e.q_num_full = ptr[0]; e.q_full_idx = ptr[1]; e.q_num_part = ptr[2]; e.q_part_idx = ptr[3];
  e.tile_id = ptr[4]; e.bits = ptr[5];
  e.kv_num_full = ptr[6]; e.kv_full_idx = ptr[7]; e.kv_num_part = ptr[8]; e.kv_part_idx = ptr[9];
  used = true;
  return ffi::Error::Success();
}

ffi::Error status(int rc) {
  if (rc == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("flashmux_cuda: ") + fmx_last_error());
}

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, ffi::AnyBuffer alibi,
                   ffi::RemainingArgs mask, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> lse, float scale, float softcap, int32_t causal,
                   int32_t window_left, int32_t window_right, int32_t varlen,
                   int32_t max_seqlen_q, int32_t max_seqlen_k, int32_t has_alibi,
                   int32_t mask_block) {
  Attrs at{scale, softcap, causal, window_left, window_right, varlen, max_seqlen_q, max_seqlen_k, 0};
  FmxAttnArgs a;
  auto err = fill_forward(a, at, q, k, v, cu_q, cu_k, out->untyped_data(), lse->untyped_data());
  if (err.failure()) return err;
  FmxAttnExt e;
  bool used = false;
  err = fill_ext(e, a, alibi, has_alibi, used);
  if (err.failure()) return err;
  err = fill_mask(e, mask, mask_block, used);
  if (err.failure()) return err;
  return status(fmx_attn_fwd_ext(&a, used ? &e : nullptr, stream));
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                   ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                   ffi::AnyBuffer lse, ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k,
                   ffi::AnyBuffer alibi, ffi::RemainingArgs mask, ffi::Result<ffi::AnyBuffer> dq,
                   ffi::Result<ffi::AnyBuffer> dk,
                   ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                   float scale, float softcap, int32_t causal, int32_t window_left,
                   int32_t window_right, int32_t varlen, int32_t max_seqlen_q,
                   int32_t max_seqlen_k, int32_t deterministic, int32_t has_dlse,
                   int32_t has_alibi, int32_t mask_block) {
  Attrs at{scale,  softcap,      causal,       window_left,  window_right,
           varlen, max_seqlen_q, max_seqlen_k, deterministic};
  FmxAttnArgs a;
  auto err = fill_forward(a, at, q, k, v, cu_q, cu_k, out.untyped_data(), lse.untyped_data());
  if (err.failure()) return err;
  const bool vl = varlen != 0;
  a.dout = dout.untyped_data();
  a.dlse = has_dlse ? static_cast<const float*>(dlse.untyped_data()) : nullptr;
  a.dq = dq->untyped_data();
  a.dk = dk->untyped_data();
  a.dv = dv->untyped_data();
  dense_strides(out, vl, a.dout_stride);  // dout has out's shape (Dv columns)
  dense_strides(q, vl, a.dq_stride);
  dense_strides(k, vl, a.dk_stride);
  dense_strides(v, vl, a.dv_stride);
  const size_t need = fmx_attn_bwd_workspace_size(&a);
  const size_t have = workspace->size_bytes();
  if (need > have)
    return ffi::Error::Internal("flashmux_cuda: workspace of " + std::to_string(have) +
                                " bytes < " + std::to_string(need) + " needed");
  a.workspace = need ? workspace->untyped_data() : nullptr;
  a.workspace_bytes = need;
  if (need) {
    cudaError_t e = cudaMemsetAsync(a.workspace, 0, need, stream);
    if (e != cudaSuccess)
      return ffi::Error::Internal(std::string("flashmux_cuda: workspace memset: ") +
                                  cudaGetErrorString(e));
  }
  FmxAttnExt e;
  bool used = false;
  err = fill_ext(e, a, alibi, has_alibi, used);
  if (err.failure()) return err;
  err = fill_mask(e, mask, mask_block, used);
  if (err.failure()) return err;
  return status(fmx_attn_bwd_ext(&a, used ? &e : nullptr, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashmuxCudaFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens_q
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens_k
                                  .Arg<ffi::AnyBuffer>()  // alibi slopes (or a dummy)
                                  .RemainingArgs()        // block mask arrays (or none)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("causal")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<int32_t>("varlen")
                                  .Attr<int32_t>("max_seqlen_q")
                                  .Attr<int32_t>("max_seqlen_k")
                                  .Attr<int32_t>("has_alibi")
                                  .Attr<int32_t>("mask_block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashmuxCudaBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // dlse
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens_q
                                  .Arg<ffi::AnyBuffer>()  // cu_seqlens_k
                                  .Arg<ffi::AnyBuffer>()  // alibi slopes (or a dummy)
                                  .RemainingArgs()        // block mask arrays (or none)
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("causal")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<int32_t>("varlen")
                                  .Attr<int32_t>("max_seqlen_q")
                                  .Attr<int32_t>("max_seqlen_k")
                                  .Attr<int32_t>("deterministic")
                                  .Attr<int32_t>("has_dlse")
                                  .Attr<int32_t>("has_alibi")
                                  .Attr<int32_t>("mask_block"));
