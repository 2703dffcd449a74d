"""FlashAttention forward and backward as Pallas kernels (Triton lowering, or interpret on CPU).

Layout inside the kernels: BSHD with the sequence padded to block multiples and head_dim padded to a
power of two (the wrapper in ops.py does both). All softmax arithmetic is float32 in the base-2
domain: s2 = s * scale * log2(e), so exp2 replaces exp and the scale costs one multiply per score.

Grids (one program each):
  forward  (q blocks, Hq, B): q block resident, K/V streamed over the key blocks the mask allows.
  dK/dV    (k blocks, Hkv, B): K/V block resident, loops over the G query heads of its group and
           the query blocks the mask allows, so GQA sums happen in registers (deterministic).
  dQ       (q blocks, Hq, B): q/dO block resident, loops over the allowed key blocks.

Every loop over blocks is split into masked and unmasked ranges computed from causal/window and
the key length, so the mask is paid only on boundary blocks, and blocks no row may see are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import dropout as _dropout
from ._compat import block_spec, out_struct, pallas, triton_params

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Static:
    """Everything a kernel is specialised on (hashable: part of the compile key)."""

    scale: float
    window_left: int | None
    window_right: int | None
    softcap: float | None
    dropout_p: float
    dropout_seed: int  # always 0: the seed is an operand (dropout.seed_operand), never compiled in
    varlen: bool
    seqlen_q: int  # real (unpadded) lengths; in varlen mode the per-sequence ones come in refs
    seqlen_k: int
    group: int  # Hq // Hkv
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    interpret: bool
    f32: bool  # float32 inputs: ask for IEEE dots
    fast_exp: bool = False  # GPU: exp2 as one ex2.approx.ftz.f32 instruction (inline PTX)
    residual: bool = False  # forward: also write out_residual = float32 out - stored out
    # dQ kernel computes delta = rowsum(dO * (O + r)) - dlse itself (and writes it for the dK/dV
    # kernel, which then runs second): no separate XLA pass over dO and O.
    fused_delta: bool = False
    has_r: bool = False  # fused_delta: an out_residual input
    has_dlse: bool = False  # fused_delta: a dlse input
    one_loop: bool = False  # one loop over every visited block, all masked (a variant to time)
    # Backward: round dS * scale (not dS) to the input dtype before the dQ/dK matmuls, as plain
    # attention's autograd does, so that the two round at the same points (see NOTES, run D).
    scale_ds: bool = True
    # ALiBi: a float32 (B, Hq, 16) slopes operand (each row's 16 lanes equal; 16 so the block is
    # a Triton-legal shape); the score gets -slope * |i + off - j| after scale and softcap, before
    # the mask, added in log2 units.
    alibi: bool = False


def _call(kernel, st: Static, grid, in_specs, out_specs, out_shape, name: str):
    """pallas_call of one of the kernels below with its Static: Triton parameters on a GPU."""
    pl = pallas()
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if st.interpret else triton_params(st.num_warps, st.num_stages),
        interpret=st.interpret,
        name=name,
    )


# ----------------------------------------------------------------------------- small helpers


def _i32(x):
    import jax.numpy as jnp

    return jnp.asarray(x, dtype=jnp.int32)


def _div(a, n):
    """a // n for a >= 0 (lax.div lowers to one instruction; the caller clamps a first)."""
    from jax import lax

    return lax.div(_i32(a), _i32(n))


def _cdiv(a, n):
    return _div(_i32(a) + (n - 1), n)


def _clip(x, lo, hi):
    import jax.numpy as jnp

    return jnp.minimum(jnp.maximum(_i32(x), _i32(lo)), _i32(hi))


def _dot(a, b, st: Static, trans_b: bool = False):
    """a @ b (or a @ b.T) with float32 accumulation."""
    import jax.numpy as jnp
    from jax import lax

    prec = lax.Precision.HIGHEST if st.f32 else None
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _exp2(x, st: Static):
    """2**x on a tile. ex2.approx maps -inf to +0, so masked scores stay exact zeros."""
    import jax
    import jax.numpy as jnp

    if not st.fast_exp:
        return jnp.exp2(x)
    from jax.experimental.pallas import triton as plt

    [y] = plt.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def _scores2(s, st: Static):
    """Raw q.k -> base-2 logits (and tanh term for softcap, needed by the backward)."""
    import jax.numpy as jnp

    if st.softcap:
        t = jnp.tanh(s * (st.scale / st.softcap))
        return t * (st.softcap * LOG2E), t
    return s * (st.scale * LOG2E), None


