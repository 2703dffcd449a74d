/* flashmux_cuda.h: the C ABI of libflashmux_cuda (ABI version 1).
 *
 * Device pointers, shapes, element strides, dtype and a CUDA stream go in; an error code comes
 * back (0 = ok) and fmx_last_error() gives the message. No libtorch/XLA types cross this line,
 * so one build serves every framework version. */
#ifndef FLASHMUX_CUDA_H_
#define FLASHMUX_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#define FMX_ABI_VERSION 1

enum { FMX_DTYPE_F16 = 0, FMX_DTYPE_BF16 = 1 };

/* Error codes returned by fmx_attn_fwd / fmx_attn_bwd. */
enum {
  FMX_OK = 0,
  FMX_ERR_INVALID_ARGUMENT = 1, /* a field is out of range or inconsistent */
  FMX_ERR_UNSUPPORTED = 2,      /* valid, but this library has no kernel for it (e.g. Dv != D) */
  FMX_ERR_CUDA = 3,             /* a CUDA runtime error (launch failure, no device, ...) */
  FMX_ERR_WORKSPACE = 4         /* workspace missing or too small */
};

typedef struct FmxAttnArgs {
  int32_t dtype;                 /* FMX_DTYPE_* */
  int32_t batch;                 /* padded: B; varlen: number of sequences */
  int32_t seqlen_q, seqlen_k;    /* padded: Sq, Sk; varlen: max_seqlen_q/k */
  int32_t total_q, total_k;      /* varlen: Tq, Tk; padded: B*Sq, B*Sk */
  int32_t heads_q, heads_kv, head_dim, head_dim_v;
  const void *q, *k, *v; void *out; float *lse;   /* lse: padded (B,Hq,Sq), varlen (Hq,Tq), contiguous */
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  /* element strides of (batch, seq, head); last dim contiguous; varlen: [0] unused */
  const int32_t *cu_seqlens_q, *cu_seqlens_k;     /* NULL when padded */
  float scale; float softcap;                     /* softcap 0 => off */
  int32_t causal; int32_t window_left, window_right; /* -1 => unbounded; causal already folded into window_right (=0 or less) */
  /* backward only */
  const void *dout; const float *dlse;            /* dlse may be NULL; same layout as lse */
  void *dq, *dk, *dv;
  int64_t dout_stride[3], dq_stride[3], dk_stride[3], dv_stride[3];
  void *workspace; size_t workspace_bytes;        /* from fmx_attn_bwd_workspace_size, zero-filled by the caller */
  int32_t deterministic;
} FmxAttnArgs;

/* Optional operands of one attention call (fmx_attn_fwd_ext / fmx_attn_bwd_ext, added after ABI
 * version 1: additive, look the symbols up; fmx_attn_fwd/bwd are the _ext calls with ext NULL).
 * struct_size is the caller's sizeof(FmxAttnExt): fields past it read as zero, so fields can be
 * appended later without breaking older callers. Pass the same ext to the forward and backward. */
typedef struct FmxAttnExt {
  int64_t struct_size;
  /* ALiBi: NULL, or float32 slopes (heads_q,) or (batch, heads_q) on the device: element (b, h)
   * at b * alibi_stride + h (b: the sequence; varlen: its index in cu_seqlens). The score of
   * query i and key j of a sequence becomes s_ij - slope * |i + seqlen_k - seqlen_q - j| after
   * scale and softcap, before the masks. sm80 family (the sm90 forward steps aside). */
  const float *alibi_slopes;
  int64_t alibi_stride;          /* 0 for (heads_q,) slopes; >= heads_q for (batch, heads_q) */
  /* Block mask (a flashmux BlockMask; sm80 kernels, padded layout, not deterministic): q_num_full
   * NULL = none. int32 arrays, contiguous, leading dims (mask_batch, mask_heads) = (1 or batch,
   * 1 or heads_q): q_num_full, q_num_part (.., mask_nq); q_full_idx, q_part_idx, tile_id
   * (.., mask_nq, mask_nk); bits (partial tiles, mask_block, mask_block / 32): bit c % 32 of
   * word c / 32 of row r is element (r, c) of a partial tile. mask_block: a multiple of 128;
   * mask_nq / mask_nk = ceil(seqlen_q / mask_block), ceil(seqlen_k / mask_block). */
  int32_t mask_block, mask_batch, mask_heads, mask_nq, mask_nk, mask_reserved;
  const int32_t *q_num_full, *q_full_idx, *q_num_part, *q_part_idx, *tile_id, *bits;
  /* The transposed lists (per key block: query blocks), read by the backward (its dK/dV walk):
   * kv_num_full, kv_num_part (.., mask_nk); kv_full_idx, kv_part_idx (.., mask_nk, mask_nq). */
  const int32_t *kv_num_full, *kv_full_idx, *kv_num_part, *kv_part_idx;
} FmxAttnExt;

