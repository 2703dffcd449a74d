"""A Gluon (``triton.experimental.gluon``) FlashAttention forward for Hopper (sm_90a), FA3 style.

One program owns 2 x BLOCK_M query rows of one (batch, head) and runs three partitions
(``gl.warp_specialize``):

- a load partition (1 warp, few registers): Q's two halves once, then K and V tiles through TMA
  into a STAGES-deep shared-memory ring, each slot guarded by mbarriers (``k_ready``/``v_ready``
  filled by the TMA transaction count, ``kv_empty`` released by both consumers);
- two consumer warpgroups (4 warps each, the registers the loader gave up), one per half of the
  query rows: S = Q K^T on wgmma (Q and K from shared memory), online softmax in the log2 domain
  (exp2, the scale folded into one FMA), O += P V on wgmma with P in registers, then the
  epilogue (O normalized, the natural-log lse). With PINGPONG the two warpgroups take turns
  issuing their matmuls (one's softmax under the other's wgmma), through two mbarriers.

What it computes is the contract's forward for 16-bit Q/K/V of head_dim 64 or 128 (D == Dv),
no varlen, window, softcap, dropout or ALiBi, scale > 0, causal bottom-right aligned (off =
Sk - Sq), GQA by head index; Sk a multiple of BLOCK_N (a partial last K/V tile would read the
next sequence's rows through the 2-D descriptor). ``reasons()`` says why a call does not fit;
`_launch.forward` then runs the Triton kernel. Opt-in: FLASHMUX_TRITON_GLUON=1.

Written against Triton 3.6's Gluon API (the H200 machine); imports and compiles for sm_90a
with 3.6 and 3.9 (``compile_sm90`` below, no GPU needed). Not usable under TRITON_INTERPRET.
"""

from __future__ import annotations

