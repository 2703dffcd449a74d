"""Behaviour of flashmux.attention across frameworks: results, gradients, transformations,
empty inputs, dropout determinism, crossing frameworks."""

import numpy as np
import pytest
from corearrays import ints, make

import flashmux
from flashmux.reference import reference_forward


def test_numpy_result_kind_dtype(kind):
    q, k, v = (make(kind, s) for s in ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 6)))
    out, lse = flashmux.attention(q, k, v, return_lse=True)
    assert tuple(out.shape) == (2, 5, 4, 6) and tuple(lse.shape) == (2, 4, 5)
    assert type(out).__module__.split(".")[0] == type(q).__module__.split(".")[0]
    assert "float32" in str(out.dtype) and "float32" in str(lse.dtype)


@pytest.mark.parametrize(
    "shapes,cu",
    [
        (((0, 5, 2, 8), (0, 7, 2, 8), (0, 7, 2, 8)), None),  # B = 0
        (((2, 0, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)), None),  # Sq = 0
        (((2, 5, 2, 8), (2, 0, 2, 8), (2, 0, 2, 8)), None),  # Sk = 0
        (((0, 2, 8), (4, 2, 8), (4, 2, 8)), ([0, 0, 0], [0, 1, 4])),  # Tq = 0
        (((3, 2, 8), (0, 2, 8), (0, 2, 8)), ([0, 1, 3], [0, 0, 0])),  # Tk = 0
    ],
)
def test_empty_inputs(kind, shapes, cu):
    q, k, v = (make(kind, s) for s in shapes)
    kw = {}
    if cu:
        kw = dict(cu_seqlens_q=ints(kind, cu[0]), cu_seqlens_k=ints(kind, cu[1]))
    out, lse = flashmux.attention(q, k, v, return_lse=True, **kw)
    out, lse = np.asarray(out), np.asarray(lse)
    assert out.shape == tuple(shapes[0][:-1]) + (8,)
    assert np.all(out == 0)
    assert np.all(np.isneginf(lse))


def test_empty_sk_gradients_are_zero():
    torch = pytest.importorskip("torch")
    q = torch.randn(2, 5, 2, 8, requires_grad=True)
    k = torch.randn(2, 0, 2, 8, requires_grad=True)
    v = torch.randn(2, 0, 2, 8, requires_grad=True)
    flashmux.attention(q, k, v).sum().backward()
    assert torch.all(q.grad == 0)


def test_torch_compile_fullgraph():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 33, 4, 16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return flashmux.attention(q, k, v, causal=True, window=(8, None), softcap=5.0)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    (gq,) = torch.autograd.grad(compiled.sum(), q)
    (eq,) = torch.autograd.grad(eager.sum(), q)
    torch.testing.assert_close(gq, eq)


def test_jax_jit_grad_vmap():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng()
    qn, kn, vn = (rng.standard_normal((2, 9, 2, 8)) for _ in range(3))
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (qn, kn, vn))

    def loss(q, k, v):
        return flashmux.attention(q, k, v, causal=True).sum()

    g_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    g_eager = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_jit, g_eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    vm = jax.vmap(lambda q, k, v: flashmux.attention(q, k, v, causal=True))(q[:, None], k[:, None], v[:, None])
    ref, _ = reference_forward(qn, kn, vn, causal=True)
    np.testing.assert_allclose(np.asarray(vm)[:, 0], ref, atol=1e-5)


def test_jax_jit_varlen_traced_offsets():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng()
    qn, kn, vn = (rng.standard_normal((9, 2, 8)) for _ in range(3))
    cu = np.array([0, 4, 4, 9], np.int32)
    f = jax.jit(lambda q, k, v, c: flashmux.attention(q, k, v, cu_seqlens_q=c, cu_seqlens_k=c, causal=True))
    out = f(*(jnp.asarray(x, jnp.float32) for x in (qn, kn, vn)), jnp.asarray(cu))
    ref, _ = reference_forward(qn, kn, vn, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_dropout_seed_reproducible(kind):
    q, k, v = (make(kind, (1, 17, 2, 8)) for _ in range(3))
    a = np.asarray(flashmux.attention(q, k, v, dropout_p=0.3, dropout_seed=7))
    b = np.asarray(flashmux.attention(q, k, v, dropout_p=0.3, dropout_seed=7))
    c = np.asarray(flashmux.attention(q, k, v, dropout_p=0.3, dropout_seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_torch_dropout_seed_from_generator():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 17, 2, 8) for _ in range(3))
    torch.manual_seed(3)
    a = flashmux.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = flashmux.attention(q, k, v, dropout_p=0.3)
    c = flashmux.attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_keep_mask_hook_matches_forward(kind):
    from flashmux import dispatch

    be = dispatch.get_backend("reference")
    q, k, v = (make(kind, (2, 13, 2, 8)) for _ in range(3))
    out = flashmux.attention(q, k, v, dropout_p=0.4, dropout_seed=11, backend="reference")
    keep = np.asarray(be.dropout_keep_mask(11, 0.4, 2, 2, 13, 13, q))
    ref, _ = reference_forward(*(np.asarray(x, np.float64) for x in (q, k, v)), dropout_p=0.4, keep_mask=keep)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert abs(keep.mean() - 0.6) < 4 * np.sqrt(0.24 / keep.size)


def test_deterministic_flag_reaches_backend():
    q, k, v = (make("numpy", (1, 9, 2, 8)) for _ in range(3))
    ex = flashmux.explain(q, k, v, deterministic=True)
    assert ex.spec.deterministic


def test_torch_compile_as_the_first_call():
    """A fresh process whose first flashmux call is compiled with fullgraph=True."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    code = (
        "import torch, flashmux\n"
        "q, k, v = (torch.randn(1, 17, 2, 8, requires_grad=True) for _ in range(3))\n"
        "f = torch.compile(lambda q, k, v: flashmux.attention(q, k, v, causal=True), fullgraph=True)\n"
        "out = f(q, k, v); out.sum().backward()\n"
        "torch.testing.assert_close(out, flashmux.attention(q, k, v, causal=True))\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
