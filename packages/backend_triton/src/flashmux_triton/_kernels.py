"""Triton kernels: FlashAttention-2 forward, backward (preprocess, dK/dV, dQ) and the dropout mask.

Imported lazily (it imports triton). Layout BSHD with the last dimension contiguous; a varlen
batch is the same with batch stride 0 and each program reading its sequence's start from
cu_seqlens. Scores live in the log2 domain: s2 = s * log2(e), so every exponential is an exp2 and
the scale (and softcap) multiply is folded into one FMA-able factor.

Masking: for a query block the allowed keys form a band (window/causal, bottom-right aligned,
off = Sk - Sq). The key range splits into [lo, mid0) boundary blocks, [mid0, mid1) interior blocks
where every (row, key) pair is allowed and inside the sequence (no mask), and [mid1, hi) boundary
blocks. Blocks outside [lo, hi) are never visited. The backward does the same from the key side.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Triton's CPU interpreter (3.9) multiplies bfloat16 tiles as their raw uint16 bits: upcast there.
_UPCAST_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _tanh(x):
    # tanh from one exp2; exact at +-inf, absolute error ~1e-7 near 0 (scores need absolute accuracy).
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dropout_keep(seed, bh, rows, cols, p_drop):
    """Keep mask, a pure function of (seed, batch*heads_q + head, row i, key j): Philox-4x32
    with counter (j, i, bh, 0) and the 64-bit seed as key; uniform from the top 24 bits.
    seed: an int (a runtime scalar, never specialized) or a pointer to a scalar integer tensor
    (dropout_seed given as an array): loaded here, on the device, its low 32 bits as the key, so
    the array and the int of one value draw the same mask and a new seed compiles nothing."""
    if seed.dtype.is_ptr():
        key = tl.load(seed).to(tl.int64) & 0xFFFFFFFF
    else:
        key = seed
    c0 = cols + rows * 0
    c1 = rows + cols * 0
    c2 = c0 * 0 + bh
    r, _, _, _ = tl.philox(key, c0, c1, c2, c2 * 0)
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= p_drop


@triton.jit
def _band(lo_edge, hi_edge, n_lim, lo_full, hi_full, BLOCK: tl.constexpr):
    """Split [lo_edge, hi_edge) into boundary/interior/boundary block ranges."""
    lo = tl.maximum(lo_edge, 0)
    hi = tl.minimum(hi_edge, n_lim)
    lo_b = (lo // BLOCK) * BLOCK
    full_lo = ((tl.maximum(lo_full, 0) + BLOCK - 1) // BLOCK) * BLOCK
    full_hi = (tl.minimum(hi_full, n_lim) // BLOCK) * BLOCK
    mid0 = tl.maximum(tl.minimum(full_lo, hi), lo_b)
    mid1 = tl.maximum(full_hi, mid0)
    mid1 = tl.minimum(mid1, tl.maximum(hi, mid0))
    return lo_b, mid0, mid1, hi


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype); in the interpreter, round bfloat16 to nearest even (it would truncate)."""
    if _UPCAST_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if _UPCAST_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if _UPCAST_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------------------------
