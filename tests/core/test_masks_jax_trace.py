"""flashmux.masks.document under jax.jit then jax.grad: its id arrays must not leak tracers.

Found by the masks sweep's jax-xla anchor (dense mask built inside the jitted function): the
forward traced fine, the forward+backward of the same mask function raised
UnexpectedTracerError, because the ids converted during the first trace were cached.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux import masks as M  # noqa: E402


@pytest.mark.parametrize("two_d", [False, True])
def test_document_mask_traces_twice(two_d):
    ids = np.repeat(np.arange(4), 16)
    if two_d:
        ids = np.stack([ids, ids[::-1].copy()])
    fn = M.and_(M.causal(0), M.document(ids))
    b = jnp.zeros((1, 1), jnp.int32) if not two_d else jnp.ones((1, 1), jnp.int32)

    def f(x):
        m = fn(b, jnp.zeros((1, 1), jnp.int32), jnp.arange(64)[:, None], jnp.arange(64)[None, :])
        return jnp.where(m, x, 0.0).sum()

    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
    want = np.tril(np.ones((64, 64), bool))
    row = ids[1] if two_d else ids
    want &= row[:, None] == row[None, :]
    np.testing.assert_allclose(float(jax.jit(f)(x)), float(np.asarray(x)[want].sum()), rtol=1e-5)
    g = jax.jit(jax.grad(f))(x)  # a second trace: raised UnexpectedTracerError before the fix
    np.testing.assert_array_equal(np.asarray(g), want.astype(np.float32))
