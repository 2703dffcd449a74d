"""Session 10: one launch per decode step under CUDA-graph capture. The fused merge's ticket
counters (the last split program of a group merges and resets its counter) come, during
capture, from a per-device pool zeroed once outside any capture, a slice per captured launch,
instead of a zeroed buffer made inside the graph (a memset node before every launch). Triton
pass: the pool's bookkeeping on the CPU (no kernel); on a GPU, two graphs of the same signature
replayed several times with new lengths, judged against float64 and against eager calls."""

from __future__ import annotations

import numpy as np
import pytest
from tritonpass import triton_pass_torch  # tests/kvcache/tritonpass.py

torch = triton_pass_torch()

import graphs  # noqa: E402  (tests/kvcache/graphs.py)

from flashmux import reference  # noqa: E402
from flashmux.kvcache import DecodeParams  # noqa: E402
from flashmux_triton import _decode  # noqa: E402
from flashmux_triton import tuning_decode as T  # noqa: E402


def test_pool_slices_are_disjoint_and_run_out(monkeypatch):
    monkeypatch.setattr(_decode, "_GRAPH_POOL", {})
    monkeypatch.setattr(_decode, "_GRAPH_POOL_INTS", 128)
    dev = torch.device("cpu")
    assert _decode._graph_counters(dev, 10) is None  # no pool yet
    _decode._graph_pool_ready(dev)
    a, b = _decode._graph_counters(dev, 10), _decode._graph_counters(dev, 40)
    assert a.numel() == 10 and b.numel() == 40 and not a.any() and not b.any()
    assert b.data_ptr() - a.data_ptr() >= 10 * 4  # disjoint, in order
    assert _decode._graph_counters(dev, 70) is None  # 32 + 64 used: 70 more does not fit
    assert _decode._graph_counters(dev, 32) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("tma,early", [(0, 0), (1, 0), (0, 1)])
def test_fused_merge_graphs_replayed_with_new_lengths(tma, early):
    rng = np.random.default_rng(5)
    b, hq, hkv, d, cap = 3, 8, 2, 64, 512
    q = rng.standard_normal((b, 1, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    t = lambda x: torch.from_numpy(x).to(torch.bfloat16).cuda()  # noqa: E731
    qt, kt, vt = t(q), t(k), t(v)
    q64, k64, v64 = (x.float().cpu().numpy().astype(np.float64) for x in (qt, kt, vt))
    lens = torch.tensor([cap, 100, 0], dtype=torch.int32, device="cuda")
    cfg = T.DecodeConfig(128, 4, 3, 1.0, fused_merge=1, off32=1, pdl=1, tma=tma,
                         pdl_early=early)
    p = DecodeParams(scale=d ** -0.5, causal=True, window_left=None, window_right=0,
                     softcap=None, alibi=False, num_splits=3, page_size=0, return_lse=False)

    def step():
        return _decode.decode(qt, kt, vt, lens, None, None, p, config=cfg)[0]

    step()  # plan, compile, the zeroed pool
    torch.cuda.synchronize()
    used = dict((k_, v_[1]) for k_, v_ in _decode._GRAPH_POOL.items())
    graphs, outs = [], []
    for n in (3, 1):  # two graphs of the same signature: each its own counters
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append([step() for _ in range(n)])
        graphs.append(g)
    grown = sum(v_[1] for v_ in _decode._GRAPH_POOL.values()) - sum(used.values())
    assert grown >= 4 * 3 * hkv, "captured launches did not take counters from the pool"
    for new in ([1, cap, 77], [cap, 0, 300], [5, 6, 7]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        ref = reference.attention_with_kvcache(q64, k64, v64, cache_seqlens=np.array(new),
                                               causal=True)[0]
        eager = step()
        for o in outs[0] + outs[1]:
            assert torch.equal(o, eager)
            assert np.abs(o.float().cpu().numpy() - ref).max() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("idx", [48, 49, 50])
def test_merge_trigger_in_a_graph(idx):
    """c48/c49: the merge kernel lets the next decode launch start early (PDL trigger): three
    steps in one graph, replayed with new lengths, equal to eager and judged vs float64."""
    rng = np.random.default_rng(idx)
    b, hq, hkv, d, cap = 3, 8, 2, 64, 512
    x = [rng.standard_normal(s).astype(np.float32)
         for s in ((b, 1, hq, d), (b, cap, hkv, d), (b, cap, hkv, d))]
    qt, kt, vt = (torch.from_numpy(a).to(torch.bfloat16).cuda() for a in x)
    q64, k64, v64 = (a.float().cpu().numpy().astype(np.float64) for a in (qt, kt, vt))
    lens = torch.tensor([cap, 100, 0], dtype=torch.int32, device="cuda")
    cfg = T.CANDIDATES[idx]
    assert cfg.merge_trigger and cfg.pdl and not cfg.fused_merge
    p = DecodeParams(scale=d ** -0.5, causal=True, window_left=None, window_right=0,
                     softcap=None, alibi=False, num_splits=3, page_size=0, return_lse=True)

    def step():
        return _decode.decode(qt, kt, vt, lens, None, None, p, config=cfg)

    g, outs = graphs.capture(step)
    for new in ([1, cap, 77], [cap, 0, 300]):
        graphs.replay([g], lens, new)
        ref_o, ref_l = reference.attention_with_kvcache(
            q64, k64, v64, cache_seqlens=np.array(new), causal=True)[:2]
        eo, el = step()
        for o, lse in outs:
            assert torch.equal(o, eo) and torch.equal(lse, el)
            assert np.abs(o.float().cpu().numpy() - ref_o).max() < 2e-2
            fin = np.isfinite(ref_l)
            assert np.abs(lse.cpu().numpy()[fin] - ref_l[fin]).max() < 1e-3


def test_default_merge_warps_grow_with_the_partials():
    """The session-10 default (c49: 1-warp merge programs with a PDL trigger) widens the merge
    programs where one warp would hold over 128 partial elements per thread."""
    cfg = T.config_for(128, 128, "bfloat16", 0)
    assert (cfg.merge_trigger, cfg.merge_warps, cfg.fused_merge) == (1, 1, 0)
    q = torch.zeros((1, 1, 4, 128), dtype=torch.float16)
    k = torch.zeros((1, 8192, 1, 128), dtype=torch.float16)

    def warps(ns):
        p = DecodeParams(scale=0.1, causal=False, window_left=None, window_right=None,
                         softcap=None, alibi=False, num_splits=ns, page_size=0, return_lse=False)
        return _decode._Launch(q, k, k, None, None, p, cfg).merge_kw["num_warps"]

    assert warps(2) == 1 and warps(32) == 1  # 32 x 128 partials: 128 per thread
    assert warps(64) == 2