# pieces of a tile's work, shared by the kernels here and the block-sparse ones (_kernels_bs).
# Triton inlines them: a kernel compiles to the code it had when it spelled them out.
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq(CU, b, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens in a varlen batch, else (0, seqlen)."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = 0
    return start, seqlen


@triton.jit
def _pids(LPT: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """(block, head, batch) of this program on a (blocks, heads, batch) grid. LPT: the grid's
    launch order (x fastest) is remapped so the block index varies slowest and the heaviest
    blocks of a causal band run first across all heads and batches (longest processing time
    first: the last wave holds the short programs). HEAVY_LAST: the heaviest block is the
    last one (query blocks under a causal band), else the first (key blocks)."""
    if LPT:
        n0 = tl.num_programs(0)
        n1 = tl.num_programs(1)
        lin = tl.program_id(0) + n0 * (tl.program_id(1) + n1 * tl.program_id(2))
        hb = n1 * tl.num_programs(2)
        blk = lin // hb
        rest = lin - blk * hb
        if HEAVY_LAST:
            blk = n0 - 1 - blk
        return blk, rest % n1, rest // n1
    else:
        return tl.program_id(0), tl.program_id(1), tl.program_id(2)


@triton.jit
def _slope2(SLOPES, b, stride_sb, h, ALIBI: tl.constexpr):
    """The ALiBi slope of (batch b, query head h) in log2 units; 0 without ALiBi."""
    s2 = 0.0
    if ALIBI:
        s2 = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
    return s2


@triton.jit
def _alibi_part(part: tl.constexpr, lo, mid0, mid1, hi, m0, diag_off, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """`_part` with the interior [mid0, mid1) in three (ALiBi's split walk): 1 the key blocks
    left of the diagonal of every row m0.. (their last key <= m0 + off), 2 the blocks between,
    3 the blocks right of it (first key >= m0 + BLOCK_M - 1 + off); 0 and 4 the boundaries."""
    a = (tl.maximum(m0 + diag_off + 1, 0) // BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(a, mid0), mid1)
    c = ((tl.maximum(m0 + BLOCK_M - 1 + diag_off, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    c = tl.minimum(tl.maximum(c, a), mid1)
    if part == 0:
        start = lo
        end = mid0
    elif part == 1:
        start = mid0
        end = a
    elif part == 2:
        start = a
        end = c
    elif part == 3:
        start = c
        end = mid1
    else:
        start = mid1
        end = hi
    return start, end


@triton.jit
def _part(part: tl.constexpr, lo, mid0, mid1, hi):
    """Block range `part` of a band split by `_band`: 0 and 2 the boundary blocks (masked),
    1 the mask-free interior."""
    if part == 0:
        start = lo
        end = mid0
    elif part == 1:
        start = mid0
        end = mid1
    else:
        start = mid1
        end = hi
    return start, end


@triton.jit
def _q_tile(b, h, m0, seqlen_q, seqlen_k, n_heads, SLOPES, stride_sb, GROUP: tl.constexpr,
            ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What a query-block program (forward, dQ) derives from (batch b, query head h, first row
    m0): (b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv)."""
    b64 = b.to(tl.int64)
    hk = h // GROUP
    bh = b * n_heads + h
    diag_off = seqlen_k - seqlen_q
    slope2 = _slope2(SLOPES, b, stride_sb, h, ALIBI)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv


@triton.jit
def _q_band(m0, seqlen_q, seqlen_k, diag_off, window_left, window_right,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key range of the query block from m0 (bottom-right aligned band) and its mask-free
    middle: (lo, mid0, mid1, hi) as `_band` splits it."""
    row_first = m0
    row_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo_edge = 0
    lo_full = 0
    hi_edge = seqlen_k
    hi_full = seqlen_k
    if HAS_LEFT:
        lo_edge = row_first + diag_off - window_left
        lo_full = row_last + diag_off - window_left
    if HAS_RIGHT:
        hi_edge = row_last + diag_off + window_right + 1
        hi_full = row_first + diag_off + window_right + 1
    return _band(lo_edge, hi_edge, seqlen_k, lo_full, hi_full, BLOCK_N)


@triton.jit
def _load(ptrs, seq_ok, d_ok, CHECK_SEQ: tl.constexpr, CHECK_D: tl.constexpr):
    """A tile of Q, K, V or dO: masked by the sequence bound and the head dim (CHECK_SEQ), by
    the head dim only (CHECK_D: the tile is wider than the head), or not at all."""
    if CHECK_SEQ:
        x = tl.load(ptrs, mask=seq_ok & d_ok, other=0.0)
    elif CHECK_D:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _band_ok(ok, r, c, diag_off, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """ok & (key c lies in row r's causal/window band: r + off - left <= c <= r + off + right);
    r and c broadcast against each other (rows x keys, or keys x rows in the dK/dV kernels)."""
    if HAS_LEFT:
        ok = ok & (c >= r + diag_off - window_left)
    if HAS_RIGHT:
        ok = ok & (c <= r + diag_off + window_right)
    return ok


@triton.jit
def _alibi_rc(r, c_loc, c0, diag_off, ALIBI: tl.constexpr):
    """(r, c, off) for `_scores` of a tile whose keys are c0 + c_loc (c_loc: tile-local key
    offsets, loop-invariant) and rows r (int vectors that broadcast). With ALiBi: float
    distances from the tile's first key (r + off - c0 per row, c_loc per key; small integers,
    exact), so the bias costs a float subtract and an FMA per element (|.| is an operand
    modifier) instead of an int negate, max, int->float conversion, multiply and FMA (sm_90
    SASS of the forward's interior loop at d128: 640 instructions, plain 508, before 929);
    without ALiBi, r and c unchanged."""
    if ALIBI:
        return (r + (diag_off - c0)).to(tl.float32), c_loc.to(tl.float32), 0
    else:
        return r, c_loc, diag_off  # unused by `_scores` without ALiBi


@triton.jit
def _scores(a, b, scale_a, scale_b, slope2, r, c, diag_off, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr, FOLD: tl.constexpr, IEEE: tl.constexpr):
    """(s, mult, t) for the tile a @ b of rows r and keys c: scores in log2 units s * mult,
    already multiplied unless FOLD (then the multiply, with mult > 0, is left to the exponent's
    FMA and the row max is taken before it), plus the ALiBi bias -slope * |r + off - c| (divided
    by mult when FOLD); t = tanh(a @ b * scale_a) with softcap (the backward's derivative needs
    it)."""
    s = _dot(a, b, IEEE)
    t = s
    if SOFTCAP:
        t = _tanh(s * scale_a)
        s = t
        mult = scale_b
    else:
        mult = scale_a
    if not FOLD:
        s = s * mult
    if ALIBI:
        if FOLD:  # scores still unscaled: the bias over mult, one FMA per element
            s = s - (slope2 / mult) * tl.abs(r + diag_off - c).to(tl.float32)
        else:
            s = s - slope2 * tl.abs(r + diag_off - c).to(tl.float32)
    return s, mult, t


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, mult, v, r, c, p_drop, seed, bh, FOLD: tl.constexpr,
                SAFE: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, rt=0.0,
                RT: tl.constexpr = False):
    """One online-softmax step of the forward over a key tile of (masked) scores s: returns
    (acc, l_i, m_i) with P V added. SAFE: rows whose keys are all masked so far (max -inf)
    subtract 0 instead of -inf. RT: a per-row term rt (final log2 units) belongs to every score
    of the row (ALiBi's split walk): it enters the row max and the exponent's subtrahend, a
    vector op per tile instead of an add per score."""
    if FOLD:
        m_t = tl.max(s, 1) * mult
    else:
        m_t = tl.max(s, 1)
    if RT:
        m_t = m_t + rt
    m_new = tl.maximum(m_i, m_t)
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    if RT:
        m_use = m_use - rt
    if FOLD:
        p = tl.exp2(s * mult - m_use[:, None])
    else:
        p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _dropout_keep(seed, bh, r, c, p_drop)
        p = tl.where(keep, p, 0.0)
    acc = _dot_acc(_cast(p, v.dtype), v, acc, IEEE)
    return acc, l_i, m_new


@triton.jit
def _fwd_store(acc, l_i, m_i, O, R, LSE, b64, h, q_start, offs_m, offs_dv, seqlen_q,
               stride_ob, stride_os, stride_oh, stride_lb, stride_lh, drop_scale,
               HEAD_DIM_V: tl.constexpr, DROPOUT: tl.constexpr, RESID: tl.constexpr):
    """The forward's end: normalize, store O (and its rounding error R) and the lse of rows
    offs_m of (batch b64, head h); q_start: the sequence's first row (varlen), else 0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if DROPOUT:
        inv = inv * drop_scale
    acc = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    o_off = b64 * stride_ob + q_start * stride_os + h * stride_oh
    o_off = o_off + offs_m[:, None] * stride_os + offs_dv[None, :]
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    o_low = _cast(acc, O.dtype.element_ty)
    tl.store(O + o_off, o_low, mask=o_mask)
    if RESID:  # the rounding error of the stored output, for the backward's delta (R: O's layout)
        tl.store(R + o_off, _cast(acc - o_low.to(tl.float32), O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _dq_lse2(lse, sm_scale):
    """(lse2, post) for the dQ kernels: p * scale = exp2(s2 - lse2), so dS * scale comes out of
    the same FMA as dS and is what gets rounded (as in plain attention's autograd; see the dK/dV
    kernel); a scale <= 0 can't be shifted into the exponent: it stays a multiply (post) at the
    end. Rows with no allowed key (lse = -inf) get p = 0."""
    pos = sm_scale > 0
    shift = tl.where(pos, tl.log2(tl.where(pos, sm_scale, 1.0)), 0.0)
    post = tl.where(pos, 1.0, sm_scale)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634 - shift)
    return lse2, post


@triton.jit
def _dq_acc(dq, p, t, do, vt, kt, delta, r, c, p_drop, drop_scale, seed, bh,
            SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr):
    """dQ += dS K for a key tile of (masked) probabilities p (times the scale)."""
    dp = _dot(do, vt, IEEE)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, r, c, p_drop)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot_acc(_cast(ds, kt.dtype), tl.trans(kt), dq, IEEE)


@triton.jit
def _dkdv_acc(dk, dv, pt, tt, v, do, qt, delta, r, c, sm_scale, p_drop, drop_scale, seed, bh,
              SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q for a query tile of (masked) transposed probabilities pt
    (keys x queries); returns (dk, dv, ds_lo), ds_lo = scale * dS^T rounded to Q's dtype."""
    dpt = _dot(v, tl.trans(do), IEEE)  # (BLOCK_N, BLOCK_M)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, r, c, p_drop)
        pdt = tl.where(keep, pt * drop_scale, 0.0)
        dpt = tl.where(keep, dpt * drop_scale, 0.0)
    else:
        pdt = pt
    dv = _dot_acc(_cast(pdt, do.dtype), do, dv, IEEE)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tt * tt)
    # dS * scale is rounded, not dS: the rounding plain attention's autograd does (its scores
    # are scaled in float32 before the cast), so the two errors are alike, not independent.
    ds_lo = _cast(dst * sm_scale, qt.dtype)
    dk = _dot_acc(ds_lo, tl.trans(qt), dk, IEEE)
    return dk, dv, ds_lo


@triton.jit
def _dk_or_dv_acc(acc, pt, tt, v, do, qt, delta, r, c, sm_scale, p_drop, drop_scale, seed, bh,
                  ROLE: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                  IEEE: tl.constexpr):
    """One of `_dkdv_acc`'s two accumulators, with the same arithmetic: ROLE 1 dV += P^T dO,
    ROLE 2 dK += (scale * dS)^T Q (the split backward: one accumulator per program, so the
    key block can be twice as tall at head_dim 256). Returns (acc, ds_lo): ds_lo as in
    `_dkdv_acc` for ROLE 2 (the fused dQ's left operand), P^T in dO's dtype for ROLE 1."""
    if ROLE == 1:
        if DROPOUT:
            keep = _dropout_keep(seed, bh, r, c, p_drop)
            pdt = tl.where(keep, pt * drop_scale, 0.0)
        else:
            pdt = pt
        ds_lo = _cast(pdt, do.dtype)  # (P^T for ROLE 1: the name keeps one return type)
        acc = _dot_acc(ds_lo, do, acc, IEEE)
    else:
        dpt = _dot(v, tl.trans(do), IEEE)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, r, c, p_drop)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        ds_lo = _cast(dst * sm_scale, qt.dtype)
        acc = _dot_acc(ds_lo, tl.trans(qt), acc, IEEE)
    return acc, ds_lo


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
    desc_k, desc_v, k_row0, k_col, v_col,
    offs_m, offs_n, offs_d, offs_dv, lo, hi,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, p_drop, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr, slope2=0.0, ALIBI: tl.constexpr = False, WS: tl.constexpr = False,
    SIDE: tl.constexpr = 0,
):
    # WS: Triton's automatic warp specialization of the loop (producer warps for the loads,
    # consumer warps for the dots and softmax; Hopper/Blackwell), opt-in, interior blocks only
    # SIDE (ALiBi, unmasked blocks wholly on one side of the diagonal): 1 every key j <= i + off
    # (left), 2 every key j >= i + off (right). The bias -slope |i + off - j| then splits into a
    # key term, slope * (j - c0) (left) or -slope * (j - c0) (right), the same for every tile
    # (one add per score), and a row term per tile (-slope * (i + off - c0) or
    # -slope * (c0 - i - off)) that goes into the softmax's row max: one op per score instead of
    # `_alibi_rc`'s two (subtract, FMA with |.|)
    offs_nf = offs_n.to(tl.float32)  # ALiBi's key offsets, converted once (_alibi_rc)
    ALI_SIDE: tl.constexpr = ALIBI and SIDE != 0
    cterm = offs_nf
    if ALI_SIDE:
        if FOLD:  # scores stay unscaled until the exponent: the key term over the multiplier
            if SOFTCAP:
                cterm = offs_nf * (slope2 / scale_b)
            else:
                cterm = offs_nf * (slope2 / scale_a)
        else:
            cterm = offs_nf * slope2
        if SIDE == 2:
            cterm = -cterm
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS and not MASKED):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_dv[None, :]
        ar, ac, aoff = _alibi_rc(offs_m[:, None], offs_nf[None, :], start_n, diag_off, ALIBI)
        if TMA and not MASKED:
            # interior blocks only: in bounds by construction, so the (rows, heads*dim) view's
            # tiles never cross into another sequence or head
            kt = tl.trans(desc_k.load([k_row0 + start_n, k_col]))
            v = desc_v.load([k_row0 + start_n, v_col])
        else:
            kt = _load(kt_ptrs, cols[None, :] < seqlen_k, offs_d[:, None] < HEAD_DIM, MASKED,
                       BLOCK_D != HEAD_DIM)
            v = _load(v_ptrs, cols[:, None] < seqlen_k, offs_dv[None, :] < HEAD_DIM_V, MASKED,
                      BLOCK_DV != HEAD_DIM_V)
        s, mult, _ = _scores(q, kt, scale_a, scale_b, slope2, ar, ac, aoff, SOFTCAP,
                             ALIBI and not ALI_SIDE, FOLD, IEEE)
        rt = 0.0
        if ALI_SIDE:
            s = s + cterm[None, :]
            dist = (offs_m + (diag_off - start_n)).to(tl.float32)  # i + off - c0, per row
            if SIDE == 1:
                rt = -slope2 * dist
            else:
                rt = slope2 * dist
        if MASKED:
            ok = _band_ok(cols[None, :] < seqlen_k, offs_m[:, None], cols[None, :], diag_off,
                          window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, mult, v, offs_m[:, None], cols[None, :],
                                    p_drop, seed, bh, FOLD, MASKED, DROPOUT, IEEE, rt, ALI_SIDE)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def attn_fwd(
    Q, K, V, O, LSE, R, CU_Q, CU_K, DESC_K, DESC_V,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, p_drop, drop_scale, seed, n_heads, SLOPES, stride_sb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr, RESID: tl.constexpr, ALIBI: tl.constexpr = False, WS: tl.constexpr = False,
    LPT: tl.constexpr = False, ALIBI_SPLIT: tl.constexpr = False,
):
    pid_m, h, b = _pids(LPT, True)
    q_start, seqlen_q = _seq(CU_Q, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq(CU_K, b, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    # (the grid is exact without varlen; the warp-specialization pass wants no early exit)
    if VARLEN or not WS:
        if m0 >= seqlen_q:
            return
    b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv = _q_tile(
        b, h, m0, seqlen_q, seqlen_k, n_heads, SLOPES, stride_sb, GROUP, ALIBI, BLOCK_M, BLOCK_N,
        BLOCK_D, BLOCK_DV)

    q_base = Q + b64 * stride_qb + q_start * stride_qs + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )

    # Key range of this query block (bottom-right aligned band), and its mask-free middle.
    lo, mid0, mid1, hi = _q_band(m0, seqlen_q, seqlen_k, diag_off, window_left, window_right,
                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    # TMA view of K/V: (rows, heads * dim); row of key j of this sequence = k_row0 + j
    if VARLEN:
        k_row0 = k_start.to(tl.int32)
    else:
        k_row0 = b * seqlen_k
    k_col = hk * HEAD_DIM
    v_col = hk * HEAD_DIM_V

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if ALIBI and ALIBI_SPLIT:
        # ALiBi's split walk: the boundaries (0, 4) and the interior as the blocks left of the
        # diagonal (1), those that meet it (2), those right of it (3)
        for part in tl.static_range(5):
            start, end = _alibi_part(part, lo, mid0, mid1, hi, m0, diag_off, BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                DESC_K, DESC_V, k_row0, k_col, v_col, offs_m, offs_n, offs_d, offs_dv,
                start, end, seqlen_k, diag_off, window_left, window_right, scale_a, scale_b,
                p_drop, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                (part == 0) or (part == 4), HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, FOLD,
                TMA, slope2, ALIBI, WS, (part == 1) * 1 + (part == 3) * 2,
            )
    else:
        for part in tl.static_range(3):  # boundary blocks (masked), the interior, boundary
            start, end = _part(part, lo, mid0, mid1, hi)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                DESC_K, DESC_V, k_row0, k_col, v_col, offs_m, offs_n, offs_d, offs_dv,
                start, end, seqlen_k, diag_off, window_left, window_right, scale_a, scale_b,
                p_drop, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, part != 1,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, FOLD, TMA, slope2, ALIBI, WS,
            )

    _fwd_store(acc, l_i, m_i, O, R, LSE, b64, h, q_start, offs_m, offs_dv, seqlen_q, stride_ob,
               stride_os, stride_oh, stride_lb, stride_lh, drop_scale, HEAD_DIM_V, DROPOUT, RESID)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seqlen_q"])
def attn_bwd_preprocess(
    O, R, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_RESID: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id (minus dlse_i: folds the lse gradient into ds). With the
    forward's residual R (O's layout), O is the float32 output O + R, not the rounded one."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq(CU_Q, b, seqlen_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    msk = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    o_off = b64 * stride_ob + (q_start + offs_m[:, None]) * stride_os + h * stride_oh + offs_dv[None, :]
    o = tl.load(O + o_off, mask=msk, other=0.0).to(tl.float32)
    if HAS_RESID:
        o = o + tl.load(R + o_off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(
        DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dos + h * stride_doh + offs_dv[None, :],
        mask=msk, other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_ptr = b64 * stride_lb + h * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + row_ptr, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row_ptr, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
    dqa_base, stride_dqas, sm_scale,
    offs_n, offs_m, offs_d, offs_dv, lo, hi,
    seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, p_drop, drop_scale, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, FUSED_DQ: tl.constexpr,
    slope2=0.0, ALIBI: tl.constexpr = False, ROLE: tl.constexpr = 0,
    desc_q=None, desc_do=None, q_row0=0, q_col=0, do_col=0, TMA: tl.constexpr = False,
    desc_dqa=None, DQ_TMA: tl.constexpr = False,
):
    # ROLE 0: dK and dV; 1: dV only (dk passes through); 2: dK only (dv passes through).
    # FUSED_DQ (ROLE 0 or 2): dQ += (scale * dS) K into the float32 buffer DQA by atomics;
    # DQ_TMA: the interior query blocks' adds as one bulk tensor reduction each (TMA
    # cp.reduce.async.bulk through desc_dqa, a (rows, heads*dim) float32 view), the rest as
    # per-element atomics
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        if TMA and not MASKED:
            # interior query blocks only: full and inside the sequence, so the (rows,
            # heads*dim) view's tiles never cross into another sequence or head
            qt = tl.trans(desc_q.load([q_row0 + start_m, q_col]))
            do = desc_do.load([q_row0 + start_m, do_col])
        else:
            qt_ptrs = q_base + rows[None, :] * stride_qs + offs_d[:, None]
            do_ptrs = do_base + rows[:, None] * stride_dos + offs_dv[None, :]
            qt = _load(qt_ptrs, rows[None, :] < seqlen_q, offs_d[:, None] < HEAD_DIM, MASKED,
                       BLOCK_D != HEAD_DIM)
            do = _load(do_ptrs, rows[:, None] < seqlen_q, offs_dv[None, :] < HEAD_DIM_V, MASKED,
                       BLOCK_DV != HEAD_DIM_V)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < seqlen_q, other=0.0)
            if ROLE != 1:
                delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            if ROLE != 1:
                delta = tl.load(delta_base + rows)
        if ROLE == 1:
            delta = lse  # unused: the dV program needs no delta
        # rows with no allowed key carry lse = -inf: make their p exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        # (BLOCK_N, BLOCK_M): keys x queries
        st, _, tt = _scores(k, qt, scale_a, scale_b, slope2, rows[None, :], offs_n[:, None],
                            diag_off, SOFTCAP, ALIBI, False, IEEE)
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:
            ok = _band_ok(rows[None, :] < seqlen_q, rows[None, :], offs_n[:, None], diag_off,
                          window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        if ROLE == 0:
            dk, dv, ds_lo = _dkdv_acc(dk, dv, pt, tt, v, do, qt, delta, rows[None, :],
                                      offs_n[:, None], sm_scale, p_drop, drop_scale, seed, bh,
                                      SOFTCAP, DROPOUT, IEEE)
        elif ROLE == 1:
            dv, _ = _dk_or_dv_acc(dv, pt, tt, v, do, qt, delta, rows[None, :], offs_n[:, None],
                                  sm_scale, p_drop, drop_scale, seed, bh, 1, SOFTCAP, DROPOUT, IEEE)
        else:
            dk, ds_lo = _dk_or_dv_acc(dk, pt, tt, v, do, qt, delta, rows[None, :],
                                      offs_n[:, None], sm_scale, p_drop, drop_scale, seed, bh, 2, SOFTCAP, DROPOUT, IEEE)
        if FUSED_DQ:
            # dQ += (scale * dS) K, accumulated across key blocks with float32 atomics
            dq_part = _dot(tl.trans(ds_lo), k, IEEE)
            dqa_ptrs = dqa_base + rows[:, None] * stride_dqas + offs_d[None, :]
            if DQ_TMA and not MASKED:
                if _UPCAST_BF16:  # the interpreter has no descriptor reductions; its
                    # programs run one at a time, so a load-add-store through the same
                    # descriptor is the same sum (tests the offsets)
                    desc_dqa.store([q_row0 + start_m, q_col],
                                   desc_dqa.load([q_row0 + start_m, q_col]) + dq_part)
                else:
                    desc_dqa.atomic_add([q_row0 + start_m, q_col], dq_part)
            elif MASKED:
                tl.atomic_add(dqa_ptrs, dq_part, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
            elif BLOCK_D != HEAD_DIM:
                tl.atomic_add(dqa_ptrs, dq_part, mask=offs_d[None, :] < HEAD_DIM, sem="relaxed")
            else:
                tl.atomic_add(dqa_ptrs, dq_part, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA, CU_Q, CU_K, DESC_Q, DESC_DO,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads, SLOPES, stride_sb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, FUSED_DQ: tl.constexpr,
    ALIBI: tl.constexpr = False, ROLE: tl.constexpr = 0, TMA: tl.constexpr = False,
    DESC_DQA=None, DQ_TMA: tl.constexpr = False, LPT: tl.constexpr = False,
):
    """One program per (key block, KV head, batch); loops over the GQA group's query heads and
    the query blocks that see this key block, so dK/dV are summed without atomics.
    TMA: the interior query blocks' Q and dO tiles come through Hopper tensor descriptors
    DESC_Q / DESC_DO over (rows, heads*dim) views (opt-in, FLASHMUX_TRITON_BWD_TMA=1);
    otherwise DESC_Q / DESC_DO are unused.
    ROLE 0 computes dK and dV; the split backward launches it twice, ROLE 1 (dV only: no V, no
    delta, 2 matmuls per tile pair) and ROLE 2 (dK only, 3 matmuls), each program holding one
    float32 accumulator instead of two (NOTES.md, session 8)."""
    pid_n, hk, b = _pids(LPT, False)
    q_start, seqlen_q = _seq(CU_Q, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq(CU_K, b, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    diag_off = seqlen_k - seqlen_q

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + b64 * stride_kb + (k_start + offs_n[:, None]) * stride_ks + hk * stride_kh + offs_d[None, :],
        mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    if ROLE == 1:
        v = k  # unused: the dV program needs no V
    else:
        v = tl.load(
            V + b64 * stride_vb + (k_start + offs_n[:, None]) * stride_vs + hk * stride_vh + offs_dv[None, :],
            mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
        )

    # Query rows that see keys [n0, n_last]: j <= i + off + right  <=>  i >= j - off - right,
    # j >= i + off - left  <=>  i <= j - off + left. Key-tail columns need no mask here: their
    # dK/dV rows are never stored and they touch no other column.
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo_edge = 0
    lo_full = 0
    hi_edge = seqlen_q
    hi_full = seqlen_q
    if HAS_RIGHT:
        lo_edge = n0 - diag_off - window_right
        lo_full = n_last - diag_off - window_right
    if HAS_LEFT:
        hi_edge = n_last - diag_off + window_left + 1
        hi_full = n0 - diag_off + window_left + 1
    lo, mid0, mid1, hi = _band(lo_edge, hi_edge, seqlen_q, lo_full, hi_full, BLOCK_M)

    if ROLE == 1:
        dk = tl.zeros([16, 16], dtype=tl.float32)  # placeholder, passed through untouched
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if ROLE == 2:
        dv = tl.zeros([16, 16], dtype=tl.float32)
    else:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # TMA view of Q/dO: (rows, heads * dim); row of query i of this sequence = q_row0 + i
    if VARLEN:
        q_row0 = q_start.to(tl.int32)
    else:
        q_row0 = b * seqlen_q
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * n_heads + h
        slope2 = _slope2(SLOPES, b, stride_sb, h, ALIBI)
        q_base = Q + b64 * stride_qb + q_start * stride_qs + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dos + h * stride_doh
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        dqa_base = DQA + b64 * stride_dqab + q_start * stride_dqas + h * stride_dqah
        for part in tl.static_range(3):  # boundary, interior, boundary (as in the forward)
            start, end = _part(part, lo, mid0, mid1, hi)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                dqa_base, stride_dqas, sm_scale, offs_n, offs_m, offs_d, offs_dv, start, end,
                seqlen_q, diag_off, window_left, window_right, scale_a, scale_b, p_drop,
                drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, part != 1,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, FUSED_DQ, slope2, ALIBI, ROLE,
                DESC_Q, DESC_DO, q_row0, h * HEAD_DIM, h * HEAD_DIM_V, TMA, DESC_DQA, DQ_TMA,
            )
    if ROLE != 1:
        tl.store(
            DK + b64 * stride_dkb + (k_start + offs_n[:, None]) * stride_dks + hk * stride_dkh + offs_d[None, :],
            _cast(dk, DK.dtype.element_ty),
            mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
        )
    if ROLE != 2:
        tl.store(
            DV + b64 * stride_dvb + (k_start + offs_n[:, None]) * stride_dvs + hk * stride_dvh + offs_dv[None, :],
            _cast(dv, DV.dtype.element_ty),
            mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V),
        )


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
    offs_m, offs_n, offs_d, offs_dv, lo, hi,
    seqlen_k, diag_off, window_left, window_right, scale_a, scale_b, p_drop, drop_scale, seed, bh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    slope2=0.0, ALIBI: tl.constexpr = False,
    desc_k=None, desc_v=None, k_row0=0, k_col=0, v_col=0, TMA: tl.constexpr = False,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if TMA and not MASKED:
            # interior key blocks only (in bounds by construction), as in the forward
            kt = tl.trans(desc_k.load([k_row0 + start_n, k_col]))
            vt = tl.trans(desc_v.load([k_row0 + start_n, v_col]))
        else:
            kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
            vt_ptrs = v_base + cols[None, :] * stride_vs + offs_dv[:, None]
            kt = _load(kt_ptrs, cols[None, :] < seqlen_k, offs_d[:, None] < HEAD_DIM, MASKED,
                       BLOCK_D != HEAD_DIM)
            vt = _load(vt_ptrs, cols[None, :] < seqlen_k, offs_dv[:, None] < HEAD_DIM_V, MASKED,
                       BLOCK_DV != HEAD_DIM_V)
        s, _, t = _scores(q, kt, scale_a, scale_b, slope2, offs_m[:, None], cols[None, :],
                          diag_off, SOFTCAP, ALIBI, False, IEEE)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            ok = _band_ok(cols[None, :] < seqlen_k, offs_m[:, None], cols[None, :], diag_off,
                          window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dq = _dq_acc(dq, p, t, do, vt, kt, delta, offs_m[:, None], cols[None, :], p_drop,
                     drop_scale, seed, bh, SOFTCAP, DROPOUT, IEEE)
    return dq


@triton.jit(do_not_specialize=["seed", "window_left", "window_right", "seqlen_q", "seqlen_k"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DESC_K, DESC_V,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, window_left, window_right,
    scale_a, scale_b, sm_scale, p_drop, drop_scale, seed, n_heads, SLOPES, stride_sb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    ALIBI: tl.constexpr = False, TMA: tl.constexpr = False, LPT: tl.constexpr = False,
):
    """One program per (query block, query head, batch): dQ without atomics (deterministic).
    TMA: interior key blocks' K and V through tensor descriptors DESC_K / DESC_V over
    (rows, heads*dim) views (FLASHMUX_TRITON_BWD_TMA=1); otherwise those are unused.
    LPT: heaviest query blocks first (`_pids`)."""
    pid_m, h, b = _pids(LPT, True)
    q_start, seqlen_q = _seq(CU_Q, b, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq(CU_K, b, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, hk, bh, diag_off, slope2, offs_m, offs_n, offs_d, offs_dv = _q_tile(
        b, h, m0, seqlen_q, seqlen_k, n_heads, SLOPES, stride_sb, GROUP, ALIBI, BLOCK_M, BLOCK_N,
        BLOCK_D, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q = tl.load(
        Q + b64 * stride_qb + (q_start + offs_m[:, None]) * stride_qs + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dos + h * stride_doh + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )
    row_ptr = b64 * stride_lb + h * stride_lh + q_start + offs_m
    lse = tl.load(LSE + row_ptr, mask=row_ok, other=0.0)
    lse2, post = _dq_lse2(lse, sm_scale)
    delta = tl.load(DELTA + row_ptr, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh

    lo, mid0, mid1, hi = _q_band(m0, seqlen_q, seqlen_k, diag_off, window_left, window_right,
                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    if VARLEN:
        k_row0 = k_start.to(tl.int32)
    else:
        k_row0 = b * seqlen_k
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in tl.static_range(3):  # boundary, interior, boundary (as in the forward)
        start, end = _part(part, lo, mid0, mid1, hi)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
            offs_dv, start, end, seqlen_k, diag_off, window_left, window_right, scale_a, scale_b,
            p_drop, drop_scale, seed, bh, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
            part != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, IEEE, slope2, ALIBI,
            DESC_K, DESC_V, k_row0, hk * HEAD_DIM, hk * HEAD_DIM_V, TMA,
        )
    dq = dq * post
    tl.store(
        DQ + b64 * stride_dqb + (q_start + offs_m[:, None]) * stride_dqs + h * stride_dqh + offs_d[None, :],
        _cast(dq, DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )


# --------------------------------------------------------------------------------------------
# dropout mask (testing hook)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(
    OUT, seqlen_q, seqlen_k, n_heads, p_drop, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT (batch, heads, seqlen_q, seqlen_k) int8: the keep mask the attention kernels draw."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * n_heads + h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = OUT + bh.to(tl.int64) * seqlen_q * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], p_drop)
        tl.store(
            base + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :],
            keep.to(tl.int8),
            mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k),
        )
