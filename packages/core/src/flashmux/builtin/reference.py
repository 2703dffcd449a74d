"""The `reference` backend: exact attention in the framework's own ops (torch, jax.numpy or NumPy),
float32 inside (float64 for float64 inputs), always available, on every device the framework runs on.

It is the default where no kernel backend fits (NumPy and JAX on a machine without a GPU) and the
yardstick the kernels are compared with for speed. The algorithm is FlashAttention's split, done
with the framework's matmuls: heads are moved in front, (B, Hkv, S*g, D) with the g query heads of
one KV head interleaved per row, so every product is one batched BLAS/XLA matmul per block of
`chunk_rows` query rows against the keys those rows can see (causal and window bands skip whole
key ranges; the mask is applied only to the columns a band cuts through). The score block is
reused in place for exp (NumPy, torch) and normalized after the P @ V product, so a chunk costs
two matmuls and four passes over its scores. Peak extra memory is about 3 score blocks of at most
`SCORE_BUDGET` elements (forward: 1, backward: 3) plus float32 copies of q, k, v, out and the
gradients: linear in the sequence length. Under jax.jit (the backend jits itself) the chunks unroll
into the graph; their number is capped by `JAX_MAX_CHUNKS` to keep compile times short.
"""

from __future__ import annotations

import numpy as np

from .._arrays import array_kind
from .._xp import dropout_uniform, ops_for
from ..backend import EXTRA_FEATURES, FEATURES, Backend, Capabilities
from ..spec import Params
from . import reference_decode

SCORE_BUDGET = 1 << 21  # elements per score block: 8 MiB float32, stays in the last-level cache
JAX_MAX_CHUNKS = 16  # query chunks unrolled under jax.jit at most


