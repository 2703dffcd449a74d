"""A backend registered after a decode call (under a new name, ranked first for the call's
class) is chosen by the next call: the decode decisions and the prepared fast-path steps of
attention_with_kvcache belong to one dispatch generation (dispatch._generation, bumped by
register() and clear_caches()), as flashmux's prepared eager calls (_prepared.py) do. CPU only,
the reference pass; no kvcache.clear_caches() between the calls."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

import flashmux  # noqa: E402
from flashmux import dispatch, kvcache  # noqa: E402

if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass", allow_module_level=True)


def _case():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc = torch.randn(2, 24, 2, 16, generator=g)
    vc = torch.randn(2, 24, 2, 16, generator=g)
    lens = torch.tensor([5, 24], dtype=torch.int32)
    return q, kc, vc, lens


@pytest.fixture(params=["fast", "checked"])
def spy_setup(request, monkeypatch):
    if request.param == "fast":  # the prepared steps (GPU tensors only, widened to the CPU)
        monkeypatch.setattr(kvcache, "_fast_eligible", lambda q: isinstance(q, torch.Tensor))
    # a name the CPU torch decode order ranks first, not registered yet
    monkeypatch.setitem(kvcache.DECODE_PRIORITY, "cpu",
                        {**kvcache.DECODE_PRIORITY["cpu"],
                         "torch": ["spy13"] + kvcache.DECODE_PRIORITY["cpu"]["torch"]})
    kvcache.clear_caches()
    old = dispatch.get_backend("reference")
    calls = []
    spy = copy.copy(old)
    spy.name = "spy13"

    def decode(*a, **k):
        calls.append(1)
        return old.decode(*a, **k)

    spy.decode = decode
    yield spy, calls, request.param
    dispatch.registry().pop("spy13", None)
    dispatch.register(old)
    kvcache.clear_caches()


def test_a_backend_registered_since_is_chosen(spy_setup):
    spy, calls, mode = spy_setup
    q, kc, vc, lens = _case()
    first = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)  # cached decision / step
    assert not calls
    if mode == "fast":
        assert len(kvcache._validated) == 1
    dispatch.register(spy)  # bumps the generation; no kvcache.clear_caches()
    second = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    assert calls, "the decode call after register() was served by the earlier choice"
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens).decision.chosen == "spy13"
