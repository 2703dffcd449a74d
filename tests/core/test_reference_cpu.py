"""The reference backend's threaded float32 NumPy path (builtin/reference_cpu.py, issue 14).

Small shapes with the serial threshold set to 0, so that the worker threads, the key blocks
(also shrunk) and the row-split dK/dV parts all run: forward and backward judged against the
float64 reference by the conformance rule (the conformance suite judges NumPy forwards only),
inputs never written, and what falls back to the generic path.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmux import reference as R
from flashmux.builtin import reference
from flashmux.builtin import reference_cpu as C
from flashmux.spec import Params


@pytest.fixture
def threaded(monkeypatch):
    monkeypatch.setattr(C, "SERIAL_BELOW", 0)
    monkeypatch.setattr(C, "INLINE_BELOW", 0)
    monkeypatch.setattr(C, "ROWS", 32)  # several row blocks per head
    monkeypatch.setattr(C, "KEYS", 48)  # several key blocks (online softmax rescaling)
    monkeypatch.setattr(C, "BWD_KEYS", 40)
    monkeypatch.setenv("FLASHMUX_CPU_THREADS", "2")


# (B, Sq, Sk, Hq, Hkv, D, Dv, causal, window)
CASES = [
    (2, 70, 90, 4, 2, 32, 32, True, None),
    # Sq > Sk causal: rows that see no key (lse -inf, zero output and gradients); MQA: one KV
    # head, so the backward splits each head's rows into parts with their own dK/dV
    (1, 100, 61, 3, 1, 16, 24, True, None),
    (1, 80, 130, 2, 2, 32, 32, False, (20, 5)),
    (1, 64, 64, 2, 1, 16, 16, False, None),
]


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    assert np.array_equal(np.isfinite(a), fin)
    return float(np.abs(np.where(fin, a, 0) - np.where(fin, b, 0)).max())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_threaded_path_judged(threaded, case):
    """Forward (out, lse) and backward (with an lse cotangent) through the reference backend:
    error vs float64 <= 2 x the generic float32 path's error + 1e-5 (the conformance rule, with
    the generic path as the plain attention), for fresh random inputs."""
    b, sq, sk, hq, hkv, d, dv, causal, window = case
    rng = np.random.default_rng(sq * sk)
    q = rng.standard_normal((b, sq, hq, d), dtype=np.float32)
    k = rng.standard_normal((b, sk, hkv, d), dtype=np.float32)
    v = rng.standard_normal((b, sk, hkv, dv), dtype=np.float32)
    do = rng.standard_normal((b, sq, hq, dv), dtype=np.float32)
    dlse = rng.standard_normal((b, hq, sq), dtype=np.float32)
    wl, wr = window or (None, None)
    if causal:
        wr = 0
    p = Params(scale=d ** -0.5, causal=causal, window_left=wl, window_right=wr)
    assert C.applies(q, k, v, None, p, do)
    calls = []
    monkey_fwd, monkey_bwd = C.forward, C.backward
    be = reference.backend
    try:
        C.forward = lambda *a: calls.append("f") or monkey_fwd(*a)
        C.backward = lambda *a: calls.append("b") or monkey_bwd(*a)
        out, lse = be.forward(q, k, v, None, None, p)
        grads = be.backward(do, dlse, q, k, v, out, lse, None, None, p)
    finally:
        C.forward, C.backward = monkey_fwd, monkey_bwd
    assert calls == ["f", "b"]  # this path ran, not the generic one
    out_g, lse_g = reference.forward(q, k, v, None, None, p)
    grads_g = reference.backward(do, dlse, q, k, v, out_g, lse_g, None, None, p)
    kw = dict(causal=causal, scale=p.scale, window=window)
    out64, lse64 = R.reference_forward(q, k, v, **kw)
    grads64 = R.reference_backward(do, q, k, v, dlse=dlse, **kw)
    for name, got, plain, exact in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                       (out_g, lse_g, *grads_g), (out64, lse64, *grads64)):
        assert got.dtype == np.float32 and got.shape == exact.shape, name
        bound = 2 * _err(plain, exact) + 1e-5
        assert _err(got, exact) <= bound, (name, _err(got, exact), bound)


def test_inputs_untouched_and_taken(threaded, monkeypatch):
    """One head and one batch make the heads-first copies plain views of the inputs: the path
    must still copy before scaling (it once scaled the caller's q in place)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 50, 1, 16), dtype=np.float32) for _ in range(3))
    saved = [x.copy() for x in (q, k, v)]
    p = Params(scale=0.25, causal=True, window_right=0)
    assert C.applies(q, k, v, None, p)
    out, lse = C.forward(q, k, v, p)
    lse_saved = lse.copy()
    C.backward(np.ones_like(out), None, q, k, v, out, lse, p)
    for a, b in zip((q, k, v, lse), (*saved, lse_saved)):
        assert np.array_equal(a, b)
    # a second call gives the same answer (the first bug showed only from the second call on)
    out2, _ = C.forward(q, k, v, p)
    assert np.array_equal(out, out2)


def test_what_falls_back():
    x = np.zeros((1, 4, 2, 8), np.float32)
    p = Params(scale=0.3)
    assert C.applies(x, x, x, None, p)
    assert not C.applies(x.astype(np.float16), x, x, None, p)
    assert not C.applies(x, x, x, np.array([0, 4]), p)
    assert not C.applies(x, x, x, None, Params(scale=0.3, softcap=5.0))
    assert not C.applies(x, x, x, None, Params(scale=0.3, dropout_p=0.1))
    assert not C.applies(x[:, :0], x, x, None, p)


def test_threads_env(monkeypatch):
    monkeypatch.setenv("FLASHMUX_CPU_THREADS", "0")
    with pytest.raises(ValueError, match="FLASHMUX_CPU_THREADS"):
        C.threads()
    monkeypatch.setenv("FLASHMUX_CPU_THREADS", "3")
    assert C.threads() in (1, 3)  # 1 only where the BLAS thread count cannot be set per thread


def test_jax_cpu_callback_jit_grad_vmap(threaded):
    """float32 JAX on the CPU takes the same path through jax.pure_callback: under jit, grad
    and vmap, judged against float64 like the NumPy path (the generic path's error as plain)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    import flashmux

    if jax.default_backend() != "cpu":
        pytest.skip("the callback path is for JAX on the CPU")
    rng = np.random.default_rng(7)
    b, s, h, d = 2, 75, 2, 16
    q, k, v, do = (rng.standard_normal((b, s, h, d), dtype=np.float32) for _ in range(4))
    p = Params(scale=d ** -0.5, causal=True, window_right=0)
    assert C.jax_applies(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, p)

    def loss(q, k, v):
        return (flashmux.attention(q, k, v, causal=True) * do).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*map(jnp.asarray, (q, k, v)))
    out_v = jax.vmap(lambda q, k, v: flashmux.attention(q[None], k[None], v[None], causal=True)[0])(
        *map(jnp.asarray, (q, k, v)))
    out64, _ = R.reference_forward(q, k, v, causal=True)
    grads64 = R.reference_backward(do, q, k, v, causal=True)
    out_g, lse_g = reference.forward(q, k, v, None, None, p)
    grads_g = reference.backward(do, None, q, k, v, out_g, lse_g, None, None, p)
    for got, plain, exact in zip((out_v, *grads), (out_g, *grads_g), (out64, *grads64)):
        assert _err(got, exact) <= 2 * _err(plain, exact) + 1e-5
    monkey = C.jax_forward
    try:
        C.jax_forward = None  # the path must be the one taken: a call now fails
        with pytest.raises(TypeError):
            flashmux.attention(*map(jnp.asarray, (q, k, v)), causal=True)
    finally:
        C.jax_forward = monkey
