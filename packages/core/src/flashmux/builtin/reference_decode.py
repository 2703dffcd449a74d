"""The reference backend's KV-cache decode: exact attention over the cache in the framework's own
ops (NumPy, torch or jax.numpy), float32 inside (float64 for float64 inputs).

Contract: flashmux/kvcache.py. Paged caches are gathered through the (clamped) block table into
a (B, max_pages * page_size, Hkv, D) view; keys past each sequence's (clamped) length are masked.
Query rows are processed in chunks so one score buffer stays within `SCORE_BUDGET` float32
elements. Nothing is read on the host, so it runs under jax.jit and torch.compile as is.
"""

from __future__ import annotations

from .._arrays import array_kind
from .._xp import ops_for

SCORE_BUDGET = 1 << 25  # float32 elements per score buffer (128 MiB)


def _gather_keys(cache, table):
    """A paged cache (num_pages, page, Hkv, D) seen through `table` (B, max_pages) as
    (B, max_pages * page, Hkv, D)."""
    g = cache[table]
    b, mp, page = g.shape[:3]
    return g.reshape(b, mp * page, *cache.shape[2:])


def decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, p):
    kind = array_kind(q)
    ops = ops_for(kind)
    m = ops.m
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    if p.page_size:
        num_pages = k_cache.shape[0]
        table = m.clip(ops.asint(block_table, q), 0, max(num_pages - 1, 0))
        kf = _gather_keys(k_cache, table)
        vf = _gather_keys(v_cache, table)
    else:
        kf, vf = k_cache, v_cache
    kf, vf = ops.f32(kf), ops.f32(vf)
    cap = kf.shape[1]
    dv = vf.shape[-1]
    lens = m.clip(ops.asint(seqlens_k, q), 0, cap)  # (B,)
    off = lens - sq  # query row i sits at position off + i
    j = ops.arange(cap, q)
    qf = ops.f32(q).reshape(b, sq, hkv, g, d)
    slopes = None
    if alibi_slopes is not None:
        sl = ops.f32(alibi_slopes)
        sl = sl.reshape(1, hq) if len(sl.shape) == 1 else sl
        slopes = sl.reshape(sl.shape[0], hkv, g, 1, 1)
    neg_inf = float("-inf")
    step = max(1, min(sq, SCORE_BUDGET // max(1, b * hq * cap)))
    outs, lses = [], []
    for r0 in range(0, sq, step):
        r1 = min(sq, r0 + step)
        pos = off[:, None] + ops.arange(sq, q)[None, r0:r1]  # (B, rows)
        ok = j[None, None, :] < lens[:, None, None]  # (B, rows|1, cap)
        if p.window_left is not None:
            ok = ok & (j[None, None, :] >= pos[:, :, None] - p.window_left)
        if p.window_right is not None:
            ok = ok & (j[None, None, :] <= pos[:, :, None] + p.window_right)
        s = ops.einsum("bqhgd,bkhd->bhgqk", qf[:, r0:r1], kf) * p.scale
        if p.softcap:
            s = m.tanh(s / p.softcap) * p.softcap
        if slopes is not None:
            dist = m.abs(pos[:, :, None] - j[None, None, :])  # (B, rows, cap)
            s = s - slopes * ops.f32(dist)[:, None, None]
        s = ops.where(ok[:, None, None], s, neg_inf)
        mx = ops.amax(s, -1)
        mx = ops.where(mx == neg_inf, 0.0, mx)
        e = m.exp(s - mx)
        den = e.sum(-1)
        pos_den = den > 0
        lse = ops.where(pos_den, m.log(ops.where(pos_den, den, 1.0)) + mx[..., 0], neg_inf)
        pr = e / ops.where(pos_den, den, 1.0)[..., None]
        o = ops.einsum("bhgqk,bkhd->bqhgd", pr, vf)
        outs.append(o.reshape(b, r1 - r0, hq, dv))
        lses.append(lse.reshape(b, hq, r1 - r0))
    out = ops.cast_like(ops.concat(outs, 1), q)
    lse = ops.concat(lses, 2)
    lse = lse.float() if kind == "torch" else lse.astype("float32")  # float32 by contract
    return out, lse


_jitted = None


def _jax_decode():
    global _jitted
    if _jitted is None:
        import jax

        _jitted = jax.jit(decode, static_argnums=6)
    return _jitted


def decode_reasons(self, spec) -> list[str]:
    from ..kvcache import decode_capability_reasons

    return decode_capability_reasons(self.capabilities, spec)


def backend_decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
    fn = _jax_decode() if array_kind(q) == "jax" else decode
    return fn(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params)


def decode_splits(self, spec, params) -> int:
    return 1  # one pass over the whole cache, no key splits
