"""The out_residual contract: a backend that offers it gets asked for it exactly when a gradient
will be needed, and its backward receives the very residual its forward returned (torch eager,
torch.compile, JAX jit/grad). Backends without it keep the two-value forward."""

import numpy as np
import pytest

import flashmux
from flashmux.backend import Backend, Capabilities
from flashmux.builtin import reference as ref


class Residual(Backend):
    """The reference's numbers; records what the core asked for and what reached backward."""

    log: list

    def forward(self, q, k, v, cu_q, cu_k, params, residual=False):
        out, lse = ref.forward(q, k, v, cu_q, cu_k, params)
        self.log.append(("forward", residual))
        if not residual:
            return out, lse
        return out, lse, out * 0 + 0.25  # a recognisable residual of out's shape and dtype

    def backward(self, do, dlse, q, k, v, out, lse, cu_q, cu_k, params, out_residual=None):
        dq, dk, dv = ref.backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, params)
        if out_residual is None:
            self.log.append(("backward", None))
            return dq, dk, dv
        if hasattr(out_residual, "detach"):
            self.log.append(("backward", float(out_residual.float().mean())))
            return dq, dk, dv
        # JAX (traced under jit): let the residual's value show in dq instead
        self.log.append(("backward", "traced"))
        return dq + out_residual.mean(), dk, dv


@pytest.fixture
def resid(isolated_registry):
    be = Residual(name="resid", capabilities=Capabilities(
        array_kinds=frozenset({"torch", "jax"}), devices=frozenset({"cpu"}),
        dtypes=frozenset({"float16", "bfloat16", "float32"}), runs_under_jit=True,
        out_residual=True, priority=1))
    be.log = []
    flashmux.register(be)
    return be


def test_torch_eager(resid):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        flashmux.attention(q, k, v, backend="resid")
    assert resid.log == [("forward", False)]
    resid.log.clear()
    out = flashmux.attention(q, k, v, causal=True, backend="resid")
    out.sum().backward()
    assert resid.log == [("forward", True), ("backward", 0.25)]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    g = torch.autograd.grad(flashmux.attention(qd, kd, vd, causal=True, backend="reference").sum(),
                            (qd, kd, vd))
    torch.testing.assert_close(q.grad.double(), g[0], atol=1e-5, rtol=1e-5)


def test_torch_compile(resid):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: flashmux.attention(q, k, v, backend="resid"),
                      fullgraph=True, backend="aot_eager")
    f(q, k, v).sum().backward()
    assert ("forward", True) in resid.log and ("backward", 0.25) in resid.log
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_jax_jit_grad(resid):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    q, k, v = (jax.random.normal(kk, (1, 7, 2, 16)) for kk in jax.random.split(key, 3))
    loss = jax.jit(jax.grad(lambda q: jnp.sum(flashmux.attention(q, k, v, backend="resid"))))
    dq = loss(q)
    assert resid.log == [("forward", True), ("backward", "traced")]
    want = jax.grad(lambda q: jnp.sum(flashmux.attention(q, k, v, backend="reference")))(q)
    np.testing.assert_allclose(np.asarray(dq) - 0.25, np.asarray(want), atol=1e-5, rtol=1e-5)
    resid.log.clear()
    jax.jit(lambda q: flashmux.attention(q, k, v, backend="resid"))(q).block_until_ready()
    assert resid.log == [("forward", False)]
