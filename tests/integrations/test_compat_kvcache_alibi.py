"""compat.flash_attn's KV-cache and ALiBi conventions against the float64 reference (flash_attn
itself is not installed on the CPU): flash_attn_with_kvcache with a paged cache (block_table),
appending in place, with ALiBi, a window and softcap; JAX arrays without appending; ALiBi with
per-sequence slopes in flash_attn_varlen_func; FlashAttention's window_size=(-1, -1) and
softcap=0.0 meaning 'none'."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import tf32

from flashmux.reference import reference_forward

torch = pytest.importorskip("torch")

from flashmux.compat import flash_attn as fa  # noqa: E402

TOL = 2e-5


def _t(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _close(got, want, tol=TOL):
    got = np.asarray(got.detach() if hasattr(got, "detach") else got, np.float64)
    want = np.asarray(want, np.float64)
    if tf32(got, want):
        tol = max(tol, 5e-3)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


def test_paged_cache_append_alibi_window_softcap():
    b, hq, hkv, d, page, pages = 2, 4, 2, 8, 8, 6
    kc, vc = _t(pages, page, hkv, d, seed=1), _t(pages, page, hkv, d, seed=2)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)  # pages out of order
    seqlens = torch.tensor([11, 6], dtype=torch.int32)  # tokens cached before the append
    q, kn, vn = _t(b, 2, hq, d, seed=3), _t(b, 2, hkv, d, seed=4), _t(b, 2, hkv, d, seed=5)
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.05]])
    kw = dict(causal=True, window_size=(5, -1), softcap=2.0, softmax_scale=0.4,
              alibi_slopes=slopes)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens,
                                          block_table=table, return_softmax_lse=True, **kw)
    for i in range(b):
        n = int(seqlens[i]) + 2
        rows = [(int(table[i, t // page]), t % page) for t in range(n)]
        keys = torch.stack([kc[p, s] for p, s in rows])[None]
        vals = torch.stack([vc[p, s] for p, s in rows])[None]
        assert torch.equal(keys[0, -2:], kn[i]) and torch.equal(vals[0, -2:], vn[i])  # appended
        want, want_lse = reference_forward(q[i:i + 1].numpy(), keys.numpy(), vals.numpy(),
                                           causal=True, window=(5, None), softcap=2.0, scale=0.4,
                                           alibi_slopes=slopes[i].numpy())
        _close(out[i:i + 1], want)
        _close(lse[i:i + 1], want_lse)


def test_jax_kvcache_without_append_and_defaults():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 1, 4, 8), dtype=np.float32)
    kc = rng.standard_normal((2, 10, 1, 8), dtype=np.float32)
    vc = rng.standard_normal((2, 10, 1, 8), dtype=np.float32)
    seqlens = np.array([10, 3], np.int32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    out = fa.flash_attn_with_kvcache(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc),
                                     cache_seqlens=jnp.asarray(seqlens), causal=True,
                                     window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=jnp.asarray(slopes))
    for i, n in enumerate(seqlens):
        want, _ = reference_forward(q[i:i + 1], kc[i:i + 1, :n], vc[i:i + 1, :n], causal=True,
                                    alibi_slopes=slopes)
        _close(np.asarray(out[i:i + 1]), want)
    with pytest.raises(TypeError, match="appending to the cache in place needs torch"):
        fa.flash_attn_with_kvcache(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc),
                                   jnp.asarray(kc[:, :1]), jnp.asarray(vc[:, :1]),
                                   cache_seqlens=jnp.asarray(seqlens))


def test_varlen_alibi_per_sequence_slopes():
    cu_q = torch.tensor([0, 3, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    q, k, v = _t(9, 2, 8, seed=7), _t(11, 2, 8, seed=8), _t(11, 2, 8, seed=9)
    slopes = torch.tensor([[0.5, 0.25], [0.7, 0.1]])
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, causal=True, alibi_slopes=slopes)
    want, _ = reference_forward(q.numpy(), k.numpy(), v.numpy(), causal=True,
                                cu_seqlens_q=cu_q.numpy(), cu_seqlens_k=cu_k.numpy(),
                                alibi_slopes=slopes.numpy())
    _close(out, want)
