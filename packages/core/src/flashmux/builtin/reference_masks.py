"""The reference backend with ALiBi slopes and/or a block mask (`attention(..., alibi_slopes=,
block_mask=)`): exact attention in the framework's own ops (NumPy, torch, jax.numpy), float32
inside, chunked over query rows so no more than `BUDGET` scores live at once.

The block mask's element mask is rebuilt per chunk from its tile kinds and per-tile bitmasks
(`blockmask.dense_rows`), so the reference sees exactly what the kernels see. Kept apart from
builtin/reference.py (the plain path, tuned for CPU speed); ReferenceBackend hands calls with
these operands here.
"""

from __future__ import annotations

from .._arrays import array_kind
from .._xp import dropout_uniform, ops_for
from ..blockmask import dense_rows
from ..spec import Params

BUDGET = 1 << 24  # float32 scores per chunk


class _Rows:
    """Positions and masks for query rows r0:r1 of a padded (B, S) or packed (1, T) batch."""

    def __init__(self, ops, q, k, cu_q, cu_k, p: Params, slopes, bm, seed=None):
        self.ops, self.p, self.slopes, self.bm = ops, p, slopes, bm
        self.seed = p.dropout_seed if seed is None else seed  # an int or a scalar int array
        self.varlen = cu_q is not None
        b, sq = q.shape[0], q.shape[1]
        sk = k.shape[1]
        self.b, self.sq, self.sk = b, sq, sk
        self.lq, self.lk = ops.arange(sq, q), ops.arange(sk, q)
        if self.varlen:
            cq, ck = ops.asint(cu_q, q), ops.asint(cu_k, q)
            self.seg_q = ops.searchsorted(cq, self.lq)
            self.seg_k = ops.searchsorted(ck, self.lk)
            self.off = ((ck[1:] - ck[:-1]) - (cq[1:] - cq[:-1]))[self.seg_q]
            self.lq = self.lq - cq[self.seg_q]
            self.lk = self.lk - ck[self.seg_k]
        else:
            self.off = sk - sq

    def _i_off(self, r0, r1):
        i = self.lq[r0:r1].reshape(-1, 1)
        off = self.off[r0:r1].reshape(-1, 1) if self.varlen else self.off
        return i, off

    def allowed(self, r0, r1, hkv, g):
        """Bool broadcastable to (B, Hkv, g, rows, Sk), or None when everything is allowed."""
        p, ok = self.p, None

        def conj(a, c):
            return c if a is None else a & c

        i, off = self._i_off(r0, r1)
        j = self.lk.reshape(1, -1)
        if self.varlen:
            ok = self.seg_q[r0:r1].reshape(-1, 1) == self.seg_k.reshape(1, -1)
        if p.window_left is not None:
            ok = conj(ok, j >= i + off - p.window_left)
        if p.window_right is not None:
            ok = conj(ok, j <= i + off + p.window_right)
        if ok is not None:
            ok = ok.reshape(1, 1, 1, r1 - r0, self.sk)
        if self.bm is not None:
            d = dense_rows(self.bm, r0, r1, 0, self.sk)  # (Bm, Hm, rows, Sk)
            bmb, hm = d.shape[0], d.shape[1]
            d = d.reshape(bmb, 1, 1, r1 - r0, self.sk) if hm == 1 else d.reshape(
                bmb, hkv, g, r1 - r0, self.sk)
            ok = conj(ok, d)
        return ok

    def bias(self, r0, r1, hkv, g):
        """ALiBi term -slope * |i + off - j|, broadcastable to (B, Hkv, g, rows, Sk), or None."""
        if self.slopes is None:
            return None
        ops = self.ops
        i, off = self._i_off(r0, r1)
        dist = ops.f32(abs(i + off - self.lk.reshape(1, -1)))  # (rows, Sk)
        sl = ops.f32(self.slopes)
        if sl.ndim == 1:
            sl = sl.reshape(1, hkv, g, 1, 1)
        elif self.varlen:  # (B, Hq): the slope of each packed row's sequence
            sl = sl[self.seg_q[r0:r1]].T.reshape(1, hkv, g, r1 - r0, 1)
        else:
            sl = sl.reshape(-1, hkv, g, 1, 1)
        return -sl * dist.reshape(1, 1, 1, r1 - r0, self.sk)

    def keep(self, r0, r1, hkv, g):
        ops, p = self.ops, self.p
        if self.varlen:
            bi = self.seg_q[r0:r1].reshape(1, 1, 1, -1, 1)
        else:
            bi = ops.arange(self.b, self.lq).reshape(-1, 1, 1, 1, 1)
        h = ops.arange(hkv * g, self.lq).reshape(1, hkv, g, 1, 1)
        i = self.lq[r0:r1].reshape(1, 1, 1, -1, 1)
        j = self.lk.reshape(1, 1, 1, 1, -1)
        return dropout_uniform(ops, self.seed, bi, h, i, j) >= p.dropout_p


