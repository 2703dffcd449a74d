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


def _bf16(torch, *shape):
    return torch.randn(*shape).to(torch.bfloat16).requires_grad_()


def test_torch_eager(resid):
    torch = pytest.importorskip("torch")
    q, k, v = (_bf16(torch, 1, 7, 2, 16) for _ in range(3))
    with torch.no_grad():
        flashmux.attention(q, k, v, backend="resid")
    assert resid.log == [("forward", False)]
    resid.log.clear()
    out = flashmux.attention(q, k, v, causal=True, backend="resid")
    out.float().sum().backward()
    assert resid.log == [("forward", True), ("backward", 0.25)]
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = flashmux.attention(qr, kr, vr, causal=True, backend="reference")
    (g,) = torch.autograd.grad(ref.float().sum(), (qr,))
    assert torch.equal(q.grad, g)  # the same numbers: Residual runs the reference's kernels


def test_float32_asks_for_no_residual(resid):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    flashmux.attention(q, k, v, backend="resid").sum().backward()
    assert resid.log == [("forward", False), ("backward", None)]


def test_torch_compile(resid):
    torch = pytest.importorskip("torch")
    q, k, v = (_bf16(torch, 1, 7, 2, 16) for _ in range(3))
    f = torch.compile(lambda q, k, v: flashmux.attention(q, k, v, backend="resid"),
                      fullgraph=True, backend="aot_eager")
    f(q, k, v).float().sum().backward()
    assert ("forward", True) in resid.log and ("backward", 0.25) in resid.log
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_jax_jit_grad(resid):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    q, k, v = (jax.random.normal(kk, (1, 7, 2, 16)).astype(jnp.bfloat16)
               for kk in jax.random.split(key, 3))
    loss = jax.jit(jax.grad(lambda q: jnp.sum(flashmux.attention(q, k, v, backend="resid"))))
    dq = loss(q)
    assert resid.log == [("forward", True), ("backward", "traced")]
    want = jax.grad(lambda q: jnp.sum(flashmux.attention(q, k, v, backend="reference")))(q)
    # bf16 dq: the 0.25 is added before the final rounding, so compare within bf16 ulps
    shift = np.asarray(dq, np.float32) - np.asarray(want, np.float32)
    assert abs(shift.mean() - 0.25) < 2e-3
    assert (np.abs(shift - 0.25) <= 2 * 2**-8 * (1 + np.abs(np.asarray(want, np.float32)))).all()
    resid.log.clear()
    jax.jit(lambda q: flashmux.attention(q, k, v, backend="resid"))(q).block_until_ready()
    assert resid.log == [("forward", False)]
