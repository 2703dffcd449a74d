"""Packed (varlen) calls never read cu_seqlens on the host when max_seqlen_q/k are given
(issue 14): torch.compile(fullgraph=True) traces them without a graph break, and an eager CUDA
call does not synchronize. Host-visible offsets are still checked."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flashmux  # noqa: E402
from flashmux import reference as R  # noqa: E402

LENS_Q, LENS_K = (5, 0, 9, 3), (7, 2, 9, 6)


def _packed(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = torch.randn(tq, 4, 16, generator=g, dtype=dtype).to(device)
    k = torch.randn(tk, 2, 16, generator=g, dtype=dtype).to(device)
    v = torch.randn(tk, 2, 16, generator=g, dtype=dtype).to(device)
    cu_q = torch.tensor(np.cumsum((0,) + LENS_Q), dtype=torch.int32, device=device)
    cu_k = torch.tensor(np.cumsum((0,) + LENS_K), dtype=torch.int32, device=device)
    return q, k, v, cu_q, cu_k


def _ref(q, k, v, cu_q, cu_k, causal):
    out, _ = R.reference_forward(q.double().cpu().numpy(), k.double().cpu().numpy(), v.double().cpu().numpy(),
                         causal=causal, cu_seqlens_q=cu_q.cpu().numpy(), cu_seqlens_k=cu_k.cpu().numpy())
    return out


def test_compile_fullgraph_varlen_reference():
    q, k, v, cu_q, cu_k = _packed()

    def f(q, k, v, cu_q, cu_k):
        return flashmux.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K),
                                  backend="reference")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, cu_q, cu_k)  # raises on a break
    np.testing.assert_allclose(out.numpy(), _ref(q, k, v, cu_q, cu_k, True), atol=2e-5, rtol=0)


def test_compile_fullgraph_varlen_without_hints():
    """Without max_seqlen hints a compiled call still does not read the offsets (the row count
    bounds the lengths)."""
    q, k, v, cu_q, cu_k = _packed(seed=1)

    def f(q, k, v, cu_q, cu_k):
        return flashmux.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, cu_q, cu_k)
    np.testing.assert_allclose(out.numpy(), _ref(q, k, v, cu_q, cu_k, False), atol=2e-5, rtol=0)


def test_host_visible_offsets_still_checked():
    q, k, v, cu_q, cu_k = _packed()
    bad = cu_q.clone()
    bad[2] = bad[1] - 1  # decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flashmux.attention(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu_k,
                           max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K))
    with pytest.raises(ValueError, match="max_seqlen_k"):
        flashmux.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K) - 1)


def test_device_offsets_not_read(monkeypatch):
    """With both hints, offsets on a device are never read unless FLASHMUX_CHECK_VALUES=1 (CPU
    tensors stand in for device ones; the reads go through to_numpy_int, counted)."""
    from flashmux import api

    calls = []
    real = api.to_numpy_int
    monkeypatch.setattr(api, "to_numpy_int", lambda x, kind: calls.append(1) or real(x, kind))
    monkeypatch.setattr(api, "_cu_location", lambda kind, cu: "device")
    q, k, v, cu_q, cu_k = _packed()
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference")
    flashmux.attention(q, k, v, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K), **kw)
    assert calls == []
    flashmux.attention(q, k, v, **kw)  # no hints: the maxima come from the values
    assert calls == [1, 1]
    monkeypatch.setenv(api.CHECK_VALUES_ENV, "1")
    flashmux.attention(q, k, v, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K), **kw)
    assert calls == [1, 1, 1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [None, "reference"])
def test_cuda_varlen_does_not_synchronize(backend):
    q, k, v, cu_q, cu_k = _packed("cuda", torch.float16)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(LENS_Q),
              max_seqlen_k=max(LENS_K), causal=True, backend=backend)
    flashmux.attention(q, k, v, **kw)  # first call: discovery, builds, caches may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flashmux.attention(q, k, v, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = _ref(q, k, v, cu_q, cu_k, True)
    np.testing.assert_allclose(out.float().cpu().numpy(), want, atol=2e-2, rtol=0)
