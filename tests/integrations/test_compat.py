"""flashmux.compat against the frameworks' own functions on the same inputs: torch SDPA,
jax.nn.dot_product_attention; FlashAttention-style calls (flash_attn is not installed on CPU)
against the float64 reference with FlashAttention's conventions spelled out."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import tf32

from flashmux.reference import reference_forward

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux.compat import flash_attn as fa  # noqa: E402
from flashmux.compat import jax as cjax  # noqa: E402
from flashmux.compat import torch as ctorch  # noqa: E402

F = torch.nn.functional
TOL = 2e-5
TF32_TOL = 5e-3


def _t(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _close(a, b, tol=TOL):
    if tf32(a, b):
        tol = max(tol, TF32_TOL)
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, float(b.abs().max())))


# -- flash_attn -----------------------------------------------------------------------------


@pytest.mark.parametrize("window_size,causal,softcap", [
    ((-1, -1), False, 0.0), ((-1, -1), True, 0.0), ((3, -1), True, 0.0), ((2, 1), False, 2.0),
    ((-1, 2), True, 1.5),
])
def test_flash_attn_func(window_size, causal, softcap):
    q, k, v = _t(2, 7, 4, 8, seed=1), _t(2, 9, 2, 8, seed=2), _t(2, 9, 2, 8, seed=3)
    got = fa.flash_attn_func(q, k, v, softmax_scale=0.4, causal=causal, window_size=window_size,
                             softcap=softcap)
    win = tuple(None if w == -1 else w for w in window_size)
    want, _ = reference_forward(q.numpy(), k.numpy(), v.numpy(), causal=causal, scale=0.4,
                                window=None if win == (None, None) else win,
                                softcap=softcap or None)
    _close(got, want)


def test_flash_attn_packed_and_varlen_forms():
    qkv = _t(2, 6, 3, 4, 8, seed=4)
    want, _ = reference_forward(*(qkv[:, :, i].numpy() for i in range(3)), causal=True)
    _close(fa.flash_attn_qkvpacked_func(qkv, causal=True), want)
    q, kv = _t(2, 6, 4, 8, seed=5), _t(2, 6, 2, 2, 8, seed=6)
    want, _ = reference_forward(q.numpy(), kv[:, :, 0].numpy(), kv[:, :, 1].numpy())
    _close(fa.flash_attn_kvpacked_func(q, kv), want)

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qkv = _t(8, 3, 4, 8, seed=7)
    q, k, v = (qkv[:, i].numpy() for i in range(3))
    want, _ = reference_forward(q, k, v, causal=True, cu_seqlens_q=cu.numpy(),
                                cu_seqlens_k=cu.numpy())
    _close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True), want)
    _close(fa.flash_attn_varlen_func(*(qkv[:, i] for i in range(3)), cu, cu, 5, 5, causal=True),
           want)
    kv = qkv[:, 1:]
    _close(fa.flash_attn_varlen_kvpacked_func(qkv[:, 0], kv, cu, cu, 5, 5, causal=True), want)


def test_flash_attn_on_jax_and_gradients():
    q, k, v = (_t(1, 5, 2, 8, seed=s) for s in (8, 9, 10))
    want, _ = reference_forward(q.numpy(), k.numpy(), v.numpy(), causal=True)
    _close(fa.flash_attn_func(jnp.asarray(q.numpy()), jnp.asarray(k.numpy()),
                              jnp.asarray(v.numpy()), causal=True), want)
    qg = q.clone().requires_grad_()
    fa.flash_attn_func(qg, k, v, causal=True).sum().backward()
    qr = q.clone().requires_grad_()
    F.scaled_dot_product_attention(qr.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   is_causal=True).sum().backward()
    _close(qg.grad, qr.grad)


def test_flash_attn_alibi_passes_through():
    q, k, v = (_t(2, 5, 2, 8, seed=s) for s in (11, 12, 13))
    slopes = torch.tensor([0.5, 0.25])
    got = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    want, _ = reference_forward(q.numpy(), k.numpy(), v.numpy(), causal=True,
                                alibi_slopes=slopes.numpy())
    _close(got, want)


def test_flash_attn_refusals():
    q = _t(1, 4, 2, 8)
    with pytest.raises(ValueError, match="return_attn_probs"):
        fa.flash_attn_func(q, q, q, return_attn_probs=True)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        fa.flash_attn_func(q, q, q, softcap=-1.0)
    with pytest.raises(ValueError, match="block_table"):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 4], dtype=torch.int32),
                                  torch.tensor([0, 4], dtype=torch.int32), 4, 4,
                                  block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="rotary_cos"):
        fa.flash_attn_with_kvcache(q, q, q, rotary_cos=q)


def test_flash_attn_with_kvcache_appends_in_place():
    b, smax, h, d = 2, 8, 2, 8
    kc, vc = torch.zeros(b, smax, h, d), torch.zeros(b, smax, h, d)
    prefix_k, prefix_v = _t(b, 3, h, d, seed=14), _t(b, 3, h, d, seed=15)
    kc[:, :3], vc[:, :3] = prefix_k, prefix_v
    q, kn, vn = _t(b, 1, 4, d, seed=16), _t(b, 1, h, d, seed=17), _t(b, 1, h, d, seed=18)
    seqlens = torch.tensor([3, 2], dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True,
                                          return_softmax_lse=True)
    assert torch.equal(kc[0, 3], kn[0, 0]) and torch.equal(kc[1, 2], kn[1, 0])
    for i, n in enumerate((4, 3)):
        want, want_lse = reference_forward(q[i:i + 1].numpy(), kc[i:i + 1, :n].numpy(),
                                           vc[i:i + 1, :n].numpy(), causal=True)
        _close(out[i:i + 1], want)
        _close(lse[i:i + 1], want_lse)


# -- torch SDPA -------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk", [(6, 6), (9, 5), (4, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(sq, sk, causal):
    q, k, v = _t(2, 4, sq, 8, seed=20), _t(2, 2, sk, 8, seed=21), _t(2, 2, sk, 8, seed=22)
    got = ctorch.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3,
                                              enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    assert got.shape == want.shape
    _close(got, want)


def test_sdpa_gradients_and_bool_mask():
    q, k, v = (_t(1, 2, 6, 8, seed=s) for s in (23, 24, 25))
    grads = []
    for fn in (ctorch.scaled_dot_product_attention, F.scaled_dot_product_attention):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(*xs, is_causal=True) ** 2).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        _close(a, b)
    mask = torch.rand(1, 2, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., 0] = True  # every row sees a key (torch's own rows with none are NaN)
    _close(ctorch.scaled_dot_product_attention(q, k, v, attn_mask=mask),
           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    m2 = mask[0, 0]  # (L, S), broadcast over batch and heads; unbatched (H, S, D) inputs
    _close(ctorch.scaled_dot_product_attention(q[0], k[0], v[0], attn_mask=m2),
           F.scaled_dot_product_attention(q[0], k[0], v[0], attn_mask=m2))


def test_sdpa_refusals():
    q, k = _t(1, 4, 5, 8), _t(1, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        ctorch.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="additive"):
        ctorch.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="is_causal"):
        ctorch.scaled_dot_product_attention(q, q, q, is_causal=True,
                                            attn_mask=torch.ones(5, 5, dtype=torch.bool))


# -- jax.nn.dot_product_attention ---------------------------------------------------------------


def _j(*shape, seed=0):
    return jnp.asarray(_t(*shape, seed=seed).numpy())


@pytest.mark.parametrize("sq,sk", [(6, 6), (7, 5), (4, 7)])  # every row sees a key
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (2, 1)),
                                           (True, 2)])
def test_jax_matches_jax_nn(sq, sk, causal, window):
    q, k, v = _j(2, sq, 4, 8, seed=30), _j(2, sk, 2, 8, seed=31), _j(2, sk, 2, 8, seed=32)
    kw = dict(is_causal=causal, local_window_size=window, scale=0.35)
    _close(cjax.dot_product_attention(q, k, v, **kw), jax.nn.dot_product_attention(q, k, v, **kw))


def test_jax_seq_lengths_under_jit_and_grad():
    q, k, v = (_j(3, 7, 2, 8, seed=s) for s in (33, 34, 35))
    lens = jnp.array([7, 4, 1], dtype=jnp.int32)
    for kw in (dict(is_causal=True), dict(local_window_size=(2, 0)), {}):
        def loss(fn, q, k, v, lens):
            out = fn(q, k, v, query_seq_lengths=lens, key_value_seq_lengths=lens, **kw)
            return (out ** 2).sum(), out

        grad_mine = jax.jit(jax.grad(lambda *a: loss(cjax.dot_product_attention, *a),
                                     argnums=(0, 1, 2), has_aux=True))
        grad_jax = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a),
                            argnums=(0, 1, 2), has_aux=True)
        (gm, om), (gj, oj) = grad_mine(q, k, v, lens), grad_jax(q, k, v, lens)
        _close(om, oj)
        for a, b in zip(gm, gj):
            _close(a, b)
    # key lengths alone, no causal mask: padded keys are cut, every query row kept
    kl = jnp.array([2, 7, 5], dtype=jnp.int32)
    _close(jax.jit(cjax.dot_product_attention)(q, k, v, key_value_seq_lengths=kl),
           jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kl))


def test_jax_residual_mask_and_unbatched():
    q, k, v = (_j(2, 5, 2, 8, seed=s) for s in (36, 37, 38))
    out, lse = cjax.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    want, want_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    _close(out, want)
    _close(lse, want_lse, tol=1e-2)  # jax returns it in key's dtype
    mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 5, 5)) > 0.3)
    mask = mask.at[..., 0].set(True)
    _close(cjax.dot_product_attention(q, k, v, mask=mask),
           jax.nn.dot_product_attention(q, k, v, mask=mask))
    _close(cjax.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="xla"),
           jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True))
    _close(cjax.dot_product_attention(q, k, v, implementation="reference"),
           jax.nn.dot_product_attention(q, k, v))


def test_jax_refusals():
    q = _j(2, 5, 2, 8)
    with pytest.raises(ValueError, match="bias"):
        cjax.dot_product_attention(q, q, q, bias=jnp.zeros((1, 1, 5, 5)))
    a, b = jnp.array([5, 3], jnp.int32), jnp.array([4, 3], jnp.int32)
    with pytest.raises(ValueError, match="equal lengths"):
        cjax.dot_product_attention(q, q, q, is_causal=True, query_seq_lengths=a,
                                   key_value_seq_lengths=b)
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
        cjax.dot_product_attention(q, q, q, is_causal=True, key_value_seq_lengths=b)
