// Internal launch parameters shared by every kernel family (sm80 now, sm90 later).
// Built from the public FmxAttnArgs by flashmux_cuda_api.cu after validation.
#pragma once
#include <stdint.h>
#include <stddef.h>

namespace fmx {

struct Params {
  // Forward operands.
  const void *q, *k, *v;
  void *o;
  float *lse;
  int64_t q_bs, q_rs, q_hs;  // element strides: batch (padded only), row, head
  int64_t k_bs, k_rs, k_hs;
  int64_t v_bs, v_rs, v_hs;
  int64_t o_bs, o_rs, o_hs;
  const int32_t *cu_q, *cu_k;  // both NULL (padded) or both set (varlen)
  int32_t batch, seqlen_q, seqlen_k, total_q, total_k;
  int32_t hq, hkv, group, d;   // group = hq / hkv; d = actual head_dim (multiple of 8)
  // d_v: v's / out's head_dim (Dv, multiple of 8). Dv != d runs on the instantiation of max(d, dv):
  // the smaller of the two is zero-filled up to it on load (Q/K or V/dO columns) and only its
  // own columns are stored (O, dV; dQ, dK), so no kernel has a separate V head dim (NOTES.md).
  int32_t d_v;
  float scale;                 // softmax scale applied to q.k
  float softcap;               // 0 => off
  float score_log2;            // multiplier turning the (capped) score into log2 units
  float score_nat;             // multiplier turning the (capped) score into natural units
  int32_t window_left, window_right;  // -1 => unbounded (causal folded into window_right)
  // ALiBi (SPEC "ALiBi"; fmx_attn_*_ext): NULL, or float32 slopes with (b, h) at b * alibi_bs + h.
  // The score of (i, j) gets -slope * |i + sk - sq - j| after softcap, before the mask.
  const float *alibi;
  int64_t alibi_bs;
  // Block mask (flashmux BlockMask; fmx_attn_*_ext): bm_qnf NULL = none. int32
  // arrays with leading dims (bm_b, bm_h) = (1 or batch, 1 or hq): q_num_full / q_num_part
  // (.., nq), q_full_idx / q_part_idx / tile_id (.., nq, nk), bits (partial tiles, mbs, mbs/32).
  const int32_t *bm_qnf, *bm_qfi, *bm_qnp, *bm_qpi, *bm_tile, *bm_bits;
  const int32_t *bm_knf, *bm_kfi, *bm_knp, *bm_kpi;  // transposed lists (backward): (.., nk[, nq])
  int32_t bm_block, bm_b, bm_h, bm_nq, bm_nk;

  // Backward operands.
  const void *dout;
  const float *dlse;
  void *dq, *dk, *dv;
  int64_t do_bs, do_rs, do_hs;
  int64_t dq_bs, dq_rs, dq_hs;
  int64_t dk_bs, dk_rs, dk_hs;
  int64_t dv_bs, dv_rs, dv_hs;
  float *dq_accum;   // fp32, zero-filled; 8x8 blocks: (row i, head h, col c) lives at
                     // ((i / 8 * hq + h) * d + c / 8 * 8) * 8 + i % 8 * 8 + c % 8 (rows padded to 8)
  float *dsum;       // rowsum(dO*O) - dlse, same layout as lse
  int32_t *dq_sem;   // (batch, hq, num_m_blocks_bwd) counters, zero-filled (deterministic only)
  int32_t num_m_blocks_bwd;
  int32_t deterministic;
};

// Backward row-block size shared by all head-dim instantiations (the workspace's semaphore
// array is sized with it).
constexpr int kBwdBlockM = 64;

}  // namespace fmx