import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load (3.9
# raises on the old name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634


@gluon.constexpr_function
def _acc_layout(n):
    """The register layout of one warpgroup's (4 warps) wgmma accumulator with n columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _a_operand(acc_layout):
    """16-bit registers as the A operand of a wgmma into `acc_layout` (P, dS from registers)."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)


@gluon.jit
def _ring_load(desc_a, desc_b, a_smem, b_smem, a_ready, b_ready, empty, row, col, c,
               STAGES: gl.constexpr):
    """Fill slot c % STAGES of a two-tensor ring (K and V; Q and dO in the dK/dV program) with
    the tiles at [row, col] once its consumers released it; one ready barrier per tensor, filled
    by the TMA transaction count."""
    s = c % STAGES
    ph = (c // STAGES) & 1
    # a fresh barrier has completed "phase -1": the first STAGES waits pass at once
    mbarrier.wait(empty.index(s), ph ^ 1)
    mbarrier.expect(a_ready.index(s), desc_a.block_type.nbytes)
    _tma_load(desc_a, [row, col], a_ready.index(s), a_smem.index(s))
    mbarrier.expect(b_ready.index(s), desc_b.block_type.nbytes)
    _tma_load(desc_b, [row, col], b_ready.index(s), b_smem.index(s))


@gluon.jit
def _kv_loads(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, kv_empty, kv_row, kv_col, it,
              n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader's K/V blocks 0..n_blocks-1 of one (batch, KV head), ring slots it, it+1, ..."""
    for i in range(n_blocks):
        _ring_load(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, kv_empty,
                   kv_row + i * BLOCK_N, kv_col, it + i, STAGES)


@gluon.jit
def _kv_blocks(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr):
    """K/V blocks a program of 2 x BLOCK_M query rows from m0 visits (causal: up to its last
    row's diagonal)."""
    if CAUSAL:
        hi = gl.minimum(seqlen_k, m0 + 2 * BLOCK_M + seqlen_k - seqlen_q)
        n_blocks = gl.maximum(hi + BLOCK_N - 1, 0) // BLOCK_N
    else:
        n_blocks = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    return n_blocks


@gluon.jit
def _diag_blocks(diag, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 CAUSAL: gl.constexpr):
    """(n_full, n_mine) of a warpgroup's BLOCK_M rows, key j allowed for its row r iff
    j <= r + diag: blocks 0..n_full-1 need no mask, blocks n_mine.. have no allowed key."""
    if CAUSAL:
        n_full = gl.minimum(gl.maximum(diag + 1, 0) // BLOCK_N, n_blocks)
        n_mine = gl.minimum(gl.maximum(diag + BLOCK_M + BLOCK_N - 1, 0) // BLOCK_N, n_blocks)
    else:
        n_full = n_blocks
        n_mine = n_blocks
    return n_full, n_mine


@gluon.jit
def _release(k_ready, v_ready, kv_empty, turn, lo, hi, it, t, HALF: gl.constexpr,
             STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """Blocks lo..hi-1 (ring slots it + i) lie wholly above this warpgroup's diagonal: release
    them once loaded; with PINGPONG take turn t + i all the same (in step with the other)."""
    for i in range(lo, hi):
        s = (it + i) % STAGES
        ph = ((it + i) // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        mbarrier.wait(v_ready.index(s), ph)
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), (t + i) & 1)
            mbarrier.arrive(turn.index(1 - HALF))
        mbarrier.arrive(kv_empty.index(s))


@gluon.jit
def _load(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
          q_row, kv_row, q_col, kv_col, n_blocks,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for j in gl.static_range(2):
        mbarrier.expect(q_bar.index(j), desc_q.block_type.nbytes)
        _tma_load(desc_q, [q_row + j * BLOCK_M, q_col], q_bar.index(j),
                  q_smem.index(j))
    _kv_loads(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, kv_empty, kv_row, kv_col, 0,
              n_blocks, BLOCK_N, STAGES)


@gluon.jit
def _online_softmax(qk, m_i, l_i, qk_scale):
    """One block's online-softmax update in the log2 domain (the scale folded into one FMA):
    (p, alpha = the rescale of what came before, the new row max, the new row sum)."""
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(qk * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _step(i, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc, m_i, l_i, qk_scale, diag,
          HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr,
          PINGPONG: gl.constexpr):
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = _a_operand(o_layout)
    s = i % STAGES
    ph = (i // STAGES) & 1
    mbarrier.wait(k_ready.index(s), ph)
    if PINGPONG:
        # my turn to issue matmuls: phase i of my barrier (the other warpgroup completes it)
        mbarrier.wait(turn.index(HALF), i & 1)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - HALF))
    if MASK:
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = cols[None, :] <= rows[:, None] + diag
        qk = gl.where(ok, qk, float("-inf"))
    p, alpha, m_new, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    mbarrier.wait(v_ready.index(s), ph)
    acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(kv_empty.index(s))
    return acc, m_new, l_i


@gluon.jit
def _mask(qk, i, n_full, diag, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    if i >= n_full:
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qk = gl.where(cols[None, :] <= rows[:, None] + diag, qk, float("-inf"))
    return qk


@gluon.jit
def _overlapped(q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc, m_i, l_i, qk_scale,
                diag, n_full, n_mine, it, t, HALF: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                PINGPONG: gl.constexpr):
    """FA3's intra-warpgroup overlap over this warpgroup's blocks 0..n_mine-1 (ring slot of
    block i: it + i): block i's S = Q K_i^T and block i-1's O += P V run on the tensor cores
    while this warpgroup does block i's softmax (waits: S first, then O).
    PINGPONG: the two warpgroups take turns issuing (turn t + i: issue, then hand over without
    waiting for the results), so one's softmax runs under the other's matmuls; turns
    t..t+n_mine here, one per skipped block after (the caller), the same count in both."""
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = _a_operand(o_layout)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if n_mine > 0:
        s = it % STAGES
        ph = (it // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), t & 1)
        qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False,
                           is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF))
        qk = warpgroup_mma_wait(0, deps=(qk,))
        qk = _mask(qk, 0, n_full, diag, BLOCK_M, BLOCK_N, s_layout)
        m_i = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        m_use = gl.where(m_i == float("-inf"), 0.0, m_i)
        p = gl.exp2(qk * qk_scale - m_use[:, None])
        l_i = gl.sum(p, 1)
        p16 = gl.convert_layout(p.to(k_smem.dtype), p_layout)
        for i in range(1, n_mine):
            s = (it + i) % STAGES
            ph = ((it + i) // STAGES) & 1
            sp = (it + i - 1) % STAGES
            php = ((it + i - 1) // STAGES) & 1
            mbarrier.wait(k_ready.index(s), ph)
            mbarrier.wait(v_ready.index(sp), php)
            if PINGPONG:
                mbarrier.wait(turn.index(HALF), (t + i) & 1)
            qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False,
                               is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            acc = warpgroup_mma(p16, v_smem.index(sp), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - HALF))
            qk = _mask(qk, i, n_full, diag, BLOCK_M, BLOCK_N, s_layout)
            p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
            p16_next = gl.convert_layout(p.to(k_smem.dtype), p_layout)
            # QK^T is retired by a wait(0) before PV is issued: after a wait_group 1 ptxas
            # waited for PV too before the softmax wrote the score registers (SASS, call A:
            # no overlap at all); this way PV runs under the softmax
            acc, p16, p16_next = warpgroup_mma_wait(0, deps=(acc, p16, p16_next))
            mbarrier.arrive(kv_empty.index(sp))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p16 = p16_next
        s = (it + n_mine - 1) % STAGES
        ph = ((it + n_mine - 1) // STAGES) & 1
        mbarrier.wait(v_ready.index(s), ph)
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), (t + n_mine) & 1)
        acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF))
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(s))
    elif PINGPONG:  # the turn all the same
        mbarrier.wait(turn.index(HALF), t & 1)
        mbarrier.arrive(turn.index(1 - HALF))
    return acc, m_i, l_i


@gluon.jit
def _fwd_store(O, LSE, R, out, m_i, l_i, b, h, row0, seqlen_q, stride_ob, stride_om, stride_oh,
               stride_lb, stride_lh, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_DIM: gl.constexpr, RESID: gl.constexpr):
    """The forward's epilogue for one warpgroup's rows: out (normalized, float32) into O, its
    rounding error into R (RESID: for the backward's delta = rowsum(dO * O)), the natural-log
    lse into LSE; rows with no allowed key (l == 0) get lse -inf (their out is 0)."""
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    rows_o = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    b64 = b.to(gl.int64)
    o_ptrs = (O + b64 * stride_ob + h * stride_oh + rows_o.to(gl.int64)[:, None] * stride_om
              + cols_o[None, :])
    o16 = out.to(O.dtype.element_ty)
    gl.store(o_ptrs, o16, mask=(rows_o < seqlen_q)[:, None])
    if RESID:
        r_ptrs = (R + b64 * stride_ob + h * stride_oh + rows_o.to(gl.int64)[:, None] * stride_om
                  + cols_o[None, :])
        gl.store(r_ptrs, (out - o16.to(gl.float32)).to(O.dtype.element_ty),
                 mask=(rows_o < seqlen_q)[:, None])
    rows_l = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.where(l_i == 0.0, float("-inf"),
                   (m_i + gl.log2(gl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453)
    gl.store(LSE + b64 * stride_lb + h * stride_lh + rows_l, lse, mask=rows_l < seqlen_q)


@gluon.jit
def _consume(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, O, LSE, R,
             b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale,
             stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
             HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
             PINGPONG: gl.constexpr, RESID: gl.constexpr, OVERLAP: gl.constexpr):
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    row0 = m0 + HALF * BLOCK_M
    q = q_smem.index(HALF)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    # key j is allowed for this half's row r (0-based in the half) iff j <= r + diag
    diag = row0 + seqlen_k - seqlen_q
    n_full, n_mine = _diag_blocks(diag, n_blocks, BLOCK_M, BLOCK_N, CAUSAL)
    mbarrier.wait(q_bar.index(HALF), 0)
    if OVERLAP:
        acc, m_i, l_i = _overlapped(q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc,
                                    m_i, l_i, qk_scale, diag, n_full, n_mine, 0, 0, HALF,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG)
        # the skipped blocks' turns: i + 1 after the overlapped loop's extra turn
        _release(k_ready, v_ready, kv_empty, turn, n_mine, n_blocks, 0, 1, HALF, STAGES,
                 PINGPONG)
    else:
        for i in range(0, n_full):
            acc, m_i, l_i = _step(i, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc,
                                  m_i, l_i, qk_scale, diag, HALF, BLOCK_M, BLOCK_N, HEAD_DIM,
                                  STAGES, False, PINGPONG)
        for i in range(n_full, n_mine):
            acc, m_i, l_i = _step(i, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc,
                                  m_i, l_i, qk_scale, diag, HALF, BLOCK_M, BLOCK_N, HEAD_DIM,
                                  STAGES, True, PINGPONG)
        _release(k_ready, v_ready, kv_empty, turn, n_mine, n_blocks, 0, 0, HALF, STAGES,
                 PINGPONG)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    _fwd_store(O, LSE, R, out, m_i, l_i, b, h, row0, seqlen_q, stride_ob, stride_om, stride_oh,
               stride_lb, stride_lh, BLOCK_M, BLOCK_N, HEAD_DIM, RESID)


@gluon.jit
def _kv_ring(desc_k, desc_v, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr):
    """The K/V ring (STAGES slots) and its barriers, initialized: k_ready/v_ready filled by
    the loader's TMA, kv_empty released by both consumer warpgroups."""
    k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=2)
    return k_smem, v_smem, k_ready, v_ready, kv_empty


@gluon.jit
def attn_fwd_ws(desc_q, desc_k, desc_v, O, LSE, R, seqlen_q, seqlen_k, group, qk_scale,
                stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                RESID: gl.constexpr, OVERLAP: gl.constexpr, LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr):
    pid = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    if CAUSAL:
        pid = gl.num_programs(0) - 1 - pid  # heaviest query blocks first
    m0 = pid * (2 * BLOCK_M)
    n_blocks = _kv_blocks(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    q_row = b * seqlen_q + m0
    kv_row = b * seqlen_k
    q_col = h * HEAD_DIM
    kv_col = (h // group) * HEAD_DIM

    q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, BLOCK_M, HEAD_DIM], desc_q.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(q_bar.index(j), count=1)
        mbarrier.init(turn.index(j), count=1)
    k_smem, v_smem, k_ready, v_ready, kv_empty = _kv_ring(desc_k, desc_v, STAGES, BLOCK_N,
                                                           HEAD_DIM)
    fence_async_shared()  # the barriers' init, before the TMA unit uses them
    if PINGPONG:
        mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

    gl.warp_specialize([
        (_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, O, LSE, R,
                    b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale,
                    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                    0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, PINGPONG, RESID, OVERLAP)),
        (_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, O, LSE, R,
                    b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale,
                    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                    1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, PINGPONG, RESID, OVERLAP)),
        (_load, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row, kv_row, q_col, kv_col, n_blocks, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


# ----------------------------------------------------------------------------------------------
# forward, persistent form (PERSIST): the same partitions loop over (query block, head, batch)
# tiles, heaviest first when causal; ring, Q and turn counters run on across tiles. With one
# program per tile it is the form above.


@gluon.jit
def _p_tile(tile, hq, batch, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            CAUSAL: gl.constexpr):
    """(b, h, m0, n_blocks) of tile `tile`: (batch, head) slowest, so the programs running at
    once share a few heads' K/V in L2 (query-block-major order streamed every head's K/V at
    once: 435 vs 548 TFLOP/s at d128 S4k in call A); query blocks heaviest first when causal."""
    n_m = (seqlen_q + 2 * BLOCK_M - 1) // (2 * BLOCK_M)
    bh = tile // n_m
    mi = tile - bh * n_m
    b = bh // hq
    h = bh - b * hq
    if CAUSAL:
        mi = n_m - 1 - mi
    m0 = mi * (2 * BLOCK_M)
    return b, h, m0, _kv_blocks(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)


@gluon.jit
def _p_load(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
            kv_empty, n_tiles, hq, batch, seqlen_q, seqlen_k, group,
            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    it = 0
    j = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, n_blocks = _p_tile(tile, hq, batch, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                                     CAUSAL)
        for half in gl.static_range(2):
            mbarrier.wait(q_empty.index(half), (j & 1) ^ 1)
            mbarrier.expect(q_bar.index(half), desc_q.block_type.nbytes)
            _tma_load(desc_q, [b * seqlen_q + m0 + half * BLOCK_M, h * HEAD_DIM],
                      q_bar.index(half), q_smem.index(half))
        _kv_loads(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, kv_empty, b * seqlen_k,
                  (h // group) * HEAD_DIM, it, n_blocks, BLOCK_N, STAGES)
        it += n_blocks
        j += 1


@gluon.jit
def _p_consume(q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn, O, LSE,
               R, n_tiles, hq, batch, seqlen_q, seqlen_k, qk_scale,
               stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
               HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
               PINGPONG: gl.constexpr, RESID: gl.constexpr):
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    q = q_smem.index(HALF)
    it = 0
    t = 0
    j = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, n_blocks = _p_tile(tile, hq, batch, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                                     CAUSAL)
        row0 = m0 + HALF * BLOCK_M
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        diag = row0 + seqlen_k - seqlen_q
        n_full, n_mine = _diag_blocks(diag, n_blocks, BLOCK_M, BLOCK_N, CAUSAL)
        mbarrier.wait(q_bar.index(HALF), j & 1)
        acc, m_i, l_i = _overlapped(q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, acc,
                                    m_i, l_i, qk_scale, diag, n_full, n_mine, it, t, HALF,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG)
        # Q is read by this tile's last QK^T, complete now: the loader may refill it
        mbarrier.arrive(q_empty.index(HALF))
        _release(k_ready, v_ready, kv_empty, turn, n_mine, n_blocks, it, t + 1, HALF, STAGES,
                 PINGPONG)
        it += n_blocks
        t += n_blocks + 1
        j += 1
        # epilogue (overlaps the loader's next tile)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc * (1.0 / gl.where(l_o == 0.0, 1.0, l_o))[:, None]
        _fwd_store(O, LSE, R, out, m_i, l_i, b, h, row0, seqlen_q, stride_ob, stride_om,
                   stride_oh, stride_lb, stride_lh, BLOCK_M, BLOCK_N, HEAD_DIM, RESID)


@gluon.jit
def attn_fwd_persist(desc_q, desc_k, desc_v, O, LSE, R, n_tiles, hq, batch, seqlen_q, seqlen_k,
                     group, qk_scale, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                     RESID: gl.constexpr, LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr):
    """The forward (overlapped, optionally ping-pong) over tiles program_id, +num_programs, ..."""
    q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, BLOCK_M, HEAD_DIM], desc_q.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(q_bar.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=1)
        mbarrier.init(turn.index(j), count=1)
    k_smem, v_smem, k_ready, v_ready, kv_empty = _kv_ring(desc_k, desc_v, STAGES, BLOCK_N,
                                                          HEAD_DIM)
    fence_async_shared()  # the barriers' init, before the TMA unit uses them
    if PINGPONG:
        mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first
    gl.warp_specialize([
        (_p_consume, (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                      O, LSE, R, n_tiles, hq, batch, seqlen_q, seqlen_k, qk_scale,
                      stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                      0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, PINGPONG, RESID)),
        (_p_consume, (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                      O, LSE, R, n_tiles, hq, batch, seqlen_q, seqlen_k, qk_scale,
                      stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                      1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, PINGPONG, RESID)),
        (_p_load, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                   v_ready, kv_empty, n_tiles, hq, batch, seqlen_q, seqlen_k, group,
                   HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


# ----------------------------------------------------------------------------------------------
# backward: dK and dV (K/V stationary), FA3 style; dQ stays the Triton program


@gluon.jit
def _bwd_load(desc_q, desc_do, desc_k, desc_v, k_smem, v_smem, q_smem, do_smem, kv_bar,
              q_ready, do_ready, q_empty, b, hk, n0, seqlen_q, seqlen_k, m_lo, n_m, group,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    kv_row = b * seqlen_k + n0
    mbarrier.expect(kv_bar, 2 * (desc_k.block_type.nbytes + desc_v.block_type.nbytes))
    for j in gl.static_range(2):
        _tma_load(desc_k, [kv_row + j * BLOCK_N, hk * HEAD_DIM], kv_bar, k_smem.index(j))
        _tma_load(desc_v, [kv_row + j * BLOCK_N, hk * HEAD_DIM], kv_bar, v_smem.index(j))
    it = 0
    for g in range(group):
        q_col = (hk * group + g) * HEAD_DIM
        for mi in range(n_m):
            _ring_load(desc_q, desc_do, q_smem, do_smem, q_ready, do_ready, q_empty,
                       b * seqlen_q + m_lo + mi * BLOCK_M, q_col, it, STAGES)
            it += 1


@gluon.jit
def _bwd_consume(k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, do_ready, q_empty,
                 LSE, DELTA, DK, DV, b, hk, n0, seqlen_q, seqlen_k, m_lo, n_m, group,
                 qk_scale, sm_scale, stride_kb, stride_km, stride_kh, stride_lb, stride_lh,
                 SLOPES, stride_sb,
                 HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 ALIBI: gl.constexpr):
    # S^T, dP^T: keys x queries (BLOCK_N x BLOCK_M); dK, dV: keys x head_dim
    s_layout: gl.constexpr = _acc_layout(BLOCK_M)
    a_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = _a_operand(a_layout)
    k = k_smem.index(HALF)
    v = v_smem.index(HALF)
    key0 = n0 + HALF * BLOCK_N
    off = seqlen_k - seqlen_q
    keys = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    # ALiBi: the bias -slope |i + off - j| in log2 units; distances in float (exact small
    # integers), the keys' part converted once per program
    keys_f = (keys - off).to(gl.float32)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, a_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, a_layout)
    b64 = b.to(gl.int64)
    mbarrier.wait(kv_bar, 0)
    it = 0
    for g in range(group):
        h = hk * group + g
        lse_base = LSE + b64 * stride_lb + h * stride_lh
        delta_base = DELTA + b64 * stride_lb + h * stride_lh
        if ALIBI:
            slope2 = gl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
        else:
            slope2 = 0.0
        for mi in range(n_m):
            m = m_lo + mi * BLOCK_M
            s = it % STAGES
            ph = (it // STAGES) & 1
            # query i sees key j iff j <= i + off: this half's keys see none of this block
            # when key0 > m + BLOCK_M - 1 + off, and all of it when key0 + BLOCK_N - 1 <= m + off
            if CAUSAL:
                skip = key0 > m + BLOCK_M - 1 + off
            else:
                skip = False
            if skip:
                mbarrier.wait(q_ready.index(s), ph)
                mbarrier.wait(do_ready.index(s), ph)
            else:
                cols = m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
                lse = gl.load(lse_base + cols)
                delta = gl.load(delta_base + cols)
                # rows with no allowed key carry lse = -inf: their p is exactly 0
                lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                mbarrier.wait(q_ready.index(s), ph)
                st = warpgroup_mma(k, q_smem.index(s).permute((1, 0)), zero, use_acc=False,
                                   is_async=True)
                # each wait retires everything in flight: after a wait_group 1 ptxas waits for
                # all groups before a retired accumulator's registers are rewritten, so the
                # exps run under dP^T and dS under dV only this way
                st = warpgroup_mma_wait(0, deps=(st,))
                mbarrier.wait(do_ready.index(s), ph)
                dpt = warpgroup_mma(v, do_smem.index(s).permute((1, 0)), zero, use_acc=False,
                                    is_async=True)
                if ALIBI:
                    dist = gl.abs(cols.to(gl.float32)[None, :] - keys_f[:, None])
                    pt = gl.exp2(st * qk_scale - (lse2[None, :] + slope2 * dist))
                else:
                    pt = gl.exp2(st * qk_scale - lse2[None, :])
                if CAUSAL:
                    if key0 + BLOCK_N - 1 > m + off:
                        pt = gl.where(keys[:, None] <= cols[None, :] + off, pt, 0.0)
                pt16 = gl.convert_layout(pt.to(q_smem.dtype), p_layout)
                dpt = warpgroup_mma_wait(0, deps=(dpt,))
                dv = warpgroup_mma(pt16, do_smem.index(s), dv, is_async=True)
                dst = pt * (dpt - delta[None, :])
                ds16 = gl.convert_layout((dst * sm_scale).to(q_smem.dtype), p_layout)
                dk = warpgroup_mma(ds16, q_smem.index(s), dk, is_async=True)
                dv, dk, pt16, ds16 = warpgroup_mma_wait(0, deps=(dv, dk, pt16, ds16))
            mbarrier.arrive(q_empty.index(s))
            it += 1
    rows = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
    cols_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
    offs = (b64 * stride_kb + hk * stride_kh + rows.to(gl.int64)[:, None] * stride_km
            + cols_d[None, :])
    ok = (rows < seqlen_k)[:, None]
    gl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon.jit
def attn_bwd_dkdv_ws(desc_q, desc_do, desc_k, desc_v, LSE, DELTA, DK, DV, seqlen_q, seqlen_k,
                     group, qk_scale, sm_scale, stride_kb, stride_km, stride_kh,
                     stride_lb, stride_lh, SLOPES, stride_sb,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, LOAD_REGS: gl.constexpr,
                     MMA_REGS: gl.constexpr, ALIBI: gl.constexpr = False):
    """One program per (2 x BLOCK_N keys, KV head, batch): a TMA load warp streams the GQA
    group's Q and dO tiles (BLOCK_M rows) through a STAGES ring; two consumer warpgroups, one
    per BLOCK_N-key half, hold K, V (shared memory) and dK, dV (registers) and run S^T = K Q^T,
    dP^T = V dO^T, dV += P^T dO, dK += (scale dS^T) Q on wgmma (P^T and dS^T from registers).
    DK/DV share strides (dk and dv are allocated alike). Sq must be a multiple of BLOCK_M.
    ALIBI: float32 slopes at SLOPES + b * stride_sb + h (stride_sb 0: (Hq,) slopes); the bias
    enters P only (dS = P (dP - delta) and dK = scale dS^T Q keep their form)."""
    pid = gl.program_id(0)
    hk = gl.program_id(1)
    b = gl.program_id(2)
    n0 = pid * (2 * BLOCK_N)
    if CAUSAL:  # the first query that sees key n0: i >= n0 - off
        m_lo = (gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
    n_m = gl.maximum(seqlen_q - m_lo, 0) // BLOCK_M

    k_smem = gl.allocate_shared_memory(desc_k.dtype, [2, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(desc_v.dtype, [2, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_smem = gl.allocate_shared_memory(desc_q.dtype, [STAGES, BLOCK_M, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(desc_do.dtype, [STAGES, BLOCK_M, HEAD_DIM],
                                        desc_do.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(s), count=1)
        mbarrier.init(do_ready.index(s), count=1)
        mbarrier.init(q_empty.index(s), count=2)
    fence_async_shared()  # the barriers' init, before the TMA unit uses them

    gl.warp_specialize([
        (_bwd_consume, (k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, do_ready, q_empty,
                        LSE, DELTA, DK, DV, b, hk, n0, seqlen_q, seqlen_k, m_lo, n_m, group,
                        qk_scale, sm_scale, stride_kb, stride_km, stride_kh, stride_lb,
                        stride_lh, SLOPES, stride_sb,
                        0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ALIBI)),
        (_bwd_consume, (k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, do_ready, q_empty,
                        LSE, DELTA, DK, DV, b, hk, n0, seqlen_q, seqlen_k, m_lo, n_m, group,
                        qk_scale, sm_scale, stride_kb, stride_km, stride_kh, stride_lb,
                        stride_lh, SLOPES, stride_sb,
                        1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ALIBI)),
        (_bwd_load, (desc_q, desc_do, desc_k, desc_v, k_smem, v_smem, q_smem, do_smem, kv_bar,
                     q_ready, do_ready, q_empty, b, hk, n0, seqlen_q, seqlen_k, m_lo, n_m, group,
                     BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


# ----------------------------------------------------------------------------------------------
# backward: dQ (Q stationary, K/V streamed), the forward's structure


@gluon.jit
def _dq_load(desc_q, desc_do, desc_k, desc_v, q_smem, do_smem, k_smem, v_smem, q_bar, k_ready,
             v_ready, kv_empty, q_row, kv_row, q_col, kv_col, n_blocks,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for j in gl.static_range(2):
        mbarrier.expect(q_bar.index(j), 2 * desc_q.block_type.nbytes)
        _tma_load(desc_q, [q_row + j * BLOCK_M, q_col], q_bar.index(j), q_smem.index(j))
        _tma_load(desc_do, [q_row + j * BLOCK_M, q_col], q_bar.index(j), do_smem.index(j))
    _kv_loads(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, kv_empty, kv_row, kv_col, 0,
              n_blocks, BLOCK_N, STAGES)


@gluon.jit
def _dq_consume(q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, LSE, DELTA,
                DQ, b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale, log2_scale,
                stride_qb, stride_qm, stride_qh, stride_lb, stride_lh, SLOPES, stride_sb,
                HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                OVERLAP: gl.constexpr, ALIBI: gl.constexpr):
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    a_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = _a_operand(a_layout)
    row0 = m0 + HALF * BLOCK_M
    q = q_smem.index(HALF)
    do = do_smem.index(HALF)
    b64 = b.to(gl.int64)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + b64 * stride_lb + h * stride_lh + rows, mask=rows < seqlen_q,
                  other=float("-inf"))
    delta = gl.load(DELTA + b64 * stride_lb + h * stride_lh + rows, mask=rows < seqlen_q,
                    other=0.0)
    # p * scale = exp2(s2 - lse2): dS * scale comes out of the same FMA (as the Triton dQ)
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634 - log2_scale)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, a_layout)
    diag = row0 + seqlen_k - seqlen_q
    if ALIBI:  # the bias -slope |i + off - j| in log2 units (distances in float, exact)
        slope2 = gl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
        rows_f = (rows + (seqlen_k - seqlen_q)).to(gl.float32)
    else:
        slope2 = 0.0
        rows_f = rows.to(gl.float32)
    n_full, n_mine = _diag_blocks(diag, n_blocks, BLOCK_M, BLOCK_N, CAUSAL)
    mbarrier.wait(q_bar.index(HALF), 0)
    # OVERLAP: block i's dQ += dS K stays in flight under block i+1's S and dP (wait_group 2
    # after issuing those retires it; its slot is released then)
    ds16 = gl.zeros([BLOCK_M, BLOCK_N], q_smem.dtype, p_layout)
    if OVERLAP:
        dq = warpgroup_mma_init(dq)  # the loop carries an in-flight accumulator
    for i in range(0, n_mine):
        s = i % STAGES
        ph = (i // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        st = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False,
                           is_async=True)
        if OVERLAP:
            dq, ds16 = warpgroup_mma_wait(1, deps=(dq, ds16))
            mbarrier.arrive(kv_empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        # S retired by wait(0) before dP is issued: the exps then run under dP (after a
        # wait_group 1 ptxas waits for everything before the score registers are rewritten)
        st = warpgroup_mma_wait(0, deps=(st,))
        mbarrier.wait(v_ready.index(s), ph)
        dp = warpgroup_mma(do, v_smem.index(s).permute((1, 0)), zero, use_acc=False,
                           is_async=True)
        if ALIBI:
            keys_f = (i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                      ).to(gl.float32)
            dist = gl.abs(rows_f[:, None] - keys_f[None, :])
            p = gl.exp2(st * qk_scale - (lse2[:, None] + slope2 * dist))
        else:
            p = gl.exp2(st * qk_scale - lse2[:, None])
        if CAUSAL:
            if i >= n_full:
                cols = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                p = gl.where(cols[None, :] <= (rows - row0)[:, None] + diag, p, 0.0)
        dp = warpgroup_mma_wait(0, deps=(dp,))
        ds16 = gl.convert_layout((p * (dp - delta[:, None])).to(q_smem.dtype), p_layout)
        dq = warpgroup_mma(ds16, k_smem.index(s), dq, is_async=True)
        if not OVERLAP:
            dq, ds16 = warpgroup_mma_wait(0, deps=(dq, ds16))
            mbarrier.arrive(kv_empty.index(s))
    if OVERLAP:
        dq, ds16 = warpgroup_mma_wait(0, deps=(dq, ds16))
        mbarrier.arrive(kv_empty.index((n_mine + STAGES - 1) % STAGES), pred=n_mine > 0)
    _release(k_ready, v_ready, kv_empty, kv_empty, n_mine, n_blocks, 0, 0, HALF, STAGES, False)
    rows_o = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
    ptrs = (DQ + b64 * stride_qb + h * stride_qh + rows_o.to(gl.int64)[:, None] * stride_qm
            + cols_o[None, :])
    gl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=(rows_o < seqlen_q)[:, None])


@gluon.jit
def attn_bwd_dq_ws(desc_q, desc_do, desc_k, desc_v, LSE, DELTA, DQ, seqlen_q, seqlen_k, group,
                   qk_scale, log2_scale, stride_qb, stride_qm, stride_qh, stride_lb, stride_lh,
                   SLOPES, stride_sb,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, LOAD_REGS: gl.constexpr,
                   MMA_REGS: gl.constexpr, OVERLAP: gl.constexpr = False,
                   ALIBI: gl.constexpr = False):
    """dQ without atomics (deterministic): one program = 2 x BLOCK_M query rows of one (batch,
    head), the forward's partitions (a TMA load warp streaming K/V; one consumer warpgroup per
    half: S = Q K^T, dP = dO V^T, dQ += (scale dS) K on wgmma, dS from registers). dq shares
    q's strides."""
    pid = gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    if CAUSAL:
        pid = gl.num_programs(0) - 1 - pid
    m0 = pid * (2 * BLOCK_M)
    n_blocks = _kv_blocks(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, BLOCK_M, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(desc_do.dtype, [2, BLOCK_M, HEAD_DIM], desc_do.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(q_bar.index(j), count=1)
    k_smem, v_smem, k_ready, v_ready, kv_empty = _kv_ring(desc_k, desc_v, STAGES, BLOCK_N,
                                                          HEAD_DIM)
    fence_async_shared()  # the barriers' init, before the TMA unit uses them
    q_row = b * seqlen_q + m0
    kv_row = b * seqlen_k
    q_col = h * HEAD_DIM
    kv_col = (h // group) * HEAD_DIM
    gl.warp_specialize([
        (_dq_consume, (q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, LSE,
                       DELTA, DQ, b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale, log2_scale,
                       stride_qb, stride_qm, stride_qh, stride_lb, stride_lh, SLOPES, stride_sb,
                       0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, ALIBI)),
        (_dq_consume, (q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, LSE,
                       DELTA, DQ, b, h, m0, seqlen_q, seqlen_k, n_blocks, qk_scale, log2_scale,
                       stride_qb, stride_qm, stride_qh, stride_lb, stride_lh, SLOPES, stride_sb,
                       1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, ALIBI)),
        (_dq_load, (desc_q, desc_do, desc_k, desc_v, q_smem, do_smem, k_smem, v_smem, q_bar,
                    k_ready, v_ready, kv_empty, q_row, kv_row, q_col, kv_col, n_blocks,
                    BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


# ----------------------------------------------------------------------------------------------
# host side

# (BLOCK_M per warpgroup, BLOCK_N, STAGES, PINGPONG, OVERLAP, LOAD_REGS, MMA_REGS) per head_dim;
# FLASHMUX_TRITON_GLUON_CFG="bm,bn,stages[,pingpong[,overlap]]" overrides (sweeps). OVERLAP:
# FA3's intra-warpgroup overlap; with PINGPONG too, FA3's schedule (turns to issue).
# PERSIST (the 6th field): 0 the one-tile-per-program kernel `attn_fwd_ws`; 1
# `attn_fwd_persist` on one program per SM; 2 `attn_fwd_persist` on one program per tile (it is
# always overlapped: OVERLAP is implied)
CONFIGS = {64: (64, 128, 3, False, False, 24, 240, 0), 128: (64, 128, 2, False, False, 24, 240, 0)}


def config(d: int):
    env = os.environ.get("FLASHMUX_TRITON_GLUON_CFG")
    bm, bn, st, pp, ov, lr, mr, ps = CONFIGS[d]
    if env:
        parts = [int(x) for x in env.split(",")]
        bm, bn, st = parts[:3]
        pp = bool(parts[3]) if len(parts) > 3 else pp
        ov = bool(parts[4]) if len(parts) > 4 else ov
        ps = parts[5] if len(parts) > 5 else ps
    return bm, bn, st, pp, ov, lr, mr, ps


_SMS: dict = {}


def _sm_count(device) -> int:
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def causal_of(params) -> bool:
    """The Gluon kernels' causal mask (j <= i + Sk - Sq): the core folds causal into
    window_right = 0 (flashmux.spec.Params), which is all `_common_reasons` lets through."""
    return params.window_right is not None


def _common_reasons(q, k, v, params, capability, varlen: bool) -> str | None:
    """Why the Gluon kernels cannot take this call at all (None: they can)."""
    import torch

    if capability is None or capability[0] != 9:
        return f"the Gluon kernels are for sm_90 (Hopper), this device is {capability}"
    if varlen:
        return "the Gluon kernels take no varlen (cu_seqlens) calls"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the Gluon kernels take float16/bfloat16 q, k, v, got {q.dtype}"
    d = q.shape[-1]
    if d not in CONFIGS or k.shape[-1] != d or v.shape[-1] != d:
        return f"the Gluon kernels take head_dim 64 or 128 with Dv == D, got D={d} Dv={v.shape[-1]}"
    if params.window_left is not None or params.window_right not in (None, 0):
        return "the Gluon kernels take no window other than causal (window_right = 0)"
    if (params.softcap or 0) > 0 or params.dropout_p > 0 or not params.scale > 0:
        return "the Gluon kernels take no softcap, dropout or non-positive scale"
    if k.shape[1] == 0:
        return "the Gluon kernels take no empty key sequence (the Triton kernel writes its zeros)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not _rows_view_ok(x, d):
            return f"the Gluon kernels need {name} as rows of contiguous heads (TMA views)"
    return None


def reasons(q, k, v, params, capability, varlen: bool) -> str | None:
    """None when the Gluon forward computes this call, else a sentence saying why not."""
    why = _common_reasons(q, k, v, params, capability, varlen)
    if why is not None:
        return why
    bn = config(q.shape[-1])[1]
    if k.shape[1] % bn:
        return f"the Gluon forward needs seqlen_k to be a multiple of {bn}, got {k.shape[1]}"
    return None


def _rows_view_ok(x, d: int) -> bool:
    """x (B, S, H, d) can be seen as a (B*S, H*d) TMA view."""
    return not (x.stride(-1) != 1 or x.stride(-2) != d or x.stride(0) != x.shape[1] * x.stride(1)
                or (x.stride(1) * x.element_size()) % 16 or x.data_ptr() % 16)


def _gl_dtype(torch_dtype):
    import torch

    return gl.bfloat16 if torch_dtype == torch.bfloat16 else gl.float16


def _desc(x, rows_block: int, d: int):
    rows = x.shape[0] * x.shape[1]
    layout = gl.NVMMASharedLayout.get_default_for([rows_block, d], _gl_dtype(x.dtype))
    return TensorDescriptor(x, [rows, x.shape[2] * d], [x.stride(1), 1], [rows_block, d], layout)


def forward(q, k, v, out, lse, res, seqlen_q: int, seqlen_k: int, causal: bool, scale: float):
    """Fill out (B, Sq, Hq, D), lse (B, Hq, Sq) float32 and, when not None, res (out's rounding
    error, out's layout); `reasons` must have said None."""
    batch, _, hq, d = q.shape
    bm, bn, stages, pingpong, overlap, load_regs, mma_regs, persist = config(d)
    desc_q = _desc(q, bm, d)
    desc_k = _desc(k, bn, d)
    desc_v = _desc(v, bn, d)
    if persist:
        n_tiles = triton.cdiv(seqlen_q, 2 * bm) * hq * batch
        # FLASHMUX_TRITON_GLUON_PROGRAMS caps the programs (tests: many tiles per program)
        progs = int(os.environ.get("FLASHMUX_TRITON_GLUON_PROGRAMS", 0)) or _sm_count(q.device)
        grid = (min(n_tiles, progs) if persist == 1 else n_tiles,)
        attn_fwd_persist[grid](
            desc_q, desc_k, desc_v, out, lse, out if res is None else res, n_tiles, hq, batch,
            seqlen_q, seqlen_k, hq // k.shape[2], scale * LOG2E,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
            PINGPONG=pingpong, RESID=res is not None, LOAD_REGS=load_regs, MMA_REGS=mma_regs,
            num_warps=4,
        )
        return
    grid = (triton.cdiv(seqlen_q, 2 * bm), hq, batch)
    attn_fwd_ws[grid](
        desc_q, desc_k, desc_v, out, lse, out if res is None else res, seqlen_q, seqlen_k, hq // k.shape[2], scale * LOG2E,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal, PINGPONG=pingpong,
        RESID=res is not None, OVERLAP=overlap, LOAD_REGS=load_regs, MMA_REGS=mma_regs, num_warps=4,
    )


def _compile_sm90(kern, consts: dict, d: int, dtype: str, desc_rows: dict):
    """Compile a Gluon kernel for sm_90a without a GPU (no torch needed): TMA descriptors of
    desc_rows[name] x d tiles; pointers (UPPER-case: LSE, DELTA, SLOPES float32, the others
    `dtype`) and strides 16-byte aligned, as a launch sees them; the scales float32; other
    arguments int32. Returns the CompiledKernel (asm["ptx"], asm["ttgir"], asm["cubin"],
    metadata.shared)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    sig, attrs = {}, {}
    for i, name in enumerate(kern.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in desc_rows:
            layout = gl.NVMMASharedLayout.get_default_for([desc_rows[name], d], gdt)
            sig[name] = f"tensordesc<{dtype}[{desc_rows[name]}, {d}],{layout!r}>"
        elif name in ("qk_scale", "sm_scale", "log2_scale"):
            sig[name] = "fp32"
        elif name.isupper():
            sig[name] = "*fp32" if name in ("LSE", "DELTA", "SLOPES") else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(kern, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _override(defaults, *values):
    """The config tuple `defaults` with each value that is not None in its place."""
    return [d if v is None else v for d, v in zip(defaults, values)]


def compile_sm90(d: int = 128, causal: bool = False, bm=None, bn=None, stages=None,
                 pingpong=None, overlap=None, load_regs=None, mma_regs=None,
                 dtype: str = "bf16", resid: bool = True, persist=None):
    """Compile the forward (attn_fwd_ws, or attn_fwd_persist when persist) for sm_90a without
    a GPU, at config(d) but for the arguments given (`_compile_sm90`)."""
    bm, bn, stages, pingpong, overlap, load_regs, mma_regs, persist = _override(
        config(d), bm, bn, stages, pingpong, overlap, load_regs, mma_regs, persist)
    consts = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
                  PINGPONG=pingpong, RESID=resid, LOAD_REGS=load_regs, MMA_REGS=mma_regs)
    if not persist:
        consts["OVERLAP"] = overlap
    return _compile_sm90(attn_fwd_persist if persist else attn_fwd_ws, consts, d, dtype,
                         dict(desc_q=bm, desc_k=bn, desc_v=bn))


BWD_CONFIGS = {64: (64, 64, 2, 24, 240), 128: (64, 64, 2, 24, 240)}


def bwd_config(d: int):
    """(BLOCK_M queries, BLOCK_N keys per warpgroup, STAGES, LOAD_REGS, MMA_REGS) of the dK/dV
    program; FLASHMUX_TRITON_GLUON_BWD_CFG="bm,bn,stages" overrides (sweeps)."""
    bm, bn, st, lr, mr = BWD_CONFIGS[d]
    env = os.environ.get("FLASHMUX_TRITON_GLUON_BWD_CFG")
    if env:
        bm, bn, st = (int(x) for x in env.split(",")[:3])
    return bm, bn, st, lr, mr


def bwd_reasons(q, k, v, do, params, capability, varlen: bool) -> str | None:
    """None when the Gluon dK/dV program computes this call's backward, else why not."""
    why = _common_reasons(q, k, v, params, capability, varlen)
    if why is not None:
        return why
    bm = bwd_config(q.shape[-1])[0]
    if q.shape[1] % bm:
        return f"the Gluon backward needs seqlen_q to be a multiple of {bm}, got {q.shape[1]}"
    if do.dtype != q.dtype or do.shape != q.shape or not _rows_view_ok(do, q.shape[-1]):
        return "the Gluon backward needs dout like q, as rows of contiguous heads (TMA views)"
    return None


def backward_dkdv(q, k, v, do, lse, delta, dk, dv, seqlen_q: int, seqlen_k: int, causal: bool,
                  scale: float, slopes=None, stride_sb: int = 0):
    """dK, dV into dk, dv (k's shape; `bwd_reasons` said None; lse/delta (B, Hq, Sq) float32,
    delta from the Triton preprocess; do laid out like q). slopes: ALiBi's float32 slopes,
    contiguous (Hq,) (stride_sb 0) or (B, Hq) (stride_sb Hq), or None."""
    batch, _, hkv, d = k.shape
    bm, bn, stages, load_regs, mma_regs = bwd_config(d)
    assert dk.stride() == dv.stride()
    grid = (triton.cdiv(seqlen_k, 2 * bn), hkv, batch)
    attn_bwd_dkdv_ws[grid](
        _desc(q, bm, d), _desc(do, bm, d), _desc(k, bn, d), _desc(v, bn, d), lse, delta, dk, dv,
        seqlen_q, seqlen_k, q.shape[2] // hkv, scale * LOG2E, scale,
        dk.stride(0), dk.stride(1), dk.stride(2), lse.stride(0), lse.stride(1),
        lse if slopes is None else slopes, stride_sb,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
        LOAD_REGS=load_regs, MMA_REGS=mma_regs, ALIBI=slopes is not None, num_warps=4,
    )


def compile_bwd_sm90(d: int = 128, causal: bool = False, bm=None, bn=None, stages=None,
                     load_regs=None, mma_regs=None, dtype: str = "bf16", alibi: bool = False):
    """Compile attn_bwd_dkdv_ws for sm_90a without a GPU (as `compile_sm90`)."""
    bm, bn, stages, load_regs, mma_regs = _override(bwd_config(d), bm, bn, stages, load_regs,
                                                    mma_regs)
    consts = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
                  LOAD_REGS=load_regs, MMA_REGS=mma_regs, ALIBI=alibi)
    return _compile_sm90(attn_bwd_dkdv_ws, consts, d, dtype,
                         dict(desc_q=bm, desc_do=bm, desc_k=bn, desc_v=bn))


DQ_CONFIGS = {64: (64, 64, 3, 24, 240, False), 128: (64, 64, 2, 24, 240, False)}


def dq_config(d: int):
    """(BLOCK_M per warpgroup, BLOCK_N, STAGES, LOAD_REGS, MMA_REGS, OVERLAP) of the dQ
    program; FLASHMUX_TRITON_GLUON_DQ_CFG="bm,bn,stages[,overlap]" overrides (sweeps)."""
    bm, bn, st, lr, mr, ov = DQ_CONFIGS[d]
    env = os.environ.get("FLASHMUX_TRITON_GLUON_DQ_CFG")
    if env:
        parts = [int(x) for x in env.split(",")]
        bm, bn, st = parts[:3]
        ov = bool(parts[3]) if len(parts) > 3 else ov
    return bm, bn, st, lr, mr, ov


def dq_reasons(q, k, v, do, params, capability, varlen: bool) -> str | None:
    """None when the Gluon dQ program computes this call's dQ, else why not."""
    why = _common_reasons(q, k, v, params, capability, varlen)
    if why is not None:
        return why
    if k.shape[1] % dq_config(q.shape[-1])[1]:
        return "the Gluon dQ needs seqlen_k to be a multiple of its key block"
    if do.dtype != q.dtype or do.shape != q.shape or not _rows_view_ok(do, q.shape[-1]):
        return "the Gluon backward needs dout like q, as rows of contiguous heads (TMA views)"
    return None


def backward_dq(q, k, v, do, lse, delta, dq, seqlen_q: int, seqlen_k: int, causal: bool,
                scale: float, slopes=None, stride_sb: int = 0):
    """dQ into dq (q's shape and strides; `dq_reasons` said None; slopes as backward_dkdv)."""
    import math

    batch, _, hq, d = q.shape
    bm, bn, stages, load_regs, mma_regs, overlap = dq_config(d)
    assert dq.stride() == q.stride()
    grid = (triton.cdiv(seqlen_q, 2 * bm), hq, batch)
    attn_bwd_dq_ws[grid](
        _desc(q, bm, d), _desc(do, bm, d), _desc(k, bn, d), _desc(v, bn, d), lse, delta, dq,
        seqlen_q, seqlen_k, hq // k.shape[2], scale * LOG2E, math.log2(scale),
        dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1),
        lse if slopes is None else slopes, stride_sb,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
        LOAD_REGS=load_regs, MMA_REGS=mma_regs, OVERLAP=overlap, ALIBI=slopes is not None,
        num_warps=4,
    )


def compile_dq_sm90(d: int = 128, causal: bool = False, bm=None, bn=None, stages=None,
                    load_regs=None, mma_regs=None, overlap=None, dtype: str = "bf16",
                    alibi: bool = False):
    """Compile attn_bwd_dq_ws for sm_90a without a GPU (as `compile_sm90`)."""
    bm, bn, stages, load_regs, mma_regs, overlap = _override(
        dq_config(d), bm, bn, stages, load_regs, mma_regs, overlap)
    consts = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, CAUSAL=causal,
                  LOAD_REGS=load_regs, MMA_REGS=mma_regs, OVERLAP=overlap, ALIBI=alibi)
    return _compile_sm90(attn_bwd_dq_ws, consts, d, dtype,
                         dict(desc_q=bm, desc_do=bm, desc_k=bn, desc_v=bn))
