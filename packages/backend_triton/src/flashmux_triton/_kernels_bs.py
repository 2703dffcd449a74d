"""Block-sparse Triton kernels (`attention(..., block_mask=)`): forward, dK/dV and dQ that visit
only the tiles a flashmux BlockMask lists (the paper's block-sparse FlashAttention, section 3.3).

The mask's tiles are MBS x MBS (its block_size); a kernel tile (BLOCK_M x BLOCK_N) divides them,
so a listed mask tile is visited as MBS/BLOCK_N (or MBS/BLOCK_M) kernel tiles. Per tile kind:

- full tiles: no element mask (only the sequence bound and causal/window when the call has them);
- partial tiles: the element mask is read from the BlockMask's per-tile bitmask, one int32 word
  per 32 keys of a row: a (BLOCK_M, BLOCK_N) tile gathers BLOCK_M * BLOCK_N / 32 distinct words
  (at MBS = 128, 2 KiB per mask tile, L2-resident), then one shift and one AND per element.
  Chosen over evaluating mask_fn in the kernel because mask_fn is Python over framework arrays:
  the bitmask serves every mask, and costs the same for a custom lambda as for a ready-made one;
- empty tiles are not listed, so never loaded.

Layout of the lists (int32, contiguous; bhm = (b if the mask has a batch axis) * Hm + (h if it
has a head axis)): q_num[bhm, qb], q_idx[bhm, qb, t] (key blocks, the first q_num of them), and
the transposed kv_num[bhm, kb], kv_idx[bhm, kb, t] for dK/dV; tile_id[bhm, qb, kb] indexes
bits[tid, row, word]. Scores are in log2 units as in `_kernels`; ALiBi adds -slope*|i+off-j|.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import _cast, _dot, _dot_acc, _dropout_keep, _tanh


@triton.jit
def _bits(BITS, tid, r_loc, c_loc, MBS: tl.constexpr):
    """Element mask of a partial tile for rows r_loc, cols c_loc (broadcast shapes): one
    gathered word per element (used for kernel tiles narrower than a 32-key word)."""
    WORDS: tl.constexpr = MBS // 32
    base = BITS + tid.to(tl.int64) * (MBS * WORDS)
    w = tl.load(base + r_loc * WORDS + (c_loc // 32))
    return ((w >> (c_loc % 32)) & 1) != 0


@triton.jit
def _bits_tile(BITS, tid, r_loc, c0, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, BLOCK_N) element mask of a partial tile for rows r_loc (1-D) and the BLOCK_N keys
    from c0 (a multiple of 32): loads the (rows, BLOCK_N / 32) words once and expands them."""
    WORDS: tl.constexpr = MBS // 32
    NW: tl.constexpr = BLOCK_N // 32
    base = BITS + tid.to(tl.int64) * (MBS * WORDS)
    w = tl.load(base + r_loc[:, None] * WORDS + (c0 // 32 + tl.arange(0, NW))[None, :])
    b = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(b, (r_loc.shape[0], BLOCK_N)) != 0


@triton.jit
def _bs_fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc, c_loc0,
    offs_m, offs_n, offs_d, offs_dv, start_n,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = start_n + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + cols[:, None] * stride_vs + offs_dv[None, :]
    if CHECK:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    s = _dot(q, kt, IEEE)
    if SOFTCAP:
        s = _tanh(s * scale_a) * scale_b
    else:
        s = s * scale_a
    if ALIBI:
        s = s - slope2 * tl.abs(offs_m[:, None] + diag_off - cols[None, :]).to(tl.float32)
    if CHECK or PARTIAL:
        ok = cols[None, :] < seqlen_k
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= offs_m[:, None] + diag_off - window_left)
        if HAS_RIGHT:
            ok = ok & (cols[None, :] <= offs_m[:, None] + diag_off + window_right)
        if PARTIAL:
            if BLOCK_N >= 32:
                ok = ok & _bits_tile(BITS, tid, r_loc, c_loc0, MBS, BLOCK_N)
            else:
                ok = ok & _bits(BITS, tid, r_loc[:, None], c_loc0 + offs_n[None, :], MBS)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], p_drop)
        p = tl.where(keep, p, 0.0)
    acc = _dot_acc(_cast(p, v.dtype), v, acc, IEEE)
    return acc, l_i, m_new


