// XLA FFI handler for the KV-cache decode entry point (fmx_decode), for jax.ffi.ffi_call.
//
// Built with ffi.cc into libflashmux_cuda_jax.so. JAX arrays are dense row-major, so strides
// follow from the shapes. Python (flashmux_cuda.jax_decode) has checked shapes and dtypes at
// trace time with abi.make_decode_args and sized the workspace with fmx_decode_workspace_size.
//
// Decode: q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes -> out, lse, workspace
// A contiguous cache passes a dummy block_table and paged=0; no ALiBi passes a dummy vector and
// alibi=0 (1: slopes (Hq,), 2: slopes (B, Hq)).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "flashmux_cuda.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void row_major_strides(const ffi::AnyBuffer& a, int64_t s[3]) {
  auto d = a.dimensions();
  s[2] = d[3];
  s[1] = d[2] * d[3];
  s[0] = d[1] * d[2] * d[3];
}

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::AnyBuffer v_cache, ffi::AnyBuffer seqlens_k, ffi::AnyBuffer block_table,
                      ffi::AnyBuffer alibi_slopes, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                      float scale, float softcap, int32_t window_left, int32_t window_right,
                      int32_t num_splits, int32_t paged, int32_t alibi) {
  FmxDecodeArgs a;
  std::memset(&a, 0, sizeof(a));
  auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("flashmux_cuda decode: q and the caches must be rank 4");
  if (q.element_type() != k_cache.element_type() || q.element_type() != v_cache.element_type())
    return ffi::Error::InvalidArgument("flashmux_cuda decode: q and cache dtypes differ");
  if (q.element_type() == ffi::DataType::F16)
    a.dtype = FMX_DTYPE_F16;
  else if (q.element_type() == ffi::DataType::BF16)
    a.dtype = FMX_DTYPE_BF16;
  else
    return ffi::Error::InvalidArgument("flashmux_cuda decode: dtype must be float16 or bfloat16");
  if (seqlens_k.element_type() != ffi::DataType::S32 ||
      static_cast<int64_t>(seqlens_k.element_count()) != qd[0])
    return ffi::Error::InvalidArgument("flashmux_cuda decode: seqlens_k must be int32 (batch,)");
  a.batch = static_cast<int32_t>(qd[0]);
  a.seqlen_q = static_cast<int32_t>(qd[1]);
  a.heads_q = static_cast<int32_t>(qd[2]);
  a.head_dim = static_cast<int32_t>(qd[3]);
  a.heads_kv = static_cast<int32_t>(kd[2]);
  a.head_dim_v = static_cast<int32_t>(vd[3]);
  if (paged) {
    auto bd = block_table.dimensions();
    if (block_table.element_type() != ffi::DataType::S32 || bd.size() != 2 || bd[0] != qd[0])
      return ffi::Error::InvalidArgument("flashmux_cuda decode: block_table must be int32 (batch, max_pages)");
    a.page_size = static_cast<int32_t>(kd[1]);
    a.num_pages = static_cast<int32_t>(kd[0]);
    a.max_pages = static_cast<int32_t>(bd[1]);
    a.capacity = static_cast<int32_t>(bd[1] * kd[1]);
    a.block_table = static_cast<const int32_t*>(block_table.untyped_data());
    a.block_table_stride = bd[1];
  } else {
    a.capacity = static_cast<int32_t>(kd[1]);
  }
  if (alibi) {
    if (alibi_slopes.element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("flashmux_cuda decode: alibi_slopes must be float32");
    a.alibi_slopes = static_cast<const float*>(alibi_slopes.untyped_data());
    a.alibi_stride = alibi == 2 ? qd[2] : 0;
  }
  a.q = q.untyped_data();
  a.k_cache = k_cache.untyped_data();
  a.v_cache = v_cache.untyped_data();
  a.out = out->untyped_data();
  a.lse = static_cast<float*>(lse->untyped_data());
  a.seqlens_k = static_cast<const int32_t*>(seqlens_k.untyped_data());
  row_major_strides(q, a.q_stride);
  row_major_strides(k_cache, a.k_stride);
  row_major_strides(v_cache, a.v_stride);
  row_major_strides(*out, a.out_stride);
  a.scale = scale;
  a.softcap = softcap;
  a.window_left = window_left;
  a.window_right = window_right;
  a.num_splits = num_splits;
  const size_t need = fmx_decode_workspace_size(&a);
  const size_t have = workspace->size_bytes();
  if (need > have)
    return ffi::Error::Internal("flashmux_cuda decode: workspace of " + std::to_string(have) +
                                " bytes < " + std::to_string(need) + " needed");
  a.workspace = need ? workspace->untyped_data() : nullptr;
  a.workspace_bytes = need;
  const int rc = fmx_decode(&a, stream);
  if (rc == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("flashmux_cuda decode: ") + fmx_last_error());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashmuxCudaDecode, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::AnyBuffer>()  // seqlens_k
                                  .Arg<ffi::AnyBuffer>()  // block_table (dummy when contiguous)
                                  .Arg<ffi::AnyBuffer>()  // alibi_slopes (dummy without)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<int32_t>("num_splits")
                                  .Attr<int32_t>("paged")
                                  .Attr<int32_t>("alibi"));
