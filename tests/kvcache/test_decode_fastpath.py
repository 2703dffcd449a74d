"""The torch fast path of attention_with_kvcache (a validated call signature runs a prepared
step: no re-validation, no dispatch, the backend's runner) and the Triton decode's fused lse
merge, on the CPU: the fast path is widened to CPU tensors here (on a GPU it serves CUDA
tensors only). Runs in the reference pass (no runner: the checked path minus the checks) and in
the triton pass: with TRITON_INTERPRET=1 on CPU tensors (the runner with the append,
seqlen_add and fused merge), without it on CUDA tensors (compiled kernels, a GPU machine)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flashmux  # noqa: E402
from flashmux import dispatch, kvcache  # noqa: E402

BACKEND = os.environ.get("FLASHMUX_TEST_BACKEND", "reference")
if BACKEND not in ("reference", "triton"):
    pytest.skip("runs in the reference and triton passes", allow_module_level=True)
if BACKEND == "triton" and os.environ.get("TRITON_INTERPRET") != "1" \
        and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
# the device the backend under test runs: Triton compiled on a GPU takes CUDA tensors only
DEV = "cuda" if (BACKEND == "triton" and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"
if BACKEND == "triton" and dispatch.availability(dispatch.get_backend("triton")):
    pytest.skip("triton unavailable: "
                + "; ".join(dispatch.availability(dispatch.get_backend("triton"))),
                allow_module_level=True)


@pytest.fixture
def fast_on_cpu(monkeypatch):
    monkeypatch.setattr(kvcache, "_fast_eligible", lambda q: isinstance(q, torch.Tensor))
    kvcache._validated.clear()
    yield
    kvcache._validated.clear()


def _case(seed, b=3, sq=2, hq=4, hkv=2, d=16, page=8, max_pages=6, snew=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g)
    n = b * max_pages + 2
    kc = torch.randn(n, page, hkv, d, generator=g)
    vc = torch.randn(n, page, hkv, d, generator=g)
    table = torch.randperm(n, generator=g)[: b * max_pages].reshape(b, max_pages).int()
    k = torch.randn(b, snew, hkv, d, generator=g)
    v = torch.randn(b, snew, hkv, d, generator=g)
    lens = torch.tensor([0, 17, page * max_pages - snew][:b], dtype=torch.int32)
    return tuple(x.to(DEV) for x in (q, kc, vc, table, k, v, lens))


def _np(x):
    return x.double().cpu().numpy().copy()


def _want(q, kc, vc, table, k, v, lens, **kw):
    """NumPy float64 through the reference backend (NumPy arrays never take the fast path)."""
    out, lse, kc, vc = flashmux.attention_with_kvcache(
        _np(q), _np(kc), _np(vc), cache_seqlens=lens.cpu().numpy(), k=_np(k), v=_np(v),
        block_table=table.cpu().numpy(), backend="reference", return_lse=True, **kw)
    return tuple(torch.from_numpy(x) for x in (out, lse, kc, vc))


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_fast_steps_match_the_checked_path(fast_on_cpu, num_splits):
    q, kc, vc, table, k, v, lens = _case(0)
    kw = dict(causal=True, num_splits=num_splits)
    for step in range(3):
        g = torch.Generator().manual_seed(10 + step)  # new values, same signature
        q = torch.randn(q.shape, generator=g).to(DEV)
        k, v = torch.randn(k.shape, generator=g).to(DEV), torch.randn(v.shape, generator=g).to(DEV)
        lens = torch.tensor([step, 17 + 3 * step, 46], dtype=torch.int32, device=DEV)
        want = _want(q, kc, vc, table, k, v, lens, **kw)
        got = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                              block_table=table, return_lse=True,
                                              backend=BACKEND, **kw)
        assert got[2] is kc and got[3] is vc  # updated in place, the same objects
        assert len(kvcache._validated) == 1
        np.testing.assert_allclose(got[0].cpu().numpy(), want[0].cpu().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1].cpu().numpy(), want[1].cpu().numpy(), rtol=1e-4, atol=1e-5)
        # every slot: the appended tokens where they belong, the rest untouched
        np.testing.assert_array_equal(kc.cpu().numpy(), want[2].float().cpu().numpy())
        np.testing.assert_array_equal(vc.cpu().numpy(), want[3].float().cpu().numpy())
    step = next(iter(kvcache._validated.values()))
    assert (step.runner is not None) == (BACKEND == "triton")


def test_fast_path_keeps_the_checks_the_key_does_not_prove(fast_on_cpu):
    q, kc, vc, table, k, v, lens = _case(1)
    kw = dict(cache_seqlens=lens, block_table=table, backend=BACKEND)
    flashmux.attention_with_kvcache(q, kc, vc, num_splits=1, **kw)
    assert len(kvcache._validated) == 1
    with pytest.raises(TypeError, match="num_splits"):  # True == 1, but not an int
        flashmux.attention_with_kvcache(q, kc, vc, num_splits=True, **kw)
    flashmux.attention_with_kvcache(q, kc, vc, causal=True, **kw)
    with pytest.raises(TypeError, match="causal"):
        flashmux.attention_with_kvcache(q, kc, vc, causal=1, **kw)
    with pytest.raises(ValueError, match="block_table"):  # another shape: checked again
        flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table[:2],
                                        backend=BACKEND)
    with pytest.raises(ValueError, match="q"):
        flashmux.attention_with_kvcache(q[:, :, :3], kc, vc, **kw)


def test_a_re_registered_backend_is_not_served_by_a_stale_step(fast_on_cpu):
    q, kc, vc, table, k, v, lens = _case(2)
    kw = dict(cache_seqlens=lens, block_table=table, backend=BACKEND)
    flashmux.attention_with_kvcache(q, kc, vc, **kw)
    step = next(iter(kvcache._validated.values()))
    assert step.valid()
    old = dispatch.get_backend(BACKEND)
    calls = []

    class Spy(type(old)):
        def decode(self, *a, **k):
            calls.append(1)
            return super().decode(*a, **k)

    spy = Spy.__new__(Spy)
    spy.__dict__.update(old.__dict__)
    dispatch.register(spy)
    try:
        kvcache.clear_caches()
        assert not step.valid()
        flashmux.attention_with_kvcache(q, kc, vc, **kw)
        assert calls or next(iter(kvcache._validated.values())).runner is not None
        assert next(iter(kvcache._validated.values())).be is spy
    finally:
        dispatch.register(old)
        kvcache.clear_caches()


@pytest.mark.skipif(BACKEND != "triton", reason="the triton pass")
def test_fused_merge_leaves_its_counters_at_zero(monkeypatch):
    from flashmux_triton import _decode
    from flashmux_triton import tuning_decode as T

    q, kc, vc, table, k, v, lens = _case(3, snew=1)
    p = kvcache.DecodeParams(scale=0.25, causal=True, window_left=None, window_right=0,
                             softcap=None, alibi=False, num_splits=3, page_size=8,
                             return_lse=True)
    for fused in (1, 0):
        cfg = T.DecodeConfig(16, 4, 2, 1.0, fused_merge=fused)
        launch = _decode._Launch(q, kc, vc, table, None, p, cfg)
        assert launch.split and launch.fused == bool(fused)
        # as on a GPU: buffers kept per stream (a counter zeroed once)
        launch.persist = True
        monkeypatch.setattr(_decode, "_stream_key", lambda dev: 0)
        monkeypatch.setattr(_decode, "_capturing", lambda: False)
        # the merge kernel (fused 0) once: its counters are not the point (CI time)
        for n in ((5, 40, 47), (0, 1, 33), (47, 47, 47))[: 3 if fused else 1]:
            lens = torch.tensor(n, dtype=torch.int32, device=DEV)
            out, lse = launch(q, kc, vc, lens, table, None, 1)  # seqlen_add: lengths + 1
            want = flashmux.attention_with_kvcache(
                _np(q), _np(kc), _np(vc), cache_seqlens=(lens + 1).cpu().numpy(),
                block_table=table.cpu().numpy(), causal=True, scale=0.25, return_lse=True,
                backend="reference")
            np.testing.assert_allclose(out.cpu().numpy(), want[0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(lse.cpu().numpy(), want[1], rtol=1e-4, atol=1e-5)
            if fused:
                cnt = launch.buffers[0][2]
                assert cnt.shape == (3 * 2,) and not cnt.any()


@pytest.mark.skipif(BACKEND != "triton", reason="the triton pass")
def test_kept_buffers_are_bounded(monkeypatch):
    import gc

    from flashmux_triton import _decode
    from flashmux_triton import tuning_decode as T

    gc.collect()  # launches of earlier tests left for the collector: their bytes go now
    q, kc, vc, table, *_ = _case(4, snew=1)
    p = kvcache.DecodeParams(scale=0.25, causal=True, window_left=None, window_right=0,
                             softcap=None, alibi=False, num_splits=3, page_size=8,
                             return_lse=False)
    monkeypatch.setattr(_decode, "_stream_key", lambda dev: 0)
    monkeypatch.setattr(_decode, "_capturing", lambda: False)
    cfg = T.DecodeConfig(16, 4, 2, 1.0)
    a = _decode._Launch(q, kc, vc, table, None, p, cfg)
    size = 4 * (a.n_ws + a.n_cnt)
    before = _decode._KEPT[0]
    monkeypatch.setattr(_decode, "KEEP_BYTES", before + size)  # room for one signature
    a._buffers(q.device)
    assert a.buffers and _decode._KEPT[0] == before + size
    b = _decode._Launch(q[:2], kc, vc, table[:2], None, p, cfg)
    b._buffers(q.device)
    assert not b.buffers  # over the cap: nothing kept
    del a
    gc.collect()
    assert _decode._KEPT[0] == before


@pytest.mark.skipif(BACKEND != "triton", reason="the triton pass")
@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("page, window, ns, snew", [
    (0, None, 3, 5), (16, (9, 0), None, 5), (8, (20, 0), 2, 5), (8, None, 3, 20)])
def test_append_inside_the_decode_launch(fast_on_cpu, monkeypatch, fused, page, window, ns,
                                         snew):
    """16-key blocks, 5 new tokens: the new keys span block and split boundaries and reach the
    masked head loop (small left windows); fused (the decode launch appends) and separate (the
    append kernel first) against the float64 reference, every cache slot compared."""
    from flashmux_triton import _decode

    monkeypatch.setenv("FLASHMUX_TRITON_DECODE", "block_n=16,num_stages=1")
    monkeypatch.setenv("FLASHMUX_TRITON_FUSED_APPEND", fused)
    _decode.plan.cache_clear()
    _decode._LAUNCHES.clear()
    try:
        q, kc, vc, table, k, v, lens = _case(5, b=3, sq=3, hq=4, hkv=2, d=16, page=page or 8,
                                             max_pages=8, snew=snew)
        if not page:  # a contiguous cache of the same capacity
            g = torch.Generator().manual_seed(6)
            kc = torch.randn(3, 64, 2, 16, generator=g).to(DEV)
            vc = torch.randn(3, 64, 2, 16, generator=g).to(DEV)
            table = None
        kw = dict(causal=True, window=window, num_splits=ns)
        for lens in ([0, 30, 64 - snew], [12, 47 + 5 - snew, 3]):  # 20 new: > one block
            lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
            if table is None:
                want = flashmux.attention_with_kvcache(
                    _np(q), _np(kc), _np(vc), cache_seqlens=lens.cpu().numpy(), k=_np(k), v=_np(v),
                    backend="reference", return_lse=True, **kw)
                want = tuple(torch.from_numpy(x) for x in want)
            else:
                want = _want(q, kc, vc, table, k, v, lens, **kw)
            got = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                                  block_table=table, return_lse=True,
                                                  backend="triton", **kw)
            np.testing.assert_allclose(got[0].cpu().numpy(), want[0].cpu().numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got[1].cpu().numpy(), want[1].cpu().numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(kc.cpu().numpy(), want[2].float().cpu().numpy())
            np.testing.assert_array_equal(vc.cpu().numpy(), want[3].float().cpu().numpy())
        step = next(iter(kvcache._validated.values()))
        assert step.runner.fuse == (fused == "1")
        assert step.runner.launch.new == (fused == "1")
    finally:
        _decode.plan.cache_clear()
        _decode._LAUNCHES.clear()
