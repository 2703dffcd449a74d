"""On a GPU: every usable torch backend traces under torch.compile(fullgraph=True), forward and
backward, and agrees with its eager result (the custom ops carry the backend by name)."""

import pytest

import flashmux
from flashmux import dispatch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_compiled_matches_eager(backend):
    be = dispatch.get_backend(backend)
    if dispatch.availability(be):
        pytest.skip(f"{backend}: {'; '.join(dispatch.availability(be))}")
    q, k, v = (torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        return flashmux.attention(q, k, v, causal=True, window=(64, None), backend=backend)

    eager = f(q, k, v)
    g_eager = torch.autograd.grad(eager.float().sum(), (q, k, v))
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    g_comp = torch.autograd.grad(compiled.float().sum(), (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