def _slope2(ref, g=None):
    """The head's ALiBi slope in log2 units, from its (16,) lanes (or row g of a (G, 16) block)."""
    import jax.numpy as jnp

    x = ref[...] if g is None else ref[g, :]
    return jnp.max(x.astype(jnp.float32)) * LOG2E


def _alibi2(s2, slope2, rows, cols, off):
    """s2 - slope * |i + off - j| in log2 units (rows and cols broadcast against s2)."""
    import jax.numpy as jnp

    return s2 - slope2 * jnp.abs(rows + off - cols).astype(jnp.float32)


def slopes_operand(alibi_slopes, batch: int, heads: int):
    """float32 (Hq,) or (B, Hq) slopes -> the kernels' (B, Hq, 16) operand (lanes equal)."""
    import jax.numpy as jnp

    sl = jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, heads)
    return jnp.broadcast_to(sl[:, :, None], (batch, heads, 16))


def _seed_arg(st: Static, seed, in_specs, args):
    """With dropout: the (1, 16) int32 seed operand (dropout.seed_operand) as the last input."""
    if st.dropout_p > 0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs the seed operand (dropout.seed_operand)")
        in_specs.append(block_spec((None, 16), lambda *_: (0, 0)))
        args.append(seed)


def _allowed(rows, cols, sk, off, st: Static, check_k: bool = True):
    """Mask of allowed (row, col) pairs: window/causal (bottom-right) and key padding."""
    ok = None

    def _and(a, c):
        return c if a is None else a & c

    if check_k:
        ok = _and(ok, cols < sk)
    if st.window_right is not None:
        ok = _and(ok, cols <= rows + (off + st.window_right))
    if st.window_left is not None:
        ok = _and(ok, cols >= rows + (off - st.window_left))
    if ok is None:  # a masked range that is always empty for this problem: still traced
        ok = (rows >= 0) & (cols >= 0)
    return ok


def kv_ranges(r0, bm, bn, sq, sk, st: Static):
    """For query rows [r0, r0+bm): key-block ranges (lo, full_lo, full_hi, hi).

    Blocks [lo, full_lo) and [full_hi, hi) need the mask; [full_lo, full_hi) are fully allowed.
    """
    import jax.numpy as jnp

    off = _i32(sk) - _i32(sq)
    r1 = _i32(r0) + (bm - 1)
    nkb = _cdiv(sk, bn)
    wl, wr = st.window_left, st.window_right
    if wl is None:
        lo = _i32(0)
        full_lo = _i32(0)
    else:
        lo = _div(jnp.maximum(r0 + off - wl, 0), bn)
        full_lo = _cdiv(jnp.maximum(r1 + off - wl, 0), bn)
    if wr is None:
        hi = nkb
        full_hi = _div(sk, bn)
    else:
        hi = _cdiv(_clip(r1 + off + wr + 1, 0, sk), bn)
        full_hi = _div(_clip(r0 + off + wr + 1, 0, sk), bn)
    if st.varlen:  # query blocks past this sequence's end: nothing to do
        hi = jnp.where(r0 < sq, hi, lo)
    hi = jnp.maximum(hi, lo)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_ranges(c0, bm, bn, sq, sk, st: Static):
    """For key rows [c0, c0+bn): query-block ranges (lo, full_lo, full_hi, hi) (dK/dV kernel).

    Query rows past the real length contribute nothing (their dO is 0 and their lse is +inf), and
    key rows past the real length are discarded, so only the window decides what is masked.
    """
    import jax.numpy as jnp

    off = _i32(sk) - _i32(sq)
    c1 = _i32(c0) + (bn - 1)
    nqb = _cdiv(sq, bm)
    wl, wr = st.window_left, st.window_right
    if wr is None:
        lo = _i32(0)
        full_lo = _i32(0)
    else:
        lo = _div(jnp.maximum(c0 - off - wr, 0), bm)
        full_lo = _cdiv(jnp.maximum(c1 - off - wr, 0), bm)
    if wl is None:
        hi = nqb
        full_hi = nqb
    else:
        hi = _cdiv(_clip(c1 - off + wl + 1, 0, sq), bm)
        full_hi = _div(jnp.maximum(c0 - off + wl + 1, 0), bm)
    if st.varlen:
        hi = jnp.where(c0 < sk, hi, lo)
    hi = jnp.maximum(hi, lo)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _heavy_first(st: Static) -> bool:
    """Causal: the last query blocks see the most keys; launch them first to shorten the tail."""
    return st.window_right is not None and st.window_left is None