/* KV-cache decode (fmx_decode): split-KV attention of a few query rows against a contiguous
 * cache (k_cache (batch, capacity, heads_kv, head_dim)) or a paged one (k_cache (num_pages,
 * page_size, heads_kv, head_dim) with block_table (batch, max_pages) int32). The keys of
 * sequence b are positions 0 .. seqlens_k[b]-1 (clamped to the capacity; block_table entries
 * clamped to [0, num_pages)); query row i sits at position seqlens_k[b] - seqlen_q + i. Nothing
 * is read on the host: CUDA-graph safe. Added after ABI version 1 (additive: look the symbols up). */
typedef struct FmxDecodeArgs {
  int32_t dtype;                 /* FMX_DTYPE_* */
  int32_t batch, seqlen_q, heads_q, heads_kv, head_dim, head_dim_v;
  int32_t capacity;              /* contiguous: S_max; paged: max_pages * page_size */
  int32_t page_size;             /* 0: contiguous cache */
  int32_t num_pages, max_pages;  /* paged only */
  const void *q, *k_cache, *v_cache; void *out; float *lse;  /* lse (batch, heads_q, seqlen_q) contiguous, always written */
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  /* element strides of (batch|page, row, head); last dim contiguous */
  const int32_t *seqlens_k;      /* (batch,) on the device */
  const int32_t *block_table;    /* NULL: contiguous */
  int64_t block_table_stride;    /* elements between block_table rows */
  const float *alibi_slopes;     /* NULL or float32: element (b, h) at b * alibi_stride + h */
  int64_t alibi_stride;          /* 0 for (heads_q,) slopes, heads_q for (batch, heads_q) */
  float scale; float softcap;    /* softcap 0 => off */
  int32_t window_left, window_right;  /* -1 => unbounded; causal folded into window_right */
  int32_t num_splits;            /* >= 1 */
  void *workspace; size_t workspace_bytes;  /* num_splits > 1: from fmx_decode_workspace_size */
} FmxDecodeArgs;

#ifdef __cplusplus
extern "C" {
#endif
int fmx_decode(const FmxDecodeArgs *args, void *stream);    /* 0 ok; else error code */
size_t fmx_decode_workspace_size(const FmxDecodeArgs *args);
int fmx_abi_version(void);
int fmx_attn_fwd(const FmxAttnArgs *args, void *stream);   /* 0 ok; else error code, message via fmx_last_error */
int fmx_attn_bwd(const FmxAttnArgs *args, void *stream);
int fmx_attn_fwd_ext(const FmxAttnArgs *args, const FmxAttnExt *ext, void *stream);  /* ext may be NULL */
int fmx_attn_bwd_ext(const FmxAttnArgs *args, const FmxAttnExt *ext, void *stream);
size_t fmx_attn_bwd_workspace_size(const FmxAttnArgs *args);
const char *fmx_last_error(void);   /* thread-local message of the last failure */
#ifdef __cplusplus
}
#endif

#endif /* FLASHMUX_CUDA_H_ */
