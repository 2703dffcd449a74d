"""The ground truth: attention and its gradients in NumPy float64, written for clarity, not speed.

It materializes the full score matrix of each sequence and follows SPEC.md step by step. Every
test judges backends against it. Shapes are those of `flashmux.attention` (BSHD, or packed with
cu_seqlens). `keep_mask`, for dropout, is a bool array indexed (batch, head, i, j) with i, j the
row offsets inside the sequence, shape (B, Hq, >= max Sq, >= max Sk).
"""

from __future__ import annotations

import math

import numpy as np


def allowed_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    """Bool (seqlen_q, seqlen_k): which keys each query may see (bottom-right aligned)."""
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    off = seqlen_k - seqlen_q
    ok = np.ones((seqlen_q, seqlen_k), dtype=bool)
    left, right = (None, None) if window is None else window
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        ok &= j >= i + off - left
    if right is not None:
        ok &= j <= i + off + right
    return ok


def _sequences(q, cu_seqlens_q, cu_seqlens_k, k):
    """Yield (b, q_rows, k_rows) slices: batch entries, or packed sequences."""
    if cu_seqlens_q is None:
        for b in range(q.shape[0]):
            yield b, (b, slice(None)), (b, slice(None))
    else:
        cq = np.asarray(cu_seqlens_q, dtype=np.int64)
        ck = np.asarray(cu_seqlens_k, dtype=np.int64)
        for b in range(len(cq) - 1):
            yield b, (slice(cq[b], cq[b + 1]),), (slice(ck[b], ck[b + 1]),)


def _probs(qs, ks, scale, softcap, allowed, bias=None):
    """Scores -> (p, lse, tanh term) for one sequence. qs (Sq,Hq,D), ks (Sk,Hq,D) expanded.
    bias: the ALiBi term (Hq, Sq, Sk), added after softcap, or None."""
    s = scale * np.einsum("qhd,khd->hqk", qs, ks)
    t = None
    if softcap:
        t = np.tanh(s / softcap)
        s = softcap * t
    if bias is not None:
        s = s + bias
    s = np.where(allowed if allowed.ndim == 3 else allowed[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m_safe)
    denom = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(denom > 0, np.log(denom) + m_safe, -np.inf)
        p = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)
    return p, lse[..., 0], t


def _alibi(slopes, b, hq, sq, sk):
    """ALiBi term -slope_h * |i + Sk - Sq - j|, (Hq, Sq, Sk) for sequence b; None without slopes.
    slopes: (Hq,) or (B, Hq), any array kind."""
    if slopes is None:
        return None
    sl = _host(slopes).astype(np.float64)
    sl = sl[b] if sl.ndim == 2 else sl
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return -sl.reshape(hq, 1, 1) * np.abs(i + (sk - sq) - j)[None]


def _mask_of(block_mask, b, hq, sq, sk):
    """The element mask (Hq or 1, Sq, Sk) of batch entry b from a flashmux BlockMask or a
    mask_fn(b, h, q_idx, kv_idx) evaluated on NumPy index arrays; True without one."""
    if block_mask is None:
        return np.ones((1, sq, sk), dtype=bool)
    if callable(block_mask) and not hasattr(block_mask, "to_dense"):
        h = np.arange(hq).reshape(-1, 1, 1)
        i = np.arange(sq).reshape(1, -1, 1)
        j = np.arange(sk).reshape(1, 1, -1)
        got = np.asarray(block_mask(np.full((1, 1, 1), b), h, i, j), dtype=bool)
        return np.broadcast_to(got, (hq, sq, sk))
    dense = _host(block_mask.to_dense())  # (Bm, Hm, Sq, Sk)
    return dense[b if dense.shape[0] > 1 else 0]