def _q_block(i, n: int, st: Static):
    return (n - 1 - i) if _heavy_first(st) else i


def _q_tile(st: Static, q_ref, lq_ref, lk_ref):
    """What a query-block program (forward, dQ) starts from: (qi, h, b, sq, sk, off, r0, rows, q)
    = its block, head and batch, the sequence lengths, Sk - Sq, its first row, its rows (a
    column) and its Q tile."""
    import jax.numpy as jnp

    pl = pallas()
    qi, h, b = (
        _q_block(pl.program_id(0), pl.num_programs(0), st),
        pl.program_id(1),
        pl.program_id(2),
    )
    sq, sk = _seqlens(st, lq_ref, lk_ref)
    off = sk - sq
    r0 = qi * st.block_m
    rows = r0 + jnp.arange(st.block_m, dtype=jnp.int32)[:, None]
    return qi, h, b, sq, sk, off, r0, rows, q_ref[...]


def _seqlens(st: Static, lq_ref, lk_ref):
    import jax.numpy as jnp

    if st.varlen:
        return jnp.max(lq_ref[...]), jnp.max(lk_ref[...])
    return _i32(st.seqlen_q), _i32(st.seqlen_k)


def _three_loops(ranges, body, carry, one_loop: bool = False):
    """Run body over [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked
    (one_loop: a single masked loop over [lo, hi), so the software pipeline spans all of it)."""
    from jax import lax

    lo, full_lo, full_hi, hi = ranges
    if one_loop:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, st: Static):
    import jax.numpy as jnp

    pl = pallas()
    drop = st.dropout_p > 0
    n_in = (5 if st.varlen else 3) + int(st.alibi) + int(drop)
    q_ref, k_ref, v_ref = refs[:3]
    lq_ref, lk_ref = refs[3:5] if st.varlen else (None, None)
    sl_ref = refs[n_in - 1 - int(drop)] if st.alibi else None
    seed = _dropout.seed_of(refs[n_in - 1]) if drop else None
    o_ref, lse_ref = refs[n_in : n_in + 2]
    r_ref = refs[n_in + 2] if st.residual else None
    bm, bn = st.block_m, st.block_n
    qi, h, b, sq, sk, off, r0, rows, q = _q_tile(st, q_ref, lq_ref, lk_ref)
    dv = v_ref.shape[-1]
    slope2 = _slope2(sl_ref) if st.alibi else None

    def body(kb, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(kb * bn, bn)
        k = k_ref[pl.ds(start, bn), :]
        v = v_ref[pl.ds(start, bn), :]
        s2, _ = _scores2(_dot(q, k, st, trans_b=True), st)
        cols = start + jnp.arange(bn, dtype=jnp.int32)[None, :]
        if st.alibi:
            s2 = _alibi2(s2, slope2, rows, cols, off)
        if masked:
            s2 = jnp.where(_allowed(rows, cols, sk, off, st), s2, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s2, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet: no NaN
        alpha = jnp.exp2(m - m_use)
        p = _exp2(s2 - m_use[:, None], st)
        l = l * alpha + jnp.sum(p, axis=1)
        if st.dropout_p > 0:
            p = jnp.where(_dropout.keep(seed, st.dropout_p, b, h, rows, cols), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, st)
        return acc, m_new, l

    carry = (
        jnp.zeros((bm, dv), jnp.float32),
        jnp.full((bm,), -jnp.inf, jnp.float32),
        jnp.zeros((bm,), jnp.float32),
    )
    acc, m, l = _three_loops(kv_ranges(r0, bm, bn, sq, sk, st), body, carry, st.one_loop)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    inv = 1.0 / l_safe
    if st.dropout_p > 0:
        inv = inv * (1.0 / (1.0 - st.dropout_p))
    o32 = acc * inv[:, None]
    o = o32.astype(o_ref.dtype)
    o_ref[...] = o
    if st.residual:  # the stored output's rounding error, for the backward's delta
        r_ref[...] = (o32 - o.astype(jnp.float32)).astype(r_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def forward_call(q, k, v, lens_q, lens_k, st: Static, slopes=None, seed=None):
    """q (B, Sqp, Hq, Dp), k (B, Skp, Hkv, Dp), v (B, Skp, Hkv, Dvp) padded -> out, lse (B,Hq,Sqp)
    (and out_residual, out's shape and dtype, when st.residual). slopes: (B, Hq, 16) float32
    with st.alibi (slopes_operand). seed: (1, 16) int32 with dropout (dropout.seed_operand)."""
    import jax.numpy as jnp

    B, Sqp, Hq, Dp = q.shape
    Skp, Dvp = k.shape[1], v.shape[-1]
    bm, g = st.block_m, st.group
    qb = functools.partial(_q_block, n=Sqp // bm, st=st)
    in_specs = [
        block_spec((None, bm, None, Dp), lambda i, h, b: (b, qb(i), h, 0)),
        block_spec((None, Skp, None, Dp), lambda i, h, b: (b, 0, h // g, 0)),
        block_spec((None, Skp, None, Dvp), lambda i, h, b: (b, 0, h // g, 0)),
    ]
    args = [q, k, v]
    if st.varlen:
        in_specs += [block_spec((None, 16), lambda i, h, b: (b, 0))] * 2
        args += [lens_q, lens_k]
    if st.alibi:
        in_specs.append(block_spec((None, None, 16), lambda i, h, b: (b, h, 0)))
        args.append(slopes)
    _seed_arg(st, seed, in_specs, args)
    out_specs = [
        block_spec((None, bm, None, Dvp), lambda i, h, b: (b, qb(i), h, 0)),
        block_spec((None, None, bm), lambda i, h, b: (b, h, qb(i))),
    ]
    out_shape = [
        out_struct((B, Sqp, Hq, Dvp), q.dtype, q),
        out_struct((B, Hq, Sqp), jnp.float32, q),
    ]
    if st.residual:
        out_specs.append(out_specs[0])
        out_shape.append(out_shape[0])
    grid = (Sqp // bm, Hq, B)
    return _call(_fwd_kernel, st, grid, in_specs, out_specs, out_shape, "flashmux_fwd")(*args)


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkdv_kernel(*refs, st: Static):
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    refs = list(refs)
    seed = _dropout.seed_of(refs.pop(-3)) if st.dropout_p > 0 else None  # the last input
    sl_ref = refs.pop(-3) if st.alibi else None  # the last input left, before dk and dv
    if st.varlen:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lq_ref, lk_ref, dk_ref, dv_ref) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref) = refs
        lq_ref = lk_ref = None
    bm, bn, G = st.block_m, st.block_n, st.group
    kb, hk, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sq, sk = _seqlens(st, lq_ref, lk_ref)
    off = sk - sq
    c0 = kb * bn
    cols_t = c0 + jnp.arange(bn, dtype=jnp.int32)[:, None]  # key rows, as a column
    k = k_ref[...]
    v = v_ref[...]
    ranges = q_ranges(c0, bm, bn, sq, sk, st)
    inv_keep = 1.0 / (1.0 - st.dropout_p) if st.dropout_p > 0 else 1.0

    def head_body(g, carry):
        slope2 = _slope2(sl_ref, g) if st.alibi else None

        def body(qb, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(qb * bm, bm)
            q = q_ref[pl.ds(start, bm), g, :]
            do = do_ref[pl.ds(start, bm), g, :]
            lse2 = lse_ref[g, pl.ds(start, bm)]
            delta = dl_ref[g, pl.ds(start, bm)]
            # Transposed tile: rows are keys, columns are queries, so dK/dV need no transpose.
            s2t, t = _scores2(_dot(k, q, st, trans_b=True), st)
            rows_t = start + jnp.arange(bm, dtype=jnp.int32)[None, :]
            if st.alibi:
                s2t = _alibi2(s2t, slope2, rows_t, cols_t, off)
            pt = _exp2(s2t - lse2[None, :], st)
            if masked:
                pt = jnp.where(_allowed(rows_t, cols_t, sk, off, st, check_k=False), pt, 0.0)
            dpt = _dot(v, do, st, trans_b=True)
            if st.dropout_p > 0:
                kp = _dropout.keep(seed, st.dropout_p, b, hk * G + g, rows_t, cols_t)
                pdt = jnp.where(kp, pt * inv_keep, 0.0)
                dpt = jnp.where(kp, dpt * inv_keep, 0.0)
            else:
                pdt = pt
            dv = dv + _dot(pdt.astype(do.dtype), do, st)
            dst = pt * (dpt - delta[None, :])
            if t is not None:
                dst = dst * (1.0 - t * t)
            if st.scale_ds:  # round dS * scale, as plain attention's autograd does
                dst = dst * st.scale
            dk = dk + _dot(dst.astype(q.dtype), q, st)
            return dk, dv

        return _three_loops(ranges, body, carry, st.one_loop)

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
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dkdv_call(q, k, v, do, lse2, delta, lens_q, lens_k, st: Static, slopes=None, seed=None):
    B, Sqp, Hq, Dp = q.shape
    Skp, Hkv, Dvp = k.shape[1], k.shape[2], v.shape[-1]
    bn, G = st.block_n, st.group
    in_specs = [
        block_spec((None, Sqp, G, Dp), lambda j, h, b: (b, 0, h, 0)),
        block_spec((None, bn, None, Dp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, bn, None, Dvp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, Sqp, G, Dvp), lambda j, h, b: (b, 0, h, 0)),
        block_spec((None, G, Sqp), lambda j, h, b: (b, h, 0)),
        block_spec((None, G, Sqp), lambda j, h, b: (b, h, 0)),
    ]
    args = [q, k, v, do, lse2, delta]
    if st.varlen:
        in_specs += [block_spec((None, 16), lambda j, h, b: (b, 0))] * 2
        args += [lens_q, lens_k]
    if st.alibi:  # the G query heads of KV head h
        in_specs.append(block_spec((None, G, 16), lambda j, h, b: (b, h, 0)))
        args.append(slopes)
    _seed_arg(st, seed, in_specs, args)
    out_specs = [
        block_spec((None, bn, None, Dp), lambda j, h, b: (b, j, h, 0)),
        block_spec((None, bn, None, Dvp), lambda j, h, b: (b, j, h, 0)),
    ]
    out_shape = [out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)]
    grid = (Skp // bn, Hkv, B)
    return _call(_dkdv_kernel, st, grid, in_specs, out_specs, out_shape, "flashmux_bwd_dkdv")(*args)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(*refs, st: Static):
    import jax.numpy as jnp

    pl = pallas()
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref = refs[:5]
    i = 5
    if st.fused_delta:  # delta comes from O, r, dO, dlse (and is written out)
        o_ref, i = refs[i], i + 1
        r_ref, i = (refs[i], i + 1) if st.has_r else (None, i)
        dlse_ref, i = (refs[i], i + 1) if st.has_dlse else (None, i)
    else:
        dl_ref, i = refs[i], i + 1
    lq_ref, lk_ref = (refs[i], refs[i + 1]) if st.varlen else (None, None)
    i += 2 if st.varlen else 0
    sl_ref, i = (refs[i], i + 1) if st.alibi else (None, i)
    seed_ref, i = (refs[i], i + 1) if st.dropout_p > 0 else (None, i)
    dq_ref = refs[i]
    bm, bn = st.block_m, st.block_n
    qi, h, b, sq, sk, off, r0, rows, q = _q_tile(st, q_ref, lq_ref, lk_ref)
    do = do_ref[...]
    lse2 = lse_ref[...]
    if st.fused_delta:
        o32 = o_ref[...].astype(jnp.float32)
        if st.has_r:
            o32 = o32 + r_ref[...].astype(jnp.float32)
        delta = jnp.sum(do.astype(jnp.float32) * o32, axis=1)
        if st.has_dlse:
            delta = delta - dlse_ref[...]
        refs[i + 1][...] = delta  # for the dK/dV kernel, which runs after this one
    else:
        delta = dl_ref[...]
    inv_keep = 1.0 / (1.0 - st.dropout_p) if st.dropout_p > 0 else 1.0
    slope2 = _slope2(sl_ref) if st.alibi else None
    seed = _dropout.seed_of(seed_ref) if seed_ref is not None else None

    def body(kb, dq, masked):
        start = pl.multiple_of(kb * bn, bn)
        k = k_ref[pl.ds(start, bn), :]
        v = v_ref[pl.ds(start, bn), :]
        s2, t = _scores2(_dot(q, k, st, trans_b=True), st)
        cols = start + jnp.arange(bn, dtype=jnp.int32)[None, :]
        if st.alibi:
            s2 = _alibi2(s2, slope2, rows, cols, off)
        p = _exp2(s2 - lse2[:, None], st)  # scale_ds: lse2 - log2(scale) came in: p * scale
        if masked:
            p = jnp.where(_allowed(rows, cols, sk, off, st), p, 0.0)
        dp = _dot(do, v, st, trans_b=True)
        if st.dropout_p > 0:
            kp = _dropout.keep(seed, st.dropout_p, b, h, rows, cols)
            dp = jnp.where(kp, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k, st)

    dq = jnp.zeros((bm, q.shape[-1]), jnp.float32)
    dq = _three_loops(kv_ranges(r0, bm, bn, sq, sk, st), body, dq, st.one_loop)
    if not st.scale_ds:
        dq = dq * st.scale
    dq_ref[...] = dq.astype(dq_ref.dtype)


def dq_call(
    q, k, v, do, lse2, delta, lens_q, lens_k, st: Static, out=None, r=None, dlse=None, slopes=None,
    seed=None,
):
    """-> dq. With st.scale_ds, lse2 must be lse2 - log2(scale): p * scale = exp2(s2 - that), so
    dS comes out scaled at no cost and is rounded as dS * scale (p serves nothing else here).
    With st.fused_delta, delta is unused, out (and r, dlse when st.has_r / st.has_dlse) come in,
    and it returns (dq, delta)."""
    import jax.numpy as jnp

    B, Sqp, Hq, Dp = q.shape
    Skp, Dvp = k.shape[1], v.shape[-1]
    bm, g = st.block_m, st.group
    qb = functools.partial(_q_block, n=Sqp // bm, st=st)
    row_spec = block_spec((None, None, bm), lambda i, h, b: (b, h, qb(i)))
    o_spec = block_spec((None, bm, None, Dvp), lambda i, h, b: (b, qb(i), h, 0))
    in_specs = [
        block_spec((None, bm, None, Dp), lambda i, h, b: (b, qb(i), h, 0)),
        block_spec((None, Skp, None, Dp), lambda i, h, b: (b, 0, h // g, 0)),
        block_spec((None, Skp, None, Dvp), lambda i, h, b: (b, 0, h // g, 0)),
        o_spec,
        row_spec,
    ]
    args = [q, k, v, do, lse2]
    if st.fused_delta:
        in_specs.append(o_spec)
        args.append(out)
        if st.has_r:
            in_specs.append(o_spec)
            args.append(r)
        if st.has_dlse:
            in_specs.append(row_spec)
            args.append(dlse)
    else:
        in_specs.append(row_spec)
        args.append(delta)
    if st.varlen:
        in_specs += [block_spec((None, 16), lambda i, h, b: (b, 0))] * 2
        args += [lens_q, lens_k]
    if st.alibi:
        in_specs.append(block_spec((None, None, 16), lambda i, h, b: (b, h, 0)))
        args.append(slopes)
    _seed_arg(st, seed, in_specs, args)
    out_specs = block_spec((None, bm, None, Dp), lambda i, h, b: (b, qb(i), h, 0))
    out_shape = out_struct(q.shape, q.dtype, q)
    if st.fused_delta:
        out_specs = [out_specs, row_spec]
        out_shape = [out_shape, out_struct((B, Hq, Sqp), jnp.float32, q)]
    grid = (Sqp // bm, Hq, B)
    return _call(_dq_kernel, st, grid, in_specs, out_specs, out_shape, "flashmux_bwd_dq")(*args)
