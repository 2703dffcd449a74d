"""The `reference` backend: exact attention in the framework's own ops (torch, jax.numpy or NumPy),
float32 inside, always available, on every device the framework runs on.

It is the default where no kernel backend fits (a machine without a GPU) and the yardstick the
kernels are compared with for speed. Queries are processed in chunks of `chunk_rows` rows so that
the score matrix of a long sequence is never allocated whole. Peak extra memory is about
4 * 4 bytes * B * Hq * chunk_rows * Sk (scores, probabilities and their gradients, float32),
capped by `SCORE_BUDGET` elements per buffer: at most ~4 * 128 MiB, plus O(B * S * H * D) for the
float32 copies of q, k, v and the outputs. Under jax.jit the chunks unroll into the graph.
"""

from __future__ import annotations

from .._arrays import array_kind
from .._xp import dropout_uniform, ops_for
from ..backend import EXTRA_FEATURES, FEATURES, Backend, Capabilities
from ..spec import Params
from . import reference_decode

SCORE_BUDGET = 1 << 25  # float32 elements per score buffer (128 MiB)


def chunk_rows(batch: int, heads: int, seqlen_q: int, seqlen_k: int, banded: bool = False) -> int:
    """Query rows per chunk: within SCORE_BUDGET, and for banded masks (causal, windows) at
    most 1/8 of the rows so that key blocks no row of a chunk can see are skipped."""
    if not seqlen_q:
        return 1
    per_row = max(1, batch * heads * max(seqlen_k, 1))
    rows = max(16, min(seqlen_q, SCORE_BUDGET // per_row))
    if banded:
        rows = min(rows, max(128, -(-seqlen_q // 8)))
    return rows


class _Layout:
    """Row/column bookkeeping shared by forward and backward: local positions, sequence ids
    and the bottom-right offset, for padded batches and packed (varlen) ones alike."""

    def __init__(self, ops, q, k, cu_q, cu_k, p: Params):
        self.ops, self.p = ops, p
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
        """Dropout keep mask (B|1, Hkv, g, rows, keys lo:hi) for rows r0:r1."""
        ops, p = self.ops, self.p
        if self.varlen:
            b = self.seg_q[r0:r1].reshape(1, 1, 1, -1, 1)
        else:
            b = ops.arange(batch, self.local_q).reshape(-1, 1, 1, 1, 1)
        h = ops.arange(heads_kv * group, self.local_q).reshape(1, heads_kv, group, 1, 1)
        i = self.local_q[r0:r1].reshape(1, 1, 1, -1, 1)
        j = self.local_k[lo:hi].reshape(1, 1, 1, 1, -1)
        return dropout_uniform(ops, p.dropout_seed, b, h, i, j) >= p.dropout_p


def _scores(ops, qc, kf, p: Params):
    s = ops.einsum("bqhgd,bkhd->bhgqk", qc, kf) * p.scale
    t = None
    if p.softcap:
        t = ops.m.tanh(s / p.softcap)
        s = t * p.softcap
    return s, t


def _prep(q, k, v, cu_q):
    ops = ops_for(array_kind(q))
    if cu_q is not None:  # packed rows: one "batch" of Tq rows, sequences told apart by masks
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qf = ops.f32(q).reshape(b, sq, hkv, g, d)
    return ops, q, k, v, qf, ops.f32(k), ops.f32(v), (b, sq, k.shape[1], hq, hkv, g)


def forward(q, k, v, cu_q, cu_k, p: Params):
    q_in = q
    ops, q, k, v, qf, kf, vf, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    lay = _Layout(ops, q, k, cu_q, cu_k, p)
    neg_inf = float("-inf")
    outs, lses = [], []
    step = chunk_rows(b, hq, sq, sk, lay.banded())
    for r0 in range(0, max(sq, 1), step):  # one empty chunk when sq == 0
        r1 = min(sq, r0 + step)
        lo, hi = lay.key_range(r0, r1, sk)
        s, _ = _scores(ops, qf[:, r0:r1], kf[:, lo:hi], p)
        ok = lay.allowed(r0, r1, lo, hi)
        if ok is not None:
            s = ops.where(ok, s, neg_inf)
        mx = ops.amax(s, -1)
        mx = ops.where(mx == neg_inf, 0.0, mx)
        e = ops.m.exp(s - mx)
        den = e.sum(-1)
        pos = den > 0
        lse = ops.where(pos, ops.m.log(ops.where(pos, den, 1.0)) + mx[..., 0], neg_inf)
        pr = e / ops.where(pos, den, 1.0)[..., None]
        if p.dropout_p:
            pr = ops.where(lay.keep(r0, r1, lo, hi, b, hkv, g), pr / (1.0 - p.dropout_p), 0.0)
        o = ops.einsum("bhgqk,bkhd->bqhgd", pr, vf[:, lo:hi])
        outs.append(o.reshape(b, r1 - r0, hq, vf.shape[-1]))
        lses.append(lse.reshape(b, hq, r1 - r0))
    out = ops.cast_like(ops.concat(outs, 1), q_in)
    lse = ops.concat(lses, 2)
    if cu_q is not None:
        out, lse = out[0], lse[0]
    return out, lse


def backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, out_residual=None):
    """out_residual (float32 out minus out) is never passed by the core (this backend does not
    declare out_residual); flashmux.ring_attention passes it because it hands each key block the
    out and lse of the whole sequence: then delta = rowsum(dO * (out + out_residual))."""
    q_in, k_in, v_in = q, k, v
    ops, q, k, v, qf, kf, vf, (b, sq, sk, hq, hkv, g) = _prep(q, k, v, cu_q)
    if cu_q is not None:
        do, lse = do[None], lse[None]
        dlse = None if dlse is None else dlse[None]
        out = out[None]
        out_residual = None if out_residual is None else out_residual[None]
    lay = _Layout(ops, q, k, cu_q, cu_k, p)
    dof = ops.f32(do).reshape(b, sq, hkv, g, vf.shape[-1])
    delta_out = None
    if out_residual is not None:
        of = (ops.f32(out) + ops.f32(out_residual)).reshape(b, sq, hkv, g, vf.shape[-1])
        delta_out = ops.einsum("bqhgd,bqhgd->bhgq", dof, of)
    del out  # otherwise delta comes from the recomputed float32 probabilities (below)
    dlse = None if dlse is None else ops.f32(dlse).reshape(b, hkv, g, sq)
    lse = ops.f32(lse).reshape(b, hkv, g, sq)
    lse = ops.where(ops.m.isfinite(lse), lse, 0.0)
    dk = ops.zeros(kf.shape, kf)
    dv = ops.zeros(vf.shape, vf)
    dqs = []
    step = chunk_rows(b, hq, sq, sk, lay.banded())
    for r0 in range(0, max(sq, 1), step):
        r1 = min(sq, r0 + step)
        lo, hi = lay.key_range(r0, r1, sk)
        qc, doc, kc, vc = qf[:, r0:r1], dof[:, r0:r1], kf[:, lo:hi], vf[:, lo:hi]
        s, t = _scores(ops, qc, kc, p)
        pr = ops.m.exp(s - lse[..., r0:r1, None])
        ok = lay.allowed(r0, r1, lo, hi)
        if ok is not None:
            pr = ops.where(ok, pr, 0.0)
        dp = ops.einsum("bqhgd,bkhd->bhgqk", doc, vc)
        pd = pr
        if p.dropout_p:
            keep = lay.keep(r0, r1, lo, hi, b, hkv, g)
            pd = ops.where(keep, pr / (1.0 - p.dropout_p), 0.0)
            dp = ops.where(keep, dp / (1.0 - p.dropout_p), 0.0)
        dv = ops.add_rows(dv, lo, hi, ops.einsum("bhgqk,bqhgd->bkhd", pd, doc))
        # delta = rowsum(dO * O) = rowsum(P * dP), in float32 from the recomputed P: the stored
        # low-precision out would let its rounding dominate small gradients
        delta = (pr * dp).sum(-1) if delta_out is None else delta_out[..., r0:r1]
        if dlse is not None:
            delta = delta - dlse[..., r0:r1]
        ds = pr * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dqs.append(ops.einsum("bhgqk,bkhd->bqhgd", ds, kc).reshape(b, r1 - r0, hq, kf.shape[-1]) * p.scale)
        dk = ops.add_rows(dk, lo, hi, ops.einsum("bhgqk,bqhgd->bkhd", ds, qc) * p.scale)
    dq = ops.concat(dqs, 1)
    if cu_q is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return ops.cast_like(dq, q_in), ops.cast_like(dk, k_in), ops.cast_like(dv, v_in)


_jitted: dict = {}


def _jax_jit(fn, static):
    """jax.jit of forward/backward with Params static: eager JAX would compile every small op
    separately; inside an outer jit this simply inlines."""
    if fn not in _jitted:
        import jax

        _jitted[fn] = jax.jit(fn, static_argnums=static)
    return _jitted[fn]


class ReferenceBackend(Backend):
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, **masks):
        if masks:  # alibi_slopes= / block_mask=: builtin/reference_masks.py
            from . import reference_masks

            return reference_masks.backend_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, **masks)
        fn = _jax_jit(forward, 5) if array_kind(q) == "jax" else forward
        return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, params)

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                 out_residual=None, **masks):
        if masks:  # alibi_slopes= / block_mask=: builtin/reference_masks.py
            from . import reference_masks

            return reference_masks.backend_backward(do, dlse, q, k, v, out, lse, cu_seqlens_q,
                                                    cu_seqlens_k, params, **masks)
        fn = _jax_jit(backward, 9) if array_kind(q) == "jax" else backward
        return fn(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params, out_residual)

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
        return {"chunk budget (float32 elements per score buffer)": SCORE_BUDGET}


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