def chunk_rows(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, banded: bool = False,
    max_chunks: int | None = None,
) -> int:
    """Query rows per chunk: within SCORE_BUDGET (at least 16 rows), for banded masks (causal,
    windows) at most 1/8 of the rows so that key blocks no row of a chunk can see are skipped,
    and at least seqlen_q / max_chunks rows when the chunk count is capped."""
    if not seqlen_q:
        return 1
    per_row = max(1, batch * heads * max(seqlen_k, 1))
    rows = max(16, min(seqlen_q, SCORE_BUDGET // per_row))
    if banded:
        rows = min(rows, max(128, -(-seqlen_q // 8)))
    if max_chunks:
        rows = max(rows, -(-seqlen_q // max_chunks))
    return min(rows, seqlen_q)


class _Layout:
    """Row/column bookkeeping shared by forward and backward: local positions, sequence ids
    and the bottom-right offset, for padded batches and packed (varlen) ones alike."""

    def __init__(self, ops, q, k, cu_q, cu_k, p: Params, seed=None):
        self.ops, self.p = ops, p
        self.seed = p.dropout_seed if seed is None else seed  # an int or a scalar int array
        self.varlen = cu_q is not None
        sq, sk = q.shape[1], k.shape[1]  # q/k already carry a batch axis here
        self.local_q = ops.arange(sq, q)
        self.local_k = ops.arange(sk, q)
        if self.varlen:
            cq, ck = ops.asint(cu_q, q), ops.asint(cu_k, q)
            self.seg_q = ops.searchsorted(cq, self.local_q)
            self.seg_k = ops.searchsorted(ck, self.local_k)
            len_q, len_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
            self.off_q = (len_k - len_q)[self.seg_q]
            self.local_q = self.local_q - cq[self.seg_q]
            self.local_k = self.local_k - ck[self.seg_k]
        else:
            self.off_q = sk - sq

    def banded(self) -> bool:
        return not self.varlen and (
            self.p.window_left is not None or self.p.window_right is not None
        )

    def needs_mask(self) -> bool:
        p = self.p
        return self.varlen or p.window_left is not None or p.window_right is not None

    def key_range(self, r0, r1, sk):
        """Keys [lo, hi) that rows r0:r1 may see at all: blocks outside are never computed."""
        p = self.p
        if self.varlen or r1 <= r0:
            return 0, sk
        lo, hi = 0, sk
        if p.window_left is not None:
            lo = min(sk, max(0, r0 + self.off_q - p.window_left))
        if p.window_right is not None:
            hi = min(sk, max(lo, r1 - 1 + self.off_q + p.window_right + 1))
        return lo, hi

    def masked_cols(self, r0, r1, lo, hi):
        """Column ranges inside [lo, hi) where some row of r0:r1 has a masked key; the columns
        between them are seen by every row and need no mask."""
        if not self.needs_mask() or hi <= lo or r1 <= r0:
            return []
        if self.varlen:
            return [(lo, hi)]
        p, a, z = self.p, lo, hi  # [a, z): columns every row sees
        if p.window_left is not None:
            a = max(lo, min(hi, r1 - 1 + self.off_q - p.window_left))
        if p.window_right is not None:
            z = min(hi, max(lo, r0 + self.off_q + p.window_right + 1))
        if a >= z:
            return [(lo, hi)]
        return [(c0, c1) for c0, c1 in ((lo, a), (z, hi)) if c1 > c0]

    def allowed(self, r0, r1, lo, hi):
        """Bool (rows, keys lo:hi) for query rows r0:r1, or None when every key is allowed."""
        if not self.needs_mask():
            return None
        p = self.p
        i = self.local_q[r0:r1][:, None]
        off = self.off_q[r0:r1][:, None] if self.varlen else self.off_q
        j = self.local_k[None, lo:hi]
        ok = None

        def conj(a, b):
            return b if a is None else a & b

        if self.varlen:
            ok = self.seg_q[r0:r1][:, None] == self.seg_k[None, lo:hi]
        if p.window_left is not None:
            ok = conj(ok, j >= i + off - p.window_left)
        if p.window_right is not None:
            ok = conj(ok, j <= i + off + p.window_right)
        return ok

    def keep(self, r0, r1, lo, hi, batch, heads_kv, group):
        """Dropout keep mask (B|1, Hkv, rows, g, keys lo:hi) for rows r0:r1 (head = kv * g + g_i)."""
        ops, p = self.ops, self.p
        if self.varlen:
            b = self.seg_q[r0:r1].reshape(1, 1, -1, 1, 1)
        else:
            b = ops.arange(batch, self.local_q).reshape(-1, 1, 1, 1, 1)
        h = ops.arange(heads_kv * group, self.local_q).reshape(1, heads_kv, 1, group, 1)
        i = self.local_q[r0:r1].reshape(1, 1, -1, 1, 1)
        j = self.local_k[lo:hi].reshape(1, 1, 1, 1, -1)
        return dropout_uniform(ops, self.seed, b, h, i, j) >= p.dropout_p


# -- a few framework-specific steps: matmuls, layout copies, in-place elementwise work ----------


def _mm(ops, a, b):
    if ops.name == "jax":
        return ops.m.matmul(a, b, precision=ops._prec)
    return ops.m.matmul(a, b)


def _perm(ops, x, axes):
    """A contiguous transpose (one copy): the matmuls then run on plain row-major blocks."""
    if ops.name == "numpy":
        return np.ascontiguousarray(np.transpose(x, axes))
    if ops.name == "torch":
        return x.permute(axes).contiguous()
    return ops.m.transpose(x, axes)


def _t(ops, x):
    return ops.m.swapaxes(x, -1, -2)  # a view for NumPy and torch; BLAS takes it transposed


def _heads_first(ops, x, b, s, hkv, g):
    """(B, S, Hkv*g, D) -> float32 (B, Hkv, S*g, D): row r*g + j is query head kv*g + j at r."""
    d = x.shape[-1]
    return _perm(ops, ops.f32(x).reshape(b, s, hkv, g, d), (0, 2, 1, 3, 4)).reshape(b, hkv, s * g, d)


def _heads_last(ops, x, b, s, hkv, g):
    """Inverse of _heads_first: (B, Hkv, S*g, D) -> (B, S, Hkv*g, D)."""
    d = x.shape[-1]
    return _perm(ops, x.reshape(b, hkv, s, g, d), (0, 2, 1, 3, 4)).reshape(b, s, hkv * g, d)


def _exp_shift(ops, s, m):
    """exp(s - m), in s's memory where the framework allows (s is a fresh block)."""
    if ops.name == "numpy":
        np.subtract(s, m, out=s)
        return np.exp(s, out=s)
    if ops.name == "torch":
        return s.sub_(m).exp_()
    return ops.m.exp(s - m)


def _scale_(ops, s, c):
    if ops.name == "jax":
        return s * c
    s *= c
    return s


def _fill_where_not(ops, s5, c0, c1, ok, fill):
    """s5[..., c0:c1] = where(ok, s5[..., c0:c1], fill); s5 is (B, Hkv, rows, g, cols)."""
    ok = ok[:, None, :]
    if ops.name == "numpy":
        np.copyto(s5[..., c0:c1], fill, where=~ok)
        return s5
    if ops.name == "torch":
        s5[..., c0:c1].masked_fill_(~ok, fill)
        return s5
    return s5.at[..., c0:c1].set(ops.m.where(ok, s5[..., c0:c1], fill))


def _add_keys(ops, acc, lo, hi, x):
    """acc[:, :, lo:hi] += x, in place where the framework allows."""
    if ops.name == "jax":
        return acc.at[:, :, lo:hi].add(x)
    acc[:, :, lo:hi] += x
    return acc


def _scores(ops, qc, kt, p: Params):
    """Scores of a chunk, qc already scaled: (B, Hkv, rows*g, keys), and tanh(s/softcap) or None."""
    s = _mm(ops, qc, kt)
    if not p.softcap:
        return s, None
    t = ops.m.tanh(s * (1.0 / p.softcap))
    return t * p.softcap, t


def _mask(ops, lay, s, fill, r0, r1, lo, hi, shape5):
    for c0, c1 in lay.masked_cols(r0, r1, lo, hi):
        s5 = _fill_where_not(ops, s.reshape(shape5), c0 - lo, c1 - lo, lay.allowed(r0, r1, c0, c1), fill)
        s = s5.reshape(s.shape)
    return s


def _prep(q, k, v, cu_q):
    ops = ops_for(array_kind(q))
    if cu_q is not None:  # packed rows: one "batch" of Tq rows, sequences told apart by masks
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    return ops, q, k, v, (b, sq, k.shape[1], hq, hkv, hq // hkv)


def forward(q, k, v, cu_q, cu_k, p: Params, seed=None):
    """seed: dropout_seed as a scalar integer array (params.dropout_seed when None)."""
    q_in = q
    ops, q, k, v, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    lay = _Layout(ops, q, k, cu_q, cu_k, p, seed)
    qh = _heads_first(ops, q, b, sq, hkv, g) * p.scale  # (B, Hkv, Sq*g, D)
    kt = _perm(ops, ops.f32(k), (0, 2, 3, 1))  # (B, Hkv, D, Sk)
    vh = _perm(ops, ops.f32(v), (0, 2, 1, 3))  # (B, Hkv, Sk, Dv)
    neg_inf = float("-inf")
    outs, lses = [], []
    cap = JAX_MAX_CHUNKS if ops.name == "jax" else None
    step = chunk_rows(b, hq, sq, sk, lay.banded(), cap)
    for r0 in range(0, max(sq, 1), step):  # one empty chunk when sq == 0
        r1 = min(sq, r0 + step)
        n = r1 - r0
        lo, hi = lay.key_range(r0, r1, sk)
        s, _ = _scores(ops, qh[:, :, r0 * g : r1 * g], kt[..., lo:hi], p)
        s = _mask(ops, lay, s, neg_inf, r0, r1, lo, hi, (b, hkv, n, g, hi - lo))
        mx = ops.amax(s, -1)
        mx = ops.where(mx == neg_inf, 0.0, mx)
        e = _exp_shift(ops, s, mx)
        den = e.sum(-1)[..., None]
        pos = den > 0
        den1 = ops.where(pos, den, 1.0)
        lse = ops.where(pos, ops.m.log(den1) + mx, neg_inf)
        if p.dropout_p:
            keep = lay.keep(r0, r1, lo, hi, b, hkv, g)
            e = ops.where(keep, e.reshape(b, hkv, n, g, hi - lo), 0.0).reshape(e.shape)
            den1 = den1 * (1.0 - p.dropout_p)
        outs.append(_mm(ops, e, vh[:, :, lo:hi]) / den1)
        lses.append(lse)
    out = _heads_last(ops, ops.concat(outs, 2), b, sq, hkv, g)  # (B, Sq, Hq, Dv)
    out = ops.cast_like(out, q_in)
    lse = ops.concat(lses, 2).reshape(b, hkv, sq, g)
    lse = _perm(ops, lse, (0, 1, 3, 2)).reshape(b, hq, sq)
    if cu_q is not None:
        out, lse = out[0], lse[0]
    return out, lse


def backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, out_residual=None, seed=None):
    """out_residual (float32 out minus out) is never passed by the core (this backend does not
    declare out_residual); flashmux.ring_attention passes it because it hands each key block the
    out and lse of the whole sequence: then delta = rowsum(dO * (out + out_residual))."""
    q_in, k_in, v_in = q, k, v
    ops, q, k, v, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    if cu_q is not None:
        do, lse = do[None], lse[None]
        dlse = None if dlse is None else dlse[None]
        out = out[None]
        out_residual = None if out_residual is None else out_residual[None]
    if out_residual is None:
        del out  # delta comes from the recomputed float32 probabilities (below)
    lay = _Layout(ops, q, k, cu_q, cu_k, p, seed)
    qh = _heads_first(ops, q, b, sq, hkv, g) * p.scale  # (B, Hkv, Sq*g, D), scaled
    doh = _heads_first(ops, do, b, sq, hkv, g)  # (B, Hkv, Sq*g, Dv)
    delta_out = None
    if out_residual is not None:
        oh = _heads_first(ops, ops.f32(out) + ops.f32(out_residual), b, sq, hkv, g)
        delta_out = (doh * oh).sum(-1)[..., None]
        del oh
    kh = _perm(ops, ops.f32(k), (0, 2, 1, 3))  # (B, Hkv, Sk, D)
    vh = _perm(ops, ops.f32(v), (0, 2, 1, 3))  # (B, Hkv, Sk, Dv)

    def rows_last(x):  # (B, Hq, Sq) -> (B, Hkv, Sq*g, 1)
        x = _perm(ops, ops.f32(x).reshape(b, hkv, g, sq), (0, 1, 3, 2))
        return x.reshape(b, hkv, sq * g, 1)

    lse = rows_last(lse)
    lse = ops.where(ops.m.isfinite(lse), lse, 0.0)
    dlse = None if dlse is None else rows_last(dlse)
    dk = ops.zeros(kh.shape, kh)
    dvh = ops.zeros(vh.shape, vh)
    dqs = []
    cap = JAX_MAX_CHUNKS if ops.name == "jax" else None
    step = chunk_rows(b, hq, sq, sk, lay.banded(), cap)
    for r0 in range(0, max(sq, 1), step):
        r1 = min(sq, r0 + step)
        n = r1 - r0
        lo, hi = lay.key_range(r0, r1, sk)
        shape5 = (b, hkv, n, g, hi - lo)
        qc, doc = qh[:, :, r0 * g : r1 * g], doh[:, :, r0 * g : r1 * g]
        kc, vc = kh[:, :, lo:hi], vh[:, :, lo:hi]
        s, t = _scores(ops, qc, _t(ops, kc), p)
        pr = _exp_shift(ops, s, lse[:, :, r0 * g : r1 * g])
        pr = _mask(ops, lay, pr, 0.0, r0, r1, lo, hi, shape5)
        dp = _mm(ops, doc, _t(ops, vc))
        pd = pr
        if p.dropout_p:
            keep = lay.keep(r0, r1, lo, hi, b, hkv, g)
            inv = 1.0 / (1.0 - p.dropout_p)
            pd = ops.where(keep, pr.reshape(shape5) * inv, 0.0).reshape(pr.shape)
            dp = ops.where(keep, dp.reshape(shape5) * inv, 0.0).reshape(pr.shape)
        dvh = _add_keys(ops, dvh, lo, hi, _mm(ops, _t(ops, pd), doc))
        # delta = rowsum(dO * O) = rowsum(P * dP), in float32 from the recomputed P: the stored
        # low-precision out would let its rounding dominate small gradients
        delta = (pr * dp).sum(-1)[..., None] if delta_out is None else delta_out[:, :, r0 * g : r1 * g]
        if dlse is not None:
            delta = delta - dlse[:, :, r0 * g : r1 * g]
        ds = _ds(ops, pr, dp, delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dqs.append(_scale_(ops, _mm(ops, ds, kc), p.scale))
        dk = _add_keys(ops, dk, lo, hi, _mm(ops, _t(ops, ds), qc))  # qc carries the scale
    dq = _heads_last(ops, ops.concat(dqs, 2), b, sq, hkv, g)
    dk = _perm(ops, dk, (0, 2, 1, 3))
    dvh = _perm(ops, dvh, (0, 2, 1, 3))
    if cu_q is not None:
        dq, dk, dvh = dq[0], dk[0], dvh[0]
    return ops.cast_like(dq, q_in), ops.cast_like(dk, k_in), ops.cast_like(dvh, v_in)


def _ds(ops, pr, dp, delta):
    """P * (dP - delta), in dP's memory where the framework allows."""
    if ops.name == "numpy":
        np.subtract(dp, delta, out=dp)
        return np.multiply(dp, pr, out=dp)
    if ops.name == "torch":
        return dp.sub_(delta).mul_(pr)
    return pr * (dp - delta)


_jitted: dict = {}


def _jax_jit(fn, static):
    """jax.jit of forward/backward with Params static: eager JAX would compile every small op
    separately; inside an outer jit this simply inlines."""
    if fn not in _jitted:
        import jax

        _jitted[fn] = jax.jit(fn, static_argnums=static)
    return _jitted[fn]


def _empty(*xs) -> bool:
    """A zero-size operand (B, Sq, Sk, Tq or Tk of 0): the generic path answers it (zeros, -inf)."""
    return any(0 in tuple(x.shape) for x in xs)


class ReferenceBackend(Backend):
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, dropout_seed=None, **masks):
        # dropout_seed: a scalar integer array (spec.seed_array), an operand of every path below
        if masks:  # alibi_slopes= / block_mask=: builtin/reference_masks.py
            from . import reference_masks

            return reference_masks.backend_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params,
                                                   dropout_seed=dropout_seed, **masks)
        if isinstance(q, np.ndarray):  # float32 NumPy without dropout: threaded CPU path
            from . import reference_cpu

            if reference_cpu.applies(q, k, v, cu_seqlens_q, params):
                return reference_cpu.forward(q, k, v, params)
        if array_kind(q) == "jax":  # float32 on the CPU: the threaded NumPy path, via pure_callback
            from . import reference_cpu

            if reference_cpu.jax_applies(q, k, v, cu_seqlens_q, params):
                return reference_cpu.jax_forward(q, k, v, params)
        if array_kind(q) == "jax" and not _empty(q, k, v):  # lax.map over chunks: linear memory
            from . import reference_jax

            return reference_jax.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, dropout_seed)
        return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, dropout_seed)

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                 out_residual=None, dropout_seed=None, **masks):
        if masks:  # alibi_slopes= / block_mask=: builtin/reference_masks.py
            from . import reference_masks

            return reference_masks.backend_backward(do, dlse, q, k, v, out, lse, cu_seqlens_q,
                                                    cu_seqlens_k, params,
                                                    dropout_seed=dropout_seed, **masks)
        if isinstance(q, np.ndarray) and out_residual is None:
            from . import reference_cpu

            if reference_cpu.applies(q, k, v, cu_seqlens_q, params, do):
                return reference_cpu.backward(do, dlse, q, k, v, out, lse, params)
        if array_kind(q) == "jax" and out_residual is None:
            from . import reference_cpu

            if reference_cpu.jax_applies(q, k, v, cu_seqlens_q, params, do):
                return reference_cpu.jax_backward(do, dlse, q, k, v, out, lse, params)
        if array_kind(q) == "jax" and out_residual is None and not _empty(q, k, v):
            from . import reference_jax

            return reference_jax.backward(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                          params, dropout_seed)
        fn = _jax_jit(backward, 9) if array_kind(q) == "jax" else backward
        return fn(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params, out_residual,
                  dropout_seed)

    def dropout_keep_mask(self, seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like):
        ops = ops_for(array_kind(like))
        b = ops.arange(batch, like).reshape(-1, 1, 1, 1)
        h = ops.arange(heads, like).reshape(1, -1, 1, 1)
        i = ops.arange(seqlen_q, like).reshape(1, 1, -1, 1)
        j = ops.arange(seqlen_k, like).reshape(1, 1, 1, -1)
        return dropout_uniform(ops, seed, b, h, i, j) >= dropout_p

    # KV-cache decode (flashmux.attention_with_kvcache): builtin/reference_decode.py
    decode_reasons = reference_decode.decode_reasons
    decode = reference_decode.backend_decode
    decode_splits = reference_decode.decode_splits

    def info(self):
        from . import reference_cpu

        return {"score block (elements)": SCORE_BUDGET, "query chunks under jax.jit (max)": JAX_MAX_CHUNKS,
                "CPU worker threads (float32 NumPy/JAX)": reference_cpu.threads()}


backend = ReferenceBackend(
    name="reference",
    description="exact attention in the framework's own ops, float32 inside, query-chunked",
    capabilities=Capabilities(
        array_kinds=frozenset({"numpy", "torch", "jax"}),
        devices=frozenset({"cpu", "cuda", "gpu", "mps", "tpu"}),
        dtypes=frozenset({"float16", "bfloat16", "float32", "float64"}),
        max_head_dim=1 << 16,
        runs_under_jit=True,
        priority=1000,
        features=frozenset(FEATURES) | frozenset(EXTRA_FEATURES),
    ),
)
