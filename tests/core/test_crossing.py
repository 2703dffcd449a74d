"""JAX arrays reach a torch-only backend through DLPack, outside JAX transformations."""

import numpy as np
import pytest

import flashmux
from flashmux import dispatch
from flashmux.backend import Backend, Capabilities
from flashmux.reference import reference_forward

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402


class TorchOnly(Backend):
    seen = []

    def forward(self, q, k, v, cu_q, cu_k, p):
        type(self).seen.append(type(q))
        from flashmux.builtin.reference import forward

        return forward(q, k, v, cu_q, cu_k, p)


@pytest.fixture
def torch_only():
    be = TorchOnly(
        name="torchonly",
        capabilities=Capabilities(
            array_kinds=frozenset({"torch"}), devices=frozenset({"cpu"}),
            dtypes=frozenset({"float32"}), crosses_from=frozenset({"jax"}),
        ),
    )
    flashmux.register(be)
    yield be
    del dispatch.registry()["torchonly"]
    dispatch.clear_caches()


def test_jax_arrays_cross_into_torch_backend(torch_only):
    rng = np.random.default_rng()
    qn, kn, vn = (rng.standard_normal((2, 11, 2, 8)).astype(np.float32) for _ in range(3))
    cpu = jax.devices("cpu")[0]  # the fake backend runs on the CPU, also on a GPU machine
    out, lse = flashmux.attention(*(jax.device_put(x, cpu) for x in (qn, kn, vn)), causal=True,
                                  return_lse=True, backend="torchonly")
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    assert TorchOnly.seen[-1] is torch.Tensor
    ref, ref_lse = reference_forward(qn, kn, vn, causal=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-5)


def test_inside_jit_the_torch_backend_is_refused(torch_only):
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(flashmux.NoBackendError, match="inside a JAX transformation"):
        jax.jit(lambda q: flashmux.attention(q, q, q, backend="torchonly"))(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_jax_gpu_arrays_into_triton():
    if jax.default_backend() != "gpu" or dispatch.availability(dispatch.get_backend("triton")):
        pytest.skip("needs JAX on the GPU and the triton backend")
    rng = np.random.default_rng()
    qn, kn, vn = (rng.standard_normal((2, 128, 4, 64)) for _ in range(3))
    out = flashmux.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (qn, kn, vn)), causal=True,
                             backend="triton")
    assert isinstance(out, jax.Array)
    ref, _ = reference_forward(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (qn, kn, vn)), causal=True)
    assert np.abs(np.asarray(out, np.float64) - ref).max() < 3e-2