@triton.jit
def _in_band(start_n, n_len, row_first, row_last, diag_off, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Whether keys [start_n, start_n + n_len) meet the causal/window band of rows
    [row_first, row_last] at all."""
    ok = start_n >= 0
    if HAS_RIGHT:
        ok = ok & (start_n <= row_last + diag_off + window_right)
    if HAS_LEFT:
        ok = ok & (start_n + n_len - 1 >= row_first + diag_off - window_left)
    return ok


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_fwd(
    Q, K, V, O, LSE, R, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_sb,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, p_drop, drop_scale, seed, n_heads,
    mask_b, mask_h, mask_heads, n_qb, n_kb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MBS: tl.constexpr, CHECK_FULL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    RESID: tl.constexpr, ALIBI: tl.constexpr,
):
    """One program per (query block, query head, batch): the full tiles of its mask block's
    list, then the partial ones."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    hk = h // GROUP
    bh = b * n_heads + h
    diag_off = seqlen_k - seqlen_q
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
    qb = m0 // MBS
    row = (b * mask_b * mask_heads + h * mask_h) * n_qb + qb

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    r_loc = offs_m - qb * MBS
    q_base = Q + b64 * stride_qb + h * stride_qh
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    row_first = m0
    row_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # One flat loop per list (SUBS kernel tiles per mask tile), so the compiler can pipeline the
    # K/V loads across mask tiles. Without causal/window every listed tile is computed (a tail
    # tile past seqlen_k is masked by CHECK_FULL); with them, tiles outside the band are skipped.
    SUBS: tl.constexpr = MBS // BLOCK_N
    n_full = tl.load(QNF + row)
    for it in range(0, n_full * SUBS):
        kb = tl.load(QFI + row.to(tl.int64) * n_kb + it // SUBS)
        sub = (it % SUBS) * BLOCK_N
        start_n = kb * MBS + sub
        if HAS_LEFT or HAS_RIGHT:
            if _in_band(start_n, BLOCK_N, row_first, row_last, diag_off, window_left,
                        window_right, HAS_LEFT, HAS_RIGHT) & (start_n < seqlen_k):
                acc, l_i, m_i = _bs_fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, 0, r_loc, sub,
                    offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off, window_left,
                    window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, False,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                )
        else:
            acc, l_i, m_i = _bs_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, 0, r_loc, sub,
                offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off, window_left,
                window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, False,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
            )
    n_part = tl.load(QNP + row)
    for it in range(0, n_part * SUBS):
        kb = tl.load(QPI + row.to(tl.int64) * n_kb + it // SUBS)
        tid = tl.load(TILE + row.to(tl.int64) * n_kb + kb)
        sub = (it % SUBS) * BLOCK_N
        start_n = kb * MBS + sub
        if HAS_LEFT or HAS_RIGHT:
            if _in_band(start_n, BLOCK_N, row_first, row_last, diag_off, window_left,
                        window_right, HAS_LEFT, HAS_RIGHT) & (start_n < seqlen_k):
                acc, l_i, m_i = _bs_fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc, sub,
                    offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off, window_left,
                    window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, True, True,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                )
        else:
            acc, l_i, m_i = _bs_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc, sub,
                offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off, window_left,
                window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, True, True,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
            )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if DROPOUT:
        inv = inv * drop_scale
    acc = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_off = b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_dv[None, :]
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    o_low = _cast(acc, O.dtype.element_ty)
    tl.store(O + o_off, o_low, mask=o_mask)
    if RESID:
        tl.store(R + o_off, _cast(acc - o_low.to(tl.float32), O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + b64 * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _bs_dkdv_tile(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, sm_scale,
    BITS, tid, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, r_loc0,
    seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale,
    seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
    c_loc0=0,
):
    rows = start_m + offs_m
    rmask = rows < seqlen_q
    qt = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None],
                 mask=rmask[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dos + offs_dv[None, :],
                 mask=rmask[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse = tl.load(lse_base + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    st = _dot(k, qt, IEEE)  # (BLOCK_N, BLOCK_M): keys x queries
    if SOFTCAP:
        tt = _tanh(st * scale_a)
        st = tt * scale_b
    else:
        st = st * scale_a
    if ALIBI:
        st = st - slope2 * tl.abs(rows[None, :] + diag_off - offs_n[:, None]).to(tl.float32)
    pt = tl.exp2(st - lse2[None, :])
    if CHECK or PARTIAL:
        ok = rmask[None, :]
        if HAS_LEFT:
            ok = ok & (offs_n[:, None] >= rows[None, :] + diag_off - window_left)
        if HAS_RIGHT:
            ok = ok & (offs_n[:, None] <= rows[None, :] + diag_off + window_right)
        if PARTIAL:
            if BLOCK_N >= 32:  # the (rows, keys) words of this tile, transposed to (keys, rows)
                ok = ok & tl.trans(_bits_tile(BITS, tid, r_loc0 + offs_m, c_loc0, MBS, BLOCK_N))
            else:
                ok = ok & _bits(BITS, tid, r_loc0 + offs_m[None, :], c_loc[:, None], MBS)
        pt = tl.where(ok, pt, 0.0)
    dpt = _dot(v, tl.trans(do), IEEE)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows[None, :], offs_n[:, None], p_drop)
        pdt = tl.where(keep, pt * drop_scale, 0.0)
        dpt = tl.where(keep, dpt * drop_scale, 0.0)
    else:
        pdt = pt
    dv = _dot_acc(_cast(pdt, do.dtype), do, dv, IEEE)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tt * tt)
    ds_lo = _cast(dst * sm_scale, qt.dtype)
    dk = _dot_acc(ds_lo, tl.trans(qt), dk, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, KNF, KFI, KNP, KPI, TILE, BITS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_sb,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads,
    mask_b, mask_h, mask_heads, n_qb, n_kb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MBS: tl.constexpr, CHECK_FULL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr,
):
    """One program per (key block, KV head, batch): for each query head of the GQA group, the
    query blocks of the transposed lists (full, then partial); dK/dV summed without atomics."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    diag_off = seqlen_k - seqlen_q
    kb = n0 // MBS
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    c_loc = offs_n - kb * MBS
    k = tl.load(
        K + b64 * stride_kb + offs_n[:, None] * stride_ks + hk * stride_kh + offs_d[None, :],
        mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + offs_n[:, None] * stride_vs + hk * stride_vh + offs_dv[None, :],
        mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    SUBS: tl.constexpr = MBS // BLOCK_M  # flat loops over (mask tile, sub-tile), as the forward
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * n_heads + h
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
        bhm = b * mask_b * mask_heads + h * mask_h
        col = bhm * n_kb + kb
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE + b64 * stride_lb + h * stride_lh
        delta_base = DELTA + b64 * stride_lb + h * stride_lh
        n_full = tl.load(KNF + col)
        for it in range(0, n_full * SUBS):
            qb = tl.load(KFI + col.to(tl.int64) * n_qb + it // SUBS)
            sub = (it % SUBS) * BLOCK_M
            start_m = qb * MBS + sub
            if HAS_LEFT or HAS_RIGHT:
                # rows [start_m, start_m + BLOCK_M) meet keys [n0, n_last] (the band test, swapped)
                if _in_band(n0, n_last - n0 + 1, start_m, start_m + BLOCK_M - 1, diag_off,
                            window_left, window_right, HAS_LEFT, HAS_RIGHT) & (start_m < seqlen_q):
                    dk, dv = _bs_dkdv_tile(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                        sm_scale, BITS, 0, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, sub,
                        seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2,
                        p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
                        CHECK_FULL, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI,
                        BLOCK_N, n0 - kb * MBS,
                    )
            else:
                dk, dv = _bs_dkdv_tile(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                    sm_scale, BITS, 0, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, sub,
                    seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2,
                    p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
                    CHECK_FULL, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI,
                    BLOCK_N, n0 - kb * MBS,
                )
        n_part = tl.load(KNP + col)
        for it in range(0, n_part * SUBS):
            qb = tl.load(KPI + col.to(tl.int64) * n_qb + it // SUBS)
            tid = tl.load(TILE + (bhm * n_qb + qb).to(tl.int64) * n_kb + kb)
            sub = (it % SUBS) * BLOCK_M
            start_m = qb * MBS + sub
            if HAS_LEFT or HAS_RIGHT:
                if _in_band(n0, n_last - n0 + 1, start_m, start_m + BLOCK_M - 1, diag_off,
                            window_left, window_right, HAS_LEFT, HAS_RIGHT) & (start_m < seqlen_q):
                    dk, dv = _bs_dkdv_tile(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                        sm_scale, BITS, tid, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, sub,
                        seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2,
                        p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
                        True, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI,
                        BLOCK_N, n0 - kb * MBS,
                    )
            else:
                dk, dv = _bs_dkdv_tile(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                    sm_scale, BITS, tid, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, sub,
                    seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2,
                    p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
                    True, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI,
                    BLOCK_N, n0 - kb * MBS,
                )
    tl.store(
        DK + b64 * stride_dkb + offs_n[:, None] * stride_dks + hk * stride_dkh + offs_d[None, :],
        _cast(dk, DK.dtype.element_ty),
        mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(
        DV + b64 * stride_dvb + offs_n[:, None] * stride_dvs + hk * stride_dvh + offs_dv[None, :],
        _cast(dv, DV.dtype.element_ty),
        mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V),
    )


@triton.jit
def _bs_dq_tile(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc, c_loc0,
    offs_m, offs_n, offs_d, offs_dv, start_n,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale,
    seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = start_n + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
    vt_ptrs = v_base + cols[None, :] * stride_vs + offs_dv[:, None]
    if CHECK:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vt = tl.load(vt_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
    s = _dot(q, kt, IEEE)
    if SOFTCAP:
        t = _tanh(s * scale_a)
        s = t * scale_b
    else:
        s = s * scale_a
    if ALIBI:
        s = s - slope2 * tl.abs(offs_m[:, None] + diag_off - cols[None, :]).to(tl.float32)
    p = tl.exp2(s - lse2[:, None])
    if CHECK or PARTIAL:
        ok = cols[None, :] < seqlen_k
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= offs_m[:, None] + diag_off - window_left)
        if HAS_RIGHT:
            ok = ok & (cols[None, :] <= offs_m[:, None] + diag_off + window_right)
        if PARTIAL:
            if BLOCK_N >= 32:
                ok = ok & _bits_tile(BITS, tid, r_loc, c_loc0, MBS, BLOCK_N)
            else:
                ok = ok & _bits(BITS, tid, r_loc[:, None], c_loc0 + offs_n[None, :], MBS)
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, vt, IEEE)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], p_drop)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot_acc(_cast(ds, kt.dtype), tl.trans(kt), dq, IEEE)


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_sb,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads,
    mask_b, mask_h, mask_heads, n_qb, n_kb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MBS: tl.constexpr, CHECK_FULL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr,
):
    """One program per (query block, query head, batch), over the forward's lists."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    hk = h // GROUP
    bh = b * n_heads + h
    diag_off = seqlen_k - seqlen_q
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
    qb = m0 // MBS
    row = (b * mask_b * mask_heads + h * mask_h) * n_qb + qb
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    r_loc = offs_m - qb * MBS
    row_ok = offs_m < seqlen_q
    q = tl.load(
        Q + b64 * stride_qb + offs_m[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + offs_m[:, None] * stride_dos + h * stride_doh + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )
    row_ptr = b64 * stride_lb + h * stride_lh + offs_m
    lse = tl.load(LSE + row_ptr, mask=row_ok, other=0.0)
    # as in _kernels.attn_bwd_dq: p * scale straight from exp2 (scale > 0), else a multiply
    pos = sm_scale > 0
    shift = tl.where(pos, tl.log2(tl.where(pos, sm_scale, 1.0)), 0.0)
    post = tl.where(pos, 1.0, sm_scale)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634 - shift)
    delta = tl.load(DELTA + row_ptr, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    row_first = m0
    row_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    SUBS: tl.constexpr = MBS // BLOCK_N  # flat loops, as in the forward
    n_full = tl.load(QNF + row)
    for it in range(0, n_full * SUBS):
        kb = tl.load(QFI + row.to(tl.int64) * n_kb + it // SUBS)
        sub = (it % SUBS) * BLOCK_N
        start_n = kb * MBS + sub
        if HAS_LEFT or HAS_RIGHT:
            if _in_band(start_n, BLOCK_N, row_first, row_last, diag_off, window_left,
                        window_right, HAS_LEFT, HAS_RIGHT) & (start_n < seqlen_k):
                dq = _bs_dq_tile(
                    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, 0, r_loc,
                    sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                    window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale, seed,
                    bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, False,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                )
        else:
            dq = _bs_dq_tile(
                dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, 0, r_loc,
                sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale, seed,
                bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, False,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
            )
    n_part = tl.load(QNP + row)
    for it in range(0, n_part * SUBS):
        kb = tl.load(QPI + row.to(tl.int64) * n_kb + it // SUBS)
        tid = tl.load(TILE + row.to(tl.int64) * n_kb + kb)
        sub = (it % SUBS) * BLOCK_N
        start_n = kb * MBS + sub
        if HAS_LEFT or HAS_RIGHT:
            if _in_band(start_n, BLOCK_N, row_first, row_last, diag_off, window_left,
                        window_right, HAS_LEFT, HAS_RIGHT) & (start_n < seqlen_k):
                dq = _bs_dq_tile(
                    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc,
                    sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                    window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale, seed,
                    bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, True, True,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                )
        else:
            dq = _bs_dq_tile(
                dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc,
                sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale, seed,
                bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, True, True,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
            )
    dq = dq * post
    tl.store(
        DQ + b64 * stride_dqb + offs_m[:, None] * stride_dqs + h * stride_dqh + offs_d[None, :],
        _cast(dq, DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
