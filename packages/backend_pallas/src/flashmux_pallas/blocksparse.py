"""Block-sparse Pallas kernels for `attention(..., block_mask=bm)` (issue 15; the paper's
block-sparse FlashAttention, section 3.3): forward, dQ and dK/dV that visit only the tiles a
flashmux BlockMask lists. Triton lowering on a GPU, interpret mode on the CPU. On sm90 the
forward may take the Mosaic GPU kernel of mosaic_masks.py instead (ops.lowering,
FLASHMUX_PALLAS_MASKS); the backward of every block-masked call runs here.

The design follows the Triton backend's block-sparse kernels (flashmux_triton/_kernels_bs.py):

- The BlockMask's per-query-block lists (full and partial key blocks) drive the forward and dQ
  kernels, its transposed per-key-block lists the dK/dV kernel. They reach the kernels as
  ordinary int32 operands (`operands`), one row per mask block selected by the BlockSpec index
  map, padded to a power of two (Triton-legal block shapes); inside, a loop runs over the listed
  blocks only and reads each block index with one scalar load. Empty tiles are never loaded.
- A mask tile (block_size MBS) is visited as MBS / block kernel tiles (kernel tiles divide it:
  both are powers of two, the kernel's capped at MBS).
- Full tiles skip the element mask (only the key bound and causal/window when the call has them);
  partial tiles read the BlockMask's per-tile bitmask: one int32 word per 32 keys of a row, stored
  word-major here ((nP, MBS/32, MBS): a row of words is one contiguous load), then a shift and an
  AND per element (a kernel tile wider than 32 keys selects its word per column).
  The bitmask, not mask_fn traced in the kernel: mask_fn is Python over index arrays of any
  framework, may close over arrays (document ids) and costs differently per mask; the bitmask
  serves every mask, custom ones included, the same way, and the Triton and Pallas backends
  then agree bit for bit on which elements are allowed.
- Scores, softcap, ALiBi and the online softmax are those of triton_kernels (log2 units);
  dropout uses dropout.keep with the seed operand, as the dense kernels do.

Causal/window on top of a block mask are element masks on the listed tiles; a kernel tile
entirely outside the band, or entirely past a sequence end (the padding of a ragged last mask
tile), is skipped by a branch (`_live`, `lax.cond`) and never loaded. Padded batches only: the
core declines block_mask with cu_seqlens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from . import dropout as _dropout
from ._compat import block_spec, out_struct, pallas, triton_params
from .triton_kernels import (
    LN2,
    LOG2E,
    Static,
    _alibi2,
    _allowed,
    _div,
    _dot,
    _exp2,
    _i32,
    _scores2,
    _slope2,
    slopes_operand,
)


@dataclass(frozen=True)
class MaskStatic:
    """What the kernels are specialised on besides Static (hashable)."""

    mbs: int  # the BlockMask's block_size
    mask_b: bool  # the mask has a batch axis (else one mask for every batch entry)
    mask_h: bool  # the mask has a head axis (per query head)
    check: bool  # full tiles still need the key bound / window (forward and dQ)
    ragged_q: bool = False  # Sq is not a multiple of the mask block (padding query tiles)
    ragged_k: bool = False  # Sk is not a multiple of the mask block (padding key tiles)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def operands(bm):
    """The BlockMask's arrays as the kernels take them (int32, rows padded to a power of two):
    q_cnt (Bm, Hm, nQ, 16) [num_full, num_part, 0...], q_full / q_part / q_ptid (Bm, Hm, nQ, nKp)
    (key blocks, and the partial tiles' bitmask ids), the same per key block for dK/dV
    (kv_cnt, kv_full, kv_part, kv_ptid: (Bm, Hm, nK, .)), and bits (max(nP, 1), MBS/32, MBS)."""
    import jax.numpy as jnp

    i32 = jnp.int32
    nq, nk = bm.num_q_blocks, bm.num_kv_blocks
    nqp, nkp = max(16, _next_pow2(nq)), max(16, _next_pow2(nk))

    def pad(x, n):
        x = jnp.asarray(x).astype(i32)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])

    def cnt(nf, npart):
        return pad(jnp.stack([jnp.asarray(nf), jnp.asarray(npart)], axis=-1), 16)

    tile = jnp.asarray(bm.tile_id).astype(i32)
    q_part = jnp.clip(jnp.asarray(bm.q_part_idx).astype(i32), 0, nk - 1)
    kv_part = jnp.clip(jnp.asarray(bm.kv_part_idx).astype(i32), 0, nq - 1)
    q_ptid = jnp.maximum(jnp.take_along_axis(tile, q_part, axis=-1), 0)
    kv_ptid = jnp.maximum(jnp.take_along_axis(jnp.swapaxes(tile, -1, -2), kv_part, axis=-1), 0)
    bits = jnp.asarray(bm.bits).astype(i32)
    if bits.shape[0] == 0:  # no partial tile: a valid operand all the same
        bits = jnp.zeros((1,) + bits.shape[1:], i32)
    return dict(
        q_cnt=cnt(bm.q_num_full, bm.q_num_part),
        q_full=pad(bm.q_full_idx, nkp),
        q_part=pad(q_part, nkp),
        q_ptid=pad(q_ptid, nkp),
        kv_cnt=cnt(bm.kv_num_full, bm.kv_num_part),
        kv_full=pad(bm.kv_full_idx, nqp),
        kv_part=pad(kv_part, nqp),
        kv_ptid=pad(kv_ptid, nqp),
        bits=jnp.swapaxes(bits, 1, 2),  # word-major: (nP, MBS/32, MBS)
    )


# ----------------------------------------------------------------------------- in-kernel helpers


def _count(vec, which: int):
    """Element `which` of a (16,) int32 count row (a vector reduction: Triton-legal)."""
    import jax.numpy as jnp

    return jnp.sum(jnp.where(jnp.arange(16, dtype=jnp.int32) == which, vec, 0))


def _tile_bits(bits_ref, tid, rl0, cl0, nr: int, nc: int, transposed: bool):
    """Element mask of partial tile `tid` for its local query rows [rl0, rl0+nr) and key columns
    [cl0, cl0+nc): (nr, nc) bool, or (nc, nr) when transposed (the dK/dV kernel's key-major
    tiles). One contiguous (nr,) word load per 32 keys, then a shift and an AND per element."""
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    cl = jnp.arange(nc, dtype=jnp.int32)
    cl = cl[:, None] if transposed else cl[None, :]
    base = _div(cl0, 32)
    bit = (lax.rem(_i32(cl0), _i32(32)) + cl) if nc < 32 else cl % 32
    m = None
    for j in range(max(1, nc // 32)):
        w = bits_ref[tid, base + j, pl.ds(rl0, nr)]
        w = w[None, :] if transposed else w[:, None]
        bj = jnp.right_shift(w, bit) & 1
        m = bj if m is None else jnp.where(cl // 32 == j, bj, m)
    return m != 0


def _has_window(st: Static) -> bool:
    return st.window_left is not None or st.window_right is not None


def _live(r0, nr: int, c0, nc: int, sq, sk, off, st: Static, ms: MaskStatic):
    """Whether the kernel tile of query rows [r0, r0+nr) and keys [c0, c0+nc) can hold an
    allowed element: not entirely past a sequence end (the padding of a ragged last mask tile)
    nor outside the causal/window band. None when every listed tile is live (no test traced)."""
    conds = []
    if ms.ragged_k:
        conds.append(c0 < sk)
    if ms.ragged_q:
        conds.append(r0 < sq)
    if st.window_right is not None:
        conds.append(c0 <= r0 + (nr - 1) + off + st.window_right)
    if st.window_left is not None:
        conds.append(c0 + (nc - 1) >= r0 + off - st.window_left)
    if not conds:
        return None
    live = conds[0]
    for c in conds[1:]:
        live = live & c
    return live


def _visit(step, carry, start, ok, live):
    """step(carry, start, ok) for a live tile; a dead one (live False) is skipped, not loaded."""
    from jax import lax

    if live is None:
        return step(carry, start, ok)
    return lax.cond(live, lambda c: step(c, start, ok), lambda c: c, carry)


def _mb(ms: MaskStatic, b):
    return b if ms.mask_b else 0


def _mh(ms: MaskStatic, h):
    return h if ms.mask_h else 0


def _call(kernel, st: Static, ms: MaskStatic, names, grid, in_specs, out_specs, out_shape, name):
    pl = pallas()
    return pl.pallas_call(
        functools.partial(kernel, st=st, ms=ms, names=tuple(names)),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if st.interpret else triton_params(st.num_warps, st.num_stages),
        interpret=st.interpret,
        name=name,
    )


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, st: Static, ms: MaskStatic, names):
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    r = dict(zip(names, refs))
    bm, bn, mbs = st.block_m, st.block_n, ms.mbs
    qi, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sq, sk = _i32(st.seqlen_q), _i32(st.seqlen_k)
    off = sk - sq
    r0 = qi * bm
    rl0 = lax.rem(_i32(r0), _i32(mbs))
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)[:, None]
    q = r["q"][...]
    dv = r["v"].shape[-1]
    slope2 = _slope2(r["slopes"]) if st.alibi else None
    seed = _dropout.seed_of(r["seed"]) if st.dropout_p > 0 else None
    sub = mbs // bn
    cnt = r["cnt"][...]

    def step(carry, start, ok):
        acc, m, l = carry
        k = r["k"][pl.ds(start, bn), :]
        v = r["v"][pl.ds(start, bn), :]
        s2, _ = _scores2(_dot(q, k, st, trans_b=True), st)
        cols = start + jnp.arange(bn, dtype=jnp.int32)[None, :]
        if st.alibi:
            s2 = _alibi2(s2, slope2, rows, cols, off)
        if ok is not None:
            s2 = jnp.where(ok(cols), s2, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s2, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = _exp2(s2 - m_use[:, None], st)
        l = l * alpha + jnp.sum(p, axis=1)
        if seed is not None:
            p = jnp.where(_dropout.keep(seed, st.dropout_p, b, h, rows, cols), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, st)
        return acc, m_new, l

    def full_body(t, carry):
        start = r["full"][_div(t, sub)] * mbs + lax.rem(_i32(t), _i32(sub)) * bn
        start = pl.multiple_of(start, bn)
        ok = (lambda cols: _allowed(rows, cols, sk, off, st)) if ms.check else None
        return _visit(step, carry, start, ok, _live(r0, bm, start, bn, sq, sk, off, st, ms))

    def part_body(t, carry):
        j = _div(t, sub)
        cl0 = lax.rem(_i32(t), _i32(sub)) * bn
        start = pl.multiple_of(r["part"][j] * mbs + cl0, bn)
        tid = r["ptid"][j]

        def ok(cols):
            m = _tile_bits(r["bits"], tid, rl0, cl0, bm, bn, transposed=False)
            if _has_window(st):  # the bitmask already holds the key bound
                m = m & _allowed(rows, cols, sk, off, st, check_k=False)
            return m

        return _visit(step, carry, start, ok, _live(r0, bm, start, bn, sq, sk, off, st, ms))

    carry = (
        jnp.zeros((bm, dv), jnp.float32),
        jnp.full((bm,), -jnp.inf, jnp.float32),
        jnp.zeros((bm,), jnp.float32),
    )
    carry = lax.fori_loop(0, _count(cnt, 0) * sub, full_body, carry)
    acc, m, l = lax.fori_loop(0, _count(cnt, 1) * sub, part_body, carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    inv = 1.0 / l_safe
    if st.dropout_p > 0:
        inv = inv * (1.0 / (1.0 - st.dropout_p))
    o32 = acc * inv[:, None]
    o = o32.astype(r["o"].dtype)
    r["o"][...] = o
    if st.residual:
        r["r"][...] = (o32 - o.astype(jnp.float32)).astype(r["r"].dtype)
    r["lse"][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _q_lists(ms: MaskStatic, mo, per: int, names, in_specs, args):
    """The per-query-block list operands (forward, dQ): row (b, h, query mask block)."""
    for n in ("q_cnt", "q_full", "q_part", "q_ptid"):
        width = mo[n].shape[-1]
        in_specs.append(block_spec(
            (None, None, None, width),
            lambda i, h, b, per=per: (_mb(ms, b), _mh(ms, h), i // per, 0)))
        args.append(mo[n])
        names.append(n[2:])


def _tail_operands(st: Static, mo, slopes, seed, names, in_specs, args, heads_block=None):
    """bits (whole), slopes and seed operands, in that order."""
    bshape = mo["bits"].shape
    in_specs.append(block_spec(bshape, lambda *_: (0, 0, 0)))
    args.append(mo["bits"])
    names.append("bits")
    if st.alibi:
        if heads_block is None:
            in_specs.append(block_spec((None, None, 16), lambda i, h, b: (b, h, 0)))
        else:
            in_specs.append(block_spec((None, heads_block, 16), lambda j, h, b: (b, h, 0)))
        args.append(slopes)
        names.append("slopes")
    if st.dropout_p > 0:
        in_specs.append(block_spec((None, 16), lambda *_: (0, 0)))
        args.append(seed)
        names.append("seed")


def forward_call(q, k, v, st: Static, ms: MaskStatic, mo, slopes=None, seed=None):
    """q (B, Sqp, Hq, Dp), k/v (B, Skp, Hkv, D) padded to mask-block multiples -> out, lse
    (B, Hq, Sqp) (and out_residual with st.residual)."""
    import jax.numpy as jnp

    B, Sqp, Hq, Dp = q.shape
    Skp, Dvp = k.shape[1], v.shape[-1]
    bm, g = st.block_m, st.group
    names = ["q", "k", "v"]
    in_specs = [
        block_spec((None, bm, None, Dp), lambda i, h, b: (b, i, h, 0)),
        block_spec((None, Skp, None, Dp), lambda i, h, b: (b, 0, h // g, 0)),
        block_spec((None, Skp, None, Dvp), lambda i, h, b: (b, 0, h // g, 0)),
    ]
    args = [q, k, v]
    _q_lists(ms, mo, ms.mbs // bm, names, in_specs, args)
    _tail_operands(st, mo, slopes, seed, names, in_specs, args)
    o_spec = block_spec((None, bm, None, Dvp), lambda i, h, b: (b, i, h, 0))
    out_specs = [o_spec, block_spec((None, None, bm), lambda i, h, b: (b, h, i))]
    out_shape = [out_struct((B, Sqp, Hq, Dvp), q.dtype, q), out_struct((B, Hq, Sqp), jnp.float32, q)]
    names += ["o", "lse"]
    if st.residual:
        out_specs.append(o_spec)
        out_shape.append(out_shape[0])
        names.append("r")
    grid = (Sqp // bm, Hq, B)
    return _call(_fwd_kernel, st, ms, names, grid, in_specs, out_specs, out_shape,
                 "flashmux_bs_fwd")(*args)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(*refs, st: Static, ms: MaskStatic, names):
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    r = dict(zip(names, refs))
    bm, bn, mbs = st.block_m, st.block_n, ms.mbs
    qi, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sq, sk = _i32(st.seqlen_q), _i32(st.seqlen_k)
    off = sk - sq
    r0 = qi * bm
    rl0 = lax.rem(_i32(r0), _i32(mbs))
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)[:, None]
    q, do = r["q"][...], r["do"][...]
    lse2, delta = r["lse2"][...], r["delta"][...]
    slope2 = _slope2(r["slopes"]) if st.alibi else None
    seed = _dropout.seed_of(r["seed"]) if st.dropout_p > 0 else None
    inv_keep = 1.0 / (1.0 - st.dropout_p) if st.dropout_p > 0 else 1.0
    sub = mbs // bn
    cnt = r["cnt"][...]

    def step(dq, start, ok):
        k = r["k"][pl.ds(start, bn), :]
        v = r["v"][pl.ds(start, bn), :]
        s2, t = _scores2(_dot(q, k, st, trans_b=True), st)
        cols = start + jnp.arange(bn, dtype=jnp.int32)[None, :]
        if st.alibi:
            s2 = _alibi2(s2, slope2, rows, cols, off)
        p = _exp2(s2 - lse2[:, None], st)  # scale_ds: lse2 - log2(scale) came in: p * scale
        if ok is not None:
            p = jnp.where(ok(cols), p, 0.0)
        dp = _dot(do, v, st, trans_b=True)
        if seed is not None:
            kp = _dropout.keep(seed, st.dropout_p, b, h, rows, cols)
            dp = jnp.where(kp, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k, st)

    def full_body(t, dq):
        start = r["full"][_div(t, sub)] * mbs + lax.rem(_i32(t), _i32(sub)) * bn
        ok = (lambda cols: _allowed(rows, cols, sk, off, st)) if ms.check else None
        start = pl.multiple_of(start, bn)
        return _visit(step, dq, start, ok, _live(r0, bm, start, bn, sq, sk, off, st, ms))

    def part_body(t, dq):
        j = _div(t, sub)
        cl0 = lax.rem(_i32(t), _i32(sub)) * bn
        start = pl.multiple_of(r["part"][j] * mbs + cl0, bn)
        tid = r["ptid"][j]

        def ok(cols):
            m = _tile_bits(r["bits"], tid, rl0, cl0, bm, bn, transposed=False)
            if _has_window(st):
                m = m & _allowed(rows, cols, sk, off, st, check_k=False)
            return m

        return _visit(step, dq, start, ok, _live(r0, bm, start, bn, sq, sk, off, st, ms))

    dq = jnp.zeros((bm, q.shape[-1]), jnp.float32)
    dq = lax.fori_loop(0, _count(cnt, 0) * sub, full_body, dq)
    dq = lax.fori_loop(0, _count(cnt, 1) * sub, part_body, dq)
    if not st.scale_ds:
        dq = dq * st.scale
    r["dq"][...] = dq.astype(r["dq"].dtype)


def dq_call(q, k, v, do, lse2, delta, st: Static, ms: MaskStatic, mo, slopes=None, seed=None):
    """-> dq. With st.scale_ds, lse2 is lse2 - log2(scale) (ops._dq_lse2)."""
    B, Sqp, Hq, Dp = q.shape
    Skp, Dvp = k.shape[1], v.shape[-1]
    bm, g = st.block_m, st.group
    row_spec = block_spec((None, None, bm), lambda i, h, b: (b, h, i))
    names = ["q", "k", "v", "do", "lse2", "delta"]
    in_specs = [
        block_spec((None, bm, None, Dp), lambda i, h, b: (b, i, h, 0)),
        block_spec((None, Skp, None, Dp), lambda i, h, b: (b, 0, h // g, 0)),
        block_spec((None, Skp, None, Dvp), lambda i, h, b: (b, 0, h // g, 0)),
        block_spec((None, bm, None, Dvp), lambda i, h, b: (b, i, h, 0)),
        row_spec,
        row_spec,
    ]
    args = [q, k, v, do, lse2, delta]
    _q_lists(ms, mo, ms.mbs // bm, names, in_specs, args)
    _tail_operands(st, mo, slopes, seed, names, in_specs, args)
    names.append("dq")
    out_specs = block_spec((None, bm, None, Dp), lambda i, h, b: (b, i, h, 0))
    grid = (Sqp // bm, Hq, B)
    return _call(_dq_kernel, st, ms, names, grid, in_specs, out_specs,
                 out_struct(q.shape, q.dtype, q), "flashmux_bs_dq")(*args)


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkdv_kernel(*refs, st: Static, ms: MaskStatic, names):
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    r = dict(zip(names, refs))
    bm, bn, mbs, G = st.block_m, st.block_n, ms.mbs, st.group
    kb, hk, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sq, sk = _i32(st.seqlen_q), _i32(st.seqlen_k)
    off = sk - sq
    c0 = kb * bn
    cl0 = lax.rem(_i32(c0), _i32(mbs))
    cols_t = c0 + jnp.arange(bn, dtype=jnp.int32)[:, None]  # key rows, as a column
    k, v = r["k"][...], r["v"][...]
    seed = _dropout.seed_of(r["seed"]) if st.dropout_p > 0 else None
    inv_keep = 1.0 / (1.0 - st.dropout_p) if st.dropout_p > 0 else 1.0
    sub = mbs // bm

    def head_body(g, carry):
        slope2 = _slope2(r["slopes"], g) if st.alibi else None
        if ms.mask_h:
            cnt = r["cnt"][g, :]

            def lst(name, j):
                return r[name][g, j]
        else:
            cnt = r["cnt"][...]

            def lst(name, j):
                return r[name][j]

        def step(carry, start, ok):
            dk, dv = carry
            q = r["q"][pl.ds(start, bm), g, :]
            do = r["do"][pl.ds(start, bm), g, :]
            lse2 = r["lse2"][g, pl.ds(start, bm)]
            delta = r["delta"][g, pl.ds(start, bm)]
            s2t, t = _scores2(_dot(k, q, st, trans_b=True), st)
            rows_t = start + jnp.arange(bm, dtype=jnp.int32)[None, :]
            if st.alibi:
                s2t = _alibi2(s2t, slope2, rows_t, cols_t, off)
            pt = _exp2(s2t - lse2[None, :], st)
            if ok is not None:
                pt = jnp.where(ok(rows_t), pt, 0.0)
            dpt = _dot(v, do, st, trans_b=True)
            if seed is not None:
                kp = _dropout.keep(seed, st.dropout_p, b, hk * G + g, rows_t, cols_t)
                pdt = jnp.where(kp, pt * inv_keep, 0.0)
                dpt = jnp.where(kp, dpt * inv_keep, 0.0)
            else:
                pdt = pt
            dv = dv + _dot(pdt.astype(do.dtype), do, st)
            dst = pt * (dpt - delta[None, :])
            if t is not None:
                dst = dst * (1.0 - t * t)
            if st.scale_ds:
                dst = dst * st.scale
            dk = dk + _dot(dst.astype(q.dtype), q, st)
            return dk, dv

        def full_body(t, carry):
            start = lst("full", _div(t, sub)) * mbs + lax.rem(_i32(t), _i32(sub)) * bm
            ok = None
            if _has_window(st):  # rows past the end have lse +inf; keys past it are dropped

                def ok(rows_t):
                    return _allowed(rows_t, cols_t, sk, off, st, check_k=False)

            start = pl.multiple_of(start, bm)
            return _visit(step, carry, start, ok, _live(start, bm, c0, bn, sq, sk, off, st, ms))

        def part_body(t, carry):
            j = _div(t, sub)
            rl0 = lax.rem(_i32(t), _i32(sub)) * bm
            start = pl.multiple_of(lst("part", j) * mbs + rl0, bm)
            tid = lst("ptid", j)

            def ok(rows_t):
                m = _tile_bits(r["bits"], tid, rl0, cl0, bm, bn, transposed=True)
                if _has_window(st):
                    m = m & _allowed(rows_t, cols_t, sk, off, st, check_k=False)
                return m

            return _visit(step, carry, start, ok, _live(start, bm, c0, bn, sq, sk, off, st, ms))

        carry = lax.fori_loop(0, _count(cnt, 0) * sub, full_body, carry)
        return lax.fori_loop(0, _count(cnt, 1) * sub, part_body, carry)

    carry = (
        jnp.zeros((bn, k.shape[-1]), jnp.float32),
        jnp.zeros((bn, v.shape[-1]), jnp.float32),
    )
    if G == 1:
        dk, dv = head_body(0, carry)
    else:
        dk, dv = lax.fori_loop(0, G, head_body, carry)
    if not st.scale_ds:
        dk = dk * st.scale
    r["dk"][...] = dk.astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def dkdv_call(q, k, v, do, lse2, delta, st: Static, ms: MaskStatic, mo, slopes=None, seed=None):
    B, Sqp, Hq, Dp = q.shape
    Skp, Hkv, Dvp = k.shape[1], k.shape[2], v.shape[-1]
    bn, G = st.block_n, st.group
    per = ms.mbs // bn
    names = ["q", "k", "v", "do", "lse2", "delta"]
    in_specs = [
        block_spec((None, Sqp, G, Dp), lambda j, h, b: (b, 0, h, 0)),
        block_spec((None, bn, None, Dp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, bn, None, Dvp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, Sqp, G, Dvp), lambda j, h, b: (b, 0, h, 0)),
        block_spec((None, G, Sqp), lambda j, h, b: (b, h, 0)),
        block_spec((None, G, Sqp), lambda j, h, b: (b, h, 0)),
    ]
    args = [q, k, v, do, lse2, delta]
    for n in ("kv_cnt", "kv_full", "kv_part", "kv_ptid"):
        width = mo[n].shape[-1]
        if ms.mask_h:  # the G query heads of KV head h
            spec = block_spec((None, G, None, width),
                              lambda j, h, b: (_mb(ms, b), h, j // per, 0))
        else:
            spec = block_spec((None, None, None, width),
                              lambda j, h, b: (_mb(ms, b), 0, j // per, 0))
        in_specs.append(spec)
        args.append(mo[n])
        names.append(n[3:])
    _tail_operands(st, mo, slopes, seed, names, in_specs, args, heads_block=G)
    names += ["dk", "dv"]
    out_specs = [
        block_spec((None, bn, None, Dp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, bn, None, Dvp), lambda j, h, b: (b, j, h, 0)),
    ]
    out_shape = [out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)]
    grid = (Skp // bn, Hkv, B)
    return _call(_dkdv_kernel, st, ms, names, grid, in_specs, out_specs, out_shape,
                 "flashmux_bs_dkdv")(*args)


# ----------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class BsPlan:
    sqp: int
    skp: int
    dp: int
    dvp: int
    fwd: Static
    dkdv: Static
    dq: Static
    ms: MaskStatic


def make_plan(q, k, v, params, bm, interpret: bool) -> BsPlan:
    """ops.make_plan's blocks, capped at the mask block; lengths padded to mask-block multiples
    (so every listed tile lies inside the padded arrays: padded keys are zeros, never NaN)."""
    from . import ops

    if params.varlen:
        raise ValueError("block_mask with cu_seqlens is not supported (document masks replace packing)")
    sq, sk, hq, hkv, d, dv = ops._shapes(q, k, v, params)
    base = ops.make_plan(sq, sk, d, dv, hq, hkv, q.dtype, params, interpret)
    mbs = int(bm.block_size)

    def cap(st: Static) -> Static:
        return replace(st, block_m=min(st.block_m, mbs), block_n=min(st.block_n, mbs))

    ms = MaskStatic(
        mbs=mbs,
        mask_b=int(bm.kind.shape[0]) > 1,
        mask_h=int(bm.kind.shape[1]) > 1,
        check=_has_window(base.fwd) or sk % mbs != 0,
        ragged_q=sq % mbs != 0,
        ragged_k=sk % mbs != 0,
    )
    dq = replace(cap(base.dq), fused_delta=False, has_r=False, has_dlse=False)
    return BsPlan(_round_up(max(sq, 1), mbs), _round_up(max(sk, 1), mbs), base.dp, base.dvp,
                  cap(base.fwd), cap(base.dkdv), dq, ms)


def check_mask(bm, q, k, params):
    """The BlockMask fits this call (the core checks it too; this guards direct calls)."""
    sq, sk = q.shape[1], k.shape[1]
    if (bm.seqlen_q, bm.seqlen_k) != (sq, sk):
        raise ValueError(f"block_mask: built for (Sq, Sk) = ({bm.seqlen_q}, {bm.seqlen_k}), "
                         f"the call has ({sq}, {sk})")
    if bm.batch is not None and bm.batch != q.shape[0]:
        raise ValueError(f"block_mask: built for batch {bm.batch}, q has {q.shape[0]}")
    if bm.heads is not None and bm.heads != q.shape[2]:
        raise ValueError(f"block_mask: built for {bm.heads} heads, q has {q.shape[2]}")


def forward(q, k, v, params, *, residual: bool, interpret: bool, alibi_slopes=None,
            block_mask=None, dropout_seed=None):
    """(out, lse[, out_residual]) of a block-masked call (padded layout only)."""
    from . import ops

    check_mask(block_mask, q, k, params)
    pln = make_plan(q, k, v, params, block_mask, interpret)
    sq, dv = q.shape[1], v.shape[-1]
    slopes = slopes_operand(alibi_slopes, q.shape[0], q.shape[2]) if pln.fwd.alibi else None
    seed = ops._seed(params, dropout_seed)
    mo = operands(block_mask)
    qp = ops._pad(q, pln.sqp, pln.dp)
    kp = ops._pad(k, pln.skp, pln.dp)
    vp = ops._pad(v, pln.skp, pln.dvp)
    outs = forward_call(qp, kp, vp, replace(pln.fwd, residual=residual), pln.ms, mo, slopes, seed)
    out, lse = outs[0][:, :sq, :, :dv], outs[1][:, :, :sq]
    return (out, lse, outs[2][:, :sq, :, :dv]) if residual else (out, lse)


def backward(do, dlse, q, k, v, out, lse, params, *, out_residual=None, interpret: bool,
             alibi_slopes=None, block_mask=None, dropout_seed=None):
    """(dq, dk, dv) of a block-masked call: delta in XLA, then the dK/dV and dQ kernels."""
    import jax.numpy as jnp

    from . import ops

    check_mask(block_mask, q, k, params)
    pln = make_plan(q, k, v, params, block_mask, interpret)
    sq, sk, d, dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    slopes = slopes_operand(alibi_slopes, q.shape[0], q.shape[2]) if pln.fwd.alibi else None
    seed = ops._seed(params, dropout_seed)
    mo = operands(block_mask)
    do = do.astype(q.dtype)
    o32 = out.astype(jnp.float32)
    if out_residual is not None:
        o32 = o32 + out_residual.astype(jnp.float32)
    delta = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o32, axis=-1), -1, -2)  # (B, Hq, Sq)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).astype(jnp.float32)
    qp, dop = ops._pad(q, pln.sqp, pln.dp), ops._pad(do, pln.sqp, pln.dvp)
    kp, vp = ops._pad(k, pln.skp, pln.dp), ops._pad(v, pln.skp, pln.dvp)
    lse2 = ops._pad(lse2, pln.sqp, None, seq_axis=2, value=jnp.inf)
    delta = ops._pad(delta, pln.sqp, None, seq_axis=2)
    dk, dvv = dkdv_call(qp, kp, vp, dop, lse2, delta, pln.dkdv, pln.ms, mo, slopes, seed)
    dq_lse2 = lse2 - math.log2(pln.dq.scale) if pln.dq.scale_ds else lse2
    dq = dq_call(qp, kp, vp, dop, dq_lse2, delta, pln.dq, pln.ms, mo, slopes, seed)
    return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dvv[:, :sk, :, :dv]
