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

from ._kernels import (
    _UPCAST_BF16,
    _alibi_rc,
    _band_ok,
    _cast,
    _dkdv_acc,
    _dot,
    _dq_acc,
    _dq_lse2,
    _fwd_store,
    _load,
    _q_tile,
    _scores,
    _slope2,
    _softmax_pv,
)


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
    b = w[:, :, None] & (1 << tl.arange(0, 32))[None, None, :]  # one AND per element
    return tl.reshape(b, (r_loc.shape[0], BLOCK_N)) != 0


@triton.jit
def _bits_words(BITS, tid, r_loc, c0, is_p, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (rows, BLOCK_N / 32) bitmask words `_bits_tile` reads, loaded under the runtime
    is_p (zeros where not: unused), outside the tile's runtime branch, so that the software
    pipeline prefetches them with the tile's K/V (the merged walk)."""
    WORDS: tl.constexpr = MBS // 32
    NW: tl.constexpr = BLOCK_N // 32
    base = BITS + tid.to(tl.int64) * (MBS * WORDS)
    cw = c0 // 32 + tl.arange(0, NW)
    # the scalar flag broadcast as an int (the interpreter rejects a scalar-and-tensor mask)
    m = (r_loc[:, None] * 0 + cw[None, :] * 0 + is_p.to(tl.int32)) != 0
    return tl.load(base + r_loc[:, None] * WORDS + cw[None, :], mask=m, other=0)


@triton.jit
def _bits_expand(w, BLOCK_N: tl.constexpr):
    """(rows, BLOCK_N) element mask from `_bits_words`' words: one AND per element."""
    b = w[:, :, None] & (1 << tl.arange(0, 32))[None, None, :]
    return tl.reshape(b, (w.shape[0], BLOCK_N)) != 0


@triton.jit
def _rt_bits(w, BITS, tid, r_loc, c_loc0, offs_n, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A partial tile's (rows, keys) mask in the merged walk: from the prefetched words (w), or
    gathered per element for kernel tiles narrower than a word."""
    if BLOCK_N >= 32:
        ok = _bits_expand(w, BLOCK_N)
    else:
        ok = _bits(BITS, tid, r_loc[:, None], c_loc0 + offs_n[None, :], MBS)
    return ok


@triton.jit
def _rt_words(BITS, tid, r_loc, c_loc0, is_p, MBS: tl.constexpr, BLOCK_N: tl.constexpr,
              RT: tl.constexpr):
    """`_bits_words` when the walk is merged (RT) and tiles are at least a word wide, else 0."""
    w = 0
    if RT:
        if BLOCK_N >= 32:
            w = _bits_words(BITS, tid, r_loc, c_loc0, is_p, MBS, BLOCK_N)
    return w


@triton.jit
def _row_bits(BITS, tid, r_loc, c_loc0, offs_n, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, keys) element mask of a partial tile: rows r_loc, the keys from c_loc0."""
    if BLOCK_N >= 32:
        ok = _bits_tile(BITS, tid, r_loc, c_loc0, MBS, BLOCK_N)
    else:
        ok = _bits(BITS, tid, r_loc[:, None], c_loc0 + offs_n[None, :], MBS)
    return ok


@triton.jit
def _bits_kr(BITS, tid, r_loc0, offs_m, c_loc, c_loc0, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(keys, rows) element mask of a partial tile for the dK/dV kernel: the (rows, keys) words
    transposed (rows r_loc0 + offs_m, keys c_loc / from c_loc0)."""
    if BLOCK_N >= 32:
        ok = tl.trans(_bits_tile(BITS, tid, r_loc0 + offs_m, c_loc0, MBS, BLOCK_N))
    else:
        ok = _bits(BITS, tid, r_loc0 + offs_m[None, :], c_loc[:, None], MBS)
    return ok


@triton.jit
def _rt_bits_kr(w, BITS, tid, r_loc0, offs_m, c_loc, MBS: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_bits_kr` in the merged walk, from the prefetched words (w) when tiles are word-wide."""
    if BLOCK_N >= 32:
        ok = tl.trans(_bits_expand(w, BLOCK_N))
    else:
        ok = _bits(BITS, tid, r_loc0 + offs_m[None, :], c_loc[:, None], MBS)
    return ok


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


@triton.jit
def _visit(start_n, n_len, row_first, row_last, x, lim, diag_off, window_left, window_right,
           HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Whether a listed tile is computed: every one without causal/window (a tail tile past the
    sequence is masked by CHECK_FULL), else those that meet the band, with x < lim."""
    if HAS_LEFT or HAS_RIGHT:
        ok = _in_band(start_n, n_len, row_first, row_last, diag_off, window_left, window_right,
                      HAS_LEFT, HAS_RIGHT) & (x < lim)
    else:
        ok = True
    return ok


@triton.jit
def _list(NF, FI, NP, PI, row, PARTIAL: tl.constexpr):
    """(count, index pointer) of a mask row's (or column's) full tiles, or its partial ones."""
    if PARTIAL:
        n = tl.load(NP + row)
        idx = PI
    else:
        n = tl.load(NF + row)
        idx = FI
    return n, idx


@triton.jit
def _bs_fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc, c_loc0,
    offs_m, offs_n, offs_d, offs_dv, start_n,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
    desc_k=0, desc_v=0, k_row0=0, k_col=0, v_col=0, TMA: tl.constexpr = False,
    FOLD: tl.constexpr = False, is_p=False, RT: tl.constexpr = False,
):
    # RT: the tile's kind is the runtime is_p (the merged list walk), not the constexpr PARTIAL
    cols = start_n + offs_n
    if TMA and not CHECK:  # in bounds (no tail): K/V through tensor descriptors
        kt = tl.trans(desc_k.load([k_row0 + start_n, k_col]))
        v = desc_v.load([k_row0 + start_n, v_col])
    else:
        kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_dv[None, :]
        kt = _load(kt_ptrs, cols[None, :] < seqlen_k, offs_d[:, None] < HEAD_DIM, CHECK, True)
        v = _load(v_ptrs, cols[:, None] < seqlen_k, offs_dv[None, :] < HEAD_DIM_V, CHECK, True)
    w = _rt_words(BITS, tid, r_loc, c_loc0, is_p, MBS, BLOCK_N, RT)
    ar, ac, aoff = _alibi_rc(offs_m[:, None], offs_n[None, :], start_n, diag_off, ALIBI)
    s, mult, _ = _scores(q, kt, scale_a, scale_b, slope2, ar, ac, aoff, SOFTCAP, ALIBI, FOLD,
                         IEEE)
    if CHECK:  # a tail or causal/window (CHECK_FULL): bounds and band, and the bits
        ok = _band_ok(cols[None, :] < seqlen_k, offs_m[:, None], cols[None, :], diag_off,
                      window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if PARTIAL:
            ok = ok & _row_bits(BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N)
        elif RT:
            ok = tl.broadcast_to(ok, s.shape)  # both branches of the runtime if: one shape
            if is_p:
                ok = ok & _rt_bits(w, BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N)
        s = tl.where(ok, s, float("-inf"))
    elif PARTIAL:  # in bounds, no band: the bitmask alone (an AND and a select per score)
        s = tl.where(_row_bits(BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N), s, float("-inf"))
    elif RT:
        if is_p:
            s = tl.where(_rt_bits(w, BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N), s,
                         float("-inf"))
    return _softmax_pv(acc, l_i, m_i, s, mult, v, offs_m[:, None], cols[None, :], p_drop, seed,
                       bh, FOLD, True, DROPOUT, IEEE)


@triton.jit
def _bs_pre(NF, FI, NP, PI, PTID, row, n_kb, PRE: tl.constexpr):
    """PRE: a mask row's counts and first entries (full: key block; partial: key block and tile
    id from the per-slot PTID), loaded at the program's start, before Q, so that their round
    trips overlap Q's and the two walks start without a list-load chain. Zeros without PRE."""
    nf = 0
    npart = 0
    kf = 0
    kp = 0
    tp = 0
    if PRE:
        base = row.to(tl.int64) * n_kb
        nf = tl.load(NF + row)
        npart = tl.load(NP + row)
        # unmasked: every row holds n_kb >= 1 slots (a permutation), read whatever the counts
        kf = tl.load(FI + base)
        kp = tl.load(PI + base)
        tp = tl.load(PTID + base)
    return nf, npart, kf, kp, tp


@triton.jit
def _pre_next(IDX, PTID, base, it, n, nx, tid_nx, SUBS: tl.constexpr, PARTIAL: tl.constexpr):
    """One step of a preloaded (PRE) list walk, the same for a query block's row (forward, dQ)
    and a key block's column (dK/dV): the entry loaded one mask tile ahead (a loop-carried
    value) is this iteration's (block, tile id); the next entry's block index and, for a
    partial list, its tile id from the per-slot array PTID (no block -> tile-id chain) are
    loaded. Returns (block, tile id, next block, next tile id)."""
    blk = nx
    tid = tid_nx
    jn = (it + 1) // SUBS
    more = jn < n
    nx = tl.load(IDX + base + jn, mask=more, other=0)
    if PARTIAL:
        tid_nx = tl.load(PTID + base + jn, mask=more, other=0)
    return blk, tid, nx, tid_nx


@triton.jit
def _bs_q_list(
    acc, l_i, m_i, NF, FI, NP, PI, TILE, row, n_kb, q, do, lse2, delta, k_base, v_base,
    stride_ks, stride_vs, BITS, r_loc, offs_m, offs_n, offs_d, offs_dv, row_first, row_last,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale,
    seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
    DQ: tl.constexpr, desc_k=0, desc_v=0, k_row0=0, k_col=0, v_col=0, TMA: tl.constexpr = False,
    FOLD: tl.constexpr = False, MERGED: tl.constexpr = False, WS: tl.constexpr = False,
    PRE: tl.constexpr = False, pre_n=0, pre_kb=0, pre_tid=0, PTID=0,
):
    """The key tiles of one list of a query block's mask row (NF/FI: the full mask tiles'
    count and indices, NP/PI the partial ones'; PARTIAL picks), in one flat loop of SUBS kernel
    tiles per mask tile, so the compiler can pipeline the K/V loads across mask tiles. The
    forward's tiles update (acc, l_i, m_i); with DQ, the dQ kernel's update acc (dQ) from do,
    lse2, delta (unused by the forward; l_i, m_i unused by dQ)."""
    SUBS: tl.constexpr = MBS // BLOCK_N
    base = row.to(tl.int64) * n_kb
    if MERGED:  # one walk over the full tiles, then the partial ones: the pipeline never drains
        nf = tl.load(NF + row)
        n = nf + tl.load(NP + row)
    else:
        nf = 0
        n, IDX = _list(NF, FI, NP, PI, row, PARTIAL)
    if PRE:  # the list's count and first entry were loaded at the program's start (_bs_pre)
        n = pre_n
    kb_nx = pre_kb
    tid_nx = pre_tid
    # WS: Triton's warp specialization of the walk (a producer warp group issues the index
    # loads and the K/V copies ahead of the consumers), as the dense forward's interior loop
    for it in tl.range(0, n * SUBS, warp_specialize=WS):
        is_p = False
        if MERGED:
            j = it // SUBS
            is_p = j >= nf
            kb = tl.load(tl.where(is_p, PI + (base + j - nf), FI + (base + j)))
            tid = tl.load(TILE + base + kb, mask=is_p, other=0)
        elif PRE:
            kb, tid, kb_nx, tid_nx = _pre_next(IDX, PTID, base, it, n, kb_nx, tid_nx, SUBS,
                                               PARTIAL)
        else:
            kb = tl.load(IDX + base + it // SUBS)
            tid = 0
            if PARTIAL:
                tid = tl.load(TILE + base + kb)
        sub = (it % SUBS) * BLOCK_N
        start_n = kb * MBS + sub
        if _visit(start_n, BLOCK_N, row_first, row_last, start_n, seqlen_k, diag_off,
                  window_left, window_right, HAS_LEFT, HAS_RIGHT):
            if DQ:
                acc = _bs_dq_tile(
                    acc, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, BITS, tid,
                    r_loc, sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                    window_left, window_right, scale_a, scale_b, slope2, p_drop, drop_scale,
                    seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK, PARTIAL,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                    desc_k, desc_v, k_row0, k_col, v_col, TMA, is_p, MERGED,
                )
            else:
                acc, l_i, m_i = _bs_fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, BITS, tid, r_loc,
                    sub, offs_m, offs_n, offs_d, offs_dv, start_n, seqlen_k, diag_off,
                    window_left, window_right, scale_a, scale_b, slope2, p_drop, seed, bh,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK, PARTIAL,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_N,
                    desc_k, desc_v, k_row0, k_col, v_col, TMA, FOLD, is_p, MERGED,
                )
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_fwd(
    Q, K, V, O, LSE, R, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS, PTID, DESC_K, DESC_V,
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
    RESID: tl.constexpr, ALIBI: tl.constexpr, TMA: tl.constexpr = False,
    FOLD: tl.constexpr = False, MERGED: tl.constexpr = False, WS: tl.constexpr = False,
    PRE: tl.constexpr = False,
):
    """One program per (query block, query head, batch): the full tiles of its mask block's
    list, then the partial ones. PRE: the lists' counts and first entries are loaded first
    (`_bs_pre`), each walk carries its next entry (PTID: per-slot tile ids of the partial list)."""
    # the last query blocks first: under causal-like masks (causal, prefix-LM, documents) they
    # list the most tiles, so the grid's tail is made of short programs
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    if not WS:  # (the grid is exact; the warp-specialization pass wants no early exit)
        if m0 >= seqlen_q:
            return
    qb = m0 // MBS
    row = (b * mask_b * mask_heads + h * mask_h) * n_qb + qb
    # PRE: before Q, so that the round trips overlap
    nf0, np0, kf0, kp0, tp0 = _bs_pre(QNF, QFI, QNP, QPI, PTID, row, n_kb, PRE)
    b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv = _q_tile(
        b, h, m0, seqlen_q, seqlen_k, n_heads, SLOPES, stride_sb, GROUP, ALIBI, BLOCK_M, BLOCK_N,
        BLOCK_D, BLOCK_DV)
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
    # the full mask tiles, then the partial ones: one walk (MERGED) or two loops
    for part in tl.static_range(2 - MERGED):
        if part == 0:
            pn, pk, pt = nf0, kf0, 0
        else:
            pn, pk, pt = np0, kp0, tp0
        acc, l_i, m_i = _bs_q_list(
            acc, l_i, m_i, QNF, QFI, QNP, QPI, TILE, row, n_kb, q, 0, 0, 0, k_base, v_base,
            stride_ks, stride_vs, BITS, r_loc, offs_m, offs_n, offs_d, offs_dv, row_first,
            row_last, seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, slope2,
            p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
            CHECK_FULL, part == 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE,
            ALIBI, BLOCK_N, False, DESC_K, DESC_V, b * seqlen_k, hk * HEAD_DIM, hk * HEAD_DIM_V,
            TMA, FOLD, MERGED, WS and not CHECK_FULL and part == 0,
            PRE and not MERGED, pn, pk, pt, PTID,
        )
    _fwd_store(acc, l_i, m_i, O, R, LSE, b64, h, 0, offs_m, offs_dv, seqlen_q, stride_ob,
               stride_os, stride_oh, stride_lb, stride_lh, drop_scale, HEAD_DIM_V, DROPOUT, RESID)


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
    c_loc0=0, desc_q=0, desc_do=0, q_row0=0, q_col=0, do_col=0, TMA: tl.constexpr = False,
    n0=0, is_p=False, RT: tl.constexpr = False,
    dqa_base=0, stride_dqas=0, desc_dqa=0, FUSED_DQ: tl.constexpr = False,
    DQ_TMA: tl.constexpr = False,
):
    rows = start_m + offs_m
    rmask = rows < seqlen_q
    if TMA and not CHECK:  # in bounds (no tail): Q/dO through tensor descriptors
        qt = tl.trans(desc_q.load([q_row0 + start_m, q_col]))
        do = desc_do.load([q_row0 + start_m, do_col])
    else:
        qt = _load(q_base + rows[None, :] * stride_qs + offs_d[:, None], rmask[None, :],
                   offs_d[:, None] < HEAD_DIM, True, True)
        do = _load(do_base + rows[:, None] * stride_dos + offs_dv[None, :], rmask[:, None],
                   offs_dv[None, :] < HEAD_DIM_V, True, True)
    lse = tl.load(lse_base + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
    w = _rt_words(BITS, tid, r_loc0 + offs_m, c_loc0, is_p, MBS, BLOCK_N, RT)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    # (BLOCK_N, BLOCK_M): keys x queries
    # ALiBi distances in float (_alibi_rc) from the program's first key n0
    ar, ac, aoff = _alibi_rc(rows[None, :], tl.arange(0, BLOCK_N)[:, None], n0, diag_off, ALIBI)
    st, _, tt = _scores(k, qt, scale_a, scale_b, slope2, ar, ac, aoff, SOFTCAP, ALIBI, False, IEEE)
    pt = tl.exp2(st - lse2[None, :])
    if CHECK:
        ok = _band_ok(rmask[None, :], rows[None, :], offs_n[:, None], diag_off, window_left,
                      window_right, HAS_LEFT, HAS_RIGHT)
        if PARTIAL:
            ok = ok & _bits_kr(BITS, tid, r_loc0, offs_m, c_loc, c_loc0, MBS, BLOCK_N)
        elif RT:
            ok = tl.broadcast_to(ok, pt.shape)
            if is_p:
                ok = ok & _rt_bits_kr(w, BITS, tid, r_loc0, offs_m, c_loc, MBS, BLOCK_N)
        pt = tl.where(ok, pt, 0.0)
    elif PARTIAL:  # in bounds, no band: the bitmask alone
        pt = tl.where(_bits_kr(BITS, tid, r_loc0, offs_m, c_loc, c_loc0, MBS, BLOCK_N), pt, 0.0)
    elif RT:
        if is_p:
            pt = tl.where(_rt_bits_kr(w, BITS, tid, r_loc0, offs_m, c_loc, MBS, BLOCK_N), pt,
                          0.0)
    dk, dv, ds_lo = _dkdv_acc(dk, dv, pt, tt, v, do, qt, delta, rows[None, :], offs_n[:, None],
                              sm_scale, p_drop, drop_scale, seed, bh, SOFTCAP, DROPOUT, IEEE)
    if FUSED_DQ:
        # dQ += (scale dS) K into the float32 buffer DQA, summed over key blocks by atomics
        # (the dense kernels' fused backward): no dQ program, no second S and dP per tile
        dq_part = _dot(tl.trans(ds_lo), k, IEEE)  # (BLOCK_M, BLOCK_D)
        if DQ_TMA and TMA and not CHECK:  # one bulk tensor reduction per tile
            if _UPCAST_BF16:  # the interpreter has no descriptor reductions; its programs
                # run one at a time, so a load-add-store is the same sum (tests the offsets)
                desc_dqa.store([q_row0 + start_m, q_col],
                               desc_dqa.load([q_row0 + start_m, q_col]) + dq_part)
            else:
                desc_dqa.atomic_add([q_row0 + start_m, q_col], dq_part)
        else:
            tl.atomic_add(dqa_base + rows[:, None] * stride_dqas + offs_d[None, :], dq_part,
                          mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _bs_dkdv_list(
    dk, dv, NF, FI, NP, PI, TILE, col, bhm, n_qb, n_kb, kb, k, v, q_base, do_base, lse_base,
    delta_base, stride_qs, stride_dos, sm_scale, BITS, c_loc, offs_n, offs_m, offs_d, offs_dv,
    n0, n_last, seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2, p_drop,
    drop_scale, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, MBS: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, desc_q=0, desc_do=0, q_row0=0, q_col=0, do_col=0,
    TMA: tl.constexpr = False, MERGED: tl.constexpr = False,
    PRE: tl.constexpr = False, pre_n=0, pre_qb=0, pre_tid=0, PTID=0,
    dqa_base=0, stride_dqas=0, desc_dqa=0, FUSED_DQ: tl.constexpr = False,
    DQ_TMA: tl.constexpr = False,
):
    """The query tiles of one list of the key block's transposed mask column (full or
    partial mask tiles; MERGED: both in one walk, as in the forward), flat as in the forward.
    PRE: as the forward's walk (the count and first entry given, the next entry carried; PTID
    holds the transposed lists' per-slot tile ids)."""
    SUBS: tl.constexpr = MBS // BLOCK_M
    base = col.to(tl.int64) * n_qb
    if MERGED:
        nf = tl.load(NF + col)
        n = nf + tl.load(NP + col)
    else:
        nf = 0
        n, IDX = _list(NF, FI, NP, PI, col, PARTIAL)
    if PRE:
        n = pre_n
    qb_nx = pre_qb
    tid_nx = pre_tid
    for it in range(0, n * SUBS):
        is_p = False
        if MERGED:
            j = it // SUBS
            is_p = j >= nf
            qb = tl.load(tl.where(is_p, PI + (base + j - nf), FI + (base + j)))
            tid = tl.load(TILE + (bhm * n_qb + qb).to(tl.int64) * n_kb + kb, mask=is_p, other=0)
        elif PRE:
            qb, tid, qb_nx, tid_nx = _pre_next(IDX, PTID, base, it, n, qb_nx, tid_nx, SUBS,
                                               PARTIAL)
        else:
            qb = tl.load(IDX + base + it // SUBS)
            tid = 0
            if PARTIAL:
                tid = tl.load(TILE + (bhm * n_qb + qb).to(tl.int64) * n_kb + kb)
        sub = (it % SUBS) * BLOCK_M
        start_m = qb * MBS + sub
        # rows [start_m, start_m + BLOCK_M) meet keys [n0, n_last] (the band test, swapped)
        if _visit(n0, n_last - n0 + 1, start_m, start_m + BLOCK_M - 1, start_m, seqlen_q,
                  diag_off, window_left, window_right, HAS_LEFT, HAS_RIGHT):
            dk, dv = _bs_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                sm_scale, BITS, tid, c_loc, offs_n, offs_m, offs_d, offs_dv, start_m, sub,
                seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, slope2,
                p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
                CHECK, PARTIAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI,
                BLOCK_N, n0 - kb * MBS, desc_q, desc_do, q_row0, q_col, do_col, TMA, n0,
                is_p, MERGED, dqa_base, stride_dqas, desc_dqa, FUSED_DQ, DQ_TMA,
            )
    return dk, dv


@triton.jit
def _bs_dkdv_prog(
    pid_n, hk, b,
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, KNF, KFI, KNP, KPI, TILE, BITS, PTID, DESC_Q,
    DESC_DO,
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
    TMA: tl.constexpr = False, MERGED: tl.constexpr = False, PRE: tl.constexpr = False,
    DQA=0, stride_dqab=0, stride_dqas=0, stride_dqah=0, DESC_DQA=0,
    FUSED_DQ: tl.constexpr = False, DQ_TMA: tl.constexpr = False,
):
    """The body of `bs_bwd_dkdv` for key block pid_n of KV head hk, batch b (also one program
    kind of `bs_bwd_joint`)."""
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * n_heads + h
        slope2 = _slope2(SLOPES, b, stride_sb, h, ALIBI)
        bhm = b * mask_b * mask_heads + h * mask_h
        col = bhm * n_kb + kb
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE + b64 * stride_lb + h * stride_lh
        delta_base = DELTA + b64 * stride_lb + h * stride_lh
        dqa_base = DQA + b64 * stride_dqab + h * stride_dqah
        nf0, np0, qf0, qp0, tp0 = _bs_pre(KNF, KFI, KNP, KPI, PTID, col, n_qb, PRE)
        for part in tl.static_range(2 - MERGED):  # full then partial tiles (as the forward)
            if part == 0:
                pn, pq, pt = nf0, qf0, 0
            else:
                pn, pq, pt = np0, qp0, tp0
            dk, dv = _bs_dkdv_list(
                dk, dv, KNF, KFI, KNP, KPI, TILE, col, bhm, n_qb, n_kb, kb, k, v, q_base, do_base,
                lse_base, delta_base, stride_qs, stride_dos, sm_scale, BITS, c_loc, offs_n,
                offs_m, offs_d, offs_dv, n0, n_last, seqlen_q, diag_off, window_left,
                window_right, scale_a, scale_b, slope2, p_drop, drop_scale, seed, bh, HEAD_DIM,
                HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, part == 1, HAS_LEFT,
                HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, BLOCK_M, BLOCK_N,
                DESC_Q, DESC_DO, b * seqlen_q, h * HEAD_DIM, h * HEAD_DIM_V, TMA, MERGED,
                PRE and not MERGED, pn, pq, pt, PTID, dqa_base, stride_dqas, DESC_DQA, FUSED_DQ,
                DQ_TMA,
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


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, KNF, KFI, KNP, KPI, TILE, BITS, PTID, DESC_Q,
    DESC_DO,
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
    TMA: tl.constexpr = False, MERGED: tl.constexpr = False, PRE: tl.constexpr = False,
    DQA=0, stride_dqab=0, stride_dqas=0, stride_dqah=0, DESC_DQA=0,
    FUSED_DQ: tl.constexpr = False, DQ_TMA: tl.constexpr = False,
):
    """One program per (key block, KV head, batch): for each query head of the GQA group, the
    query blocks of the transposed lists (full, then partial); dK/dV summed without atomics.
    PRE: each head's column lists preloaded (`_bs_pre` over the transposed lists).
    FUSED_DQ: dQ too, added into the float32 DQA (q's layout) by atomics (DQ_TMA: one bulk
    tensor reduction per in-bounds tile through DESC_DQA, a (B*Sq, Hq*D) view): no dQ kernel."""
    _bs_dkdv_prog(tl.program_id(0), tl.program_id(1), tl.program_id(2), Q, K, V, DO, LSE, DELTA,
        DK, DV, SLOPES, KNF, KFI, KNP, KPI, TILE, BITS, PTID, DESC_Q, DESC_DO, stride_qb,
        stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb,
        stride_dvs, stride_dvh, stride_lb, stride_lh, stride_sb, seqlen_q, seqlen_k,
        window_left, window_right, scale_a, scale_b, sm_scale, p_drop, drop_scale, seed,
        n_heads, mask_b, mask_h, mask_heads, n_qb, n_kb, GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
        BLOCK_N, BLOCK_D, BLOCK_DV, MBS, CHECK_FULL, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT,
        IEEE, ALIBI, TMA, MERGED, PRE, DQA, stride_dqab, stride_dqas, stride_dqah, DESC_DQA,
        FUSED_DQ, DQ_TMA)


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
    desc_k=0, desc_v=0, k_row0=0, k_col=0, v_col=0, TMA: tl.constexpr = False,
    is_p=False, RT: tl.constexpr = False,
):
    cols = start_n + offs_n
    if TMA and not CHECK:
        kt = tl.trans(desc_k.load([k_row0 + start_n, k_col]))
        vt = tl.trans(desc_v.load([k_row0 + start_n, v_col]))
    else:
        kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
        vt_ptrs = v_base + cols[None, :] * stride_vs + offs_dv[:, None]
        kt = _load(kt_ptrs, cols[None, :] < seqlen_k, offs_d[:, None] < HEAD_DIM, CHECK, True)
        vt = _load(vt_ptrs, cols[None, :] < seqlen_k, offs_dv[:, None] < HEAD_DIM_V, CHECK, True)
    w = _rt_words(BITS, tid, r_loc, c_loc0, is_p, MBS, BLOCK_N, RT)
    ar, ac, aoff = _alibi_rc(offs_m[:, None], offs_n[None, :], start_n, diag_off, ALIBI)
    s, _, t = _scores(q, kt, scale_a, scale_b, slope2, ar, ac, aoff, SOFTCAP, ALIBI, False, IEEE)
    p = tl.exp2(s - lse2[:, None])
    if CHECK:
        ok = _band_ok(cols[None, :] < seqlen_k, offs_m[:, None], cols[None, :], diag_off,
                      window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if PARTIAL:
            ok = ok & _row_bits(BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N)
        elif RT:
            ok = tl.broadcast_to(ok, p.shape)
            if is_p:
                ok = ok & _rt_bits(w, BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N)
        p = tl.where(ok, p, 0.0)
    elif PARTIAL:
        p = tl.where(_row_bits(BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N), p, 0.0)
    elif RT:
        if is_p:
            p = tl.where(_rt_bits(w, BITS, tid, r_loc, c_loc0, offs_n, MBS, BLOCK_N), p, 0.0)
    return _dq_acc(dq, p, t, do, vt, kt, delta, offs_m[:, None], cols[None, :], p_drop,
                   drop_scale, seed, bh, SOFTCAP, DROPOUT, IEEE)


@triton.jit
def _bs_dq_prog(
    pid_m, h, b,
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS, PTID, DESC_K, DESC_V,
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
    TMA: tl.constexpr = False, MERGED: tl.constexpr = False, PRE: tl.constexpr = False,
    O=0, R=0, DLSE=0, stride_ob=0, stride_os=0, stride_oh=0, FUSE_DELTA: tl.constexpr = False,
    HAS_DLSE: tl.constexpr = False, HAS_RESID: tl.constexpr = False,
):
    """The body of `bs_bwd_dq` for query block pid_m of query head h, batch b (also one program
    kind of `bs_bwd_joint`). The kernel walks the last query blocks first: under causal-like
    masks (causal, prefix-LM, documents) they list the most tiles, so the grid's tail is made
    of short programs."""
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    qb = m0 // MBS
    row = (b * mask_b * mask_heads + h * mask_h) * n_qb + qb
    nf0, np0, kf0, kp0, tp0 = _bs_pre(QNF, QFI, QNP, QPI, PTID, row, n_kb, PRE)
    b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv = _q_tile(
        b, h, m0, seqlen_q, seqlen_k, n_heads, SLOPES, stride_sb, GROUP, ALIBI, BLOCK_M, BLOCK_N,
        BLOCK_D, BLOCK_DV)
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
    lse2, post = _dq_lse2(lse, sm_scale)  # as in _kernels.attn_bwd_dq
    if FUSE_DELTA:
        o_off = b64 * stride_ob + offs_m[:, None] * stride_os + h * stride_oh + offs_dv[None, :]
        o_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
        o = tl.load(O + o_off, mask=o_ok, other=0.0).to(tl.float32)
        if HAS_RESID:  # (R: O's layout)
            o = o + tl.load(R + o_off, mask=o_ok, other=0.0).to(tl.float32)
        delta = tl.sum(o * do.to(tl.float32), 1)
        if HAS_DLSE:
            delta = delta - tl.load(DLSE + row_ptr, mask=row_ok, other=0.0)
        tl.store(DELTA + row_ptr, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + row_ptr, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    row_first = m0
    row_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in tl.static_range(2 - MERGED):  # as in the forward
        if part == 0:
            pn, pk, pt = nf0, kf0, 0
        else:
            pn, pk, pt = np0, kp0, tp0
        dq, _, _ = _bs_q_list(
            dq, 0.0, 0.0, QNF, QFI, QNP, QPI, TILE, row, n_kb, q, do, lse2, delta, k_base,
            v_base, stride_ks, stride_vs, BITS, r_loc, offs_m, offs_n, offs_d, offs_dv,
            row_first, row_last, seqlen_k, diag_off, window_left, window_right, scale_a, scale_b,
            slope2, p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MBS,
            CHECK_FULL, part == 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE,
            ALIBI, BLOCK_N, True, DESC_K, DESC_V, b * seqlen_k, hk * HEAD_DIM, hk * HEAD_DIM_V,
            TMA, False, MERGED, False, PRE and not MERGED, pn, pk, pt, PTID,
        )
    dq = dq * post
    tl.store(
        DQ + b64 * stride_dqb + offs_m[:, None] * stride_dqs + h * stride_dqh + offs_d[None, :],
        _cast(dq, DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS, PTID, DESC_K, DESC_V,
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
    TMA: tl.constexpr = False, MERGED: tl.constexpr = False, PRE: tl.constexpr = False,
    O=0, R=0, DLSE=0, stride_ob=0, stride_os=0, stride_oh=0, FUSE_DELTA: tl.constexpr = False,
    HAS_DLSE: tl.constexpr = False, HAS_RESID: tl.constexpr = False,
):
    """One program per (query block, query head, batch), over the forward's lists (PRE: as
    the forward's). FUSE_DELTA: the program computes its rows' delta = rowsum(dO * O) (- dlse;
    O + R with the forward's residual) itself, as `attn_bwd_preprocess` would, and stores it
    for the dK/dV kernel, which then runs after this one (no preprocess launch, dO read once)."""
    _bs_dq_prog(tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2),
        Q, K, V, DO, LSE, DELTA, DQ, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS, PTID, DESC_K,
        DESC_V, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb,
        stride_vs, stride_vh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs,
        stride_dqh, stride_lb, stride_lh, stride_sb, seqlen_q, seqlen_k, window_left,
        window_right, scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads, mask_b,
        mask_h, mask_heads, n_qb, n_kb, GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D,
        BLOCK_DV, MBS, CHECK_FULL, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, TMA,
        MERGED, PRE, O, R, DLSE, stride_ob, stride_os, stride_oh, FUSE_DELTA, HAS_DLSE,
        HAS_RESID)


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def bs_bwd_joint(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SLOPES, QNF, QFI, QNP, QPI, KNF, KFI, KNP, KPI, TILE,
    BITS, PTID_Q, PTID_K, DESC_Q, DESC_DO, DESC_K, DESC_V,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_sb,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads,
    mask_b, mask_h, mask_heads, n_qb, n_kb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MBS: tl.constexpr, CHECK_FULL: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr,
    TMA: tl.constexpr = False, PRE_Q: tl.constexpr = False, PRE_K: tl.constexpr = False,
):
    """The dK/dV and the dQ programs in ONE launch (FlexAttention's backward layout): per (KV
    head, batch), program ids below the key-block count run `_bs_dkdv_prog` (BLOCK_M1 query rows
    x BLOCK_N1 keys), the rest `_bs_dq_prog` for each query head of the GQA group (BLOCK_M2 x
    BLOCK_N2, last query block first). The two kinds of one (batch, head) run at the same time,
    so each one's K/V (Q/dO) reads find the other's in L2, and one kind's waits overlap the
    other's work; no second launch. DESC_Q/DESC_DO have BLOCK_M1-row blocks, DESC_K/DESC_V
    BLOCK_N2-row blocks; PTID_Q/PTID_K the per-slot tile ids of the preloaded walks."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    n_kprog = tl.cdiv(seqlen_k, BLOCK_N1)
    if pid < n_kprog:
        _bs_dkdv_prog(
            pid, hk, b, Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, KNF, KFI, KNP, KPI, TILE, BITS,
            PTID_K, DESC_Q, DESC_DO, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
            stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
            stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb,
            stride_lh, stride_sb, seqlen_q, seqlen_k, window_left, window_right, scale_a,
            scale_b, sm_scale, p_drop, drop_scale, seed, n_heads, mask_b, mask_h, mask_heads,
            n_qb, n_kb, GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M1, BLOCK_N1, BLOCK_D, BLOCK_DV, MBS,
            CHECK_FULL, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, TMA, False, PRE_K,
        )
    else:
        n_qprog = tl.cdiv(seqlen_q, BLOCK_M2)
        j = pid - n_kprog
        _bs_dq_prog(
            n_qprog - 1 - j % n_qprog, hk * GROUP + j // n_qprog, b, Q, K, V, DO, LSE, DELTA,
            DQ, SLOPES, QNF, QFI, QNP, QPI, TILE, BITS, PTID_Q, DESC_K, DESC_V, stride_qb,
            stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
            stride_vh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
            stride_lb, stride_lh, stride_sb, seqlen_q, seqlen_k, window_left, window_right,
            scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads, mask_b, mask_h,
            mask_heads, n_qb, n_kb, GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M2, BLOCK_N2, BLOCK_D,
            BLOCK_DV, MBS, CHECK_FULL, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, ALIBI, TMA,
            False, PRE_Q,
        )


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
