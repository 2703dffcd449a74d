"""Dropout through the torch compat calls (flash_attn_func, flash_attn_varlen_func, SDPA): the
seed is drawn on q's device from torch's generator and passed as a tensor, so torch.manual_seed
replays a call, successive calls differ, torch.compile(fullgraph=True) traces it without a graph
break, and the mask is the one flashmux's int seed of the same value draws."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import flashmux  # noqa: E402
from flashmux.compat import flash_attn as fa  # noqa: E402
from flashmux.compat import torch as ctorch  # noqa: E402
from flashmux.testing.seeds import recorded_seeds  # noqa: E402

P = 0.25


def _t(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_flash_attn_dropout_seed_from_torch_generator(monkeypatch):
    q, k, v = _t(2, 9, 2, 8, seed=1), _t(2, 9, 2, 8, seed=2), _t(2, 9, 2, 8, seed=3)
    seeds = recorded_seeds(monkeypatch)
    torch.manual_seed(5)
    a = fa.flash_attn_func(q, k, v, dropout_p=P, causal=True)
    b = fa.flash_attn_func(q, k, v, dropout_p=P, causal=True)
    torch.manual_seed(5)
    c = fa.flash_attn_func(q, k, v, dropout_p=P, causal=True)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert isinstance(seeds[0], torch.Tensor) and seeds[0].device == q.device
    monkeypatch.undo()
    same = flashmux.attention(q, k, v, dropout_p=P, causal=True, dropout_seed=int(seeds[0]))
    assert torch.equal(a, same)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.manual_seed(6)
    x = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, dropout_p=P)
    torch.manual_seed(6)
    y = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, dropout_p=P)
    assert torch.equal(x, y)


def test_sdpa_dropout_compiles_without_graph_break():
    from torch._dynamo.testing import CompileCounter

    q, k, v = _t(1, 2, 7, 8, seed=4), _t(1, 2, 7, 8, seed=5), _t(1, 2, 7, 8, seed=6)
    def fn(q, k, v):
        return ctorch.scaled_dot_product_attention(q, k, v, dropout_p=P)

    fn(q, k, v)  # eagerly first: the first call's lazy imports and caches would force a retrace
    cnt = CompileCounter()
    f = torch.compile(fn, backend=cnt, fullgraph=True)
    a, b = f(q, k, v), f(q, k, v)
    assert cnt.frame_count == 1
    assert not torch.equal(a, b)  # a fresh seed each call
    plain = ctorch.scaled_dot_product_attention(q, k, v)
    assert not torch.equal(a, plain)
