"""Attention dropout through flashmux's Flax attention_fn: the seed comes from Flax's RNG stream
(dropout_rng) as a traced int32, so under nnx.jit and grad a new key compiles nothing, the same
key gives the same output, deterministic=True turns dropout off, and the output's mean over
many keys is the dropout-free output (inverted dropout keeps the expectation)."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import tf32

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
jnp = jax.numpy
from flax import linen, nnx  # noqa: E402

from flashmux.integrations import flax as fmx_flax  # noqa: E402

B, S, E, H = 2, 8, 32, 4
RATE = 0.5


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, S, E), jnp.float32)


def _mha(attention_fn, rate=RATE):
    return nnx.MultiHeadAttention(num_heads=H, in_features=E, attention_fn=attention_fn,
                                  dropout_rate=rate, decode=False, rngs=nnx.Rngs(0))


def _close(a, b, tol=2e-5):
    if tf32(a, b):
        tol = max(tol, 5e-3)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


def test_nnx_dropout_from_rngs_under_jit_and_grad():
    mha = _mha(fmx_flax.attention_fn)
    x = _x()
    traces = []

    @nnx.jit
    def loss_and_grad(m, x, rngs):
        def loss(m, rngs):
            traces.append(1)
            return jnp.sum(jnp.square(m(x, is_causal=True, deterministic=False, rngs=rngs)))

        return nnx.value_and_grad(loss)(m, rngs)

    l1, g1 = loss_and_grad(mha, x, nnx.Rngs(dropout=1))
    l1b, g1b = loss_and_grad(mha, x, nnx.Rngs(dropout=1))
    l2, _ = loss_and_grad(mha, x, nnx.Rngs(dropout=2))
    assert len(traces) == 1, f"traced {len(traces)} times for three dropout keys"
    assert float(l1) == float(l1b) and float(l1) != float(l2)
    leaves = jax.tree.leaves(g1)
    assert leaves and all(np.isfinite(np.asarray(t)).all() for t in leaves)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(leaves, jax.tree.leaves(g1b)))
    # deterministic: no dropout, and the same as Flax's own attention on the same parameters
    ref = _mha(nnx.dot_product_attention)
    _close(mha(x, is_causal=True, deterministic=True), ref(x, is_causal=True, deterministic=True))
    dropped = mha(x, is_causal=True, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(np.asarray(dropped), np.asarray(ref(x, is_causal=True, deterministic=True)))


def test_linen_dropout_rng_stream():
    x = _x(1)
    kw = dict(num_heads=H, qkv_features=E, dropout_rate=RATE)
    mod = linen.MultiHeadDotProductAttention(**kw, attention_fn=fmx_flax.make_attention_fn(causal=True))
    params = mod.init(jax.random.key(0), x, deterministic=True)
    apply = jax.jit(lambda p, x, key: mod.apply(p, x, deterministic=False, rngs={"dropout": key}))
    a = apply(params, x, jax.random.key(1))
    b = apply(params, x, jax.random.key(1))
    c = apply(params, x, jax.random.key(2))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    off = mod.apply(params, x, deterministic=True)
    assert np.isfinite(np.asarray(off)).all() and not np.allclose(np.asarray(a), np.asarray(off))


def test_dropout_keeps_the_mean():
    """Average of the attention_fn output over N dropout keys vs the dropout-free output: within
    5 standard errors per element (the per-element spread is measured from the same draws)."""
    n = 256
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 12, 2, 8), jnp.float32) for i in range(3))
    keys = jax.random.split(jax.random.key(7), n)

    @jax.jit
    def draws(keys):
        return jax.lax.map(lambda kk: fmx_flax.attention_fn(
            q, k, v, dropout_rng=kk, dropout_rate=RATE, deterministic=False), keys)

    outs = np.asarray(draws(keys), np.float64)
    ref = np.asarray(fmx_flax.attention_fn(q, k, v, deterministic=True), np.float64)
    mean, se = outs.mean(0), outs.std(0) / np.sqrt(n)
    assert (se > 0).all()  # dropout happened
    assert (np.abs(mean - ref) <= 5 * se + 1e-6).mean() > 0.99, np.abs(mean - ref).max()
    assert np.abs(mean - ref).max() <= 8 * se.max()