def _host(x):
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _expand(x, hq):
    """Repeat KV heads for GQA/MQA (reference only: kernels never do this)."""
    return np.repeat(x, hq // x.shape[1], axis=1)


def _drop(p, keep_mask, b, dropout_p):
    if not dropout_p:
        return p
    hq, sq, sk = p.shape
    keep = np.asarray(keep_mask)[b, :hq, :sq, :sk]
    return p * keep / (1.0 - dropout_p)


def reference_forward(
    q,
    k,
    v,
    *,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    dropout_p=0.0,
    keep_mask=None,
    alibi_slopes=None,
    block_mask=None,
):
    """(out, lse) in float64. lse is (B, Hq, Sq), or (Hq, Tq) when cu_seqlens are given."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    hq, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    lse_rows = np.full(q.shape[:-1], -np.inf)  # (B, Sq, Hq) or (Tq, Hq)
    for b, qi, ki in _sequences(q, cu_seqlens_q, cu_seqlens_k, k):
        qs, ks, vs = q[qi], _expand(k[ki], hq), _expand(v[ki], hq)
        allowed = allowed_mask(qs.shape[0], ks.shape[0], causal, window)
        allowed = allowed & _mask_of(block_mask, b, hq, qs.shape[0], ks.shape[0])
        bias = _alibi(alibi_slopes, b, hq, qs.shape[0], ks.shape[0])
        p, lse, _ = _probs(qs, ks, scale, softcap, allowed, bias)
        pd = _drop(p, keep_mask, b, dropout_p)
        out[qi] = np.einsum("hqk,khd->qhd", pd, vs)
        lse_rows[qi] = lse.T
    lse = np.moveaxis(lse_rows, -1, -2)  # (B, Hq, Sq) or (Hq, Tq)
    return out, lse


def reference_backward(
    do,
    q,
    k,
    v,
    *,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    dropout_p=0.0,
    keep_mask=None,
    dlse=None,
    alibi_slopes=None,
    block_mask=None,
):
    """(dq, dk, dv) in float64 for the cotangent `do` of out (and `dlse` of lse, optional)."""
    q, k, v, do = (np.asarray(x, dtype=np.float64) for x in (q, k, v, do))
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dlse_rows = None if dlse is None else np.moveaxis(np.asarray(dlse, np.float64), -2, -1)
    for b, qi, ki in _sequences(q, cu_seqlens_q, cu_seqlens_k, k):
        qs, ks, vs, dos = q[qi], _expand(k[ki], hq), _expand(v[ki], hq), do[qi]
        allowed = allowed_mask(qs.shape[0], ks.shape[0], causal, window)
        allowed = allowed & _mask_of(block_mask, b, hq, qs.shape[0], ks.shape[0])
        bias = _alibi(alibi_slopes, b, hq, qs.shape[0], ks.shape[0])
        p, _, t = _probs(qs, ks, scale, softcap, allowed, bias)
        pd = _drop(p, keep_mask, b, dropout_p)
        dv_h = np.einsum("hqk,qhd->khd", pd, dos)
        dpd = np.einsum("qhd,khd->hqk", dos, vs)
        dp = _drop(dpd, keep_mask, b, dropout_p)  # same scaling applies to the cotangent
        delta = (p * dp).sum(-1, keepdims=True)
        ds = p * (dp - delta)
        if dlse_rows is not None:
            ds = ds + p * dlse_rows[qi].T[..., None]
        if softcap:
            ds = ds * (1.0 - t**2)
        dq[qi] = scale * np.einsum("hqk,khd->qhd", ds, ks)
        dk_h = scale * np.einsum("hqk,qhd->khd", ds, qs)
        sk = ks.shape[0]
        dk[ki] = dk_h.reshape(sk, hkv, g, d).sum(2)
        dv[ki] = dv_h.reshape(sk, hkv, g, v.shape[-1]).sum(2)
    return dq, dk, dv


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    *,
    cache_seqlens,
    k=None,
    v=None,
    block_table=None,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    alibi_slopes=None,
):
    """`flashmux.attention_with_kvcache` in float64: (out, lse, k_cache, v_cache).

    The caches come back as updated float64 copies (the inputs are not modified). Each
    sequence's keys are gathered (its cache_seqlens[b] cached tokens, then the Snew new ones)
    and go through the steps of `reference_forward`, bottom-right aligned. No clamping: the
    caller's lengths and block table must fit the cache (asserted).
    """
    q = np.asarray(q, dtype=np.float64)
    kc = np.array(k_cache, dtype=np.float64)
    vc = np.array(v_cache, dtype=np.float64)
    lens = np.asarray(cache_seqlens, dtype=np.int64).reshape(-1)
    b_, sq, hq, d = q.shape
    snew = 0 if k is None else np.asarray(k).shape[1]
    paged = block_table is not None
    table = None if not paged else np.asarray(block_table, dtype=np.int64)
    page = kc.shape[1] if paged else 0

    def slots(b, pos):  # (index tuple into the cache) for positions pos of sequence b
        pos = np.asarray(pos, dtype=np.int64)
        if paged:
            return table[b, pos // page], pos % page
        return np.full_like(pos, b), pos

    if snew:
        kn, vn = np.asarray(k, np.float64), np.asarray(v, np.float64)
        for b in range(b_):
            idx = slots(b, lens[b] + np.arange(snew))
            kc[idx], vc[idx] = kn[b], vn[b]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros((b_, sq, hq, vc.shape[-1]))
    lse = np.full((b_, hq, sq), -np.inf)
    slopes = None
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, np.float64), (b_, hq))
    for b in range(b_):
        n = int(lens[b]) + snew
        cap = table.shape[1] * page if paged else kc.shape[1]
        assert 0 <= n <= cap, f"sequence {b}: {n} tokens do not fit the cache ({cap})"
        idx = slots(b, np.arange(n))
        ks, vs = kc[idx], vc[idx]  # (n, Hkv, D)
        # the steps of reference_forward, with the ALiBi bias after scale and softcap
        s = scale * np.einsum("qhd,khd->hqk", q[b], _expand(ks, hq))
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if slopes is not None:
            dist = np.abs(np.arange(sq)[:, None] + (n - sq) - np.arange(n)[None, :])
            s = s - slopes[b][:, None, None] * dist[None]
        s = np.where(allowed_mask(sq, n, causal, window)[None], s, -np.inf)
        m = s.max(-1, keepdims=True) if n else np.full((hq, sq, 1), -np.inf)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(s - m)
        den = e.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[b] = np.where(den > 0, np.log(den) + m, -np.inf)[..., 0]
            p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
        out[b] = np.einsum("hqk,khd->qhd", p, _expand(vs, hq))
    return out, lse, kc, vc