def _prep(q, k, v, cu_q):
    ops = ops_for(array_kind(q))
    if cu_q is not None:
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    return ops, q, ops.f32(q).reshape(b, sq, hkv, g, d), ops.f32(k), ops.f32(v), (b, sq, k.shape[1], hkv, g)


JAX_MAX_CHUNKS = 16  # under jax.jit the chunk loop unrolls: bound the graph, not the buffers


def _step(b, hq, sq, sk, kind="numpy"):
    step = max(1, min(max(sq, 1), BUDGET // max(1, b * hq * max(sk, 1))))
    if kind == "jax":  # fewer, larger chunks (memory ~ S^2 / JAX_MAX_CHUNKS scores per buffer)
        step = max(step, -(-sq // JAX_MAX_CHUNKS))
    return step


def _scores(ops, rows: _Rows, qc, kf, p: Params, r0, r1, hkv, g):
    s = ops.einsum("bqhgd,bkhd->bhgqk", qc, kf) * p.scale
    t = None
    if p.softcap:
        t = ops.m.tanh(s / p.softcap)
        s = t * p.softcap
    bias = rows.bias(r0, r1, hkv, g)
    if bias is not None:
        s = s + bias
    return s, t


def forward(q, k, v, cu_q, cu_k, p: Params, alibi_slopes=None, block_mask=None, seed=None):
    q_in = q
    ops, q, qf, kf, vf, (b, sq, sk, hkv, g) = _prep(q, k, v, cu_q)
    rows = _Rows(ops, q, kf, cu_q, cu_k, p, alibi_slopes, block_mask, seed)
    neg = float("-inf")
    outs, lses = [], []
    step = _step(b, hkv * g, sq, sk, ops.name)
    for r0 in range(0, max(sq, 1), step):
        r1 = min(sq, r0 + step)
        s, _ = _scores(ops, rows, qf[:, r0:r1], kf, p, r0, r1, hkv, g)
        ok = rows.allowed(r0, r1, hkv, g)
        if ok is not None:
            s = ops.where(ok, s, neg)
        mx = ops.amax(s, -1)
        mx = ops.where(mx == neg, 0.0, mx)
        e = ops.m.exp(s - mx)
        den = e.sum(-1)
        pos = den > 0
        lse = ops.where(pos, ops.m.log(ops.where(pos, den, 1.0)) + mx[..., 0], neg)
        pr = e / ops.where(pos, den, 1.0)[..., None]
        if p.dropout_p:
            pr = ops.where(rows.keep(r0, r1, hkv, g), pr / (1.0 - p.dropout_p), 0.0)
        o = ops.einsum("bhgqk,bkhd->bqhgd", pr, vf)
        outs.append(o.reshape(b, r1 - r0, hkv * g, vf.shape[-1]))
        lses.append(lse.reshape(b, hkv * g, r1 - r0))
    out = ops.cast_like(ops.concat(outs, 1), q_in)
    lse = ops.concat(lses, 2)
    if cu_q is not None:
        out, lse = out[0], lse[0]
    return out, lse


def backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, alibi_slopes=None,
             block_mask=None, seed=None):
    q_in, k_in, v_in = q, k, v
    ops, q, qf, kf, vf, (b, sq, sk, hkv, g) = _prep(q, k, v, cu_q)
    if cu_q is not None:
        do, lse = do[None], lse[None]
        dlse = None if dlse is None else dlse[None]
    rows = _Rows(ops, q, kf, cu_q, cu_k, p, alibi_slopes, block_mask, seed)
    dof = ops.f32(do).reshape(b, sq, hkv, g, vf.shape[-1])
    dlse = None if dlse is None else ops.f32(dlse).reshape(b, hkv, g, sq)
    lse = ops.f32(lse).reshape(b, hkv, g, sq)
    lse = ops.where(ops.m.isfinite(lse), lse, 0.0)
    dk, dv = ops.zeros(kf.shape, kf), ops.zeros(vf.shape, vf)
    dqs = []
    step = _step(b, hkv * g, sq, sk, ops.name)
    for r0 in range(0, max(sq, 1), step):
        r1 = min(sq, r0 + step)
        qc, doc = qf[:, r0:r1], dof[:, r0:r1]
        s, t = _scores(ops, rows, qc, kf, p, r0, r1, hkv, g)
        ok = rows.allowed(r0, r1, hkv, g)
        if ok is not None:
            s = ops.where(ok, s, float("-inf"))
        pr = ops.m.exp(s - lse[..., r0:r1, None])
        dp = ops.einsum("bqhgd,bkhd->bhgqk", doc, vf)
        pd = pr
        if p.dropout_p:
            keep = rows.keep(r0, r1, hkv, g)
            pd = ops.where(keep, pr / (1.0 - p.dropout_p), 0.0)
            dp = ops.where(keep, dp / (1.0 - p.dropout_p), 0.0)
        dv = ops.add_rows(dv, 0, sk, ops.einsum("bhgqk,bqhgd->bkhd", pd, doc))
        delta = (pr * dp).sum(-1)
        if dlse is not None:
            delta = delta - dlse[..., r0:r1]
        ds = pr * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dqs.append(ops.einsum("bhgqk,bkhd->bqhgd", ds, kf).reshape(b, r1 - r0, hkv * g, kf.shape[-1]) * p.scale)
        dk = ops.add_rows(dk, 0, sk, ops.einsum("bhgqk,bqhgd->bkhd", ds, qc) * p.scale)
    dq = ops.concat(dqs, 1)
    if cu_q is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return ops.cast_like(dq, q_in), ops.cast_like(dk, k_in), ops.cast_like(dv, v_in)


_jitted: dict = {}


def _jit(fn, static):
    if fn not in _jitted:
        import jax

        _jitted[fn] = jax.jit(fn, static_argnums=static)
    return _jitted[fn]


def backend_forward(q, k, v, cu_q, cu_k, p: Params, alibi_slopes=None, block_mask=None,
                    dropout_seed=None):
    if array_kind(q) == "jax":
        return _jit(forward, 5)(q, k, v, cu_q, cu_k, p, alibi_slopes, block_mask, dropout_seed)
    return forward(q, k, v, cu_q, cu_k, p, alibi_slopes, block_mask, dropout_seed)


def backend_backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, alibi_slopes=None,
                     block_mask=None, dropout_seed=None):
    if array_kind(q) == "jax":
        return _jit(backward, 9)(do, dlse, q, k, v, out, lse, cu_q, cu_k, p, alibi_slopes,
                                 block_mask, dropout_seed)
    return backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p, alibi_slopes, block_mask,
                    dropout_seed)
