"""The reference backend's JAX path: the same algorithm as builtin/reference.py (heads-first
layout, one batched matmul per block of query rows against the keys they can see, float32 inside),
shaped for XLA so that memory stays linear in the sequence length and compile time stays short.

Under jit a Python loop over query chunks would unroll: with chunks small enough to bound memory,
a 16k sequence means hundreds of unrolled chunks. Here the rows are cut into at most `SEGMENTS`
static segments; inside a segment every chunk has the same number of rows (`chunk_rows`, within
`SCORE_BUDGET` score elements) and the same static key range (the keys any row of the segment
can see), so the chunks run under `lax.map` / `lax.scan`. With causal or window masks the
segments skip the key blocks no row of theirs sees (causal: ~56% of the full work with 8
segments, against 50% ideal). The backward scans the chunks of a segment carrying dK/dV of the
segment's key range.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._xp import dropout_uniform, ops_for
from ..spec import Params
from . import reference as _ref

SEGMENTS = 8
_HI = lax.Precision.HIGHEST  # float32 dots stay float32 on GPUs too


class _Pos:
    """Per-row and per-key positions, sequence ids and offsets (packed rows: one batch)."""

    def __init__(self, q, k, cu_q, cu_k, p: Params, seed=None):
        self.p = p
        self.seed = p.dropout_seed if seed is None else seed  # an int or a scalar int array
        self.varlen = cu_q is not None
        sq, sk = q.shape[1], k.shape[1]
        self.local_q = jnp.arange(sq, dtype=jnp.int32)
        self.local_k = jnp.arange(sk, dtype=jnp.int32)
        if self.varlen:
            cq, ck = cu_q.astype(jnp.int32), cu_k.astype(jnp.int32)
            self.seg_q = jnp.searchsorted(cq, self.local_q, side="right") - 1
            self.seg_k = jnp.searchsorted(ck, self.local_k, side="right") - 1
            self.off_q = ((ck[1:] - ck[:-1]) - (cq[1:] - cq[:-1]))[self.seg_q]
            self.local_q = self.local_q - cq[self.seg_q]
            self.local_k = self.local_k - ck[self.seg_k]
        else:
            self.off_q = sk - sq

    def needs_mask(self) -> bool:
        p = self.p
        return self.varlen or p.window_left is not None or p.window_right is not None

    def rows(self, x, r0, n):
        return lax.dynamic_slice_in_dim(x, r0, n, 0)

    def allowed(self, r0, n, lo, hi):
        """Bool (n, 1, hi - lo) for rows r0:r0+n (r0 traced), or None."""
        if not self.needs_mask():
            return None
        p = self.p
        i = self.rows(self.local_q, r0, n)[:, None]
        off = self.rows(self.off_q, r0, n)[:, None] if self.varlen else self.off_q
        j = self.local_k[None, lo:hi]
        ok = jnp.ones((n, hi - lo), bool)
        if self.varlen:
            ok = self.rows(self.seg_q, r0, n)[:, None] == self.seg_k[None, lo:hi]
        if p.window_left is not None:
            ok = ok & (j >= i + off - p.window_left)
        if p.window_right is not None:
            ok = ok & (j <= i + off + p.window_right)
        return ok[:, None, :]

    def keep(self, r0, n, lo, hi, batch, hkv, g):
        """Dropout keep mask (B|1, Hkv, n, g, hi - lo), heads numbered kv * g + j."""
        ops = ops_for("jax")
        if self.varlen:
            b = self.rows(self.seg_q, r0, n).reshape(1, 1, -1, 1, 1)
        else:
            b = jnp.arange(batch, dtype=jnp.int32).reshape(-1, 1, 1, 1, 1)
        h = jnp.arange(hkv * g, dtype=jnp.int32).reshape(1, hkv, 1, g, 1)
        i = self.rows(self.local_q, r0, n).reshape(1, 1, -1, 1, 1)
        j = self.local_k[lo:hi].reshape(1, 1, 1, 1, -1)
        return dropout_uniform(ops, self.seed, b, h, i, j) >= self.p.dropout_p


def _segments(pos: _Pos, sq: int, sk: int, step: int):
    """[(s0, s1, lo, hi)]: static row segments (multiples of step) and the keys they can see."""
    banded = not pos.varlen and pos.needs_mask()
    if not banded:
        return [(0, sq, 0, sk)]
    nchunks = -(-sq // step)
    per = -(-nchunks // SEGMENTS) * step
    out = []
    lay = _ref._Layout.__new__(_ref._Layout)  # only key_range, which needs p/varlen/off_q
    lay.p, lay.varlen, lay.off_q = pos.p, False, pos.off_q
    for s0 in range(0, sq, per):
        s1 = min(sq, s0 + per)
        lo, hi = lay.key_range(s0, s1, sk)
        out.append((s0, s1, lo, hi))
    return out


def _run_chunks(body, s0, s1, step):
    """body(r0, n) over rows [s0, s1) in chunks of step (lax.map) plus a static remainder;
    returns the list of per-chunk results concatenated along axis 2."""
    n_full = (s1 - s0) // step
    parts = []
    if n_full:
        starts = s0 + step * jnp.arange(n_full, dtype=jnp.int32)
        ys = lax.map(lambda r0: body(r0, step), starts)
        parts.append(jax.tree.map(_unstack_rows, ys))
    rem = (s1 - s0) - n_full * step
    if rem:
        parts.append(body(jnp.int32(s0 + n_full * step), rem))
    return parts


def _unstack_rows(y):
    """(n_chunks, B, Hkv, rows, ...) -> (B, Hkv, n_chunks * rows, ...)."""
    y = jnp.moveaxis(y, 0, 2)
    # explicit sizes, not -1: B = 0 (an empty batch) makes -1 ambiguous
    return y.reshape(y.shape[:2] + (y.shape[2] * y.shape[3],) + y.shape[4:])


def _prep(q, k, v, cu_q):
    if cu_q is not None:
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    return q, k, v, (b, sq, k.shape[1], hq, hkv, hq // hkv)


def _heads_first(x, b, s, hkv, g):
    d = x.shape[-1]
    x = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
    return jnp.transpose(x.reshape(b, s, hkv, g, d), (0, 2, 1, 3, 4)).reshape(b, hkv, s * g, d)


def _heads_last(x, b, s, hkv, g):
    d = x.shape[-1]
    return jnp.transpose(x.reshape(b, hkv, s, g, d), (0, 2, 1, 3, 4)).reshape(b, s, hkv * g, d)


def _f32(x):
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _scores(qc, kt, p: Params):
    s = jnp.matmul(qc, kt, precision=_HI)
    if not p.softcap:
        return s, None
    t = jnp.tanh(s * (1.0 / p.softcap))
    return t * p.softcap, t


@functools.partial(jax.jit, static_argnums=5)
def forward(q, k, v, cu_q, cu_k, p: Params, seed=None):
    """seed: dropout_seed as a scalar integer array, traced (None: params.dropout_seed)."""
    q_in = q
    q, k, v, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    pos = _Pos(q, k, cu_q, cu_k, p, seed)
    qh = _heads_first(q, b, sq, hkv, g) * p.scale
    kt = jnp.transpose(_f32(k), (0, 2, 3, 1))  # (B, Hkv, D, Sk)
    vh = jnp.transpose(_f32(v), (0, 2, 1, 3))  # (B, Hkv, Sk, Dv)
    step = _ref.chunk_rows(b, hq, sq, sk)
    neg_inf = float("-inf")
    outs, lses = [], []
    for s0, s1, lo, hi in _segments(pos, sq, sk, step):

        def body(r0, n, lo=lo, hi=hi):
            qc = lax.dynamic_slice_in_dim(qh, r0 * g, n * g, 2)
            s, _ = _scores(qc, kt[..., lo:hi], p)
            shape5 = (b, hkv, n, g, hi - lo)
            ok = pos.allowed(r0, n, lo, hi)
            if ok is not None:
                s = jnp.where(ok, s.reshape(shape5), neg_inf).reshape(s.shape)
            mx = jnp.max(s, -1, keepdims=True, initial=neg_inf)
            mx = jnp.where(mx == neg_inf, 0.0, mx)
            e = jnp.exp(s - mx)
            den = e.sum(-1, keepdims=True)
            pos_ = den > 0
            den1 = jnp.where(pos_, den, 1.0)
            lse = jnp.where(pos_, jnp.log(den1) + mx, neg_inf)
            if p.dropout_p:
                keep = pos.keep(r0, n, lo, hi, b, hkv, g)
                e = jnp.where(keep, e.reshape(shape5), 0.0).reshape(e.shape)
                den1 = den1 * (1.0 - p.dropout_p)
            return jnp.matmul(e, vh[:, :, lo:hi], precision=_HI) / den1, lse

        for o, lse in _run_chunks(body, s0, s1, step):
            outs.append(o)
            lses.append(lse)
    out = _heads_last(jnp.concatenate(outs, 2), b, sq, hkv, g).astype(q_in.dtype)
    lse = jnp.concatenate(lses, 2).reshape(b, hkv, sq, g)
    lse = jnp.transpose(lse, (0, 1, 3, 2)).reshape(b, hq, sq)
    if cu_q is not None:
        out, lse = out[0], lse[0]
    return out, lse


@functools.partial(jax.jit, static_argnums=9)
def backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, seed=None):
    q_in, k_in, v_in = q, k, v
    q, k, v, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    if cu_q is not None:
        do, lse = do[None], lse[None]
        dlse = None if dlse is None else dlse[None]
    del out  # delta = rowsum(P * dP) from the recomputed float32 P, as in reference.py
    pos = _Pos(q, k, cu_q, cu_k, p, seed)
    qh = _heads_first(q, b, sq, hkv, g) * p.scale
    doh = _heads_first(do, b, sq, hkv, g)
    kh = jnp.transpose(_f32(k), (0, 2, 1, 3))  # (B, Hkv, Sk, D)
    vh = jnp.transpose(_f32(v), (0, 2, 1, 3))

    def rows_last(x):  # (B, Hq, Sq) -> (B, Hkv, Sq*g, 1)
        x = jnp.transpose(_f32(x).reshape(b, hkv, g, sq), (0, 1, 3, 2))
        return x.reshape(b, hkv, sq * g, 1)

    lse = rows_last(lse)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    dlse = None if dlse is None else rows_last(dlse)
    dk = jnp.zeros(kh.shape, kh.dtype)
    dvh = jnp.zeros(vh.shape, vh.dtype)
    dqs = []
    step = _ref.chunk_rows(b, hq, sq, sk)
    for s0, s1, lo, hi in _segments(pos, sq, sk, step):
        kc, vc = kh[:, :, lo:hi], vh[:, :, lo:hi]

        def body(r0, n, kc=kc, vc=vc, lo=lo, hi=hi):
            def rows(x):
                return lax.dynamic_slice_in_dim(x, r0 * g, n * g, 2)

            qc, doc = rows(qh), rows(doh)
            shape5 = (b, hkv, n, g, hi - lo)
            s, t = _scores(qc, jnp.swapaxes(kc, -1, -2), p)
            pr = jnp.exp(s - rows(lse))
            ok = pos.allowed(r0, n, lo, hi)
            if ok is not None:
                pr = jnp.where(ok, pr.reshape(shape5), 0.0).reshape(pr.shape)
            dp = jnp.matmul(doc, jnp.swapaxes(vc, -1, -2), precision=_HI)
            pd = pr
            if p.dropout_p:
                keep = pos.keep(r0, n, lo, hi, b, hkv, g)
                inv = 1.0 / (1.0 - p.dropout_p)
                pd = jnp.where(keep, pr.reshape(shape5) * inv, 0.0).reshape(pr.shape)
                dp = jnp.where(keep, dp.reshape(shape5) * inv, 0.0).reshape(pr.shape)
            dv_c = jnp.matmul(jnp.swapaxes(pd, -1, -2), doc, precision=_HI)
            delta = (pr * dp).sum(-1, keepdims=True)
            if dlse is not None:
                delta = delta - rows(dlse)
            ds = pr * (dp - delta)
            if t is not None:
                ds = ds * (1.0 - t * t)
            dq_c = jnp.matmul(ds, kc, precision=_HI) * p.scale
            dk_c = jnp.matmul(jnp.swapaxes(ds, -1, -2), qc, precision=_HI)
            return dq_c, dk_c, dv_c

        n_full = (s1 - s0) // step
        if n_full:
            def scan_body(carry, r0):
                dq_c, dk_c, dv_c = body(r0, step)
                return (carry[0] + dk_c, carry[1] + dv_c), dq_c

            zeros = (jnp.zeros(kc.shape, kc.dtype), jnp.zeros(vc.shape, vc.dtype))
            starts = s0 + step * jnp.arange(n_full, dtype=jnp.int32)
            (dk_s, dv_s), dq_s = lax.scan(scan_body, zeros, starts)
            dk = dk.at[:, :, lo:hi].add(dk_s)
            dvh = dvh.at[:, :, lo:hi].add(dv_s)
            dqs.append(_unstack_rows(dq_s))
        rem = (s1 - s0) - n_full * step
        if rem:
            dq_c, dk_c, dv_c = body(jnp.int32(s0 + n_full * step), rem)
            dk = dk.at[:, :, lo:hi].add(dk_c)
            dvh = dvh.at[:, :, lo:hi].add(dv_c)
            dqs.append(dq_c)
    dq = _heads_last(jnp.concatenate(dqs, 2), b, sq, hkv, g)
    dk = jnp.transpose(dk, (0, 2, 1, 3))
    dvh = jnp.transpose(dvh, (0, 2, 1, 3))
    if cu_q is not None:
        dq, dk, dvh = dq[0], dk[0], dvh[0]
    return dq.astype(q_in.dtype), dk.astype(k_in.dtype), dvh.astype(v_in.dtype)
